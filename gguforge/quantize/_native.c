/*
 * gguforge native quantizer.
 *
 * Produces the same bytes as ggml's reference quantizers (quantize_row_*_ref) for
 * Q8_0, Q4_K, Q5_K, Q6_K, Q5_0, Q5_1, Q4_0, Q4_1, Q3_K and Q2_K, and as llama-quantize's
 * IQ4_NL / IQ4_XS path (quantize_iq4_nl / quantize_iq4_xs without an imatrix, ntry = 7),
 * plus exact F16/BF16 converters.
 * With an importance matrix (quantize_w) the same bytes as ggml_quantize_chunk(.., imatrix):
 * the weighted quantize_row_*_impl of Q2_K..Q6_K, Q4_0/Q4_1/Q5_0/Q5_1 and quantize_iq4_nl /
 * quantize_iq4_xs with quant_weights (make_qkx3_quants, make_qp_quants, weighted make_qx_quants);
 * Q8_0/F16/BF16/F32 ignore it, as in ggml. Every id has a lane-parallel weighted kernel too.
 * Upstream: ggml/src/ggml-quants.c (quantize_row_*_ref, make_qkx2_quants, make_q3_quants,
 * make_qx_quants, quantize_iq4_nl / quantize_iq4_xs) and ggml/src/ggml-common.h (block layouts).
 *
 * Bit-exactness rules followed everywhere:
 *   - float32 only, every accumulation sequential in index order;
 *   - no FMA (built with -ffp-contract=off), products associate as in the spec;
 *   - true division where the spec divides, reciprocal where it multiplies.
 *
 * Two implementations exist (selectable, for tests and benchmarks):
 *   - "scalar": one block at a time, a direct restatement of the spec;
 *   - "vector": the same per-block float sequence, but many sub-blocks processed in
 *     lockstep, one per SIMD lane (GCC vector extensions; Q8_0, Q2_K, Q3_K, Q4_K, Q5_K,
 *     Q6_K and the IQ4 scale search; Q4_0/Q4_1/Q5_0/Q5_1 one block at a time in SIMD-wide pieces,
 *     q32_vec). This file includes itself
 *     once per instruction set (baseline, AVX2, AVX-512F; see KERNEL_PASS) and the
 *     best one is chosen at run time. Lanes never mix, so every lane performs
 *     exactly the scalar IEEE operations.
 *
 * Non-finite input is rejected by callers (count_nonfinite); its bytes are not
 * part of the contract.
 */
#ifndef KERNEL_PASS
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <float.h>

#define QK_K 256
#define GROUP_MAX_EPS 1e-15f

enum { T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
       T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_IQ4_NL = 20,
       T_IQ4_XS = 23, T_BF16 = 30 };

#include "native_prims.h"
#include "native_ext.h"  /* kernels in native_*.c, asked first by the dispatch below */

/* ===================================================================== */
/* 32-element types (scalar reference; q8_0_vec / q32_vec are the SIMD forms) */
/* ===================================================================== */

/* Q8_0: d = amax/127, quantize with the float reciprocal 1/d and roundf. */
static void q8_0_block(const float *x, uint8_t *y) {
    float amax = 0.0f;
    for (int j = 0; j < 32; j++) amax = MAXF(amax, fabsf(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    put_u16(y, fp32_to_fp16(d));
    for (int j = 0; j < 32; j++) y[2 + j] = (uint8_t)(int8_t)(int)roundf(x[j] * id);
}

static void q5_pack(const uint8_t *v, uint8_t *qh, uint8_t *qs) {
    uint32_t h = 0;
    for (int j = 0; j < 16; j++) {
        qs[j] = (uint8_t)((v[j] & 15) | ((v[j + 16] & 15) << 4));
        h |= (uint32_t)((v[j] >> 4) & 1) << j;
        h |= (uint32_t)((v[j + 16] >> 4) & 1) << (j + 16);
    }
    qh[0] = (uint8_t)h; qh[1] = (uint8_t)(h >> 8); qh[2] = (uint8_t)(h >> 16); qh[3] = (uint8_t)(h >> 24);
}

/* Q5_0: signed max (first of the largest |x|), d = max/-16, truncation via int8. */
static void q5_0_block(const float *x, uint8_t *y) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 32; j++)
        if (amax < fabsf(x[j])) { amax = fabsf(x[j]); max = x[j]; }
    const float d = max / -16.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    put_u16(y, fp32_to_fp16(d));
    uint8_t v[32];
    for (int j = 0; j < 32; j++) {
        int8_t t = (int8_t)(int)(x[j] * id + 16.5f);
        v[j] = (uint8_t)MINI(31, t);
    }
    q5_pack(v, y + 2, y + 6);
}

/* Q5_1: min/max from +-FLT_MAX, d = (max-min)/31, truncation, no clamp. */
static void q5_1_block(const float *x, uint8_t *y) {
    float min = FLT_MAX, max = -FLT_MAX;
    for (int j = 0; j < 32; j++) {
        if (x[j] < min) min = x[j];
        if (x[j] > max) max = x[j];
    }
    const float d = (max - min) / 31.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    put_u16(y, fp32_to_fp16(d));
    put_u16(y + 2, fp32_to_fp16(min));
    uint8_t v[32];
    for (int j = 0; j < 32; j++) v[j] = (uint8_t)(int)((x[j] - min) * id + 0.5f);
    q5_pack(v, y + 4, y + 8);
}

/* ===================================================================== */
/* K-quants: scalar reference path                                       */
/* ===================================================================== */

/* Asymmetric fit x ~ scale*L + min (spec 3.2), including the drifting `min`.
 * use_mad: error is w*|diff| instead of w*diff^2 (ggml make_qkx2_quants, used so by Q2_K). */
static float make_qkx2_quants(int n, int nmax, const float *x, const float *w, uint8_t *L,
                              float *the_min, float rmin, float rdelta, int nstep, int use_mad) {
    uint8_t Laux[32];
    float min = x[0], max = x[0];
    float sum_w = w[0], sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        for (int i = 0; i < n; i++) L[i] = 0;
        *the_min = -min;
        return 0.0f;
    }
    float iscale = (float)nmax / (max - min);
    float scale = 1.0f / iscale;
    float best_error = 0.0f;
    for (int i = 0; i < n; i++) {
        int l = nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)MAXI(0, MINI(nmax, l));
        float diff = scale * (float)L[i] + min - x[i];
        best_error += w[i] * (use_mad ? fabsf(diff) : diff * diff);
    }
    for (int is = 0; is <= nstep; is++) {
        iscale = (rmin + rdelta * (float)is + (float)nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; i++) {
            int l = nearest_int(iscale * (x[i] - min));
            l = MAXI(0, MINI(nmax, l));
            Laux[i] = (uint8_t)l;
            float wl = w[i] * (float)l;
            sum_l += wl;
            sum_l2 += wl * (float)l;
            sum_xl += wl * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = 0;
            for (int i = 0; i < n; i++) {
                float diff = this_scale * (float)Laux[i] + this_min - x[i];
                cur_error += w[i] * (use_mad ? fabsf(diff) : diff * diff);
            }
            if (cur_error < best_error) {
                memcpy(L, Laux, (size_t)n);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;   /* the quirk: later steps use this new min */
            }
        }
    }
    *the_min = -min;
    return scale;
}

ALWAYS_INLINE void kq45_pack(const uint8_t *L, int nmax, uint8_t *y);

/* Steps 2-5 of Q4_K/Q5_K (spec 3.3/3.4): 6-bit scales, fp16 d/dmin, re-quantize
 * with the decoded values (skipping dj == 0), pack. Shared by both paths. */
ALWAYS_INLINE void kq45_finish(const float *x, const float *scales, const float *mins,
                               uint8_t *L, int nmax, uint8_t *y) {
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; j++) {
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
    const float inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
    uint8_t sc[8], mn[8];
    for (int j = 0; j < 8; j++) {
        uint8_t ls = (uint8_t)nearest_int(inv_scale * scales[j]);
        uint8_t lm = (uint8_t)nearest_int(inv_min * mins[j]);
        sc[j] = MINI(63, ls);
        mn[j] = MINI(63, lm);
    }
    uint8_t *s = y + 4;
    for (int k = 0; k < 4; k++) {
        s[k] = (uint8_t)(sc[k] | ((sc[k + 4] >> 4) << 6));
        s[k + 4] = (uint8_t)(mn[k] | ((mn[k + 4] >> 4) << 6));
        s[k + 8] = (uint8_t)((sc[k + 4] & 15) | ((mn[k + 4] & 15) << 4));
    }
    const uint16_t dh = fp32_to_fp16(max_scale / 63.0f), mh = fp32_to_fp16(max_min / 63.0f);
    put_u16(y, dh);
    put_u16(y + 2, mh);
    const float df = fp16_to_fp32(dh), mf = fp16_to_fp32(mh);
    for (int j = 0; j < 8; j++) {
        /* the packed indices equal sc/mn (already clamped to 6 bits) */
        const float dj = df * (float)sc[j];
        if (dj == 0) continue;   /* keep the search's L for this sub-block */
        const float dmj = mf * (float)mn[j];
        const float *xs = x + 32 * j;
        uint8_t *Ls = L + 32 * j;
        for (int i = 0; i < 32; i++) {
            int l = nearest_int((xs[i] + dmj) / dj);
            Ls[i] = (uint8_t)MAXI(0, MINI(nmax, l));
        }
    }
    kq45_pack(L, nmax, y);
}

/* Q4_K / Q5_K indices into qs (and qh for Q5_K). */
ALWAYS_INLINE void kq45_pack(const uint8_t *L, int nmax, uint8_t *y) {
    if (nmax == 15) {
        uint8_t *q = y + 16;
        for (int p = 0; p < 4; p++)
            for (int l = 0; l < 32; l++)
                q[32 * p + l] = (uint8_t)(L[64 * p + l] | (L[64 * p + 32 + l] << 4));
    } else {
        uint8_t *qh = y + 16, *qs = y + 48;
        memset(qh, 0, 32);
        for (int p = 0; p < 4; p++)
            for (int l = 0; l < 32; l++) {
                uint8_t a = L[64 * p + l], b = L[64 * p + 32 + l];
                qs[32 * p + l] = (uint8_t)((a & 15) | ((b & 15) << 4));
                qh[l] |= (uint8_t)(((a >> 4) << (2 * p)) | ((b >> 4) << (2 * p + 1)));
            }
    }
}

/* Per-sub-block weights av_x + |x| with av_x = sqrtf(sum x^2 / 32). */
static void kq45_block_scalar(const float *x, uint8_t *y, int nmax) {
    uint8_t L[QK_K];
    float w[32], scales[8], mins[8];
    const float rmin = nmax == 15 ? -1.0f : -0.5f;
    const int nstep = nmax == 15 ? 20 : 15;
    for (int j = 0; j < 8; j++) {
        const float *xs = x + 32 * j;
        float sum_x2 = 0;
        for (int l = 0; l < 32; l++) sum_x2 += xs[l] * xs[l];
        const float av_x = sqrtf(sum_x2 / 32.0f);
        for (int l = 0; l < 32; l++) w[l] = av_x + fabsf(xs[l]);
        scales[j] = make_qkx2_quants(32, nmax, xs, w, L + 32 * j, &mins[j], rmin, 0.1f, nstep, 0);
    }
    kq45_finish(x, scales, mins, L, nmax, y);
}

/* make_qx_quants(n, nmax, x, L, rmse_type = 1, qw): symmetric fit with weights qw; L = l + nmax
 * (all 0 for a group below GROUP_MAX_EPS). Products associate left to right as in C: w*x*l. */
static float make_qx_quants_w(int n, int nmax, const float *x, int8_t *L, const float *qw) {
    float max = 0.0f, amax = 0.0f;
    for (int i = 0; i < n; i++) {
        const float ax = fabsf(x[i]);
        if (ax > amax) { amax = ax; max = x[i]; }
    }
    if (amax < GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.0f;
    }
    float iscale = (float)(-nmax) / max;
    float sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < n; i++) {
        int l = nearest_int(iscale * x[i]);
        l = MAXI(-nmax, MINI(nmax - 1, l));
        L[i] = (int8_t)(l + nmax);
        const float w = qw[i];
        sumlx += w * x[i] * (float)l;
        suml2 += w * (float)l * (float)l;
    }
    float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; is++) {
        if (is == 0) continue;
        iscale = -((float)nmax + 0.1f * (float)is) / max;
        sumlx = suml2 = 0.0f;
        for (int i = 0; i < n; i++) {
            int l = nearest_int(iscale * x[i]);
            l = MAXI(-nmax, MINI(nmax - 1, l));
            const float w = qw[i];
            sumlx += w * x[i] * (float)l;
            suml2 += w * (float)l * (float)l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; i++) {
                const int l = nearest_int(iscale * x[i]);
                L[i] = (int8_t)(nmax + MAXI(-nmax, MINI(nmax - 1, l)));
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* Symmetric fit for Q6_K (spec 3.5): n=16, nmax=32, weights x^2 (make_qx_quants with qw = NULL). */
static float make_qx_quants16(const float *x, int8_t *L) {
    float w[16];
    for (int i = 0; i < 16; i++) w[i] = x[i] * x[i];
    return make_qx_quants_w(16, 32, x, L, w);
}

/* Q6_K steps 2-6 (spec 3.6). Shared by both paths. */
ALWAYS_INLINE void q6k_finish(const float *x, const float *scales, int8_t *L, uint8_t *y) {
    float max_scale = 0, max_abs_scale = 0;
    for (int ib = 0; ib < 16; ib++) {
        const float a = fabsf(scales[ib]);
        if (a > max_abs_scale) { max_abs_scale = a; max_scale = scales[ib]; }
    }
    if (max_abs_scale < GROUP_MAX_EPS) {   /* whole block is zero */
        memset(y, 0, 210);
        return;
    }
    const float iscale = -128.0f / max_scale;
    const uint16_t dh = fp32_to_fp16(1.0f / iscale);
    int8_t sc[16];
    for (int ib = 0; ib < 16; ib++) sc[ib] = (int8_t)MINI(127, nearest_int(iscale * scales[ib]));
    const float df = fp16_to_fp32(dh);
    for (int j = 0; j < 16; j++) {
        const float dj = df * (float)sc[j];
        if (dj == 0) continue;   /* keep the search's L (0 for tiny sub-blocks) */
        const float *xs = x + 16 * j;
        int8_t *Ls = L + 16 * j;
        for (int i = 0; i < 16; i++) {
            int l = nearest_int(xs[i] / dj);
            Ls[i] = (int8_t)(MAXI(-32, MINI(31, l)) + 32);
        }
    }
    uint8_t *ql = y, *qh = y + 128;
    for (int h = 0; h < 2; h++) {
        const int8_t *e = L + 128 * h;
        for (int l = 0; l < 32; l++) {
            ql[64 * h + l] = (uint8_t)((e[l] & 15) | ((e[l + 64] & 15) << 4));
            ql[64 * h + 32 + l] = (uint8_t)((e[l + 32] & 15) | ((e[l + 96] & 15) << 4));
            qh[32 * h + l] = (uint8_t)((e[l] >> 4) | ((e[l + 32] >> 4) << 2) |
                                       ((e[l + 64] >> 4) << 4) | ((e[l + 96] >> 4) << 6));
        }
    }
    memcpy(y + 192, sc, 16);
    put_u16(y + 208, dh);
}

static void q6k_block_scalar(const float *x, uint8_t *y) {
    int8_t L[QK_K];
    float scales[16];
    for (int ib = 0; ib < 16; ib++) scales[ib] = make_qx_quants16(x + 16 * ib, L + 16 * ib);
    q6k_finish(x, scales, L, y);
}

/* ===================================================================== */
/* Q4_0 / Q4_1 (ggml-quants.c quantize_row_q4_0_ref / quantize_row_q4_1_ref) */
/* ===================================================================== */

/* Q4_0: signed max (first of the largest |x|), d = max/-8, truncation via int8, clamp 15.
 * Element j goes to the low nibble of qs[j], element j+16 to its high nibble. */
static void q4_0_block(const float *x, uint8_t *y) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 32; j++)
        if (amax < fabsf(x[j])) { amax = fabsf(x[j]); max = x[j]; }
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    put_u16(y, fp32_to_fp16(d));
    for (int j = 0; j < 16; j++) {
        const int8_t a = (int8_t)(int)(x[j] * id + 8.5f);
        const int8_t b = (int8_t)(int)(x[j + 16] * id + 8.5f);
        const uint8_t qa = (uint8_t)MINI(15, a), qb = (uint8_t)MINI(15, b);
        y[2 + j] = (uint8_t)(qa | (qb << 4));
    }
}

/* Q4_1: min/max from +-FLT_MAX, d = (max-min)/15, truncation via int8, clamp 15. */
static void q4_1_block(const float *x, uint8_t *y) {
    float min = FLT_MAX, max = -FLT_MAX;
    for (int j = 0; j < 32; j++) {
        if (x[j] < min) min = x[j];
        if (x[j] > max) max = x[j];
    }
    const float d = (max - min) / 15.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    put_u16(y, fp32_to_fp16(d));
    put_u16(y + 2, fp32_to_fp16(min));
    for (int j = 0; j < 16; j++) {
        const int8_t a = (int8_t)(int)((x[j] - min) * id + 0.5f);
        const int8_t b = (int8_t)(int)((x[j + 16] - min) * id + 0.5f);
        const uint8_t qa = (uint8_t)MINI(15, a), qb = (uint8_t)MINI(15, b);
        y[4 + j] = (uint8_t)(qa | (qb << 4));
    }
}

/* ===================================================================== */
/* IQ4_NL / IQ4_XS: llama-quantize's path, ggml-quants.c                  */
/* quantize_row_iq4_nl_impl(.., quant_weights = NULL, ntry = 7), i.e.     */
/* quantize_iq4_nl / quantize_iq4_xs without an imatrix (weights x^2).    */
/* (quantize_row_iq4_nl_ref uses ntry = -1 and gives other bytes.)        */
/* ===================================================================== */

/* ggml-common.h kvalues_iq4nl */
static const int8_t kvalues_iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                         1, 13, 25, 38, 53, 69, 89, 113};

/* best_index_int8(16, kvalues_iq4nl, x) (ggml-quants.c), without its branches. Its binary search
 * ends at the mu with val[mu-1] <= x < val[mu] (1 <= mu <= 15), which is 1 + #{j in 1..14 : val[j] <= x};
 * then the same distance test picks mu-1 or mu. Its early exits (x <= val[0] -> 0, x >= val[15] -> 15,
 * infinities included) come out of that test too; only NaN needs its own case (the search ends at 15). */
ALWAYS_INLINE int iq4_index(float x) {
    if (x != x) return 15;
    int mu = 1;
    for (int j = 1; j < 15; j++) mu += (float)kvalues_iq4nl[j] <= x;
    return x - (float)kvalues_iq4nl[mu - 1] < (float)kvalues_iq4nl[mu] - x ? mu - 1 : mu;
}

/* The per-32 scale search of quantize_row_iq4_nl_impl (ntry = 7) with weights w. */
static float iq4_scale32w(const float *xb, const float *w) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 32; j++) {
        const float ax = fabsf(xb[j]);
        if (ax > amax) { amax = ax; max = xb[j]; }
    }
    if (amax < GROUP_MAX_EPS) return 0.0f;
    float d = -max / (float)kvalues_iq4nl[0];
    float id = 1.0f / d;
    float sumqx = 0.0f, sumq2 = 0.0f;
    for (int j = 0; j < 32; j++) {
        const float q = (float)kvalues_iq4nl[iq4_index(id * xb[j])];
        sumqx += w[j] * q * xb[j];
        sumq2 += w[j] * q * q;
    }
    d = sumq2 > 0 ? sumqx / sumq2 : 0.0f;
    float best = d * sumqx;
    for (int itry = -7; itry <= 7; itry++) {
        id = (float)(itry + kvalues_iq4nl[0]) / max;
        sumqx = sumq2 = 0.0f;
        for (int j = 0; j < 32; j++) {
            const float q = (float)kvalues_iq4nl[iq4_index(id * xb[j])];
            sumqx += w[j] * q * xb[j];
            sumq2 += w[j] * q * q;
        }
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    return d;
}

/* Without an imatrix the weights are x^2. */
static float iq4_scale32(const float *xb) {
    float w[32];
    for (int j = 0; j < 32; j++) w[j] = xb[j] * xb[j];
    return iq4_scale32w(xb, w);
}

ALWAYS_INLINE void iq4_pack32(const uint8_t *L, uint8_t *q) {
    for (int j = 0; j < 16; j++) q[j] = (uint8_t)(L[j] | (L[16 + j] << 4));
}

/* IQ4_NL (18 bytes): fp16 d, then indices found again with the unrounded 1/d. */
ALWAYS_INLINE void iq4nl_finish(const float *x, float s, uint8_t *y) {
    put_u16(y, fp32_to_fp16(s));
    const float id = s != 0.0f ? 1.0f / s : 0.0f;
    uint8_t L[32];
    for (int j = 0; j < 32; j++) L[j] = (uint8_t)iq4_index(id * x[j]);
    iq4_pack32(L, y + 2);
}

static void iq4nl_block(const float *x, uint8_t *y) { iq4nl_finish(x, iq4_scale32(x), y); }

/* IQ4_XS (136 bytes): fp16 d = -max_scale/32, u16 scales_h, scales_l[4], qs[128]. Sub-block
 * scales are 6-bit (offset 32); indices are found again with the unrounded float d*l. */
ALWAYS_INLINE void iq4xs_finish(const float *x, const float *scales, uint8_t *y) {
    float max_scale = 0.0f, amax_scale = 0.0f;
    for (int ib = 0; ib < 8; ib++) {
        const float abs_d = fabsf(scales[ib]);
        if (abs_d > amax_scale) { amax_scale = abs_d; max_scale = scales[ib]; }
    }
    const float d = -max_scale / 32.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    uint16_t sh = 0;
    uint8_t *sl = y + 4, *qs = y + 8;
    for (int ib = 0; ib < 8; ib++) {
        int l = nearest_int(id * scales[ib]);
        l = MAXI(-32, MINI(31, l));
        const float dl = d * (float)l;
        const float idl = dl != 0.0f ? 1.0f / dl : 0.0f;
        uint8_t L[32];
        for (int j = 0; j < 32; j++) L[j] = (uint8_t)iq4_index(idl * x[32 * ib + j]);
        iq4_pack32(L, qs + 16 * ib);
        l += 32;
        const uint8_t l_l = (uint8_t)(l & 0xF), l_h = (uint8_t)(l >> 4);
        if (ib % 2 == 0) sl[ib / 2] = l_l;
        else sl[ib / 2] |= (uint8_t)(l_l << 4);
        sh |= (uint16_t)(l_h << (2 * (ib % 8)));
    }
    put_u16(y, fp32_to_fp16(d));
    put_u16(y + 2, sh);
}

static void iq4xs_block(const float *x, uint8_t *y) {
    float scales[8];
    for (int ib = 0; ib < 8; ib++) scales[ib] = iq4_scale32(x + 32 * ib);
    iq4xs_finish(x, scales, y);
}

/* IQ4 with the scale searches of many 32-blocks done lane-parallel (iq4_scales_*, below), the rest
 * scalar: nb32 consecutive 32-blocks, in batches; the bytes are the scalar path's. */
typedef void (*iq4_scales_fn)(const float *x, const float *w, float *scales, int64_t nb32);

static void iq4_batched(iq4_scales_fn scales_of, int xs, const float *x, uint8_t *y, int64_t nb) {
    enum { BATCH = 64 };   /* 32-blocks per batch: 8 IQ4_XS super-blocks */
    float scales[BATCH];
    const int per = xs ? 8 : 1, bytes = xs ? 136 : 18;
    for (int64_t b = 0; b < nb; b += BATCH / per) {
        const int n = (int)(nb - b < BATCH / per ? nb - b : BATCH / per);
        const float *xb = x + b * 32 * per;
        scales_of(xb, NULL, scales, (int64_t)n * per);
        for (int i = 0; i < n; i++) {
            if (xs) iq4xs_finish(xb + 256 * i, scales + 8 * i, y + (b + i) * bytes);
            else iq4nl_finish(xb + 32 * i, scales[i], y + (b + i) * bytes);
        }
    }
}

/* ===================================================================== */
/* Q2_K / Q3_K (ggml-quants.c quantize_row_q2_K_ref / quantize_row_q3_K_ref) */
/* ===================================================================== */

/* 2-bit indices of a 256 block: byte p*32+l holds elements 128p+l (+32, +64, +96). */
ALWAYS_INLINE void pack_2bit(const uint8_t *L, uint8_t *qs) {
    for (int p = 0; p < 2; p++)
        for (int l = 0; l < 32; l++) {
            const uint8_t *e = L + 128 * p + l;
            qs[32 * p + l] = (uint8_t)(e[0] | (e[32] << 2) | (e[64] << 4) | (e[96] << 6));
        }
}

/* Q2_K (84 bytes: scales[16], qs[64], fp16 d, fp16 dmin). Per 16: make_qkx2_quants(nmax 3,
 * w = |x|, rmin -0.5, rdelta 0.1, 15 steps, mean absolute error); 4-bit scale and min. */
ALWAYS_INLINE void q2k_tail(const float *x, uint8_t *L, uint8_t *y, uint16_t dh, uint16_t mh);

/* Q2_K after the 16 searches: 4-bit scales and mins, fp16 d/dmin, re-quantize, pack. */
ALWAYS_INLINE void q2k_finish(const float *x, const float *scales, const float *mins, uint8_t *L, uint8_t *y) {
    float max_scale = 0.0f, max_min = 0.0f;
    for (int j = 0; j < 16; j++) {
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    uint8_t *sc = y;
    uint16_t dh, mh;
    if (max_scale > 0) {
        const float iscale = 15.0f / max_scale;
        for (int j = 0; j < 16; j++) sc[j] = (uint8_t)nearest_int(iscale * scales[j]);
        dh = fp32_to_fp16(max_scale / 15.0f);
    } else {
        memset(sc, 0, 16);
        dh = fp32_to_fp16(0.0f);
    }
    if (max_min > 0) {
        const float iscale = 15.0f / max_min;
        for (int j = 0; j < 16; j++) sc[j] = (uint8_t)(sc[j] | (nearest_int(iscale * mins[j]) << 4));
        mh = fp32_to_fp16(max_min / 15.0f);
    } else {
        mh = fp32_to_fp16(0.0f);
    }
    q2k_tail(x, L, y, dh, mh);
}

/* Q2_K, scales and mins packed in y[0..15]: fp16 d/dmin, re-quantize with them, pack. */
ALWAYS_INLINE void q2k_tail(const float *x, uint8_t *L, uint8_t *y, uint16_t dh, uint16_t mh) {
    const uint8_t *sc = y;
    uint8_t *qs = y + 16;
    const float df = fp16_to_fp32(dh), mf = fp16_to_fp32(mh);
    for (int j = 0; j < 16; j++) {
        const float d = df * (float)(sc[j] & 0xF);
        if (d == 0) continue;   /* keep the search's L */
        const float dm = mf * (float)(sc[j] >> 4);
        for (int i = 0; i < 16; i++) {
            const int l = nearest_int((x[16 * j + i] + dm) / d);
            L[16 * j + i] = (uint8_t)MAXI(0, MINI(3, l));
        }
    }
    pack_2bit(L, qs);
    put_u16(y + 80, dh);
    put_u16(y + 82, mh);
}

static void q2k_block(const float *x, uint8_t *y) {
    uint8_t L[QK_K];
    float w[16], scales[16], mins[16];
    for (int j = 0; j < 16; j++) {
        const float *xs = x + 16 * j;
        for (int l = 0; l < 16; l++) w[l] = fabsf(xs[l]);
        scales[j] = make_qkx2_quants(16, 3, xs, w, L + 16 * j, &mins[j], -0.5f, 0.1f, 15, 1);
    }
    q2k_finish(x, scales, mins, L, y);
}

/* ggml make_q3_quants(16, nmax = 4, do_rmse = true): symmetric fit, weights x^2, then up
 * to 5 passes of coordinate descent on the indices. L gets l + 4 (0 for an all-zero group). */
static float make_q3_quants16(const float *x, int8_t *L) {
    const int nmax = 4;
    float max = 0.0f, amax = 0.0f;
    for (int i = 0; i < 16; i++) {
        const float ax = fabsf(x[i]);
        if (ax > amax) { amax = ax; max = x[i]; }
    }
    if (amax < GROUP_MAX_EPS) {
        for (int i = 0; i < 16; i++) L[i] = 0;
        return 0.0f;
    }
    const float iscale = (float)(-nmax) / max;
    float sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < 16; i++) {
        int l = nearest_int(iscale * x[i]);
        l = MAXI(-nmax, MINI(nmax - 1, l));
        L[i] = (int8_t)l;
        const float w = x[i] * x[i];
        sumlx += w * x[i] * (float)l;
        suml2 += w * (float)l * (float)l;
    }
    for (int itry = 0; itry < 5; itry++) {
        int n_changed = 0;
        for (int i = 0; i < 16; i++) {
            const float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * (float)L[i];
            if (slx > 0) {
                float sl2 = suml2 - w * (float)L[i] * (float)L[i];
                int new_l = nearest_int(x[i] * sl2 / slx);
                new_l = MAXI(-nmax, MINI(nmax - 1, new_l));
                if (new_l != L[i]) {
                    slx += w * x[i] * (float)new_l;
                    sl2 += w * (float)new_l * (float)new_l;
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (int8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed++;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    for (int i = 0; i < 16; i++) L[i] = (int8_t)(L[i] + nmax);
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* Q3_K scale j (6 bits, offset 32) from the 12 packed bytes. */
ALWAYS_INLINE int q3k_scale(const uint8_t *sc, int j) {
    const int lo = j < 8 ? sc[j] & 0xF : sc[j - 8] >> 4;
    return (lo | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
}

/* Q3_K (110 bytes: hmask[32], qs[64], scales[12], fp16 d). */
ALWAYS_INLINE void q3k_tail(const float *x, int8_t *L, uint8_t *y, uint16_t dh);

/* Q3_K after the 16 searches: 6-bit scales, fp16 d, re-quantize, high bits, pack. */
ALWAYS_INLINE void q3k_finish(const float *x, const float *scales, int8_t *L, uint8_t *y) {
    float max_scale = 0.0f, amax = 0.0f;
    for (int j = 0; j < 16; j++) {
        const float scale = fabsf(scales[j]);
        if (scale > amax) { amax = scale; max_scale = scales[j]; }
    }
    uint8_t *sc = y + 96;
    memset(sc, 0, 12);
    uint16_t dh;
    if (max_scale != 0) {
        const float iscale = -32.0f / max_scale;
        for (int j = 0; j < 16; j++) {
            int8_t l = (int8_t)nearest_int(iscale * scales[j]);
            l = (int8_t)(MAXI(-32, MINI(31, l)) + 32);
            if (j < 8) sc[j] = (uint8_t)(l & 0xF);
            else sc[j - 8] |= (uint8_t)((l & 0xF) << 4);
            l >>= 4;
            sc[j % 4 + 8] |= (uint8_t)(l << (2 * (j / 4)));
        }
        dh = fp32_to_fp16(1.0f / iscale);
    } else {
        dh = fp32_to_fp16(0.0f);
    }
    q3k_tail(x, L, y, dh);
}

/* Q3_K, scales packed in y[96..107]: re-quantize with fp16 d, high bits, pack. */
ALWAYS_INLINE void q3k_tail(const float *x, int8_t *L, uint8_t *y, uint16_t dh) {
    uint8_t *hm = y, *qs = y + 32;
    const uint8_t *sc = y + 96;
    const float df = fp16_to_fp32(dh);
    for (int j = 0; j < 16; j++) {
        const float d = df * (float)(int8_t)q3k_scale(sc, j);
        if (d == 0) continue;   /* keep the search's L */
        for (int i = 0; i < 16; i++) {
            int l = nearest_int(x[16 * j + i] / d);
            l = MAXI(-4, MINI(3, l));
            L[16 * j + i] = (int8_t)(l + 4);
        }
    }
    /* bit 2 of element j goes to hmask[j % 32], bit j / 32 */
    uint8_t Lu[QK_K];
    memset(hm, 0, 32);
    for (int k = 0; k < 8; k++)   /* branch-free: element 32k+m */
        for (int m = 0; m < 32; m++) {
            const int l = L[32 * k + m], high = l > 3;
            hm[m] |= (uint8_t)(high << k);
            Lu[32 * k + m] = (uint8_t)(l - 4 * high);
        }
    pack_2bit(Lu, qs);
    put_u16(y + 108, dh);
}

static void q3k_block(const float *x, uint8_t *y) {
    int8_t L[QK_K];
    float scales[16];
    for (int j = 0; j < 16; j++) scales[j] = make_q3_quants16(x + 16 * j, L + 16 * j);
    q3k_finish(x, scales, L, y);
}

/* ===================================================================== */
/* Weighted quantizers (importance matrix): what ggml_quantize_chunk runs  */
/* when imatrix != NULL. ggml-quants.c quantize_row_{q2_K,q3_K,q4_K,q5_K,  */
/* q6_K,q4_0,q4_1,q5_0,q5_1}_impl and quantize_iq4_nl / quantize_iq4_xs    */
/* (quantize_row_iq4_nl_impl) with quant_weights; helpers make_qx_quants   */
/* (rmse_type 1, weights given), make_qkx3_quants, make_qp_quants.         */
/* `qw` always points at the imatrix entries of the block's columns.       */
/* ===================================================================== */

/* ggml get_scale_min_k4: 6-bit scale and min j of a Q4_K/Q5_K block's 12 scale bytes. */
ALWAYS_INLINE void scale_min_k4(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) { *sc = q[j] & 63; *m = q[j + 4] & 63; }
    else {
        *sc = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* make_qkx3_quants(n, nmax, x, w, L, the_min, rmin, rdelta, nstep, use_mad = false) with weights
 * given: the same float sequence as make_qkx2_quants (above) except the degenerate test
 * `max <= min` instead of `max == min`, which agree for finite x (min <= max always). */
#define make_qkx3_quants_w(n, nmax, x, w, L, the_min) \
    make_qkx2_quants(n, nmax, x, w, L, the_min, -0.9f, 0.05f, 36, 0)

/* make_qp_quants(n, nmax, x, L, quant_weights): positive-only fit of the sub-block scales
 * (or mins) with weights sw. L is uint8_t as in ggml (negative indices wrap, as there). */
static float make_qp_quants(int n, int nmax, const float *x, uint8_t *L, const float *qw) {
    float max = 0.0f;
    for (int i = 0; i < n; i++) max = MAXF(max, x[i]);
    if (max < GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.0f;
    }
    float iscale = (float)nmax / max;
    for (int i = 0; i < n; i++) L[i] = (uint8_t)nearest_int(iscale * x[i]);
    const float scale = 1.0f / iscale;
    float best_mse = 0.0f;
    for (int i = 0; i < n; i++) {
        const float diff = x[i] - scale * (float)L[i];
        best_mse += qw[i] * diff * diff;
    }
    for (int is = -4; is <= 4; is++) {
        if (is == 0) continue;
        const float iscale_is = (0.1f * (float)is + (float)nmax) / max;
        const float scale_is = 1.0f / iscale_is;
        float mse = 0.0f;
        for (int i = 0; i < n; i++) {
            const int l = MINI(nmax, nearest_int(iscale_is * x[i]));
            const float diff = x[i] - scale_is * (float)l;
            mse += qw[i] * diff * diff;
        }
        if (mse < best_mse) {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    float sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < n; i++) {
        const int l = MINI(nmax, nearest_int(iscale * x[i]));
        L[i] = (uint8_t)l;
        const float w = qw[i];
        sumlx += w * x[i] * (float)l;
        suml2 += w * (float)l * (float)l;
    }
    for (int itry = 0; itry < 5; itry++) {
        int n_changed = 0;
        for (int i = 0; i < n; i++) {
            const float w = qw[i];
            float slx = sumlx - w * x[i] * (float)L[i];
            float sl2 = suml2 - w * (float)L[i] * (float)L[i];
            if (slx > 0 && sl2 > 0) {
                const int new_l = MINI(nmax, nearest_int(x[i] * sl2 / slx));
                if (new_l != L[i]) {
                    slx += w * x[i] * (float)new_l;
                    sl2 += w * (float)new_l * (float)new_l;
                    if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (uint8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed++;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* sum of x[i]^2, sequential (every *_impl starts with it) */
ALWAYS_INLINE float sum_sq(const float *x, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += x[i] * x[i];
    return s;
}

/* the weights of every *_impl: w = qw * sqrtf(sigma2 + x^2) */
ALWAYS_INLINE void imatrix_weights(const float *x, const float *qw, float sigma2, float *w, int n) {
    for (int i = 0; i < n; i++) w[i] = qw[i] * sqrtf(sigma2 + x[i] * x[i]);
}

ALWAYS_INLINE float sum_seq(const float *w, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += w[i];
    return s;
}

/* quantize_row_q2_K_impl after the 16 searches: make_qp_quants for scales and mins with
 * weights sw, 4+4 bit packing, then the common re-quantize and pack. */
ALWAYS_INLINE void q2k_finish_w(const float *x, const float *scales, const float *mins, const float *sw,
                                uint8_t *L, uint8_t *y) {
    uint8_t Ls[16], Lm[16];
    const float dm = make_qp_quants(16, 15, scales, Ls, sw);
    const float mm = make_qp_quants(16, 15, mins, Lm, sw);
    for (int j = 0; j < 16; j++) y[j] = (uint8_t)(Ls[j] | (Lm[j] << 4));
    q2k_tail(x, L, y, fp32_to_fp16(dm), fp32_to_fp16(mm));
}

/* quantize_row_q2_K_impl: sigma2 = sum x^2 / 256; make_qkx3_quants(16, 3, .., -0.9, 0.05, 36). */
static void q2k_block_w(const float *x, const float *qw, uint8_t *y) {
    uint8_t L[QK_K];
    float w[16], sw[16], scales[16], mins[16];
    const float sigma2 = sum_sq(x, QK_K) / (float)QK_K;
    for (int j = 0; j < 16; j++) {
        imatrix_weights(x + 16 * j, qw + 16 * j, sigma2, w, 16);
        sw[j] = sum_seq(w, 16);
        scales[j] = make_qkx3_quants_w(16, 3, x + 16 * j, w, L + 16 * j, &mins[j]);
    }
    q2k_finish_w(x, scales, mins, sw, L, y);
}

/* quantize_row_q3_K_impl after the 16 searches: the super-scale by a weighted make_qx_quants
 * over the 16 scales (nmax 32, so Ls already carries the +32 offset), packing, common tail. */
ALWAYS_INLINE void q3k_finish_w(const float *x, const float *scales, const float *sw, int8_t *L, uint8_t *y) {
    int8_t Ls[16];
    uint8_t *sc = y + 96;
    memset(sc, 0, 12);
    const float d_block = make_qx_quants_w(16, 32, scales, Ls, sw);
    for (int j = 0; j < 16; j++) {
        int l = Ls[j];
        if (j < 8) sc[j] = (uint8_t)(l & 0xF);
        else sc[j - 8] |= (uint8_t)((l & 0xF) << 4);
        l >>= 4;
        sc[j % 4 + 8] |= (uint8_t)(l << (2 * (j / 4)));
    }
    q3k_tail(x, L, y, fp32_to_fp16(d_block));
}

/* quantize_row_q3_K_impl: sigma2 = 2 sum x^2 / 256; make_qx_quants(16, 4, .., 1, w). */
static void q3k_block_w(const float *x, const float *qw, uint8_t *y) {
    int8_t L[QK_K];
    float w[16], sw[16], scales[16];
    const float sigma2 = 2 * sum_sq(x, QK_K) / (float)QK_K;
    for (int j = 0; j < 16; j++) {
        imatrix_weights(x + 16 * j, qw + 16 * j, sigma2, w, 16);
        sw[j] = sum_seq(w, 16);
        scales[j] = make_qx_quants_w(16, 4, x + 16 * j, L + 16 * j, w);
    }
    q3k_finish_w(x, scales, sw, L, y);
}

/* quantize_row_q4_K_impl / q5_K_impl after the 8 searches: 6-bit scales and mins by
 * make_qp_quants(8, 63, .., sw); Q5_K clamps them to 63 (Q4_K does not); packing as ggml
 * writes it (bytes, with uint8_t wrap-around); re-quantize with the decoded scales. */
ALWAYS_INLINE void kq45_finish_w(const float *x, const float *scales, const float *mins, const float *sw,
                                 uint8_t *L, int nmax, uint8_t *y) {
    uint8_t Ls[8], Lm[8];
    const float d_block = make_qp_quants(8, 63, scales, Ls, sw);
    const float m_block = make_qp_quants(8, 63, mins, Lm, sw);
    uint8_t *s = y + 4;
    for (int j = 0; j < 8; j++) {
        uint8_t ls = Ls[j], lm = Lm[j];
        if (nmax == 31) {
            ls = MINI(63, ls);
            lm = MINI(63, lm);
        }
        if (j < 4) {
            s[j] = ls;
            s[j + 4] = lm;
        } else {
            s[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
            s[j - 4] |= (uint8_t)((ls >> 4) << 6);
            s[j] |= (uint8_t)((lm >> 4) << 6);
        }
    }
    const uint16_t dh = fp32_to_fp16(d_block), mh = fp32_to_fp16(m_block);
    put_u16(y, dh);
    put_u16(y + 2, mh);
    const float df = fp16_to_fp32(dh), mf = fp16_to_fp32(mh);
    for (int j = 0; j < 8; j++) {
        int sc, m;
        scale_min_k4(j, s, &sc, &m);
        const float d = df * (float)sc;
        if (d == 0) continue;
        const float dm = mf * (float)m;
        const float *xs = x + 32 * j;
        uint8_t *Lj = L + 32 * j;
        for (int i = 0; i < 32; i++) {
            const int l = nearest_int((xs[i] + dm) / d);
            Lj[i] = (uint8_t)MAXI(0, MINI(nmax, l));
        }
    }
    kq45_pack(L, nmax, y);
}

/* quantize_row_q4_K_impl / q5_K_impl: sigma2 = 2 sum x^2 / 256; make_qkx3_quants(32, nmax, ..). */
static void kq45_block_w(const float *x, const float *qw, uint8_t *y, int nmax) {
    uint8_t L[QK_K];
    float w[32], sw[8], scales[8], mins[8];
    const float sigma2 = 2 * sum_sq(x, QK_K) / (float)QK_K;
    for (int j = 0; j < 8; j++) {
        imatrix_weights(x + 32 * j, qw + 32 * j, sigma2, w, 32);
        sw[j] = sum_seq(w, 32);
        scales[j] = make_qkx3_quants_w(32, nmax, x + 32 * j, w, L + 32 * j, &mins[j]);
    }
    kq45_finish_w(x, scales, mins, sw, L, nmax, y);
}

/* quantize_row_q6_K_impl: make_qx_quants(16, 32, .., 1, qw) with the raw imatrix as weights;
 * the rest is the unweighted path's. */
static void q6k_block_w(const float *x, const float *qw, uint8_t *y) {
    int8_t L[QK_K];
    float scales[16];
    for (int ib = 0; ib < 16; ib++) scales[ib] = make_qx_quants_w(16, 32, x + 16 * ib, L + 16 * ib, qw + 16 * ib);
    q6k_finish(x, scales, L, y);
}

/* quantize_row_q4_0_impl / q5_0_impl / q4_1_impl / q5_1_impl for one row: sigma2 over the whole
 * row (sum x^2 / n_per_row), then per 32-block make_qx_quants(32, 8 | 16, .., w) or
 * make_qkx3_quants(32, 15 | 31, .., w); no re-quantization with the rounded scale. */
static void row32_w(int type, const float *x, const float *qw, uint8_t *y, int64_t n) {
    const float sigma2 = sum_sq(x, n) / (float)n;
    float w[32];
    for (int64_t ib = 0; ib < n / 32; ib++) {
        const float *xb = x + 32 * ib;
        imatrix_weights(xb, qw + 32 * ib, sigma2, w, 32);
        switch (type) {
        case T_Q4_0: case T_Q5_0: {
            const int q5 = type == T_Q5_0;
            uint8_t *b = y + (q5 ? 22 : 18) * ib;
            int8_t L[32];
            const float d = make_qx_quants_w(32, q5 ? 16 : 8, xb, L, w);
            put_u16(b, fp32_to_fp16(d));
            if (q5) q5_pack((const uint8_t *)L, b + 2, b + 6);
            else for (int j = 0; j < 16; j++) b[2 + j] = (uint8_t)(L[j] | (L[j + 16] << 4));
            break;
        }
        case T_Q4_1: case T_Q5_1: {
            const int q5 = type == T_Q5_1;
            uint8_t *b = y + (q5 ? 24 : 20) * ib;
            uint8_t L[32];
            float the_min;
            const float d = make_qkx3_quants_w(32, q5 ? 31 : 15, xb, w, L, &the_min);
            put_u16(b, fp32_to_fp16(d));
            put_u16(b + 2, fp32_to_fp16(-the_min));
            if (q5) q5_pack(L, b + 4, b + 8);
            else for (int j = 0; j < 16; j++) b[4 + j] = (uint8_t)(L[j] | (L[j + 16] << 4));
            break;
        }
        }
    }
}

/* quantize_iq4_nl with quant_weights: quantize_row_iq4_nl_impl(32, 32, ..), sigma2 = 2 sum x^2 / 32 */
static void iq4nl_block_w(const float *x, const float *qw, uint8_t *y) {
    float w[32];
    float sigma2 = sum_sq(x, 32);
    sigma2 *= 2.0f / 32;
    imatrix_weights(x, qw, sigma2, w, 32);
    iq4nl_finish(x, iq4_scale32w(x, w), y);
}

/* quantize_iq4_xs with quant_weights: quantize_row_iq4_nl_impl(256, 32, ..), sigma2 over 256 */
static void iq4xs_block_w(const float *x, const float *qw, uint8_t *y) {
    float w[32], scales[8];
    float sigma2 = sum_sq(x, QK_K);
    sigma2 *= 2.0f / QK_K;
    for (int ib = 0; ib < 8; ib++) {
        imatrix_weights(x + 32 * ib, qw + 32 * ib, sigma2, w, 32);
        scales[ib] = iq4_scale32w(x + 32 * ib, w);
    }
    iq4xs_finish(x, scales, y);
}

/* IQ4 with an imatrix, the scale searches lane-parallel: nb blocks (32 for IQ4_NL, 256 for IQ4_XS)
 * from the start of a row; block i uses the imatrix slice of its place in the row (nbr blocks). */
static void iq4_batched_w(iq4_scales_fn scales_of, int xs, const float *x, uint8_t *y, int64_t nb,
                          const float *qw, int64_t nbr) {
    enum { BATCH = 64 };
    float scales[BATCH], w[BATCH * 32];
    const int per = xs ? 8 : 1, bytes = xs ? 136 : 18, sbs = 32 * per;
    for (int64_t b = 0; b < nb; b += BATCH / per) {
        const int n = (int)(nb - b < BATCH / per ? nb - b : BATCH / per);
        const float *xb = x + b * sbs;
        for (int i = 0; i < n; i++) {
            const float *xi = xb + (int64_t)i * sbs, *q = qw + sbs * ((b + i) % nbr);
            float sigma2 = sum_sq(xi, sbs);
            sigma2 *= 2.0f / sbs;
            imatrix_weights(xi, q, sigma2, w + i * sbs, sbs);
        }
        scales_of(xb, w, scales, (int64_t)n * per);
        for (int i = 0; i < n; i++) {
            if (xs) iq4xs_finish(xb + 256 * i, scales + 8 * i, y + (b + i) * bytes);
            else iq4nl_finish(xb + 32 * i, scales[i], y + (b + i) * bytes);
        }
    }
}

/* ===================================================================== */
/* K-quants: vector path (one sub-block per SIMD lane)                    */
/* ===================================================================== */

/* The kernels below the final #else are compiled once per instruction set by
 * including this file again with a different native lane count VW and target:
 * the same source, hence the same IEEE operations in every lane. NV45/NV6 native
 * vectors are processed together (for instruction-level parallelism and because a
 * batch must hold whole super-blocks: 8 lanes for Q4_K/Q5_K, 16 for Q6_K). */
#define KERNEL_PASS 1

#define SFX base
#define VW 4
#define NV45 2
#define NV6 4
#include "_native.c"
#undef SFX
#undef VW
#undef NV45
#undef NV6

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)  /* clang lacks "#pragma GCC target" */
#define HAVE_X86_DISPATCH 1
#pragma GCC push_options
#pragma GCC target("avx2")
#define SFX avx2
#define VW 8
#define NV45 2
#define NV6 2
#include "_native.c"
#undef SFX
#undef VW
#undef NV45
#undef NV6
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f")
#define SFX avx512
#define VW 16
#define NV45 1
#define NV6 1
#include "_native.c"
#undef SFX
#undef VW
#undef NV45
#undef NV6
#pragma GCC pop_options
#endif

#include "native_iq2.c"  /* IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M */

enum { IMPL_SCALAR = 0, IMPL_BASE = 1, IMPL_AVX2 = 2, IMPL_AVX512 = 3 };

static int impl_available(int impl) {
    switch (impl) {
    case IMPL_SCALAR: case IMPL_BASE: return 1;
#ifdef HAVE_X86_DISPATCH
    case IMPL_AVX2: return __builtin_cpu_supports("avx2");
    case IMPL_AVX512: return __builtin_cpu_supports("avx512f");
#endif
    default: return 0;
    }
}

static int best_impl(void) {
    for (int i = IMPL_AVX512; i > IMPL_SCALAR; i--)
        if (impl_available(i)) return i;
    return IMPL_SCALAR;
}

/* ===================================================================== */
/* dispatch                                                              */
/* ===================================================================== */

static int block_info(int type, int *blck, int *bytes) {
    switch (type) {
    case T_F32: *blck = 1; *bytes = 4; return 1;
    case T_F16: case T_BF16: *blck = 1; *bytes = 2; return 1;
    case T_Q8_0: *blck = 32; *bytes = 34; return 1;
    case T_Q5_0: *blck = 32; *bytes = 22; return 1;
    case T_Q5_1: *blck = 32; *bytes = 24; return 1;
    case T_Q4_0: *blck = 32; *bytes = 18; return 1;
    case T_Q4_1: *blck = 32; *bytes = 20; return 1;
    case T_IQ4_NL: *blck = 32; *bytes = 18; return 1;
    case T_IQ4_XS: *blck = 256; *bytes = 136; return 1;
    case T_Q2_K: *blck = 256; *bytes = 84; return 1;
    case T_Q3_K: *blck = 256; *bytes = 110; return 1;
    case T_Q4_K: *blck = 256; *bytes = 144; return 1;
    case T_Q5_K: *blck = 256; *bytes = 176; return 1;
    case T_Q6_K: *blck = 256; *bytes = 210; return 1;
    default: return ext_block_info(type, blck, bytes) || iq2_block_info(type, blck, bytes);
    }
}

static void quantize_blocks(int type, const float *x, uint8_t *y, int64_t nb, int impl) {
    int eb, ebytes;
    if (ext_block_info(type, &eb, &ebytes) && ext_quantize(type, x, y, 1, nb * eb, NULL)) return;
    switch (type) {
    case T_F32:
        memcpy(y, x, (size_t)nb * 4);
        return;
    case T_F16:
        for (int64_t i = 0; i < nb; i++) put_u16(y + 2 * i, fp32_to_fp16(x[i]));
        return;
    case T_BF16:
        for (int64_t i = 0; i < nb; i++) put_u16(y + 2 * i, fp32_to_bf16(x[i]));
        return;
    case T_Q8_0:
        switch (impl) {
#ifdef HAVE_X86_DISPATCH
        case IMPL_AVX512: q8_0_vec_avx512(x, y, nb); return;
        case IMPL_AVX2: q8_0_vec_avx2(x, y, nb); return;
#endif
        case IMPL_BASE: q8_0_vec_base(x, y, nb); return;
        default:
            for (int64_t i = 0; i < nb; i++) q8_0_block(x + 32 * i, y + 34 * i);
            return;
        }
    case T_Q4_0: case T_Q4_1: case T_Q5_0: case T_Q5_1:
        switch (impl) {
#ifdef HAVE_X86_DISPATCH
        case IMPL_AVX512: q32_vec_avx512(x, y, nb, type); return;
        case IMPL_AVX2: q32_vec_avx2(x, y, nb, type); return;
#endif
        case IMPL_BASE: q32_vec_base(x, y, nb, type); return;
        default: {
            const int bytes = type == T_Q4_0 ? 18 : type == T_Q4_1 ? 20 : type == T_Q5_0 ? 22 : 24;
            for (int64_t i = 0; i < nb; i++) {
                const float *xb = x + 32 * i;
                uint8_t *yb = y + bytes * i;
                switch (type) {
                case T_Q4_0: q4_0_block(xb, yb); break;
                case T_Q4_1: q4_1_block(xb, yb); break;
                case T_Q5_0: q5_0_block(xb, yb); break;
                default: q5_1_block(xb, yb); break;
                }
            }
            return;
        }
        }
    case T_IQ4_NL: case T_IQ4_XS: {
        const int xs = type == T_IQ4_XS;
        switch (impl) {
#ifdef HAVE_X86_DISPATCH
        case IMPL_AVX512: iq4_batched(iq4_scales_avx512, xs, x, y, nb); return;
        case IMPL_AVX2: iq4_batched(iq4_scales_avx2, xs, x, y, nb); return;
#endif
        case IMPL_BASE: iq4_batched(iq4_scales_base, xs, x, y, nb); return;
        default:
            if (xs) for (int64_t i = 0; i < nb; i++) iq4xs_block(x + QK_K * i, y + 136 * i);
            else for (int64_t i = 0; i < nb; i++) iq4nl_block(x + 32 * i, y + 18 * i);
            return;
        }
    }
    case T_Q2_K:
        switch (impl) {
#ifdef HAVE_X86_DISPATCH
        case IMPL_AVX512: q2k_vec_avx512(x, y, nb); return;
        case IMPL_AVX2: q2k_vec_avx2(x, y, nb); return;
#endif
        case IMPL_BASE: q2k_vec_base(x, y, nb); return;
        default:
            for (int64_t i = 0; i < nb; i++) q2k_block(x + QK_K * i, y + 84 * i);
            return;
        }
    case T_Q3_K:
        switch (impl) {
#ifdef HAVE_X86_DISPATCH
        case IMPL_AVX512: q3k_vec_avx512(x, y, nb); return;
        case IMPL_AVX2: q3k_vec_avx2(x, y, nb); return;
#endif
        case IMPL_BASE: q3k_vec_base(x, y, nb); return;
        default:
            for (int64_t i = 0; i < nb; i++) q3k_block(x + QK_K * i, y + 110 * i);
            return;
        }
    case T_Q4_K: case T_Q5_K: {
        const int nmax = type == T_Q4_K ? 15 : 31, bytes = type == T_Q4_K ? 144 : 176;
        switch (impl) {
#ifdef HAVE_X86_DISPATCH
        case IMPL_AVX512: kq45_vec_avx512(x, y, nb, nmax); return;
        case IMPL_AVX2: kq45_vec_avx2(x, y, nb, nmax); return;
#endif
        case IMPL_BASE: kq45_vec_base(x, y, nb, nmax); return;
        default:
            for (int64_t i = 0; i < nb; i++) kq45_block_scalar(x + QK_K * i, y + bytes * i, nmax);
            return;
        }
    }
    case T_Q6_K:
        switch (impl) {
#ifdef HAVE_X86_DISPATCH
        case IMPL_AVX512: q6k_vec_avx512(x, y, nb); return;
        case IMPL_AVX2: q6k_vec_avx2(x, y, nb); return;
#endif
        case IMPL_BASE: q6k_vec_base(x, y, nb); return;
        default:
            for (int64_t i = 0; i < nb; i++) q6k_block_scalar(x + QK_K * i, y + 210 * i);
            return;
        }
    default:
        iq2_quantize_rows(type, x, y, 1, nb * QK_K, NULL, impl != IMPL_SCALAR);
    }
}

/* With an importance matrix (ggml_quantize_chunk with imatrix != NULL): nrows whole rows of n
 * elements, every row weighted by the same qw[0..n-1]. Types the imatrix does not affect
 * (F32/F16/BF16/Q8_0) take the unweighted path. */
static int uses_imatrix(int type) {
    switch (type) {
    case T_Q4_0: case T_Q4_1: case T_Q5_0: case T_Q5_1: case T_IQ4_NL: case T_IQ4_XS:
    case T_Q2_K: case T_Q3_K: case T_Q4_K: case T_Q5_K: case T_Q6_K: return 1;
    default: return ext_uses_imatrix(type) || iq2_block_info(type, &(int){0}, &(int){0});
    }
}

static void quantize_rows_w(int type, const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw,
                            int impl) {
    if (ext_quantize(type, x, y, nrows, n, qw)) return;
    int blck, bytes;
    block_info(type, &blck, &bytes);
    if (!uses_imatrix(type)) {
        quantize_blocks(type, x, y, nrows * n / blck, impl);
        return;
    }
    const int64_t nb = n / blck, row_bytes = nb * bytes;
    for (int64_t r = 0; r < nrows; r++) {
        const float *xr = x + r * n;
        uint8_t *yr = y + r * row_bytes;
        switch (type) {
        case T_Q4_0: case T_Q4_1: case T_Q5_0: case T_Q5_1:
            row32_w(type, xr, qw, yr, n);
            break;
        case T_IQ4_NL:
            for (int64_t i = 0; i < nb; i++) iq4nl_block_w(xr + 32 * i, qw + 32 * i, yr + 18 * i);
            break;
        case T_IQ4_XS:
            for (int64_t i = 0; i < nb; i++) iq4xs_block_w(xr + QK_K * i, qw + QK_K * i, yr + 136 * i);
            break;
        case T_Q2_K:
            for (int64_t i = 0; i < nb; i++) q2k_block_w(xr + QK_K * i, qw + QK_K * i, yr + 84 * i);
            break;
        case T_Q3_K:
            for (int64_t i = 0; i < nb; i++) q3k_block_w(xr + QK_K * i, qw + QK_K * i, yr + 110 * i);
            break;
        case T_Q4_K: case T_Q5_K: {
            const int nmax = type == T_Q4_K ? 15 : 31;
            for (int64_t i = 0; i < nb; i++) kq45_block_w(xr + QK_K * i, qw + QK_K * i, yr + bytes * i, nmax);
            break;
        }
        case T_Q6_K:
            for (int64_t i = 0; i < nb; i++) q6k_block_w(xr + QK_K * i, qw + QK_K * i, yr + 210 * i);
            break;
        default:
            iq2_quantize_rows(type, xr, yr, 1, n, qw, impl != IMPL_SCALAR);
        }
    }
}

/* The lane-parallel weighted kernels take all rows' super-blocks at once (rows are contiguous). */
static void quantize_rows_w_vec(int type, const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw,
                                int impl) {
    const int64_t nbr = n / QK_K, nsb = nrows * nbr;
    switch (type) {
    case T_Q4_K: case T_Q5_K: {
        const int nmax = type == T_Q4_K ? 15 : 31;
        switch (impl) {
#ifdef HAVE_X86_DISPATCH
        case IMPL_AVX512: kq45w_vec_avx512(x, y, nsb, nmax, qw, nbr); return;
        case IMPL_AVX2: kq45w_vec_avx2(x, y, nsb, nmax, qw, nbr); return;
#endif
        default: kq45w_vec_base(x, y, nsb, nmax, qw, nbr); return;
        }
    }
    case T_Q4_0: case T_Q4_1: case T_Q5_0: case T_Q5_1:
        switch (impl) {
#ifdef HAVE_X86_DISPATCH
        case IMPL_AVX512: row32w_vec_avx512(type, x, y, nrows, n, qw); return;
        case IMPL_AVX2: row32w_vec_avx2(type, x, y, nrows, n, qw); return;
#endif
        default: row32w_vec_base(type, x, y, nrows, n, qw); return;
        }
    case T_Q2_K:
        switch (impl) {
#ifdef HAVE_X86_DISPATCH
        case IMPL_AVX512: q2kw_vec_avx512(x, y, nsb, qw, nbr); return;
        case IMPL_AVX2: q2kw_vec_avx2(x, y, nsb, qw, nbr); return;
#endif
        default: q2kw_vec_base(x, y, nsb, qw, nbr); return;
        }
    case T_Q3_K: case T_Q6_K: {
        const int q3 = type == T_Q3_K;
        switch (impl) {
#ifdef HAVE_X86_DISPATCH
        case IMPL_AVX512: qxw_vec_avx512(x, y, nsb, q3, qw, nbr); return;
        case IMPL_AVX2: qxw_vec_avx2(x, y, nsb, q3, qw, nbr); return;
#endif
        default: qxw_vec_base(x, y, nsb, q3, qw, nbr); return;
        }
    }
    case T_IQ4_NL: case T_IQ4_XS: {
        const int xs = type == T_IQ4_XS;
        const int64_t nbl = xs ? nbr : n / 32;
        switch (impl) {
#ifdef HAVE_X86_DISPATCH
        case IMPL_AVX512: iq4_batched_w(iq4_scales_avx512, xs, x, y, nrows * nbl, qw, nbl); return;
        case IMPL_AVX2: iq4_batched_w(iq4_scales_avx2, xs, x, y, nrows * nbl, qw, nbl); return;
#endif
        default: iq4_batched_w(iq4_scales_base, xs, x, y, nrows * nbl, qw, nbl); return;
        }
    }
    default:
        quantize_rows_w(type, x, y, nrows, n, qw, impl);
    }
}

/* ===================================================================== */
/* dequantization (spec 5; each op rounded separately)                    */
/* ===================================================================== */

static void dequantize_blocks(int type, const uint8_t *x, float *y, int64_t nb) {
    if (ext_dequantize(type, x, y, nb)) return;
    for (int64_t i = 0; i < nb; i++) {
        switch (type) {
        case T_F32: memcpy(y + i, x + 4 * i, 4); break;
        case T_F16: y[i] = fp16_to_fp32(get_u16(x + 2 * i)); break;
        case T_BF16: y[i] = u2f((uint32_t)get_u16(x + 2 * i) << 16); break;
        case T_Q8_0: {
            const uint8_t *b = x + 34 * i;
            const float d = fp16_to_fp32(get_u16(b));
            for (int j = 0; j < 32; j++) y[32 * i + j] = (float)(int8_t)b[2 + j] * d;
            break;
        }
        case T_Q5_0: case T_Q5_1: {
            const int q51 = type == T_Q5_1;
            const uint8_t *b = x + (q51 ? 24 : 22) * i;
            const float d = fp16_to_fp32(get_u16(b));
            const float m = q51 ? fp16_to_fp32(get_u16(b + 2)) : 0.0f;
            const uint8_t *qhp = b + (q51 ? 4 : 2), *qs = qhp + 4;
            const uint32_t qh = qhp[0] | (qhp[1] << 8) | (qhp[2] << 16) | ((uint32_t)qhp[3] << 24);
            for (int j = 0; j < 16; j++) {
                const int v0 = (qs[j] & 15) | (int)(((qh >> j) & 1) << 4);
                const int v1 = (qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
                float *o = y + 32 * i;
                if (q51) { o[j] = (float)v0 * d + m; o[j + 16] = (float)v1 * d + m; }
                else { o[j] = (float)(v0 - 16) * d; o[j + 16] = (float)(v1 - 16) * d; }
            }
            break;
        }
        case T_Q4_0: case T_Q4_1: {
            /* dequantize_row_q4_0 / _q4_1 */
            const int q41 = type == T_Q4_1;
            const uint8_t *b = x + (q41 ? 20 : 18) * i, *qs = b + (q41 ? 4 : 2);
            const float d = fp16_to_fp32(get_u16(b));
            const float m = q41 ? fp16_to_fp32(get_u16(b + 2)) : 0.0f;
            float *o = y + 32 * i;
            for (int j = 0; j < 16; j++) {
                const int v0 = qs[j] & 15, v1 = qs[j] >> 4;
                if (q41) { o[j] = (float)v0 * d + m; o[j + 16] = (float)v1 * d + m; }
                else { o[j] = (float)(v0 - 8) * d; o[j + 16] = (float)(v1 - 8) * d; }
            }
            break;
        }
        case T_IQ4_NL: {
            /* dequantize_row_iq4_nl */
            const uint8_t *b = x + 18 * i, *qs = b + 2;
            const float d = fp16_to_fp32(get_u16(b));
            float *o = y + 32 * i;
            for (int j = 0; j < 16; j++) {
                o[j] = d * (float)kvalues_iq4nl[qs[j] & 15];
                o[j + 16] = d * (float)kvalues_iq4nl[qs[j] >> 4];
            }
            break;
        }
        case T_IQ4_XS: {
            /* dequantize_row_iq4_xs */
            const uint8_t *b = x + 136 * i;
            const float d = fp16_to_fp32(get_u16(b));
            const unsigned sh = get_u16(b + 2);
            for (int ib = 0; ib < 8; ib++) {
                const int ls = ((b[4 + ib / 2] >> (4 * (ib % 2))) & 15) | (((sh >> (2 * ib)) & 3) << 4);
                const float dl = d * (float)(ls - 32);
                const uint8_t *qs = b + 8 + 16 * ib;
                float *o = y + QK_K * i + 32 * ib;
                for (int j = 0; j < 16; j++) {
                    o[j] = dl * (float)kvalues_iq4nl[qs[j] & 15];
                    o[j + 16] = dl * (float)kvalues_iq4nl[qs[j] >> 4];
                }
            }
            break;
        }
        case T_Q2_K: {
            /* dequantize_row_q2_K: element e uses scale byte e/16, 2 bits of qs[32*(e/128) + e%32] */
            const uint8_t *b = x + 84 * i, *qs = b + 16;
            const float d = fp16_to_fp32(get_u16(b + 80)), dmin = fp16_to_fp32(get_u16(b + 82));
            for (int e = 0; e < QK_K; e++) {
                const uint8_t sc = b[e / 16];
                const float dl = d * (float)(sc & 15), ml = dmin * (float)(sc >> 4);
                const int q = (qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3;
                y[QK_K * i + e] = dl * (float)q - ml;
            }
            break;
        }
        case T_Q3_K: {
            /* dequantize_row_q3_K: as Q2_K plus the high bit in hmask[e%32] bit e/32 (clear = -4) */
            const uint8_t *b = x + 110 * i, *hm = b, *qs = b + 32, *sc = b + 96;
            const float d_all = fp16_to_fp32(get_u16(b + 108));
            for (int e = 0; e < QK_K; e++) {
                const float dl = d_all * (float)q3k_scale(sc, e / 16);
                const int q = (qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3;
                const int v = q - ((hm[e % 32] >> (e / 32)) & 1 ? 0 : 4);
                y[QK_K * i + e] = dl * (float)v;
            }
            break;
        }
        case T_Q4_K: case T_Q5_K: {
            const int q5 = type == T_Q5_K;
            const uint8_t *b = x + (q5 ? 176 : 144) * i;
            const float d = fp16_to_fp32(get_u16(b)), dmin = fp16_to_fp32(get_u16(b + 2));
            const uint8_t *qh = b + 16, *qs = b + (q5 ? 48 : 16);
            for (int j = 0; j < 8; j++) {
                int sc, m;
                scale_min_k4(j, b + 4, &sc, &m);
                const float d1 = d * (float)sc, m1 = dmin * (float)m;
                const int p = j / 2, hi = j & 1;
                for (int l = 0; l < 32; l++) {
                    int q = hi ? qs[32 * p + l] >> 4 : qs[32 * p + l] & 15;
                    if (q5) q |= ((qh[l] >> j) & 1) << 4;
                    y[QK_K * i + 32 * j + l] = d1 * (float)q - m1;
                }
            }
            break;
        }
        case T_Q6_K: {
            const uint8_t *b = x + 210 * i;
            const float d = fp16_to_fp32(get_u16(b + 208));
            for (int h = 0; h < 2; h++)
                for (int l = 0; l < 32; l++) {
                    const uint8_t *ql = b + 64 * h, *qh = b + 128 + 32 * h;
                    const int u[4] = {
                        (ql[l] & 15) | ((qh[l] & 3) << 4),
                        (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4),
                        (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                        (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                    };
                    for (int k = 0; k < 4; k++) {
                        const int e = 128 * h + l + 32 * k;
                        const float sc = (float)(int8_t)b[192 + e / 16];
                        y[QK_K * i + e] = (d * sc) * (float)(u[k] - 32);
                    }
                }
            break;
        }
        default: {
            int blck, bytes;
            iq2_block_info(type, &blck, &bytes);
            iq2_dequantize_block(type, x + bytes * i, y + QK_K * i);
        }
        }
    }
}

/* ===================================================================== */
/* Python bindings (buffer protocol; the GIL is released for the work)    */
/* ===================================================================== */

typedef struct { Py_buffer b; int ok; } buf_t;

static int get_buf(PyObject *o, buf_t *out, int writable) {
    out->ok = 0;
    if (PyObject_GetBuffer(o, &out->b, writable ? PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS : PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    out->ok = 1;
    return 0;
}
static void rel_buf(buf_t *b) { if (b->ok) PyBuffer_Release(&b->b); b->ok = 0; }

/* quantize(type, src_f32, dst, impl=-1): src length must be a multiple of the block. */
static PyObject *py_quantize(PyObject *self, PyObject *args) {
    int type, impl = -1, blck, bytes;
    PyObject *so, *dob;
    if (!PyArg_ParseTuple(args, "iOO|i", &type, &so, &dob, &impl)) return NULL;
    if (!block_info(type, &blck, &bytes)) return PyErr_Format(PyExc_ValueError, "unsupported type %d", type);
    if (impl < 0) impl = best_impl();
    if (!impl_available(impl)) return PyErr_Format(PyExc_ValueError, "implementation %d not available", impl);
    if (iq2_prepare(type, 0) < 0) return NULL;
    buf_t s, d;
    if (get_buf(so, &s, 0) < 0) return NULL;
    if (get_buf(dob, &d, 1) < 0) { rel_buf(&s); return NULL; }
    const Py_ssize_t n = s.b.len / 4;
    if (s.b.len % 4 || n % blck || d.b.len != (n / blck) * bytes) {
        rel_buf(&s); rel_buf(&d);
        return PyErr_Format(PyExc_ValueError, "bad sizes: src %zd bytes, dst %zd bytes", s.b.len, d.b.len);
    }
    Py_BEGIN_ALLOW_THREADS
    quantize_blocks(type, (const float *)s.b.buf, (uint8_t *)d.b.buf, n / blck, impl);
    Py_END_ALLOW_THREADS
    rel_buf(&s); rel_buf(&d);
    Py_RETURN_NONE;
}

/* quantize_w(type, src_f32, dst, n_per_row, imatrix_f32, impl=-1): whole rows, each weighted by
 * the n_per_row imatrix values (ggml_quantize_chunk with an imatrix). */
static PyObject *py_quantize_w(PyObject *self, PyObject *args) {
    int type, impl = -1, blck, bytes;
    Py_ssize_t n;
    PyObject *so, *dob, *wo;
    if (!PyArg_ParseTuple(args, "iOOnO|i", &type, &so, &dob, &n, &wo, &impl)) return NULL;
    if (!block_info(type, &blck, &bytes)) return PyErr_Format(PyExc_ValueError, "unsupported type %d", type);
    if (impl < 0) impl = best_impl();
    if (!impl_available(impl)) return PyErr_Format(PyExc_ValueError, "implementation %d not available", impl);
    if (n <= 0 || n % blck) return PyErr_Format(PyExc_ValueError, "row length %zd is not a multiple of %d", n, blck);
    if (iq2_prepare(type, 1) < 0) return NULL;
    buf_t s, d, w;
    if (get_buf(so, &s, 0) < 0) return NULL;
    if (get_buf(dob, &d, 1) < 0) { rel_buf(&s); return NULL; }
    if (get_buf(wo, &w, 0) < 0) { rel_buf(&s); rel_buf(&d); return NULL; }
    const Py_ssize_t nel = s.b.len / 4, nrows = nel / n;
    if (s.b.len % 4 || nel % n || d.b.len != nrows * (n / blck) * bytes || w.b.len != n * 4) {
        rel_buf(&s); rel_buf(&d); rel_buf(&w);
        return PyErr_Format(PyExc_ValueError, "bad sizes: src %zd bytes, dst %zd bytes, imatrix %zd bytes",
                            s.b.len, d.b.len, w.b.len);
    }
    Py_BEGIN_ALLOW_THREADS
    if (impl == IMPL_SCALAR) quantize_rows_w(type, (const float *)s.b.buf, (uint8_t *)d.b.buf, nrows, n, (const float *)w.b.buf, impl);
    else quantize_rows_w_vec(type, (const float *)s.b.buf, (uint8_t *)d.b.buf, nrows, n, (const float *)w.b.buf, impl);
    Py_END_ALLOW_THREADS
    rel_buf(&s); rel_buf(&d); rel_buf(&w);
    Py_RETURN_NONE;
}

static PyObject *py_uses_imatrix(PyObject *self, PyObject *args) {
    int type;
    if (!PyArg_ParseTuple(args, "i", &type)) return NULL;
    return PyBool_FromLong(uses_imatrix(type));
}

/* dequantize(type, src_bytes, dst_f32) */
static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    int type, blck, bytes;
    PyObject *so, *dob;
    if (!PyArg_ParseTuple(args, "iOO", &type, &so, &dob)) return NULL;
    if (!block_info(type, &blck, &bytes)) return PyErr_Format(PyExc_ValueError, "unsupported type %d", type);
    buf_t s, d;
    if (get_buf(so, &s, 0) < 0) return NULL;
    if (get_buf(dob, &d, 1) < 0) { rel_buf(&s); return NULL; }
    const Py_ssize_t nb = s.b.len / bytes;
    if (s.b.len % bytes || d.b.len != nb * blck * 4) {
        rel_buf(&s); rel_buf(&d);
        return PyErr_Format(PyExc_ValueError, "bad sizes: src %zd bytes, dst %zd bytes", s.b.len, d.b.len);
    }
    Py_BEGIN_ALLOW_THREADS
    dequantize_blocks(type, (const uint8_t *)s.b.buf, (float *)d.b.buf, nb);
    Py_END_ALLOW_THREADS
    rel_buf(&s); rel_buf(&d);
    Py_RETURN_NONE;
}

/* count_nonfinite(src, kind): kind 0 = f32, 1 = f16, 2 = bf16 (raw u16). */
static PyObject *py_count_nonfinite(PyObject *self, PyObject *args) {
    int kind = 0;
    PyObject *so;
    if (!PyArg_ParseTuple(args, "O|i", &so, &kind)) return NULL;
    buf_t s;
    if (get_buf(so, &s, 0) < 0) return NULL;
    int64_t cnt = 0;
    Py_BEGIN_ALLOW_THREADS
    if (kind == 0) {
        const uint32_t *p = (const uint32_t *)s.b.buf;
        const int64_t n = s.b.len / 4;
        for (int64_t i = 0; i < n; i++) cnt += (p[i] & 0x7F800000u) == 0x7F800000u;
    } else {
        const uint16_t *p = (const uint16_t *)s.b.buf;
        const int64_t n = s.b.len / 2;
        const uint16_t e = kind == 1 ? 0x7C00u : 0x7F80u;
        for (int64_t i = 0; i < n; i++) cnt += (p[i] & e) == e;
    }
    Py_END_ALLOW_THREADS
    rel_buf(&s);
    return PyLong_FromLongLong(cnt);
}

/* bf16_to_f32(src_u16, dst_f32) and f16_to_f32(src_u16, dst_f32) */
static PyObject *widen(PyObject *args, int bf) {
    PyObject *so, *dob;
    if (!PyArg_ParseTuple(args, "OO", &so, &dob)) return NULL;
    buf_t s, d;
    if (get_buf(so, &s, 0) < 0) return NULL;
    if (get_buf(dob, &d, 1) < 0) { rel_buf(&s); return NULL; }
    const int64_t n = s.b.len / 2;
    if (s.b.len % 2 || d.b.len != n * 4) {
        rel_buf(&s); rel_buf(&d);
        return PyErr_Format(PyExc_ValueError, "bad sizes");
    }
    const uint16_t *p = (const uint16_t *)s.b.buf;
    float *o = (float *)d.b.buf;
    Py_BEGIN_ALLOW_THREADS
    if (bf) for (int64_t i = 0; i < n; i++) o[i] = u2f((uint32_t)p[i] << 16);
    else for (int64_t i = 0; i < n; i++) o[i] = fp16_to_fp32(p[i]);
    Py_END_ALLOW_THREADS
    rel_buf(&s); rel_buf(&d);
    Py_RETURN_NONE;
}
static PyObject *py_bf16_to_f32(PyObject *self, PyObject *args) { return widen(args, 1); }

static void bf16_to_f16_scalar(const uint16_t *p, uint8_t *o, int64_t from, int64_t to) {
    for (int64_t i = from; i < to; i++) put_u16(o + 2 * i, fp32_to_fp16(u2f((uint32_t)p[i] << 16)));
}

#ifdef HAVE_X86_DISPATCH
#include <immintrin.h>
/* 8 values per step with the F16C instruction (IEEE round to nearest even, like the scalar
   routine). Blocks holding a NaN go to the scalar routine, whose NaN encoding is ggml's. */
__attribute__((target("f16c")))
static void bf16_to_f16_f16c(const uint16_t *p, uint8_t *o, int64_t n) {
    const __m128i zero = _mm_setzero_si128(), magnitude = _mm_set1_epi16(0x7FFF), inf = _mm_set1_epi16(0x7F80);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m128i b = _mm_loadu_si128((const __m128i *)(p + i));
        if (_mm_movemask_epi8(_mm_cmpgt_epi16(_mm_and_si128(b, magnitude), inf))) {
            bf16_to_f16_scalar(p, o, i, i + 8);
            continue;
        }
        const __m128 lo = _mm_castsi128_ps(_mm_unpacklo_epi16(zero, b));  /* bf16 << 16 = float32 */
        const __m128 hi = _mm_castsi128_ps(_mm_unpackhi_epi16(zero, b));
        const __m128i h = _mm_unpacklo_epi64(_mm_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT),
                                             _mm_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT));
        _mm_storeu_si128((__m128i *)(o + 2 * i), h);
    }
    bf16_to_f16_scalar(p, o, i, n);
}
#endif

/* bf16_to_f16(src_u16, dst_u16): one pass, no float32 array in between (bf16 -> f32 is exact). */
static PyObject *py_bf16_to_f16(PyObject *self, PyObject *args) {
    PyObject *so, *dob;
    if (!PyArg_ParseTuple(args, "OO", &so, &dob)) return NULL;
    buf_t s, d;
    if (get_buf(so, &s, 0) < 0) return NULL;
    if (get_buf(dob, &d, 1) < 0) { rel_buf(&s); return NULL; }
    if (s.b.len % 2 || d.b.len != s.b.len) {
        rel_buf(&s); rel_buf(&d);
        return PyErr_Format(PyExc_ValueError, "bad sizes");
    }
    const int64_t n = s.b.len / 2;
    const uint16_t *p = (const uint16_t *)s.b.buf;
    uint8_t *o = (uint8_t *)d.b.buf;
    Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_X86_DISPATCH
    if (__builtin_cpu_supports("f16c")) bf16_to_f16_f16c(p, o, n);
    else
#endif
    bf16_to_f16_scalar(p, o, 0, n);
    Py_END_ALLOW_THREADS
    rel_buf(&s); rel_buf(&d);
    Py_RETURN_NONE;
}
static PyObject *py_f16_to_f32(PyObject *self, PyObject *args) { return widen(args, 0); }

static PyObject *py_impls(PyObject *self, PyObject *noargs) {
    PyObject *l = PyList_New(0);
    static const char *names[] = {"scalar", "vec-base", "vec-avx2", "vec-avx512"};
    for (int i = 0; i < 4; i++)
        if (impl_available(i)) {
            PyObject *t = Py_BuildValue("(is)", i, names[i]);
            if (!t || PyList_Append(l, t) < 0) { Py_XDECREF(t); Py_DECREF(l); return NULL; }
            Py_DECREF(t);
        }
    return l;
}

static PyObject *py_best_impl(PyObject *self, PyObject *noargs) { return PyLong_FromLong(best_impl()); }

static PyMethodDef methods[] = {
    {"quantize", py_quantize, METH_VARARGS, "quantize(type, src_f32, dst_u8, impl=-1)"},
    {"quantize_w", py_quantize_w, METH_VARARGS, "quantize_w(type, src_f32, dst_u8, n_per_row, imatrix_f32, impl=-1)"},
    {"uses_imatrix", py_uses_imatrix, METH_VARARGS, "uses_imatrix(type) -> bool"},
    {"dequantize", py_dequantize, METH_VARARGS, "dequantize(type, src_u8, dst_f32)"},
    {"count_nonfinite", py_count_nonfinite, METH_VARARGS, "count_nonfinite(src, kind=0)"},
    {"bf16_to_f32", py_bf16_to_f32, METH_VARARGS, "bf16_to_f32(src_u16, dst_f32)"},
    {"f16_to_f32", py_f16_to_f32, METH_VARARGS, "f16_to_f32(src_u16, dst_f32)"},
    {"bf16_to_f16", py_bf16_to_f16, METH_VARARGS, "bf16_to_f16(src_u16, dst_u16)"},
    {"impls", py_impls, METH_NOARGS, "available implementations as (id, name)"},
    {"best_impl", py_best_impl, METH_NOARGS, "id of the fastest available implementation"},
    {"lattice_tables", py_lattice_tables, METH_VARARGS, "lattice_tables(type) -> (grid, map, neighbours) bytes"},
    {"requires_imatrix", py_requires_imatrix, METH_VARARGS, "requires_imatrix(type) -> bool"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_native", "gguforge native quantizer", -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&mod); }

#else /* KERNEL_PASS: per-instruction-set kernels */
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define N(name) CAT(name, SFX)

typedef float N(vf) __attribute__((vector_size(VW * 4)));
typedef int32_t N(vi) __attribute__((vector_size(VW * 4)));
typedef int8_t N(vb) __attribute__((vector_size(VW)));
#define vf N(vf)
#define vi N(vi)
#define vb N(vb)
#define vsel N(vsel)
#define vabs N(vabs)
#define vnearest_clamp N(vnearest_clamp)
#define qkx2_vec N(qkx2_vec)
#define qx_vec N(qx_vec)

ALWAYS_INLINE vf vsel(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }
ALWAYS_INLINE vf vabs(vf a) { return (vf)((vi)a & 0x7FFFFFFF); }
/* clamp(nearest_int(f), lo, hi) as a float (the small ints are exact) */
ALWAYS_INLINE vf vnearest_clamp(vf f, int lo, int hi) {
    vf v = f + 12582912.0f;
    vi l = ((vi)v & 0x007FFFFF) - 0x00400000;
    vi m = l < lo;
    l = (m & lo) | (~m & l);
    m = l > hi;
    l = (m & hi) | (~m & l);
    return __builtin_convertvector(l, vf);
}

/* make_qkx2_quants (n = 32, or 16 for Q2_K; rows past n are not read) on NV45*VW sub-blocks at once: xt[i][v] holds element i of
 * VW sub-blocks. Branches become per-lane selects; the drifting min is per lane. */
ALWAYS_INLINE void qkx2_vec(int nmax, int n, vf xt[32][NV45], vf w[32][NV45], vf Lb[32][NV45],
                            vf *scale_out, vf *the_min_out, float rmin, float rdelta, int nstep) {
    vf Laux[32][NV45];
    vf min[NV45], max[NV45], sum_w[NV45], sum_x[NV45], scale[NV45], best[NV45], isc[NV45];
    vi degen[NV45];
    const vf zero = (vf){};
    for (int v = 0; v < NV45; v++) {
        min[v] = max[v] = xt[0][v];
        sum_w[v] = w[0][v];
        sum_x[v] = sum_w[v] * xt[0][v];
    }
    for (int i = 1; i < n; i++)
        for (int v = 0; v < NV45; v++) {
            min[v] = vsel(xt[i][v] < min[v], xt[i][v], min[v]);
            max[v] = vsel(xt[i][v] > max[v], xt[i][v], max[v]);
            sum_w[v] += w[i][v];
            sum_x[v] += w[i][v] * xt[i][v];
        }
    for (int v = 0; v < NV45; v++) {
        min[v] = vsel(min[v] > 0, zero, min[v]);
        degen[v] = max[v] == min[v];
        isc[v] = (float)nmax / (max[v] - min[v]);
        scale[v] = 1.0f / isc[v];
        best[v] = zero;
    }
    for (int i = 0; i < n; i++)
        for (int v = 0; v < NV45; v++) {
            vf l = vnearest_clamp(isc[v] * (xt[i][v] - min[v]), 0, nmax);
            Lb[i][v] = l;
            vf diff = scale[v] * l + min[v] - xt[i][v];
            best[v] += w[i][v] * (diff * diff);
        }
    for (int is = 0; is <= nstep; is++) {
        const float c = rmin + rdelta * (float)is + (float)nmax;
        vf sum_l[NV45], sum_l2[NV45], sum_xl[NV45], ts[NV45], tm[NV45], cur[NV45];
        vi ok[NV45];
        for (int v = 0; v < NV45; v++) {
            isc[v] = c / (max[v] - min[v]);   /* current (possibly drifted) min */
            sum_l[v] = sum_l2[v] = sum_xl[v] = zero;
        }
        for (int i = 0; i < n; i++)
            for (int v = 0; v < NV45; v++) {
                vf l = vnearest_clamp(isc[v] * (xt[i][v] - min[v]), 0, nmax);
                Laux[i][v] = l;
                vf wl = w[i][v] * l;
                sum_l[v] += wl;
                sum_l2[v] += wl * l;
                sum_xl[v] += wl * xt[i][v];
            }
        for (int v = 0; v < NV45; v++) {
            vf D = sum_w[v] * sum_l2[v] - sum_l[v] * sum_l[v];
            ts[v] = (sum_w[v] * sum_xl[v] - sum_x[v] * sum_l[v]) / D;
            tm[v] = (sum_l2[v] * sum_x[v] - sum_l[v] * sum_xl[v]) / D;
            vi pos = tm[v] > 0;
            tm[v] = vsel(pos, zero, tm[v]);
            ts[v] = vsel(pos, sum_xl[v] / sum_l2[v], ts[v]);
            cur[v] = zero;
            ok[v] = (D > 0) & ~degen[v];   /* the reference skips the step unless D > 0 */
        }
        for (int i = 0; i < n; i++)
            for (int v = 0; v < NV45; v++) {
                vf diff = ts[v] * Laux[i][v] + tm[v] - xt[i][v];
                cur[v] += w[i][v] * (diff * diff);
            }
        for (int v = 0; v < NV45; v++) {
            vi acc = ok[v] & (cur[v] < best[v]);
            for (int i = 0; i < n; i++) Lb[i][v] = vsel(acc, Laux[i][v], Lb[i][v]);
            best[v] = vsel(acc, cur[v], best[v]);
            scale[v] = vsel(acc, ts[v], scale[v]);
            min[v] = vsel(acc, tm[v], min[v]);
        }
    }
    for (int v = 0; v < NV45; v++) {
        for (int i = 0; i < n; i++) Lb[i][v] = vsel(degen[v], zero, Lb[i][v]);
        scale_out[v] = vsel(degen[v], zero, scale[v]);
        the_min_out[v] = -min[v];
    }
}

/* Q4_K / Q5_K: a batch is NB super-blocks; lane k (over all NV45*VW lanes) is
 * sub-block k%8 of super-block k/8. Pad lanes (past the end) hold zeros. */
static void N(kq45_vec)(const float *x, uint8_t *y, int64_t nsb, int nmax) {
    enum { NL = NV45 * VW, NB = NL / 8 };
    const int bytes = nmax == 15 ? 144 : 176;
    const float rmin = nmax == 15 ? -1.0f : -0.5f;
    const int nstep = nmax == 15 ? 20 : 15;
    for (int64_t b = 0; b < nsb; b += NB) {
        const int nb = (int)(nsb - b < NB ? nsb - b : NB);
        vf xt[32][NV45], w[32][NV45], Lb[32][NV45], scale[NV45], the_min[NV45];
        for (int k = 0; k < NL; k++) {
            const int sb = k / 8;
            const float *src = x + (b + sb) * QK_K + 32 * (k % 8);
            for (int l = 0; l < 32; l++) xt[l][k / VW][k % VW] = sb < nb ? src[l] : 0.0f;
        }
        for (int v = 0; v < NV45; v++) {
            vf s2 = (vf){}, av;
            for (int l = 0; l < 32; l++) s2 += xt[l][v] * xt[l][v];
            for (int k = 0; k < VW; k++) av[k] = sqrtf(s2[k] / 32.0f);
            for (int l = 0; l < 32; l++) w[l][v] = av + vabs(xt[l][v]);
        }
        qkx2_vec(nmax, 32, xt, w, Lb, scale, the_min, rmin, 0.1f, nstep);
        for (int sb = 0; sb < nb; sb++) {
            float scales[8], mins[8];
            uint8_t L[QK_K];
            for (int j = 0; j < 8; j++) {
                const int k = sb * 8 + j, v = k / VW, e = k % VW;
                scales[j] = scale[v][e];
                mins[j] = the_min[v][e];
                for (int l = 0; l < 32; l++) L[32 * j + l] = (uint8_t)(int)Lb[l][v][e];
            }
            kq45_finish(x + (b + sb) * QK_K, scales, mins, L, nmax, y + (b + sb) * bytes);
        }
    }
}

/* make_qx_quants(n = 16 | 32, nmax, rmse_type=1, weights w) on NV6*VW sub-blocks at once; Q6_K without an
 * imatrix passes w = x^2 (what make_qx_quants uses for qw == NULL). */
ALWAYS_INLINE void qx_vec(int nmax, int n, vf xt[][NV6], vf w[][NV6], vf Lb[][NV6], vf *scale_out) {
    vf wx[32][NV6], Lc[32][NV6];
    vf max[NV6], amax[NV6], isc[NV6], sumlx[NV6], suml2[NV6], scale[NV6], best[NV6];
    const vf zero = (vf){};
    for (int v = 0; v < NV6; v++) max[v] = amax[v] = zero;
    for (int i = 0; i < n; i++)
        for (int v = 0; v < NV6; v++) {
            vf ax = vabs(xt[i][v]);
            vi m = ax > amax[v];
            amax[v] = vsel(m, ax, amax[v]);
            max[v] = vsel(m, xt[i][v], max[v]);
            wx[i][v] = w[i][v] * xt[i][v];   /* (w*x)*l: w*x is the same every pass */
        }
    for (int v = 0; v < NV6; v++) {
        isc[v] = (float)(-nmax) / max[v];
        sumlx[v] = suml2[v] = zero;
    }
    for (int i = 0; i < n; i++)
        for (int v = 0; v < NV6; v++) {
            vf l = vnearest_clamp(isc[v] * xt[i][v], -nmax, nmax - 1);
            Lb[i][v] = l + (float)nmax;
            sumlx[v] += wx[i][v] * l;
            suml2[v] += (w[i][v] * l) * l;
        }
    for (int v = 0; v < NV6; v++) {
        scale[v] = vsel(suml2[v] != 0, sumlx[v] / suml2[v], zero);
        best[v] = scale[v] * sumlx[v];
    }
    for (int is = -9; is <= 9; is++) {
        if (is == 0) continue;
        const float c = -((float)nmax + 0.1f * (float)is);
        for (int v = 0; v < NV6; v++) {
            isc[v] = c / max[v];
            sumlx[v] = suml2[v] = zero;
        }
        for (int i = 0; i < n; i++)
            for (int v = 0; v < NV6; v++) {
                vf l = vnearest_clamp(isc[v] * xt[i][v], -nmax, nmax - 1);
                Lc[i][v] = l;
                sumlx[v] += wx[i][v] * l;
                suml2[v] += (w[i][v] * l) * l;
            }
        for (int v = 0; v < NV6; v++) {
            vi acc = (suml2[v] > 0) & (sumlx[v] * sumlx[v] > best[v] * suml2[v]);
            vf ns = sumlx[v] / suml2[v];
            vf nb = ns * sumlx[v];
            for (int i = 0; i < n; i++) Lb[i][v] = vsel(acc, Lc[i][v] + (float)nmax, Lb[i][v]);
            scale[v] = vsel(acc, ns, scale[v]);
            best[v] = vsel(acc, nb, best[v]);
        }
    }
    for (int v = 0; v < NV6; v++) {
        vi tiny = amax[v] < GROUP_MAX_EPS;   /* all L = 0, scale 0 */
        for (int i = 0; i < n; i++) Lb[i][v] = vsel(tiny, zero, Lb[i][v]);
        scale_out[v] = vsel(tiny, zero, scale[v]);
    }
}

/* Q6_K: lane k is sub-block k%16 of super-block k/16. */
static void N(q6k_vec)(const float *x, uint8_t *y, int64_t nsb) {
    enum { NL = NV6 * VW, NB = NL / 16 };
    for (int64_t b = 0; b < nsb; b += NB) {
        const int nb = (int)(nsb - b < NB ? nsb - b : NB);
        vf xt[16][NV6], Lb[16][NV6], scale[NV6];
        for (int k = 0; k < NL; k++) {
            const int sb = k / 16;
            const float *src = x + (b + sb) * QK_K + 16 * (k % 16);
            for (int l = 0; l < 16; l++) xt[l][k / VW][k % VW] = sb < nb ? src[l] : 0.0f;
        }
        vf w[16][NV6];
        for (int l = 0; l < 16; l++)
            for (int v = 0; v < NV6; v++) w[l][v] = xt[l][v] * xt[l][v];
        qx_vec(32, 16, xt, w, Lb, scale);
        for (int sb = 0; sb < nb; sb++) {
            float scales[16];
            int8_t L[QK_K];
            for (int j = 0; j < 16; j++) {
                const int k = sb * 16 + j, v = k / VW, e = k % VW;
                scales[j] = scale[v][e];
                for (int l = 0; l < 16; l++) L[16 * j + l] = (int8_t)(int)Lb[l][v][e];
            }
            q6k_finish(x + (b + sb) * QK_K, scales, L, y + (b + sb) * 210);
        }
    }
}

/* Weighted (imatrix) K-quants, lane-parallel searches. Super-block s of the batch uses the
 * imatrix slice qw + QK_K * (s % nbr) (nbr = super-blocks per row; calls start on a row).
 * sigma2, the weights and their sums are computed per super-block with the scalar code. */

/* quantize_row_q4_K_impl / q5_K_impl: make_qkx3_quants(32, nmax, .., -0.9, 0.05, 36) is
 * qkx2_vec with those parameters (see make_qkx3_quants_w). */
static void N(kq45w_vec)(const float *x, uint8_t *y, int64_t nsb, int nmax, const float *qw, int64_t nbr) {
    enum { NL = NV45 * VW, NB = NL / 8 };
    const int bytes = nmax == 15 ? 144 : 176;
    for (int64_t b = 0; b < nsb; b += NB) {
        const int nb = (int)(nsb - b < NB ? nsb - b : NB);
        vf xt[32][NV45], w[32][NV45], Lb[32][NV45], scale[NV45], the_min[NV45];
        float sw[NB][8];
        for (int sb = 0; sb < NB; sb++) {
            const int64_t si = sb < nb ? b + sb : b;   /* pad lanes: no pointer past the end */
            const float *xs = x + si * QK_K, *q = qw + QK_K * (si % nbr);
            const float sigma2 = sb < nb ? 2 * sum_sq(xs, QK_K) / (float)QK_K : 0.0f;
            for (int j = 0; j < 8; j++) {
                const int k = sb * 8 + j, v = k / VW, e = k % VW;
                float wj[32];
                if (sb < nb) {
                    imatrix_weights(xs + 32 * j, q + 32 * j, sigma2, wj, 32);
                    sw[sb][j] = sum_seq(wj, 32);
                }
                for (int l = 0; l < 32; l++) {
                    xt[l][v][e] = sb < nb ? xs[32 * j + l] : 0.0f;
                    w[l][v][e] = sb < nb ? wj[l] : 0.0f;
                }
            }
        }
        qkx2_vec(nmax, 32, xt, w, Lb, scale, the_min, -0.9f, 0.05f, 36);
        for (int sb = 0; sb < nb; sb++) {
            float scales[8], mins[8];
            uint8_t L[QK_K];
            for (int j = 0; j < 8; j++) {
                const int k = sb * 8 + j, v = k / VW, e = k % VW;
                scales[j] = scale[v][e];
                mins[j] = the_min[v][e];
                for (int l = 0; l < 32; l++) L[32 * j + l] = (uint8_t)(int)Lb[l][v][e];
            }
            kq45_finish_w(x + (b + sb) * QK_K, scales, mins, sw[sb], L, nmax, y + (b + sb) * bytes);
        }
    }
}

/* quantize_row_q6_K_impl (weights: the raw imatrix) and quantize_row_q3_K_impl (weights
 * qw*sqrt(sigma2 + x^2), sigma2 = 2 sum x^2/256): make_qx_quants(16, nmax 32 | 4, .., w) for
 * the 16 sub-blocks of NV6*VW/16 super-blocks; lane k = sub-block k%16 of super-block k/16. */
static void N(qxw_vec)(const float *x, uint8_t *y, int64_t nsb, int q3, const float *qw, int64_t nbr) {
    enum { NL = NV6 * VW, NB = NL / 16 };
    for (int64_t b = 0; b < nsb; b += NB) {
        const int nb = (int)(nsb - b < NB ? nsb - b : NB);
        vf xt[16][NV6], w[16][NV6], Lb[16][NV6], scale[NV6];
        float sw[NB][16];
        for (int sb = 0; sb < NB; sb++) {
            const int64_t si = sb < nb ? b + sb : b;   /* pad lanes: no pointer past the end */
            const float *xs = x + si * QK_K, *q = qw + QK_K * (si % nbr);
            const float sigma2 = q3 && sb < nb ? 2 * sum_sq(xs, QK_K) / (float)QK_K : 0.0f;
            for (int j = 0; j < 16; j++) {
                const int k = sb * 16 + j, v = k / VW, e = k % VW;
                float wj[16];
                if (sb < nb) {
                    if (q3) {
                        imatrix_weights(xs + 16 * j, q + 16 * j, sigma2, wj, 16);
                        sw[sb][j] = sum_seq(wj, 16);
                    } else {
                        memcpy(wj, q + 16 * j, sizeof wj);
                    }
                }
                for (int l = 0; l < 16; l++) {
                    xt[l][v][e] = sb < nb ? xs[16 * j + l] : 0.0f;
                    w[l][v][e] = sb < nb ? wj[l] : 0.0f;
                }
            }
        }
        qx_vec(q3 ? 4 : 32, 16, xt, w, Lb, scale);
        for (int sb = 0; sb < nb; sb++) {
            float scales[16];
            int8_t L[QK_K];
            for (int j = 0; j < 16; j++) {
                const int k = sb * 16 + j, v = k / VW, e = k % VW;
                scales[j] = scale[v][e];
                for (int l = 0; l < 16; l++) L[16 * j + l] = (int8_t)(int)Lb[l][v][e];
            }
            if (q3) q3k_finish_w(x + (b + sb) * QK_K, scales, sw[sb], L, y + (b + sb) * 110);
            else q6k_finish(x + (b + sb) * QK_K, scales, L, y + (b + sb) * 210);
        }
    }
}

/* quantize_row_q2_K_impl: make_qkx3_quants(16, 3, .., -0.9, 0.05, 36) = qkx2_vec with n = 16.
 * Lane k of pass p is sub-block p*NL + k of the batch (16 per super-block); with fewer than 16
 * lanes a super-block takes several passes. */
static void N(q2kw_vec)(const float *x, uint8_t *y, int64_t nsb, const float *qw, int64_t nbr) {
    enum { NL = NV45 * VW, SPB = NL >= 16 ? NL / 16 : 1, NP = NL >= 16 ? 1 : 16 / NL };
    for (int64_t b = 0; b < nsb; b += SPB) {
        const int nb = (int)(nsb - b < SPB ? nsb - b : SPB);
        float wt[SPB][QK_K], sw[SPB][16], scales[SPB][16], mins[SPB][16];
        uint8_t L[SPB][QK_K];
        for (int sb = 0; sb < nb; sb++) {
            const float *xs = x + (b + sb) * QK_K, *q = qw + QK_K * ((b + sb) % nbr);
            const float sigma2 = sum_sq(xs, QK_K) / (float)QK_K;
            for (int j = 0; j < 16; j++) {
                imatrix_weights(xs + 16 * j, q + 16 * j, sigma2, wt[sb] + 16 * j, 16);
                sw[sb][j] = sum_seq(wt[sb] + 16 * j, 16);
            }
        }
        for (int p = 0; p < NP; p++) {
            vf xt[32][NV45], w[32][NV45], Lb[32][NV45], scale[NV45], the_min[NV45];
            for (int k = 0; k < NL; k++) {
                const int g = p * NL + k, sb = g / 16, j = g % 16;
                for (int l = 0; l < 16; l++) {
                    xt[l][k / VW][k % VW] = sb < nb ? x[(b + sb) * QK_K + 16 * j + l] : 0.0f;
                    w[l][k / VW][k % VW] = sb < nb ? wt[sb][16 * j + l] : 0.0f;
                }
            }
            qkx2_vec(3, 16, xt, w, Lb, scale, the_min, -0.9f, 0.05f, 36);
            for (int k = 0; k < NL; k++) {
                const int g = p * NL + k, sb = g / 16, j = g % 16;
                if (sb >= nb) continue;
                scales[sb][j] = scale[k / VW][k % VW];
                mins[sb][j] = the_min[k / VW][k % VW];
                for (int l = 0; l < 16; l++) L[sb][16 * j + l] = (uint8_t)(int)Lb[l][k / VW][k % VW];
            }
        }
        for (int sb = 0; sb < nb; sb++)
            q2k_finish_w(x + (b + sb) * QK_K, scales[sb], mins[sb], sw[sb], L[sb], y + (b + sb) * 84);
    }
}

/* quantize_row_q4_0_impl / q5_0_impl (make_qx_quants(32, 8 | 16, .., w)) and q4_1_impl / q5_1_impl
 * (make_qkx3_quants(32, 15 | 31, .., w) = qkx2_vec), one 32-block per lane, blocks taken across
 * rows; sigma2 is the block's row's sum x^2 / n (computed once per row, scalar). */
ALWAYS_INLINE void N(row32w_fill)(const float *x, const float *qw, int64_t n, int64_t blk, int64_t *cur_row,
                                  float *sigma2, float *wk) {
    const int64_t nbr = n / 32, row = blk / nbr;
    if (row != *cur_row) {
        *sigma2 = sum_sq(x + row * n, n) / (float)n;
        *cur_row = row;
    }
    imatrix_weights(x + 32 * blk, qw + 32 * (blk % nbr), *sigma2, wk, 32);
}

static void N(row32w_vec)(int type, const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw) {
    const int64_t nbt = nrows * (n / 32);
    const int q5 = type == T_Q5_0 || type == T_Q5_1;
    const int bytes = type == T_Q4_0 ? 18 : type == T_Q4_1 ? 20 : type == T_Q5_0 ? 22 : 24;
    int64_t cur_row = -1;
    float sigma2 = 0.0f, wk[32];
    if (type == T_Q4_1 || type == T_Q5_1) {
        enum { NL = NV45 * VW };
        const int nmax = q5 ? 31 : 15;
        for (int64_t b = 0; b < nbt; b += NL) {
            const int nb = (int)(nbt - b < NL ? nbt - b : NL);
            vf xt[32][NV45], w[32][NV45], Lb[32][NV45], scale[NV45], the_min[NV45];
            for (int k = 0; k < NL; k++) {
                if (k < nb) N(row32w_fill)(x, qw, n, b + k, &cur_row, &sigma2, wk);
                for (int l = 0; l < 32; l++) {
                    xt[l][k / VW][k % VW] = k < nb ? x[32 * (b + k) + l] : 0.0f;
                    w[l][k / VW][k % VW] = k < nb ? wk[l] : 0.0f;
                }
            }
            qkx2_vec(nmax, 32, xt, w, Lb, scale, the_min, -0.9f, 0.05f, 36);
            for (int k = 0; k < nb; k++) {
                uint8_t *o = y + bytes * (b + k), L[32];
                for (int l = 0; l < 32; l++) L[l] = (uint8_t)(int)Lb[l][k / VW][k % VW];
                put_u16(o, fp32_to_fp16(scale[k / VW][k % VW]));
                put_u16(o + 2, fp32_to_fp16(-the_min[k / VW][k % VW]));
                if (q5) q5_pack(L, o + 4, o + 8);
                else for (int j = 0; j < 16; j++) o[4 + j] = (uint8_t)(L[j] | (L[j + 16] << 4));
            }
        }
    } else {
        enum { NL = NV6 * VW };
        for (int64_t b = 0; b < nbt; b += NL) {
            const int nb = (int)(nbt - b < NL ? nbt - b : NL);
            vf xt[32][NV6], w[32][NV6], Lb[32][NV6], scale[NV6];
            for (int k = 0; k < NL; k++) {
                if (k < nb) N(row32w_fill)(x, qw, n, b + k, &cur_row, &sigma2, wk);
                for (int l = 0; l < 32; l++) {
                    xt[l][k / VW][k % VW] = k < nb ? x[32 * (b + k) + l] : 0.0f;
                    w[l][k / VW][k % VW] = k < nb ? wk[l] : 0.0f;
                }
            }
            qx_vec(q5 ? 16 : 8, 32, xt, w, Lb, scale);
            for (int k = 0; k < nb; k++) {
                uint8_t *o = y + bytes * (b + k), L[32];
                for (int l = 0; l < 32; l++) L[l] = (uint8_t)(int)Lb[l][k / VW][k % VW];
                put_u16(o, fp32_to_fp16(scale[k / VW][k % VW]));
                if (q5) q5_pack(L, o + 2, o + 6);
                else for (int j = 0; j < 16; j++) o[2 + j] = (uint8_t)(L[j] | (L[j + 16] << 4));
            }
        }
    }
}

/* Q8_0, one block at a time with the 32 elements in VW-wide pieces (no accumulation
 * besides a max, which is order-free). roundf is rebuilt exactly from truncation:
 * q - trunc(q) is exact, and |frac| >= 0.5 rounds away from zero. Blocks with a
 * non-finite element or an overflowing 1/d go to the scalar code, which reproduces
 * ggml's float->int conversion of inf/NaN. */
static void N(q8_0_vec)(const float *x, uint8_t *y, int64_t nb) {
    enum { NP = 32 / VW };
    for (int64_t i = 0; i < nb; i++) {
        const float *xb = x + 32 * i;
        uint8_t *yb = y + 34 * i;
        vf v[NP], m = (vf){};
        vi fin = (vi){} - 1;
        for (int k = 0; k < NP; k++) {
            memcpy(&v[k], xb + k * VW, sizeof(vf));
            vf a = vabs(v[k]);
            fin &= a <= FLT_MAX;
            m = vsel(a > m, a, m);
        }
        float amax = 0.0f;
        int all_fin = 1;
        for (int e = 0; e < VW; e++) {
            amax = MAXF(amax, m[e]);
            all_fin &= fin[e] != 0;
        }
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        if (!all_fin || !(id <= FLT_MAX)) {
            q8_0_block(xb, yb);
            continue;
        }
        put_u16(yb, fp32_to_fp16(d));
        for (int k = 0; k < NP; k++) {
            vf q = v[k] * id;
            vi t = __builtin_convertvector(q, vi);                 /* toward zero */
            vi away = vabs(q - __builtin_convertvector(t, vf)) >= 0.5f;
            t += away & ((q < 0) | 1);                              /* +1, or -1 if negative */
            vb b = __builtin_convertvector(t, vb);                  /* low byte of each */
            memcpy(yb + 2 + k * VW, &b, VW);
        }
    }
}

/* Q4_0 / Q4_1 / Q5_0 / Q5_1 (quantize_row_q4_0_ref .. q5_1_ref), one block at a time with the 32
 * elements in VW-wide pieces, as q8_0_vec. The extremes are order-free except for which element
 * supplies them: the scalar loops keep the first element reaching the final value, which only
 * matters for the sign of a zero (a min or max of 0) and for Q4_0/Q5_0's signed max, the first
 * element of the largest |x|; both are looked up afterwards. The quantized values use the scalar
 * float sequence (x*id + 8.5f, (x-min)*id + 0.5f, no contraction), truncated, then narrowed as the
 * scalar casts do. Blocks with a non-finite element or a non-finite d or 1/d take the scalar code. */
static void N(q32_vec)(const float *x, uint8_t *y, int64_t nb, int type) {
    enum { NP = 32 / VW };
    const int q5 = type == T_Q5_0 || type == T_Q5_1, asym = type == T_Q4_1 || type == T_Q5_1;
    const int bytes = q5 ? (asym ? 24 : 22) : (asym ? 20 : 18);
    for (int64_t i = 0; i < nb; i++) {
        const float *xb = x + 32 * i;
        uint8_t *yb = y + bytes * i;
        vf v[NP], mx = (vf){}, mn = (vf){};
        vi fin = (vi){} - 1;
        for (int k = 0; k < NP; k++) {
            memcpy(&v[k], xb + k * VW, sizeof(vf));
            vf a = vabs(v[k]);
            fin &= a <= FLT_MAX;
            if (asym) {
                mx = k ? vsel(v[k] > mx, v[k], mx) : v[k];
                mn = k ? vsel(v[k] < mn, v[k], mn) : v[k];
            } else {
                mx = k ? vsel(a > mx, a, mx) : a;
            }
        }
        int all_fin = 1;
        for (int e = 0; e < VW; e++) all_fin &= fin[e] != 0;
        if (!all_fin) goto scalar;
        float d, id, min = 0.0f, max = 0.0f;
        if (asym) {
            min = mn[0], max = mx[0];
            for (int e = 1; e < VW; e++) {
                min = mn[e] < min ? mn[e] : min;
                max = mx[e] > max ? mx[e] : max;
            }
            if (min == 0.0f) for (int j = 0; j < 32; j++) if (xb[j] == 0.0f) { min = xb[j]; break; }
            if (max == 0.0f) for (int j = 0; j < 32; j++) if (xb[j] == 0.0f) { max = xb[j]; break; }
            d = (max - min) / (q5 ? 31.0f : 15.0f);
        } else {
            float amax = 0.0f;
            for (int e = 0; e < VW; e++) amax = MAXF(amax, mx[e]);
            if (amax > 0.0f) for (int j = 0; j < 32; j++) if (fabsf(xb[j]) == amax) { max = xb[j]; break; }
            d = max / (q5 ? -16.0f : -8.0f);
        }
        id = d != 0.0f ? 1.0f / d : 0.0f;
        if (!(fabsf(d) <= FLT_MAX) || !(id <= FLT_MAX && id >= -FLT_MAX)) goto scalar;
        uint8_t L[32];
        const vf add = (vf){} + (asym ? 0.5f : q5 ? 16.5f : 8.5f);
        const int top = q5 ? 31 : 15;
        for (int k = 0; k < NP; k++) {
            vf q = asym ? (v[k] - min) * id + add : v[k] * id + add;
            vi t = __builtin_convertvector(q, vi);               /* (int), toward zero */
            if (type != T_Q5_1) {                                 /* (int8_t), then MIN(top, .) */
                t = (t << 24) >> 24;
                t = ((t < top) & t) | ((t >= top) & top);
            }
            vb b = __builtin_convertvector(t, vb);               /* (uint8_t): the low byte */
            memcpy(L + k * VW, &b, VW);
        }
        put_u16(yb, fp32_to_fp16(d));
        if (asym) put_u16(yb + 2, fp32_to_fp16(min));
        uint8_t *qs = yb + (asym ? 4 : 2);
        if (q5) q5_pack(L, qs, qs + 4);
        else for (int j = 0; j < 16; j++) qs[j] = (uint8_t)(L[j] | (L[j + 16] << 4));
        continue;
    scalar:
        switch (type) {
        case T_Q4_0: q4_0_block(xb, yb); break;
        case T_Q4_1: q4_1_block(xb, yb); break;
        case T_Q5_0: q5_0_block(xb, yb); break;
        default: q5_1_block(xb, yb); break;
        }
    }
}

/* Q2_K: make_qkx2_quants(16, nmax 3, w = |x|, rmin -0.5, rdelta 0.1, 15 steps, use_mad) for the 16
 * sub-blocks of one super-block at once: NV2 = 16/VW vectors, lane e of vector v = sub-block v*VW+e.
 * The qkx2_vec recipe (per-lane selects, drifting min) with n = 16 and absolute errors. */
#define NV2 (16 / VW)
static void N(q2k_vec)(const float *x, uint8_t *y, int64_t nsb) {
    const vf zero = (vf){};
    for (int64_t b = 0; b < nsb; b++) {
        const float *xb = x + b * QK_K;
        vf xt[16][NV2], w[16][NV2], Lb[16][NV2], Laux[16][NV2];
        vf min[NV2], max[NV2], sum_w[NV2], sum_x[NV2], scale[NV2], best[NV2], isc[NV2];
        vi degen[NV2];
        for (int v = 0; v < NV2; v++)
            for (int e = 0; e < VW; e++)
                for (int i = 0; i < 16; i++) xt[i][v][e] = xb[16 * (v * VW + e) + i];
        for (int i = 0; i < 16; i++)
            for (int v = 0; v < NV2; v++) w[i][v] = vabs(xt[i][v]);
        for (int v = 0; v < NV2; v++) {
            min[v] = max[v] = xt[0][v];
            sum_w[v] = w[0][v];
            sum_x[v] = sum_w[v] * xt[0][v];
        }
        for (int i = 1; i < 16; i++)
            for (int v = 0; v < NV2; v++) {
                min[v] = vsel(xt[i][v] < min[v], xt[i][v], min[v]);
                max[v] = vsel(xt[i][v] > max[v], xt[i][v], max[v]);
                sum_w[v] += w[i][v];
                sum_x[v] += w[i][v] * xt[i][v];
            }
        for (int v = 0; v < NV2; v++) {
            min[v] = vsel(min[v] > 0, zero, min[v]);
            degen[v] = max[v] == min[v];
            isc[v] = 3.0f / (max[v] - min[v]);
            scale[v] = 1.0f / isc[v];
            best[v] = zero;
        }
        for (int i = 0; i < 16; i++)
            for (int v = 0; v < NV2; v++) {
                const vf l = vnearest_clamp(isc[v] * (xt[i][v] - min[v]), 0, 3);
                Lb[i][v] = l;
                best[v] += w[i][v] * vabs(scale[v] * l + min[v] - xt[i][v]);
            }
        for (int is = 0; is <= 15; is++) {
            const float c = -0.5f + 0.1f * (float)is + 3.0f;
            vf sum_l[NV2], sum_l2[NV2], sum_xl[NV2], ts[NV2], tm[NV2], cur[NV2];
            vi ok[NV2];
            for (int v = 0; v < NV2; v++) {
                isc[v] = c / (max[v] - min[v]);
                sum_l[v] = sum_l2[v] = sum_xl[v] = zero;
            }
            for (int i = 0; i < 16; i++)
                for (int v = 0; v < NV2; v++) {
                    const vf l = vnearest_clamp(isc[v] * (xt[i][v] - min[v]), 0, 3);
                    Laux[i][v] = l;
                    const vf wl = w[i][v] * l;
                    sum_l[v] += wl;
                    sum_l2[v] += wl * l;
                    sum_xl[v] += wl * xt[i][v];
                }
            for (int v = 0; v < NV2; v++) {
                const vf D = sum_w[v] * sum_l2[v] - sum_l[v] * sum_l[v];
                ts[v] = (sum_w[v] * sum_xl[v] - sum_x[v] * sum_l[v]) / D;
                tm[v] = (sum_l2[v] * sum_x[v] - sum_l[v] * sum_xl[v]) / D;
                const vi pos = tm[v] > 0;
                tm[v] = vsel(pos, zero, tm[v]);
                ts[v] = vsel(pos, sum_xl[v] / sum_l2[v], ts[v]);
                cur[v] = zero;
                ok[v] = (D > 0) & ~degen[v];
            }
            for (int i = 0; i < 16; i++)
                for (int v = 0; v < NV2; v++)
                    cur[v] += w[i][v] * vabs(ts[v] * Laux[i][v] + tm[v] - xt[i][v]);
            for (int v = 0; v < NV2; v++) {
                const vi acc = ok[v] & (cur[v] < best[v]);
                for (int i = 0; i < 16; i++) Lb[i][v] = vsel(acc, Laux[i][v], Lb[i][v]);
                best[v] = vsel(acc, cur[v], best[v]);
                scale[v] = vsel(acc, ts[v], scale[v]);
                min[v] = vsel(acc, tm[v], min[v]);
            }
        }
        float scales[16], mins[16];
        uint8_t L[QK_K];
        for (int v = 0; v < NV2; v++)
            for (int e = 0; e < VW; e++) {
                const int j = v * VW + e;
                const int dg = degen[v][e] != 0;
                scales[j] = dg ? 0.0f : scale[v][e];
                mins[j] = -min[v][e];
                for (int i = 0; i < 16; i++) L[16 * j + i] = dg ? 0 : (uint8_t)(int)Lb[i][v][e];
            }
        q2k_finish(xb, scales, mins, L, y + b * 84);
    }
}

/* Q3_K: make_q3_quants(16, 4, do_rmse) for the 16 sub-blocks of a super-block across lanes (as
 * q2k_vec). The coordinate descent runs in every lane with per-lane selects; a lane whose pass
 * changed nothing would change nothing in any later pass either (same state, same pass), so
 * running passes until no lane changed equals the scalar early break. */
static void N(q3k_vec)(const float *x, uint8_t *y, int64_t nsb) {
    const vf zero = (vf){};
    for (int64_t b = 0; b < nsb; b++) {
        const float *xb = x + b * QK_K;
        vf xt[16][NV2], w[16][NV2], wx[16][NV2], Lv[16][NV2];
        vf max[NV2], amax[NV2], sumlx[NV2], suml2[NV2], isc[NV2];
        for (int v = 0; v < NV2; v++)
            for (int e = 0; e < VW; e++)
                for (int i = 0; i < 16; i++) xt[i][v][e] = xb[16 * (v * VW + e) + i];
        for (int v = 0; v < NV2; v++) {
            max[v] = amax[v] = zero;
            sumlx[v] = suml2[v] = zero;
        }
        for (int i = 0; i < 16; i++)
            for (int v = 0; v < NV2; v++) {
                const vf ax = vabs(xt[i][v]);
                const vi m = ax > amax[v];
                amax[v] = vsel(m, ax, amax[v]);
                max[v] = vsel(m, xt[i][v], max[v]);
                w[i][v] = xt[i][v] * xt[i][v];
                wx[i][v] = w[i][v] * xt[i][v];   /* w*x*l == (w*x)*l */
            }
        for (int v = 0; v < NV2; v++) isc[v] = -4.0f / max[v];
        for (int i = 0; i < 16; i++)
            for (int v = 0; v < NV2; v++) {
                const vf l = vnearest_clamp(isc[v] * xt[i][v], -4, 3);
                Lv[i][v] = l;
                sumlx[v] += wx[i][v] * l;
                suml2[v] += w[i][v] * l * l;
            }
        for (int itry = 0; itry < 5; itry++) {
            vi changed = (vi){};
            for (int i = 0; i < 16; i++)
                for (int v = 0; v < NV2; v++) {
                    const vf li = Lv[i][v];
                    vf slx = sumlx[v] - wx[i][v] * li;
                    vf sl2 = suml2[v] - w[i][v] * li * li;
                    const vf nl = vnearest_clamp(xt[i][v] * sl2 / slx, -4, 3);
                    slx = slx + wx[i][v] * nl;
                    sl2 = sl2 + w[i][v] * nl * nl;
                    const vi acc = (sumlx[v] - wx[i][v] * li > 0) & (nl != li) & (sl2 > 0) &
                                   (slx * slx * suml2[v] > sumlx[v] * sumlx[v] * sl2);
                    Lv[i][v] = vsel(acc, nl, li);
                    sumlx[v] = vsel(acc, slx, sumlx[v]);
                    suml2[v] = vsel(acc, sl2, suml2[v]);
                    changed |= acc;
                }
            int any = 0;
            for (int e = 0; e < VW; e++) any |= changed[e] != 0;
            if (!any) break;
        }
        float scales[16];
        int8_t L[QK_K];
        for (int v = 0; v < NV2; v++)
            for (int e = 0; e < VW; e++) {
                const int j = v * VW + e;
                const int tiny = amax[v][e] < GROUP_MAX_EPS;
                scales[j] = tiny ? 0.0f : suml2[v][e] > 0.0f ? sumlx[v][e] / suml2[v][e] : 0.0f;
                for (int i = 0; i < 16; i++) L[16 * j + i] = tiny ? 0 : (int8_t)((int)Lv[i][v][e] + 4);
            }
        q3k_finish(xb, scales, L, y + b * 110);
    }
}
#undef NV2

/* IQ4: kvalues_iq4nl[iq4_index(x)] per lane, as a float. lo/hi end as val[mu-1]/val[mu] of
 * iq4_index; NaN lanes get val[15] like the scalar code. */
ALWAYS_INLINE vf N(iq4_vq)(vf x) {
    const vf zero = (vf){};
    vf lo = zero + (float)kvalues_iq4nl[0], hi = zero + (float)kvalues_iq4nl[1];
    for (int j = 1; j < 15; j++) {
        const vi m = (zero + (float)kvalues_iq4nl[j]) <= x;
        lo = vsel(m, zero + (float)kvalues_iq4nl[j], lo);
        hi = vsel(m, zero + (float)kvalues_iq4nl[j + 1], hi);
    }
    const vf q = vsel((x - lo) < (hi - x), lo, hi);
    return vsel(x != x, zero + (float)kvalues_iq4nl[15], q);
}

/* iq4_scale32 for VW 32-blocks at once (lane k = block k of the batch; pad lanes hold zeros). */
static void N(iq4_scales)(const float *x, const float *wts, float *scales, int64_t nb) {
    const vf zero = (vf){};
    for (int64_t b = 0; b < nb; b += VW) {
        const int n = (int)(nb - b < VW ? nb - b : VW);
        vf xt[32], w[32];
        for (int l = 0; l < 32; l++)
            for (int k = 0; k < VW; k++) xt[l][k] = k < n ? x[(b + k) * 32 + l] : 0.0f;
        if (wts)   /* imatrix weights, laid out like x */
            for (int l = 0; l < 32; l++)
                for (int k = 0; k < VW; k++) w[l][k] = k < n ? wts[(b + k) * 32 + l] : 0.0f;
        vf amax = zero, max = zero;
        for (int l = 0; l < 32; l++) {
            if (!wts) w[l] = xt[l] * xt[l];
            const vf ax = vabs(xt[l]);
            const vi m = ax > amax;
            amax = vsel(m, ax, amax);
            max = vsel(m, xt[l], max);
        }
        const vi tiny = amax < GROUP_MAX_EPS;
        vf d = -max / (zero + (float)kvalues_iq4nl[0]);
        vf id = 1.0f / d;
        vf sumqx = zero, sumq2 = zero;
        for (int l = 0; l < 32; l++) {
            const vf q = N(iq4_vq)(id * xt[l]);
            sumqx += w[l] * q * xt[l];
            sumq2 += w[l] * q * q;
        }
        d = vsel(sumq2 > 0, sumqx / sumq2, zero);
        vf best = d * sumqx;
        for (int itry = -7; itry <= 7; itry++) {
            id = (float)(itry + kvalues_iq4nl[0]) / max;
            sumqx = sumq2 = zero;
            for (int l = 0; l < 32; l++) {
                const vf q = N(iq4_vq)(id * xt[l]);
                sumqx += w[l] * q * xt[l];
                sumq2 += w[l] * q * q;
            }
            const vi acc = (sumq2 > 0) & (sumqx * sumqx > best * sumq2);
            const vf nd = sumqx / sumq2;
            d = vsel(acc, nd, d);
            best = vsel(acc, nd * sumqx, best);
        }
        d = vsel(tiny, zero, d);
        for (int k = 0; k < n; k++) scales[b + k] = d[k];
    }
}

#undef vf
#undef vi
#undef vb
#undef vsel
#undef vabs
#undef vnearest_clamp
#undef qkx2_vec
#undef qx_vec
#undef N
#undef CAT
#undef CAT_
#endif
