// Kernels that check the emulation itself: each feature, and two deliberate bugs that the
// emulation must catch (a missing barrier, an out-of-bounds read).
#include "common.cuh"

// out[i] = sum of in over the block, through shared memory and a barrier.
extern "C" __global__ void block_sum_ok(const float* in, float* out) {
    __shared__ float scratch[32];
    float total = block_sum(in[blockIdx.x * blockDim.x + threadIdx.x], scratch);
    out[blockIdx.x * blockDim.x + threadIdx.x] = total;
}

// Each thread writes its value to shared memory and reads its neighbour's without a barrier.
extern "C" __global__ void neighbour_racy(const float* in, float* out) {
    __shared__ float values[1024];
    values[threadIdx.x] = in[threadIdx.x];
    // missing __syncthreads()
    out[threadIdx.x] = values[(threadIdx.x + 1) % blockDim.x];
}

extern "C" __global__ void neighbour_synced(const float* in, float* out) {
    __shared__ float values[1024];
    values[threadIdx.x] = in[threadIdx.x];
    __syncthreads();
    out[threadIdx.x] = values[(threadIdx.x + 1) % blockDim.x];
}

// Reads one element past the end: the last thread reads in[n].
extern "C" __global__ void copy_off_by_one(const float* in, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = in[i + 1];
}

// Writes past the end of out by one element.
extern "C" __global__ void write_past_end(float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = 1.0f;   // launched with more threads than n
}

// A barrier that only half of the block reaches.
extern "C" __global__ void divergent_barrier(float* out) {
    if (threadIdx.x < blockDim.x / 2) __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// Shuffles: out[.., 0] xor-butterfly sum, [1] down-shift by 3, [2] broadcast lane 5, [3] ballot.
extern "C" __global__ void shuffles(const float* in, float* out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = in[i];
    out[4 * i + 0] = warp_sum(v);
    out[4 * i + 1] = __shfl_down_sync(FULL_MASK, v, 3);
    out[4 * i + 2] = __shfl_sync(FULL_MASK, v, 5);
    out[4 * i + 3] = (float)__popc(__ballot_sync(FULL_MASK, v > 0.0f));
}

// Atomics from every thread of every block into one counter and one float sum.
extern "C" __global__ void atomics(const int* in, int* counter, unsigned* max_out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    atomicAdd(counter, in[i]);
    atomicMax(max_out, (unsigned)in[i]);
}

// dp4a, half and bfloat16 conversions, element-wise.
extern "C" __global__ void intrinsics(const int* a, const int* b, const float* x, int* dot,
                                      unsigned short* as_half, float* half_back, float* bf16_back, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    dot[i] = __dp4a(a[i], b[i], i);
    uint16 h = f32_to_f16(x[i]);
    as_half[i] = h;
    half_back[i] = f16_to_f32(h);
    bf16_back[i] = bf16_to_f32((uint16)(__float_as_uint(x[i]) >> 16));
}

// Dynamic shared memory and a 2-D block: reverse each row of a tile.
extern "C" __global__ void reverse_rows_2d(const float* in, float* out) {
    DYNAMIC_SHARED(float, tile);
    int w = blockDim.x, r = threadIdx.y, c = threadIdx.x;
    tile[r * w + c] = in[(blockIdx.x * blockDim.y + r) * w + c];
    __syncthreads();
    out[(blockIdx.x * blockDim.y + r) * w + c] = tile[r * w + (w - 1 - c)];
}

// Template kernel instantiated through name_expressions.
template <int K>
__global__ void scale_by(const float* in, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = K * in[i];
}

// Threads past n return early, the others then wait at a barrier they can never share.
extern "C" __global__ void early_return_then_barrier(const float* in, float* out, int n) {
    __shared__ float values[1024];
    if ((int)threadIdx.x >= n) return;
    values[threadIdx.x] = in[threadIdx.x];
    __syncthreads();
    out[threadIdx.x] = values[n - 1 - threadIdx.x];
}

// Reads shared memory that no thread wrote (the emulator poisons it with NaN before each block).
extern "C" __global__ void read_unwritten_shared(float* out) {
    __shared__ float never_written[64];
    out[threadIdx.x] = never_written[threadIdx.x];
}
