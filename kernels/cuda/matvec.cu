// Decode matmuls (1 to 8 tokens): y = x @ W.T with W in its GGUF encoding, each weight byte read
// once. Quantized types: the activations are first quantized to q8_1 blocks (quantize_q8_1), then
// each warp computes one output row with integer dot products per 32-value unit (quant.cuh).
// mul_mat_vec_f: float activations used as they are (the float weight types; every type when
// the run asks for exact f32 activations), one warp per row. mul_mat_vec_id_q / _f: one token
// through the experts its router picked on the device (ids in device memory, nothing read back).
#include "quant.cuh"

#define MAX_TOKENS 8
#define ROWS_PER_BLOCK 4            // one warp per row, 128 threads

// x: (n_tokens, n_cols) f32, n_cols % 32 == 0 -> y: (n_tokens, n_cols / 32) blocks.
// One warp per block of 32 values; 8 warps per thread block.
extern "C" __global__ void __launch_bounds__(256) quantize_q8_1(const float* x, block_q8_1* y, int n_blocks_total) {
    int unit = blockIdx.x * 8 + threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    if (unit >= n_blocks_total) return;              // whole warps leave together
    float v = x[(int64)unit * 32 + lane];
    float amax = warp_max(fabsf(v));
    float d = amax / 127.0f;
    int q = amax == 0.0f ? 0 : (int)roundf(v / d);
    int sum = warp_sum_int(q);
    y[unit].qs[lane] = (int8)q;
    if (lane == 0) {
        y[unit].d = d;
        y[unit].s = d * (float)sum;
    }
}

// W: (n_rows, row_bytes) bytes of TYPE; y: (n_tokens, n_cols / 32) q8_1 blocks;
// out[t * out_stride + row] = sum over the row. One warp per row.
template <int TYPE>
static __device__ __forceinline__ void mat_vec_q_row(const uint8* W, const block_q8_1* y, float* out, int row,
                                                     int n_cols, int row_bytes, int n_tokens, int out_stride) {
    typedef Quant<TYPE> Q;
    const int UNITS_PER_BLOCK = Q::QK / 32;
    int lane = threadIdx.x % WARP_SIZE;
    int n_units = n_cols / 32;
    const uint8* w = W + (int64)row * row_bytes;
    float acc[MAX_TOKENS];
#pragma unroll
    for (int t = 0; t < MAX_TOKENS; ++t) acc[t] = 0.0f;
    for (int u = lane; u < n_units; u += WARP_SIZE) {
        const uint8* block = w + (u / UNITS_PER_BLOCK) * Q::BLOCK_BYTES;
        int sub = u % UNITS_PER_BLOCK;
#pragma unroll
        for (int t = 0; t < MAX_TOKENS; ++t)
            if (t < n_tokens) acc[t] += Q::dot(block, sub, y[t * n_units + u]);
    }
#pragma unroll
    for (int t = 0; t < MAX_TOKENS; ++t) {
        if (t < n_tokens) {
            float total = warp_sum(acc[t]);
            if (lane == 0) out[(int64)t * out_stride + row] = total;
        }
    }
}

// W: (n_rows, row_bytes) of any type; x: (n_tokens, n_cols) f32, used exactly (no q8_1 rounding):
// the float weight types, and every type when activations are not rounded. One warp per row.
template <int TYPE>
static __device__ __forceinline__ void mat_vec_f_row(const uint8* W, const float* x, float* out, int row, int n_cols,
                                                     int row_bytes, int n_tokens, int out_stride) {
    int lane = threadIdx.x % WARP_SIZE;
    const uint8* w = W + (int64)row * row_bytes;
    float acc[MAX_TOKENS];
#pragma unroll
    for (int t = 0; t < MAX_TOKENS; ++t) acc[t] = 0.0f;
    for (int i = lane; i < n_cols; i += WARP_SIZE) {
        float wi = row_value<TYPE>(w, i);
#pragma unroll
        for (int t = 0; t < MAX_TOKENS; ++t)
            if (t < n_tokens) acc[t] += wi * x[(int64)t * n_cols + i];
    }
#pragma unroll
    for (int t = 0; t < MAX_TOKENS; ++t) {
        if (t < n_tokens) {
            float total = warp_sum(acc[t]);
            if (lane == 0) out[(int64)t * out_stride + row] = total;
        }
    }
}

template <int TYPE>
__global__ void __launch_bounds__(128) mul_mat_vec_q(const uint8* W, const block_q8_1* y, float* out, int n_rows,
                                                     int n_cols, int row_bytes, int n_tokens, int out_stride) {
    int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP_SIZE;
    if (row < n_rows) mat_vec_q_row<TYPE>(W, y, out, row, n_cols, row_bytes, n_tokens, out_stride);
}

template <int TYPE>
__global__ void __launch_bounds__(128) mul_mat_vec_f(const uint8* W, const float* x, float* out, int n_rows,
                                                     int n_cols, int row_bytes, int n_tokens, int out_stride) {
    int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP_SIZE;
    if (row < n_rows) mat_vec_f_row<TYPE>(W, x, out, row, n_cols, row_bytes, n_tokens, out_stride);
}

// ---- the selected experts of one token, chosen on the device ------------------------------------

// One token through the experts ids[s] (s < n_slots) of a routed-expert tensor W (n_expert,
// n_rows, row_bytes): out (n_slots, n_rows), slot s from expert ids[s]. The input is one row
// shared by every slot (x_slot_stride 0: gate and up) or one row per slot (down). Each slot's
// row is the sum mul_mat_vec computes for that expert alone, so a decode step whose router stays
// on the device (a CUDA graph) gives the numbers of one launch per expert.
// grid (ceil(n_rows / ROWS_PER_BLOCK), n_slots), block 128.
template <int TYPE>
__global__ void __launch_bounds__(128) mul_mat_vec_id_q(const uint8* W, const int64* ids, const block_q8_1* y,
                                                        float* out, int n_rows, int n_cols, int row_bytes,
                                                        int y_slot_stride) {
    int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP_SIZE, slot = blockIdx.y;
    if (row >= n_rows) return;
    const uint8* expert = W + ids[slot] * (int64)n_rows * row_bytes;
    mat_vec_q_row<TYPE>(expert, y + (int64)slot * y_slot_stride, out + (int64)slot * n_rows, row, n_cols, row_bytes,
                        1, n_rows);
}

template <int TYPE>
__global__ void __launch_bounds__(128) mul_mat_vec_id_f(const uint8* W, const int64* ids, const float* x, float* out,
                                                        int n_rows, int n_cols, int row_bytes, int x_slot_stride) {
    int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP_SIZE, slot = blockIdx.y;
    if (row >= n_rows) return;
    const uint8* expert = W + ids[slot] * (int64)n_rows * row_bytes;
    mat_vec_f_row<TYPE>(expert, x + (int64)slot * x_slot_stride, out + (int64)slot * n_rows, row, n_cols, row_bytes,
                        1, n_rows);
}
