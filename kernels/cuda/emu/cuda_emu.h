// CUDA execution model on the host CPU, for running our .cu files where no GPU exists.
//
// A .cu file is compiled with `g++ -include cuda_emu.h`. A launch runs the blocks of the grid one
// after another; the threads of a block run as fibers (a small stack switch of our own on x86-64,
// ucontext elsewhere) on one OS thread and switch only
// where CUDA threads must meet: __syncthreads, __syncwarp, warp shuffles and votes, atomics. So
// `__shared__` memory can be plain static storage (one block at a time), and a kernel that reads
// another thread's shared value without a barrier sees a different answer when the thread order
// changes: the order of threads (and of blocks) is shuffled by a seed on every launch.
//
// Honesty checks:
//   - a barrier that not every live thread of the block reaches is reported as a deadlock;
//   - shared memory is refilled with 0xff bytes (NaN for floats) before each block, so a read of
//     memory no thread wrote shows up: dynamic shared memory, and the static __shared__ arrays of
//     non-template kernels (g++ ignores the section attribute of a template's static locals);
//   - in debug mode the runtime places each buffer flush against a PROT_NONE page, and a fault
//     during a launch is caught (SIGSEGV/SIGBUS on an alternate stack) and reported with its
//     address instead of killing the process.
#pragma once

#define CUDA_EMU 1

#include <cmath>
#include <csetjmp>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sys/mman.h>
#include <type_traits>
#include <ucontext.h>
#include <unistd.h>
#include <numeric>
#include <utility>

// ---- qualifiers -------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Static storage: blocks run one at a time, so one copy per kernel is one copy per block. The
// section lets the launcher find and poison all of it between blocks.
#define __shared__ static __attribute__((section("emu_shared"), aligned(16)))

// ---- built-in vector types and variables ------------------------------------------------------
struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct int2 { int x, y; };
struct int4 { int x, y, z, w; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct __attribute__((aligned(8))) uint2 { unsigned x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned x, y, z, w; };
static inline float2 make_float2(float x, float y) { return {x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
static inline int2 make_int2(int x, int y) { return {x, y}; }

static uint3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
static constexpr int warpSize = 32;

extern "C" char __start_emu_shared[] __attribute__((weak));
extern "C" char __stop_emu_shared[] __attribute__((weak));

namespace emu {

// ---- fiber context switch ----------------------------------------------------------------------
// swapcontext saves and restores the signal mask with a system call on every switch; kernels
// switch at every shuffle, so on x86-64 a switch is only the callee-saved registers, the stack
// pointer and the floating-point control words.
#if defined(__x86_64__)
struct Context { void* sp; };
extern "C" void emu_fiber_switch(void** save_sp, void* load_sp);
asm(".text\n.p2align 4\n.hidden emu_fiber_switch\n.type emu_fiber_switch,@function\nemu_fiber_switch:\n"
    "pushq %rbp\npushq %rbx\npushq %r12\npushq %r13\npushq %r14\npushq %r15\n"
    "subq $8, %rsp\nstmxcsr (%rsp)\nfnstcw 4(%rsp)\n"
    "movq %rsp, (%rdi)\nmovq %rsi, %rsp\n"
    "ldmxcsr (%rsp)\nfldcw 4(%rsp)\naddq $8, %rsp\n"
    "popq %r15\npopq %r14\npopq %r13\npopq %r12\npopq %rbx\npopq %rbp\nret\n"
    ".size emu_fiber_switch, .-emu_fiber_switch\n");

inline void context_switch(Context& from, Context& to) { emu_fiber_switch(&from.sp, to.sp); }

// A fresh stack that "returns" into entry() on its first switch, as if entry had been called.
inline void context_make(Context& c, char* stack, size_t bytes, void (*entry)()) {
    uintptr_t top = ((uintptr_t)(stack + bytes)) & ~(uintptr_t)15;
    uint64_t* sp = (uint64_t*)top;
    *--sp = 0;                           // the entry function's (never used) return address
    *--sp = (uint64_t)entry;             // popped by ret
    for (int i = 0; i < 6; ++i) *--sp = 0;   // rbp rbx r12 r13 r14 r15
    uint32_t mxcsr;
    uint16_t fpu_cw;
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(mxcsr), "=m"(fpu_cw));
    *--sp = (uint64_t)mxcsr | ((uint64_t)fpu_cw << 32);
    c.sp = sp;
}
#else
struct Context { ucontext_t uc; };
inline void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void context_make(Context& c, char* stack, size_t bytes, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
#endif

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 128 * 1024;

struct LaunchConfig {          // laid out like the ctypes structure in runtime.py
    unsigned grid[3];
    unsigned block[3];
    unsigned shared_bytes;
    unsigned seed;
    int debug;
};

struct Barrier {               // a generation barrier over a set of fibers
    int members = 0;           // fibers in the set
    int live = 0;              // of them, not yet returned from the kernel
    int arrived = 0;
    unsigned generation = 0;
    const char* file = "";
    int line = 0;
};

struct Barrier;

struct Fiber {
    Context context;
    const Barrier* waiting_on;     // the barrier this fiber waits at, or null
    unsigned waiting_generation;
    uint3 tid;
    int warp, lane;
    bool done;
    char* stack;
};

struct Warp {
    Barrier barrier;
    uint64_t exchange[kWarp];
    unsigned ballot;
};

struct State {
    Context scheduler;
    Fiber fibers[kMaxThreads];
    Warp warps[kMaxThreads / kWarp];
    int order[kMaxThreads];
    Barrier block;
    Fiber* current = nullptr;
    bool progress = false;
    int n_threads = 0;
    void (*body)(void*) = nullptr;
    void* body_arg = nullptr;
    char* dynamic_shared = nullptr;
    size_t dynamic_shared_bytes = 0;
    char* stacks = nullptr;
    uint64_t rng = 0;
    char error[512] = {0};
    sigjmp_buf fault_jump;
    volatile void* fault_address = nullptr;
    volatile int fault_signal = 0;
};

inline State& state() { static State s; return s; }

inline void fail(const char* message) {
    State& s = state();
    if (!s.error[0]) snprintf(s.error, sizeof s.error, "%s", message);
}

inline uint64_t next_random() {          // xorshift64*
    uint64_t& x = state().rng;
    x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
    return x * 2685821657736338717ull;
}

inline void shuffle(int* order, int n) {
    for (int i = n - 1; i > 0; --i) {
        int j = (int)(next_random() % (uint64_t)(i + 1));
        std::swap(order[i], order[j]);
    }
}

inline void yield() {
    State& s = state();
    context_switch(s.current->context, s.scheduler);
}

// Stop the launch with an error from inside a fiber: the scheduler sees the error and returns.
inline void fail_here(const char* message) {
    fail(message);
    for (;;) yield();
}

// Every fiber of `b` must arrive before any of them goes on. The first arrival names the call
// site; a fiber arriving at another site, or a barrier that some fiber of the set has already
// returned past, is a divergent barrier (undefined behaviour in CUDA) and fails the launch.
inline void arrive_and_wait(Barrier& b, const char* what, const char* file, int line) {
    State& s = state();
    s.progress = true;
    char message[400];
    if (b.live != b.members) {
        snprintf(message, sizeof message, "%s at %s:%d in block (%u,%u,%u) is reached after %d thread(s) of the "
                 "block or warp returned (divergent barrier)", what, file, line, blockIdx.x, blockIdx.y, blockIdx.z,
                 b.members - b.live);
        fail_here(message);
    }
    if (b.arrived == 0) { b.file = file; b.line = line; }
    else if (b.line != line || strcmp(b.file, file) != 0) {
        snprintf(message, sizeof message, "divergent barrier in block (%u,%u,%u): threads wait at %s:%d and at %s:%d",
                 blockIdx.x, blockIdx.y, blockIdx.z, b.file, b.line, file, line);
        fail_here(message);
    }
    unsigned generation = b.generation;
    if (++b.arrived == b.live) {
        b.arrived = 0;
        ++b.generation;
        yield();                 // let the others run first: the releaser has no head start
        return;
    }
    Fiber* f = s.current;
    f->waiting_on = &b;                 // the scheduler skips this fiber until the barrier opens
    f->waiting_generation = generation;
    while (b.generation == generation) yield();
    f->waiting_on = nullptr;
    s.progress = true;
}

inline void leave(Barrier& b) {
    --b.live;
    if (b.arrived > 0) {
        char message[400];
        snprintf(message, sizeof message, "a thread of block (%u,%u,%u) returned while others wait at %s:%d "
                 "(divergent barrier)", blockIdx.x, blockIdx.y, blockIdx.z, b.file, b.line);
        fail(message);
    }
}

inline void atomic_done() {        // an atomic is progress; yielding lets other threads interleave
    state().progress = true;
    yield();
}

inline Warp& my_warp() { return state().warps[state().current->warp]; }

template <typename T>
inline T exchange(T value, int source_lane, const char* what, const char* file, int line) {
    static_assert(sizeof(T) <= 8, "warp shuffle of a type wider than 8 bytes");
    Warp& w = my_warp();
    int lane = state().current->lane;
    uint64_t bits = 0;
    memcpy(&bits, &value, sizeof(T));
    w.exchange[lane] = bits;
    arrive_and_wait(w.barrier, what, file, line);   // all lanes have written
    T out;
    uint64_t got = w.exchange[source_lane];
    memcpy(&out, &got, sizeof(T));
    arrive_and_wait(w.barrier, what, file, line);   // all lanes have read before anyone writes again
    return out;
}

inline void fiber_main() {
    State& s = state();
    s.body(s.body_arg);
    Fiber* f = s.current;
    f->done = true;
    s.progress = true;
    leave(s.block);
    leave(s.warps[f->warp].barrier);
    context_switch(f->context, s.scheduler);     // never resumed
}

inline void poison_shared() {
    State& s = state();
    if (__start_emu_shared && __stop_emu_shared)
        memset(__start_emu_shared, 0xff, (size_t)(__stop_emu_shared - __start_emu_shared));
    if (s.dynamic_shared) memset(s.dynamic_shared, 0xff, s.dynamic_shared_bytes);
}

inline bool run_block(const LaunchConfig& c) {
    State& s = state();
    int n = s.n_threads;
    s.block = Barrier{n, n, 0, 0, "", 0};
    int n_warps = (n + kWarp - 1) / kWarp;
    for (int w = 0; w < n_warps; ++w) { int lanes = std::min(kWarp, n - w * kWarp); s.warps[w].barrier = Barrier{lanes, lanes, 0, 0, "", 0}; }
    poison_shared();
    for (int i = 0; i < n; ++i) {
        Fiber& f = s.fibers[i];
        f.tid = uint3{(unsigned)(i % c.block[0]), (unsigned)((i / c.block[0]) % c.block[1]),
                      (unsigned)(i / (c.block[0] * c.block[1]))};
        f.warp = i / kWarp;
        f.lane = i % kWarp;
        f.done = false;
        f.waiting_on = nullptr;
        context_make(f.context, f.stack, kStackBytes, fiber_main);
        s.order[i] = i;
    }
    int live = n;
    while (live > 0) {
        shuffle(s.order, n);
        s.progress = false;
        for (int k = 0; k < n; ++k) {
            Fiber& f = s.fibers[s.order[k]];
            if (f.done || (f.waiting_on && f.waiting_on->generation == f.waiting_generation)) continue;
            s.current = &f;
            threadIdx = f.tid;
            context_switch(s.scheduler, f.context);
            if (f.done) --live;
            if (s.error[0]) return false;
        }
        if (!s.progress && live > 0) {
            snprintf(s.error, sizeof s.error,
                     "deadlock in block (%u,%u,%u): %d threads wait at a barrier or shuffle that the other "
                     "threads of the block or warp never reach", blockIdx.x, blockIdx.y, blockIdx.z, live);
            return false;
        }
    }
    return true;
}

inline void on_fault(int signal, siginfo_t* info, void*) {
    State& s = state();
    s.fault_signal = signal;
    s.fault_address = info->si_addr;
    siglongjmp(s.fault_jump, 1);
}

struct FaultGuard {           // catches SIGSEGV/SIGBUS during one launch, restores the old handlers
    struct sigaction old_segv, old_bus;
    stack_t old_stack;
    char* alt_stack;
    FaultGuard() {
        alt_stack = (char*)malloc(1 << 16);
        stack_t st{};
        st.ss_sp = alt_stack;
        st.ss_size = 1 << 16;
        sigaltstack(&st, &old_stack);
        struct sigaction sa{};
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &old_segv);
        sigaction(SIGBUS, &sa, &old_bus);
    }
    ~FaultGuard() {
        sigaction(SIGSEGV, &old_segv, nullptr);
        sigaction(SIGBUS, &old_bus, nullptr);
        sigaltstack(&old_stack, nullptr);
        free(alt_stack);
    }
};

inline char* fiber_stacks() {
    // One stack per possible thread, each above a PROT_NONE guard page so that an overflow faults.
    State& s = state();
    if (!s.stacks) {
        size_t page = (size_t)sysconf(_SC_PAGESIZE), slot = kStackBytes + page;
        char* base = (char*)mmap(nullptr, slot * kMaxThreads, PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (base == MAP_FAILED) return nullptr;
        for (int i = 0; i < kMaxThreads; ++i) {
            mprotect(base + i * slot, page, PROT_NONE);
            s.fibers[i].stack = base + i * slot + page;
        }
        s.stacks = base;
    }
    return s.stacks;
}

inline int run_grid(const LaunchConfig& c, void (*body)(void*), void* arg) {
    State& s = state();
    s.error[0] = 0;
    long n = (long)c.block[0] * c.block[1] * c.block[2];
    if (n < 1 || n > kMaxThreads || c.grid[0] < 1 || c.grid[1] < 1 || c.grid[2] < 1 ||
        c.grid[1] > 65535 || c.grid[2] > 65535 || c.block[2] > 64) {
        snprintf(s.error, sizeof s.error, "invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u)",
                 c.grid[0], c.grid[1], c.grid[2], c.block[0], c.block[1], c.block[2]);
        return 1;
    }
    if (c.shared_bytes > 227 * 1024) {
        snprintf(s.error, sizeof s.error, "dynamic shared memory of %u bytes exceeds the 227 KiB a block can have",
                 c.shared_bytes);
        return 1;
    }
    if (!fiber_stacks()) { fail("cannot map fiber stacks"); return 1; }
    s.rng = 0x9E3779B97F4A7C15ull ^ ((uint64_t)c.seed * 0x100000001B3ull) ^ 1;
    s.n_threads = (int)n;
    s.body = body;
    s.body_arg = arg;
    s.dynamic_shared_bytes = c.shared_bytes;
    s.dynamic_shared = (char*)aligned_alloc(16, ((size_t)c.shared_bytes + 16) & ~(size_t)15);
    blockDim = dim3(c.block[0], c.block[1], c.block[2]);
    gridDim = dim3(c.grid[0], c.grid[1], c.grid[2]);
    long n_blocks = (long)c.grid[0] * c.grid[1] * c.grid[2];
    int status = 0;
    {
        FaultGuard guard;
        if (sigsetjmp(s.fault_jump, 1) == 0) {
            // blocks in a shuffled order: a kernel must not depend on which block runs first
            long stride = 1;
            if (n_blocks > 1) {
                do { stride = (long)(next_random() % (uint64_t)n_blocks) | 1; } while (std::gcd(stride, n_blocks) != 1);
            }
            long start = (long)(next_random() % (uint64_t)n_blocks);
            for (long k = 0; k < n_blocks && status == 0; ++k) {
                long b = (start + k * stride) % n_blocks;
                blockIdx = uint3{(unsigned)(b % c.grid[0]), (unsigned)((b / c.grid[0]) % c.grid[1]),
                                 (unsigned)(b / ((long)c.grid[0] * c.grid[1]))};
                if (!run_block(c)) status = 1;
            }
        } else {
            snprintf(s.error, sizeof s.error,
                     "%s at address %p in block (%u,%u,%u) thread (%u,%u,%u): out-of-bounds access",
                     s.fault_signal == SIGBUS ? "bus error" : "segmentation fault", (void*)s.fault_address,
                     blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
            status = 2;
        }
    }
    free(s.dynamic_shared);
    s.dynamic_shared = nullptr;
    return status;
}

template <typename Fn, typename... P, size_t... I>
inline void call_with(Fn fn, void** args, std::index_sequence<I...>) {
    fn(*static_cast<std::remove_cv_t<P>*>(args[I])...);
}

template <typename... P>
struct Call {
    void (*fn)(P...);
    void** args;
    static void run(void* self) {
        Call* c = (Call*)self;
        call_with<void (*)(P...), P...>(c->fn, c->args, std::index_sequence_for<P...>{});
    }
};

// The entry point behind each generated `emu_launch_*` symbol: checks the argument count and
// sizes against the kernel's own signature, then runs the grid.
template <typename... P>
inline int launch(const LaunchConfig* c, void (*fn)(P...), void** args, const long* arg_bytes, int n_args) {
    State& s = state();
    s.error[0] = 0;
    constexpr size_t sizes[] = {sizeof(P)..., 0};
    if (n_args != (int)sizeof...(P)) {
        snprintf(s.error, sizeof s.error, "kernel takes %d arguments, launch passed %d", (int)sizeof...(P), n_args);
        return 1;
    }
    for (int i = 0; i < n_args; ++i)
        if ((size_t)arg_bytes[i] != sizes[i]) {
            snprintf(s.error, sizeof s.error, "argument %d is %zu bytes in the kernel, %ld at the launch",
                     i, sizes[i], arg_bytes[i]);
            return 1;
        }
    Call<P...> call{fn, args};
    return run_grid(*c, &Call<P...>::run, &call);
}

}  // namespace emu


extern "C" __attribute__((visibility("default"))) const char* emu_last_error() { return emu::state().error; }

// ---- synchronisation, warp functions ----------------------------------------------------------
// Macros, so that a divergent barrier is reported with the file and line of each side.
#define __syncthreads() emu::arrive_and_wait(emu::state().block, "__syncthreads", __FILE__, __LINE__)
#define __syncwarp(...) emu::arrive_and_wait(emu::my_warp().barrier, "__syncwarp", __FILE__, __LINE__)
#define __shfl_sync(m, v, ...) emu::shfl_idx(v, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(m, v, ...) emu::shfl_xor(v, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(m, v, ...) emu::shfl_down(v, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(m, v, ...) emu::shfl_up(v, __FILE__, __LINE__, __VA_ARGS__)
#define __ballot_sync(m, p) emu::ballot(p, __FILE__, __LINE__)
#define __any_sync(m, p) (emu::ballot(p, __FILE__, __LINE__) != 0)
#define __all_sync(m, p) (emu::ballot(!(p), __FILE__, __LINE__) == 0)
inline void __threadfence() {}
inline void __threadfence_block() {}

namespace emu {
inline int lane_id() { return state().current->lane; }
template <typename T> inline T shfl_idx(T v, const char* f, int l, int src, int width = warpSize) {
    int lane = lane_id();
    return exchange(v, (lane & ~(width - 1)) + (src & (width - 1)), "__shfl_sync", f, l);
}
template <typename T> inline T shfl_xor(T v, const char* f, int l, int mask, int width = warpSize) {
    int lane = lane_id(), src = lane ^ mask;
    return exchange(v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane, "__shfl_xor_sync", f, l);
}
template <typename T> inline T shfl_down(T v, const char* f, int l, unsigned delta, int width = warpSize) {
    int lane = lane_id(), src = lane + (int)delta;
    return exchange(v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane, "__shfl_down_sync", f, l);
}
template <typename T> inline T shfl_up(T v, const char* f, int l, unsigned delta, int width = warpSize) {
    int lane = lane_id(), src = lane - (int)delta;
    return exchange(v, src >= (lane & ~(width - 1)) ? src : lane, "__shfl_up_sync", f, l);
}
inline unsigned ballot(int predicate, const char* f, int l) {
    Warp& w = my_warp();
    int lane = lane_id();
    arrive_and_wait(w.barrier, "__ballot_sync", f, l);
    if (lane == 0) w.ballot = 0;
    arrive_and_wait(w.barrier, "__ballot_sync", f, l);
    if (predicate) w.ballot |= 1u << lane;
    arrive_and_wait(w.barrier, "__ballot_sync", f, l);
    unsigned out = w.ballot;
    arrive_and_wait(w.barrier, "__ballot_sync", f, l);
    return out;
}
}  // namespace emu

// ---- atomics: one OS thread runs every fiber, so each is atomic; each yields afterwards so
// that the other threads interleave with it ----------------------------------------------------
#define EMU_ATOMIC(name, expr)                                                   \
    template <typename T> inline T name(T* address, T value) {                   \
        T old = *address; *address = (expr); emu::atomic_done(); return old;         \
    }
EMU_ATOMIC(atomicAdd, old + value)
EMU_ATOMIC(atomicSub, old - value)
EMU_ATOMIC(atomicExch, value)
EMU_ATOMIC(atomicMax, old < value ? value : old)
EMU_ATOMIC(atomicMin, value < old ? value : old)
EMU_ATOMIC(atomicAnd, old & value)
EMU_ATOMIC(atomicOr, old | value)
#undef EMU_ATOMIC
template <typename T> inline T atomicCAS(T* address, T compare, T value) {
    T old = *address;
    if (old == compare) *address = value;
    emu::atomic_done();
    return old;
}

// ---- integer and float intrinsics -------------------------------------------------------------
inline int __dp4a(int a, int b, int c) {
    int8_t x[4], y[4];
    memcpy(x, &a, 4);
    memcpy(y, &b, 4);
    return c + x[0] * y[0] + x[1] * y[1] + x[2] * y[2] + x[3] * y[3];
}
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
    uint8_t x[4], y[4];
    memcpy(x, &a, 4);
    memcpy(y, &b, 4);
    return c + x[0] * y[0] + x[1] * y[1] + x[2] * y[2] + x[3] * y[3];
}
inline unsigned __vsub4(unsigned a, unsigned b) {    // per-byte wrapping subtraction
    uint8_t x[4], y[4], r[4];
    memcpy(x, &a, 4); memcpy(y, &b, 4);
    for (int i = 0; i < 4; ++i) r[i] = (uint8_t)(x[i] - y[i]);
    unsigned out; memcpy(&out, r, 4); return out;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
inline unsigned __float_as_uint(float f) { unsigned i; memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fmul_rn(float x, float y) { return x * y; }     // never contracted into an FMA
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline void sincosf_(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
template <typename T> inline T __ldg(const T* p) { return *p; }

// ---- half and bfloat16 ------------------------------------------------------------------------
inline float emu_half_bits_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
    if (exponent == 0) {
        if (mantissa == 0) bits = sign;
        else {                                   // subnormal: normalise
            int e = -1;
            do { ++e; mantissa <<= 1; } while (!(mantissa & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((mantissa & 0x3ff) << 13);
        }
    } else if (exponent == 0x1f) bits = sign | 0x7f800000u | (mantissa << 13);
    else bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
inline uint16_t emu_float_to_half_bits(float f) {    // round to nearest even, like __float2half_rn
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    int32_t exponent = (int32_t)((x >> 23) & 0xff);
    uint32_t mantissa = x & 0x7fffff;
    if (exponent == 0xff) return (uint16_t)(sign | 0x7c00 | (mantissa ? 0x200 : 0));
    int32_t e = exponent - 127 + 15;
    if (e >= 0x1f) return (uint16_t)(sign | 0x7c00);
    if (e <= 0) {                                       // subnormal half or zero
        if (e < -10) return (uint16_t)sign;
        mantissa |= 0x800000;
        int shift = 14 - e;
        uint32_t half_m = mantissa >> shift, rest = mantissa & ((1u << shift) - 1), midpoint = 1u << (shift - 1);
        if (rest > midpoint || (rest == midpoint && (half_m & 1))) ++half_m;
        return (uint16_t)(sign | half_m);
    }
    uint32_t half_m = mantissa >> 13, rest = mantissa & 0x1fff;
    uint32_t out = sign | ((uint32_t)e << 10) | half_m;
    if (rest > 0x1000 || (rest == 0x1000 && (half_m & 1))) ++out;   // may carry into the exponent: correct
    return (uint16_t)out;
}

struct __half {
    uint16_t x;
    __half() = default;
    __half(float f) : x(emu_float_to_half_bits(f)) {}
    operator float() const { return emu_half_bits_to_float(x); }
};
typedef __half half;
struct __half2 { __half x, y; };
inline float __half2float(__half h) { return emu_half_bits_to_float(h.x); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __half __ushort_as_half(unsigned short u) { __half h; h.x = u; return h; }

struct __nv_bfloat16 {
    uint16_t x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) {                            // round to nearest even, NaN kept quiet
        uint32_t b;
        memcpy(&b, &f, 4);
        if ((b & 0x7fffffff) > 0x7f800000) x = (uint16_t)((b >> 16) | 0x40);
        else x = (uint16_t)((b + 0x7fff + ((b >> 16) & 1)) >> 16);
    }
    operator float() const { uint32_t b = (uint32_t)x << 16; float f; memcpy(&f, &b, 4); return f; }
};
inline float __bfloat162float(__nv_bfloat16 h) { return (float)h; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
