// The fused attention op: schema, CPU kernel, and the torch glue for the CUDA kernels.
//
//   o = v . softmax_keys(q^T k), no scale
//   q, k: (B, d, N)   v, o: (B, c, N)   lse: (B, N)
//   o[b, :, i] = sum_j P_ij v[b, :, j],  P_ij = exp(s_ij - lse_i),  s_ij = q[b, :, i] . k[b, :, j]
//   lse[b, i]  = log sum_j exp(s_ij)     (saved by the forward, used by the backward)
//
// Schema (namespace unit_attn):
//   attention_fwd(Tensor q, Tensor k, Tensor v) -> (Tensor o, Tensor lse)
//   attention_bwd(Tensor grad_o, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse)
//       -> (Tensor dq, Tensor dk, Tensor dv)
// Autograd and the fake (meta) kernels are registered from Python, in unit/ops.py.
//
// Conventions of both backends:
// - inputs of any strides are accepted; they are made contiguous here (a copy if they are not).
// - q, k, v (and grad_o, o) share one dtype. lse is float32, or float64 for float64 inputs.
// - 1 <= d, 1 <= c. B = 0 or N = 0 give empty outputs.
// CPU: float32 and float64 natively; float16/bfloat16 are computed in float32 (converted on the
//      way in and out). Any d, c.
// CUDA (only when built with -DWITH_CUDA, see unit/ops.py): float32, float16, bfloat16 with
//      float32 accumulation, 1 <= d <= 128, 1 <= c <= 1024; kernels in attention.cu.
//
// The CPU kernel is flash-attention style: queries and keys are processed in tiles of kTile
// columns, the softmax is computed online (running max m and running sum l per query), and no
// N x N matrix is ever allocated: extra memory is O(B*N) plus a few tiles per thread.
// Tiles are (rows x kTile) slices of the (rows x N) matrices; memory is contiguous along N, so
// every inner loop below runs over kTile contiguous floats and vectorises.
//
// Backward (recompute P from lse, tile by tile):
//   D_i   = sum_c grad_o[c, i] o[c, i]
//   dP_ij = grad_o[:, i] . v[:, j]       dS_ij = P_ij (dP_ij - D_i)
//   dq_i  = sum_j dS_ij k_j     dk_j = sum_i dS_ij q_i     dv_j = sum_i P_ij grad_o_i
// It runs as one pass over key tiles: each task owns a range of key tiles (dk, dv race-free)
// and adds its dq contributions to a dq buffer of its own group; the buffers are summed at the
// end (details at bwd_cpu_kernel). No N x N matrix; extra memory O(B*N), at most 64 MiB of dq
// partial sums, and a few tiles per thread.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // c10::cuda::getCurrentCUDAStream (= at::cuda::, lighter header)
#include "attention_cuda.h"
#endif

namespace {

constexpr int64_t kTile = 64;  // queries and keys per tile (unit/ops.py: CPU_TILE)

// ---------------------------------------------------------------------------------------------
// input checks shared by both backends

struct Dims {
  int64_t B, d, c, N;
};

Dims check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "unit_attn::", op,
              " (csrc/attention.cpp): q, k, v must be 3-D tensors shaped (B, d, N), (B, d, N), "
              "(B, c, N); got shapes ", q.sizes(), ", ", k.sizes(), ", ", v.sizes(), ".");
  TORCH_CHECK(q.sizes() == k.sizes(), "unit_attn::", op,
              " (csrc/attention.cpp): q and k must have the same shape (B, d, N); got ", q.sizes(),
              " and ", k.sizes(), ".");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(2) == q.size(2), "unit_attn::", op,
              " (csrc/attention.cpp): v must be shaped (B, c, N) with the B and N of q ", q.sizes(),
              "; got ", v.sizes(), ".");
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), "unit_attn::", op,
              " (csrc/attention.cpp): q, k, v must be on one device; got ", q.device(), ", ",
              k.device(), ", ", v.device(), ".");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "unit_attn::", op, " (csrc/attention.cpp): q, k, v must share one dtype; got ",
              q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type(), ".");
  Dims s{q.size(0), q.size(1), v.size(1), q.size(2)};
  TORCH_CHECK(s.d >= 1 && s.c >= 1, "unit_attn::", op,
              " (csrc/attention.cpp): the channel sizes must be at least 1; got d = ", s.d,
              ", c = ", s.c, ".");
  return s;
}

at::ScalarType lse_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_bwd_extra(const Dims& s, const at::Tensor& q, const at::Tensor& grad_o,
                     const at::Tensor& o, const at::Tensor& lse) {
  const std::vector<int64_t> oshape{s.B, s.c, s.N};
  TORCH_CHECK(grad_o.sizes() == at::IntArrayRef(oshape) && o.sizes() == at::IntArrayRef(oshape),
              "unit_attn::attention_bwd (csrc/attention.cpp): grad_o and o must be shaped (B, c, N) = ",
              at::IntArrayRef(oshape), "; got ", grad_o.sizes(), " and ", o.sizes(), ".");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == s.B && lse.size(1) == s.N,
              "unit_attn::attention_bwd (csrc/attention.cpp): lse must be shaped (B, N) = (", s.B,
              ", ", s.N, "); got ", lse.sizes(), ". Pass the lse returned by attention_fwd.");
  TORCH_CHECK(grad_o.device() == q.device() && o.device() == q.device() && lse.device() == q.device(),
              "unit_attn::attention_bwd (csrc/attention.cpp): grad_o, o, lse must be on the device of q (",
              q.device(), ").");
  TORCH_CHECK(grad_o.scalar_type() == q.scalar_type() && o.scalar_type() == q.scalar_type(),
              "unit_attn::attention_bwd (csrc/attention.cpp): grad_o and o must have the dtype of q (",
              q.scalar_type(), "); got ", grad_o.scalar_type(), " and ", o.scalar_type(), ".");
  TORCH_CHECK(lse.scalar_type() == lse_dtype(q.scalar_type()),
              "unit_attn::attention_bwd (csrc/attention.cpp): lse must be ", lse_dtype(q.scalar_type()),
              " for ", q.scalar_type(), " inputs; got ", lse.scalar_type(),
              ". Pass the lse returned by attention_fwd.");
}

// ---------------------------------------------------------------------------------------------
// CPU kernel building blocks

// A (rows x kTile) tile starting at column col0 of a (rows x N) row-major matrix. A full tile is
// used in place (leading dimension N); the last, partial tile is copied into buf with zero
// padding (leading dimension kTile).
template <typename T>
const T* tile(const T* src, int64_t rows, int64_t N, int64_t col0, T* buf, int64_t* ld) {
  const int64_t n = std::min(kTile, N - col0);
  if (n == kTile) {
    *ld = N;
    return src + col0;
  }
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(src + r * N + col0, src + r * N + col0 + n, buf + r * kTile);
    std::fill(buf + r * kTile + n, buf + (r + 1) * kTile, T(0));
  }
  *ld = kTile;
  return buf;
}

// Register-blocked micro-kernels on GCC/Clang vector types (one vector = one SIMD register of the
// target, which is the build machine: unit/ops.py compiles with -march=native). A register block
// is kRows rows x kVecs vectors of accumulators; kTile is a multiple of the block width.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64, kRows = 4;  // 32 registers: 16 accumulators
#elif defined(__AVX__)
constexpr int kVecBytes = 32, kRows = 2;  // 16 registers: 8 accumulators
#else
constexpr int kVecBytes = 16, kRows = 2;  // SSE2, NEON
#endif
constexpr int kVecs = 4;

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(kVecBytes)));
  static constexpr int width = kVecBytes / sizeof(T);
};

template <typename V, typename T>
inline V loadv(const T* p) {
  V r;
  std::memcpy(&r, p, sizeof(V));
  return r;
}
template <typename V, typename T>
inline void storev(T* p, const V& x) {
  std::memcpy(p, &x, sizeof(V));
}

// An empty asm that claims to modify x: the compiler must hold x in a register here, so it loads
// a vector once per step instead of folding the load into every FMA that uses it (which costs
// about 20% in these kernels with GCC 12).
template <typename V>
inline void keep_in_register(V& x) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  asm("" : "+v"(x));
#else
  (void)x;
#endif
}

using VF = Vec<float>::type;
using VD = Vec<double>::type;
typedef int32_t VI __attribute__((vector_size(kVecBytes)));

// exp of a float32 vector: exp(x) = 2^n exp(r), n = round(x / ln 2), |r| <= ln2 / 2, exp(r) by the
// Cephes expf polynomial (about 1 ulp). Exactly 0 for x < -87 (so exp(-inf) = 0: masked keys).
inline VF expv(VF x) {
  const VF lo = VF{} - 87.0f, hi = VF{} + 88.0f;
  VF xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const VF n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const VF r = xc - n * 0.693359375f + n * 2.12194440e-4f;                // ln 2 split in two
  VF p = VF{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const VF er = p * r * r + r + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;  // 2^n, n in [-126, 127]
  VF two_n;
  std::memcpy(&two_n, &bits, sizeof(VF));
  return x < lo ? VF{} : er * two_n;
}
// float64 is for gradcheck, not speed
inline VD expv(VD x) {
  for (int i = 0; i < Vec<double>::width; ++i) x[i] = std::exp(x[i]);
  return x;
}

// out[x][y] = sum_t a[t * lda + x] * b[t * ldb + y]   for x, y < kTile; out is kTile x kTile.
// (a^T b for two (nt x kTile) tiles: the scores s = k^T q, and dP = v^T grad_o.)
template <typename T>
void gemm_tn(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t nt, T* out) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width, YB = kVecs * W;
  static_assert(kTile % YB == 0 && kTile % kRows == 0, "tile must be a multiple of the block");
  for (int64_t x = 0; x < kTile; x += kRows) {
    for (int64_t y = 0; y < kTile; y += YB) {
      V acc[kRows][kVecs];
      for (int xx = 0; xx < kRows; ++xx)
        for (int j = 0; j < kVecs; ++j) acc[xx][j] = V{} ;
      for (int64_t t = 0; t < nt; ++t) {
        const T* ap = a + t * lda + x;
        const T* bp = b + t * ldb + y;
        V bv[kVecs];
        for (int j = 0; j < kVecs; ++j) {
          bv[j] = loadv<V>(bp + j * W);
          keep_in_register(bv[j]);
        }
        for (int xx = 0; xx < kRows; ++xx) {
          const T av = ap[xx];
          for (int j = 0; j < kVecs; ++j) acc[xx][j] += av * bv[j];
        }
      }
      for (int xx = 0; xx < kRows; ++xx)
        for (int j = 0; j < kVecs; ++j) storev(out + (x + xx) * kTile + y + j * W, acc[xx][j]);
    }
  }
}

// acc[r][y] += sum_x a[r * lda + x] * m[x][y]   for r0 <= r < r1, x, y < kTile; acc is rows x kTile.
// (a tile (rows x kTile) times a kTile x kTile matrix: o += v P, dq += k dS, dv += grad_o P, ...)
template <typename T, int RR>
void gemm_nn_rows(const T* a, int64_t lda, const T* m, int64_t r0, int64_t r1, T* acc) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width, YB = kVecs * W;
  for (int64_t r = r0; r + RR <= r1; r += RR) {
    for (int64_t y = 0; y < kTile; y += YB) {
      V c[RR][kVecs];
      for (int rr = 0; rr < RR; ++rr)
        for (int j = 0; j < kVecs; ++j) c[rr][j] = loadv<V>(acc + (r + rr) * kTile + y + j * W);
      for (int64_t x = 0; x < kTile; ++x) {
        const T* mp = m + x * kTile + y;
        V mv[kVecs];
        for (int j = 0; j < kVecs; ++j) {
          mv[j] = loadv<V>(mp + j * W);
          keep_in_register(mv[j]);
        }
        for (int rr = 0; rr < RR; ++rr) {
          const T av = a[(r + rr) * lda + x];
          for (int j = 0; j < kVecs; ++j) c[rr][j] += av * mv[j];
        }
      }
      for (int rr = 0; rr < RR; ++rr)
        for (int j = 0; j < kVecs; ++j) storev(acc + (r + rr) * kTile + y + j * W, c[rr][j]);
    }
  }
}

template <typename T>
void gemm_nn_acc(const T* a, int64_t lda, const T* m, int64_t rows, T* acc) {
  const int64_t main = rows - rows % kRows;
  gemm_nn_rows<T, kRows>(a, lda, m, 0, main, acc);
  gemm_nn_rows<T, 1>(a, lda, m, main, rows, acc);
}

// ---------------------------------------------------------------------------------------------
// CPU forward: one task per (batch, query tile).

template <typename T>
void fwd_cpu_kernel(const T* q, const T* k, const T* v, T* o, T* lse, const Dims& s) {
  const int64_t B = s.B, d = s.d, c = s.c, N = s.N;
  const int64_t ntiles = (N + kTile - 1) / kTile;
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, B * ntiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> qbuf(d * kTile), kbuf(d * kTile), vbuf(c * kTile);
    std::vector<T> p(kTile * kTile), acc(c * kTile);  // p[j][i], acc[c][i]
    T m[kTile], l[kTile], mnew[kTile], alpha[kTile];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / ntiles, i0 = (task % ntiles) * kTile;
      const int64_t ni = std::min(kTile, N - i0);
      const T* qb = q + b * d * N;
      const T* kb = k + b * d * N;
      const T* vb = v + b * c * N;
      int64_t ldq, ldk, ldv;
      const T* qt = tile(qb, d, N, i0, qbuf.data(), &ldq);
      std::fill(m, m + kTile, kNegInf);
      std::fill(l, l + kTile, T(0));
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t j0 = 0; j0 < N; j0 += kTile) {
        const int64_t nj = std::min(kTile, N - j0);
        const T* kt = tile(kb, d, N, j0, kbuf.data(), &ldk);
        const T* vt = tile(vb, c, N, j0, vbuf.data(), &ldv);
        gemm_tn(kt, ldk, qt, ldq, d, p.data());  // p[j][i] = s_ij
        for (int64_t j = nj; j < kTile; ++j) std::fill(&p[j * kTile], &p[(j + 1) * kTile], kNegInf);
        // online softmax: new running max, rescale factor for the old sum and accumulator
        std::copy(m, m + kTile, mnew);
        for (int64_t j = 0; j < nj; ++j)
          for (int64_t i = 0; i < kTile; ++i) mnew[i] = std::max(mnew[i], p[j * kTile + i]);
        for (int64_t i = 0; i < kTile; ++i) {
          alpha[i] = std::exp(m[i] - mnew[i]);  // 0 on the first tile (m = -inf)
          l[i] *= alpha[i];
          m[i] = mnew[i];
        }
        for (int64_t j = 0; j < kTile; ++j) {
          for (int64_t i = 0; i < kTile; i += W) {
            const V e = expv(loadv<V>(&p[j * kTile + i]) - loadv<V>(m + i));
            storev(&p[j * kTile + i], e);
            storev(l + i, loadv<V>(l + i) + e);
          }
        }
        for (int64_t r = 0; r < c; ++r)
          for (int64_t i = 0; i < kTile; ++i) acc[r * kTile + i] *= alpha[i];
        gemm_nn_acc(vt, ldv, p.data(), c, acc.data());  // acc[r][i] += sum_j v[r][j] p[j][i]
      }
      T* ob = o + b * c * N + i0;
      for (int64_t i = 0; i < kTile; ++i) alpha[i] = T(1) / l[i];
      for (int64_t r = 0; r < c; ++r)
        for (int64_t i = 0; i < ni; ++i) ob[r * N + i] = acc[r * kTile + i] * alpha[i];
      for (int64_t i = 0; i < ni; ++i) lse[b * N + i0 + i] = m[i] + std::log(l[i]);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// CPU backward: D, then one pass over (batch, group of key tiles). A task owns its key tiles, so
// it accumulates dk and dv for them race-free; its contributions to dq (all queries) go to a
// dq buffer of its group (group 0: dq itself), summed at the end. G groups per batch item give
// B * G >= 4 * threads tasks for load balance; the extra buffers cost (G - 1) * B * d * N
// values, capped at 64 MiB (fewer groups beyond that).

template <typename T>
void bwd_cpu_kernel(const T* go, const T* q, const T* k, const T* v, const T* o, const T* lse,
                    T* dq, T* dk, T* dv, const Dims& s) {
  const int64_t B = s.B, d = s.d, c = s.c, N = s.N;
  const int64_t ntiles = (N + kTile - 1) / kTile;
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;

  // D[b][i] = sum_c grad_o[b][c][i] o[b][c][i]   (B x N, padded to whole tiles with zeros)
  std::vector<T> D(B * ntiles * kTile, T(0));
  at::parallel_for(0, B * ntiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / ntiles, i0 = (task % ntiles) * kTile;
      const int64_t ni = std::min(kTile, N - i0);
      T* Db = &D[b * ntiles * kTile + i0];
      for (int64_t r = 0; r < c; ++r) {
        const T* gr = go + (b * c + r) * N + i0;
        const T* orow = o + (b * c + r) * N + i0;
        for (int64_t i = 0; i < ni; ++i) Db[i] += gr[i] * orow[i];
      }
    }
  });

  const int64_t per_group = B * d * N;
  const int64_t max_extra = (int64_t(64) << 20) / int64_t(sizeof(T));
  int64_t G = std::min(ntiles, (4 * at::get_num_threads() + B - 1) / B);
  G = std::max<int64_t>(1, std::min(G, 1 + max_extra / per_group));
  std::fill(dq, dq + per_group, T(0));
  std::vector<T> dq_extra((G - 1) * per_group, T(0));

  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> qbuf(d * kTile), gbuf(c * kTile), kbuf(d * kTile), vbuf(c * kTile);
    std::vector<T> p(kTile * kTile), ds(kTile * kTile), dst(kTile * kTile);  // p, ds: [i][j]
    std::vector<T> dkacc(d * kTile), dvacc(c * kTile), dqacc(d * kTile);
    T L[kTile];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / G, g = task % G;
      T* dqb = (g == 0 ? dq : dq_extra.data() + (g - 1) * per_group) + b * d * N;
      for (int64_t jt = g * ntiles / G; jt < (g + 1) * ntiles / G; ++jt) {
        const int64_t j0 = jt * kTile, nj = std::min(kTile, N - j0);
        int64_t ldq, ldg, ldk, ldv;
        const T* kt = tile(k + b * d * N, d, N, j0, kbuf.data(), &ldk);
        const T* vt = tile(v + b * c * N, c, N, j0, vbuf.data(), &ldv);
        std::fill(dkacc.begin(), dkacc.end(), T(0));
        std::fill(dvacc.begin(), dvacc.end(), T(0));
        for (int64_t i0 = 0; i0 < N; i0 += kTile) {
          const int64_t ni = std::min(kTile, N - i0);
          const T* qt = tile(q + b * d * N, d, N, i0, qbuf.data(), &ldq);
          const T* gt = tile(go + b * c * N, c, N, i0, gbuf.data(), &ldg);
          const T* Dt = &D[b * ntiles * kTile + i0];
          for (int64_t i = 0; i < kTile; ++i) L[i] = i < ni ? lse[b * N + i0 + i] : T(0);
          gemm_tn(qt, ldq, kt, ldk, d, p.data());   // s[i][j]
          gemm_tn(gt, ldg, vt, ldv, c, ds.data());  // dP[i][j]
          // P = exp(s - lse_i), dS = P (dP - D_i); zero outside the ni x nj valid block
          for (int64_t i = 0; i < kTile; ++i) {
            T* pi = &p[i * kTile];
            T* dsi = &ds[i * kTile];
            if (i >= ni) {
              std::fill(pi, pi + kTile, T(0));
              std::fill(dsi, dsi + kTile, T(0));
              continue;
            }
            const V lv = V{} + L[i], dv_ = V{} + Dt[i];
            for (int64_t j = 0; j < kTile; j += W) {
              const V pv = expv(loadv<V>(pi + j) - lv);
              storev(pi + j, pv);
              storev(dsi + j, pv * (loadv<V>(dsi + j) - dv_));
            }
            for (int64_t j = nj; j < kTile; ++j) pi[j] = dsi[j] = T(0);
          }
          gemm_nn_acc(gt, ldg, p.data(), c, dvacc.data());   // dv[r][j] += sum_i go[r][i] P[i][j]
          gemm_nn_acc(qt, ldq, ds.data(), d, dkacc.data());  // dk[t][j] += sum_i q[t][i] dS[i][j]
          // dq[t][i] += sum_j k[t][j] dS[i][j]: needs dS^T as the [j][i] operand
          for (int64_t j = 0; j < kTile; ++j)
            for (int64_t i = 0; i < kTile; ++i) dst[j * kTile + i] = ds[i * kTile + j];
          std::fill(dqacc.begin(), dqacc.end(), T(0));
          gemm_nn_acc(kt, ldk, dst.data(), d, dqacc.data());
          for (int64_t t = 0; t < d; ++t)
            for (int64_t i = 0; i < ni; ++i) dqb[t * N + i0 + i] += dqacc[t * kTile + i];
        }
        T* dkb = dk + b * d * N + j0;
        T* dvb = dv + b * c * N + j0;
        for (int64_t t = 0; t < d; ++t) std::copy(&dkacc[t * kTile], &dkacc[t * kTile] + nj, dkb + t * N);
        for (int64_t r = 0; r < c; ++r) std::copy(&dvacc[r * kTile], &dvacc[r * kTile] + nj, dvb + r * N);
      }
    }
  });

  // dq = sum over the groups' buffers
  if (G > 1) {
    at::parallel_for(0, per_group, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t g = 1; g < G; ++g) {
        const T* src = dq_extra.data() + (g - 1) * per_group;
        for (int64_t x = begin; x < end; ++x) dq[x] += src[x];
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------
// CPU op implementations

// float16 / bfloat16 are computed in float32 on the CPU.
at::ScalarType cpu_compute_dtype(at::ScalarType t) {
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "unit_attn (csrc/attention.cpp): the CPU op supports float32, float64, float16 and "
              "bfloat16 inputs; got ", t, ". Convert q, k, v to float32.");
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_, const at::Tensor& k_,
                                                     const at::Tensor& v_) {
  const Dims s = check_qkv(q_, k_, v_, "attention_fwd");
  const at::ScalarType in_t = q_.scalar_type(), ct = cpu_compute_dtype(in_t);
  const at::Tensor q = q_.to(ct).contiguous(), k = k_.to(ct).contiguous(), v = v_.to(ct).contiguous();
  at::Tensor o = at::empty({s.B, s.c, s.N}, v.options());
  at::Tensor lse = at::empty({s.B, s.N}, q.options().dtype(lse_dtype(in_t)));
  if (s.B == 0 || s.N == 0) return {o.to(in_t), lse};
  AT_DISPATCH_FLOATING_TYPES(ct, "unit_attn_fwd_cpu", [&] {
    fwd_cpu_kernel<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                             o.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), s);
  });
  return {o.to(in_t), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_o_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& o_, const at::Tensor& lse_) {
  const Dims s = check_qkv(q_, k_, v_, "attention_bwd");
  check_bwd_extra(s, q_, grad_o_, o_, lse_);
  const at::ScalarType in_t = q_.scalar_type(), ct = cpu_compute_dtype(in_t);
  const at::Tensor q = q_.to(ct).contiguous(), k = k_.to(ct).contiguous(), v = v_.to(ct).contiguous();
  const at::Tensor go = grad_o_.to(ct).contiguous(), o = o_.to(ct).contiguous();
  const at::Tensor lse = lse_.contiguous();
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (s.B == 0 || s.N == 0) return {dq.to(in_t), dk.to(in_t), dv.to(in_t)};
  AT_DISPATCH_FLOATING_TYPES(ct, "unit_attn_bwd_cpu", [&] {
    bwd_cpu_kernel<scalar_t>(go.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                             v.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                             dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), s);
  });
  return {dq.to(in_t), dk.to(in_t), dv.to(in_t)};
}

// ---------------------------------------------------------------------------------------------
// CUDA glue: checks, device guard, current stream, workspace; the kernels are in attention.cu.

#ifdef WITH_CUDA
unit_attn_dtype cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return UNIT_ATTN_F32;
    case at::kHalf: return UNIT_ATTN_F16;
    case at::kBFloat16: return UNIT_ATTN_BF16;
    default:
      TORCH_CHECK(false, "unit_attn (csrc/attention.cpp): the CUDA op supports float32, float16 "
                         "and bfloat16; got ", t, ". Convert q, k, v to one of those.");
  }
  return UNIT_ATTN_F32;  // unreachable
}

void check_cuda_limits(const Dims& s, const at::Tensor& q) {
  TORCH_CHECK(q.is_cuda(), "unit_attn (csrc/attention.cpp): expected CUDA tensors.");
  TORCH_CHECK(s.d >= 1 && s.d <= 128 && s.c >= 1 && s.c <= 1024,
              "unit_attn (csrc/attention.cpp): the CUDA kernels need 1 <= d <= 128 and "
              "1 <= c <= 1024; got d = ", s.d, ", c = ", s.c, ". Use the PyTorch attention path "
              "(UNIT_ATTN=torch) for these sizes.");
  const int64_t kMax = std::numeric_limits<int>::max();
  const int64_t numel = s.B * std::max(s.c, s.d) * s.N;
  TORCH_CHECK(numel <= kMax, "unit_attn (csrc/attention.cpp): tensors too large for the CUDA "
              "kernels (B * max(c, d) * N = ", numel, " must fit in int32); split the batch.");
}

void check_cuda_error(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "unit_attn (csrc/attention.cu): the ", what,
              " kernel failed: ", cudaGetErrorString(err), ".");
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q_, const at::Tensor& k_,
                                                      const at::Tensor& v_) {
  const Dims s = check_qkv(q_, k_, v_, "attention_fwd");
  check_cuda_limits(s, q_);
  const unit_attn_dtype dt = cuda_dtype(q_.scalar_type());
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  at::Tensor o = at::empty({s.B, s.c, s.N}, v.options());
  at::Tensor lse = at::empty({s.B, s.N}, q.options().dtype(at::kFloat));
  if (s.B == 0 || s.N == 0) return {o, lse};
  check_cuda_error(unit_attn_fwd(dt, q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(),
                                 lse.data_ptr<float>(), (int)s.B, (int)s.d, (int)s.c, (int)s.N,
                                 c10::cuda::getCurrentCUDAStream()),
                   "forward");
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_o_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& o_, const at::Tensor& lse_) {
  const Dims s = check_qkv(q_, k_, v_, "attention_bwd");
  check_bwd_extra(s, q_, grad_o_, o_, lse_);
  check_cuda_limits(s, q_);
  const unit_attn_dtype dt = cuda_dtype(q_.scalar_type());
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const at::Tensor go = grad_o_.contiguous(), o = o_.contiguous(), lse = lse_.contiguous();
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (s.B == 0 || s.N == 0) return {dq, dk, dv};
  const size_t ws_bytes = unit_attn_bwd_workspace_bytes(dt, (int)s.B, (int)s.d, (int)s.c, (int)s.N);
  // the caching allocator returns blocks aligned to at least 512 bytes
  at::Tensor ws = at::empty({(int64_t)std::max<size_t>(ws_bytes, 256)}, q.options().dtype(at::kByte));
  check_cuda_error(unit_attn_bwd(dt, q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(),
                                 lse.data_ptr<float>(), go.data_ptr(), dq.data_ptr(), dk.data_ptr(),
                                 dv.data_ptr(), ws.data_ptr(), (int)s.B, (int)s.d, (int)s.c,
                                 (int)s.N, c10::cuda::getCurrentCUDAStream()),
                   "backward");
  return {dq, dk, dv};
}
#endif  // WITH_CUDA

}  // namespace

TORCH_LIBRARY(unit_attn, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v) -> (Tensor o, Tensor lse)");
  m.def("attention_bwd(Tensor grad_o, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse) "
        "-> (Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(unit_attn, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(unit_attn, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}
#endif
