// Split-KV flash decoding over a dense or block-sparse KV cache.
//
// decode_split_kernel: one CTA per (batch, KV head x row chunk, split); the batch is on gridDim.x
// (up to 2^31 - 1; gridDim.y/z stop at 65535). The query rows of a CTA are up to 16 (query head
// of the GQA group, query position) pairs that share one KV head, so each key tile is read once
// for all of them. Keys are walked as a "virtual" sequence: dense decode reads positions
// [0, seqlen); sparse decode reads the listed key blocks back to back.
// The virtual sequence is cut into num_splits contiguous ranges; each CTA runs an online softmax
// (base 2, fp32) over its range in tiles of 32 keys, loaded with 16-byte vector loads and
// prefetched into registers while the previous tile is processed. It writes an fp32 partial
// output and a base-2 LSE per row.
//
// decode_combine_kernel: one CTA per (batch, query head, query position) merges the splits with
// their LSEs and writes the output in the input dtype and the natural-log LSE.
//
// Masks: key position t is visible to query row i of sequence b iff t < seqlen[b] and
// t <= seqlen[b] - Lq + i (bottom-right causal), its block is listed for the KV head, the
// optional per-head block mask keeps it and the optional key padding mask holds it. Positions
// >= seqlen[b] are never read. Scores: scale, then softcap, ALiBi and the key bias (all optional),
// then the masks. A paged cache is read through the block table, row by row (no gather copy).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstring>
#include <string>

#include "common.h"
#include "decode.h"

namespace sparseattn {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T>
struct Conv;

template <>
struct Conv<__half> {
  static __device__ __forceinline__ float2 pair(uint32_t w) {
    __half2 h;
    memcpy(&h, &w, sizeof(h));
    return __half22float2(h);
  }
  static __device__ __forceinline__ float one(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
};

template <>
struct Conv<__nv_bfloat16> {
  static __device__ __forceinline__ float2 pair(uint32_t w) {
    __nv_bfloat162 h;
    memcpy(&h, &w, sizeof(h));
    return __bfloat1622float2(h);
  }
  static __device__ __forceinline__ float one(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// MR: query rows of a CTA, the power of two >= G * Lq up to kDecodeRowsPerCta (launch): the
// unrolled P V loop issues MR predicated FMAs per key, so a fixed 16 wasted 3/4 of them at
// G * Lq = 4 (GQA 4:1, one new token) and 15/16 at MHA decode.
template <typename T, int D, int MR>
__global__ void __launch_bounds__(D) decode_split_kernel(const DecodeParams p) {
  constexpr int NT = D;                 // threads; thread d owns output column d
  constexpr int NW = NT / 32;
  constexpr int TILE = kDecodeTile;
  static_assert(MR >= 1 && MR <= kDecodeRowsPerCta && (MR & (MR - 1)) == 0, "MR: a power of two <= 16");
  constexpr int DW = D / 2;             // 32-bit words per row
  constexpr int KW = DW + 1;            // padded K row stride (odd): column reads conflict-free
  constexpr int VEC = 8;                // elements per 16-byte load
  constexpr int RV = D / VEC;           // 16-byte vectors per row
  constexpr int LOADS = TILE * RV / NT; // vectors per thread per tile and matrix
  static_assert(TILE == 32, "a tile is one warp wide");
  static_assert((TILE * RV) % NT == 0, "tile loads must split evenly over the threads");

  __shared__ uint32_t k_s[TILE * KW];
  __shared__ __align__(16) T v_s[TILE * D];
  __shared__ uint32_t q_s[MR * DW];
  __shared__ float s_s[MR * TILE];
  __shared__ float m_s[MR], l_s[MR], alpha_s[MR];
  __shared__ int tok_s[TILE];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int split = blockIdx.z;
  const int G = p.Hq / p.Hkv;
  const int chunks = (G * p.Lq + MR - 1) / MR;
  const int hkv = blockIdx.y / chunks;
  const int r0 = (blockIdx.y % chunks) * MR;
  const int m_rows = min(MR, G * p.Lq - r0);
  const int b = blockIdx.x;
  // Clamped to [0, Lmax]: Python validates the range, but not under torch.compile, and an
  // out-of-range length must never read past the cache.
  const int seqlen = min(max(p.seqlens[b], 0), p.Lmax);
  const bool sparse = p.blk_idx != nullptr;
  const int64_t bh = (int64_t)b * p.Hkv + hkv;
  const int bk_shift = __ffs(p.block_k) - 1;
  const int64_t n = sparse ? ((int64_t)p.blk_num[bh] << bk_shift) : (int64_t)seqlen;
  const int64_t per = ((n + p.num_splits - 1) / p.num_splits + TILE - 1) / TILE * TILE;
  const int64_t begin = min(n, (int64_t)split * per);
  const int64_t end = min(n, begin + per);
  const int32_t* blocks = sparse ? p.blk_idx + bh * p.blk_width : nullptr;
  // Paged: k_sb/v_sb step a page (looked up per row below); contiguous: they step the batch.
  const bool paged = p.block_table != nullptr;
  const int32_t* table = paged ? p.block_table + (int64_t)b * p.bt_sb : nullptr;
  const T* kbase = static_cast<const T*>(p.k) + (paged ? 0 : (int64_t)b * p.k_sb) + (int64_t)hkv * p.k_sh;
  const T* vbase = static_cast<const T*>(p.v) + (paged ? 0 : (int64_t)b * p.v_sb) + (int64_t)hkv * p.v_sh;
  const float scale_log2 = p.scale * kLog2e;
  const bool score_mods = p.softcap > 0.f || p.alibi != nullptr || p.key_bias != nullptr;

  // Key position of virtual key `v`, or -1 when it is past the range or the sequence.
  auto token = [&](int64_t v) -> int {
    if (v >= end) return -1;
    const int64_t t = sparse ? ((int64_t)blocks[v >> bk_shift] << bk_shift) + (v & (p.block_k - 1)) : v;
    return t < seqlen ? (int)t : -1;
  };

  for (int i = tid; i < m_rows * DW; i += NT) {
    const int r = i / DW, w = i % DW, gr = r0 + r;
    const int hq = hkv * G + gr / p.Lq, qi = gr % p.Lq;
    const T* qrow = static_cast<const T*>(p.q) + (int64_t)b * p.q_sb + (int64_t)hq * p.q_sh + (int64_t)qi * p.q_sl;
    q_s[i] = reinterpret_cast<const uint32_t*>(qrow)[w];
  }
  if (tid < MR) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
    alpha_s[tid] = 1.f;
  }
  __syncthreads();

  uint4 kr[LOADS], vr[LOADS];
  auto fetch = [&](int64_t t0) {
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const int idx = tid + i * NT, row = idx / RV, c = idx % RV;
      const int tok = token(t0 + row);
      if (tok >= 0) {
        // tok < seqlen <= Lmax = max_pages * page_size: the table index is in range; the page
        // index it holds is clamped so that a bad entry never reads outside the cache.
        int64_t page = 0;
        int prow = tok;
        if (paged) {
          const int j = tok / p.page_size;
          page = min(max(__ldg(table + j), 0), p.num_pages - 1);
          prow = tok - j * p.page_size;
        }
        kr[i] = __ldg(reinterpret_cast<const uint4*>(kbase + page * p.k_sb + (int64_t)prow * p.k_sl + c * VEC));
        vr[i] = __ldg(reinterpret_cast<const uint4*>(vbase + page * p.v_sb + (int64_t)prow * p.v_sl + c * VEC));
      } else {  // never read: zeros, so that 0-probability keys contribute exactly 0
        kr[i] = make_uint4(0u, 0u, 0u, 0u);
        vr[i] = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  };

  float acc[MR];
#pragma unroll
  for (int r = 0; r < MR; ++r) acc[r] = 0.f;
  const int d = tid;

  if (begin < end) fetch(begin);
  for (int64_t t0 = begin; t0 < end; t0 += TILE) {
    // Registers -> shared memory.
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const int idx = tid + i * NT, row = idx / RV, c = idx % RV;
      uint32_t* kd = k_s + row * KW + c * 4;
      kd[0] = kr[i].x;
      kd[1] = kr[i].y;
      kd[2] = kr[i].z;
      kd[3] = kr[i].w;
      *reinterpret_cast<uint4*>(v_s + row * D + c * VEC) = vr[i];
    }
    if (tid < TILE) tok_s[tid] = token(t0 + tid);
    __syncthreads();
    if (t0 + TILE < end) fetch(t0 + TILE);  // the next tile's loads fly during the math below

    // Scores (base 2) of the tile; -inf where masked.
    for (int e = tid; e < m_rows * TILE; e += NT) {
      const int r = e / TILE, s = e % TILE, gr = r0 + r;
      const int hq = hkv * G + gr / p.Lq;
      const int qpos = seqlen - p.Lq + gr % p.Lq;
      const int tok = tok_s[s];
      bool ok = tok >= 0 && tok <= qpos;
      if (ok && p.head_mask != nullptr) {
        const int mb = p.mask_b == 1 ? 0 : b, mh = p.mask_h == 1 ? 0 : hq;
        ok = p.head_mask[((int64_t)mb * p.mask_h + mh) * p.n_kblocks + (tok >> bk_shift)] != 0;
      }
      if (ok && p.key_padding != nullptr) ok = p.key_padding[(int64_t)b * p.kpm_sb + tok] != 0;
      float x = -INFINITY;
      if (ok) {
        const uint32_t* kw = k_s + s * KW;
        const uint32_t* qw = q_s + r * DW;
        float a0 = 0.f, a1 = 0.f;
#pragma unroll 8
        for (int w = 0; w < DW; ++w) {
          const float2 kf = Conv<T>::pair(kw[w]);
          const float2 qf = Conv<T>::pair(qw[w]);
          a0 = fmaf(qf.x, kf.x, a0);
          a1 = fmaf(qf.y, kf.y, a1);
        }
        if (!score_mods) {
          x = (a0 + a1) * scale_log2;
        } else {  // natural units: scale, softcap, ALiBi, key bias; then base 2
          float sc = (a0 + a1) * p.scale;
          if (p.softcap > 0.f) sc = p.softcap * tanhf(sc / p.softcap);
          if (p.alibi != nullptr) sc -= p.alibi[(int64_t)b * p.alibi_sb + hq] * (float)(qpos - tok);
          if (p.key_bias != nullptr) sc += p.key_bias[(int64_t)b * p.kb_sb + (int64_t)hq * p.kb_sh + tok];
          x = sc * kLog2e;  // -inf stays -inf (a key knocked out by its bias)
        }
      }
      s_s[r * TILE + s] = x;
    }
    __syncthreads();

    // Online softmax: one warp per row, one lane per key.
    for (int r = warp; r < m_rows; r += NW) {
      const float x = s_s[r * TILE + lane];
      const float m_old = m_s[r];
      const float m_new = fmaxf(m_old, warp_max(x));
      const float pr = x == -INFINITY ? 0.f : exp2f(x - m_new);
      const float sum = warp_sum(pr);
      s_s[r * TILE + lane] = pr;
      __syncwarp();  // every lane has read m_s[r] before lane 0 rewrites it (shuffles do not order memory)
      if (lane == 0) {
        const float alpha = m_old == -INFINITY ? 0.f : exp2f(m_old - m_new);
        m_s[r] = m_new;
        l_s[r] = l_s[r] * alpha + sum;
        alpha_s[r] = alpha;
      }
    }
    __syncthreads();

    // acc = acc * alpha + P V.
#pragma unroll
    for (int r = 0; r < MR; ++r)
      if (r < m_rows) acc[r] *= alpha_s[r];
#pragma unroll 4
    for (int s = 0; s < TILE; ++s) {
      const float vv = Conv<T>::one(v_s[s * D + d]);
#pragma unroll
      for (int r = 0; r < MR; ++r)
        if (r < m_rows) acc[r] = fmaf(s_s[r * TILE + s], vv, acc[r]);
    }
    __syncthreads();
  }

  const int64_t rows_total = (int64_t)p.B * p.Hq * p.Lq;
#pragma unroll
  for (int r = 0; r < MR; ++r) {
    if (r >= m_rows) break;
    const int gr = r0 + r, hq = hkv * G + gr / p.Lq, qi = gr % p.Lq;
    const int64_t prow = split * rows_total + ((int64_t)b * p.Hq + hq) * p.Lq + qi;
    const float l = l_s[r];
    p.o_part[prow * D + d] = l > 0.f ? acc[r] / l : 0.f;
    if (d == 0) p.lse_part[prow] = l > 0.f ? m_s[r] + log2f(l) : -INFINITY;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(D) decode_combine_kernel(const DecodeParams p) {
  const int64_t row = blockIdx.x;  // ((b * Hq) + hq) * Lq + qi
  const int64_t rows_total = (int64_t)p.B * p.Hq * p.Lq;
  const int qi = (int)(row % p.Lq);
  const int hq = (int)((row / p.Lq) % p.Hq);
  const int b = (int)(row / ((int64_t)p.Lq * p.Hq));
  const int d = threadIdx.x;
  float mx = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, p.lse_part[s * rows_total + row]);
  float acc = 0.f, wsum = 0.f;
  if (mx != -INFINITY) {
    for (int s = 0; s < p.num_splits; ++s) {
      const float ls = p.lse_part[s * rows_total + row];
      if (ls == -INFINITY) continue;
      const float w = exp2f(ls - mx);
      wsum += w;
      acc = fmaf(w, p.o_part[(s * rows_total + row) * D + d], acc);
    }
  }
  T* out = static_cast<T*>(p.out) + (int64_t)b * p.o_sb + (int64_t)hq * p.o_sh + (int64_t)qi * p.o_sl;
  out[d] = Conv<T>::from(wsum > 0.f ? acc / wsum : 0.f);
  if (d == 0) p.lse[row] = wsum > 0.f ? (mx + log2f(wsum)) * kLn2 : -INFINITY;
}

template <typename T, int D>
void launch(const DecodeParams& p, cudaStream_t stream) {
  // Rows per CTA: the power of two >= G * Lq, at most kDecodeRowsPerCta. The row chunks (grid y)
  // are the same as with kDecodeRowsPerCta rows for every G * Lq (one chunk up to 16 rows), so
  // decode_num_splits and check() count them with it.
  static_assert(kDecodeRowsPerCta == 16, "the dispatch below stops at 16 rows");
  const int group_rows = p.Hq / p.Hkv * p.Lq;
  const int chunks = (group_rows + kDecodeRowsPerCta - 1) / kDecodeRowsPerCta;
  const dim3 grid(p.B, p.Hkv * chunks, p.num_splits);
  if (group_rows <= 1) {
    decode_split_kernel<T, D, 1><<<grid, D, 0, stream>>>(p);
  } else if (group_rows <= 2) {
    decode_split_kernel<T, D, 2><<<grid, D, 0, stream>>>(p);
  } else if (group_rows <= 4) {
    decode_split_kernel<T, D, 4><<<grid, D, 0, stream>>>(p);
  } else if (group_rows <= 8) {
    decode_split_kernel<T, D, 8><<<grid, D, 0, stream>>>(p);
  } else {
    decode_split_kernel<T, D, kDecodeRowsPerCta><<<grid, D, 0, stream>>>(p);
  }
  SA_CHECK_LAUNCH("decode_split_kernel launch");
  const int64_t rows = (int64_t)p.B * p.Hq * p.Lq;
  decode_combine_kernel<T, D><<<(unsigned)rows, D, 0, stream>>>(p);
  SA_CHECK_LAUNCH("decode_combine_kernel launch");
}

template <typename T>
void dispatch_dim(const DecodeParams& p, cudaStream_t stream) {
  switch (p.D) {
    case 64: return launch<T, 64>(p, stream);
    case 128: return launch<T, 128>(p, stream);
    case 256: return launch<T, 256>(p, stream);
    default: SA_REQUIRE(false, "head dim: expected 64, 128 or 256, got " + std::to_string(p.D));
  }
}

bool aligned(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

void check(const DecodeParams& p) {
  SA_REQUIRE(p.q && p.k && p.v && p.out && p.lse && p.o_part && p.lse_part && p.seqlens,
             "decode_attention: null pointer among q, k, v, out, lse, workspace, seqlens");
  SA_REQUIRE(p.B >= 1, "B: expected >= 1, got " + std::to_string(p.B));
  SA_REQUIRE(p.Hkv >= 1 && p.Hq >= p.Hkv && p.Hq % p.Hkv == 0,
             "heads: expected Hq a multiple of Hkv, got Hq=" + std::to_string(p.Hq) + " Hkv=" + std::to_string(p.Hkv));
  SA_REQUIRE(p.Lq >= 1 && p.Lq <= kDecodeMaxLq, "Lq: expected 1..16, got " + std::to_string(p.Lq));
  SA_REQUIRE(p.Lmax >= 1, "Lmax: expected >= 1, got " + std::to_string(p.Lmax));
  SA_REQUIRE(p.num_splits >= 1 && p.num_splits <= 4096,
             "num_splits: expected 1..4096, got " + std::to_string(p.num_splits));
  const int64_t chunks = ((int64_t)p.Hq / p.Hkv * p.Lq + kDecodeRowsPerCta - 1) / kDecodeRowsPerCta;
  SA_REQUIRE(p.Hkv * chunks <= 65535, "Hkv x row chunks: expected <= 65535");
  SA_REQUIRE((int64_t)p.B * p.Hq * p.Lq <= 0x7fffffff, "B x Hq x Lq: expected <= 2^31 - 1 (combine grid)");
  SA_REQUIRE(aligned(p.q, 4) && p.q_sb % 2 == 0 && p.q_sh % 2 == 0 && p.q_sl % 2 == 0,
             "q: expected 4-byte aligned rows (even strides)");
  SA_REQUIRE(aligned(p.k, 16) && p.k_sb % 8 == 0 && p.k_sh % 8 == 0 && p.k_sl % 8 == 0,
             "k_cache: expected 16-byte aligned rows (strides multiples of 8 elements)");
  SA_REQUIRE(aligned(p.v, 16) && p.v_sb % 8 == 0 && p.v_sh % 8 == 0 && p.v_sl % 8 == 0,
             "v_cache: expected 16-byte aligned rows (strides multiples of 8 elements)");
  if (p.blk_idx != nullptr) {
    SA_REQUIRE(p.blk_num != nullptr, "blk_num: expected a pointer with blk_idx");
    SA_REQUIRE(p.block_k >= 16 && (p.block_k & (p.block_k - 1)) == 0,
               "block_k: expected a power of two >= 16, got " + std::to_string(p.block_k));
    SA_REQUIRE(p.blk_width >= 1, "blk_width: expected >= 1, got " + std::to_string(p.blk_width));
  }
  if (p.block_table != nullptr) {
    SA_REQUIRE(p.page_size >= 16 && p.page_size % 16 == 0,
               "page_size: expected a multiple of 16, got " + std::to_string(p.page_size));
    SA_REQUIRE(p.num_pages >= 1, "num_pages: expected >= 1, got " + std::to_string(p.num_pages));
    SA_REQUIRE(p.max_pages >= 1 && (int64_t)p.max_pages * p.page_size == p.Lmax,
               "block_table: expected Lmax = max_pages x page_size, got Lmax=" + std::to_string(p.Lmax) +
                   " max_pages=" + std::to_string(p.max_pages) + " page_size=" + std::to_string(p.page_size));
  }
  SA_REQUIRE(p.softcap >= 0.f && std::isfinite(p.softcap),
             "softcap: expected 0 (off) or a finite value > 0, got " + std::to_string(p.softcap));
  if (p.head_mask != nullptr) {
    SA_REQUIRE(p.blk_idx != nullptr, "head_mask: only with a block list");
    SA_REQUIRE(p.mask_b == 1 || p.mask_b == p.B, "head_mask: batch dim must be 1 or B");
    SA_REQUIRE(p.mask_h == 1 || p.mask_h == p.Hq, "head_mask: head dim must be 1 or Hq");
    SA_REQUIRE(p.n_kblocks >= 1, "head_mask: n_kblocks must be >= 1");
  }
}

}  // namespace

int decode_num_splits(int num_sms, int B, int Hq, int Hkv, int Lq, int64_t max_keys) {
  SA_REQUIRE(num_sms >= 1 && B >= 1 && Hkv >= 1 && Hq % Hkv == 0 && Lq >= 1,
             "decode_num_splits: invalid sizes");
  const int64_t chunks = ((int64_t)Hq / Hkv * Lq + kDecodeRowsPerCta - 1) / kDecodeRowsPerCta;
  const int64_t ctas = (int64_t)B * Hkv * chunks;
  // About four CTAs per SM in flight saturate HBM; each split reads at least 256 keys so that
  // the combine stays cheap.
  const int64_t by_sms = (4LL * num_sms + ctas - 1) / ctas;
  const int64_t by_work = max_keys / 256 > 1 ? max_keys / 256 : 1;
  int64_t s = by_sms < by_work ? by_sms : by_work;
  if (s > 128) s = 128;
  return s < 1 ? 1 : (int)s;
}

void decode_attention(const DecodeParams& p, cudaStream_t stream) {
  check(p);
  if (p.dtype == DType::kFloat16) return dispatch_dim<__half>(p, stream);
  if (p.dtype == DType::kBFloat16) return dispatch_dim<__nv_bfloat16>(p, stream);
  SA_REQUIRE(false, "dtype: expected float16 or bfloat16");
}

}  // namespace sparseattn
