// Row and element-wise ops of a forward pass: RMS norm, softmax, rope (tables and rotation),
// SwiGLU / GeGLU, residual add, scaling by a constant and logit soft-capping; for a quantized KV
// cache, the Hadamard rotation of heads and queries rounded to q8_1. Shapes are NumPy order; every array is contiguous float32.
#include "common.cuh"

// out = x / sqrt(mean(x^2) + eps) (* w). grid n_rows, block 256 (llama.cpp build_norm, RMS).
extern "C" __global__ void __launch_bounds__(256) rms_norm(const float* x, const float* w, float* out, int n,
                                                           float eps, int has_weight) {
    __shared__ float scratch[32];
    const float* row = x + (int64)blockIdx.x * n;
    float sum = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) sum += row[i] * row[i];
    float scale = rsqrtf(block_sum(sum, scratch) / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        out[(int64)blockIdx.x * n + i] = row[i] * scale * (has_weight ? w[i] : 1.0f);
}

// out = softmax(scale * x) over each row. grid n_rows, block 256.
extern "C" __global__ void __launch_bounds__(256) softmax_rows(const float* x, float* out, int n, float scale) {
    __shared__ float scratch[32];
    const float* row = x + (int64)blockIdx.x * n;
    float m = NEG_INF;
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, scale * row[i]);
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) sum += __expf(scale * row[i] - m);
    float inv = 1.0f / block_sum(sum, scratch);
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[(int64)blockIdx.x * n + i] = __expf(scale * row[i] - m) * inv;
}

// cos and sin (n_tokens, n_dims / 2) of each rotation with its magnitude (ggml_rope_cache_init):
// theta = pos * base^(-2i/n_dims) / freq_factor[i], YaRN's ramp between interpolated and
// extrapolated angles over the corrected dims [corr_low, corr_high]. Angles in double: at long
// positions a float angle is off by 1e-4 radians. grid ceil(n_tokens * n_dims / 2 / 256).
extern "C" __global__ void rope_cos_sin(const int64* positions, const float* freq_factors, int has_freq_factors,
                                        float* cos_out, float* sin_out, int n_tokens, int n_dims, float base,
                                        float freq_scale, float ext_factor, float attn_factor, float corr_low,
                                        float corr_high) {
    int half = n_dims / 2;
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n_tokens * half) return;
    int t = k / half, i = k % half;
    double theta_extrap = (double)positions[t] * pow((double)base, -2.0 * i / n_dims);
    if (has_freq_factors) theta_extrap /= (double)freq_factors[i];
    double theta = freq_scale * theta_extrap, mscale = attn_factor;
    if (ext_factor != 0.0f) {
        double y = (i - corr_low) / fmax(0.001, (double)(corr_high - corr_low));
        double ramp = (1.0 - fmin(1.0, fmax(0.0, y))) * ext_factor;
        theta = theta * (1.0 - ramp) + theta_extrap * ramp;
        mscale *= 1.0 + 0.1 * log(1.0 / freq_scale);
    }
    cos_out[k] = (float)(cos(theta) * mscale);
    sin_out[k] = (float)(sin(theta) * mscale);
}

// Rotate the first n_dims values of each head of x (n_tokens, n_head, head_dim); the rest are
// copied. NORM pairs (x[2i], x[2i+1]); NEOX pairs (x[i], x[i + n_dims/2]). One thread per pair
// or copied value: grid ceil(n_tokens * n_head * (head_dim - n_dims / 2) / 256).
extern "C" __global__ void rope_apply(const float* x, const float* cos_t, const float* sin_t, float* out,
                                      int n_tokens, int n_head, int head_dim, int n_dims, int neox) {
    int half = n_dims / 2, per_head = head_dim - half;
    int64 k = (int64)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= (int64)n_tokens * n_head * per_head) return;
    int j = (int)(k % per_head);
    int64 head = k / per_head;
    int t = (int)(head / n_head);
    const float* xh = x + head * head_dim;
    float* oh = out + head * head_dim;
    if (j >= half) {                         // a value past the rotated dims
        int d = j - half + n_dims;
        oh[d] = xh[d];
        return;
    }
    float c = cos_t[(int64)t * half + j], s = sin_t[(int64)t * half + j];
    int a = neox ? j : 2 * j, b = neox ? j + half : 2 * j + 1;
    float x0 = xh[a], x1 = xh[b];
    oh[a] = x0 * c - x1 * s;
    oh[b] = x0 * s + x1 * c;
}

static __device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }

static __device__ __forceinline__ float gelu_tanh(float x) {       // ggml_gelu, tanh approximation
    const float c = 0.7978845608028654f;
    return 0.5f * x * (1.0f + tanhf(c * x * (1.0f + 0.044715f * x * x)));
}

extern "C" __global__ void swiglu(const float* gate, const float* up, float* out, int64 n) {
    int64 i = (int64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = silu(gate[i]) * up[i];
}

extern "C" __global__ void geglu(const float* gate, const float* up, float* out, int64 n) {
    int64 i = (int64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = gelu_tanh(gate[i]) * up[i];
}

extern "C" __global__ void add(const float* a, const float* b, float* out, int64 n) {
    int64 i = (int64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] + b[i];
}

extern "C" __global__ void scale(const float* x, float* out, int64 n, float s) {
    int64 i = (int64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = x[i] * s;
}

// cap * tanh(x / cap) (gemma's final_logit_softcapping)
extern "C" __global__ void softcap(const float* x, float* out, int64 n, float cap) {
    int64 i = (int64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = cap * tanhf(x[i] / cap);
}

// out = each `block`-sized run of x times the block x block matrix h (a quantized KV cache's
// Hadamard rotation, engine.arch.kv_rotation). grid ceil(n / 256).
extern "C" __global__ void rotate_blocks(const float* x, const float* h, float* out, int64 n, int block) {
    int64 i = (int64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int j = (int)(i % block);
    const float* run = x + (i - j);
    float sum = 0.0f;
    for (int k = 0; k < block; ++k) sum += run[k] * h[(int64)k * block + j];
    out[i] = sum;
}

// x rounded to q8_1 values: per 32, d = amax / 127, d * round(x / d) (quantize_q8_1's rounding,
// kept as floats: the query a quantized key is dotted with). One warp per 32 values; n % 32 == 0.
extern "C" __global__ void __launch_bounds__(256) round_q8_1(const float* x, float* out, int64 n) {
    int64 i = (int64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i - (int64)(threadIdx.x % WARP_SIZE) >= n) return;         // whole warps
    float v = x[i];
    float d = warp_max(fabsf(v)) / 127.0f;
    out[i] = d == 0.0f ? 0.0f : roundf(v / d) * d;
}
