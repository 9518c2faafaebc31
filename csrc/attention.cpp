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
// The CPU kernel never holds an N x N matrix, and runs its products on the CPU BLAS that ATen
// uses (MKL or OpenBLAS, through at::mm_out on views of the tensors' own memory):
//   forward, per block of qb queries (a task):  S = Q_blk^T K  (qb x N, all keys at once),
//       an exact row softmax in place (P, lse), O_blk = V P^T.
//   backward, per block of kb keys:  S = Q^T K_blk, dP = dO^T V_blk (N x kb each),
//       P = exp(S - lse_i), dS = P (dP - D_i), dV_blk = dO P, dK_blk = Q dS, dQ += K_blk dS^T.
// A block is about 2 MiB of scores per thread (qb, kb = 16..256 rows; fewer at large N), so extra
// memory is O(N) per thread, and the products are large enough for BLAS speed: on a 2-core
// AMD EPYC (Zen 3) the forward runs at the speed of the same products done as whole matrices.
// The backward is one pass over key blocks; a task owns a group of key blocks (dk, dv race-free)
// and adds its dq contributions to a buffer of its group, summed at the end (at most 64 MiB).
// What this buys over the naive bmm + softmax + bmm (bench.py attention, README): little where
// the products dominate (d = 64, c = 512: about 1.05x), 1.3-3x where d and c are small and the
// N x N matrices' memory traffic dominates, and O(N) instead of O(N^2) memory.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // c10::cuda::getCurrentCUDAStream (= at::cuda::, lighter header)
#include "attention_cuda.h"
#endif

namespace {

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

// The element-wise passes (exp, softmax, dS) on GCC/Clang vector types: one vector = one SIMD
// register of the build machine (unit/ops.py compiles with -march=native).
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;  // SSE2, NEON
#endif

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

// ---------------------------------------------------------------------------------------------
// CPU kernels: blocks of rows against all N keys or queries, products on BLAS

// C (m x n) = alpha op(A) op(B) + beta C on row-major matrices with leading dimensions in
// elements; op(X) = X^T when the flag is set (X is then stored k x m, resp. n x k). Runs through
// ATen's mm (MKL/OpenBLAS), single-threaded inside at::parallel_for.
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda, const T* B,
          int64_t ldb, T beta, T* C, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool t) {  // op(X): rows x cols
    at::Tensor x = at::from_blob(const_cast<T*>(p), {t ? cols : rows, t ? rows : cols}, {ld, 1}, opts);
    return t ? x.t() : x;
  };
  at::Tensor out = at::from_blob(C, {m, n}, {ldc, 1}, opts);
  if (beta == T(0) && alpha == T(1)) at::mm_out(out, view(A, m, k, lda, ta), view(B, k, n, ldb, tb));
  else out.addmm_(view(A, m, k, lda, ta), view(B, k, n, ldb, tb), beta, alpha);
}

// rows of a block of scores, in place: p = exp(s - m) / sum, lse = m + log(sum)
template <typename T>
void softmax_rows(T* S, int64_t rows, int64_t N, T* lse) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  const int64_t Nv = N - N % W;
  for (int64_t i = 0; i < rows; ++i) {
    T* r = S + i * N;
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < N; ++j) m = std::max(m, r[j]);
    V sv{};
    const V mv = V{} + m;
    for (int64_t j = 0; j < Nv; j += W) {
      const V e = expv(loadv<V>(r + j) - mv);
      storev(r + j, e);
      sv += e;
    }
    T sum = 0;
    for (int i2 = 0; i2 < W; ++i2) sum += sv[i2];
    for (int64_t j = Nv; j < N; ++j) sum += (r[j] = std::exp(r[j] - m));
    const T inv = T(1) / sum;
    for (int64_t j = 0; j < N; ++j) r[j] *= inv;
    lse[i] = m + std::log(sum);
  }
}

// rows of blocks, in place: P = exp(S - lse_i), dS = P (dP - D_i)  (S and dP are rows x n)
template <typename T>
void softmax_grad_rows(T* P, T* dS, int64_t rows, int64_t n, const T* lse, const T* D) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  const int64_t nv = n - n % W;
  for (int64_t i = 0; i < rows; ++i) {
    T* p = P + i * n;
    T* ds = dS + i * n;
    const V lv = V{} + lse[i], dv = V{} + D[i];
    for (int64_t j = 0; j < nv; j += W) {
      const V e = expv(loadv<V>(p + j) - lv);
      storev(p + j, e);
      storev(ds + j, e * (loadv<V>(ds + j) - dv));
    }
    for (int64_t j = nv; j < n; ++j) {
      p[j] = std::exp(p[j] - lse[i]);
      ds[j] = p[j] * (ds[j] - D[i]);
    }
  }
}

// rows per block so that a block of scores (rows x N) is about kBlockElems values, a multiple of
// 16 between 16 and 256, and small enough that B * blocks gives every thread a few tasks
constexpr int64_t kBlockElems = 1 << 19;  // 2 MiB of float32 per scratch block and thread
int64_t block_rows(int64_t N, int64_t B) {
  const int64_t want_blocks = (4 * at::get_num_threads() + B - 1) / B;
  int64_t r = std::min<int64_t>({256, kBlockElems / N, (N + want_blocks - 1) / want_blocks});
  r = (r + 15) / 16 * 16;
  return std::max<int64_t>(16, r);
}

template <typename T>
void fwd_cpu_kernel(const T* q, const T* k, const T* v, T* o, T* lse, const Dims& s) {
  const int64_t B = s.B, d = s.d, c = s.c, N = s.N;
  const int64_t qb = std::min(block_rows(N, B), N), nqb = (N + qb - 1) / qb;
  at::parallel_for(0, B * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> S(qb * N);  // scores, then probabilities, of qb queries x all N keys
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nqb, i0 = (task % nqb) * qb, nq = std::min(qb, N - i0);
      const T *qp = q + b * d * N, *kp = k + b * d * N, *vp = v + b * c * N;
      gemm<T>(true, false, nq, N, d, 1, qp + i0, N, kp, N, 0, S.data(), N);         // S = Q_blk^T K
      softmax_rows(S.data(), nq, N, lse + b * N + i0);
      gemm<T>(false, true, c, nq, N, 1, vp, N, S.data(), N, 0, o + b * c * N + i0, N);  // O_blk = V P^T
    }
  });
}

template <typename T>
void bwd_cpu_kernel(const T* go, const T* q, const T* k, const T* v, const T* o, const T* lse, T* dq, T* dk,
                    T* dv, const Dims& s) {
  const int64_t B = s.B, d = s.d, c = s.c, N = s.N;
  // D[b][i] = sum_c grad_o[b][c][i] o[b][c][i]
  std::vector<T> D(B * N, T(0));
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t r = 0; r < c; ++r) {
        const T *g = go + (b * c + r) * N, *orow = o + (b * c + r) * N;
        T* Db = &D[b * N];
        for (int64_t i = 0; i < N; ++i) Db[i] += g[i] * orow[i];
      }
  });
  const int64_t kb = std::min(block_rows(N, B), N), nkb = (N + kb - 1) / kb;
  // G groups of key blocks per batch item; group g > 0 adds its dq to a buffer of its own
  const int64_t per_group = B * d * N, max_extra = (int64_t(64) << 20) / int64_t(sizeof(T));
  int64_t G = std::min(nkb, (2 * at::get_num_threads() + B - 1) / B);
  G = std::max<int64_t>(1, std::min(G, 1 + max_extra / per_group));
  std::fill(dq, dq + per_group, T(0));
  std::vector<T> dq_extra((G - 1) * per_group, T(0));
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> P(N * kb), dS(N * kb);  // all N queries x kb keys
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / G, g = task % G;
      const T *qp = q + b * d * N, *kp = k + b * d * N, *vp = v + b * c * N, *gp = go + b * c * N;
      T* dqp = (g == 0 ? dq : dq_extra.data() + (g - 1) * per_group) + b * d * N;
      for (int64_t jb = g * nkb / G; jb < (g + 1) * nkb / G; ++jb) {
        const int64_t j0 = jb * kb, nk = std::min(kb, N - j0);
        gemm<T>(true, false, N, nk, d, 1, qp, N, kp + j0, N, 0, P.data(), nk);   // S = Q^T K_blk
        gemm<T>(true, false, N, nk, c, 1, gp, N, vp + j0, N, 0, dS.data(), nk);  // dP = dO^T V_blk
        softmax_grad_rows(P.data(), dS.data(), N, nk, lse + b * N, &D[b * N]);
        gemm<T>(false, false, c, nk, N, 1, gp, N, P.data(), nk, 0, dv + b * c * N + j0, N);   // dV = dO P
        gemm<T>(false, false, d, nk, N, 1, qp, N, dS.data(), nk, 0, dk + b * d * N + j0, N);  // dK = Q dS
        gemm<T>(false, true, d, N, nk, 1, kp + j0, N, dS.data(), nk, 1, dqp, N);             // dQ += K dS^T
      }
    }
  });
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

void check_cuda_error(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "unit_attn (csrc/attention.cu): ", what, " failed: ", cudaGetErrorString(err), ".");
}

// "" if the CUDA kernels can run these sizes in this dtype on `device`, else why not (from
// unit_attn_supported in attention.cu: sizes, compute capability, shared memory per block).
std::string cuda_supported(at::ScalarType dtype, int64_t B, int64_t d, int64_t c, int64_t N, at::Device device) {
  TORCH_CHECK(device.is_cuda(), "unit_attn::cuda_supported: expected a CUDA device, got ", device, ".");
  if (dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16)
    return std::string("dtype ") + c10::toString(dtype) + ": the CUDA kernels take float32, float16 and bfloat16";
  const int64_t kMax = std::numeric_limits<int>::max();
  if (B > kMax || d > kMax || c > kMax || N > kMax) return "sizes beyond int32";
  if (B == 0 || N == 0) return "";  // empty outputs, no kernel runs
  const c10::cuda::CUDAGuard guard(device);
  const char* why = nullptr;
  check_cuda_error(unit_attn_supported(cuda_dtype(dtype), (int)B, (int)d, (int)c, (int)N, &why), "the device query");
  return why ? why : "";
}

void check_cuda_limits(const Dims& s, const at::Tensor& q) {
  TORCH_CHECK(q.is_cuda(), "unit_attn (csrc/attention.cpp): expected CUDA tensors.");
  const std::string why = cuda_supported(q.scalar_type(), s.B, s.d, s.c, s.N, q.device());
  TORCH_CHECK(why.empty(), "unit_attn (csrc/attention.cpp): the CUDA kernels cannot run this: ", why,
              ". Use UNIT_ATTN=sdpa (or auto, which picks it for such shapes).");
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
                   "the forward kernel");
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
                   "the backward kernels");
  return {dq, dk, dv};
}
#endif  // WITH_CUDA

}  // namespace

TORCH_LIBRARY(unit_attn, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v) -> (Tensor o, Tensor lse)");
  m.def("attention_bwd(Tensor grad_o, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse) "
        "-> (Tensor dq, Tensor dk, Tensor dv)");
#ifdef WITH_CUDA
  m.def("cuda_supported(ScalarType dtype, int B, int d, int c, int N, Device device) -> str", &cuda_supported);
#endif
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
