// Shared helpers of the kernels: integer types, half/bfloat16 conversions, warp reductions,
// dynamic shared memory. Header-free on the GPU (NVRTC needs no CUDA headers for these), and
// compiled against emu/cuda_emu.h on the CPU.
#pragma once

typedef signed char int8;
typedef unsigned char uint8;
typedef short int16;
typedef unsigned short uint16;
typedef unsigned int uint32;
typedef long long int64;

#define WARP_SIZE 32
#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)

#ifdef CUDA_EMU
#define DYNAMIC_SHARED(type, name) type* name = (type*)emu::state().dynamic_shared
static __device__ __forceinline__ float f16_to_f32(uint16 h) { return emu_half_bits_to_float(h); }
static __device__ __forceinline__ uint16 f32_to_f16(float f) { return emu_float_to_half_bits(f); }
#else
#define DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) unsigned char name##_bytes[]; \
    type* name = (type*)name##_bytes
static __device__ __forceinline__ float f16_to_f32(uint16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
static __device__ __forceinline__ uint16 f32_to_f16(float f) {
    uint16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif

static __device__ __forceinline__ float bf16_to_f32(uint16 h) { return __uint_as_float((uint32)h << 16); }

static __device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

static __device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    return v;
}

static __device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

// Sum over a block of up to 1024 threads (blockDim.x a multiple of 32); every thread gets the total.
// `scratch` is 32 floats of shared memory.
static __device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, n_warps = blockDim.x / WARP_SIZE;
    v = warp_sum(v);
    __syncthreads();                 // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

static __device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, n_warps = blockDim.x / WARP_SIZE;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : NEG_INF;
    return warp_max(v);
}
