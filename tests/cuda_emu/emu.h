// A CUDA emulation layer that runs csrc/attention.cu on the CPU, strictly. Test code only.
//
// csrc/attention.cu is compiled by the host C++ compiler with this folder first on the include
// path (so <cuda_runtime.h>, <cuda_fp16.h>, <cuda_bf16.h> are the files here, which all include
// this one) and -DUNIT_CUDA_EMU (which drops its inline-PTX wrappers; the replacements are at the
// end of this file). `kernel<<<grid, block, smem, stream>>>(args)` is rewritten to
// `emu::launch(kernel, "kernel", line, grid, block, smem, stream)(args)` by tests/cuda_emu/build.py: that is the
// only change to the source. The kernel TU is compiled with -fsanitize=thread but linked WITHOUT
// the ThreadSanitizer runtime: the compiler then calls __tsan_read4(addr), __tsan_write2(addr),
// ... before every memory access of the kernel code, and emu.cpp implements those callbacks
// (the trick the Linux kernel's KCSAN uses). That is how every plain global and shared access is
// bounds-, alignment-, race- and initialisation-checked without touching the kernel source.
//
// Execution model (emu.cpp): each CUDA thread is a fiber (own stack, cooperative switches); the
// blocks of a launch run one after another; __syncthreads is a block barrier, warp collectives
// (shuffles, ldmatrix, mma, __syncwarp) wait for all 32 lanes. Whatever the emulator finds wrong
// aborts the launch with one message (kernel, block, thread, address) that the test prints.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

// ---- language keywords ---------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// dynamic shared memory: `extern __shared__ unsigned char smem_raw[];` names the per-OS-thread
// array defined below (the emulator's shared memory; the launch's dynamic size bounds it)
#define __shared__ __thread

constexpr size_t kEmuSmemCapacity = 232448;  // 227 KB, the largest block allowance (sm_90)
#ifndef EMU_RUNTIME
namespace {
alignas(128) __thread unsigned char smem_raw[kEmuSmemCapacity];
}
#endif

// ---- vector and index types ----------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

extern "C" void emu_check_align(const void* p, size_t align, const char* what);

// float2 / half2 / bfloat162: the copy operations check the alignment a GPU needs for the one
// 8- or 4-byte access they are on the device (the compiler splits struct copies into members,
// so the access size alone would not show a misaligned vector access).
struct alignas(8) float2 {
  float x, y;
  float2() = default;
  float2(float a, float b) : x(a), y(b) {}
  float2(const float2& o) : x(0), y(0) { emu_check_align(&o, 8, "float2 load"); x = o.x; y = o.y; }
  float2& operator=(const float2& o) {
    emu_check_align(this, 8, "float2 store");
    x = o.x;
    y = o.y;
    return *this;
  }
};
inline float2 make_float2(float a, float b) { return float2(a, b); }

// ---- 16-bit floating point, rounding as the hardware does -----------------------------------
inline uint32_t emu_f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
inline float emu_u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

struct __half {
  uint16_t __x;
};
struct __nv_bfloat16 {
  uint16_t __x;
};
template <typename H> struct alignas(4) emu_pair {
  H x, y;
  emu_pair() = default;
  emu_pair(H a, H b) : x(a), y(b) {}
  emu_pair(const emu_pair& o) : x(), y() { emu_check_align(&o, 4, "half2 load"); x = o.x; y = o.y; }
  emu_pair& operator=(const emu_pair& o) {
    emu_check_align(this, 4, "half2 store");
    x = o.x;
    y = o.y;
    return *this;
  }
};
typedef emu_pair<__half> __half2;
typedef emu_pair<__nv_bfloat16> __nv_bfloat162;

// IEEE binary16 from binary32, round to nearest even; overflow to inf, subnormals, NaN kept.
inline __half __float2half_rn(float f) {
  const uint32_t u = emu_f2u(f), sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  uint16_t h;
  if (a >= 0x7f800000u) {
    h = (uint16_t)(sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u));
  } else if (a >= 0x477ff000u) {  // >= 65520: rounds to inf
    h = (uint16_t)(sign | 0x7c00u);
  } else if (a >= 0x38800000u) {  // normal half (|f| >= 2^-14)
    const uint32_t mant = a & 0x7fffffu, exp = (a >> 23) - 127 + 15;
    uint32_t r = (exp << 10) | (mant >> 13);
    const uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
    h = (uint16_t)(sign | r);
  } else if (a < 0x33000000u) {  // < 2^-25: rounds to zero
    h = (uint16_t)sign;
  } else {  // subnormal half: value = m * 2^-24
    const uint32_t e = a >> 23, mant = (a & 0x7fffffu) | 0x800000u;
    const int shift = 126 - (int)e;  // 2^(e-127) * mant/2^23 = (mant >> (shift)) * 2^-24 ...
    const uint32_t r0 = mant >> shift, rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
    uint32_t r = r0;
    if (rem > half || (rem == half && (r & 1u))) ++r;
    h = (uint16_t)(sign | r);
  }
  return __half{h};
}
inline float __half2float(__half h) {
  const uint32_t sign = (uint32_t)(h.__x & 0x8000u) << 16, exp = (h.__x >> 10) & 0x1fu, mant = h.__x & 0x3ffu;
  if (exp == 0x1f) return emu_u2f(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    const float v = (float)mant * 5.9604644775390625e-08f;  // mant * 2^-24, exact
    return sign ? -v : v;
  }
  return emu_u2f(sign | ((exp - 15 + 127) << 23) | (mant << 13));
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = emu_f2u(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40u)};  // quiet NaN
  const uint32_t r = u + 0x7fffu + ((u >> 16) & 1u);  // round to nearest even (overflows to inf)
  return __nv_bfloat16{(uint16_t)(r >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 b) { return emu_u2f((uint32_t)b.__x << 16); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2(__float2half_rn(a), __float2half_rn(b)); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162(__float2bfloat16_rn(a), __float2bfloat16_rn(b));
}

// device min/max on ints (CUDA's math API has them as plain functions)
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// ---- the runtime API subset the kernels use -------------------------------------------------
typedef struct emu_stream* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorNoKernelImageForDevice = 209,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

extern "C" {
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t stream);
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
const char* cudaGetErrorString(cudaError_t err);
cudaError_t emu_func_set_attribute(const void* fn, cudaFuncAttribute attr, int value);
cudaError_t emu_occupancy(int* blocks, const void* fn, int block_threads, size_t dyn_smem);
}
template <class T> cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return emu_func_set_attribute(reinterpret_cast<const void*>(entry), attr, value);
}
template <class T>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, T func, int block_threads, size_t smem) {
  return emu_occupancy(blocks, reinterpret_cast<const void*>(func), block_threads, smem);
}

// ---- per-thread state, barriers, warp collectives (emu.cpp) ---------------------------------
extern "C" {
uint3 emu_thread_idx(void);
uint3 emu_block_idx(void);
dim3 emu_block_dim(void);
dim3 emu_grid_dim(void);
void __syncthreads(void);
void emu_syncwarp(unsigned mask);
float emu_shfl_xor_f32(unsigned mask, float v, int lane_mask, int width);
float atomicAdd(float* address, float value);
void emu_cp_async16(void* dst, const void* src, int src_bytes);
void emu_cp_async_commit(void);
void emu_cp_async_wait(int n);
void emu_ldmatrix_x4(uint32_t* r, const void* p, int trans);
void emu_mma_m16n8k16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1, int bf16);
}
#define threadIdx (emu_thread_idx())
#define blockIdx (emu_block_idx())
#define blockDim (emu_block_dim())
#define gridDim (emu_grid_dim())
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu_syncwarp(mask); }
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = 32) {
  return emu_shfl_xor_f32(mask, v, lane_mask, width);
}

// ---- replacements for attention.cu's inline-PTX wrappers (guarded out by UNIT_CUDA_EMU) ------
inline void cp_async16(void* dst, const void* src, int src_bytes) { emu_cp_async16(dst, src, src_bytes); }
inline void cp_async_commit() { emu_cp_async_commit(); }
template <int n> inline void cp_async_wait() { emu_cp_async_wait(n); }
inline void ldsm_x4(uint32_t (&r)[4], const void* p) { emu_ldmatrix_x4(r, p, 0); }
inline void ldsm_x4_t(uint32_t (&r)[4], const void* p) { emu_ldmatrix_x4(r, p, 1); }
template <typename T>
inline void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "mma: f16 or bf16");
  emu_mma_m16n8k16(c, a, b0, b1, std::is_same<T, __nv_bfloat16>::value ? 1 : 0);
}

// ---- kernel launches: emu::launch(kernel, "kernel", __LINE__, grid, block, smem, stream)(args...) --
extern "C" void emu_run_launch(const void* fn, const char* name, int line, dim3 grid, dim3 block, size_t smem,
                               cudaStream_t stream, void (*thread_main)(void*), void* ctx, void* smem_base,
                               size_t smem_capacity);

#ifndef EMU_RUNTIME
namespace emu {
template <typename... P> struct Launch {
  void (*fn)(P...);
  const char* name;
  int line;
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  std::tuple<std::decay_t<P>...> args;

  // runs in each fiber: a fresh copy of the parameters (kernels may modify them), then the kernel
  static void thread_main(void* self) {
    auto a = static_cast<Launch*>(self)->args;
    std::apply(static_cast<Launch*>(self)->fn, a);
  }
  template <typename... A> void operator()(A&&... a) {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    args = std::tuple<std::decay_t<P>...>(std::forward<A>(a)...);
    emu_run_launch(reinterpret_cast<const void*>(fn), name, line, grid, block, smem, stream, &Launch::thread_main,
                   this, smem_raw, sizeof(smem_raw));
  }
};
// name: the launched expression as written, line: where (both filled in by build.py's rewrite)
template <typename... P>
Launch<P...> launch(void (*fn)(P...), const char* name, int line, dim3 grid, dim3 block, size_t smem = 0,
                    cudaStream_t stream = nullptr) {
  return Launch<P...>{fn, name, line, grid, block, smem, stream, {}};
}
}  // namespace emu
#endif  // EMU_RUNTIME
