/* Layer kernels: each has a forward and a backward with explicit sizes.
 * Rows are M = B*L positions, C the feature width. Parameter-gradient reductions
 * are split over columns (never over rows) so that results are bitwise the same
 * whatever the thread count. */
#ifndef DLMONE_KERNELS_H
#define DLMONE_KERNELS_H

#include "common.h"

/* C[M,N] = alpha*op(A)*op(B) + beta*C, row-major; split in fixed-size blocks
 * over M (or N when M is small) and spread over OpenMP threads. */
void matmul(int trans_a, int trans_b, size_t M, size_t N, size_t K, float alpha,
            const float *A, size_t lda, const float *B, size_t ldb, float beta,
            float *C, size_t ldc);

/* y[M,out] = x[M,in] W[out,in]^T + b */
void linear_forward(float *y, const float *x, const float *W, const float *b,
                    size_t M, size_t in, size_t out);
/* dx (= or += when accumulate_dx) dy W; dW += dy^T x; db += colsum(dy).
 * dx, dW, db may be NULL to skip them. */
void linear_backward(float *dx, float *dW, float *db, const float *dy, const float *x,
                     const float *W, size_t M, size_t in, size_t out, int accumulate_dx);

void colsum_accumulate(float *out, const float *x, size_t M, size_t C);

/* out = LN(a + b) (b may be NULL); stores the LN input in res and mean/rstd per row. */
void layernorm_forward(float *out, float *res, float *mean, float *rstd, const float *a,
                       const float *b, const float *w, const float *bias, size_t M, size_t C,
                       float eps);
/* dx = d/dres given dout; dw, db += (may be NULL). */
void layernorm_backward(float *dx, float *dw, float *db, const float *dout, const float *res,
                        const float *mean, const float *rstd, const float *w, size_t M, size_t C);

void gelu_forward(float *out, const float *x, size_t n);
void gelu_backward(float *dx, const float *x, const float *dout, size_t n); /* dx = dout*gelu'(x) */
void tanh_forward(float *out, const float *x, size_t n);
void tanh_backward(float *dx, const float *y, const float *dout, size_t n); /* y = tanh(x) */
void silu_forward(float *out, const float *x, size_t n);
void silu_backward(float *dx, const float *x, const float *dout, size_t n);

/* Dropout with a counter-based RNG: element i of site s is kept iff
 * hash(seed, s, i) >= p*2^32; the mask does not depend on the thread count. */
int dropout_keep(uint64_t seed, uint64_t site, size_t i, uint32_t threshold);
uint32_t dropout_threshold(float p);
void dropout_apply(float *x, size_t n, float p, uint64_t seed, uint64_t site);

/* Multi-head softmax attention without mask on qkv[B,L,3H] (q|k|v per row).
 * att[B,A,L,L] receives the softmax probabilities (before dropout). */
void attention_forward(float *ctx, float *att, const float *qkv, size_t B, size_t L,
                       size_t H, size_t A, float p, uint64_t seed, uint64_t site);
void attention_backward(float *dqkv, const float *dctx, const float *att, const float *qkv,
                        size_t B, size_t L, size_t H, size_t A, float p, uint64_t seed,
                        uint64_t site);

/* out[B,D] = [cos(t f_k), sin(t f_k)], f_k = exp(-ln(10000) k / (D/2)); zero pad if D odd */
void timestep_embedding(float *out, const float *t, size_t B, size_t D);

/* out[M,E] = W[tok[m]] ; dW[tok[m]] += g[m] */
void embedding_forward(float *out, const int64_t *tok, const float *W, size_t M, size_t E);
void embedding_backward(float *dW, const int64_t *tok, const float *g, size_t M, size_t E);

#endif
