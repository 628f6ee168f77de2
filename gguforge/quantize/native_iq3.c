/*
 * IQ3_XXS and IQ3_S: the same bytes as ggml_quantize_chunk (ggml/src/ggml-quants.c
 * quantize_row_iq3_xxs_impl with grid 256, quantize_row_iq3_s_impl with blocks of 32), with and
 * without an importance matrix, and ggml's dequantize_row_iq3_xxs / _iq3_s.
 *
 * Each group of four magnitudes is a point of a 3-bit lattice restricted to a grid of 256 (IQ3_XXS)
 * or 512 (IQ3_S) points. The tables iq3xs_init_impl builds are built here once per process, on
 * first use (pthread_once): the grid (four bytes 2l+1), a map from each of the 4096 lattice points
 * to its grid index, and for the points off the grid the grid points at the nearest 2 (IQ3_XXS)
 * or 3 (IQ3_S) distinct squared distances, ordered by (distance, index) - ggml's qsort order.
 * The compact grids and the dequantization grids are data read from the pinned tree
 * (native_iq3_tables.h, written by scripts/gen_native_tables.py).
 *
 * Every float operation is ggml's, in its order (see _native.c for the rules).
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>

#include "native_ext.h"
#include "native_iq3_tables.h"
#include "native_prims.h"

#define QK_K 256
#define KMAP_SIZE 4096
#define GROUP_MAX_EPS_IQ3_XXS 1e-8f

typedef struct {
    int size;                 /* grid points */
    uint32_t grid[512];       /* bytes 2l+1 */
    int map[KMAP_SIZE];       /* >= 0: grid index; < 0: -(offset + 1) into neighbours */
    uint16_t *neighbours;     /* at offset: count, then that many grid indices */
    float *nq[4];             /* level i of the grid point at each position of neighbours, as float
                               * (for the lane-parallel distance computation); 8 floats of padding */
} iq3_tables;

static iq3_tables tables_256, tables_512;
static pthread_once_t once_256 = PTHREAD_ONCE_INIT, once_512 = PTHREAD_ONCE_INIT;

static int lattice_d2(uint32_t grid_point, int index) {
    int d2 = 0;
    for (int k = 0; k < 4; k++) {
        const int diff = (int)((grid_point >> (8 * k)) & 0xFF) - (2 * ((index >> (3 * k)) & 7) + 1);
        d2 += diff * diff;
    }
    return d2;
}

/* The grid points at the `nwant` smallest distinct distances from lattice point `index`, by
 * (distance, grid index); writes them after a count at out (when out != NULL), returns the count. */
static int nearest_points(const iq3_tables *t, int index, int nwant, uint16_t *out) {
    int d2[512], levels[3], nlev = 0;
    for (int j = 0; j < t->size; j++) {
        d2[j] = lattice_d2(t->grid[j], index);
        /* keep the nwant smallest distinct values, sorted */
        int pos = nlev;
        while (pos > 0 && levels[pos - 1] > d2[j]) pos--;
        if ((pos > 0 && levels[pos - 1] == d2[j]) || pos == nwant) continue;
        if (nlev < nwant) nlev++;
        for (int s = nlev - 1; s > pos; s--) levels[s] = levels[s - 1];
        levels[pos] = d2[j];
    }
    int n = 0;
    for (int l = 0; l < nlev; l++)
        for (int j = 0; j < t->size; j++)
            if (d2[j] == levels[l]) {
                if (out) out[1 + n] = (uint16_t)j;
                n++;
            }
    if (out) out[0] = (uint16_t)n;
    return n;
}

static void build_tables(iq3_tables *t, const uint16_t *kgrid, int size) {
    const int nwant = size == 256 ? 2 : 3;
    t->size = size;
    for (int k = 0; k < size; k++) {
        uint32_t g = 0;
        for (int i = 0; i < 4; i++) g |= (uint32_t)(2 * ((kgrid[k] >> (3 * i)) & 7) + 1) << (8 * i);
        t->grid[k] = g;
    }
    for (int i = 0; i < KMAP_SIZE; i++) t->map[i] = -1;
    for (int k = 0; k < size; k++) t->map[kgrid[k]] = k;  /* kgrid holds the 3-bit levels: the map key */
    int total = 0;
    for (int i = 0; i < KMAP_SIZE; i++)
        if (t->map[i] < 0) total += 1 + nearest_points(t, i, nwant, NULL);
    t->neighbours = malloc((size_t)total * sizeof(uint16_t));
    if (!t->neighbours) abort();
    int offset = 0;
    for (int i = 0; i < KMAP_SIZE; i++) {
        if (t->map[i] >= 0) continue;
        t->map[i] = -(offset + 1);
        offset += 1 + nearest_points(t, i, nwant, t->neighbours + offset);
    }
    for (int k = 0; k < 4; k++) {
        t->nq[k] = calloc((size_t)total + 8, sizeof(float));
        if (!t->nq[k]) abort();
    }
    for (int i = 0; i < KMAP_SIZE; i++) {
        if (t->map[i] >= 0) continue;
        const int o = -t->map[i] - 1;
        for (int j = 1; j <= t->neighbours[o]; j++)
            for (int k = 0; k < 4; k++)
                t->nq[k][o + j] = (float)(int8_t)(t->grid[t->neighbours[o + j]] >> (8 * k));
    }
}

static void init_256(void) { build_tables(&tables_256, iq3_kgrid_256, 256); }
static void init_512(void) { build_tables(&tables_512, iq3_kgrid_512, 512); }

static const iq3_tables *get_tables(int size) {
    if (size == 256) {
        pthread_once(&once_256, init_256);
        return &tables_256;
    }
    pthread_once(&once_512, init_512);
    return &tables_512;
}

typedef float v8f __attribute__((vector_size(32)));

static inline v8f load8(const float *p) { v8f v; memcpy(&v, p, sizeof(v)); return v; }

/* iq3_find_best_neighbour: the candidate minimising sum w*(scale*q - x)^2; its levels into L.
 * Eight candidates per step, one per vector lane, each lane doing the scalar sequence of operations
 * (no contraction, same order); then the first minimum in candidate order, as ggml's strict '<' finds. */
static int best_neighbour(const iq3_tables *t, int u, const float *xval, const float *w, float scale, int8_t *L) {
    const int off = -t->map[u] - 1;
    const uint16_t *nb = t->neighbours + off;
    const int n = nb[0];
    float d2s[512 + 8];
    const v8f zero = {0};
    const v8f s = zero + scale;
    for (int j = 0; j < n; j += 8) {
        v8f d2 = zero;
        for (int i = 0; i < 4; i++) {
            const v8f diff = s * load8(t->nq[i] + off + 1 + j) - xval[i];
            d2 += w[i] * diff * diff;
        }
        memcpy(d2s + j, &d2, sizeof(d2));
    }
    float best_d2 = FLT_MAX;
    int best = -1;
    for (int j = 0; j < n; ++j)
        if (d2s[j] < best_d2) { best_d2 = d2s[j]; best = nb[1 + j]; }
    /* every distance inf or NaN (values near FLT_MAX): ggml aborts here (GGML_ASSERT(grid_index >= 0));
     * take the nearest point instead, so such input gives valid blocks */
    if (best < 0) best = nb[1];
    const uint32_t g = t->grid[best];
    for (int i = 0; i < 4; i++) L[i] = (int8_t)((((int)(g >> (8 * i)) & 0xFF) - 1) / 2);
    return best;
}

/* levels of group k at inverse scale id: the lattice point nearest_int(0.5*(id*x - 1)) clamped to 0..7 */
static int lattice_point(const float *xval, float id, int8_t *L) {
    int u = 0;
    for (int i = 0; i < 4; i++) {
        int l = nearest_int(0.5f * (id * xval[i] - 1));
        l = MAXI(0, MINI(7, l));
        L[i] = (int8_t)l;
        u |= l << (3 * i);
    }
    return u;
}

static int levels_key(const int8_t *L) { return L[0] | (L[1] << 3) | (L[2] << 6) | (L[3] << 9); }

static void sums(const float *weight, const float *xval, const int8_t *L, float *sumqx, float *sumq2) {
    float a = 0, b = 0;
    for (int i = 0; i < 32; i++) {
        const float w = weight[i], q = (float)(2 * L[i] + 1);
        a += w * xval[i] * q;
        b += w * q * q;
    }
    *sumqx = a;
    *sumq2 = b;
}

/* The scale search of one group of 32 (8 lattice points): the 2*nis+1 trial scales around max/15,
 * then the points off the grid re-chosen at the best scale (all eight again when refine_all, as
 * IQ3_S does) and the scale refitted. Returns the scale; levels in L. */
static float search32(const iq3_tables *t, const float *xval, const float *weight, const float *waux, float max,
                      int nis, int refine_all, int8_t *L) {
    int8_t Laux[32];
    int on_grid[8], on_grid_aux[8];
    float best = 0, scale = max / 15;
    memset(L, 0, 32);
    for (int k = 0; k < 8; k++) on_grid[k] = !refine_all;
    for (int is = -nis; is <= nis; ++is) {
        const float id = (15 + is * 0.2f) / max;
        const float this_scale = 1 / id;
        for (int k = 0; k < 8; k++) {
            const int u = lattice_point(xval + 4 * k, id, Laux + 4 * k);
            on_grid_aux[k] = t->map[u] >= 0;
            if (!on_grid_aux[k]) best_neighbour(t, u, xval + 4 * k, waux + 4 * k, this_scale, Laux + 4 * k);
        }
        float sumqx, sumq2;
        sums(weight, xval, Laux, &sumqx, &sumq2);
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            memcpy(L, Laux, 32);
            memcpy(on_grid, on_grid_aux, sizeof(on_grid));
        }
    }
    int n_not_on_grid = 0;
    for (int k = 0; k < 8; k++) n_not_on_grid += !on_grid[k];
    if (n_not_on_grid > 0 && scale > 0) {
        const float id = 1 / scale;
        for (int k = 0; k < 8; k++) {
            if (!refine_all && on_grid[k]) continue;
            int8_t Lk[4];
            const int u = lattice_point(xval + 4 * k, id, Lk);
            int gi = t->map[u];
            if (gi < 0) gi = best_neighbour(t, u, xval + 4 * k, waux + 4 * k, scale, L + 4 * k);
            const uint32_t g = t->grid[gi];
            for (int i = 0; i < 4; i++) L[4 * k + i] = (int8_t)((((int)(g >> (8 * i)) & 0xFF) - 1) / 2);
        }
        float sumqx, sumq2;
        sums(weight, xval, L, &sumqx, &sumq2);
        if (sumq2 > 0) scale = sumqx / sumq2;
    }
    return scale;
}

/* weights of a group of 32: imatrix * sqrt(sigma2 + x^2), or x^2 without one; waux = sqrt */
static void group_weights(const float *xb, const float *qw, float sigma2, float *weight, float *waux) {
    if (qw) for (int i = 0; i < 32; i++) weight[i] = qw[i] * sqrtf(sigma2 + xb[i] * xb[i]);
    else for (int i = 0; i < 32; i++) weight[i] = xb[i] * xb[i];
    for (int i = 0; i < 32; i++) waux[i] = sqrtf(weight[i]);
}

static float block_sigma2(const float *xbl) {
    float sumx2 = 0;
    for (int i = 0; i < QK_K; i++) sumx2 += xbl[i] * xbl[i];
    return 2 * sumx2 / QK_K;
}

/* |x| of 8 values into xval; returns the mask of the negative ones */
static uint8_t split_signs(const float *x, float *xval) {
    uint8_t s = 0;
    for (int i = 0; i < 8; ++i) {
        if (x[i] >= 0) xval[i] = x[i];
        else { xval[i] = -x[i]; s |= (uint8_t)(1 << i); }
    }
    return s;
}

/* block_iq3_xxs {d, qs[64] grid indices, 8 x u32 (4 x 7 sign bits | 4-bit scale << 28)} */
static void iq3_xxs_block(const iq3_tables *t, const float *xbl, const float *qw, uint8_t *y) {
    float scales[8], weight[32], waux[32], xval[32], max_scale = 0;
    int8_t L[32];
    uint8_t q3[96];
    uint32_t signs_word[8];
    memset(q3, 0, sizeof(q3));
    memset(signs_word, 0, sizeof(signs_word));
    const float sigma2 = block_sigma2(xbl);
    for (int ib = 0; ib < 8; ++ib) {
        const float *xb = xbl + 32 * ib;
        group_weights(xb, qw ? qw + 32 * ib : NULL, sigma2, weight, waux);
        uint8_t block_signs[4];
        for (int k = 0; k < 4; ++k) {
            uint8_t s = split_signs(xb + 8 * k, xval + 8 * k);
            if (__builtin_popcount(s) % 2) {  /* an even number of minus signs is stored: flip the least important one */
                int imin = 0;
                float mn = weight[8 * k] * xb[8 * k] * xb[8 * k];
                for (int i = 1; i < 8; ++i) {
                    const float ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i];
                    if (ax < mn) { mn = ax; imin = i; }
                }
                xval[8 * k + imin] = -xval[8 * k + imin];
                s ^= (uint8_t)(1 << imin);
            }
            block_signs[k] = s & 127;
        }
        float max = xval[0];
        for (int i = 1; i < 32; ++i) max = MAXF(max, xval[i]);
        if (max < GROUP_MAX_EPS_IQ3_XXS) {
            scales[ib] = 0;
            continue;
        }
        float scale = search32(t, xval, weight, waux, max, 15, 0, L);
        if (scale < 0) {
            scale = -scale;
            for (int k = 0; k < 4; ++k) block_signs[k] = (uint8_t)(~block_signs[k] & 127);
        }
        for (int k = 0; k < 8; ++k) q3[8 * ib + k] = (uint8_t)t->map[levels_key(L + 4 * k)];
        signs_word[ib] = block_signs[0] | (block_signs[1] << 7) | (block_signs[2] << 14) | ((uint32_t)block_signs[3] << 21);
        scales[ib] = scale;
        max_scale = MAXF(max_scale, scale);
    }
    memset(y, 0, 98);
    if (!max_scale) return;
    const float d = max_scale / 31;
    put_u16(y, fp32_to_fp16(d * 1.0125f));
    const float id = 1 / d;
    for (int ib = 0; ib < 8; ++ib) {
        int l = nearest_int(0.5f * (id * scales[ib] - 1));
        l = MAXI(0, MINI(15, l));
        signs_word[ib] |= (uint32_t)l << 28;
    }
    memcpy(y + 2, q3, 64);
    for (int ib = 0; ib < 8; ++ib)
        for (int b = 0; b < 4; b++) y[66 + 4 * ib + b] = (uint8_t)(signs_word[ib] >> (8 * b));
}

/* block_iq3_s {d, qs[64] low index bits, qh[8] high bits, signs[32], scales[4] two 4-bit a byte} */
static void iq3_s_block(const iq3_tables *t, const float *xbl, const float *qw, uint8_t *y) {
    float scales[8], weight[32], waux[32], xval[32], max_scale = 0;
    int8_t L[32];
    memset(y, 0, 110);
    uint8_t *qs = y + 2, *qh = y + 66, *signs = y + 74, *sc = y + 106;
    const float sigma2 = block_sigma2(xbl);
    for (int ib = 0; ib < 8; ++ib) {
        const float *xb = xbl + 32 * ib;
        group_weights(xb, qw ? qw + 32 * ib : NULL, sigma2, weight, waux);
        uint8_t block_signs[4];
        for (int k = 0; k < 4; ++k) block_signs[k] = split_signs(xb + 8 * k, xval + 8 * k);
        float max = xval[0];
        for (int i = 1; i < 32; ++i) max = MAXF(max, xval[i]);
        if (!max) {
            /* ggml moves on without advancing its qs/signs pointers: the next group's indices and
             * signs land where this group's would have been */
            scales[ib] = 0;
            continue;
        }
        float scale = search32(t, xval, weight, waux, max, 9, 1, L);
        if (scale < 0) {
            scale = -scale;
            for (int k = 0; k < 4; ++k) block_signs[k] = (uint8_t)~block_signs[k];
        }
        for (int k = 0; k < 8; ++k) {
            const int gi = t->map[levels_key(L + 4 * k)];
            qs[k] = (uint8_t)(gi & 255);
            qh[ib] |= (uint8_t)((gi >> 8) << k);
        }
        qs += 8;
        memcpy(signs, block_signs, 4);
        signs += 4;
        scales[ib] = scale;
        max_scale = MAXF(max_scale, scale);
    }
    if (!max_scale) return;
    const float d = max_scale / 31;
    put_u16(y, fp32_to_fp16(d * 1.033f));
    const float id = 1 / d;
    for (int ib = 0; ib < 8; ib += 2) {
        int l1 = nearest_int(0.5f * (id * scales[ib] - 1));
        int l2 = nearest_int(0.5f * (id * scales[ib + 1] - 1));
        l1 = MAXI(0, MINI(15, l1));
        l2 = MAXI(0, MINI(15, l2));
        sc[ib / 2] = (uint8_t)(l1 | (l2 << 4));
    }
}

void iq3_quantize_rows(int type, const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw) {
    const int xxs = type == T_IQ3_XXS;
    const iq3_tables *t = get_tables(xxs ? 256 : 512);
    const int bytes = xxs ? 98 : 110;
    const int64_t nb = n / QK_K;
    for (int64_t r = 0; r < nrows; r++)
        for (int64_t i = 0; i < nb; i++) {
            const float *xb = x + r * n + QK_K * i;
            const float *w = qw ? qw + QK_K * i : NULL;
            uint8_t *yb = y + (r * nb + i) * bytes;
            if (xxs) iq3_xxs_block(t, xb, w, yb);
            else iq3_s_block(t, xb, w, yb);
        }
}

/* ggml's ksigns_iq2xs: seven sign bits and their parity as the eighth */
static uint8_t signs8(unsigned s7) { return (uint8_t)(s7 | ((unsigned)__builtin_parity(s7) << 7)); }

static void put_group(float *y, uint32_t grid1, uint32_t grid2, uint8_t signs, float db) {
    for (int j = 0; j < 4; ++j) {
        y[j] = db * (float)((grid1 >> (8 * j)) & 0xFF) * (signs & (1u << j) ? -1.f : 1.f);
        y[j + 4] = db * (float)((grid2 >> (8 * j)) & 0xFF) * (signs & (1u << (j + 4)) ? -1.f : 1.f);
    }
}

void iq3_dequantize(int type, const uint8_t *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        if (type == T_IQ3_XXS) {
            const uint8_t *b = x + 98 * i, *qs = b + 2;
            const float d = fp16_to_fp32(get_u16(b));
            for (int ib = 0; ib < 8; ++ib) {
                const uint8_t *w = b + 66 + 4 * ib;
                const uint32_t aux = w[0] | (w[1] << 8) | (w[2] << 16) | ((uint32_t)w[3] << 24);
                const float db = d * (0.5f + (float)(aux >> 28)) * 0.5f;
                for (int l = 0; l < 4; ++l)
                    put_group(y + QK_K * i + 32 * ib + 8 * l, iq3xxs_dgrid[qs[8 * ib + 2 * l]],
                              iq3xxs_dgrid[qs[8 * ib + 2 * l + 1]], signs8((aux >> (7 * l)) & 127), db);
            }
        } else {
            const uint8_t *b = x + 110 * i, *qs = b + 2, *qh = b + 66, *signs = b + 74, *sc = b + 106;
            const float d = fp16_to_fp32(get_u16(b));
            for (int ib = 0; ib < 8; ++ib) {
                const float db = d * (float)(1 + 2 * ((sc[ib / 2] >> (4 * (ib % 2))) & 0xF));
                for (int l = 0; l < 4; ++l) {
                    const int i1 = qs[8 * ib + 2 * l] | ((qh[ib] << (8 - 2 * l)) & 256);
                    const int i2 = qs[8 * ib + 2 * l + 1] | ((qh[ib] << (7 - 2 * l)) & 256);
                    put_group(y + QK_K * i + 32 * ib + 8 * l, iq3s_dgrid[i1], iq3s_dgrid[i2], signs[4 * ib + l], db);
                }
            }
        }
    }
}
