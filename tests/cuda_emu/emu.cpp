// The CUDA emulator's runtime (see emu.h for the model). Compiled WITHOUT instrumentation.
//
// What it checks, and where a GPU would be less forgiving than a CPU:
// - shared memory is filled with NaN (0xFF bytes) at every block start;
// - cp.async: a copy is poisoned (NaN) at issue and lands only at the cp.async.wait_group of its
//   own thread that covers its commit group; src-size < 16 zero-fills; 16-byte alignment;
// - a shared-memory race detector, per 2-byte granule: the last writer (thread, barrier epoch,
//   warp epoch) and the readers of the current epoch; an access by another thread that no
//   __syncthreads (or, inside one warp, __syncwarp) orders after the conflicting one is an error;
// - global memory: every access must fall inside a live allocation made through emu_malloc
//   (fresh allocations are NaN and "uninitialised": reading a byte nothing wrote is an error);
//   conflicting plain accesses from two blocks of one launch, or plain and atomic ones, are an
//   error (e.g. a read-modify-write that should have been an atomicAdd);
// - natural alignment of every access (2/4/8/16 bytes), float2/half2 vector accesses included;
// - warp collectives need all 32 lanes, alive and at the same kind of operation;
// - launch limits: grid (2^31-1, 65535, 65535), 1024 threads, dynamic shared memory over 48 KB
//   only after cudaFuncSetAttribute raised the kernel's limit, never over the device's opt-in;
// - deadlock (threads waiting at different barriers) and stack overflow (guard pages).
// The first error aborts the launch; emu_error() returns its message; the error is sticky until
// emu_reset(), as a CUDA context's is.

#define EMU_RUNTIME
#include "emu.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <string>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------
// the emulated device (an H100 SXM by default; emu_configure changes it)

struct Device {
  int sms = 132, cc_major = 9, cc_minor = 0;
  int smem_block_default = 48 * 1024, smem_block_optin = 227 * 1024, smem_sm = 228 * 1024;
  int max_threads_sm = 2048, max_blocks_sm = 32, regs_sm = 65536, regs_per_thread = 168;
};
constexpr int kDevices = 8;
Device g_devices[kDevices];  // emu_configure sets them up; cudaGetDevice answers g_current
int g_current = 0;
Device& cur_dev() { return g_devices[g_current]; }

struct Stats {
  long launches = 0, blocks = 0, set_attribute = 0, occupancy = 0, device_attribute = 0, get_device = 0,
       memsets = 0, shared_accesses = 0, global_accesses = 0, collectives = 0;
} g_stats;

std::string g_error;                 // first error message of the sticky error
cudaError_t g_sticky = cudaSuccess;  // a device fault: every later call returns it
cudaError_t g_last = cudaSuccess;    // cudaGetLastError
cudaStream_t g_expect_stream = nullptr;
bool g_check_stream = false;
// (kernel, device) -> cudaFuncAttributeMaxDynamicSharedMemorySize; like a CUDA context, it
// outlives errors and emu_reset()
std::map<std::pair<const void*, int>, int> g_smem_limit;

// ---------------------------------------------------------------------------------------------
// device allocations (emu_malloc) and their shadow state

constexpr int kMulti = -2;  // "more than one block"

struct GShadow {  // per 2-byte granule of a global allocation
  uint32_t w_launch = 0, w_epoch = 0, r_launch = 0, r_epoch = 0;
  int32_t w_block = -1, r_block = -1;
  uint16_t w_tid = 0, r_tid = 0;
  uint8_t w_atomic = 0, init = 0;
};

struct Buffer {
  uintptr_t base = 0;
  size_t size = 0;
  char* raw = nullptr;
  std::string name;
  std::vector<GShadow> shadow;
};
std::vector<Buffer*> g_buffers;
constexpr size_t kRedZone = 4096;

Buffer* g_last_hit = nullptr;  // find_buffer's one-entry cache (cleared by emu_free)
Buffer* find_buffer(uintptr_t a) {
  if (g_last_hit && a - g_last_hit->base < g_last_hit->size) return g_last_hit;
  for (Buffer* b : g_buffers)
    if (a - b->base < b->size) return g_last_hit = b;
  return nullptr;
}
// the allocation whose red zone (or end) a stray address is closest to, for messages
std::string describe_global(uintptr_t a) {
  char buf[256];
  for (Buffer* b : g_buffers) {
    if (a - b->base < b->size) {
      snprintf(buf, sizeof buf, "%s + %zu bytes (of %zu)", b->name.c_str(), (size_t)(a - b->base), b->size);
      return buf;
    }
    if (a >= b->base - kRedZone && a < b->base + b->size + kRedZone) {
      const long off = (long)(a - b->base);
      snprintf(buf, sizeof buf, "%ld bytes %s %s (size %zu)", off < 0 ? -off : off - (long)b->size,
               off < 0 ? "before" : "past the end of", b->name.c_str(), b->size);
      return buf;
    }
  }
  snprintf(buf, sizeof buf, "address %p, in no device allocation", (void*)a);
  return buf;
}

// ---------------------------------------------------------------------------------------------
// fibers

extern "C" void emu_swap(void** save_sp, void* next_sp);
#if defined(__x86_64__)
// Save the callee-saved registers, MXCSR and the x87 control word on the current stack, store
// the stack pointer in *save_sp, switch to next_sp and restore the same from there.
asm(R"(
.text
.globl emu_swap
.type emu_swap,@function
emu_swap:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size emu_swap,.-emu_swap
.section .note.GNU-stack,"",@progbits
.text
)");
#else
#error "tests/cuda_emu: the fiber switch is written for x86-64 only"
#endif

enum State : uint8_t { kRunnable, kWaitBarrier, kWaitWarp, kDone };

struct CpAsync {
  unsigned char* dst;
  unsigned char data[16];
};

struct Fiber {
  void* sp = nullptr;
  char* stack = nullptr;  // usable range [stack, stack + kStack)
  uint3 idx{};
  int tid = 0, warp = 0, lane = 0;
  State state = kRunnable;
  std::vector<CpAsync> open;                // issued, not yet committed
  std::vector<std::vector<CpAsync>> groups;  // committed, not yet landed (oldest first)
};
constexpr size_t kStack = 256 * 1024;

enum Op : int { kOpNone, kOpShfl, kOpLdmatrix, kOpMma, kOpSyncwarp };
const char* op_name(int op) {
  switch (op) {
    case kOpShfl: return "__shfl_xor_sync";
    case kOpLdmatrix: return "ldmatrix";
    case kOpMma: return "mma.sync";
    case kOpSyncwarp: return "__syncwarp";
  }
  return "?";
}

struct Warp {
  int arrived = 0, op = kOpNone, lanes = 0;
  uint32_t in[32][6];    // per lane: the operands it brought
  const void* addr[32];  // ldmatrix row addresses
  uint32_t out[32][4];   // per lane: its results
  unsigned mask[32];
  int param[32];
};

struct SShadow {  // per 2-byte granule of shared memory
  uint32_t serial = 0;  // block serial: entries of earlier blocks are stale
  uint32_t w_epoch = 0, w_wepoch = 0, r_epoch = 0, r_wepoch = 0;
  uint32_t r_warps = 0;
  uint16_t w_tid = 0, r_tid = 0;
  uint8_t w_valid = 0, r_multi = 0;
};

struct Launch {
  const void* fn;
  std::string name;
  dim3 grid, block;
  size_t smem;
  void (*thread_main)(void*);
  void* ctx;
  uint32_t id;
};

struct Block {
  Launch* launch = nullptr;
  uint3 idx{};
  int linear = 0, nthreads = 0, alive = 0, bar_arrived = 0;
  uint32_t serial = 0, epoch = 0;
  uint32_t wepoch[32] = {};
  Warp warps[32];
  unsigned char* smem = nullptr;  // the kernel TU's smem_raw
  size_t smem_size = 0;
};

// the emulation runs on the OS thread that calls the API (no parallel blocks)
std::vector<Fiber> g_fibers;
char* g_stacks = nullptr;
size_t g_stack_count = 0;
void* g_sched_sp = nullptr;
Fiber* g_cur = nullptr;  // the running fiber, or null while host code runs
Block g_blk;
bool g_abort = false;
std::vector<SShadow> g_sshadow(kEmuSmemCapacity / 2);
uint32_t g_block_serial = 0, g_launch_id = 0;
uintptr_t g_host_stack_lo = 0, g_host_stack_hi = 0;

void host_stack_bounds() {
  if (g_host_stack_hi) return;
  pthread_attr_t attr;
  void* addr;
  size_t size;
  pthread_getattr_np(pthread_self(), &attr);
  pthread_attr_getstack(&attr, &addr, &size);
  pthread_attr_destroy(&attr);
  g_host_stack_lo = (uintptr_t)addr;
  g_host_stack_hi = (uintptr_t)addr + size;
}

// ---------------------------------------------------------------------------------------------
// errors

std::string where() {
  if (!g_cur) return "host code";
  char buf[512];
  snprintf(buf, sizeof buf, "%s, block (%u, %u, %u), thread %d (warp %d, lane %d)", g_blk.launch->name.c_str(),
           g_blk.idx.x, g_blk.idx.y, g_blk.idx.z, g_cur->tid, g_cur->warp, g_cur->lane);
  return buf;
}

void yield_to_scheduler();

// A device-side fault aborts the launch (control goes back to the scheduler, never to the
// faulting fiber); on the host it only records the error.
[[gnu::format(printf, 2, 3)]] void fail(cudaError_t code, const char* fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (g_sticky == cudaSuccess) {
    g_sticky = code;
    g_error = where() + ": " + msg;
  }
  if (g_cur) {
    g_abort = true;
    yield_to_scheduler();
    abort();  // not reached: an aborted fiber is never resumed
  }
}

// ---------------------------------------------------------------------------------------------
// shared memory: bounds, alignment, races

const char* rw(bool write) { return write ? "write" : "read"; }

void check_align(uintptr_t a, size_t size, const char* space) {
  if (size > 1 && a % size != 0)
    fail(cudaErrorMisalignedAddress, "misaligned %zu-byte %s access at %s %p", size, space, space, (void*)a);
}

void shared_access(uintptr_t a, size_t size, bool write, const Fiber& f) {
  ++g_stats.shared_accesses;
  const size_t off = a - (uintptr_t)g_blk.smem;
  if (off + size > g_blk.smem_size || off >= g_blk.smem_size)
    fail(cudaErrorIllegalAddress, "shared memory %s of %zu bytes at offset %zu, beyond the %zu bytes of dynamic "
         "shared memory of this launch", rw(write), size, off, g_blk.smem_size);
  check_align(a, size, "shared");
  const uint32_t E = g_blk.epoch, W = g_blk.wepoch[f.warp];
  for (size_t g = off / 2; g < (off + size + 1) / 2; ++g) {
    SShadow& s = g_sshadow[g];
    if (s.serial != g_blk.serial) {
      s = SShadow();
      s.serial = g_blk.serial;
    }
    // the last write, if any, must be ordered before this access (any access conflicts with it)
    if (s.w_valid && s.w_epoch == E && s.w_tid != f.tid &&
        ((s.w_tid / 32) != f.warp || s.w_wepoch == W))
      fail(cudaErrorLaunchFailure, "shared-memory race: %s of offset %zu by thread %d and an earlier write by "
           "thread %d with no __syncthreads%s between them", rw(write), g * 2, f.tid, s.w_tid,
           (s.w_tid / 32) == f.warp ? " or __syncwarp" : "");
    if (write) {
      // the reads of this epoch must all be ordered before the write
      if (s.r_epoch == E && s.r_warps) {
        const bool other_warp = (s.r_warps & ~(1u << f.warp)) != 0;
        const bool other_lane = s.r_multi || s.r_tid != f.tid;
        if (other_warp || (other_lane && s.r_wepoch == W))
          fail(cudaErrorLaunchFailure, "shared-memory race: write of offset %zu by thread %d after a read by "
               "thread %d%s with no __syncthreads%s between them", g * 2, f.tid, s.r_tid,
               s.r_multi ? " (and others)" : "", other_warp ? "" : " or __syncwarp");
      }
      s.w_valid = 1;
      s.w_epoch = E;
      s.w_wepoch = W;
      s.w_tid = (uint16_t)f.tid;
      s.r_warps = 0;
      s.r_multi = 0;
    } else {
      if (s.r_epoch != E || !s.r_warps) {
        s.r_epoch = E;
        s.r_warps = 1u << f.warp;
        s.r_tid = (uint16_t)f.tid;
        s.r_multi = 0;
        s.r_wepoch = W;
      } else {
        s.r_warps |= 1u << f.warp;
        if (s.r_tid != f.tid) s.r_multi = 1;
        s.r_wepoch = std::max(s.r_wepoch, W);
      }
    }
  }
}

bool in_shared(uintptr_t a) { return g_blk.smem && a - (uintptr_t)g_blk.smem < kEmuSmemCapacity; }

// ---------------------------------------------------------------------------------------------
// global memory: bounds, initialisation, races between blocks of one launch

enum Kind { kRead, kWrite, kAtomic };

void global_access(uintptr_t a, size_t size, Kind kind, const Fiber& f) {
  ++g_stats.global_accesses;
  Buffer* b = find_buffer(a);
  if (!b || a + size > b->base + b->size)
    fail(cudaErrorIllegalAddress, "global %s of %zu bytes at %s", kind == kRead ? "read" : kind == kWrite ? "write"
         : "atomicAdd", size, describe_global(a).c_str());
  check_align(a, size, "global");
  const uint32_t L = g_blk.launch->id, E = g_blk.epoch;
  const int B = g_blk.linear;
  const char* what = kind == kRead ? "read" : kind == kWrite ? "write" : "atomicAdd";
  for (size_t g = (a - b->base) / 2; g < (a - b->base + size + 1) / 2; ++g) {
    GShadow& s = b->shadow[g];
    auto at = [&] { return describe_global(b->base + 2 * g); };  // only formatted on failure
    if (kind != kWrite && !s.init)
      fail(cudaErrorIllegalAddress, "%s of uninitialised device memory (nothing wrote it): %s", what, at().c_str());
    // a write of this launch: from another block it is never ordered; in this block, a barrier must separate
    if (s.w_launch == L) {
      const bool same_block_ordered = s.w_block == B && (s.w_tid == f.tid || s.w_epoch < E);
      const bool both_atomic = kind == kAtomic && s.w_atomic;
      if (!same_block_ordered && !both_atomic)
        fail(cudaErrorLaunchFailure, "global-memory race at %s: %s by block %d thread %d, and an earlier %s by "
             "%s%d in the same launch with nothing ordering them", at().c_str(), what, B, f.tid,
             s.w_atomic ? "atomicAdd" : "write", s.w_block == kMulti ? "several blocks, e.g. block " : "block ",
             s.w_block == kMulti ? -1 : s.w_block);
    }
    if (kind != kRead && s.r_launch == L) {
      const bool ordered = s.r_block == B && (s.r_tid == f.tid || s.r_epoch < E);
      if (!ordered)
        fail(cudaErrorLaunchFailure, "global-memory race at %s: %s by block %d thread %d after a read by %s in "
             "the same launch", at().c_str(), what, B, f.tid, s.r_block == kMulti ? "other blocks" : "another thread");
    }
    if (kind == kRead) {
      if (s.r_launch != L) {
        s.r_launch = L;
        s.r_block = B;
        s.r_tid = (uint16_t)f.tid;
        s.r_epoch = E;
      } else if (s.r_block != B) {
        s.r_block = kMulti;
      } else {
        s.r_tid = (uint16_t)f.tid;
        s.r_epoch = E;
      }
    } else {
      s.w_block = (s.w_launch == L && s.w_block != B) ? kMulti : B;
      s.w_launch = L;
      s.w_tid = (uint16_t)f.tid;
      s.w_epoch = E;
      s.w_atomic = kind == kAtomic;
      s.init = 1;
    }
  }
}

// every plain load/store of the instrumented kernel TU comes here
inline void mem_access(void* p, size_t size, bool write) {
  const uintptr_t a = (uintptr_t)p;
  Fiber* f = g_cur;
  if (!f) {  // host code of the kernel TU must not touch device memory
    if (in_shared(a) || find_buffer(a))
      fail(cudaErrorIllegalAddress, "host code dereferences device memory (%s)", describe_global(a).c_str());
    return;
  }
  if (in_shared(a)) return shared_access(a, size, write, *f);
  if (a - (uintptr_t)f->stack < kStack) return;                       // the thread's own stack
  if (a >= g_host_stack_lo && a < g_host_stack_hi) return;           // kernel parameters being copied in
  global_access(a, size, write ? kWrite : kRead, *f);
}

// ---------------------------------------------------------------------------------------------
// the block scheduler

void yield_to_scheduler() { emu_swap(&g_cur->sp, g_sched_sp); }

void release_barrier() {
  g_blk.bar_arrived = 0;
  ++g_blk.epoch;
  for (int t = 0; t < g_blk.nthreads; ++t)
    if (g_fibers[t].state == kWaitBarrier) g_fibers[t].state = kRunnable;
}

void land_group(Fiber& f, std::vector<CpAsync>& group);

[[noreturn]] void fiber_exit() {
  Fiber& f = *g_cur;
  while (!f.open.empty() || !f.groups.empty()) {  // outstanding copies complete at exit
    if (!f.open.empty()) {
      f.groups.push_back(std::move(f.open));
      f.open.clear();
    }
    land_group(f, f.groups.front());
    f.groups.erase(f.groups.begin());
  }
  Warp& w = g_blk.warps[f.warp];
  if (w.arrived) fail(cudaErrorLaunchFailure, "thread exited while other lanes of its warp wait in %s", op_name(w.op));
  --w.lanes;
  f.state = kDone;
  --g_blk.alive;
  if (g_blk.alive > 0 && g_blk.bar_arrived == g_blk.alive) release_barrier();
  yield_to_scheduler();
  abort();  // a finished fiber is never resumed
}

extern "C" void emu_fiber_entry() {
  g_blk.launch->thread_main(g_blk.launch->ctx);
  fiber_exit();
}

void fiber_init(Fiber& f) {
  // stack top: [0 (fake return address)] [emu_fiber_entry] [rbp rbx r12 r13 r14 r15] [mxcsr, fpu cw]
  uintptr_t top = ((uintptr_t)f.stack + kStack) & ~(uintptr_t)15;
  uint64_t* sp = (uint64_t*)top;
  *--sp = 0;
  *--sp = (uint64_t)(uintptr_t)&emu_fiber_entry;
  for (int r = 0; r < 6; ++r) *--sp = 0;
  uint32_t ctl[2];
  asm volatile("stmxcsr %0" : "=m"(ctl[0]));
  asm volatile("fnstcw %0" : "=m"(ctl[1]));
  uint64_t word;
  memcpy(&word, ctl, 8);
  *--sp = word;
  f.sp = sp;
}

void ensure_fibers(int n) {
  if ((size_t)n <= g_stack_count) return;
  // one mapping, each stack below a PROT_NONE guard page: an overflow faults instead of corrupting
  const size_t page = (size_t)sysconf(_SC_PAGESIZE), slot = kStack + page, count = 1024;
  char* m = (char*)mmap(nullptr, slot * count, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) {
    fprintf(stderr, "cuda_emu: cannot map fiber stacks\n");
    abort();
  }
  for (size_t i = 0; i < count; ++i) mprotect(m + i * slot, page, PROT_NONE);
  g_stacks = m;
  g_stack_count = count;
  g_fibers.resize(count);
  for (size_t i = 0; i < count; ++i) g_fibers[i].stack = m + i * slot + page;
}

void run_block(Launch& L, uint3 bidx, int linear, unsigned char* smem_base) {
  const int nt = (int)(L.block.x * L.block.y * L.block.z);
  ++g_stats.blocks;
  g_blk.launch = &L;
  g_blk.idx = bidx;
  g_blk.linear = linear;
  g_blk.nthreads = g_blk.alive = nt;
  g_blk.bar_arrived = 0;
  g_blk.serial = ++g_block_serial;
  g_blk.epoch = 0;
  memset(g_blk.wepoch, 0, sizeof g_blk.wepoch);
  for (int w = 0; w < 32; ++w) {
    g_blk.warps[w].arrived = 0;
    g_blk.warps[w].lanes = std::max(0, std::min(32, nt - 32 * w));
  }
  g_blk.smem = smem_base;
  g_blk.smem_size = L.smem;
  memset(smem_base, 0xFF, L.smem);  // NaN in every floating-point type
  for (int t = 0; t < nt; ++t) {
    Fiber& f = g_fibers[t];
    f.tid = t;
    f.warp = t / 32;
    f.lane = t % 32;
    f.idx = uint3{(unsigned)(t % L.block.x), (unsigned)(t / L.block.x % L.block.y),
                  (unsigned)(t / (L.block.x * L.block.y))};
    f.state = kRunnable;
    f.open.clear();
    f.groups.clear();
    fiber_init(f);
  }
  while (g_blk.alive > 0 && !g_abort) {
    bool ran = false;
    for (int t = 0; t < nt && !g_abort; ++t) {
      Fiber& f = g_fibers[t];
      if (f.state != kRunnable) continue;
      g_cur = &f;
      emu_swap(&g_sched_sp, f.sp);
      g_cur = nullptr;
      ran = true;
    }
    if (!ran && !g_abort && g_blk.alive > 0) {
      int bar = 0, warp = 0;
      for (int t = 0; t < nt; ++t) {
        bar += g_fibers[t].state == kWaitBarrier;
        warp += g_fibers[t].state == kWaitWarp;
      }
      g_cur = nullptr;
      fail(cudaErrorLaunchFailure, "deadlock in %s block (%u, %u, %u): %d threads wait at __syncthreads, %d in "
           "warp collectives, none can proceed", L.name.c_str(), bidx.x, bidx.y, bidx.z, bar, warp);
      g_abort = true;
    }
  }
  g_blk.smem = nullptr;
}

// ---------------------------------------------------------------------------------------------
// warp collectives

Warp& arrive(int op, unsigned mask) {
  ++g_stats.collectives;
  Fiber& f = *g_cur;
  Warp& w = g_blk.warps[f.warp];
  if (mask != 0xffffffffu)
    fail(cudaErrorLaunchFailure, "%s with member mask %#x: the kernels here expect the full warp", op_name(op), mask);
  if (w.lanes != 32)
    fail(cudaErrorLaunchFailure, "%s in a warp with %d live lanes (needs all 32)", op_name(op), w.lanes);
  if (w.arrived == 0) w.op = op;
  else if (w.op != op)
    fail(cudaErrorLaunchFailure, "warp divergence: lane %d reached %s while other lanes wait in %s", f.lane,
         op_name(op), op_name(w.op));
  return w;
}

// the last lane to arrive runs `complete` for the whole warp; the others wait for it
template <typename F> void wait_all(Warp& w, F complete) {
  Fiber& f = *g_cur;
  if (++w.arrived < 32) {
    f.state = kWaitWarp;
    yield_to_scheduler();
    return;
  }
  w.arrived = 0;
  complete();
  const int base = f.warp * 32;
  for (int l = 0; l < 32; ++l)
    if (g_fibers[base + l].state == kWaitWarp) g_fibers[base + l].state = kRunnable;
}

// ---------------------------------------------------------------------------------------------
// cp.async

void land_group(Fiber& f, std::vector<CpAsync>& group) {
  for (CpAsync& c : group) {
    shared_access((uintptr_t)c.dst, 16, true, f);  // the copy lands now: a write by its thread
    memcpy(c.dst, c.data, 16);
  }
}

float bits16_to_f32(uint16_t h, int bf16) { return bf16 ? __bfloat162float(__nv_bfloat16{h}) : __half2float(__half{h}); }

}  // namespace

// ---------------------------------------------------------------------------------------------
// ThreadSanitizer instrumentation callbacks (the kernel TU is compiled with -fsanitize=thread)

extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
#define EMU_TSAN(n)                                                           \
  void __tsan_read##n(void* p) { mem_access(p, n, false); }                       \
  void __tsan_write##n(void* p) { mem_access(p, n, true); }                       \
  void __tsan_unaligned_read##n(void* p) { mem_access(p, n, false); }             \
  void __tsan_unaligned_write##n(void* p) { mem_access(p, n, true); }             \
  void __tsan_read##n##_pc(void* p, void*) { mem_access(p, n, false); }           \
  void __tsan_write##n##_pc(void* p, void*) { mem_access(p, n, true); }
EMU_TSAN(1)
EMU_TSAN(2)
EMU_TSAN(4)
EMU_TSAN(8)
EMU_TSAN(16)
#undef EMU_TSAN
void __tsan_read_range(void* p, size_t n) {
  for (size_t i = 0; i < n; i += 2) mem_access((char*)p + i, n - i >= 2 ? 2 : 1, false);
}
void __tsan_write_range(void* p, size_t n) {
  for (size_t i = 0; i < n; i += 2) mem_access((char*)p + i, n - i >= 2 ? 2 : 1, true);
}

// ---------------------------------------------------------------------------------------------
// what emu.h declares for the kernels

void emu_check_align(const void* p, size_t align, const char* what) {
  if (((uintptr_t)p) % align) fail(cudaErrorMisalignedAddress, "misaligned %s at %p (needs %zu-byte alignment)",
                                   what, p, align);
}

uint3 emu_thread_idx(void) { return g_cur->idx; }
uint3 emu_block_idx(void) { return g_blk.idx; }
dim3 emu_block_dim(void) { return g_blk.launch->block; }
dim3 emu_grid_dim(void) { return g_blk.launch->grid; }

void __syncthreads(void) {
  Fiber& f = *g_cur;
  if (g_blk.warps[f.warp].arrived)
    fail(cudaErrorLaunchFailure, "__syncthreads while other lanes of this warp wait in %s",
         op_name(g_blk.warps[f.warp].op));
  f.state = kWaitBarrier;
  if (++g_blk.bar_arrived == g_blk.alive) {
    release_barrier();
    return;
  }
  yield_to_scheduler();
}

void emu_syncwarp(unsigned mask) {
  Warp& w = arrive(kOpSyncwarp, mask);
  const int warp = g_cur->warp;
  wait_all(w, [&] { ++g_blk.wepoch[warp]; });
}

float emu_shfl_xor_f32(unsigned mask, float v, int lane_mask, int width) {
  Warp& w = arrive(kOpShfl, mask);
  const int lane = g_cur->lane;
  if (width != 32) fail(cudaErrorLaunchFailure, "__shfl_xor_sync with width %d (only 32 is emulated)", width);
  w.in[lane][0] = emu_f2u(v);
  w.param[lane] = lane_mask;
  wait_all(w, [&] {
    for (int l = 0; l < 32; ++l) {
      if (w.param[l] != w.param[0]) fail(cudaErrorLaunchFailure, "__shfl_xor_sync with different lane masks");
      w.out[l][0] = w.in[(l ^ w.param[l]) & 31][0];
    }
  });
  return emu_u2f(w.out[lane][0]);
}

float atomicAdd(float* address, float value) {
  Fiber& f = *g_cur;
  global_access((uintptr_t)address, 4, kAtomic, f);
  const float old = *address;
  *address = old + value;
  return old;
}

void emu_cp_async16(void* dst, const void* src, int src_bytes) {
  Fiber& f = *g_cur;
  const uintptr_t d = (uintptr_t)dst;
  if (!in_shared(d)) fail(cudaErrorIllegalAddress, "cp.async destination %p is not shared memory", dst);
  if (d % 16 || (uintptr_t)src % 16)
    fail(cudaErrorMisalignedAddress, "cp.async with a misaligned address (dst %p, src %p; both need 16 bytes)", dst, src);
  if (src_bytes < 0 || src_bytes > 16) fail(cudaErrorInvalidValue, "cp.async src-size %d (must be 0..16)", src_bytes);
  CpAsync c;
  c.dst = (unsigned char*)dst;
  memset(c.data, 0, 16);  // bytes past src-size are zero-filled
  if (src_bytes > 0) {
    global_access((uintptr_t)src, (size_t)src_bytes, kRead, f);
    memcpy(c.data, src, (size_t)src_bytes);
  }
  shared_access(d, 16, true, f);  // issuing is a write of the destination by this thread...
  memset(c.dst, 0xFF, 16);        // ...whose value is undefined (NaN here) until the copy lands
  f.open.push_back(c);
}

void emu_cp_async_commit(void) {
  Fiber& f = *g_cur;
  f.groups.push_back(std::move(f.open));  // an empty group is a group too (as in PTX)
  f.open.clear();
}

void emu_cp_async_wait(int n) {
  Fiber& f = *g_cur;
  while ((int)f.groups.size() > n) {
    land_group(f, f.groups.front());
    f.groups.erase(f.groups.begin());
  }
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 (PTX ISA, "Warp-level matrix load
// instruction: ldmatrix"): lanes 8i..8i+7 give the addresses of rows 0..7 of matrix i (16 bytes
// each). Without .trans, lane L receives in register i the elements (row L/4, columns 2(L%4) and
// 2(L%4)+1) of matrix i, lower column in the lower half; with .trans, the elements (row 2(L%4),
// column L/4) and (row 2(L%4)+1, column L/4).
void emu_ldmatrix_x4(uint32_t* r, const void* p, int trans) {
  Warp& w = arrive(kOpLdmatrix, 0xffffffffu);
  const int lane = g_cur->lane, base = g_cur->warp * 32;
  w.addr[lane] = p;
  w.param[lane] = trans;
  wait_all(w, [&] {
    uint16_t m[4][8][8];  // [matrix][row][column]
    for (int i = 0; i < 4; ++i)
      for (int row = 0; row < 8; ++row) {
        const int l = 8 * i + row;
        const uintptr_t a = (uintptr_t)w.addr[l];
        if (w.param[l] != w.param[0]) fail(cudaErrorLaunchFailure, "ldmatrix with and without .trans in one warp");
        if (!in_shared(a)) fail(cudaErrorIllegalAddress, "ldmatrix row address %p (lane %d) is not shared memory",
                                (void*)a, l);
        if (a % 16) fail(cudaErrorMisalignedAddress, "ldmatrix row address %p (lane %d) is not 16-byte aligned",
                         (void*)a, l);
        shared_access(a, 16, false, g_fibers[base + l]);
        memcpy(m[i][row], (const void*)a, 16);
      }
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < 4; ++i) {
        uint16_t lo, hi;
        if (!w.param[0]) {
          lo = m[i][l / 4][2 * (l % 4)];
          hi = m[i][l / 4][2 * (l % 4) + 1];
        } else {
          lo = m[i][2 * (l % 4)][l / 4];
          hi = m[i][2 * (l % 4) + 1][l / 4];
        }
        w.out[l][i] = (uint32_t)lo | ((uint32_t)hi << 16);
      }
  });
  for (int i = 0; i < 4; ++i) r[i] = w.out[lane][i];
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 (PTX ISA, "Matrix Fragments
// for mma.m16n8k16 with floating point type"), groupID = lane / 4, tig = lane % 4:
//   A (16x16), registers a0..a3 holding elements a0..a7 (two per register, lower index low):
//     row = groupID for a0,a1,a4,a5; groupID + 8 for a2,a3,a6,a7
//     col = tig*2 + (i & 1) for a0..a3; tig*2 + (i & 1) + 8 for a4..a7
//   B (16x8), registers b0, b1 holding b0..b3: row = tig*2 + (i & 1) (+8 for b2, b3), col = groupID
//   C, D (16x8 f32) c0..c3: row = groupID for c0, c1; groupID + 8 for c2, c3; col = tig*2 + (i & 1)
// D = A B + C with products exact and the sum in fp32 (k in order).
void emu_mma_m16n8k16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1, int bf16) {
  Warp& w = arrive(kOpMma, 0xffffffffu);
  const int lane = g_cur->lane;
  for (int i = 0; i < 4; ++i) w.in[lane][i] = a[i];
  w.in[lane][4] = b0;
  w.in[lane][5] = b1;
  for (int i = 0; i < 4; ++i) w.out[lane][i] = emu_f2u(c[i]);
  w.param[lane] = bf16;
  wait_all(w, [&] {
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      if (w.param[l] != w.param[0]) fail(cudaErrorLaunchFailure, "mma.sync with f16 and bf16 operands in one warp");
      const int gid = l / 4, tig = l % 4;
      for (int i = 0; i < 8; ++i) {  // a_i is half (i & 1) of register i / 2
        const uint16_t h = (uint16_t)(w.in[l][i / 2] >> (16 * (i & 1)));
        const int row = (i < 2 || (i >= 4 && i < 6)) ? gid : gid + 8;
        const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
        A[row][col] = bits16_to_f32(h, w.param[0]);
      }
      for (int i = 0; i < 4; ++i) {
        const uint16_t h = (uint16_t)(w.in[l][4 + i / 2] >> (16 * (i & 1)));
        const int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
        B[row][gid] = bits16_to_f32(h, w.param[0]);
      }
      for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? gid : gid + 8, col = tig * 2 + (i & 1);
        C[row][col] = emu_u2f(w.out[l][i]);
      }
    }
    for (int l = 0; l < 32; ++l) {
      const int gid = l / 4, tig = l % 4;
      for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? gid : gid + 8, col = tig * 2 + (i & 1);
        float acc = C[row][col];
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        w.out[l][i] = emu_f2u(acc);
      }
    }
  });
  for (int i = 0; i < 4; ++i) c[i] = emu_u2f(w.out[lane][i]);
}

// ---------------------------------------------------------------------------------------------
// runtime API

cudaError_t cudaGetDevice(int* device) {
  ++g_stats.get_device;
  if (g_sticky) return g_sticky;
  *device = g_current;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  ++g_stats.device_attribute;
  if (g_sticky) return g_sticky;
  if (device < 0 || device >= kDevices) return g_last = cudaErrorInvalidDevice;
  const Device& D = g_devices[device];
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = D.sms; break;
    case cudaDevAttrComputeCapabilityMajor: *value = D.cc_major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = D.cc_minor; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = D.smem_block_default; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = D.smem_block_optin; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = D.smem_sm; break;
    default: return g_last = cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t emu_func_set_attribute(const void* fn, cudaFuncAttribute attr, int value) {
  ++g_stats.set_attribute;
  if (g_sticky) return g_sticky;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > cur_dev().smem_block_optin)
    return g_last = cudaErrorInvalidValue;
  g_smem_limit[{fn, g_current}] = value;
  return cudaSuccess;
}

cudaError_t emu_occupancy(int* blocks, const void* fn, int threads, size_t smem) {
  ++g_stats.occupancy;
  if (g_sticky) return g_sticky;
  (void)fn;
  const int warps = (threads + 31) / 32;
  int n = std::min(cur_dev().max_blocks_sm, cur_dev().max_threads_sm / (32 * warps));
  n = std::min(n, cur_dev().regs_sm / (cur_dev().regs_per_thread * 32 * warps));  // an estimate: no ptxas here
  if (smem) n = std::min(n, (int)(cur_dev().smem_sm / (smem + 1024)));      // 1 KB reserved per block
  *blocks = std::max(n, 0);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t stream) {
  ++g_stats.memsets;
  if (g_sticky) return g_sticky;
  if (g_check_stream && stream != g_expect_stream) {
    fail(cudaErrorInvalidValue, "cudaMemsetAsync on stream %p, not the caller's stream %p", (void*)stream,
         (void*)g_expect_stream);
    return g_sticky;
  }
  Buffer* b = find_buffer((uintptr_t)dst);
  if (bytes == 0) return cudaSuccess;
  if (!b || (uintptr_t)dst + bytes > b->base + b->size) {
    fail(cudaErrorInvalidValue, "cudaMemsetAsync of %zu bytes at %s", bytes, describe_global((uintptr_t)dst).c_str());
    return g_sticky;
  }
  memset(dst, value, bytes);
  const size_t off = (uintptr_t)dst - b->base;
  for (size_t g = off / 2; g < (off + bytes + 1) / 2; ++g) b->shadow[g].init = 1;
  ++g_launch_id;  // a stream operation of its own
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
  if (g_sticky) return g_sticky;
  const cudaError_t e = g_last;
  g_last = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return g_sticky ? g_sticky : g_last; }

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorNoKernelImageForDevice: return "no kernel image is available for execution on the device";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

void emu_run_launch(const void* fn, const char* name, int line, dim3 grid, dim3 block, size_t smem,
                    cudaStream_t stream, void (*thread_main)(void*), void* ctx, void* smem_base,
                    size_t smem_capacity) {
  ++g_stats.launches;
  if (g_sticky) return;
  host_stack_bounds();
  char label[256];
  snprintf(label, sizeof label, "%s (launched at attention.cu:%d, grid (%u, %u, %u), %u threads, %zu B smem)", name,
           line, grid.x, grid.y, grid.z, block.x * block.y * block.z, smem);
  // launch checks, as cudaLaunchKernel makes them
  const unsigned threads = block.x * block.y * block.z;
  if (grid.x < 1 || grid.x > 2147483647u || grid.y < 1 || grid.y > 65535 || grid.z < 1 || grid.z > 65535 ||
      threads < 1 || threads > 1024 || block.z > 64) {
    g_last = cudaErrorInvalidConfiguration;
    return;
  }
  auto it = g_smem_limit.find({fn, g_current});
  const size_t limit = std::min((size_t)cur_dev().smem_block_optin,
                                it != g_smem_limit.end() ? (size_t)std::max(it->second, cur_dev().smem_block_default)
                                                         : (size_t)cur_dev().smem_block_default);
  if (smem > limit || smem > smem_capacity) {
    g_last = cudaErrorInvalidValue;  // "too many resources": over 48 KB needs cudaFuncSetAttribute
    if (g_error.empty())
      g_error = std::string(label) + ": dynamic shared memory over the kernel's limit (" + std::to_string(limit) +
                " bytes; over 48 KB needs cudaFuncSetAttribute)";
    return;
  }
  if (g_check_stream && stream != g_expect_stream) {
    fail(cudaErrorInvalidValue, "%s: launched on stream %p, not the caller's stream %p", label, (void*)stream,
         (void*)g_expect_stream);
    return;
  }
  ensure_fibers((int)threads);
  Launch L{fn, label, grid, block, smem, thread_main, ctx, ++g_launch_id};
  g_abort = false;
  int linear = 0;
  for (unsigned z = 0; z < grid.z && !g_abort; ++z)
    for (unsigned y = 0; y < grid.y && !g_abort; ++y)
      for (unsigned x = 0; x < grid.x && !g_abort; ++x)
        run_block(L, uint3{x, y, z}, linear++, (unsigned char*)smem_base);
  g_blk.launch = nullptr;
  ++g_launch_id;
}

// ---------------------------------------------------------------------------------------------
// the harness's API (tests/test_cuda_emu.py, through ctypes)

void* emu_malloc(size_t bytes, const char* name) {
  Buffer* b = new Buffer;
  // cudaMalloc alignment (256), red zones on both sides, NaN-filled, uninitialised
  b->raw = (char*)aligned_alloc(256, bytes + 2 * kRedZone + 256);
  b->base = (uintptr_t)b->raw + kRedZone;
  b->size = bytes;
  b->name = name ? name : "buffer";
  b->shadow.resize((bytes + 1) / 2);
  memset(b->raw, 0xFF, bytes + 2 * kRedZone + 256);
  g_buffers.push_back(b);
  return (void*)b->base;
}

void emu_free(void* p) {
  for (size_t i = 0; i < g_buffers.size(); ++i)
    if (g_buffers[i]->base == (uintptr_t)p) {
      if (g_last_hit == g_buffers[i]) g_last_hit = nullptr;
      free(g_buffers[i]->raw);
      delete g_buffers[i];
      g_buffers.erase(g_buffers.begin() + i);
      return;
    }
}

int emu_h2d(void* dst, const void* src, size_t bytes) {
  Buffer* b = find_buffer((uintptr_t)dst);
  if (!b || (uintptr_t)dst + bytes > b->base + b->size) return 1;
  memcpy(dst, src, bytes);
  const size_t off = (uintptr_t)dst - b->base;
  for (size_t g = off / 2; g < (off + bytes + 1) / 2; ++g) b->shadow[g].init = 1;
  return 0;
}

int emu_d2h(void* dst, const void* src, size_t bytes) {
  Buffer* b = find_buffer((uintptr_t)src);
  if (!b || (uintptr_t)src + bytes > b->base + b->size) return 1;
  memcpy(dst, src, bytes);
  return 0;
}

void emu_reset(void) {
  g_error.clear();
  g_sticky = g_last = cudaSuccess;
  g_stats = Stats();
}

const char* emu_error(void) { return g_error.c_str(); }

void emu_expect_stream(cudaStream_t stream) {
  g_expect_stream = stream;
  g_check_stream = true;
}

// Device `device` gets these SMs, compute capability, per-block opt-in and per-SM shared memory
// (bytes) and becomes the current device (cudaGetDevice). A real device never changes, and the
// kernels' host code caches what it learns per device: reconfigure a device only before first use.
void emu_configure(int device, int sms, int cc_major, int cc_minor, int smem_block_optin, int smem_sm) {
  if (device < 0 || device >= kDevices) abort();
  Device& d = g_devices[device];
  d.sms = sms;
  d.cc_major = cc_major;
  d.cc_minor = cc_minor;
  d.smem_block_optin = smem_block_optin;
  d.smem_sm = smem_sm;
  g_current = device;
}

void emu_set_device(int device) {
  if (device < 0 || device >= kDevices) abort();
  g_current = device;
}

long emu_stat(const char* name) {
  const std::string n = name;
  if (n == "launches") return g_stats.launches;
  if (n == "blocks") return g_stats.blocks;
  if (n == "set_attribute") return g_stats.set_attribute;
  if (n == "occupancy") return g_stats.occupancy;
  if (n == "device_attribute") return g_stats.device_attribute;
  if (n == "get_device") return g_stats.get_device;
  if (n == "memsets") return g_stats.memsets;
  if (n == "shared_accesses") return g_stats.shared_accesses;
  if (n == "global_accesses") return g_stats.global_accesses;
  if (n == "collectives") return g_stats.collectives;
  return -1;
}
}  // extern "C"
