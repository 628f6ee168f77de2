/*
 * Kernels of the native quantizer compiled in their own translation units, called by _native.c's
 * dispatch: MXFP4, Q1_0, Q2_0, TQ1_0, TQ2_0 (native_misc.c) and IQ3_XXS, IQ3_S (native_iq3.c).
 * Each function returns 0 for a type it does not handle, so _native.c asks it first and falls back
 * to its own switch.
 */
#ifndef GGUFORGE_NATIVE_EXT_H
#define GGUFORGE_NATIVE_EXT_H

#include <stdint.h>

/* ggml type ids (ggml.h enum ggml_type) */
enum { T_TQ1_0 = 34, T_TQ2_0 = 35, T_MXFP4 = 39, T_Q1_0 = 41, T_Q2_0 = 42, T_IQ3_XXS = 18, T_IQ3_S = 21 };

/* (elements, bytes) per block. */
int ext_block_info(int type, int *blck, int *bytes);
/* 1 when an importance matrix changes the type's bytes. */
int ext_uses_imatrix(int type);
/* nrows rows of n floats -> blocks; qw: NULL or n importance weights used for every row
 * (ggml_quantize_chunk with imatrix). */
int ext_quantize(int type, const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw);
/* nb blocks -> floats (ggml's to_float). */
int ext_dequantize(int type, const uint8_t *x, float *y, int64_t nb);

/* native_iq3.c */
void iq3_quantize_rows(int type, const float *x, uint8_t *y, int64_t nrows, int64_t n, const float *qw);
void iq3_dequantize(int type, const uint8_t *x, float *y, int64_t nb);

#endif
