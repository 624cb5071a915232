// GPU builder of BlockLayout lists (see layout_builder.h). One warp per row: columns are
// scanned 32 at a time, a ballot gives every lane its rank among the True columns before it,
// so a row is written in order with no sort and no host round trip.
#include <string>

#include "common.h"
#include "layout_builder.h"

namespace sparseattn {
namespace {

constexpr int kWarps = 8;  // rows per CTA

struct JobSet {
  ListJob job[kMaxListJobs];
};

struct RowRef {
  const uint8_t* base;
  int64_t row;  // flat row index (b, h, r)
};

__device__ __forceinline__ bool locate(const ListJob& j, RowRef& ref) {
  const int64_t total = (int64_t)j.bl * j.hl * j.rows;
  const int64_t gr = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  if (gr >= total) return false;
  const int r = (int)(gr % j.rows);
  const int64_t g = gr / j.rows;
  const int h = (int)(g % j.hl), b = (int)(g / j.hl);
  ref.base = j.mask + b * j.s_b + h * j.s_h + r * j.s_row;
  ref.row = gr;
  return true;
}

__global__ void __launch_bounds__(kWarps * 32) build_lists_count_kernel(const JobSet js, int32_t* max_counts) {
  const ListJob& j = js.job[blockIdx.y];
  RowRef ref;
  if (!locate(j, ref)) return;  // whole warps return together
  const int lane = threadIdx.x & 31;
  int count = 0;
  for (int c0 = 0; c0 < j.cols; c0 += 32) {
    const int col = c0 + lane;
    const bool m = col < j.cols && ref.base[col * j.s_col] != 0;
    count += __popc(__ballot_sync(0xffffffffu, m));
  }
  if (lane == 0) {
    j.counts[ref.row] = count;
    atomicMax(max_counts + blockIdx.y, count);
  }
}

__global__ void __launch_bounds__(kWarps * 32) build_lists_fill_kernel(const JobSet js) {
  const ListJob& j = js.job[blockIdx.y];
  RowRef ref;
  if (!locate(j, ref)) return;
  const int lane = threadIdx.x & 31;
  const unsigned below = (1u << lane) - 1u;
  const int count = j.counts[ref.row];
  const int width = j.width;
  const int listed = min(count, width);
  int32_t* out = j.indices + ref.row * width;
  for (int pos = listed + lane; pos < width; pos += 32) out[pos] = 0;  // padding: 0 (in range, never read)
  int trues = 0;  // True columns before this chunk
  for (int c0 = 0; c0 < j.cols && trues < listed; c0 += 32) {  // warp-uniform condition
    const int col = c0 + lane;
    const bool m = col < j.cols && ref.base[col * j.s_col] != 0;
    const unsigned bt = __ballot_sync(0xffffffffu, m);
    if (m) {
      const int pos = trues + __popc(bt & below);
      if (pos < width) out[pos] = col;
    }
    trues += __popc(bt);
  }
}

JobSet make_set(const ListJob* jobs, int n_jobs, bool fill, unsigned& blocks_x) {
  SA_REQUIRE(jobs != nullptr && n_jobs >= 1 && n_jobs <= kMaxListJobs,
             "build_lists: expected 1.." + std::to_string(kMaxListJobs) + " jobs, got " + std::to_string(n_jobs));
  JobSet js{};
  int64_t max_rows = 0;
  for (int i = 0; i < n_jobs; ++i) {
    const ListJob& j = jobs[i];
    SA_REQUIRE(j.mask != nullptr && j.counts != nullptr, "build_lists: job " + std::to_string(i) + " has a null pointer");
    SA_REQUIRE(j.bl >= 1 && j.hl >= 1 && j.rows >= 1 && j.cols >= 1,
               "build_lists: job " + std::to_string(i) + " has an empty dimension");
    if (fill) {
      SA_REQUIRE(j.indices != nullptr && j.width >= 1 && j.width <= j.cols,
                 "build_lists: job " + std::to_string(i) + " expected indices and 1 <= width <= cols, got width " +
                     std::to_string(j.width));
    }
    js.job[i] = j;
    const int64_t rows = (int64_t)j.bl * j.hl * j.rows;
    if (rows > max_rows) max_rows = rows;
  }
  const int64_t bx = (max_rows + kWarps - 1) / kWarps;
  SA_REQUIRE(bx <= 0x7fffffff, "build_lists: too many rows");
  blocks_x = (unsigned)bx;
  return js;
}

}  // namespace

void build_lists_count(const ListJob* jobs, int n_jobs, int32_t* max_counts, cudaStream_t stream) {
  unsigned bx = 0;
  const JobSet js = make_set(jobs, n_jobs, false, bx);
  SA_REQUIRE(max_counts != nullptr, "build_lists_count: max_counts is null");
  SA_CUDA_CHECK(cudaMemsetAsync(max_counts, 0, sizeof(int32_t) * n_jobs, stream));
  build_lists_count_kernel<<<dim3(bx, n_jobs), kWarps * 32, 0, stream>>>(js, max_counts);
  SA_CHECK_LAUNCH("build_lists_count_kernel launch");
}

void build_lists_fill(const ListJob* jobs, int n_jobs, cudaStream_t stream) {
  unsigned bx = 0;
  const JobSet js = make_set(jobs, n_jobs, true, bx);
  build_lists_fill_kernel<<<dim3(bx, n_jobs), kWarps * 32, 0, stream>>>(js);
  SA_CHECK_LAUNCH("build_lists_fill_kernel launch");
}

}  // namespace sparseattn
