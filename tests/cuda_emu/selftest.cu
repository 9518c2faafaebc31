// Small kernels that test the CUDA emulator itself (tests/test_cuda_emu.py): each detector on a
// kernel with one known bug and on its correct twin, and ldmatrix + mma.sync on a textbook
// 16x16x16 product checked against a float64 matmul. Emulator-only: ldsm_x4, mma16816 and
// cp_async16 are emu.h's replacements for attention.cu's PTX wrappers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace {

__global__ void race_kernel(float* out, int sync) {  // 128 threads: each reads its neighbour warp's slot
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  const int t = threadIdx.x;
  s[t] = (float)t;
  if (sync) __syncthreads();
  out[t] = s[(t + 32) % 128];
}

__global__ void syncwarp_kernel(float* out, int sync) {  // 32 threads: each reads its lane neighbour
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  const int t = threadIdx.x;
  s[t] = (float)t;
  if (sync) __syncwarp();
  out[t] = s[t ^ 1];
}

// 8 threads copy 8 x 16 bytes; mode 0: wait_group 0, 1: no wait at all, 2: wait_group 1 with the
// copy in the newest group (too weak), 3: as 0 with src-size 8 (the upper 8 bytes zero-filled)
__global__ void cp_async_kernel(float* out, const float* in, int mode) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  const int t = threadIdx.x;
  if (t < 8) cp_async16(s + 4 * t, in + 4 * t, mode == 3 ? 8 : 16);
  cp_async_commit();
  if (mode == 0 || mode == 3) cp_async_wait<0>();
  if (mode == 2) cp_async_wait<1>();
  __syncthreads();
  out[t] = s[t];
}

__global__ void read_kernel(float* out, const float* in, int offset) {  // out[t] = in[t + offset]
  out[threadIdx.x] = in[threadIdx.x + offset];
}

__global__ void float2_kernel(float* out, const float* in, int offset) {  // an 8-byte load at in + offset
  const float2 v = *reinterpret_cast<const float2*>(in + offset + 2 * threadIdx.x);
  out[threadIdx.x] = v.x + v.y;
}

__global__ void add_kernel(float* out, int atomic) {  // every block adds 1 to out[0]
  if (threadIdx.x == 0) {
    if (atomic) atomicAdd(out, 1.f);
    else out[0] += 1.f;
  }
}

__global__ void smem_kernel(float* out) {  // touches the last float of its dynamic shared memory
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  s[64 * 1024 / 4 - 1 - threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = s[64 * 1024 / 4 - 1 - threadIdx.x];
}

__global__ void divergent_kernel(float* out) {  // lanes 0..15 shuffle while 16..31 wait at a barrier
  float v = (float)threadIdx.x;
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  else __syncthreads();
  out[threadIdx.x] = v;
}

// D (16x16 f32, row-major) = A (16x16, row-major) B (16x16, k x n), one warp, the textbook way:
// A with ldmatrix.x4 from row-major smem; B either stored n-major (B^T rows, ldmatrix without
// .trans) or k-major (B rows, ldmatrix.trans); two mma.m16n8k16 for the two 8-column halves.
template <typename T> __global__ void mma_kernel(float* d, const T* a, const T* b, int trans) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sa = reinterpret_cast<T*>(smem_raw);  // [16][16]
  T* sb = sa + 256;                        // [16][16]: B^T[n][k] (trans = 0) or B[k][n] (trans = 1)
  const int l = threadIdx.x;
  for (int i = l; i < 256; i += 32) {
    sa[i] = a[i];
    sb[i] = trans ? b[i] : b[(i % 16) * 16 + i / 16];
  }
  __syncwarp();
  uint32_t ra[4], rb[4];
  // matrices 0..3 of A: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
  ldsm_x4(ra, sa + (l % 8 + 8 * ((l / 8) % 2)) * 16 + 8 * (l / 16));
  if (!trans)  // matrices of B^T: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
    ldsm_x4(rb, sb + (l % 8 + 8 * (l / 16)) * 16 + 8 * ((l / 8) % 2));
  else  // matrices of B (k rows): (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
    ldsm_x4_t(rb, sb + (l % 8 + 8 * ((l / 8) % 2)) * 16 + 8 * (l / 16));
  float c0[4] = {0, 0, 0, 0}, c1[4] = {0, 0, 0, 0};
  mma16816<T>(c0, ra, rb[0], rb[1]);
  mma16816<T>(c1, ra, rb[2], rb[3]);
  const int g = l / 4, q = l % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * q + (i % 2);
    d[row * 16 + col] = c0[i];
    d[row * 16 + col + 8] = c1[i];
  }
}

// h[i], b[i] = in[i] rounded to fp16 / bf16; back[i], back[n + i] = h[i], b[i] as float (the
// conversions of cuda_fp16.h and cuda_bf16.h as the emulator implements them)
__global__ void convert_kernel(const float* in, __half* h, __nv_bfloat16* b, float* back, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    h[i] = __float2half_rn(in[i]);
    b[i] = __float2bfloat16_rn(in[i]);
    back[i] = __half2float(h[i]);
    back[n + i] = __bfloat162float(b[i]);
  }
}

int done() { return (int)cudaGetLastError(); }

}  // namespace

extern "C" {
int st_race(float* out, int sync) {
  race_kernel<<<1, 128, 512>>>(out, sync);
  return done();
}
int st_syncwarp(float* out, int sync) {
  syncwarp_kernel<<<1, 32, 128>>>(out, sync);
  return done();
}
int st_cp_async(float* out, const float* in, int mode) {
  cp_async_kernel<<<1, 32, 128>>>(out, in, mode);
  return done();
}
int st_read(float* out, const float* in, int threads, int offset) {
  read_kernel<<<1, threads>>>(out, in, offset);
  return done();
}
int st_float2(float* out, const float* in, int offset) {
  float2_kernel<<<1, 32>>>(out, in, offset);
  return done();
}
int st_add(float* out, int blocks, int atomic) {
  add_kernel<<<blocks, 32>>>(out, atomic);
  return done();
}
int st_smem(float* out, int set_attribute) {
  if (set_attribute) {
    const cudaError_t err = cudaFuncSetAttribute(smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
    if (err != cudaSuccess) return (int)err;
  }
  smem_kernel<<<1, 32, 64 * 1024>>>(out);
  return done();
}
int st_divergent(float* out) {
  divergent_kernel<<<1, 32>>>(out);
  return done();
}
int st_convert(const float* in, void* h, void* b, float* back, int n) {
  convert_kernel<<<(n + 127) / 128, 128>>>(in, (__half*)h, (__nv_bfloat16*)b, back, n);
  return done();
}
int st_mma(float* d, const void* a, const void* b, int trans, int bf16) {
  if (bf16)
    mma_kernel<__nv_bfloat16><<<1, 32, 1024>>>(d, (const __nv_bfloat16*)a, (const __nv_bfloat16*)b, trans);
  else
    mma_kernel<__half><<<1, 32, 1024>>>(d, (const __half*)a, (const __half*)b, trans);
  return done();
}
}
