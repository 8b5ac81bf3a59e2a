/* bfloat16 inference products on Intel AMX (AMX-TILE + AMX-BF16, Sapphire Rapids and
 * later): inputs rounded to bf16, products accumulated in float32. Training never
 * uses them. */
#ifndef DLMONE_AMX_H
#define DLMONE_AMX_H

#include "kernels.h"

/* 1 when the CPU has AMX-BF16 and the kernel granted this process the tile state. */
int amx_available(void);

/* bf16 elements of a packed W[out,in] (tiles of 32 inputs x 16 outputs). */
size_t amx_packed_weight_size(size_t out, size_t in);
void amx_pack_weight(uint16_t *dst, const float *W, size_t out, size_t in);
/* bf16 elements of the converted input of a product with M rows and `in` inputs. */
size_t amx_input_size(size_t M, size_t in);

/* y[M,out] = x[M,in] W^T (+ epilogue: bias / bias+GELU as for matmul_epilogue), with x
 * rounded to bf16 into xbuf (amx_input_size(M, in) elements) and Wp packed. */
void amx_linear(float *y, const float *x, const uint16_t *Wp, const Epilogue *epi, size_t M,
                size_t in, size_t out, uint16_t *xbuf);

#endif
