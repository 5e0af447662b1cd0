// Rows of weights decoded to float32: embedding lookup (get_rows) and the dequantization of a
// weight tile for prefill matmuls (cuBLAS on the GPU multiplies the tile).
#include "quant.cuh"

// out (n_ids, n_cols) = rows ids of table (n_rows, row_bytes). grid (n_ids, ceil(n_cols / 256)).
template <int TYPE>
__global__ void __launch_bounds__(256) get_rows(const uint8* table, const int64* ids, float* out, int n_cols,
                                               int row_bytes) {
    int i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= n_cols) return;
    const uint8* row = table + ids[blockIdx.x] * (int64)row_bytes;
    out[(int64)blockIdx.x * n_cols + i] = row_value<TYPE>(row, i);
}

// out (n_rows, n_cols) f32 from W (n_rows, row_bytes). grid (n_rows, ceil(n_cols / 256)).
template <int TYPE>
__global__ void __launch_bounds__(256) dequantize_rows(const uint8* W, float* out, int n_cols, int row_bytes) {
    int i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= n_cols) return;
    out[(int64)blockIdx.x * n_cols + i] = row_value<TYPE>(W + (int64)blockIdx.x * row_bytes, i);
}
