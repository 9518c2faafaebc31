// Fused SAGAN attention on CUDA: o = v . softmax_keys(q^T k), no scale, forward and backward.
//
//   q, k: (B, d, N)   v, o: (B, c, N)   lse: (B, N) float32   (position index fastest)
//   s_ij = sum_t q[t,i] k[t,j]     p_ij = exp(s_ij - lse_i)     o[:,i] = sum_j p_ij v[:,j]
// Interface: attention_cuda.h (plain C; this file includes no torch header and compiles alone).
//
// STATUS: written and compiled (nvcc 13.0, sm_80 + sm_90) on a machine WITHOUT a GPU; it has
// NOT run yet. Checked so far without a GPU: (1) the ldmatrix/mma fragment addressing of
// warp_mma(), all four operand orientations, against a Python model of the PTX semantics;
// (2) the tiling, masking, c-/key-splits and lse/D padding, by a tile-level NumPy port of the
// three kernels against float64 (d = 5..100, c = 3..256, N = 1..150); (3) ptxas: no spills, no
// stack. Performance figures below are estimates. tests/test_attention_op.py (float64 reference)
// and `python bench.py attention` are the checks to run on the first GPU.
//
// ------------------------------------------------------------------------------------------
// Design (flash-attention 2 style, one CTA = 4 warps = 128 threads, every warp owns 16 rows)
// ------------------------------------------------------------------------------------------
// Tiles: 64 positions (queries or keys) per tile, 64-wide smem rows padded by 16 bytes so that
// ldmatrix and the fp32 scalar loads are free of bank conflicts. Tiles are copied straight from
// their natural (feature, position) layout with 16-byte cp.async (zero-filled out of range), or
// with plain element loads when N or a pointer does not allow 16-byte vectors. Out-of-range
// positions, features t >= d and channels >= c are zeros in smem; keys j >= N are masked.
//
// All matrix products go through one helper, warp_mma(): acc(16 x 8*NT) += A(16 x K) B(K x 8*NT)
// with A and B in shared memory in either orientation. For fp16/bf16 it is ldmatrix(.trans) +
// mma.sync.m16n8k16 with fp32 accumulation; for fp32 it is plain FFMA in the same register
// layout (TF32 would miss the 1e-5 fp32 accuracy bar). The accumulator layout is the mma "C"
// layout: lane (g = lane/4, q4 = lane%4) holds rows g and g+8, columns 8n + 2*q4 + {0,1}.
// Row reductions (softmax max/sum) are two shuffles across the 4 lanes of a quad.
// P (and dS) go through shared memory as the A operand of the next product (fp32 for fp32,
// the input dtype otherwise): one code path for all dtypes, at ~10% more smem traffic than
// keeping P in registers.
//
// forward  attn_fwd_kernel        grid (N/64 query tiles, c/128 c-splits, B)
//   Each CTA: 64 queries x 128 value channels, loops over all key tiles with an online softmax.
//   S = Q^T K is recomputed in each c-split. Why split c: o is (64 x c) per query tile and c is
//   up to 1024; 128 channels x 16 rows per warp = 64 fp32 accumulator registers per thread,
//   which is what fits next to S. Recomputing S costs 2N^2 d per split, i.e. d/128 of the PV
//   work of that split (+50% at d=64, +25% at d=32 on the PV part), and it buys parallelism:
//   B=1 encoder = 76 x 4 = 304 CTAs on 132 SMs. The split c=0 writes lse.
//   K/V tiles are double-buffered with cp.async (16-bit types; fp32 single-buffered for smem).
// backward, three steps after zeroing the fp32 workspace (memset on the stream):
//   attn_bwd_dot_kernel    D_i = sum_c dO[c,i] O[c,i]                                (B x N)
//   attn_bwd_dqdk_kernel   grid (N/64 query tiles, key-splits, B). Per key tile:
//        S = Q^T K, P = exp(S - lse), dP = dO^T V reduced over ALL c in chunks of 64
//        (dO and V chunks double-buffered), dS = P (dP - D) -> smem,
//        dQ += dS K^T (registers), dK_partial = Q dS -> atomicAdd into an fp32 workspace.
//        Key-splits (chosen from the SM count and occupancy) keep small B busy; dQ is then
//        also summed with atomics into the workspace.
//   attn_bwd_dv_kernel     grid (N/64 key tiles, c/128 c-splits, B). Per query tile:
//        S^T = K^T Q, P^T = exp(S^T - lse) -> smem, dV^T += P^T dO^T (registers).
//        dV needs no c-reduction, so it is split over c like the forward; dP needs the full
//        c-reduction before dS exists, which is why dK/dQ live in a separate kernel.
//   attn_bwd_convert_kernel  dq, dk = workspace (fp32) cast to the output dtype.
//   dq/dk use fp32 atomics, so they are not bitwise deterministic (rounding order only).
//   Extra memory: workspace = 4 B N (D) + 2 * 4 B d N (dq, dk accumulators) bytes.
//
// FLOPs (counted as 2 per multiply-add; "min" = the algorithm, "run" = with recomputation)
//   forward   min 2BN^2(d + c)               run 2BN^2(ceil(c/128) d + c)
//   backward  min 2BN^2(3d + 2c)  [S, dP, dV, dQ, dK]
//             run 2BN^2(3d + c) [dqdk kernel] + 2BN^2(ceil(c/128) d + c) [dv kernel]
//   UNIT at B=8:
//     encoder   N=4864,  d=64, c=512:  fwd min 218 GFLOP  run 291 GFLOP
//                                      bwd min 460 GFLOP  run 557 GFLOP
//     generator N=19456, d=32, c=256:  fwd min 1.74 TFLOP run 1.94 TFLOP
//                                      bwd min 3.68 TFLOP run 4.07 TFLOP
//   Bytes (bf16, each tensor once): encoder ~90 MB, generator ~180 MB: ~20 / ~40 us at 4.8 TB/s,
//   against ~1 ms (encoder fwd) of tensor-core work: compute-bound by a factor > 20.
//   The naive form instead writes the N x N matrix: 94.6 MB (encoder) and 1.51 GB (generator)
//   fp32 per image.
// Expected limits (unmeasured): each warp re-reads its mma B operand from smem, 256 B per
//   m16n8k16 = 2 cycles/mma/SM at 128 B/clk, about where mma.sync issues on H100; plus exp()
//   on the MUFU (one per score per c-split: 1 exp per 2*(d+128) flops), the __syncthreads per
//   tile with 4 warps/CTA, L2 traffic (each CTA streams K and a 128-channel slice of V), and in
//   the backward the fp32 atomics for dK (d x 64 per query tile per key tile).
//   Guess: 25-45% of the bf16 dense peak for bf16; fp32 runs on FFMA, smem-bound on scalar
//   loads, well under the fp32 peak and probably slower than naive fp32 (cuBLAS) and SDPA's
//   memory-efficient fp32 (3xTF32 on sm_80+).
// Resources (ptxas, 16-bit types, d <= 64 / d = 128): forward 168 / 208 registers, 72 / 99 KB
//   smem -> 3 / 2 CTAs per SM; dq/dk 166 / 216 registers, 63 / 81 KB; dv 128-168 registers,
//   72.5 / 99.5 KB. fp32: 128-168 registers, 68-119 KB smem. All fit sm_80 (163 KB) and sm_90
//   (227 KB); on sm_86/sm_89 (99 KB) fp32 at d > 64 (119 KB) and the 16-bit dv kernel at d > 64
//   (99.5 KB) do not: unit_attn_supported() says so, and the launcher would return
//   cudaFuncSetAttribute's error.
// Tuning knobs to try on a GPU: kBC = 256 (halves the S recompute and exps, 2 CTAs/SM),
//   kCC = 128 (half the barriers in dq/dk), 8 warps per CTA.
//   Not done: wgmma/TMA (sm_90a), keeping P in registers, split-K for the forward at tiny B*N.
// ------------------------------------------------------------------------------------------

#include "attention_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <stdio.h>

#include <mutex>
#include <type_traits>

namespace {

constexpr int kThreads = 128;  // 4 warps; each warp owns 16 rows of a 64-row tile
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;      // positions per tile (queries and keys)
constexpr int kBC = 128;       // value channels per CTA in the forward and dV kernels
constexpr int kCC = 64;        // value channels per step of the dP reduction (dq/dk kernel)
constexpr float kLog2e = 1.4426950408889634f;

// Double-buffer the streamed tiles for 16-bit types; fp32 tiles are twice as big, so fp32
// uses one buffer to stay under the 163 KB that an A100 block may have.
template <typename T> constexpr int kStages = sizeof(T) == 4 ? 1 : 2;
// Row stride (elements) of every 64-position smem tile: 64 + 16 bytes of padding. The rows
// then start 4 banks apart, so 8 consecutive rows of 16 bytes (one ldmatrix 8x8) hit all 32
// banks once, and in fp32 the 8 lanes g=0..7 reading A(g, k) hit 8 different banks.
template <typename T> constexpr int kLd = kTile + 16 / (int)sizeof(T);

template <typename T> constexpr bool kIsF32 = std::is_same<T, float>::value;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---- dtype helpers -----------------------------------------------------------------------

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x) {
  if constexpr (std::is_same<T, __half>::value) return __float2half_rn(x);
  else if constexpr (std::is_same<T, __nv_bfloat16>::value) return __float2bfloat16_rn(x);
  else return x;
}

// p[0] = a, p[1] = b (p is 4-byte aligned for 16-bit types, 8-byte aligned for fp32)
__device__ __forceinline__ void store2(float* p, float a, float b) {
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
__device__ __forceinline__ void store2(__half* p, float a, float b) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);  // low half = a = p[0]
}
__device__ __forceinline__ void store2(__nv_bfloat16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}

// e^(s - m). fp32 uses expf (about 2 ulp); 16-bit types use the cheaper exp2 form.
// s = -inf or m = +inf give 0; m = -inf with finite s never happens (see the forward).
template <typename T> __device__ __forceinline__ float exp_shift(float s, float m) {
  if constexpr (kIsF32<T>) return expf(s - m);
  else return exp2f((s - m) * kLog2e);
}

// ---- PTX wrappers ------------------------------------------------------------------------
// (tests/cuda_emu compiles this file on the CPU with UNIT_CUDA_EMU defined and supplies emulated
// versions of these functions: this guard is the only concession to it.)
#ifndef UNIT_CUDA_EMU

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes = 0 writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int n> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(n) : "memory");
}

// ldmatrix .x4: lanes 8m..8m+7 give the row addresses of 8x8 matrix m (16 bytes per row);
// r[m] receives, in lane L, row L/4, columns 2(L%4), 2(L%4)+1 of matrix m (low half first).
// With .trans, r[m] receives column L/4, rows 2(L%4), 2(L%4)+1 instead.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}

// c(16x8) += a(16x16) b(16x8), fp32 accumulate. With g = lane/4, q4 = lane%4:
//   a[0] = A[g][2q4..+1]  a[1] = A[g+8][2q4..+1]  a[2] = A[g][8+2q4..+1]  a[3] = A[g+8][8+2q4..+1]
//   b0 = B[2q4..+1][g]    b1 = B[8+2q4..+1][g]
//   c[0], c[1] = C[g][2q4], C[g][2q4+1]           c[2], c[3] = C[g+8][2q4], C[g+8][2q4+1]
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

#endif  // UNIT_CUDA_EMU

// ---- the one matrix-product helper -----------------------------------------------------
//
// acc (16 x 8NT, C layout above) += A (16 x KD) * B (KD x 8NT), one warp, operands in smem:
//   A(m, k) = A_KC ? sA[m * lda + k] : sA[k * lda + m]     (A_KC: k is the contiguous index)
//   B(k, n) = B_KC ? sB[n * ldb + k] : sB[k * ldb + n]     (B_KC: k is the contiguous index)
// Our tiles are stored (feature, position) with position contiguous, so an operand is
// "k-contiguous" exactly when the product reduces over positions.
// Requirements (16-bit path): lda, ldb, and the column offsets of sA/sB multiples of 8
// elements, KD % 16 == 0, NT even. All call sites use kLd<T> and offsets of 16 or 32.
//
// How ldmatrix builds the fragments (16-bit path). With r8 = lane % 8, mi = lane / 8 (the
// matrix whose row address this lane supplies):
//  A_KC (non-trans): matrix mi covers rows m = 8(mi&1).., cols k = k0 + 8(mi>>1).. ; the lane
//     gets A[g][k0 + 2q4..] from matrix 0 = a[0], rows +8 from matrix 1 = a[1], etc.
//  A not KC (.trans): matrix mi is stored rows k = k0 + 8(mi>>1).., cols m = 8(mi&1)..; .trans
//     hands lane L stored[2q4][g], stored[2q4+1][g] = A[g][k0+2q4], A[g][k0+2q4+1].
//  B_KC (non-trans): matrix mi covers stored rows n = 8n0 + 8(mi>>1).., cols k = k0 + 8(mi&1)..
//     -> b[0], b[1] = (b0, b1) of n-tile n0, b[2], b[3] = (b0, b1) of n-tile n0+1.
//  B not KC (.trans): stored rows k = k0 + 8(mi&1).., cols n = 8n0 + 8(mi>>1).. , same order.
// Example, B not KC, lane 9 (r8 = 1, mi = 1, g = 2, q4 = 1): it points at stored row k0+9,
// column 8n0 (matrix 1 = k0+8..15, n-tile n0); from matrix 1 it receives B[k0+8+2][8n0+2] and
// B[k0+8+3][8n0+2] = b1 of n-tile n0 for g = 2, q4 = 1, as the mma wants.
template <typename T, int NT, int KD, bool A_KC, bool B_KC>
__device__ __forceinline__ void warp_mma(float (&acc)[NT][4], const T* sA, int lda, const T* sB, int ldb) {
  static_assert(KD % 16 == 0 && NT % 2 == 0, "warp_mma: KD must be a multiple of 16, NT even");
  const int lane = threadIdx.x & 31;
  if constexpr (kIsF32<T>) {
    const int g = lane >> 2, q4 = lane & 3;
#pragma unroll 2
    for (int kk = 0; kk < KD; ++kk) {
      const float a0 = A_KC ? sA[g * lda + kk] : sA[kk * lda + g];
      const float a1 = A_KC ? sA[(g + 8) * lda + kk] : sA[kk * lda + g + 8];
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int col = 8 * n + 2 * q4;
        float b0, b1;
        if constexpr (B_KC) {
          b0 = sB[col * ldb + kk];
          b1 = sB[(col + 1) * ldb + kk];
        } else {
          const float2 bb = *reinterpret_cast<const float2*>(sB + kk * ldb + col);
          b0 = bb.x;
          b1 = bb.y;
        }
        acc[n][0] = fmaf(a0, b0, acc[n][0]);
        acc[n][1] = fmaf(a0, b1, acc[n][1]);
        acc[n][2] = fmaf(a1, b0, acc[n][2]);
        acc[n][3] = fmaf(a1, b1, acc[n][3]);
      }
    }
  } else {
    const int r8 = lane & 7, mi = lane >> 3;
#pragma unroll
    for (int k0 = 0; k0 < KD; k0 += 16) {
      uint32_t a[4];
      if constexpr (A_KC) ldsm_x4(a, sA + (r8 + 8 * (mi & 1)) * lda + k0 + 8 * (mi >> 1));
      else ldsm_x4_t(a, sA + (k0 + r8 + 8 * (mi >> 1)) * lda + 8 * (mi & 1));
#pragma unroll
      for (int n = 0; n < NT; n += 2) {
        uint32_t b[4];
        if constexpr (B_KC) ldsm_x4(b, sB + (8 * n + r8 + 8 * (mi >> 1)) * ldb + k0 + 8 * (mi & 1));
        else ldsm_x4_t(b, sB + (k0 + r8 + 8 * (mi & 1)) * ldb + 8 * n + 8 * (mi >> 1));
        mma16816<T>(acc[n], a, b[0], b[1]);
        mma16816<T>(acc[n + 1], a, b[2], b[3]);
      }
    }
  }
}

// ---- global -> shared tile copy ----------------------------------------------------------
//
// s[r][p] (row stride kLd<T>) = g[(r0 + r) * N + p0 + p] for r < ROWS, p < 64, zero where
// r0 + r >= nrows or p0 + p >= N. g is the (nrows x N) matrix of one batch element.
// vec_ok (N and all pointers allow 16-byte vectors): cp.async, whole vectors are in or out of
// range because N is a multiple of the vector width. Otherwise: element loads + smem stores.
// Either way the caller's cp.async wait + __syncthreads makes the tile visible.
template <typename T, int ROWS>
__device__ __forceinline__ void load_tile(T* s, const T* __restrict__ g, int r0, int nrows, int p0,
                                          int N, bool vec_ok) {
  constexpr int VEC = 16 / (int)sizeof(T);
  constexpr int VPR = kTile / VEC;  // vectors per row
#pragma unroll 4
  for (int v = threadIdx.x; v < ROWS * VPR; v += kThreads) {
    const int r = v / VPR, pc = (v % VPR) * VEC;
    const int gr = r0 + r, gp = p0 + pc;
    T* dst = s + r * kLd<T> + pc;
    if (vec_ok) {
      const bool in = gr < nrows && gp < N;
      cp_async16(dst, in ? g + (size_t)gr * N + gp : g, in ? 16 : 0);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        dst[e] = (gr < nrows && gp + e < N) ? g[(size_t)gr * N + gp + e] : from_f<T>(0.f);
    }
  }
}

// ---- forward -------------------------------------------------------------------------------
//
// CTA (qt, cs, b): queries i0..i0+63, channels c0..c0+127. Warp w owns queries i0+16w..+15.
// smem: sQ [DP][ld] q[t][i0+i] | sK [ST][DP][ld] k[t][j0+j] | sV [ST][128][ld] v[c0+c][j0+j]
//       | sP [64][ld] p[i][j] (each warp writes and reads only its own 16 rows)
template <typename T, int DP> struct FwdSmem {
  static constexpr int ST = kStages<T>, L = kLd<T>;
  static constexpr int Q = 0, K = Q + DP * L, V = K + ST * DP * L, P = V + ST * kBC * L;
  static constexpr size_t bytes = sizeof(T) * (size_t)(P + kTile * L);
};

// (128, 3): 3 CTAs per SM = at most 168 registers; the smem (72 KB at d <= 64, 16-bit) allows 3.
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, DP <= 64 ? 3 : 2)
    attn_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                    T* __restrict__ o, float* __restrict__ lse, int d, int c, int N, bool vec_ok) {
  using SM = FwdSmem<T, DP>;
  constexpr int ST = SM::ST, L = SM::L;
  constexpr int NTS = kTile / 8, NTO = kBC / 8;  // n-tiles of S (64 keys) and of O (128 ch)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  T* sQ = smem + SM::Q;
  T* sK = smem + SM::K;
  T* sV = smem + SM::V;
  T* sP = smem + SM::P;

  const int b = blockIdx.z, i0 = blockIdx.x * kTile, c0 = blockIdx.y * kBC;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q4 = lane & 3;
  q += (size_t)b * d * N;
  k += (size_t)b * d * N;
  v += (size_t)b * c * N;
  o += (size_t)b * c * N;

  const int ntk = ceil_div(N, kTile);
  auto load_kv = [&](int kt, int st) {
    load_tile<T, DP>(sK + st * DP * L, k, 0, d, kt * kTile, N, vec_ok);
    load_tile<T, kBC>(sV + st * kBC * L, v, c0, c, kt * kTile, N, vec_ok);
  };
  load_tile<T, DP>(sQ, q, 0, d, i0, N, vec_ok);
  if constexpr (ST == 2) load_kv(0, 0);
  cp_async_commit();

  // Row state for rows r = 0 (query i0+16w+g) and r = 1 (query i0+16w+g+8):
  // running max m, this lane's part of the running sum l, output acc (C layout, 16 x 128).
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float acc[NTO][4];
#pragma unroll
  for (int n = 0; n < NTO; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

  for (int kt = 0; kt < ntk; ++kt) {
    int st = 0;
    if constexpr (ST == 2) {  // prefetch tile kt+1 into the other buffer, wait for tile kt
      st = kt & 1;
      if (kt + 1 < ntk) load_kv(kt + 1, st ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      load_kv(kt, 0);
      cp_async_commit();
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* sKs = sK + st * DP * L;
    const T* sVs = sV + st * kBC * L;

    // S (16 x 64) = Q^T K:  A(i, t) = sQ[t][i] (not k-contig), B(t, j) = sK[t][j] (not k-contig)
    float s[NTS][4];
#pragma unroll
    for (int n = 0; n < NTS; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    warp_mma<T, NTS, DP, false, false>(s, sQ + warp * 16, L, sKs, L);

    // Online softmax. Mask keys j >= N (only in the last tile). Every tile holds at least one
    // real key (j0 < N), so the new max is finite and exp(m_old - m_new) is 0 the first time.
    const int j0 = kt * kTile;
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int n = 0; n < NTS; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (j0 + 8 * n + 2 * q4 + e >= N) s[n][e] = s[n][2 + e] = -INFINITY;
        mx[0] = fmaxf(mx[0], s[n][e]);
        mx[1] = fmaxf(mx[1], s[n][2 + e]);
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // the 4 lanes of a quad share a row
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float alpha = exp_shift<T>(m[r], mx[r]);
      m[r] = mx[r];
      l[r] *= alpha;
#pragma unroll
      for (int n = 0; n < NTO; ++n) {
        acc[n][2 * r] *= alpha;
        acc[n][2 * r + 1] *= alpha;
      }
    }
    T* pw = sP + (warp * 16 + g) * L + 2 * q4;  // row g of this warp; row g+8 is pw + 8L
#pragma unroll
    for (int n = 0; n < NTS; ++n) {
      const float p0 = exp_shift<T>(s[n][0], m[0]), p1 = exp_shift<T>(s[n][1], m[0]);
      const float p2 = exp_shift<T>(s[n][2], m[1]), p3 = exp_shift<T>(s[n][3], m[1]);
      l[0] += p0 + p1;
      l[1] += p2 + p3;
      store2(pw + 8 * n, p0, p1);
      store2(pw + 8 * L + 8 * n, p2, p3);
    }
    __syncwarp();

    // O^T (16 x 128) += P V^T:  A(i, j) = sP[i][j] (k-contig), B(j, c) = sV[c][j] (k-contig)
    warp_mma<T, NTO, kTile, true, true>(acc, sP + warp * 16 * L, L, sVs, L);
    __syncthreads();  // all warps are done with sK/sV[st] (refilled next iteration) and sP
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {  // full row sums (all lanes take part in the shuffles)
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = i0 + warp * 16 + g + 8 * r;
    if (i >= N) continue;
    const float inv = 1.f / l[r];
#pragma unroll
    for (int n = 0; n < NTO; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int ch = c0 + 8 * n + 2 * q4 + e;
        if (ch < c) o[(size_t)ch * N + i] = from_f<T>(acc[n][2 * r + e] * inv);
      }
    if (blockIdx.y == 0 && q4 == 0) lse[(size_t)b * N + i] = m[r] + logf(l[r]);
  }
}

// ---- backward: D = rowsum(dO * O) ----------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(256)
    attn_bwd_dot_kernel(const T* __restrict__ o, const T* __restrict__ dout, float* __restrict__ D,
                        int c, int N) {
  const int b = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= N) return;
  const size_t base = (size_t)b * c * N + i;
  float sum = 0.f;
#pragma unroll 8
  for (int ch = 0; ch < c; ++ch) sum = fmaf(to_f(dout[base + (size_t)ch * N]), to_f(o[base + (size_t)ch * N]), sum);
  D[(size_t)b * N + i] = sum;
}

// ---- backward: dQ and dK ---------------------------------------------------------------------
//
// CTA (qt, ks, b): queries i0..i0+63, key tiles [kt0, kt1). Warp w owns queries i0+16w..+15.
// smem: sQ [DP][ld] q[t][i] | sK [DP][ld] k[t][j] | sO [ST][64][ld] dO[c][i] (chunk of 64 ch)
//       | sV [ST][64][ld] v[c][j] (same chunk) | sS [64][ld] dS[i][j]
template <typename T, int DP> struct DqdkSmem {
  static constexpr int ST = kStages<T>, L = kLd<T>;
  static constexpr int Q = 0, K = Q + DP * L, O = K + DP * L, V = O + ST * kCC * L, S = V + ST * kCC * L;
  static constexpr size_t bytes = sizeof(T) * (size_t)(S + kTile * L);
};

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_dqdk_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                         const T* __restrict__ dout, const float* __restrict__ lse,
                         const float* __restrict__ D, float* __restrict__ dq_acc,
                         float* __restrict__ dk_acc, int d, int c, int N, int kt_per_split, bool vec_ok) {
  using SM = DqdkSmem<T, DP>;
  constexpr int ST = SM::ST, L = SM::L;
  constexpr int NTS = kTile / 8, NTQ = DP / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  T* sQ = smem + SM::Q;
  T* sK = smem + SM::K;
  T* sO = smem + SM::O;
  T* sV = smem + SM::V;
  T* sS = smem + SM::S;

  const int b = blockIdx.z, i0 = blockIdx.x * kTile;
  const int ntk = ceil_div(N, kTile);
  const int kt0 = blockIdx.y * kt_per_split, kt1 = min(ntk, kt0 + kt_per_split);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q4 = lane & 3;
  q += (size_t)b * d * N;
  k += (size_t)b * d * N;
  v += (size_t)b * c * N;
  dout += (size_t)b * c * N;
  dq_acc += (size_t)b * d * N;
  dk_acc += (size_t)b * d * N;

  // lse and D of this lane's two rows. Rows i >= N get lse = +inf: P = 0, so dS = 0 there.
  float lse_r[2], D_r[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = i0 + warp * 16 + g + 8 * r;
    lse_r[r] = i < N ? lse[(size_t)b * N + i] : INFINITY;
    D_r[r] = i < N ? D[(size_t)b * N + i] : 0.f;
  }

  const int ncc = ceil_div(c, kCC);
  auto load_chunk = [&](int kt, int cc, int st) {
    load_tile<T, kCC>(sO + st * kCC * L, dout, cc * kCC, c, i0, N, vec_ok);
    load_tile<T, kCC>(sV + st * kCC * L, v, cc * kCC, c, kt * kTile, N, vec_ok);
  };
  load_tile<T, DP>(sQ, q, 0, d, i0, N, vec_ok);  // joins the first commit group below

  float dq[NTQ][4];  // dQ^T (16 queries x DP features), C layout
#pragma unroll
  for (int n = 0; n < NTQ; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;

  for (int kt = kt0; kt < kt1; ++kt) {
    const int j0 = kt * kTile;
    load_tile<T, DP>(sK, k, 0, d, j0, N, vec_ok);
    load_chunk(kt, 0, 0);
    cp_async_commit();

    float s[NTS][4], dp[NTS][4];
#pragma unroll
    for (int n = 0; n < NTS; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;

    for (int cc = 0; cc < ncc; ++cc) {
      int st = 0;
      if constexpr (ST == 2) {
        st = cc & 1;
        if (cc + 1 < ncc) load_chunk(kt, cc + 1, st ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        if (cc > 0) {
          load_chunk(kt, cc, 0);
          cp_async_commit();
        }
        cp_async_wait<0>();
      }
      __syncthreads();
      // S = Q^T K (once per key tile): A(i,t) = sQ[t][i], B(t,j) = sK[t][j]
      if (cc == 0) warp_mma<T, NTS, DP, false, false>(s, sQ + warp * 16, L, sK, L);
      // dP += dO^T V over this chunk: A(i,c) = sO[c][i], B(c,j) = sV[c][j]
      warp_mma<T, NTS, kCC, false, false>(dp, sO + st * kCC * L + warp * 16, L, sV + st * kCC * L, L);
      __syncthreads();  // buffer st is refilled two iterations on (one, if ST == 1)
    }

    // dS = P (dP - D), P = exp(S - lse); keys j >= N are masked to P = 0.
    T* sw = sS + (warp * 16 + g) * L + 2 * q4;
#pragma unroll
    for (int n = 0; n < NTS; ++n) {
      float ds[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const bool valid = j0 + 8 * n + 2 * q4 + (e & 1) < N;
        const float p = valid ? exp_shift<T>(s[n][e], lse_r[r]) : 0.f;
        ds[e] = p * (dp[n][e] - D_r[r]);
      }
      store2(sw + 8 * n, ds[0], ds[1]);
      store2(sw + 8 * L + 8 * n, ds[2], ds[3]);
    }
    __syncthreads();  // dK below reads all 64 rows of sS

    // dQ^T (16 x DP) += dS K^T: A(i,j) = sS[i][j] (k-contig), B(j,t) = sK[t][j] (k-contig)
    warp_mma<T, NTQ, kTile, true, true>(dq, sS + warp * 16 * L, L, sK, L);

    // dK (DP x 64) partial = Q dS over this CTA's 64 queries, in items of 16 features x 32 keys:
    // A(t,i) = sQ[t][i] (k-contig), B(i,j) = sS[i][j] (not k-contig). DP/8 items over 4 warps.
    for (int item = warp; item < DP / 8; item += kWarps) {
      const int mt = item >> 1, nh = item & 1;  // 16-feature block, 32-key half
      float a[4][4];
#pragma unroll
      for (int n = 0; n < 4; ++n) a[n][0] = a[n][1] = a[n][2] = a[n][3] = 0.f;
      warp_mma<T, 4, kTile, true, false>(a, sQ + mt * 16 * L, L, sS + nh * 32, L);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int t = mt * 16 + g + 8 * r;
        if (t >= d) continue;
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int j = j0 + nh * 32 + 8 * n + 2 * q4 + e;
            if (j < N) atomicAdd(dk_acc + (size_t)t * N + j, a[n][2 * r + e]);
          }
      }
    }
    __syncthreads();  // sK and sS are overwritten by the next key tile
  }

  // dQ of this CTA's key range into the fp32 accumulator (other key-splits add theirs).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = i0 + warp * 16 + g + 8 * r;
    if (i >= N) continue;
#pragma unroll
    for (int n = 0; n < NTQ; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int t = 8 * n + 2 * q4 + e;
        if (t < d) atomicAdd(dq_acc + (size_t)t * N + i, dq[n][2 * r + e]);
      }
  }
}

// ---- backward: dV ---------------------------------------------------------------------------
//
// CTA (kt, cs, b): keys j0..j0+63, channels c0..c0+127, loop over all query tiles.
// Warp w owns keys j0+16w..+15 (rows of S^T, P^T and dV^T).
// smem: sK [DP][ld] k[t][j] | sQ [ST][DP][ld] q[t][i] | sO [ST][128][ld] dO[c0+c][i]
//       | sP [64][ld] p[j][i] (warp-private rows) | then float sL [ST][64] lse[i]
template <typename T, int DP> struct DvSmem {
  static constexpr int ST = kStages<T>, L = kLd<T>;
  static constexpr int K = 0, Q = K + DP * L, O = Q + ST * DP * L, P = O + ST * kBC * L, end = P + kTile * L;
  static constexpr size_t lse_offset = sizeof(T) * (size_t)end;  // bytes, a multiple of 16
  static constexpr size_t bytes = lse_offset + sizeof(float) * ST * kTile;
};

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_dv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ dout,
                       const float* __restrict__ lse, T* __restrict__ dv, int d, int c, int N, bool vec_ok) {
  using SM = DvSmem<T, DP>;
  constexpr int ST = SM::ST, L = SM::L;
  constexpr int NTS = kTile / 8, NTV = kBC / 8;
  static_assert(SM::lse_offset % 16 == 0, "lse tile must stay 16-byte aligned");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  T* sK = smem + SM::K;
  T* sQ = smem + SM::Q;
  T* sO = smem + SM::O;
  T* sP = smem + SM::P;
  float* sL = reinterpret_cast<float*>(smem_raw + SM::lse_offset);

  const int b = blockIdx.z, j0 = blockIdx.x * kTile, c0 = blockIdx.y * kBC;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q4 = lane & 3;
  q += (size_t)b * d * N;
  k += (size_t)b * d * N;
  dout += (size_t)b * c * N;
  dv += (size_t)b * c * N;
  lse += (size_t)b * N;

  const int nqt = ceil_div(N, kTile);
  auto load_q = [&](int qt, int st) {
    load_tile<T, DP>(sQ + st * DP * L, q, 0, d, qt * kTile, N, vec_ok);
    load_tile<T, kBC>(sO + st * kBC * L, dout, c0, c, qt * kTile, N, vec_ok);
    if (threadIdx.x < kTile) {
      const int i = qt * kTile + threadIdx.x;
      sL[st * kTile + threadIdx.x] = i < N ? lse[i] : 0.f;
    }
  };
  load_tile<T, DP>(sK, k, 0, d, j0, N, vec_ok);
  if constexpr (ST == 2) load_q(0, 0);
  cp_async_commit();

  float acc[NTV][4];  // dV^T (16 keys x 128 channels), C layout
#pragma unroll
  for (int n = 0; n < NTV; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

  for (int qt = 0; qt < nqt; ++qt) {
    int st = 0;
    if constexpr (ST == 2) {
      st = qt & 1;
      if (qt + 1 < nqt) load_q(qt + 1, st ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      load_q(qt, 0);
      cp_async_commit();
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* sQs = sQ + st * DP * L;
    const T* sOs = sO + st * kBC * L;
    const float* sLs = sL + st * kTile;

    // S^T (16 keys x 64 queries) = K^T Q: A(j,t) = sK[t][j], B(t,i) = sQ[t][i] (both not k-contig)
    float s[NTS][4];
#pragma unroll
    for (int n = 0; n < NTS; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    warp_mma<T, NTS, DP, false, false>(s, sK + warp * 16, L, sQs, L);

    // P^T = exp(S^T - lse_i), queries i >= N masked to 0. Keys j >= N give junk rows that are
    // never stored.
    const int ib = qt * kTile;
    T* pw = sP + (warp * 16 + g) * L + 2 * q4;
#pragma unroll
    for (int n = 0; n < NTS; ++n) {
      float p[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ii = 8 * n + 2 * q4 + (e & 1);
        p[e] = ib + ii < N ? exp_shift<T>(s[n][e], sLs[ii]) : 0.f;
      }
      store2(pw + 8 * n, p[0], p[1]);
      store2(pw + 8 * L + 8 * n, p[2], p[3]);
    }
    __syncwarp();

    // dV^T (16 x 128) += P^T dO^T: A(j,i) = sP[j][i] (k-contig), B(i,c) = sO[c][i] (k-contig)
    warp_mma<T, NTV, kTile, true, true>(acc, sP + warp * 16 * L, L, sOs, L);
    __syncthreads();
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = j0 + warp * 16 + g + 8 * r;
    if (j >= N) continue;
#pragma unroll
    for (int n = 0; n < NTV; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int ch = c0 + 8 * n + 2 * q4 + e;
        if (ch < c) dv[(size_t)ch * N + j] = from_f<T>(acc[n][2 * r + e]);
      }
  }
}

// dq, dk (dtype T) = the fp32 accumulators.
template <typename T>
__global__ void attn_bwd_convert_kernel(const float* __restrict__ dq_acc, const float* __restrict__ dk_acc,
                                        T* __restrict__ dq, T* __restrict__ dk, size_t n) {
  for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += (size_t)gridDim.x * blockDim.x) {
    dq[idx] = from_f<T>(dq_acc[idx]);
    dk[idx] = from_f<T>(dk_acc[idx]);
  }
}

// ---- host side -------------------------------------------------------------------------------

// Why these sizes cannot run, or nullptr: the limits of the kernels' tiles, grids and int32 indexing.
const char* sizes_problem(int B, int d, int c, int N) {
  if (B < 1 || d < 1 || c < 1 || N < 1) return "B, d, c and N must be at least 1";
  if (d > 128) return "d > 128 (q and k tiles hold at most 128 features)";
  if (c > 1024) return "c > 1024";
  if (B > 65535) return "B > 65535 (the grid's z dimension)";
  if ((long long)B * (c > d ? c : d) * N > 2147483647LL) return "B * max(c, d) * N does not fit in int32";
  return nullptr;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

size_t round_up256(size_t x) { return (x + 255) & ~(size_t)255; }

// Workspace layout (fp32): [D: B N] [dq accumulator: B d N] [dk accumulator: B d N], each
// starting on a 256-byte boundary.
struct Workspace {
  size_t D, dq, dk, bytes;
  Workspace(int B, int d, int N) {
    const size_t bn = (size_t)B * N, bdn = (size_t)B * d * N;
    D = 0;
    dq = round_up256(bn * sizeof(float));
    dk = dq + round_up256(bdn * sizeof(float));
    bytes = dk + round_up256(bdn * sizeof(float));
  }
};

// ---- per-device facts and per-kernel launch attributes, queried once per device -----------------

constexpr int kMaxDevices = 64;

struct DeviceInfo {
  int id = -1, cc_major = 0, cc_minor = 0, sms = 0, smem_optin = 0;
};

// The current device's compute capability, SM count and per-block shared-memory limit (cached;
// a failed query is not cached, so it is asked again next time).
cudaError_t current_device(DeviceInfo* out) {
  static std::mutex mu;
  static DeviceInfo cache[kMaxDevices];
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 0 || dev >= kMaxDevices) return cudaErrorInvalidDevice;
  std::lock_guard<std::mutex> lock(mu);
  DeviceInfo& info = cache[dev];
  if (info.id < 0) {
    DeviceInfo q;
    if ((err = cudaDeviceGetAttribute(&q.cc_major, cudaDevAttrComputeCapabilityMajor, dev)) != cudaSuccess ||
        (err = cudaDeviceGetAttribute(&q.cc_minor, cudaDevAttrComputeCapabilityMinor, dev)) != cudaSuccess ||
        (err = cudaDeviceGetAttribute(&q.sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess ||
        (err = cudaDeviceGetAttribute(&q.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)) != cudaSuccess)
      return err;
    q.id = dev;
    info = q;
  }
  *out = info;
  return cudaSuccess;
}

// Once per kernel and device: raise the kernel's dynamic shared-memory limit to what it uses
// (needed above 48 KB) and ask how many of its blocks fit on one SM (-> *blocks_per_sm, if given).
template <auto Kernel>
cudaError_t prepare_kernel(const DeviceInfo& dev, size_t smem, int* blocks_per_sm = nullptr) {
  static std::mutex mu;
  static int blocks[kMaxDevices];  // 0 until prepared on that device
  std::lock_guard<std::mutex> lock(mu);
  if (blocks[dev.id] == 0) {
    cudaError_t err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return err;
    int n = 0;
    if ((err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, Kernel, kThreads, smem)) != cudaSuccess) return err;
    blocks[dev.id] = n > 0 ? n : 1;
  }
  if (blocks_per_sm) *blocks_per_sm = blocks[dev.id];
  return cudaSuccess;
}

// The largest dynamic shared memory of the forward, dq/dk and dV kernels that d selects.
template <typename T, int DP> size_t smem_needed() {
  const size_t f = FwdSmem<T, DP>::bytes, q = DqdkSmem<T, DP>::bytes, v = DvSmem<T, DP>::bytes;
  return f > q ? (f > v ? f : v) : (q > v ? q : v);
}
template <typename T> size_t smem_needed(int d) {
  return d <= 32 ? smem_needed<T, 32>() : d <= 64 ? smem_needed<T, 64>() : smem_needed<T, 128>();
}

template <typename T, int DP>
cudaError_t fwd_launch(const T* q, const T* k, const T* v, T* o, float* lse, int B, int d, int c, int N,
                       bool vec_ok, cudaStream_t stream) {
  constexpr auto kernel = attn_fwd_kernel<T, DP>;
  const size_t smem = FwdSmem<T, DP>::bytes;
  DeviceInfo dev;
  cudaError_t err = current_device(&dev);
  if (err != cudaSuccess || (err = prepare_kernel<kernel>(dev, smem)) != cudaSuccess) return err;
  const dim3 grid(ceil_div(N, kTile), ceil_div(c, kBC), B);
  kernel<<<grid, kThreads, smem, stream>>>(q, k, v, o, lse, d, c, N, vec_ok);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_typed(const void* q, const void* k, const void* v, void* o, float* lse, int B, int d, int c,
                      int N, cudaStream_t stream) {
  const T *q_ = static_cast<const T*>(q), *k_ = static_cast<const T*>(k), *v_ = static_cast<const T*>(v);
  T* o_ = static_cast<T*>(o);
  const bool vec_ok = N % (16 / (int)sizeof(T)) == 0 && aligned16(q) && aligned16(k) && aligned16(v);
  if (d <= 32) return fwd_launch<T, 32>(q_, k_, v_, o_, lse, B, d, c, N, vec_ok, stream);
  if (d <= 64) return fwd_launch<T, 64>(q_, k_, v_, o_, lse, B, d, c, N, vec_ok, stream);
  return fwd_launch<T, 128>(q_, k_, v_, o_, lse, B, d, c, N, vec_ok, stream);
}

template <typename T, int DP>
cudaError_t bwd_launch(const T* q, const T* k, const T* v, const T* o, const float* lse, const T* dout, T* dq,
                       T* dk, T* dv, char* ws, int B, int d, int c, int N, bool vec_ok, cudaStream_t stream) {
  DeviceInfo dev;
  cudaError_t err = current_device(&dev);
  if (err != cudaSuccess) return err;
  const Workspace w(B, d, N);
  float* D = reinterpret_cast<float*>(ws + w.D);
  float* dq_acc = reinterpret_cast<float*>(ws + w.dq);
  float* dk_acc = reinterpret_cast<float*>(ws + w.dk);
  const size_t bdn = (size_t)B * d * N;
  err = cudaMemsetAsync(ws + w.dq, 0, w.bytes - w.dq, stream);  // both accumulators
  if (err != cudaSuccess) return err;

  // 1. D = rowsum(dO * O)
  attn_bwd_dot_kernel<T><<<dim3(ceil_div(N, 256), B), 256, 0, stream>>>(o, dout, D, c, N);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  // 2. dQ, dK. Split the keys when (query tiles x B) alone would not fill the GPU.
  {
    constexpr auto kernel = attn_bwd_dqdk_kernel<T, DP>;
    const size_t smem = DqdkSmem<T, DP>::bytes;
    int per_sm = 0;
    if ((err = prepare_kernel<kernel>(dev, smem, &per_sm)) != cudaSuccess) return err;
    const int nqt = ceil_div(N, kTile), ntk = nqt;
    const long long ctas = (long long)nqt * B, want = (long long)dev.sms * per_sm;
    int splits = (int)((want + ctas - 1) / ctas);
    splits = splits < 1 ? 1 : (splits > ntk ? ntk : splits);
    const int kt_per = ceil_div(ntk, splits);
    splits = ceil_div(ntk, kt_per);  // no empty split
    kernel<<<dim3(nqt, splits, B), kThreads, smem, stream>>>(q, k, v, dout, lse, D, dq_acc, dk_acc, d, c, N,
                                                             kt_per, vec_ok);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }

  // 3. dV
  {
    constexpr auto kernel = attn_bwd_dv_kernel<T, DP>;
    const size_t smem = DvSmem<T, DP>::bytes;
    if ((err = prepare_kernel<kernel>(dev, smem)) != cudaSuccess) return err;
    kernel<<<dim3(ceil_div(N, kTile), ceil_div(c, kBC), B), kThreads, smem, stream>>>(q, k, dout, lse, dv, d, c,
                                                                                       N, vec_ok);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }

  // 4. dq, dk = accumulators cast to T
  const int blocks = (int)((bdn + 255) / 256 < 4096 ? (bdn + 255) / 256 : 4096);
  attn_bwd_convert_kernel<T><<<blocks, 256, 0, stream>>>(dq_acc, dk_acc, dq, dk, bdn);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_typed(const void* q, const void* k, const void* v, const void* o, const float* lse,
                      const void* dout, void* dq, void* dk, void* dv, void* ws, int B, int d, int c, int N,
                      cudaStream_t stream) {
  const T *q_ = static_cast<const T*>(q), *k_ = static_cast<const T*>(k), *v_ = static_cast<const T*>(v);
  const T *o_ = static_cast<const T*>(o), *do_ = static_cast<const T*>(dout);
  T *dq_ = static_cast<T*>(dq), *dk_ = static_cast<T*>(dk), *dv_ = static_cast<T*>(dv);
  char* w = static_cast<char*>(ws);
  // (o, dq, dk, dv are accessed element-wise; only the tiles read with cp.async need alignment)
  const bool vec_ok = N % (16 / (int)sizeof(T)) == 0 && aligned16(q) && aligned16(k) && aligned16(v) &&
                      aligned16(dout);
  if (d <= 32) return bwd_launch<T, 32>(q_, k_, v_, o_, lse, do_, dq_, dk_, dv_, w, B, d, c, N, vec_ok, stream);
  if (d <= 64) return bwd_launch<T, 64>(q_, k_, v_, o_, lse, do_, dq_, dk_, dv_, w, B, d, c, N, vec_ok, stream);
  return bwd_launch<T, 128>(q_, k_, v_, o_, lse, do_, dq_, dk_, dv_, w, B, d, c, N, vec_ok, stream);
}

}  // namespace

// ---- the C interface (attention_cuda.h) ------------------------------------------------------

extern "C" cudaError_t unit_attn_fwd(unit_attn_dtype dtype, const void* q, const void* k, const void* v, void* o,
                                     float* lse, int B, int d, int c, int N, cudaStream_t stream) {
  if (sizes_problem(B, d, c, N) || !q || !k || !v || !o || !lse) return cudaErrorInvalidValue;
  switch (dtype) {
    case UNIT_ATTN_F32: return fwd_typed<float>(q, k, v, o, lse, B, d, c, N, stream);
    case UNIT_ATTN_F16: return fwd_typed<__half>(q, k, v, o, lse, B, d, c, N, stream);
    case UNIT_ATTN_BF16: return fwd_typed<__nv_bfloat16>(q, k, v, o, lse, B, d, c, N, stream);
  }
  return cudaErrorInvalidValue;
}

extern "C" size_t unit_attn_bwd_workspace_bytes(unit_attn_dtype dtype, int B, int d, int c, int N) {
  (void)dtype;
  (void)c;
  if (sizes_problem(B, d, c, N)) return 0;
  return Workspace(B, d, N).bytes;
}

extern "C" cudaError_t unit_attn_bwd(unit_attn_dtype dtype, const void* q, const void* k, const void* v,
                                     const void* o, const float* lse, const void* grad_o, void* dq, void* dk,
                                     void* dv, void* workspace, int B, int d, int c, int N, cudaStream_t stream) {
  if (sizes_problem(B, d, c, N) || !q || !k || !v || !o || !lse || !grad_o || !dq || !dk || !dv || !workspace)
    return cudaErrorInvalidValue;
  if ((reinterpret_cast<uintptr_t>(workspace) & 255) != 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case UNIT_ATTN_F32: return bwd_typed<float>(q, k, v, o, lse, grad_o, dq, dk, dv, workspace, B, d, c, N, stream);
    case UNIT_ATTN_F16: return bwd_typed<__half>(q, k, v, o, lse, grad_o, dq, dk, dv, workspace, B, d, c, N, stream);
    case UNIT_ATTN_BF16:
      return bwd_typed<__nv_bfloat16>(q, k, v, o, lse, grad_o, dq, dk, dv, workspace, B, d, c, N, stream);
  }
  return cudaErrorInvalidValue;
}

extern "C" cudaError_t unit_attn_supported(unit_attn_dtype dtype, int B, int d, int c, int N, const char** why) {
  thread_local char buf[200];
  *why = sizes_problem(B, d, c, N);
  if (*why) return cudaSuccess;
  DeviceInfo dev;
  const cudaError_t err = current_device(&dev);
  if (err != cudaSuccess) return err;
  if (dev.cc_major < 8) {
    snprintf(buf, sizeof buf, "compute capability %d.%d: the kernels need 8.0 or newer (cp.async, bf16 mma.sync)",
             dev.cc_major, dev.cc_minor);
    *why = buf;
    return cudaSuccess;
  }
  size_t need = 0;
  switch (dtype) {
    case UNIT_ATTN_F32: need = smem_needed<float>(d); break;
    case UNIT_ATTN_F16: need = smem_needed<__half>(d); break;
    case UNIT_ATTN_BF16: need = smem_needed<__nv_bfloat16>(d); break;
    default: *why = "dtype is not float32, float16 or bfloat16"; return cudaSuccess;
  }
  if (need > (size_t)dev.smem_optin) {
    snprintf(buf, sizeof buf, "at d = %d this dtype needs %zu KB of shared memory per block; this GPU allows %d KB",
             d, need / 1024, dev.smem_optin / 1024);
    *why = buf;
  }
  return cudaSuccess;
}
