// Attention over one layer's KV cache, read in its cache type (f32, f16, q8_0, q4_0, ...) inside
// the kernel.
//
// attention_split: flash-decoding. The cached cells are cut into splits; block (split, head,
// token) runs an online softmax over its split (one warp per key, lanes over the head
// dimension) and writes an unnormalised partial result with its running max and sum.
// attention_combine merges the splits of each (token, head). Grouped-query heads read kv head
// h / (n_head / n_head_kv); the mask is built here from the cells' positions (-1: empty),
// llama_hparams::is_masked_swa's rules for sliding windows and chunks.
#include "quant.cuh"

#define ATT_WARPS 4
#define MAX_HEAD_DIM 576                    // MLA caches 512 latent + 64 rope values per key
#define DIM_CHUNKS (MAX_HEAD_DIM / WARP_SIZE)

enum MaskKind { MASK_FULL = 0, MASK_SLIDING = 1, MASK_CHUNKED = 2 };

// Element e of a cached row of ggml type T (f32, f16, bf16 or a 32-value block type)
template <int T> static __device__ __forceinline__ float cache_value(const uint8* row, int e) { return row_value<T>(row, e); }

static __device__ __forceinline__ bool visible(int64 key_pos, int64 query_pos, int kind, int window) {
    if (key_pos < 0 || key_pos > query_pos) return false;
    if (kind == MASK_SLIDING) return query_pos - key_pos < window;
    if (kind == MASK_CHUNKED) return key_pos >= (query_pos / window) * window;
    return true;
}

// q (T, n_head, d_k) f32 -> part_acc (T, n_head, n_splits, d_v), part_ml (T, n_head, n_splits, 2).
// grid (n_splits, n_head, T), block ATT_WARPS * 32.
template <int TK, int TV>
__global__ void __launch_bounds__(ATT_WARPS * WARP_SIZE) attention_split(
        const float* q, const uint8* K, const uint8* V, const int64* cell_pos, const int64* q_pos,
        float* part_acc, float* part_ml, int n_filled, int n_head, int n_head_kv, int d_k, int d_v,
        int k_row_bytes, int v_row_bytes, int v_head_stride, int kind, int window, int cells_per_split,
        int n_splits, float kq_scale) {
    // V element (c, h, j) is value h * v_head_stride + j of row c (MLA: V is the start of K)
    __shared__ float warp_m[ATT_WARPS], warp_l[ATT_WARPS];
    __shared__ float warp_acc[ATT_WARPS][MAX_HEAD_DIM];
    int split = blockIdx.x, h = blockIdx.y, t = blockIdx.z;
    int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    int hk = h / (n_head / n_head_kv);
    int64 query_pos = q_pos[t];
    const float* qh = q + ((int64)t * n_head + h) * d_k;

    float qr[DIM_CHUNKS], acc[DIM_CHUNKS];
#pragma unroll
    for (int c = 0; c < DIM_CHUNKS; ++c) {
        int j = c * WARP_SIZE + lane;
        qr[c] = j < d_k ? qh[j] * kq_scale : 0.0f;
        acc[c] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    int first = split * cells_per_split, last = min(n_filled, first + cells_per_split);
    for (int cell = first + warp; cell < last; cell += ATT_WARPS) {
        if (!visible(cell_pos[cell], query_pos, kind, window)) continue;      // uniform in the warp
        const uint8* krow = K + (int64)cell * k_row_bytes;
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < DIM_CHUNKS; ++c) {
            int j = c * WARP_SIZE + lane;
            if (j < d_k) dot += qr[c] * cache_value<TK>(krow, hk * d_k + j);
        }
        dot = warp_sum(dot);
        float m_new = fmaxf(m, dot);
        float rescale = __expf(m - m_new), p = __expf(dot - m_new);
        l = l * rescale + p;
        const uint8* vrow = V + (int64)cell * v_row_bytes;
#pragma unroll
        for (int c = 0; c < DIM_CHUNKS; ++c) {
            int j = c * WARP_SIZE + lane;
            if (j < d_v) acc[c] = acc[c] * rescale + p * cache_value<TV>(vrow, hk * v_head_stride + j);
        }
        m = m_new;
    }
    // merge the warps: each warp's partial result weighted by exp(m_w - M)
    if (lane == 0) {
        warp_m[warp] = m;
        warp_l[warp] = l;
    }
#pragma unroll
    for (int c = 0; c < DIM_CHUNKS; ++c) {
        int j = c * WARP_SIZE + lane;
        if (j < d_v) warp_acc[warp][j] = acc[c];
    }
    __syncthreads();
    float M = NEG_INF;
    for (int w = 0; w < ATT_WARPS; ++w) M = fmaxf(M, warp_m[w]);
    float weights[ATT_WARPS], L = 0.0f;
    for (int w = 0; w < ATT_WARPS; ++w) {
        weights[w] = warp_l[w] > 0.0f ? __expf(warp_m[w] - M) : 0.0f;
        L += warp_l[w] * weights[w];
    }
    int64 part = ((int64)t * n_head + h) * n_splits + split;
    for (int j = threadIdx.x; j < d_v; j += blockDim.x) {
        float total = 0.0f;
        for (int w = 0; w < ATT_WARPS; ++w) total += warp_acc[w][j] * weights[w];
        part_acc[part * d_v + j] = total;
    }
    if (threadIdx.x == 0) {
        part_ml[2 * part] = M;
        part_ml[2 * part + 1] = L;
    }
}

// out (T, n_head * d_v) from the splits. grid (n_head, T), block 128.
extern "C" __global__ void __launch_bounds__(128) attention_combine(const float* part_acc, const float* part_ml,
                                                                   float* out, int n_head, int n_splits, int d_v) {
    int h = blockIdx.x, t = blockIdx.y;
    int64 base = ((int64)t * n_head + h) * n_splits;
    float M = NEG_INF;
    for (int s = 0; s < n_splits; ++s)
        if (part_ml[2 * (base + s) + 1] > 0.0f) M = fmaxf(M, part_ml[2 * (base + s)]);
    float L = 0.0f;
    for (int s = 0; s < n_splits; ++s) {
        float l = part_ml[2 * (base + s) + 1];
        if (l > 0.0f) L += l * __expf(part_ml[2 * (base + s)] - M);
    }
    float inv = L > 0.0f ? 1.0f / L : 0.0f;            // a query that sees no key gets zeros
    for (int j = threadIdx.x; j < d_v; j += blockDim.x) {
        float total = 0.0f;
        for (int s = 0; s < n_splits; ++s) {
            float l = part_ml[2 * (base + s) + 1];
            if (l > 0.0f) total += part_acc[(base + s) * d_v + j] * __expf(part_ml[2 * (base + s)] - M);
        }
        out[((int64)t * n_head + h) * d_v + j] = total * inv;
    }
}

// ---- prefill: query tiles sharing key/value tiles ---------------------------------------------

#define TILE_WARPS 8
#define ROWS_PER_WARP 2
#define TILE_ROWS (TILE_WARPS * ROWS_PER_WARP)   // query rows (token, head of the group) per block
#define TILE_KEYS 16
#define MAX_TILE_DIM 256
#define TILE_CHUNKS (MAX_TILE_DIM / WARP_SIZE)

// Many queries: block (row tile, kv head) holds TILE_ROWS query rows of one kv head's group
// (row r = token r / group, head hk * group + r % group) and walks the cache in tiles of
// TILE_KEYS cells, decoded once into shared memory and read by every row of the block. Each warp
// keeps an online softmax for its rows. Head sizes up to 256 (MLA's 576 takes attention_split).
// grid (ceil(n_tokens * group / TILE_ROWS), n_head_kv), block TILE_WARPS * 32.
template <int TK, int TV>
__global__ void __launch_bounds__(TILE_WARPS * WARP_SIZE) attention_tiled(
        const float* q, const uint8* K, const uint8* V, const int64* cell_pos, const int64* q_pos, float* out,
        int n_tokens, int n_filled, int n_head, int n_head_kv, int d_k, int d_v, int k_row_bytes, int v_row_bytes,
        int kind, int window, float kq_scale) {
    __shared__ float k_tile[TILE_KEYS][MAX_TILE_DIM], v_tile[TILE_KEYS][MAX_TILE_DIM];
    __shared__ int64 pos_tile[TILE_KEYS];
    int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    int hk = blockIdx.y, group = n_head / n_head_kv;
    float qr[ROWS_PER_WARP][TILE_CHUNKS], acc[ROWS_PER_WARP][TILE_CHUNKS], m[ROWS_PER_WARP], l[ROWS_PER_WARP];
    int first_row = blockIdx.x * TILE_ROWS + warp * ROWS_PER_WARP, n_rows = n_tokens * group;
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        int row = first_row + r;
        bool valid = row < n_rows;
        int t = valid ? row / group : 0, h = hk * group + row % group;
        m[r] = NEG_INF;
        l[r] = 0.0f;
#pragma unroll
        for (int c = 0; c < TILE_CHUNKS; ++c) {
            int j = c * WARP_SIZE + lane;
            qr[r][c] = valid && j < d_k ? q[((int64)t * n_head + h) * d_k + j] * kq_scale : 0.0f;
            acc[r][c] = 0.0f;
        }
    }
    for (int first = 0; first < n_filled; first += TILE_KEYS) {
        int n_keys = min(TILE_KEYS, n_filled - first);
        for (int e = threadIdx.x; e < TILE_KEYS * MAX_TILE_DIM; e += blockDim.x) {     // decode the tile once
            int key = e / MAX_TILE_DIM, j = e % MAX_TILE_DIM;
            if (key < n_keys && j < d_k) k_tile[key][j] = cache_value<TK>(K + (int64)(first + key) * k_row_bytes, hk * d_k + j);
            if (key < n_keys && j < d_v) v_tile[key][j] = cache_value<TV>(V + (int64)(first + key) * v_row_bytes, hk * d_v + j);
        }
        if (threadIdx.x < TILE_KEYS) pos_tile[threadIdx.x] = threadIdx.x < n_keys ? cell_pos[first + threadIdx.x] : -1;
        __syncthreads();
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; ++r) {
            if (first_row + r >= n_rows) continue;                            // uniform in the warp
            int64 query_pos = q_pos[(first_row + r) / group];
            for (int key = 0; key < n_keys; ++key) {
                if (!visible(pos_tile[key], query_pos, kind, window)) continue;
                float dot = 0.0f;
#pragma unroll
                for (int c = 0; c < TILE_CHUNKS; ++c) {
                    int j = c * WARP_SIZE + lane;
                    if (j < d_k) dot += qr[r][c] * k_tile[key][j];
                }
                dot = warp_sum(dot);
                float m_new = fmaxf(m[r], dot);
                float rescale = __expf(m[r] - m_new), p = __expf(dot - m_new);
                l[r] = l[r] * rescale + p;
#pragma unroll
                for (int c = 0; c < TILE_CHUNKS; ++c) {
                    int j = c * WARP_SIZE + lane;
                    if (j < d_v) acc[r][c] = acc[r][c] * rescale + p * v_tile[key][j];
                }
                m[r] = m_new;
            }
        }
        __syncthreads();                      // every row is done with the tile before the next load
    }
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        int row = first_row + r;
        if (row >= n_rows) continue;
        int t = row / group, h = hk * group + row % group;
        float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
#pragma unroll
        for (int c = 0; c < TILE_CHUNKS; ++c) {
            int j = c * WARP_SIZE + lane;
            if (j < d_v) out[((int64)t * n_head + h) * d_v + j] = acc[r][c] * inv;
        }
    }
}

// ---- writing the cache ------------------------------------------------------------------------

// rows (T, n_values) f32 -> cells of a f32 cache. grid (T, ceil(n_values / 256)).
extern "C" __global__ void __launch_bounds__(256) store_rows_f32(const float* rows, uint8* cache, const int64* cells,
                                                                 int n_values, int row_bytes) {
    int i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= n_values) return;
    ((float*)(cache + cells[blockIdx.x] * row_bytes))[i] = rows[(int64)blockIdx.x * n_values + i];
}

extern "C" __global__ void __launch_bounds__(256) store_rows_f16(const float* rows, uint8* cache, const int64* cells,
                                                                 int n_values, int row_bytes) {
    int i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= n_values) return;
    ((uint16*)(cache + cells[blockIdx.x] * row_bytes))[i] = f32_to_f16(rows[(int64)blockIdx.x * n_values + i]);
}

// q8_0 as ggml's quantize_row_q8_0_ref: d = amax / 127, q = roundf(x * (1 / d)), d stored as f16.
// One warp per block of 32 values; n_values % 32 == 0. grid (T, ceil(n_values / 256)).
extern "C" __global__ void __launch_bounds__(256) store_rows_q8_0(const float* rows, uint8* cache, const int64* cells,
                                                                  int n_values, int row_bytes) {
    int i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i - (int)(threadIdx.x % WARP_SIZE) >= n_values) return;      // whole warps
    float x = rows[(int64)blockIdx.x * n_values + i];
    float amax = warp_max(fabsf(x));
    float d = amax / 127.0f, inverse = d != 0.0f ? 1.0f / d : 0.0f;
    uint8* block = cache + cells[blockIdx.x] * row_bytes + (i / 32) * 34;
    ((int8*)(block + 2))[i % 32] = (int8)roundf(x * inverse);
    if (i % 32 == 0) *(uint16*)block = f32_to_f16(d);
}

extern "C" __global__ void store_positions(int64* cell_pos, const int64* cells, const int64* positions, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) cell_pos[cells[i]] = positions[i];
}

// every cell holding a position >= n_past becomes empty
extern "C" __global__ void forget_cells(int64* cell_pos, int n_cells, int64 n_past) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n_cells && cell_pos[i] >= n_past) cell_pos[i] = -1;
}

// Encoded rows (T, row_bytes) copied to their cells (cache types quantized on the host).
// grid (T, ceil(row_bytes / 256)).
extern "C" __global__ void scatter_rows(const uint8* rows, uint8* cache, const int64* cells, int row_bytes) {
    int i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i < row_bytes) cache[cells[blockIdx.x] * row_bytes + i] = rows[(int64)blockIdx.x * row_bytes + i];
}
