/*
 * MXFP4, Q1_0, Q2_0, TQ1_0 and TQ2_0: the same bytes as ggml's quantize_row_*_ref (what
 * ggml_quantize_chunk runs for them; none of them reads an importance matrix), and their
 * dequantizers. Upstream: ggml/src/ggml-quants.c quantize_row_mxfp4_ref / _q1_0_ref / _q2_0_ref /
 * _tq1_0_ref / _tq2_0_ref, dequantize_row_*; block layouts in ggml/src/ggml-common.h
 * (block_mxfp4 {e, qs[16]}, block_q1_0 {d, qs[16]} of 128, block_q2_0 {d, qs[16]} of 64,
 * block_tq1_0 {qs[48], qh[4], d}, block_tq2_0 {qs[64], d}); E8M0 scale of ggml-impl.h.
 * Also the entry points native_ext.h declares, which route IQ3_XXS / IQ3_S to native_iq3.c.
 */
#include <math.h>

#include "native_ext.h"
#include "native_prims.h"

#define QK_K 256

/* ---- MXFP4: 32 values, a power-of-two scale (E8M0) and 4-bit E2M1 codes ---- */

static const int8_t kvalues_fp4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

/* half of 2^(e-127), the E2M1 codes being doubled */
static float e8m0_half(uint8_t e) {
    return u2f(e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23);
}

static uint8_t fp4_code(float x, float d) {
    int best = 0;
    float best_err = fabsf((float)kvalues_fp4[0] * d - x);
    for (int i = 1; i < 16; i++) {
        const float err = fabsf((float)kvalues_fp4[i] * d - x);
        if (err < best_err) { best = i; best_err = err; }
    }
    return (uint8_t)best;
}

static void mxfp4_block(const float *x, uint8_t *y) {
    float amax = 0.0f;
    for (int j = 0; j < 32; j++)
        if (amax < fabsf(x[j])) amax = fabsf(x[j]);
    /* float -> uint8_t as x86 converts it: through a 32-bit integer (tiny amax gives a negative exponent) */
    const uint8_t e = amax > 0.0f ? (uint8_t)(int32_t)(floorf(log2f(amax)) - 2 + 127) : 0;
    const float d = e8m0_half(e);
    y[0] = e;
    for (int j = 0; j < 16; j++) y[1 + j] = (uint8_t)(fp4_code(x[j], d) | (fp4_code(x[16 + j], d) << 4));
}

/* ---- Q1_0: 128 signs and the mean magnitude ---- */

static void q1_0_block(const float *x, uint8_t *y) {
    float sum_abs = 0.0f;
    for (int j = 0; j < 128; j++) sum_abs += fabsf(x[j]);
    put_u16(y, fp32_to_fp16(sum_abs / 128));
    memset(y + 2, 0, 16);
    for (int j = 0; j < 128; j++)
        if (x[j] >= 0.0f) y[2 + j / 8] |= (uint8_t)(1u << (j % 8));
}

/* ---- Q2_0: 64 values in {-1, 0, 1, 2} times the block's absolute maximum ---- */

static void q2_0_block(const float *x, uint8_t *y) {
    float amax = 0.0f;
    for (int j = 0; j < 64; j++) {
        const float a = fabsf(x[j]);
        if (a > amax) amax = a;
    }
    const float id = amax > 0.0f ? 1.0f / amax : 0.0f;
    put_u16(y, fp32_to_fp16(amax));
    memset(y + 2, 0, 16);
    for (int j = 0; j < 64; j++) {
        int q = (int)roundf(x[j] * id) + 1;
        q = q < 0 ? 0 : q > 3 ? 3 : q;
        y[2 + j / 4] |= (uint8_t)(q << (2 * (j % 4)));
    }
}

/* ---- TQ1_0 / TQ2_0: ternary {-1, 0, 1} times the absolute maximum of 256 ---- */

static float ternary_inverse(const float *x, uint8_t *d_out) {
    float amax = 0.0f;
    for (int j = 0; j < QK_K; j++) amax = MAXF(amax, fabsf(x[j]));
    put_u16(d_out, fp32_to_fp16(amax));
    return amax != 0.0f ? 1.0f / amax : 0.0f;
}

static int trit(float v, float id) { return (int)lroundf(v * id) + 1; }

/* `count` bytes of five trits each (x[m + n*count], n = 0..4), stored as ceil(q * 256 / 243) */
static void tq1_pack5(const float *x, float id, uint8_t *out, int count) {
    for (int m = 0; m < count; m++) {
        unsigned q = 0;
        for (int n = 0; n < 5; n++) q = (q * 3 + (unsigned)trit(x[m + n * count], id)) & 0xFF;
        out[m] = (uint8_t)((q * 256 + 242) / 243);
    }
}

static void tq1_0_block(const float *x, uint8_t *y) {
    const float id = ternary_inverse(x, y + 52);
    tq1_pack5(x, id, y, 32);
    tq1_pack5(x + 160, id, y + 32, 16);
    for (int j = 0; j < 4; j++) {  /* the last 16: four trits a byte, the first one most significant */
        unsigned q = 0;
        for (int m = 0; m < 4; m++) q = (q * 3 + (unsigned)trit(x[240 + j + 4 * m], id)) & 0xFF;
        q = (q * 3) & 0xFF;
        y[48 + j] = (uint8_t)((q * 256 + 242) / 243);
    }
}

static void tq2_0_block(const float *x, uint8_t *y) {
    const float id = ternary_inverse(x, y + 64);
    for (int j = 0; j < 64; j += 32)
        for (int m = 0; m < 32; m++) {
            unsigned q = 0;
            for (int n = 0; n < 4; n++) q += (unsigned)(trit(x[4 * j + m + 32 * n], id) & 3) << (2 * n);
            y[j + m] = (uint8_t)q;
        }
}

/* ---- dequantization ---- */

static void tq1_unpack(const uint8_t *q, int count, float d, float **y) {
    static const uint8_t pow3[5] = {1, 3, 9, 27, 81};
    for (int n = 0; n < 5; n++)
        for (int m = 0; m < count; m++) {
            const uint8_t v = (uint8_t)(q[m] * pow3[n]);
            *(*y)++ = (float)((((uint16_t)v * 3) >> 8) - 1) * d;
        }
}

static void dequantize_misc(int type, const uint8_t *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        switch (type) {
        case T_MXFP4: {
            const uint8_t *b = x + 17 * i;
            const float d = e8m0_half(b[0]);
            for (int j = 0; j < 16; j++) {
                y[32 * i + j] = (float)kvalues_fp4[b[1 + j] & 15] * d;
                y[32 * i + j + 16] = (float)kvalues_fp4[b[1 + j] >> 4] * d;
            }
            break;
        }
        case T_Q1_0: {
            const uint8_t *b = x + 18 * i;
            const float d = fp16_to_fp32(get_u16(b)), neg = -d;
            for (int j = 0; j < 128; j++) y[128 * i + j] = (b[2 + j / 8] >> (j % 8)) & 1 ? d : neg;
            break;
        }
        case T_Q2_0: {
            const uint8_t *b = x + 18 * i;
            const float d = fp16_to_fp32(get_u16(b));
            for (int j = 0; j < 64; j++) y[64 * i + j] = (float)(((b[2 + j / 4] >> (2 * (j % 4))) & 3) - 1) * d;
            break;
        }
        case T_TQ1_0: {
            const uint8_t *b = x + 54 * i;
            const float d = fp16_to_fp32(get_u16(b + 52));
            float *o = y + QK_K * i;
            tq1_unpack(b, 32, d, &o);
            tq1_unpack(b + 32, 16, d, &o);
            static const uint8_t pow3[4] = {1, 3, 9, 27};
            for (int n = 0; n < 4; n++)
                for (int j = 0; j < 4; j++) {
                    const uint8_t v = (uint8_t)(b[48 + j] * pow3[n]);
                    *o++ = (float)((((uint16_t)v * 3) >> 8) - 1) * d;
                }
            break;
        }
        case T_TQ2_0: {
            const uint8_t *b = x + 66 * i;
            const float d = fp16_to_fp32(get_u16(b + 64));
            float *o = y + QK_K * i;
            for (int j = 0; j < 64; j += 32)
                for (int l = 0; l < 4; l++)
                    for (int m = 0; m < 32; m++) *o++ = (float)(((b[j + m] >> (2 * l)) & 3) - 1) * d;
            break;
        }
        }
    }
}

/* ---- entry points (native_ext.h) ---- */

int ext_block_info(int type, int *blck, int *bytes) {
    switch (type) {
    case T_MXFP4: *blck = 32; *bytes = 17; return 1;
    case T_Q1_0: *blck = 128; *bytes = 18; return 1;
    case T_Q2_0: *blck = 64; *bytes = 18; return 1;
    case T_TQ1_0: *blck = QK_K; *bytes = 54; return 1;
    case T_TQ2_0: *blck = QK_K; *bytes = 66; return 1;
    case T_IQ3_XXS: *blck = QK_K; *bytes = 98; return 1;
    case T_IQ3_S: *blck = QK_K; *bytes = 110; return 1;
    default: return 0;
    }
}

int ext_uses_imatrix(int type) { return type == T_IQ3_XXS || type == T_IQ3_S; }

int ext_quantize(int type, const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw) {
    int blck, bytes;
    if (!ext_block_info(type, &blck, &bytes)) return 0;
    if (type == T_IQ3_XXS || type == T_IQ3_S) {
        iq3_quantize_rows(type, x, y, nrows, n, qw);
        return 1;
    }
    void (*block)(const float *, uint8_t *) =
        type == T_MXFP4 ? mxfp4_block : type == T_Q1_0 ? q1_0_block : type == T_Q2_0 ? q2_0_block
        : type == T_TQ1_0 ? tq1_0_block : tq2_0_block;
    const int64_t nb = nrows * (n / blck);
    for (int64_t i = 0; i < nb; i++) block(x + blck * i, y + bytes * i);
    return 1;
}

int ext_dequantize(int type, const uint8_t *x, float *y, int64_t nb) {
    int blck, bytes;
    if (!ext_block_info(type, &blck, &bytes)) return 0;
    if (type == T_IQ3_XXS || type == T_IQ3_S) iq3_dequantize(type, x, y, nb);
    else dequantize_misc(type, x, y, nb);
    return 1;
}
