// Sparse decode attention (split-KV flash decoding): 1 to 16 new query tokens against a KV cache.
//
// Framework-agnostic: raw device pointers, sizes, strides (in elements) and a cudaStream_t.
// Python validates the arguments (sparseattn/decode.py); decode_attention() re-checks them
// cheaply and throws std::invalid_argument, never asserts.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sparseattn {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

constexpr int kDecodeMaxLq = 16;     // query rows per sequence
constexpr int kDecodeTile = 32;      // keys per tile of the split kernel
constexpr int kDecodeRowsPerCta = 16;  // query rows (group heads x Lq) of one CTA

struct DecodeParams {
  // q [B, Hq, Lq, D], k/v [B, Hkv, Lmax, D] with unit stride in D, rows 16-byte aligned. With a
  // block_table (paged cache), k/v are [num_pages, page_size, Hkv, D] and k_sb/v_sb step a page,
  // k_sl/v_sl a row of a page, k_sh/v_sh a head.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_sb = 0, q_sh = 0, q_sl = 0;
  int64_t k_sb = 0, k_sh = 0, k_sl = 0;
  int64_t v_sb = 0, v_sh = 0, v_sl = 0;
  // out [B, Hq, Lq, D] (unit stride in D), q's dtype; lse [B, Hq, Lq] fp32 contiguous (natural log).
  void* out = nullptr;
  int64_t o_sb = 0, o_sh = 0, o_sl = 0;
  float* lse = nullptr;
  // Workspace: o_part [num_splits, B, Hq, Lq, D] fp32, lse_part [num_splits, B, Hq, Lq] fp32.
  float* o_part = nullptr;
  float* lse_part = nullptr;
  // int32 [B]: keys of each sequence (0 <= seqlen <= Lmax; the kernel clamps to that range); the
  // queries are its last Lq positions.
  const int32_t* seqlens = nullptr;
  // Sparse decode (nullptr = dense): per (batch, KV head) the sorted key blocks to read,
  // blk_num int32 [B, Hkv], blk_idx int32 [B, Hkv, blk_width], each < ceil(seqlen / block_k).
  const int32_t* blk_num = nullptr;
  const int32_t* blk_idx = nullptr;
  int blk_width = 0;
  int block_k = 64;  // power of two >= 16
  // Optional per query head block mask, uint8 [mask_b, mask_h, n_kblocks] (mask_b in {1, B},
  // mask_h in {1, Hq}); a listed block is skipped for the heads whose entry is 0.
  const uint8_t* head_mask = nullptr;
  int mask_b = 1, mask_h = 1, n_kblocks = 0;
  // Paged cache (nullptr = contiguous): int32 [B, max_pages] with row stride bt_sb; logical key t
  // of sequence b is row t % page_size of page block_table[b, t / page_size], the page index
  // clamped to [0, num_pages) (Python validates it, but not under torch.compile or a capture).
  // Lmax = max_pages * page_size; page_size a multiple of 16.
  const int32_t* block_table = nullptr;
  int64_t bt_sb = 0;
  int max_pages = 0, page_size = 0, num_pages = 0;
  // Score modifications, in this order after scaling (natural units), then the masks:
  // softcap > 0: s = softcap * tanh(s / softcap) (0 = off);
  // alibi fp32 [B|1, Hq] (batch stride alibi_sb, 0 = shared): s -= slope * (qpos - t);
  // key_bias fp32 [B|1, Hq|1, Lmax] (strides kb_sb, kb_sh, unit along keys): s += bias (may be -inf).
  float softcap = 0.f;
  const float* alibi = nullptr;
  int64_t alibi_sb = 0;
  const float* key_bias = nullptr;
  int64_t kb_sb = 0, kb_sh = 0;
  // Key padding, uint8 [B, Lmax] (batch stride kpm_sb, unit along keys): key t of sequence b exists
  // iff nonzero (logical positions).
  const uint8_t* key_padding = nullptr;
  int64_t kpm_sb = 0;
  int B = 0, Hq = 0, Hkv = 0, Lq = 0, Lmax = 0, D = 0;
  float scale = 1.f;  // score scale (natural units)
  int num_splits = 1;
  DType dtype = DType::kFloat16;
};

// Splits of the key range per (batch, KV head): from the number of SMs and the work.
int decode_num_splits(int num_sms, int B, int Hq, int Hkv, int Lq, int64_t max_keys);

// Launches the split kernel then the combine kernel on `stream` (current device must be set).
void decode_attention(const DecodeParams& p, cudaStream_t stream);

}  // namespace sparseattn
