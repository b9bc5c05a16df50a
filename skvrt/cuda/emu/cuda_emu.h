/* cuda_emu.h: runs unmodified CUDA C++ kernels on the CPU with g++, one fiber per GPU thread.
 *
 * Force-included (g++ -include cuda_emu.h) before a kernel's .cu, which is compiled as it is; the build
 * helper (skvrt/cuda/emu/__init__.py) adds one exported launcher per `__global__` function (EMU_EXPORT) and
 * the definition of any `extern __shared__` array. include/cuda_fp16.h is an empty stand-in: the half type
 * lives here.
 *
 * Execution model
 *   Blocks run one after another. The threads of a block are fibers that run one at a time until they block:
 *   at __syncthreads (released when every thread of the block is there), at a warp collective
 *   (__shfl_*_sync, __syncwarp, __ballot_sync: resolved when all 32 lanes of the warp are there, full mask
 *   only), or at exit. Between blocking points a fiber runs alone, so plain read-modify-writes (atomicAdd)
 *   are atomic. Scheduling is strict priority in an order that is selectable: forward (thread 0 first),
 *   reverse, or a seeded random permutation drawn again after every barrier; the first runnable fiber in the
 *   order always runs, and a warp whose collective completes runs on ahead of the warps after it. A kernel
 *   that is correct under CUDA's rules gives the same result in every order; a missing barrier makes
 *   results depend on it.
 *   Detected as errors (launch returns -1, emu_error() says why): a barrier that some threads skip or reach
 *   after others exited, warp collectives with a partial mask, divergent or mismatched collectives,
 *   dynamic shared memory over the launch's request limit.
 *   __shared__ variables are thread_local (one instance, shared by all fibers of the single OS thread). Every
 *   block starts with all shared memory, static and dynamic, filled with 0xFF bytes (NaN floats, -1 ints), so
 *   reading shared memory before writing it shows up in the results.
 *
 * Not modelled: concurrent blocks, memory ordering between warps inside a barrier interval (only the thread
 * order between blocking points varies), out-of-bounds checks, timing. Intrinsics map to the C library
 * (__expf -> expf, ...), so fast-math approximations are not reproduced bit for bit.
 */
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <link.h>
#include <sys/mman.h>
#include <type_traits>
#include <utility>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

/* ---- CUDA keywords --------------------------------------------------------------------------------- */
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ thread_local
#define __constant__

#ifndef EMU_DYN_SMEM_BYTES
#define EMU_DYN_SMEM_BYTES (227 * 1024) /* the largest opt-in dynamic shared memory of sm_90 */
#endif
#define EMU_DEFAULT_SMEM_BYTES (48 * 1024)

/* ---- vector types ----------------------------------------------------------------------------------- */
struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct __align__(8) float2 { float x, y; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(8) int2 { int x, y; };
struct __align__(16) int4 { int x, y, z, w; };
struct __align__(8) uint2 { unsigned x, y; };
struct __align__(16) uint4 { unsigned x, y, z, w; };
struct __align__(4) ushort2 { unsigned short x, y; };
struct __align__(4) uchar4 { unsigned char x, y, z, w; };
static inline float2 make_float2(float x, float y) { return {x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
static inline int2 make_int2(int x, int y) { return {x, y}; }
static inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

/* ---- half precision (IEEE binary16, conversions round to nearest even like the hardware's) ----------- */
struct __align__(2) __half { unsigned short __x; };
struct __align__(4) __half2 { __half x, y; };
static inline float __half2float(__half h)
{
    _Float16 f;
    memcpy(&f, &h.__x, 2);
    return (float)f;
}
static inline __half __float2half(float x)
{
    const _Float16 f = (_Float16)x;
    __half h;
    memcpy(&h.__x, &f, 2);
    return h;
}
static inline __half __float2half_rn(float x) { return __float2half(x); }
static inline float __low2float(__half2 h) { return __half2float(h.x); }
static inline float __high2float(__half2 h) { return __half2float(h.y); }
static inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
static inline __half2 __floats2half2_rn(float a, float b) { return {__float2half(a), __float2half(b)}; }
static inline __half __ushort_as_half(unsigned short u) { return {u}; }
static inline unsigned short __half_as_ushort(__half h) { return h.__x; }

/* ---- math intrinsics -------------------------------------------------------------------------------- */
/* macros: glibc's math.h already declares functions of these names (its internal aliases) */
#define __expf(x) expf(x)
#define __logf(x) logf(x)
#define __sinf(x) sinf(x)
#define __cosf(x) cosf(x)
#define __sincosf(x, s, c) (*(s) = sinf(x), *(c) = cosf(x), (void)0)
static inline float __fdividef(float a, float b) { return a / b; }
static inline float __frcp_rn(float x) { return 1.f / x; }
static inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
static inline float __saturatef(float x) { return x < 0.f ? 0.f : x > 1.f ? 1.f : x; }
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
template <typename T> static inline T __ldg(const T *p) { return *p; }

/* ---- the scheduler ---------------------------------------------------------------------------------- */
namespace emu {

enum Wait { RUNNING, AT_BARRIER, AT_WARP, FINISHED };
enum WarpOp { OP_SHFL, OP_XOR, OP_DOWN, OP_UP, OP_SYNCWARP, OP_BALLOT };
enum Order { FORWARD, REVERSE, RANDOM };

struct LaunchCfg {                 /* mirrors skvrt/cuda/emu/__init__.py `_LaunchCfg` */
    unsigned grid[3], block[3];
    unsigned long long shared_mem; /* dynamic shared memory bytes requested by the launch */
    unsigned long long smem_limit; /* the function's max_dynamic_shared_size_bytes (48 KiB by default) */
    int order;
    unsigned long long seed;
};

struct Fiber {
#if defined(__x86_64__)
    void *sp;
#else
    ucontext_t uc;
#endif
    uint3 tid;
    int wait;
    int op, arg, width;
    unsigned mask;
    unsigned long long val, res;
};

struct State {
    Fiber *fibers = nullptr;
    int n = 0, cap = 0;
    char *stacks = nullptr;
    Fiber *self = nullptr;
#if defined(__x86_64__)
    void *sched_sp = nullptr;
#else
    ucontext_t sched_uc;
#endif
    uint3 block_idx{0, 0, 0};
    dim3 block_dim, grid_dim;
    void (*entry)(void *) = nullptr;
    void *entry_ctx = nullptr;
    int *order_buf = nullptr;
    unsigned long long rng = 0;
    char error[512] = "";
};
static State g;
static const size_t STACK_BYTES = 256 * 1024;

static inline void fail(const char *fmt, int a = 0, int b = 0, int c = 0)
{
    if (!g.error[0]) snprintf(g.error, sizeof g.error, fmt, a, b, c);
}

static inline unsigned long long next_random()
{
    /* splitmix64 */
    unsigned long long z = (g.rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

#if defined(__x86_64__)
/* emu_ctx_switch(save, load): push the callee-saved registers and the SSE / x87 control words, store rsp in
 * *save, switch to the stack `load` (laid out the same way) and return into it. */
extern "C" void emu_ctx_switch(void **save, void *load);
__asm__(".text\n"
        ".p2align 4\n"
        ".hidden emu_ctx_switch\n"
        ".globl emu_ctx_switch\n"
        ".type emu_ctx_switch,@function\n"
        "emu_ctx_switch:\n"
        "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
        "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
        "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
        "  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  addq $8, %rsp\n"
        "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
        "  ret\n"
        ".size emu_ctx_switch, .-emu_ctx_switch\n");

static inline void to_scheduler() { emu_ctx_switch(&g.self->sp, g.sched_sp); }
static inline void to_fiber(Fiber *f) { emu_ctx_switch(&g.sched_sp, f->sp); }
#else
static inline void to_scheduler() { swapcontext(&g.self->uc, &g.sched_uc); }
static inline void to_fiber(Fiber *f) { swapcontext(&g.sched_uc, &f->uc); }
#endif

static void fiber_main()
{
    g.entry(g.entry_ctx);
    g.self->wait = FINISHED;
    to_scheduler();
    __builtin_unreachable();
}

static void fiber_init(int i)
{
    Fiber *f = &g.fibers[i];
    char *top = g.stacks + (size_t)(i + 1) * STACK_BYTES;
#if defined(__x86_64__)
    void **sp = (void **)((uintptr_t)top & ~(uintptr_t)15);
    *--sp = nullptr;                       /* fiber_main's return address slot: rsp % 16 == 8 at entry */
    *--sp = (void *)&fiber_main;           /* `ret` target */
    for (int r = 0; r < 6; r++) *--sp = nullptr; /* rbp rbx r12 r13 r14 r15 */
    unsigned csr[2];
    __asm__ volatile("stmxcsr %0" : "=m"(csr[0]));
    __asm__ volatile("fnstcw %0" : "=m"(csr[1]));
    *--sp = nullptr;
    memcpy(sp, csr, 8);
    f->sp = sp;
#else
    getcontext(&f->uc);
    f->uc.uc_stack.ss_sp = top - STACK_BYTES;
    f->uc.uc_stack.ss_size = STACK_BYTES;
    f->uc.uc_link = nullptr;
    makecontext(&f->uc, fiber_main, 0);
#endif
    f->wait = RUNNING;
}

static bool reserve(int n)
{
    if (n <= g.cap) return true;
    munmap(g.stacks, (size_t)g.cap * STACK_BYTES);
    free(g.fibers);
    free(g.order_buf);
    g.stacks = (char *)mmap(nullptr, (size_t)n * STACK_BYTES, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    g.fibers = (Fiber *)calloc((size_t)n, sizeof(Fiber));
    g.order_buf = (int *)calloc((size_t)n, sizeof(int));
    if (g.stacks == MAP_FAILED || !g.fibers || !g.order_buf) {
        g.stacks = nullptr;
        g.cap = 0;
        return false;
    }
    for (int i = 0; i < n; i++) /* a guard page at the low end of every stack: overflow faults */
        mprotect(g.stacks + (size_t)i * STACK_BYTES, 4096, PROT_NONE);
    g.cap = n;
    return true;
}

/* ---- shared memory poisoning: this module's thread-local block holds every __shared__ variable --------- */
thread_local char tls_anchor;
struct TlsBlock { void *data; size_t size; };
static int find_tls(struct dl_phdr_info *info, size_t, void *out)
{
    const uintptr_t a = (uintptr_t)&g;
    bool mine = false;
    size_t tls_size = 0;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) &ph = info->dlpi_phdr[i];
        const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
        if (ph.p_type == PT_LOAD && a >= lo && a < lo + ph.p_memsz) mine = true;
        if (ph.p_type == PT_TLS) tls_size = ph.p_memsz;
    }
    if (!mine) return 0;
    *(TlsBlock *)out = {info->dlpi_tls_data, tls_size};
    return 1;
}
static void poison_shared()
{
    static TlsBlock blk = {nullptr, 0};
    if (!blk.data) {
        tls_anchor = 1; /* makes sure this thread's block is allocated */
        dl_iterate_phdr(find_tls, &blk);
    }
    if (blk.data) memset(blk.data, 0xFF, blk.size);
}

/* ---- warp collectives ------------------------------------------------------------------------------- */
static inline void block_until(int wait)
{
    g.self->wait = wait;
    to_scheduler();
}

template <typename T> static inline T warp_op(int op, unsigned mask, T v, int arg, int width)
{
    static_assert(sizeof(T) <= 8, "warp collectives move at most 8 bytes");
    Fiber *f = g.self;
    f->op = op;
    f->mask = mask;
    f->arg = arg;
    f->width = width;
    f->val = 0;
    memcpy(&f->val, &v, sizeof(T));
    block_until(AT_WARP);
    T r;
    memcpy(&r, &f->res, sizeof(T));
    return r;
}

/* all lanes of warp w are AT_WARP: check they agree, compute every lane's result */
static bool resolve_warp(int w)
{
    const int lo = 32 * w, hi = lo + 32 < g.n ? lo + 32 : g.n, nl = hi - lo;
    const unsigned full = nl == 32 ? 0xFFFFFFFFu : (1u << nl) - 1u;
    const Fiber &f0 = g.fibers[lo];
    for (int i = lo; i < hi; i++) {
        const Fiber &f = g.fibers[i];
        if (f.mask != full) {
            fail("warp %d: collective with mask 0x%08x, the emulator needs every lane of the warp (0x%08x)", w,
                 (int)f.mask, (int)full);
            return false;
        }
        if (f.op != f0.op || f.width != f0.width || (f.op != OP_SHFL && f.arg != f0.arg)) {
            fail("warp %d: lanes reached different warp collectives (op %d vs %d)", w, f.op, f0.op);
            return false;
        }
    }
    unsigned ballot = 0;
    for (int i = lo; i < hi; i++) ballot |= (g.fibers[i].val != 0 ? 1u : 0u) << (i - lo);
    for (int i = lo; i < hi; i++) {
        Fiber &f = g.fibers[i];
        const int lane = i - lo, wd = f.width, seg = lane / wd * wd;
        int src = lane;
        switch (f.op) {
        case OP_SHFL: src = seg + ((f.arg % wd) + wd) % wd; break;
        case OP_XOR: src = lane ^ f.arg; if (src / wd > lane / wd) src = lane; break;
        case OP_DOWN: src = lane % wd + f.arg < wd ? lane + f.arg : lane; break;
        case OP_UP: src = lane % wd >= f.arg ? lane - f.arg : lane; break;
        default: break;
        }
        if (src >= nl) src = lane;
        f.res = f.op == OP_BALLOT ? ballot : g.fibers[lo + src].val;
    }
    for (int i = lo; i < hi; i++) g.fibers[i].wait = RUNNING;
    return true;
}

static void make_order(int order)
{
    for (int i = 0; i < g.n; i++) g.order_buf[i] = order == REVERSE ? g.n - 1 - i : i;
    if (order == RANDOM)
        for (int i = g.n - 1; i > 0; i--) {
            const int j = (int)(next_random() % (unsigned long long)(i + 1));
            const int t = g.order_buf[i];
            g.order_buf[i] = g.order_buf[j];
            g.order_buf[j] = t;
        }
}

static bool warp_waiting(int w)
{
    const int lo = 32 * w, hi = lo + 32 < g.n ? lo + 32 : g.n;
    for (int i = lo; i < hi; i++)
        if (g.fibers[i].wait != AT_WARP) return false;
    return true;
}

/* Strict priority in the round's order: always resume the first runnable fiber. A warp collective is
 * resolved as soon as its last lane arrives, so that warp runs on ahead of the warps behind it in the order
 * until its next barrier: code that a barrier should have separated sees the other warps' stale state. */
static int run_block(int order)
{
    for (int i = 0; i < g.n; i++) fiber_init(i);
    for (;;) {
        make_order(order);
        for (int k = 0; k < g.n;) {
            const int i = g.order_buf[k];
            Fiber *f = &g.fibers[i];
            if (f->wait != RUNNING) {
                k++;
                continue;
            }
            g.self = f;
            to_fiber(f);
            if (g.error[0]) return -1;
            if (f->wait == AT_WARP && warp_waiting(i / 32)) {
                if (!resolve_warp(i / 32)) return -1;
                k = 0;
            }
        }
        int n_warp = 0, n_bar = 0, n_done = 0;
        for (int i = 0; i < g.n; i++) {
            n_warp += g.fibers[i].wait == AT_WARP;
            n_bar += g.fibers[i].wait == AT_BARRIER;
            n_done += g.fibers[i].wait == FINISHED;
        }
        if (n_done == g.n) return 0;
        if (n_warp) {
            fail("block (%d, %d): %d threads wait in a warp collective that the rest of their warp never "
                 "reaches (divergent collective)", (int)g.block_idx.x, (int)g.block_idx.y, n_warp);
            return -1;
        }
        if (n_done) {
            fail("block (%d, %d): __syncthreads reached by %d threads while others exited", (int)g.block_idx.x,
                 (int)g.block_idx.y, n_bar);
            return -1;
        }
        for (int i = 0; i < g.n; i++) g.fibers[i].wait = RUNNING; /* everybody is at the barrier */
    }
}

static int launch(const LaunchCfg *c, void (*entry)(void *), void *ctx)
{
    g.error[0] = 0;
    const int n = (int)(c->block[0] * c->block[1] * c->block[2]);
    if (n <= 0 || n > 1024) {
        fail("block of %d threads (1..1024)", n);
        return -1;
    }
    const unsigned long long limit = c->smem_limit > EMU_DEFAULT_SMEM_BYTES ? c->smem_limit : EMU_DEFAULT_SMEM_BYTES;
    if (c->shared_mem > limit || c->shared_mem > EMU_DYN_SMEM_BYTES) {
        fail("dynamic shared memory of %d bytes over the function's limit %d (max_dynamic_shared_size_bytes)",
             (int)c->shared_mem, (int)limit);
        return -1;
    }
    if (!reserve(n)) {
        fail("out of memory for %d fiber stacks", n);
        return -1;
    }
    g.n = n;
    g.block_dim = dim3(c->block[0], c->block[1], c->block[2]);
    g.grid_dim = dim3(c->grid[0], c->grid[1], c->grid[2]);
    g.entry = entry;
    g.entry_ctx = ctx;
    g.rng = c->seed;
    for (int i = 0; i < n; i++) {
        Fiber &f = g.fibers[i];
        f.tid = {(unsigned)(i % c->block[0]), (unsigned)(i / c->block[0] % c->block[1]),
                 (unsigned)(i / (c->block[0] * c->block[1]))};
    }
    for (unsigned z = 0; z < c->grid[2]; z++)
        for (unsigned y = 0; y < c->grid[1]; y++)
            for (unsigned x = 0; x < c->grid[0]; x++) {
                g.block_idx = {x, y, z};
                poison_shared();
                if (run_block(c->order) != 0) return -1;
            }
    return 0;
}

/* ---- typed entry points: unpack cuLaunchKernel-style argument pointers ------------------------------- */
template <typename T> constexpr char type_code()
{
    return std::is_pointer<T>::value                ? 'p'
           : std::is_same<T, int>::value            ? 'i'
           : std::is_same<T, unsigned>::value       ? 'I'
           : std::is_same<T, long long>::value      ? 'q'
           : std::is_same<T, unsigned long long>::value ? 'Q'
           : std::is_same<T, float>::value          ? 'f'
           : std::is_same<T, double>::value         ? 'd'
                                                    : '?';
}

template <typename... A> struct Call {
    void (*fn)(A...);
    void **args;
    template <size_t... I> void run(std::index_sequence<I...>) { fn(*static_cast<A *>(args[I])...); }
    static void entry(void *self) { static_cast<Call *>(self)->run(std::index_sequence_for<A...>{}); }
    static const char *signature()
    {
        static const char sig[] = {type_code<A>()..., '\0'};
        return sig;
    }
};

template <typename... A> static int launch_kernel(void (*fn)(A...), const LaunchCfg *c, void **args)
{
    Call<A...> call{fn, args};
    return launch(c, &Call<A...>::entry, &call);
}
template <typename... A> static const char *signature_of(void (*)(A...)) { return Call<A...>::signature(); }

} /* namespace emu */

#define threadIdx (::emu::g.self->tid)
#define blockIdx (::emu::g.block_idx)
#define blockDim (::emu::g.block_dim)
#define gridDim (::emu::g.grid_dim)
static const int warpSize = 32;

static inline void __syncthreads() { ::emu::block_until(::emu::AT_BARRIER); }
static inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) { ::emu::warp_op<int>(::emu::OP_SYNCWARP, mask, 0, 0, 32); }
template <typename T> static inline T __shfl_sync(unsigned mask, T v, int src, int width = 32)
{
    return ::emu::warp_op<T>(::emu::OP_SHFL, mask, v, src, width);
}
template <typename T> static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32)
{
    return ::emu::warp_op<T>(::emu::OP_XOR, mask, v, lane_mask, width);
}
template <typename T> static inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32)
{
    return ::emu::warp_op<T>(::emu::OP_DOWN, mask, v, (int)delta, width);
}
template <typename T> static inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32)
{
    return ::emu::warp_op<T>(::emu::OP_UP, mask, v, (int)delta, width);
}
static inline unsigned __ballot_sync(unsigned mask, int pred)
{
    return ::emu::warp_op<unsigned>(::emu::OP_BALLOT, mask, pred ? 1u : 0u, 0, 32);
}

/* fibers never run concurrently: plain read-modify-writes are atomic */
template <typename T> static inline T atomicAdd(T *p, T v) { const T old = *p; *p = old + v; return old; }
template <typename T> static inline T atomicMax(T *p, T v) { const T old = *p; *p = old > v ? old : v; return old; }
template <typename T> static inline T atomicMin(T *p, T v) { const T old = *p; *p = old < v ? old : v; return old; }
template <typename T> static inline T atomicExch(T *p, T v) { const T old = *p; *p = v; return old; }

extern "C" const char *emu_error() { return ::emu::g.error; }

/* one exported launcher + signature per kernel, added after the kernel source by the build helper */
#define EMU_EXPORT(name)                                                                                     \
    extern "C" int emu_launch_##name(const ::emu::LaunchCfg *c, void **args)                              \
    {                                                                                                        \
        return ::emu::launch_kernel(&name, c, args);                                                        \
    }                                                                                                        \
    extern "C" const char *emu_signature_##name() { return ::emu::signature_of(&name); }
