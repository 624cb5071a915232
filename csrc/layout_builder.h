// GPU builder of BlockLayout lists: bool tile masks -> (counts, sorted indices).
//
// Same result as sparseattn.layout._mask_to_lists (the PyTorch builder and the oracle): row r of
// a [Bl, Hl, rows, cols] mask lists the columns where it is True in ascending order, then pads
// with 0 up to `width` = max(1, largest count).
// Two passes, each one launch for up to kMaxListJobs masks: count (and the largest count per
// mask), then fill. Framework-agnostic: raw pointers, element strides, a cudaStream_t.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sparseattn {

constexpr int kMaxListJobs = 4;

struct ListJob {
  const uint8_t* mask = nullptr;  // bool [bl, hl, rows, cols] read through the strides below
  int bl = 1, hl = 1, rows = 0, cols = 0;
  int64_t s_b = 0, s_h = 0, s_row = 0, s_col = 0;  // strides in elements (0 = broadcast)
  int32_t* counts = nullptr;   // int32 [bl, hl, rows], contiguous
  int32_t* indices = nullptr;  // int32 [bl, hl, rows, width], contiguous (fill pass only)
  int width = 0;
};

// Pass 1: counts of every job, and max_counts[j] = largest count of job j (int32 [n_jobs] on
// the device; zeroed here, on the stream).
void build_lists_count(const ListJob* jobs, int n_jobs, int32_t* max_counts, cudaStream_t stream);

// Pass 2: the sorted indices of every job (counts from pass 1, width set by the caller).
void build_lists_fill(const ListJob* jobs, int n_jobs, cudaStream_t stream);

}  // namespace sparseattn
