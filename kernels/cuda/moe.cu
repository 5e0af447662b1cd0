// MoE router on the device (llama.cpp build_moe_ffn): probabilities (softmax over the experts, or
// sigmoid), selection scores (the probabilities or the raw logits, plus an optional bias),
// DeepSeek-V3's grouped top-k (only the n_groups_used groups with the best sum of their top-2
// scores compete), top-k with ties to the lower expert, weights from the unbiased probabilities,
// optionally renormalised and scaled. One block of 256 threads per token. moe_combine: the chosen
// experts' outputs weighted and summed on the device, in ascending expert order.
#include "common.cuh"

#define MAX_EXPERTS 512
#define MAX_GROUPS 64

enum Gating { GATING_SOFTMAX = 0, GATING_SIGMOID = 1 };

extern "C" __global__ void __launch_bounds__(256) moe_route(
        const float* logits, const float* bias, int64* ids, float* weights, int n_expert, int k, int gating,
        int select_on_logits, int has_bias, int n_groups, int n_groups_used, int norm_weights, float weights_scale) {
    __shared__ float probs[MAX_EXPERTS], scores[MAX_EXPERTS], scratch[32];
    __shared__ int keep_group[MAX_GROUPS];
    const float* row = logits + (int64)blockIdx.x * n_expert;
    float m = NEG_INF;
    for (int e = threadIdx.x; e < n_expert; e += blockDim.x) m = fmaxf(m, row[e]);
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (int e = threadIdx.x; e < n_expert; e += blockDim.x) sum += __expf(row[e] - m);
    sum = block_sum(sum, scratch);
    for (int e = threadIdx.x; e < n_expert; e += blockDim.x) {
        float p = gating == GATING_SOFTMAX ? __expf(row[e] - m) / sum : 1.0f / (1.0f + __expf(-row[e]));
        probs[e] = p;
        scores[e] = (select_on_logits ? row[e] : p) + (has_bias ? bias[e] : 0.0f);
    }
    __syncthreads();
    if (n_groups > 1) {
        int per_group = n_expert / n_groups;
        for (int g = threadIdx.x; g < n_groups; g += blockDim.x) {       // each group's top-2 sum
            float best = NEG_INF, second = NEG_INF;
            for (int e = g * per_group; e < (g + 1) * per_group; ++e) {
                float s = scores[e];
                if (s > best) { second = best; best = s; } else if (s > second) second = s;
            }
            scratch[g] = best + second;
        }
        __syncthreads();
        for (int g = threadIdx.x; g < n_groups; g += blockDim.x) {       // beaten by fewer than n_groups_used
            int beaten = 0;
            for (int o = 0; o < n_groups; ++o) beaten += scratch[o] > scratch[g] || (scratch[o] == scratch[g] && o < g);
            keep_group[g] = beaten < n_groups_used;
        }
        __syncthreads();
        for (int e = threadIdx.x; e < n_expert; e += blockDim.x)
            if (!keep_group[e / per_group]) scores[e] = NEG_INF;
        __syncthreads();
    }
    if (threadIdx.x == 0) {                  // k is small: one thread picks, highest first, ties to the lower expert
        __shared__ unsigned char taken[MAX_EXPERTS];
        for (int e = 0; e < n_expert; ++e) taken[e] = 0;
        float total = 0.0f;
        int64* out_ids = ids + (int64)blockIdx.x * k;
        float* out_w = weights + (int64)blockIdx.x * k;
        for (int j = 0; j < k; ++j) {
            int pick = -1;
            for (int e = 0; e < n_expert; ++e)
                if (!taken[e] && (pick < 0 || scores[e] > scores[pick])) pick = e;
            taken[pick] = 1;
            out_ids[j] = pick;
            out_w[j] = probs[pick];
            total += probs[pick];
        }
        if (norm_weights) for (int j = 0; j < k; ++j) out_w[j] /= fmaxf(total, 6.103515625e-5f);
        if (weights_scale != 0.0f && weights_scale != 1.0f) for (int j = 0; j < k; ++j) out_w[j] *= weights_scale;
    }
}

// out (T, n) = sum over the k slots of token t, in ascending expert id, of y[t * k + slot] *
// weights[t, slot]: the order and the rounding (a product, then a sum, never fused) of the
// engine's host-routed sum, so both give the same numbers. grid (ceil(n / 256), T), block 256.
extern "C" __global__ void __launch_bounds__(256) moe_combine(const float* y, const int64* ids, const float* weights,
                                                              float* out, int n, int k) {
    int i = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
    if (i >= n) return;
    const int64* token_ids = ids + (int64)t * k;
    float acc = 0.0f;
    int64 previous = -1;
    for (int j = 0; j < k; ++j) {
        int slot = -1;                       // the slot of the smallest expert above the previous one
        for (int s = 0; s < k; ++s)
            if (token_ids[s] > previous && (slot < 0 || token_ids[s] < token_ids[slot])) slot = s;
        previous = token_ids[slot];
        acc = __fadd_rn(acc, __fmul_rn(y[((int64)t * k + slot) * n + i], weights[(int64)t * k + slot]));
    }
    out[(int64)t * n + i] = acc;
}
