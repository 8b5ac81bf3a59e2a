/* Layer kernels: each has a forward and a backward with explicit sizes.
 * Rows are M = B*L positions, C the feature width. Parameter-gradient reductions
 * are split over columns (never over rows) so that results are bitwise the same
 * whatever the thread count. */
#ifndef DLMONE_KERNELS_H
#define DLMONE_KERNELS_H

#include "common.h"

/* What matmul_epilogue does to each finished tile of C (rows m, columns n):
 * EPI_BIAS:      C += bias[n]
 * EPI_BIAS_GELU: C += bias[n]; out = gelu(C)           (out has C's layout)
 * EPI_GELU_GRAD: C *= gelu'(in)                         (in has C's layout; with act =
 *                gelu(in) as EPI_BIAS_GELU made it, gelu' reuses its erf: one exp less) */
typedef enum { EPI_NONE, EPI_BIAS, EPI_BIAS_GELU, EPI_GELU_GRAD } EpilogueKind;
typedef struct {
    EpilogueKind kind;
    const float *bias;
    float *out;
    const float *in;
    const float *act;
} Epilogue;

/* Rows m0..m1, columns n0..n1 of C (row stride ldc) get the epilogue; the matrix
 * products call it on each tile right after computing it, while it is in cache. */
void apply_epilogue(const Epilogue *e, float *C, size_t ldc, size_t m0, size_t m1, size_t n0,
                    size_t n1);

/* The products of a mixed-precision (bf16) model call. While the calling thread's
 * dl_bf16_products points at a scratch, its matmul_epilogue calls round both inputs to
 * bf16 and run on AMX with float32 accumulation (amx_matmul), or in float32 when the
 * scratch is too small for a product. Set by the model around one call, on the calling
 * thread only: OpenMP workers never read it. */
typedef struct {
    uint16_t *scratch;
    size_t elems;
} Bf16Products;
extern _Thread_local Bf16Products *dl_bf16_products;

/* How matmul_epilogue splits a product in float32 (kernels.c says why): tiles of tm x tn
 * outputs, mt x nt of them, and K in kt chunks of tk (kt > 1 only with no epilogue,
 * `plain`, and K long against the output). A function of the shape only. */
typedef struct {
    size_t tm, tn, tk;
    size_t mt, nt, kt;
} MatmulPlan;
MatmulPlan matmul_plan(size_t M, size_t N, size_t K, int plain);

/* C[M,N] = alpha*op(A)*op(B) + beta*C, row-major, in tiles whose plan depends on the
 * shape only, spread over OpenMP threads; each tile gets the epilogue (may be NULL).
 * Every size and leading dimension must be <= DL_BLAS_MAX (the callers check).
 * 0, or -1 (C untouched) when a K-split product cannot allocate its partial sums;
 * the products with an epilogue never split K and never fail. */
int matmul_epilogue(int trans_a, int trans_b, size_t M, size_t N, size_t K, float alpha,
                    const float *A, size_t lda, const float *B, size_t ldb, float beta,
                    float *C, size_t ldc, const Epilogue *epi);
int matmul(int trans_a, int trans_b, size_t M, size_t N, size_t K, float alpha,
           const float *A, size_t lda, const float *B, size_t ldb, float beta,
           float *C, size_t ldc);

/* y[M,out] = x[M,in] W[out,in]^T + b; 0, or -1 out of memory (only without b). */
int linear_forward(float *y, const float *x, const float *W, const float *b,
                   size_t M, size_t in, size_t out);
/* dx (= or += when accumulate_dx) dy W; dW += dy^T x; db += colsum(dy).
 * dx, dW, db may be NULL to skip them. 0, or -1 out of memory (see matmul_epilogue). */
int linear_backward(float *dx, float *dW, float *db, const float *dy, const float *x,
                    const float *W, size_t M, size_t in, size_t out, int accumulate_dx);
/* As linear_backward for a layer whose input x = gelu(gelu_in), as EPI_BIAS_GELU computed it
 * (its erf is reused): dx = (dy W) * gelu'(gelu_in),
 * the gradient with respect to gelu_in (dx required, overwritten). */
int linear_backward_gelu(float *dx, float *dW, float *db, const float *dy, const float *x,
                         const float *W, const float *gelu_in, size_t M, size_t in, size_t out);

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
 * hash(seed, s, base + i) >= p*2^32; the mask does not depend on the thread count, and
 * a shard of a batch (base = its first element's index in the whole batch) gets the
 * whole batch's mask. */
int dropout_keep(uint64_t seed, uint64_t site, size_t i, uint32_t threshold);
uint32_t dropout_threshold(float p);
void dropout_apply(float *x, size_t n, float p, uint64_t seed, uint64_t site, size_t base);

/* Multi-head softmax attention without mask on qkv[B,L,3H] (q|k|v per row).
 * att[B,A,L,L] receives the softmax probabilities (before dropout); their dropout
 * mask starts at element `base` of the site's stream. scratch holds
 * attention_scratch_floats(L, H, A) floats for each of at most `threads` threads. */
size_t attention_scratch_floats(size_t L, size_t H, size_t A);
void attention_forward(float *ctx, float *att, const float *qkv, size_t B, size_t L,
                       size_t H, size_t A, float p, uint64_t seed, uint64_t site,
                       size_t base, float *scratch, int threads);
void attention_backward(float *dqkv, const float *dctx, const float *att, const float *qkv,
                        size_t B, size_t L, size_t H, size_t A, float p, uint64_t seed,
                        uint64_t site, size_t base, float *scratch, int threads);

/* out[B,D] = [cos(t f_k), sin(t f_k)], f_k = exp(-ln(10000) k / (D/2)); zero pad if D odd */
void timestep_embedding(float *out, const float *t, size_t B, size_t D);

/* out[M,E] = W[tok[m]] ; dW[tok[m]] += g[m] */
void embedding_forward(float *out, const int64_t *tok, const float *W, size_t M, size_t E);
void embedding_backward(float *dW, const int64_t *tok, const float *g, size_t M, size_t E);

#endif
