// The CPU kernel of sparse attention: listed key blocks read where they are (no gather into
// tensors), an entry's blocks in chunks of up to 512 keys (copied into a thread-local panel unless
// they follow each other in memory), online softmax, BLAS for the products of a chunk; the backward
// recomputes the probabilities from the saved LSE.
// Built on first use by cpu_kernel.py (torch.utils.cpp_extension, the machine's C++ compiler);
// without it the CPU path gathers the blocks and calls torch's fused CPU attention (cpu.py).
//
// Shapes are those of cpu.py's plan: q/out/do [X, E, M, C] (X planes sharing one list, E entries =
// query blocks, M rows), k/v [X, N, BLOCK_K, C] (N key blocks of every plane), one call = the
// entries `ent` [R] with `counts` [R] key blocks each, listed in `blocks` [R, W] as rows of k's
// dim 1. Optional additive float mask [X|1, R, M|1, W * BLOCK_K] (-inf: dropped pair); `causal`:
// key j of a tile is visible to row i iff j <= i (square diagonal tiles). Every tensor float32
// (cpu.py's compute dtype for fp16, bf16 and fp32 inputs; the op takes no float64); scores,
// softmax and accumulators in float32.
//
// GEMMs: the Fortran BLAS sgemm_ that libtorch_cpu exports (MKL on x86 wheels), declared weak:
// `available()` is false where this torch does not export it, and cpu.py then keeps its gather path.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
}

namespace {

// Column-major BLAS: C[m x n] = alpha * op(A) op(B) + beta * C.
inline void gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
                 float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// exp(x) for float32 that GCC vectorises in a loop (libm's expf does not vectorise without
// -ffast-math, which would also drop the infinities this kernel relies on). Cody-Waite range
// reduction and a degree-6 polynomial: ~2 ulp; exp(-inf) = 0, x < -87.3 -> 0, x > 88.7 -> +inf.
inline float fast_exp(float x) {
  const float hi = 88.7228f, lo = -87.3365f;
  float xc = std::min(std::max(x, lo), hi);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  float n = (xc * 1.44269504088896341f + shifter) - shifter;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float y = p * scale;
  y = x < lo ? 0.0f : y;
  return x > hi ? std::numeric_limits<float>::infinity() : y;
}

// tanh(y) for float32 that vectorises: Cephes' odd polynomial below |y| = 0.625, else
// 1 - 2 / (exp(2 |y|) + 1) with y's sign (+-1 once exp overflows); ~2 ulp.
inline float fast_tanh(float y) {
  const float a = std::fabs(y), z = y * y;
  const float small =
      ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z + 1.33314422036e-1f) * z -
       3.33332819422e-1f) * z * y + y;
  const float large = std::copysign(1.0f - 2.0f / (fast_exp(2.0f * a) + 1.0f), y);
  return a < 0.625f ? small : large;
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Everything a tile loop needs of one call (pointers and element strides).
struct Args {
  const float *q, *k, *v, *mask;
  int64_t qs0, qs1, qs2, ks0, ks1, ks2, vs0, vs1, vs2;
  int64_t ms0, ms1, ms2, ms3;  // mask strides (0 where it broadcasts)
  const int64_t *ent, *counts, *blocks;
  int64_t bs0;  // blocks' row stride (unit last stride, checked)
  int M, BK, Dq, Dv;
  bool causal;
  float scale, softcap;  // softcap 0: none
};

// Threads a call uses: one parallel region of at most one thread per job, in which each thread
// takes the next job (an atomic counter) when done with one. Jobs differ in size (an entry's count
// of blocks), and at::parallel_for alone splits a range into equal contiguous parts.
inline int64_t threads_for(int64_t jobs) {
  return std::max<int64_t>(1, std::min<int64_t>(jobs, at::get_num_threads()));
}

// Key blocks per chunk of one entry's list: the scores and the two products of a chunk run as
// one GEMM each over up to 512 keys (as torch's fused CPU attention does), on the chunk's K and V
// blocks copied into a thread-local panel that stays in cache (a 128-key block on its own made
// GEMMs too small to run near speed: about half of the fused op's rate per pair).
inline int chunk_blocks(int BK) { return std::max(1, 512 / BK); }

// The blocks [t0, t1) of entry r's list as one panel [n * BK] x C with row stride `ld`: the source
// rows themselves when the blocks follow each other in memory (one block; windows, causal rows),
// else copied into `scratch` (ld = C).
const float* panel(const Args& a, const float* src, int64_t s1, int64_t s2, int C, int64_t r, int64_t t0, int64_t t1,
                   float* scratch, int& ld) {
  const int64_t* b = a.blocks + r * a.bs0;
  bool consecutive = s1 == a.BK * s2;
  for (int64_t t = t0 + 1; consecutive && t < t1; ++t) consecutive = b[t] == b[t - 1] + 1;
  if (consecutive) {
    ld = (int)s2;
    return src + b[t0] * s1;
  }
  for (int64_t t = t0; t < t1; ++t) {
    const float* row = src + b[t] * s1;
    float* d = scratch + (t - t0) * a.BK * C;
    for (int j = 0; j < a.BK; ++j) std::memcpy(d + (int64_t)j * C, row + j * s2, sizeof(float) * C);
  }
  ld = C;
  return scratch;
}

// Scores of blocks [t0, t1) of call entry r, plane x, into S [M][n * BK]: scale * Q K^T (K the
// panel [n * BK] x Dq, row stride ldk), softcapped (c tanh(s / c), Gemma 2; its derivative
// 1 - tanh^2 into `dcap` [M][n * BK] where given), plus the mask, with the causal rule per block.
void scores(const Args& a, int64_t x, int64_t r, int64_t t0, int64_t t1, const float* Q, const float* K, int ldk,
            float* S, float* dcap = nullptr) {
  const int W = (int)(t1 - t0) * a.BK;
  gemm('T', 'N', W, a.M, a.Dq, a.scale, K, ldk, Q, (int)a.qs2, 0.0f, S, W);
  if (a.softcap > 0.0f) {
    const float c = a.softcap, inv = 1.0f / a.softcap;
    const int64_t n = (int64_t)a.M * W;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float t = fast_tanh(S[i] * inv);
      S[i] = c * t;
      if (dcap) dcap[i] = 1.0f - t * t;
    }
  }
  if (a.mask) {
    const float* mp = a.mask + x * a.ms0 + r * a.ms1 + t0 * a.BK * a.ms3;
    for (int i = 0; i < a.M; ++i) {
      const float* mr = mp + i * a.ms2;
      float* s = S + (int64_t)i * W;
      if (a.ms3 == 1) {
#pragma omp simd
        for (int j = 0; j < W; ++j) s[j] += mr[j];
      } else {
        for (int j = 0; j < W; ++j) s[j] += mr[j * a.ms3];
      }
    }
  }
  if (a.causal) {
    for (int i = 0; i < a.M; ++i)
      for (int64_t t = 0; t < t1 - t0; ++t)
        for (int j = i + 1; j < a.BK; ++j) S[(int64_t)i * W + t * a.BK + j] = kNegInf;
  }
}

void check_strides(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(-1) == 1 || t.size(-1) == 1, "sparseattn cpu kernel: ", name, " needs a unit last stride");
  TORCH_CHECK(t.stride(-2) >= t.size(-1) || t.size(-2) == 1, "sparseattn cpu kernel: ", name,
              " needs a row stride of at least its row length (BLAS)");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "sparseattn cpu kernel: ", name, " has dtype ", t.scalar_type(),
              ", expected float32");
}

// Tensors the kernel writes or reads beside q, k and v cover the same rows (no stray access).
void check_like(const at::Tensor& t, const at::Tensor& ref, int dims, const char* name) {
  TORCH_CHECK(t.dim() >= dims, "sparseattn cpu kernel: ", name, " has ", t.dim(), " dims");
  for (int d = 0; d < dims; ++d)
    TORCH_CHECK(t.size(d) == ref.size(d), "sparseattn cpu kernel: ", name, " size ", t.sizes(), " vs ", ref.sizes());
}

Args make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& ent,
               const at::Tensor& counts, const at::Tensor& blocks, const c10::optional<at::Tensor>& mask, bool causal,
               double scale, double softcap, int64_t Dv) {
  check_strides(q, "q");
  check_strides(k, "k");
  check_strides(v, "v");
  TORCH_CHECK(ent.scalar_type() == at::kLong && counts.scalar_type() == at::kLong && blocks.scalar_type() == at::kLong,
              "sparseattn cpu kernel: ent, counts and blocks must be int64");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && ent.dim() == 1 && counts.dim() == 1 &&
                  blocks.dim() == 2,
              "sparseattn cpu kernel: q, k, v [X, *, rows, C], ent and counts [R], blocks [R, W]");
  TORCH_CHECK(ent.is_contiguous() && counts.is_contiguous() && blocks.stride(1) == 1,
              "sparseattn cpu kernel: ent and counts contiguous, blocks with a unit last stride");
  TORCH_CHECK(!causal || q.size(2) == k.size(2), "sparseattn cpu kernel: the causal rule needs square tiles");
  Args a;
  a.q = q.data_ptr<float>();
  a.k = k.data_ptr<float>();
  a.v = v.data_ptr<float>();
  a.qs0 = q.stride(0), a.qs1 = q.stride(1), a.qs2 = q.stride(2);
  a.ks0 = k.stride(0), a.ks1 = k.stride(1), a.ks2 = k.stride(2);
  a.vs0 = v.stride(0), a.vs1 = v.stride(1), a.vs2 = v.stride(2);
  a.M = (int)q.size(2), a.BK = (int)k.size(2), a.Dq = (int)q.size(3), a.Dv = (int)Dv;
  TORCH_CHECK(v.size(3) >= Dv && k.size(3) >= q.size(3), "sparseattn cpu kernel: head dims");
  check_like(k, q, 1, "k");
  check_like(v, k, 3, "v");
  a.mask = nullptr;
  a.ms0 = a.ms1 = a.ms2 = a.ms3 = 0;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.dim() == 4 && m.scalar_type() == q.scalar_type(), "sparseattn cpu kernel: mask [X|1, R, M|1, S]");
    TORCH_CHECK(m.size(3) >= blocks.size(1) * k.size(2) && m.size(1) == ent.size(0) &&
                    (m.size(0) == 1 || m.size(0) == q.size(0)) && (m.size(2) == 1 || m.size(2) == q.size(2)),
                "sparseattn cpu kernel: mask ", m.sizes(), " does not cover [X|1, R, M|1, W * BLOCK_K]");
    a.mask = m.data_ptr<float>();
    a.ms0 = m.size(0) == 1 ? 0 : m.stride(0);
    a.ms1 = m.stride(1);
    a.ms2 = m.size(2) == 1 ? 0 : m.stride(2);
    a.ms3 = m.stride(3);
  }
  a.ent = ent.data_ptr<int64_t>();
  a.counts = counts.data_ptr<int64_t>();
  a.blocks = blocks.data_ptr<int64_t>();
  a.bs0 = blocks.stride(0);
  a.causal = causal;
  a.scale = (float)scale;
  a.softcap = (float)softcap;
  TORCH_CHECK(softcap >= 0.0, "sparseattn cpu kernel: softcap ", softcap, " (0: none)");
  const int64_t N = k.size(1);
  const int64_t R = ent.size(0);
  TORCH_CHECK(counts.size(0) == R && blocks.size(0) == R, "sparseattn cpu kernel: ent, counts, blocks disagree");
  for (int64_t r = 0; r < R; ++r) {  // nothing reads out of bounds
    TORCH_CHECK(a.ent[r] >= 0 && a.ent[r] < q.size(1), "sparseattn cpu kernel: entry out of range");
    TORCH_CHECK(a.counts[r] >= 0 && a.counts[r] <= blocks.size(1), "sparseattn cpu kernel: count out of range");
    for (int64_t t = 0; t < a.counts[r]; ++t) {
      int64_t b = a.blocks[r * a.bs0 + t];
      TORCH_CHECK(b >= 0 && b < N, "sparseattn cpu kernel: key block ", b, " out of range [0, ", N, ")");
    }
  }
  return a;
}

// ----------------------------------------------------------------------------- forward
void fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& ent, const at::Tensor& counts,
         const at::Tensor& blocks, const c10::optional<at::Tensor>& mask, bool causal, double scale, double softcap,
         bool accumulate, at::Tensor out, at::Tensor lse) {
  check_strides(out, "out");
  check_like(out, q, 3, "out");
  check_like(lse, q, 3, "lse");
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "sparseattn cpu kernel: lse dtype");
  const Args a = make_args(q, k, v, ent, counts, blocks, mask, causal, scale, softcap, out.size(3));
  const int64_t X = q.size(0), R = ent.size(0);
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const int64_t os0 = out.stride(0), os1 = out.stride(1), os2 = out.stride(2);
  const int64_t ls0 = lse.stride(0), ls1 = lse.stride(1), ls2 = lse.stride(2);
  const int M = a.M, BK = a.BK, Dv = a.Dv;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads_for(X * R), 1, [&](int64_t, int64_t) {
    const int CB = chunk_blocks(BK);
    std::vector<float> S((size_t)M * CB * BK), acc((size_t)M * Dv), mx(M), l(M);
    std::vector<float> Kp((size_t)CB * BK * a.Dq), Vp((size_t)CB * BK * Dv);
    for (int64_t job = next++; job < X * R; job = next++) {
      const int64_t x = job / R, r = job % R, e = a.ent[r];
      float* o = op + x * os0 + e * os1;
      float* ls = lp + x * ls0 + e * ls1;
      for (int i = 0; i < M; ++i) {  // the state: the rows' earlier parts (normalised: l = 1), or nothing
        mx[i] = accumulate ? ls[i * ls2] : kNegInf;
        l[i] = mx[i] == kNegInf ? 0.0f : 1.0f;
        if (l[i] == 0.0f)
          std::memset(acc.data() + (size_t)i * Dv, 0, sizeof(float) * Dv);
        else
          std::memcpy(acc.data() + (size_t)i * Dv, o + i * os2, sizeof(float) * Dv);
      }
      const float* Q = a.q + x * a.qs0 + e * a.qs1;
      for (int64_t t0 = 0; t0 < a.counts[r]; t0 += CB) {
        const int64_t t1 = std::min<int64_t>(a.counts[r], t0 + CB);
        const int W = (int)(t1 - t0) * BK;
        int ldk, ldv;
        const float* K = panel(a, a.k + x * a.ks0, a.ks1, a.ks2, a.Dq, r, t0, t1, Kp.data(), ldk);
        const float* V = panel(a, a.v + x * a.vs0, a.vs1, a.vs2, Dv, r, t0, t1, Vp.data(), ldv);
        scores(a, x, r, t0, t1, Q, K, ldk, S.data());
        for (int i = 0; i < M; ++i) {
          float* s = S.data() + (size_t)i * W;
          float rmax = kNegInf;
#pragma omp simd reduction(max : rmax)
          for (int j = 0; j < W; ++j) rmax = s[j] > rmax ? s[j] : rmax;
          const float mnew = std::max(mx[i], rmax);
          if (mnew == kNegInf) {  // nothing visible yet: the row stays empty
#pragma omp simd
            for (int j = 0; j < W; ++j) s[j] = 0.0f;
            continue;
          }
          const float corr = fast_exp(mx[i] - mnew);
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int j = 0; j < W; ++j) {
            s[j] = fast_exp(s[j] - mnew);
            sum += s[j];
          }
          l[i] = l[i] * corr + sum;
          mx[i] = mnew;
          float* ar = acc.data() + (size_t)i * Dv;
#pragma omp simd
          for (int d = 0; d < Dv; ++d) ar[d] *= corr;
        }
        // acc^T [Dv x M] += V^T [Dv x W] P^T [W x M]
        gemm('N', 'N', Dv, M, W, 1.0f, V, ldv, S.data(), W, 1.0f, acc.data(), Dv);
      }
      for (int i = 0; i < M; ++i) {
        const bool seen = l[i] > 0.0f;
        const float inv = seen ? 1.0f / l[i] : 0.0f;
        for (int d = 0; d < Dv; ++d) o[i * os2 + d] = acc[(size_t)i * Dv + d] * inv;
        ls[i * ls2] = seen ? mx[i] + std::log(l[i]) : kNegInf;
      }
    }
  });
}

// ----------------------------------------------------------------------------- backward
// dq (entries' rows), dk and dv (key blocks) accumulate in place. Work is split by (plane x, key
// plane of the entry): entries of different key planes never share a key block, so no two
// threads write the same dk / dv rows (with too few such jobs, by entry; see `split` below).
void bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
         const at::Tensor& lse, const c10::optional<at::Tensor>& dlse, const at::Tensor& ent, const at::Tensor& counts,
         const at::Tensor& blocks, const at::Tensor& kplane, const c10::optional<at::Tensor>& mask, bool causal,
         double scale, double softcap, at::Tensor dq, at::Tensor dk, at::Tensor dv) {
  check_strides(dout, "dout");
  check_strides(out, "out");
  check_strides(dq, "dq");
  check_strides(dk, "dk");
  check_strides(dv, "dv");
  check_like(dout, q, 3, "dout");
  check_like(out, q, 3, "out");
  check_like(lse, q, 3, "lse");
  check_like(dq, q, 4, "dq");
  check_like(dk, k, 4, "dk");
  check_like(dv, v, 3, "dv");
  TORCH_CHECK(out.size(3) >= dout.size(3) && dv.size(3) >= dout.size(3), "sparseattn cpu kernel: value dims");
  if (dlse.has_value()) check_like(*dlse, q, 3, "dlse");
  const Args a = make_args(q, k, v, ent, counts, blocks, mask, causal, scale, softcap, dout.size(3));
  TORCH_CHECK(kplane.scalar_type() == at::kLong && kplane.is_contiguous() && kplane.size(0) == ent.size(0),
              "sparseattn cpu kernel: kplane");
  const int64_t X = q.size(0), R = ent.size(0);
  const int M = a.M, BK = a.BK, Dq = a.Dq, Dv = a.Dv;
  // entries by key plane
  const int64_t* kp = kplane.data_ptr<int64_t>();
  std::vector<int64_t> planes(kp, kp + R);
  std::sort(planes.begin(), planes.end());
  planes.erase(std::unique(planes.begin(), planes.end()), planes.end());
  const int64_t P = (int64_t)planes.size();
  auto plane_of = [&](int64_t r) { return std::lower_bound(planes.begin(), planes.end(), kp[r]) - planes.begin(); };
  std::vector<int64_t> start(P + 1, 0), order(R);
  for (int64_t r = 0; r < R; ++r) ++start[plane_of(r) + 1];
  for (int64_t p = 0; p < P; ++p) start[p + 1] += start[p];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t r = 0; r < R; ++r) order[fill[plane_of(r)]++] = r;
  const float* dop = dout.data_ptr<float>();
  const float* outp = out.data_ptr<float>();
  const float* lp = lse.data_ptr<float>();
  const float* dlp = dlse.has_value() ? dlse->data_ptr<float>() : nullptr;
  float* dqp = dq.data_ptr<float>();
  // Fewer (plane, key plane) jobs than threads (one batch and one KV head, say): split by entry
  // instead, each thread adding dk / dv into its own zeroed copy (slot), summed into dk / dv at the
  // end; only while the copies take at most 256 MB.
  const int64_t copy_bytes = (dk.numel() + dv.numel()) * (int64_t)sizeof(float);
  const bool split = X * P < at::get_num_threads() && R > P &&
                     threads_for(X * R) * copy_bytes <= (int64_t(256) << 20);
  const int64_t jobs = split ? X * R : X * P, slots = threads_for(jobs);
  at::Tensor gk = split ? at::zeros({slots, dk.size(0), dk.size(1), dk.size(2), dk.size(3)}, dk.options()) : dk;
  at::Tensor gv = split ? at::zeros({slots, dv.size(0), dv.size(1), dv.size(2), dv.size(3)}, dv.options()) : dv;
  const int o = split ? 1 : 0;  // gk / gv dims of (x, block, row)
  std::atomic<int64_t> next{0};
  at::parallel_for(0, slots, 1, [&](int64_t slot, int64_t) {
    float* dkp = gk.data_ptr<float>() + (split ? slot * gk.stride(0) : 0);
    float* dvp = gv.data_ptr<float>() + (split ? slot * gv.stride(0) : 0);
    const int64_t k0 = gk.stride(o), k1 = gk.stride(o + 1), k2 = gk.stride(o + 2);
    const int64_t v0 = gv.stride(o), v1 = gv.stride(o + 1), v2 = gv.stride(o + 2);
    const int CB = chunk_blocks(BK);
    std::vector<float> S((size_t)M * CB * BK), dP((size_t)M * CB * BK), delta(M), rl(M);
    std::vector<float> dcap(a.softcap > 0.0f ? (size_t)M * CB * BK : 0);
    std::vector<float> Kp((size_t)CB * BK * Dq), Vp((size_t)CB * BK * Dv);
    for (int64_t job = next++; job < jobs; job = next++) {
      const int64_t x = split ? job / R : job / P, p = job % P;
      const int64_t lo = split ? job % R : start[p], hi = split ? lo + 1 : start[p + 1];
      for (int64_t oi = lo; oi < hi; ++oi) {
        const int64_t r = order[oi], e = a.ent[r];
        const float* Q = a.q + x * a.qs0 + e * a.qs1;
        const float* dO = dop + x * dout.stride(0) + e * dout.stride(1);
        const float* O = outp + x * out.stride(0) + e * out.stride(1);
        float* dQ = dqp + x * dq.stride(0) + e * dq.stride(1);
        for (int i = 0; i < M; ++i) {
          float s = 0.0f;
          for (int d = 0; d < Dv; ++d) s += dO[i * dout.stride(2) + d] * O[i * out.stride(2) + d];
          const int64_t li = x * lse.stride(0) + e * lse.stride(1) + i * lse.stride(2);
          if (dlp) s -= dlp[x * dlse->stride(0) + e * dlse->stride(1) + i * dlse->stride(2)];
          delta[i] = s;
          rl[i] = lp[li];
        }
        for (int64_t t0 = 0; t0 < a.counts[r]; t0 += CB) {
          const int64_t t1 = std::min<int64_t>(a.counts[r], t0 + CB);
          const int W = (int)(t1 - t0) * BK;
          int ldk, ldv;
          const float* K = panel(a, a.k + x * a.ks0, a.ks1, a.ks2, Dq, r, t0, t1, Kp.data(), ldk);
          const float* V = panel(a, a.v + x * a.vs0, a.vs1, a.vs2, Dv, r, t0, t1, Vp.data(), ldv);
          scores(a, x, r, t0, t1, Q, K, ldk, S.data(), dcap.empty() ? nullptr : dcap.data());
          // dP [M][W] = dO V^T
          gemm('T', 'N', W, M, Dv, 1.0f, V, ldv, dO, (int)dout.stride(2), 0.0f, dP.data(), W);
          for (int i = 0; i < M; ++i) {
            float* s = S.data() + (size_t)i * W;
            float* g = dP.data() + (size_t)i * W;
            const float li = rl[i], di = delta[i];
#pragma omp simd
            for (int j = 0; j < W; ++j) {
              const float pij = fast_exp(s[j] - li);  // lse +inf (a row that sees nothing): 0
              s[j] = pij;
              g[j] = pij * (g[j] - di);
            }
          }
          if (!dcap.empty()) {  // through the softcap: d(c tanh(s / c)) / ds = 1 - tanh^2
            const int64_t n = (int64_t)M * W;
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) dP[i] *= dcap[i];
          }
          // dQ^T [Dq x M] += scale * K^T [Dq x W] dS^T [W x M]
          gemm('N', 'N', Dq, M, W, a.scale, K, ldk, dP.data(), W, 1.0f, dQ, (int)dq.stride(2));
          // dK^T [Dq x W] = scale * Q^T [Dq x M] dS [M x W]; dV^T [Dv x W] = dO^T [Dv x M] P [M x W]
          // (into the scratch panels: K and V above are read for the last time)
          gemm('N', 'T', Dq, W, M, a.scale, Q, (int)a.qs2, dP.data(), W, 0.0f, Kp.data(), Dq);
          gemm('N', 'T', Dv, W, M, 1.0f, dO, (int)dout.stride(2), S.data(), W, 0.0f, Vp.data(), Dv);
          for (int64_t t = t0; t < t1; ++t) {  // added into the blocks' rows of dk and dv
            const int64_t kb = a.blocks[r * a.bs0 + t];
            float* bk = dkp + x * k0 + kb * k1;
            float* bv = dvp + x * v0 + kb * v1;
            const float* pk = Kp.data() + (t - t0) * BK * Dq;
            const float* pv = Vp.data() + (t - t0) * BK * Dv;
            for (int j = 0; j < BK; ++j) {
              float* rk = bk + j * k2;
              float* rv = bv + j * v2;
#pragma omp simd
              for (int d = 0; d < Dq; ++d) rk[d] += pk[(int64_t)j * Dq + d];
#pragma omp simd
              for (int d = 0; d < Dv; ++d) rv[d] += pv[(int64_t)j * Dv + d];
            }
          }
        }
      }
    }
  });
  if (split) {
    dk.add_(gk.sum(0));
    dv.add_(gv.sum(0));
  }
}

bool available() { return sgemm_ != nullptr; }

}  // namespace

TORCH_LIBRARY(sparseattn_cpu, m) {
  m.def("available() -> bool", &available);
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor ent, Tensor counts, Tensor blocks, Tensor? mask, bool causal, "
      "float scale, float softcap, bool accumulate, Tensor(a!) out, Tensor(b!) lse) -> ()",
      &fwd);
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, Tensor ent, "
      "Tensor counts, Tensor blocks, Tensor kplane, Tensor? mask, bool causal, float scale, float softcap, "
      "Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv) -> ()",
      &bwd);
}
