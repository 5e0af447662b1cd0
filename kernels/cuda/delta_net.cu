// The Gated DeltaNet mixer of Qwen3.5 / Qwen3-Next on the device that holds its recurrent state
// (engine/arch/delta_net.py has the math and the NumPy reference): the causal depthwise conv with
// its state, then silu; the delta rule over a d x d state per value head, q and k L2-normalised
// inside it; the gated RMSNorm. Shapes are NumPy order; every array is contiguous float32.
#include "common.cuh"

#define STATE_ROWS_PER_LANE 4       // key rows of a state column each lane holds: d up to 128
#define STATE_COLS_PER_WARP 8       // value columns a warp carries: one 32-byte sector per key row
#define DELTA_WARPS 4

static __device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }

// out[t, c] = silu(sum_j weight[c, j] x[t - K + 1 + j, c]) over x (T, C), continuing from state
// (K-1, C), the previous K-1 inputs (ggml_ssm_conv); state becomes the last K-1 inputs. One
// thread per channel with the window in registers: grid ceil(C / 128), block 128.
template <int K>
__global__ void __launch_bounds__(128) causal_conv_silu(const float* x, float* state, const float* weight,
                                                         float* out, int n_tokens, int n_channels) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= n_channels) return;
    float w[K], window[K - 1];
#pragma unroll
    for (int j = 0; j < K; j++) w[j] = weight[(int64)c * K + j];
#pragma unroll
    for (int j = 0; j < K - 1; j++) window[j] = state[(int64)j * n_channels + c];
    for (int t = 0; t < n_tokens; t++) {
        float current = x[(int64)t * n_channels + c];
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < K - 1; j++) acc += window[j] * w[j];
        acc += current * w[K - 1];
        out[(int64)t * n_channels + c] = silu(acc);
#pragma unroll
        for (int j = 0; j < K - 2; j++) window[j] = window[j + 1];
        window[K - 2] = current;
    }
#pragma unroll
    for (int j = 0; j < K - 1; j++) state[(int64)j * n_channels + c] = window[j];
}

// The delta rule of value head h = blockIdx.x over all n_tokens, in order (decode: one token;
// prefill: the recurrence itself, the state staying in registers between tokens):
//
//     S <- exp(g_t) S;  S <- S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t
//
// q_t, k_t: key head kh of the conv output `mixed` (T, row_stride) = [q (Hk x d) | k (Hk x d) |
// v (Hv x d) | ...], L2-normalised (x / sqrt(sum x^2 + eps)), q also times q_scale; kh = h / (Hv/Hk)
// with `grouped` (qwen3next), else h % Hk. g, beta (T, Hv); state (Hv, d, d) S[h][i][j], i the
// key dim, updated in place; out (T, Hv, d).
// Each warp carries STATE_COLS_PER_WARP columns j of S, lane l the key rows l + 32 r: the two
// products over i are warp sums. grid (Hv, ceil(d / (8 * DELTA_WARPS))), block 32 * DELTA_WARPS.
extern "C" __global__ void __launch_bounds__(32 * DELTA_WARPS) gated_delta_rule(
        const float* mixed, int row_stride, const float* g, const float* beta, float* state, float* out,
        int n_tokens, int n_k_heads, int n_v_heads, int d, int grouped, float eps, float q_scale) {
    const int h = blockIdx.x, lane = threadIdx.x % WARP_SIZE;
    const int col0 = (blockIdx.y * DELTA_WARPS + threadIdx.x / WARP_SIZE) * STATE_COLS_PER_WARP;
    if (col0 >= d) return;                           // the whole warp: no barrier follows
    const int kh = grouped ? h / (n_v_heads / n_k_heads) : h % n_k_heads;
    float* s_head = state + (int64)h * d * d;
    float s[STATE_COLS_PER_WARP][STATE_ROWS_PER_LANE];
#pragma unroll
    for (int c = 0; c < STATE_COLS_PER_WARP; c++)
#pragma unroll
        for (int r = 0; r < STATE_ROWS_PER_LANE; r++) {
            int i = lane + WARP_SIZE * r, j = col0 + c;
            s[c][r] = i < d && j < d ? s_head[(int64)i * d + j] : 0.0f;
        }
    for (int t = 0; t < n_tokens; t++) {
        const float* row = mixed + (int64)t * row_stride;
        const float* v = row + 2 * n_k_heads * d + h * d;
        float q[STATE_ROWS_PER_LANE], k[STATE_ROWS_PER_LANE], qq = 0.0f, kk = 0.0f;
#pragma unroll
        for (int r = 0; r < STATE_ROWS_PER_LANE; r++) {
            int i = lane + WARP_SIZE * r;
            q[r] = i < d ? row[kh * d + i] : 0.0f;
            k[r] = i < d ? row[(n_k_heads + kh) * d + i] : 0.0f;
            qq += q[r] * q[r];
            kk += k[r] * k[r];
        }
        float q_norm = q_scale / sqrtf(warp_sum(qq) + eps), k_norm = 1.0f / sqrtf(warp_sum(kk) + eps);
#pragma unroll
        for (int r = 0; r < STATE_ROWS_PER_LANE; r++) {
            q[r] *= q_norm;
            k[r] *= k_norm;
        }
        const float decay = expf(g[(int64)t * n_v_heads + h]), b = beta[(int64)t * n_v_heads + h];
#pragma unroll
        for (int c = 0; c < STATE_COLS_PER_WARP; c++) {
            const int j = col0 + c;
            if (j >= d) break;                       // the same for every lane of the warp
            float predicted = 0.0f;
#pragma unroll
            for (int r = 0; r < STATE_ROWS_PER_LANE; r++) {
                s[c][r] *= decay;
                predicted += s[c][r] * k[r];
            }
            const float update = b * (v[j] - warp_sum(predicted));
            float o = 0.0f;
#pragma unroll
            for (int r = 0; r < STATE_ROWS_PER_LANE; r++) {
                s[c][r] += k[r] * update;
                o += s[c][r] * q[r];
            }
            o = warp_sum(o);
            if (lane == 0) out[((int64)t * n_v_heads + h) * d + j] = o;
        }
    }
#pragma unroll
    for (int c = 0; c < STATE_COLS_PER_WARP; c++)
#pragma unroll
        for (int r = 0; r < STATE_ROWS_PER_LANE; r++) {
            int i = lane + WARP_SIZE * r, j = col0 + c;
            if (i < d && j < d) s_head[(int64)i * d + j] = s[c][r];
        }
}

// out = x / sqrt(mean(x^2) + eps) * weight * silu(z) over rows of d values (RMSNorm of each
// head's output, not +1-shifted, gated by z). grid n_rows, block 128.
extern "C" __global__ void __launch_bounds__(128) gated_rms_norm(const float* x, const float* weight, const float* z,
                                                                 float* out, int d, float eps) {
    __shared__ float scratch[32];
    const int64 base = (int64)blockIdx.x * d;
    float sum = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) sum += x[base + i] * x[base + i];
    float scale = 1.0f / sqrtf(block_sum(sum, scratch) / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        out[base + i] = x[base + i] * scale * weight[i] * silu(z[base + i]);
}
