/* bfloat16 products on Intel AMX (AMX-TILE + AMX-BF16, Sapphire Rapids and later):
 * inputs rounded to bf16, products accumulated in float32. Inference uses weights packed
 * once (amx_linear); mixed-precision training packs both operands of every product
 * (amx_matmul). */
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

/* The parts of amx_matmul, for operands packed once and used in several products:
 * op(A) (M x K) packed into amx_input_size(M, K) elements, op(B) (K x N) into
 * amx_packed_weight_size(N, K); C = alpha Ap Bp + beta C (+ epilogue). */
void amx_pack_a(uint16_t *dst, int ta, const float *A, size_t lda, size_t M, size_t K);
void amx_pack_b(uint16_t *dst, int tb, const float *B, size_t ldb, size_t K, size_t N);
void amx_packed_product(size_t M, size_t N, size_t K, float alpha, const uint16_t *Ap,
                        const uint16_t *Bp, float beta, float *C, size_t ldc, const Epilogue *epi);

/* bf16 elements of amx_matmul's scratch for an M x N x K product. */
size_t amx_matmul_scratch(size_t M, size_t N, size_t K);

/* C = alpha op(A) op(B) + beta C (+ epilogue), op(A) M x K, op(B) K x N, both rounded to
 * bf16 into scratch (amx_matmul_scratch(M, N, K) elements). Every 32 x 32 block of C is
 * one thread's, summed over all of K in a fixed order: bitwise the same result for any
 * number of threads, and (M/32)(N/32) blocks to share among them. */
void amx_matmul(int ta, int tb, size_t M, size_t N, size_t K, float alpha, const float *A,
                size_t lda, const float *B, size_t ldb, float beta, float *C, size_t ldc,
                const Epilogue *epi, uint16_t *scratch);

#endif
