// The CPU kernel of sparse attention: listed key blocks read where they are (no gather into
// tensors), an entry's blocks in chunks of up to 512 keys (copied into a thread-local panel unless
// they follow each other in memory), online softmax, BLAS for the products of a chunk; the backward
// recomputes the probabilities from the saved LSE. A third op, `decode`, runs decode attention
// (ops/decode/cpu.py) on a KV cache with the same pieces (see its section below).
// Built on first use by cpu_kernel.py (torch.utils.cpp_extension, the machine's C++ compiler);
// without it the CPU paths gather the blocks and call torch's fused CPU attention (cpu.py).
//
// fwd / bwd: shapes are those of cpu.py's plan: q/out/do [X, E, M, C] (X planes sharing one list, E entries =
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
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
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

// One chunk of W keys in the online softmax of M rows: the scores S [M][W] become the chunk's
// unnormalised probabilities exp(s - max) in place, and each row's running max `mx`, sum `l` and
// accumulator row of `acc` [M][Dv] are rescaled to the new max (the caller then adds P V). A row
// that has seen no key yet (all -inf) keeps its state and gets zero probabilities.
void softmax_step(float* S, int M, int W, float* mx, float* l, float* acc, int Dv) {
  for (int i = 0; i < M; ++i) {
    float* s = S + (size_t)i * W;
    float rmax = kNegInf;
#pragma omp simd reduction(max : rmax)
    for (int j = 0; j < W; ++j) rmax = s[j] > rmax ? s[j] : rmax;
    const float mnew = std::max(mx[i], rmax);
    if (mnew == kNegInf) {
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
    float* ar = acc + (size_t)i * Dv;
#pragma omp simd
    for (int d = 0; d < Dv; ++d) ar[d] *= corr;
  }
}

// The rows' results from the online state: out row i = acc_i / l_i (row stride os2), lse_i =
// mx_i + log l_i (stride ls2); a row that saw no key gives 0 and -inf.
void finish(const float* acc, const float* mx, const float* l, int M, int Dv, float* o, int64_t os2, float* ls,
            int64_t ls2) {
  for (int i = 0; i < M; ++i) {
    const bool seen = l[i] > 0.0f;
    const float inv = seen ? 1.0f / l[i] : 0.0f;
    for (int d = 0; d < Dv; ++d) o[i * os2 + d] = acc[(size_t)i * Dv + d] * inv;
    ls[i * ls2] = seen ? mx[i] + std::log(l[i]) : kNegInf;
  }
}

// Scratch floats of the calling thread, kept between calls: a fresh buffer of 128 KB or more is a
// new mmap whose pages fault in on every call (~25 us of a 1K-key decode call; the panels are that
// big). carve({n0, n1, ...}) lays out one uninitialised span per size (64-byte aligned) in the
// thread's buffer, which only grows; a call carves once per thread, before its jobs.
struct Span {
  float* p;
  int64_t n;
  float* data() const { return p; }
  float& operator[](int64_t i) const { return p[i]; }
  bool empty() const { return n == 0; }
  float* begin() const { return p; }
  float* end() const { return p + n; }
};

template <size_t N>
std::array<Span, N> carve(const int64_t (&sizes)[N]) {
  thread_local std::vector<float> buf;
  auto padded = [](int64_t n) { return (n + 15) / 16 * 16; };
  int64_t total = 16;
  for (int64_t n : sizes) total += padded(n);
  if ((int64_t)buf.size() < total) buf.resize(total);
  float* p = buf.data();
  p += (16 - (reinterpret_cast<uintptr_t>(p) / sizeof(float)) % 16) % 16;
  std::array<Span, N> out;
  for (size_t i = 0; i < N; ++i) {
    out[i] = Span{p, sizes[i]};
    p += padded(sizes[i]);
  }
  return out;
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(-1) == 1 || t.size(-1) == 1, "sparseattn cpu kernel: ", name, " needs a unit last stride");
  TORCH_CHECK(t.stride(-2) >= t.size(-1) || t.size(-2) == 1, "sparseattn cpu kernel: ", name,
              " needs a row stride of at least its row length (BLAS)");
}

void check_strides(const at::Tensor& t, const char* name) {
  check_rows(t, name);
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
    const auto [S, acc, mx, l, Kp, Vp] = carve({M * CB * BK, M * Dv, M, M, CB * BK * a.Dq, CB * BK * Dv});
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
        softmax_step(S.data(), M, W, mx.data(), l.data(), acc.data(), Dv);
        // acc^T [Dv x M] += V^T [Dv x W] P^T [W x M]
        gemm('N', 'N', Dv, M, W, 1.0f, V, ldv, S.data(), W, 1.0f, acc.data(), Dv);
      }
      finish(acc.data(), mx.data(), l.data(), M, Dv, o, os2, ls, ls2);
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
    const auto [S, dP, delta, rl, dcap, Kp, Vp] = carve(
        {M * CB * BK, M * CB * BK, M, M, a.softcap > 0.0f ? M * CB * BK : 0, CB * BK * Dq, CB * BK * Dv});
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

// ----------------------------------------------------------------------------- decode
// Decode (ops/decode): the G * Lq query rows of KV head h of sequence b (q [B, Hq, Lq, D] viewed as
// [B, Hkv, M, D], row m = g * Lq + i at position n_b - Lq + i, n_b = seqlens[b] clamped to
// [0, Lmax], or Lmax) against the keys it reads of the cache k / v [B, Hkv, Lmax, C], or of a paged
// cache [pages, page_size, Hkv, C] through block_table [B, max_pages] (Lmax = max_pages *
// page_size): the listed key blocks blk_idx[b, h, :blk_num[b, h]] of block_k keys (any order, no
// repeats) cut at n_b, or without lists the keys [0, n_b). Rules in the kernel: the length, the
// bottom-right causal rule among the Lq new rows, softcap; anything else comes as an additive
// float mask [B|1, Hkv|1, M|1, S] by slot (slot t * block_k + j is key j of list entry t; without
// lists the key position). Keys are taken in chunks of up to 512: float32 rows read in place, one
// product per run of adjacent rows, or copied into a float32 panel when the runs are short or the
// cache is fp16 / bf16 (converted on the copy; scores, softmax and sums in float32, out in q's
// dtype). A (b, h) is one job; with fewer of them than threads each also splits its chunks into
// parts whose results merge by their LSE (split-KV, as flash-decoding does).
namespace dec {

struct Run {
  int64_t lo, hi, slot;  // keys [lo, hi) of the cache, at slots [slot, slot + hi - lo)
};

// The runs of keys job (b, h) reads, in list order; consecutive blocks merge into one run.
void runs(std::vector<Run>& out, const int32_t* ids, int64_t ids_stride, int64_t count, int BK, int64_t n) {
  out.clear();
  if (!ids) {
    if (n > 0) out.push_back({0, n, 0});
    return;
  }
  for (int64_t t = 0; t < count; ++t) {
    const int64_t lo = (int64_t)ids[t * ids_stride] * BK, hi = std::min<int64_t>(lo + BK, n);
    if (lo >= hi) continue;
    if (!out.empty() && out.back().hi == lo && out.back().slot + (out.back().hi - out.back().lo) == t * BK)
      out.back().hi = hi;
    else
      out.push_back({lo, hi, t * BK});
  }
}

// Where key t of (sequence b, KV head h) lives: a cache [B, Hkv, Lmax, C] (strides s0, s1, s2 of
// b, h, t), or a paged one [pages, page_size, Hkv, C] (strides of page, row, h) whose page of t is
// table[b, t / page_size], clamped into the cache. `step`: between consecutive rows of one run.
struct Cache {
  const char* base;
  int64_t esz, s0, s1, s2;
  const int32_t* table;
  int64_t ts0, ts1, page, pages;
  const char* row(int64_t b, int64_t h, int64_t t) const {
    if (!table) return base + (b * s0 + h * s1 + t * s2) * esz;
    const int64_t p = std::min<int64_t>(std::max<int64_t>(table[b * ts0 + (t / page) * ts1], 0), pages - 1);
    return base + (p * s0 + (t % page) * s1 + h * s2) * esz;
  }
  int64_t step() const { return table ? s1 : s2; }
};

// One cache row of n elements into float32.
void load_row(float* dst, const char* src, int n, at::ScalarType dtype) {
  if (dtype == at::kFloat) {
    std::memcpy(dst, src, sizeof(float) * n);
  } else if (dtype == at::kHalf) {
    const at::Half* x = reinterpret_cast<const at::Half*>(src);
    for (int i = 0; i < n; ++i) dst[i] = static_cast<float>(x[i]);
  } else {
    const at::BFloat16* x = reinterpret_cast<const at::BFloat16*>(src);
    for (int i = 0; i < n; ++i) dst[i] = static_cast<float>(x[i]);
  }
}

}  // namespace dec

// A view with a unit last stride and a row stride of at least the row's length (BLAS), or a copy.
at::Tensor blas_ready(const at::Tensor& t) {
  const bool ok = (t.stride(-1) == 1 || t.size(-1) == 1) && (t.stride(-2) >= t.size(-1) || t.size(-2) == 1);
  return ok ? t : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor> decode(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                          const c10::optional<at::Tensor>& seqlens,
                                          const c10::optional<at::Tensor>& blk_num,
                                          const c10::optional<at::Tensor>& blk_idx, int64_t block_k,
                                          const c10::optional<at::Tensor>& mask, double scale, double softcap,
                                          const c10::optional<at::Tensor>& block_table) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4,
              "sparseattn cpu decode: q [B, Hq, Lq, D], k and v [B, Hkv, Lmax, D] or paged [pages, page_size, Hkv, D]");
  const bool paged = block_table.has_value();
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Lq = q_in.size(2), H = k_in.size(paged ? 2 : 1);
  const int64_t page = paged ? k_in.size(1) : 0, Lmax = paged ? block_table->size(1) * page : k_in.size(2);
  TORCH_CHECK(H >= 1 && Hq % H == 0 && Lq >= 1, "sparseattn cpu decode: ", Hq, " query heads, ", H,
              " KV heads, Lq = ", Lq);
  // q as [B, Hkv, M, D] float32: row m = g * Lq + i of KV head h is query head h * G + g, position i
  const at::Tensor q = blas_ready(q_in.to(at::kFloat).reshape({B, H, Hq / H * Lq, q_in.size(3)}));
  const at::Tensor k = blas_ready(k_in), v = blas_ready(v_in);
  check_strides(q, "q");
  check_rows(k, "k");
  check_rows(v, "v");
  const at::ScalarType dtype = k.scalar_type();
  TORCH_CHECK(v.scalar_type() == dtype && (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16),
              "sparseattn cpu decode: k and v float32, float16 or bfloat16 alike, got ", dtype, " and ",
              v.scalar_type());
  check_like(v, k, 3, "v");
  if (paged) {
    const at::Tensor& t = *block_table;
    TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == 2 && t.size(0) == B && page >= 1 &&
                    (k.size(0) >= 1 || Lmax == 0),
                "sparseattn cpu decode: block_table int32 [B, max_pages] over a paged cache of pages");
  } else {
    check_like(k, q, 2, "k");
  }
  const int M = (int)q.size(2), Dq = (int)q.size(3), Dv = (int)v.size(3);
  TORCH_CHECK(k.size(3) == Dq, "sparseattn cpu decode: head dims");
  at::Tensor out = at::empty({B, H, M, Dv}, q.options()), lse = at::empty({B, H, M}, q.options());
  const auto result = [&]() {  // out in q's dtype
    return std::make_tuple(out.view({B, Hq, Lq, Dv}).to(q_in.scalar_type()), lse.view({B, Hq, Lq}));
  };
  if (B == 0 || M == 0 || (paged && Lmax == 0)) {  // nothing to read (and no job to split)
    out.zero_(), lse.fill_(kNegInf);
    return result();
  }
  TORCH_CHECK(!seqlens.has_value() || (seqlens->scalar_type() == at::kInt && seqlens->dim() == 1 &&
                                       seqlens->size(0) == B),
              "sparseattn cpu decode: seqlens int32 [B] or None (every length Lmax)");
  TORCH_CHECK(block_k >= 1, "sparseattn cpu decode: block_k ", block_k);
  TORCH_CHECK(softcap >= 0.0, "sparseattn cpu decode: softcap ", softcap, " (0: none)");
  const int BK = (int)block_k;
  const bool lists = blk_idx.has_value();
  TORCH_CHECK(lists == blk_num.has_value(), "sparseattn cpu decode: blk_num and blk_idx come together");
  const int32_t *np = nullptr, *ip = nullptr;
  int64_t n0 = 0, n1 = 0, i0 = 0, i1 = 0, i2 = 0, W = 0, most_blocks = 0;
  if (lists) {
    const at::Tensor &bn = *blk_num, &bi = *blk_idx;
    TORCH_CHECK(bn.scalar_type() == at::kInt && bi.scalar_type() == at::kInt && bn.dim() == 2 && bi.dim() == 3 &&
                    bn.size(0) == B && bn.size(1) == H && bi.size(0) == B && bi.size(1) == H,
                "sparseattn cpu decode: blk_num int32 [B, Hkv], blk_idx int32 [B, Hkv, W]");
    np = bn.data_ptr<int32_t>(), ip = bi.data_ptr<int32_t>();
    n0 = bn.stride(0), n1 = bn.stride(1), i0 = bi.stride(0), i1 = bi.stride(1), i2 = bi.stride(2), W = bi.size(2);
    const int64_t nK = (Lmax + BK - 1) / BK;
    for (int64_t b = 0; b < B; ++b)  // nothing reads out of bounds
      for (int64_t h = 0; h < H; ++h) {
        const int64_t c = np[b * n0 + h * n1];
        TORCH_CHECK(c >= 0 && c <= W, "sparseattn cpu decode: block count ", c, " out of range [0, ", W, "]");
        most_blocks = std::max(most_blocks, c);
        for (int64_t t = 0; t < c; ++t) {
          const int64_t id = ip[b * i0 + h * i1 + t * i2];
          TORCH_CHECK(id >= 0 && id < nK, "sparseattn cpu decode: key block ", id, " out of range [0, ", nK, ")");
        }
      }
  }
  const int32_t* sp = seqlens.has_value() ? seqlens->data_ptr<int32_t>() : nullptr;
  const int64_t ss = seqlens.has_value() ? seqlens->stride(0) : 0;
  auto length = [&](int64_t b) { return sp ? std::min<int64_t>(std::max<int64_t>(sp[b * ss], 0), Lmax) : Lmax; };
  const float* mp = nullptr;
  int64_t ms0 = 0, ms1 = 0, ms2 = 0, ms3 = 0;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    int64_t slots = lists ? W * BK : 0;  // without lists: the longest length
    for (int64_t b = 0; !lists && b < B; ++b) slots = std::max(slots, length(b));
    TORCH_CHECK(m.dim() == 4 && m.scalar_type() == at::kFloat && (m.size(0) == 1 || m.size(0) == B) &&
                    (m.size(1) == 1 || m.size(1) == H) && (m.size(2) == 1 || m.size(2) == M) && m.size(3) >= slots,
                "sparseattn cpu decode: mask ", m.sizes(), " does not cover [B|1, Hkv|1, M|1, ", slots, "]");
    mp = m.data_ptr<float>();
    ms0 = m.size(0) == 1 ? 0 : m.stride(0), ms1 = m.size(1) == 1 ? 0 : m.stride(1);
    ms2 = m.size(2) == 1 ? 0 : m.stride(2), ms3 = m.stride(3);
  }
  const float* qp = q.data_ptr<float>();
  const int64_t esz = k.element_size();
  const int32_t* tp = paged ? block_table->data_ptr<int32_t>() : nullptr;
  const int64_t ts0 = paged ? block_table->stride(0) : 0, ts1 = paged ? block_table->stride(1) : 0;
  const dec::Cache kc{static_cast<const char*>(k.data_ptr()), esz, k.stride(0), k.stride(1), k.stride(2), tp, ts0, ts1,
                      page, k.size(0)};
  const dec::Cache vc{static_cast<const char*>(v.data_ptr()), esz, v.stride(0), v.stride(1), v.stride(2), tp, ts0, ts1,
                      page, v.size(0)};
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const int CK = 512;
  // Threads: one below 512 KB of keys and values to read (waking a second thread cost more than
  // it saved there: 2 x 128 keys took 18 us on one thread, 23 us on two); parts per (b, h): enough
  // jobs for the threads, each part at least 1024 keys.
  const int64_t most = lists ? std::min<int64_t>(most_blocks * BK, Lmax) : Lmax;
  const int64_t threads = B * H * most * (Dq + Dv) < (int64_t(1) << 17) ? 1 : at::get_num_threads();
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>((threads + B * H - 1) / (B * H), most / 1024));
  const int64_t jobs = B * H * parts;
  at::Tensor po, pl;  // the parts' results, merged below
  if (parts > 1) {
    po = at::empty({jobs, M, Dv}, out.options());
    pl = at::empty({jobs, M}, lse.options());
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, threads_for(jobs)), 1, [&](int64_t, int64_t) {
    const auto [S, acc, mx, l, Kp, Vp] = carve({M * CK, M * Dv, M, M, CK * Dq, CK * Dv});
    std::vector<int64_t> pos(CK), slot(CK);
    std::vector<const char*> kr(CK), vr(CK);
    std::vector<std::pair<int, int>> pieces;
    std::vector<dec::Run> rs;
    for (int64_t job = next++; job < jobs; job = next++) {
      const int64_t bh = job / parts, part = job % parts, b = bh / H, h = bh % H;
      const int64_t n = length(b);
      dec::runs(rs, lists ? ip + b * i0 + h * i1 : nullptr, i2, lists ? np[b * n0 + h * n1] : 0, BK, n);
      int64_t total = 0;
      for (const auto& r : rs) total += r.hi - r.lo;
      const int64_t nch = (total + CK - 1) / CK, c0 = part * nch / parts, c1 = (part + 1) * nch / parts;
      std::fill(mx.begin(), mx.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.0f);
      std::fill(acc.begin(), acc.end(), 0.0f);
      const float* Q = qp + b * q.stride(0) + h * q.stride(1);
      const int64_t ks = kc.step(), vs = vc.step(), qs2 = q.stride(2);
      size_t ri = 0;
      int64_t off = 0;  // the next key: offset `off` of run ri
      for (int64_t c = 0; c < c1; ++c) {
        const int64_t want = std::min<int64_t>(CK, total - c * CK);
        if (c < c0) {  // another part's chunk: skip its keys
          for (int64_t left = want; left > 0;) {
            const int64_t take = std::min(left, rs[ri].hi - rs[ri].lo - off);
            left -= take, off += take;
            if (rs[ri].lo + off == rs[ri].hi) ++ri, off = 0;
          }
          continue;
        }
        const int Wc = (int)want;
        pieces.clear();  // runs of adjacent cache rows in the chunk: (first key of the chunk, count)
        for (int j = 0; j < Wc; ++j) {  // the chunk's keys: positions, slots, cache rows
          pos[j] = rs[ri].lo + off, slot[j] = rs[ri].slot + off;
          kr[j] = kc.row(b, h, pos[j]), vr[j] = vc.row(b, h, pos[j]);
          if (j == 0 || kr[j] != kr[j - 1] + ks * esz || vr[j] != vr[j - 1] + vs * esz) pieces.push_back({j, 0});
          ++pieces.back().second;
          if (rs[ri].lo + ++off == rs[ri].hi) ++ri, off = 0;
        }
        // float32 rows: BLAS on them in place, one product per piece, while pieces hold 32 keys or
        // more on average (3 and 8 scattered blocks of 64 keys: 22 and 31 us a call, against 26 and
        // 36 with the rows copied into a panel first); else (and fp16 / bf16) a float32 panel.
        const bool in_place = dtype == at::kFloat && ks >= Dq && vs >= Dv && (int64_t)pieces.size() * 32 <= Wc;
        if (!in_place) {
          for (int j = 0; j < Wc; ++j) {
            dec::load_row(Kp.data() + (int64_t)j * Dq, kr[j], Dq, dtype);
            dec::load_row(Vp.data() + (int64_t)j * Dv, vr[j], Dv, dtype);
          }
          pieces.assign(1, {0, Wc});
        }
        auto krow = [&](int j) {
          return in_place ? reinterpret_cast<const float*>(kr[j]) : Kp.data() + (int64_t)j * Dq;
        };
        auto vrow = [&](int j) {
          return in_place ? reinterpret_cast<const float*>(vr[j]) : Vp.data() + (int64_t)j * Dv;
        };
        const int ldk = in_place ? (int)ks : Dq, ldv = in_place ? (int)vs : Dv;
        for (const auto& pc : pieces)
          gemm('T', 'N', pc.second, M, Dq, (float)scale, krow(pc.first), ldk, Q, (int)qs2, 0.0f, S.data() + pc.first,
               Wc);
        if (softcap > 0.0) {
          const float cap = (float)softcap, inv = 1.0f / cap;
          const int64_t cnt = (int64_t)M * Wc;
#pragma omp simd
          for (int64_t i = 0; i < cnt; ++i) S[i] = cap * fast_tanh(S[i] * inv);
        }
        if (mp) {
          const float* mb = mp + b * ms0 + h * ms1;
          for (int i = 0; i < M; ++i) {
            float* s = S.data() + (size_t)i * Wc;
            const float* mr = mb + i * ms2;
            for (int j = 0; j < Wc; ++j) s[j] += mr[slot[j] * ms3];
          }
        }
        if (Lq > 1) {  // bottom-right causal among the new rows
          for (int i = 0; i < M; ++i) {
            const int64_t lim = n - Lq + i % Lq;
            float* s = S.data() + (size_t)i * Wc;
            for (int j = 0; j < Wc; ++j)
              if (pos[j] > lim) s[j] = kNegInf;
          }
        }
        softmax_step(S.data(), M, Wc, mx.data(), l.data(), acc.data(), Dv);
        for (const auto& pc : pieces)
          gemm('N', 'N', Dv, M, pc.second, 1.0f, vrow(pc.first), ldv, S.data() + pc.first, Wc, 1.0f, acc.data(), Dv);
      }
      if (parts == 1)
        finish(acc.data(), mx.data(), l.data(), M, Dv, op + b * out.stride(0) + h * out.stride(1), out.stride(2),
               lp + b * lse.stride(0) + h * lse.stride(1), lse.stride(2));
      else
        finish(acc.data(), mx.data(), l.data(), M, Dv, po.data_ptr<float>() + job * M * Dv, Dv,
               pl.data_ptr<float>() + job * M, 1);
    }
  });
  if (parts == 1) return result();
  at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {  // merge the parts by their LSE
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int i = 0; i < M; ++i) {
        const float* pli = pl.data_ptr<float>() + bh * parts * M + i;
        float top = kNegInf;
        for (int64_t p = 0; p < parts; ++p) top = std::max(top, pli[p * M]);
        float* o = op + b * out.stride(0) + h * out.stride(1) + i * out.stride(2);
        float* ls = lp + b * lse.stride(0) + h * lse.stride(1) + i * lse.stride(2);
        for (int d = 0; d < Dv; ++d) o[d] = 0.0f;
        if (top == kNegInf) {
          *ls = kNegInf;
          continue;
        }
        float sum = 0.0f;
        for (int64_t p = 0; p < parts; ++p) {
          const float w = std::exp(pli[p * M] - top);
          const float* src = po.data_ptr<float>() + ((bh * parts + p) * M + i) * Dv;
          for (int d = 0; d < Dv; ++d) o[d] += w * src[d];
          sum += w;
        }
        for (int d = 0; d < Dv; ++d) o[d] /= sum;
        *ls = top + std::log(sum);
      }
    }
  });
  return result();
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
  // decode returns new tensors and may be traced by torch.compile (ops/decode is not behind a
  // custom op): a CPU kernel, so that cpu_kernel.py can register its fake (shape) implementation.
  m.def(
      "decode(Tensor q, Tensor k, Tensor v, Tensor? seqlens, Tensor? blk_num, Tensor? blk_idx, int block_k, "
      "Tensor? mask, float scale, float softcap, Tensor? block_table=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparseattn_cpu, CPU, m) { m.impl("decode", &decode); }
