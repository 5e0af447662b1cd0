// Block layouts of the ggml quantization types (ggml-common.h) and, for each, the integer dot
// product of one 32-value sub-block with one q8_1 activation block.
//
// Weights stay in their GGUF bytes. A row of n_cols values is n_cols/QK blocks of BLOCK_BYTES; a
// "unit" is 32 consecutive values: one block for the 32-value types, 1/8 of a super-block for the
// K-quants and IQ4_XS. Every unit's dot product is a few __dp4a on 4 packed values at a time.
#pragma once
#include "common.cuh"

// Activations quantized to q8_1: 32 int8 values with their scale d and s = d * sum(q), so that a
// weight offset (Q4_1's m, the K-quants' mins) multiplies s instead of every value.
struct __align__(8) block_q8_1 {
    float d;
    float s;
    int8 qs[32];
};

enum QuantType {        // ggml_type numbers
    T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
    T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_IQ4_NL = 20, T_IQ4_XS = 23,
    T_BF16 = 30,
};

// 4 bytes from a 2-byte-aligned address (blocks of 18, 22, 110, 210 bytes are not 4-aligned)
static __device__ __forceinline__ int load_i32_a2(const uint8* p) {
    const uint16* h = (const uint16*)p;
    return (int)((uint32)h[0] | ((uint32)h[1] << 16));
}

static __device__ __forceinline__ int load_i32_a4(const uint8* p) { return *(const int*)p; }

static __device__ __forceinline__ float load_f16(const uint8* p) { return f16_to_f32(*(const uint16*)p); }

// the 16 int8 values of IQ4_NL / IQ4_XS, indexed by a nibble (constant memory: a local array
// would live in the thread's stack)
static __device__ __constant__ int8 iq4_values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

static __device__ __forceinline__ int iq4_value(int nibble) { return iq4_values[nibble]; }

// 4 nibbles (in the low nibble of each byte of `v`) -> 4 packed int8 IQ4 values
static __device__ __forceinline__ int iq4_lookup4(int v) {
    int out = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) out |= (iq4_value((v >> (8 * k)) & 0xF) & 0xFF) << (8 * k);
    return out;
}

template <int TYPE> struct Quant;

// value l (0..31) of a 32-value block whose nibbles are laid out as Q4_0's
static __device__ __forceinline__ int nibble32(const uint8* qs, int l) { return l < 16 ? qs[l] & 0xF : qs[l - 16] >> 4; }


// Q4_0: d (f16), qs[16]; value j = d*((qs[j] & 15) - 8), value j+16 = d*((qs[j] >> 4) - 8)
template <> struct Quant<T_Q4_0> {
    enum { QK = 32, BLOCK_BYTES = 18 };
    static __device__ __forceinline__ float value(const uint8* b, int s, int l) {
        return load_f16(b) * (float)(nibble32(b + 2, l) - 8);
    }
    static __device__ __forceinline__ float dot(const uint8* b, int, const block_q8_1& y) {
        const int* yq = (const int*)y.qs;
        int sum = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int v = load_i32_a2(b + 2 + 4 * i);
            sum = __dp4a(v & 0x0F0F0F0F, yq[i], sum);
            sum = __dp4a((v >> 4) & 0x0F0F0F0F, yq[i + 4], sum);
        }
        return load_f16(b) * (y.d * sum - 8.0f * y.s);
    }
};

// Q4_1: d, m (f16), qs[16]; value = d*q + m
template <> struct Quant<T_Q4_1> {
    enum { QK = 32, BLOCK_BYTES = 20 };
    static __device__ __forceinline__ float value(const uint8* b, int s, int l) {
        return load_f16(b) * (float)nibble32(b + 4, l) + load_f16(b + 2);
    }
    static __device__ __forceinline__ float dot(const uint8* b, int, const block_q8_1& y) {
        const int* yq = (const int*)y.qs;
        int sum = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int v = load_i32_a4(b + 4 + 4 * i);
            sum = __dp4a(v & 0x0F0F0F0F, yq[i], sum);
            sum = __dp4a((v >> 4) & 0x0F0F0F0F, yq[i + 4], sum);
        }
        return load_f16(b) * y.d * sum + load_f16(b + 2) * y.s;
    }
};

// 4 fifth bits of Q5_0/Q5_1 from qh, moved to bit 4 of each byte
static __device__ __forceinline__ int fifth_bits(uint32 qh, int first) {
    int out = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) out |= ((qh >> (first + k)) & 1) << (8 * k + 4);
    return out;
}

// Q5_0: d, qh[4], qs[16]; q = nibble | fifth bit << 4; value = d*(q - 16)
template <> struct Quant<T_Q5_0> {
    enum { QK = 32, BLOCK_BYTES = 22 };
    static __device__ __forceinline__ float value(const uint8* b, int s, int l) {
        int high = ((uint32)load_i32_a2(b + 2) >> l) & 1;
        return load_f16(b) * (float)((nibble32(b + 6, l) | (high << 4)) - 16);
    }
    static __device__ __forceinline__ float dot(const uint8* b, int, const block_q8_1& y) {
        const int* yq = (const int*)y.qs;
        uint32 qh = (uint32)load_i32_a2(b + 2);
        int sum = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int v = load_i32_a2(b + 6 + 4 * i);
            sum = __dp4a((v & 0x0F0F0F0F) | fifth_bits(qh, 4 * i), yq[i], sum);
            sum = __dp4a(((v >> 4) & 0x0F0F0F0F) | fifth_bits(qh, 16 + 4 * i), yq[i + 4], sum);
        }
        return load_f16(b) * (y.d * sum - 16.0f * y.s);
    }
};

// Q5_1: d, m, qh[4], qs[16]; value = d*q + m
template <> struct Quant<T_Q5_1> {
    enum { QK = 32, BLOCK_BYTES = 24 };
    static __device__ __forceinline__ float value(const uint8* b, int s, int l) {
        int high = ((uint32)load_i32_a4(b + 4) >> l) & 1;
        return load_f16(b) * (float)(nibble32(b + 8, l) | (high << 4)) + load_f16(b + 2);
    }
    static __device__ __forceinline__ float dot(const uint8* b, int, const block_q8_1& y) {
        const int* yq = (const int*)y.qs;
        uint32 qh = (uint32)load_i32_a4(b + 4);
        int sum = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int v = load_i32_a4(b + 8 + 4 * i);
            sum = __dp4a((v & 0x0F0F0F0F) | fifth_bits(qh, 4 * i), yq[i], sum);
            sum = __dp4a(((v >> 4) & 0x0F0F0F0F) | fifth_bits(qh, 16 + 4 * i), yq[i + 4], sum);
        }
        return load_f16(b) * y.d * sum + load_f16(b + 2) * y.s;
    }
};

// Q8_0: d, qs[32] int8
template <> struct Quant<T_Q8_0> {
    enum { QK = 32, BLOCK_BYTES = 34 };
    static __device__ __forceinline__ float value(const uint8* b, int s, int l) {
        return load_f16(b) * (float)((const int8*)(b + 2))[l];
    }
    static __device__ __forceinline__ float dot(const uint8* b, int, const block_q8_1& y) {
        const int* yq = (const int*)y.qs;
        int sum = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) sum = __dp4a(load_i32_a2(b + 2 + 4 * i), yq[i], sum);
        return load_f16(b) * y.d * sum;
    }
};

// IQ4_NL: d, qs[16]; nibbles as Q4_0, mapped through the 16-value table
template <> struct Quant<T_IQ4_NL> {
    enum { QK = 32, BLOCK_BYTES = 18 };
    static __device__ __forceinline__ float value(const uint8* b, int s, int l) {
        return load_f16(b) * (float)iq4_value(nibble32(b + 2, l));
    }
    static __device__ __forceinline__ float dot(const uint8* b, int, const block_q8_1& y) {
        const int* yq = (const int*)y.qs;
        int sum = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int v = load_i32_a2(b + 2 + 4 * i);
            sum = __dp4a(iq4_lookup4(v & 0x0F0F0F0F), yq[i], sum);
            sum = __dp4a(iq4_lookup4((v >> 4) & 0x0F0F0F0F), yq[i + 4], sum);
        }
        return load_f16(b) * y.d * sum;
    }
};

// Sum of 16 int8 q8 values starting at `first` (for 16-value groups with their own min)
static __device__ __forceinline__ int q8_sum16(const block_q8_1& y, int first) {
    const int* yq = (const int*)(y.qs + first);
    int sum = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) sum = __dp4a(0x01010101, yq[i], sum);
    return sum;
}

// Q2_K (256 values): scales[16] (4-bit scale | 4-bit min << 4 per 16 values), qs[64], d, dmin.
// Unit s (32 values): half h = s/4, shift 2*(s%4): q = (qs[32h + l] >> shift) & 3,
// scale byte 2s + l/16; value = d*sc*q - dmin*m.
template <> struct Quant<T_Q2_K> {
    enum { QK = 256, BLOCK_BYTES = 84 };
    static __device__ __forceinline__ float value(const uint8* b, int s, int l) {
        int q = (b[16 + 32 * (s / 4) + l] >> (2 * (s % 4))) & 3, sc = b[2 * s + l / 16];
        return load_f16(b + 80) * (float)((sc & 0xF) * q) - load_f16(b + 82) * (float)(sc >> 4);
    }
    static __device__ __forceinline__ float dot(const uint8* b, int s, const block_q8_1& y) {
        const int* yq = (const int*)y.qs;
        const uint8* qs = b + 16 + 32 * (s / 4);
        int shift = 2 * (s % 4);
        float total = 0.0f, mins = 0.0f;
#pragma unroll
        for (int g = 0; g < 2; ++g) {
            int sum = 0;
#pragma unroll
            for (int i = 0; i < 4; ++i) sum = __dp4a((load_i32_a4(qs + 16 * g + 4 * i) >> shift) & 0x03030303, yq[4 * g + i], sum);
            int sc = b[2 * s + g];
            total += (float)((sc & 0xF) * sum);
            mins += (float)((sc >> 4) * q8_sum16(y, 16 * g));
        }
        return y.d * (load_f16(b + 80) * total - load_f16(b + 82) * mins);
    }
};

// Q3_K (256 values): hmask[32], qs[64], scales[12] (16 six-bit scales, biased by 32), d.
// Unit s: q = ((qs[32h + l] >> 2*(s%4)) & 3) - (hmask[l] bit s ? 0 : 4), scale 2s + l/16.
static __device__ __forceinline__ int q3k_scale(const uint8* scales, int k) {
    int low = k < 8 ? scales[k] & 0xF : scales[k - 8] >> 4;
    int high = (scales[8 + k % 4] >> (2 * (k / 4))) & 3;
    return (low | (high << 4)) - 32;
}

template <> struct Quant<T_Q3_K> {
    enum { QK = 256, BLOCK_BYTES = 110 };
    static __device__ __forceinline__ float value(const uint8* b, int s, int l) {
        int low = (b[32 + 32 * (s / 4) + l] >> (2 * (s % 4))) & 3, high = (b[l] >> s) & 1;
        return load_f16(b + 108) * (float)(q3k_scale(b + 96, 2 * s + l / 16) * (low - (high ? 0 : 4)));
    }
    static __device__ __forceinline__ float dot(const uint8* b, int s, const block_q8_1& y) {
        const int* yq = (const int*)y.qs;
        const uint8* qs = b + 32 + 32 * (s / 4);
        int shift = 2 * (s % 4);
        int total = 0;
#pragma unroll
        for (int g = 0; g < 2; ++g) {
            int sum = 0;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                int low = (load_i32_a2(qs + 16 * g + 4 * i) >> shift) & 0x03030303;
                int hbits = (load_i32_a2(b + 16 * g + 4 * i) >> s) & 0x01010101;   // 1 where no 4 is subtracted
                int q = (int)__vsub4(low, (hbits ^ 0x01010101) << 2);
                sum = __dp4a(q, yq[4 * g + i], sum);
            }
            total += q3k_scale(b + 96, 2 * s + g) * sum;
        }
        return load_f16(b + 108) * y.d * total;
    }
};

// The 6-bit scale and min of sub-block j of Q4_K/Q5_K (ggml's get_scale_min_k4)
static __device__ __forceinline__ void k4_scale_min(const uint8* q, int j, int& sc, int& m) {
    if (j < 4) {
        sc = q[j] & 63;
        m = q[j + 4] & 63;
    } else {
        sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// Q4_K (256 values): d, dmin, scales[12], qs[128]. Unit s: nibble (s odd: high) of qs[32*(s/2) + l];
// value = d*sc*q - dmin*m.
template <> struct Quant<T_Q4_K> {
    enum { QK = 256, BLOCK_BYTES = 144 };
    static __device__ __forceinline__ float value(const uint8* b, int s, int l) {
        int byte = b[16 + 32 * (s / 2) + l], q = s % 2 ? byte >> 4 : byte & 0xF, sc, m;
        k4_scale_min(b + 4, s, sc, m);
        return load_f16(b) * (float)(sc * q) - load_f16(b + 2) * (float)m;
    }
    static __device__ __forceinline__ float dot(const uint8* b, int s, const block_q8_1& y) {
        const int* yq = (const int*)y.qs;
        const uint8* qs = b + 16 + 32 * (s / 2);
        int shift = 4 * (s % 2);
        int sum = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) sum = __dp4a((load_i32_a4(qs + 4 * i) >> shift) & 0x0F0F0F0F, yq[i], sum);
        int sc, m;
        k4_scale_min(b + 4, s, sc, m);
        return load_f16(b) * y.d * (sc * sum) - load_f16(b + 2) * m * y.s;
    }
};

// Q5_K (256 values): d, dmin, scales[12], qh[32], qs[128]; Q4_K plus a fifth bit: bit s of qh[l].
template <> struct Quant<T_Q5_K> {
    enum { QK = 256, BLOCK_BYTES = 176 };
    static __device__ __forceinline__ float value(const uint8* b, int s, int l) {
        int byte = b[48 + 32 * (s / 2) + l], q = (s % 2 ? byte >> 4 : byte & 0xF) | (((b[16 + l] >> s) & 1) << 4), sc, m;
        k4_scale_min(b + 4, s, sc, m);
        return load_f16(b) * (float)(sc * q) - load_f16(b + 2) * (float)m;
    }
    static __device__ __forceinline__ float dot(const uint8* b, int s, const block_q8_1& y) {
        const int* yq = (const int*)y.qs;
        const uint8* qs = b + 48 + 32 * (s / 2);
        int shift = 4 * (s % 2);
        int sum = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            int high = ((load_i32_a4(b + 16 + 4 * i) >> s) & 0x01010101) << 4;
            sum = __dp4a(((load_i32_a4(qs + 4 * i) >> shift) & 0x0F0F0F0F) | high, yq[i], sum);
        }
        int sc, m;
        k4_scale_min(b + 4, s, sc, m);
        return load_f16(b) * y.d * (sc * sum) - load_f16(b + 2) * m * y.s;
    }
};

// Q6_K (256 values): ql[128], qh[64], scales[16] int8, d. Unit s: half h = s/4, k = s%4:
// q = nibble k/2 of ql[64h + 32*(k%2) + l] | ((qh[32h + l] >> 2k) & 3) << 4, minus 32;
// scale 8h + 2k + l/16.
template <> struct Quant<T_Q6_K> {
    enum { QK = 256, BLOCK_BYTES = 210 };
    static __device__ __forceinline__ float value(const uint8* b, int s, int l) {
        int h = s / 4, k = s % 4, byte = b[64 * h + 32 * (k % 2) + l];
        int q = ((k / 2 ? byte >> 4 : byte & 0xF) | (((b[128 + 32 * h + l] >> (2 * k)) & 3) << 4)) - 32;
        return load_f16(b + 208) * (float)(((const int8*)(b + 192))[8 * h + 2 * k + l / 16] * q);
    }
    static __device__ __forceinline__ float dot(const uint8* b, int s, const block_q8_1& y) {
        const int* yq = (const int*)y.qs;
        int h = s / 4, k = s % 4;
        const uint8* ql = b + 64 * h + 32 * (k % 2);
        const uint8* qh = b + 128 + 32 * h;
        const int8* scales = (const int8*)(b + 192) + 8 * h + 2 * k;
        int total = 0;
#pragma unroll
        for (int g = 0; g < 2; ++g) {
            int sum = 0;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                int low = (load_i32_a2(ql + 16 * g + 4 * i) >> (4 * (k / 2))) & 0x0F0F0F0F;
                int high = ((load_i32_a2(qh + 16 * g + 4 * i) >> (2 * k)) & 0x03030303) << 4;
                sum = __dp4a((int)__vsub4(low | high, 0x20202020), yq[4 * g + i], sum);
            }
            total += scales[g] * sum;
        }
        return load_f16(b + 208) * y.d * total;
    }
};

// IQ4_XS (256 values): d, scales_h (u16), scales_l[4], qs[128]. Unit s: 6-bit scale ls, value
// = d*(ls - 32)*table[nibble], nibbles laid out as IQ4_NL over qs[16s..16s+15].
template <> struct Quant<T_IQ4_XS> {
    enum { QK = 256, BLOCK_BYTES = 136 };
    static __device__ __forceinline__ float value(const uint8* b, int s, int l) {
        int scales_h = *(const uint16*)(b + 2);
        int ls = ((b[4 + s / 2] >> (4 * (s % 2))) & 0xF) | (((scales_h >> (2 * s)) & 3) << 4);
        return load_f16(b) * (float)(ls - 32) * (float)iq4_value(nibble32(b + 8 + 16 * s, l));
    }
    static __device__ __forceinline__ float dot(const uint8* b, int s, const block_q8_1& y) {
        const int* yq = (const int*)y.qs;
        const uint8* qs = b + 8 + 16 * s;
        int sum = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int v = load_i32_a4(qs + 4 * i);
            sum = __dp4a(iq4_lookup4(v & 0x0F0F0F0F), yq[i], sum);
            sum = __dp4a(iq4_lookup4((v >> 4) & 0x0F0F0F0F), yq[i + 4], sum);
        }
        int scales_h = *(const uint16*)(b + 2);
        int ls = ((b[4 + s / 2] >> (4 * (s % 2))) & 0xF) | (((scales_h >> (2 * s)) & 3) << 4);
        return load_f16(b) * (float)(ls - 32) * y.d * sum;
    }
};

// Float weights: value i of a row.
template <> struct Quant<T_F32> {
    enum { QK = 1, BLOCK_BYTES = 4 };
    static __device__ __forceinline__ float value(const uint8* b, int, int) { return *(const float*)b; }
};
template <> struct Quant<T_F16> {
    enum { QK = 1, BLOCK_BYTES = 2 };
    static __device__ __forceinline__ float value(const uint8* b, int, int) { return load_f16(b); }
};
template <> struct Quant<T_BF16> {
    enum { QK = 1, BLOCK_BYTES = 2 };
    static __device__ __forceinline__ float value(const uint8* b, int, int) { return bf16_to_f32(*(const uint16*)b); }
};

// Value i of a row of any type.
template <int TYPE>
static __device__ __forceinline__ float row_value(const uint8* row, int i) {
    typedef Quant<TYPE> Q;
    int in_block = i % Q::QK;
    return Q::value(row + (i / Q::QK) * Q::BLOCK_BYTES, in_block / 32, in_block % 32);
}
