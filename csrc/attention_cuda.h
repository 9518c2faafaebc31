// Plain C interface between csrc/attention.cpp (torch side) and csrc/attention.cu (kernels).
// This header must not include any torch header: attention.cu is compiled on its own by nvcc
// (CI checks that for sm_80 and sm_90 on a machine without a GPU).
//
// Op: o = v . softmax_keys(q^T k), no scale.
//   q, k: (B, d, N)  v, o, grad_o: (B, c, N)  lse: (B, N) float32   all contiguous, same device.
//   o[b, :, i] = sum_j softmax_j(s_ij) v[b, :, j],  s_ij = sum_t q[b, t, i] k[b, t, j]
//   lse[b, i] = log sum_j exp(s_ij)   (natural log, saved by forward for the backward)
// q, k, v, o, grad_o, dq, dk, dv share one dtype; accumulation is float32.
// Limits: 1 <= d <= 128, 1 <= c <= 1024, N >= 1, B >= 1.
// The caller has set the current device (device guard) and passes the current stream.
// Launchers return cudaSuccess or the first CUDA error (cudaErrorInvalidValue for bad sizes).
// Per-device attributes and each kernel's shared-memory attribute and occupancy are set/queried once
// per device (the first launch there), not on every call.
#pragma once
#include <cuda_runtime.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { UNIT_ATTN_F32 = 0, UNIT_ATTN_F16 = 1, UNIT_ATTN_BF16 = 2 } unit_attn_dtype;

// forward: writes o (B, c, N) and lse (B, N).
cudaError_t unit_attn_fwd(unit_attn_dtype dtype, const void* q, const void* k, const void* v,
                          void* o, float* lse, int B, int d, int c, int N, cudaStream_t stream);

// Bytes of scratch the backward needs (float32 buffers such as rowsum(grad_o * o) and
// dq/dk/dv accumulators). The caller allocates at least this many bytes, 256-byte aligned;
// the launcher initialises it itself (on `stream`).
size_t unit_attn_bwd_workspace_bytes(unit_attn_dtype dtype, int B, int d, int c, int N);

// backward: writes dq (B, d, N), dk (B, d, N), dv (B, c, N) (overwritten, not accumulated).
cudaError_t unit_attn_bwd(unit_attn_dtype dtype, const void* q, const void* k, const void* v,
                          const void* o, const float* lse, const void* grad_o,
                          void* dq, void* dk, void* dv, void* workspace,
                          int B, int d, int c, int N, cudaStream_t stream);

// Whether the kernels can run these sizes on the current device: *why = nullptr if they can, else
// a sentence saying why not (sizes beyond the limits above, compute capability below 8.0, or more
// shared memory per block than the device allows, e.g. fp32 at d > 32 on sm_86/sm_89). The
// device's attributes are queried once and cached.
cudaError_t unit_attn_supported(unit_attn_dtype dtype, int B, int d, int c, int N, const char** why);

#ifdef __cplusplus
}
#endif
