/* Diffusion kernels (SPEC §4-§5): schedule, partial noising, the teacher loss,
 * sampler steps, nearest-embedding clamping and argmax decoding. */
#ifndef DLMONE_DIFFUSION_H
#define DLMONE_DIFFUSION_H

#include "common.h"

/* DiffuSeq "sqrt" schedule: alpha_bar(s) = 1 - sqrt(s + 1e-4);
 * beta_i = min(1 - abar((i+1)/T)/abar(i/T), 0.999); alphas_cumprod[i] = prod(1 - beta_j). */
void sqrt_schedule(double *betas, double *alphas_cumprod, size_t T);

/* Standard normals from a counter-based generator: out[i] depends only on (seed, i). */
void gaussian_fill(float *out, size_t n, uint64_t seed);

/* x_t = mask ? a[b]*x0 + s[b]*noise : x0 over [B, L, E] (mask [B, L], 1 = noised). */
void q_sample(float *xt, const float *x0, const float *noise, const float *a, const float *s,
              const float *mask, size_t B, size_t L, size_t E);

/* Per-example mean over L*E of (f - target)^2, target = x0_mean where use_mean[b] else x0.
 * grad_f = weight[b] * 2 (f - target) / (L E). Returns nothing; fills mse[B]. */
void mse_loss(float *mse, float *grad_f, const float *f, const float *x0, const float *x0_mean,
              const uint8_t *use_mean, const float *weight, size_t B, size_t L, size_t E);

/* Softmax cross-entropy per row; nll[m] = -log softmax(logits[m])[target[m]].
 * logits are overwritten by scale[m] * (softmax - onehot). */
void cross_entropy(float *nll, float *logits, const int64_t *target, const float *scale,
                   size_t M, size_t V);

/* The rounding loss through the tied head, fused: per row m, nll[m] = -log softmax(h[m] W^T
 * + b)[target[m]], and with dh (not NULL) dh[m] = scale[m] (softmax - onehot) W and
 * dW += G^T h, db += sum_m G[m] for G[m] = scale[m] (softmax - onehot). The [M, V] logits
 * are never whole: rows go in fixed chunks, one after another (bitwise the same for any
 * thread count), each chunk's logits staying in cache through its three products. With
 * bf16 the products take bf16 inputs on AMX, W packed once a call. 0, or -1 when the
 * scratch cannot be allocated (nothing written then). E and V <= DL_BLAS_MAX. */
int tied_cross_entropy(float *nll, float *dh, float *dW, float *db, const float *h, const float *W,
                       const float *b, const int64_t *target, const float *scale, size_t M,
                       size_t E, size_t V, int bf16);

/* tokens[m] = argmax_v (x[m] . W[v] + c[v]) for the rows with active[m] (all if NULL).
 * E and V must be <= DL_BLAS_MAX. 0, or -1 when its scratch cannot be allocated. */
int affine_argmax(int64_t *tokens, const float *x, const float *W, const float *c,
                   const uint8_t *active, size_t M, size_t E, size_t V);

/* x_prev = where(mask, c1*x0 + c2*xt + sigma*noise, anchor), per example coefficients. */
void posterior_step(float *x_prev, const float *x0, const float *xt, const float *noise,
                    const float *c1, const float *c2, const float *sigma, const float *mask,
                    const float *anchor, size_t B, size_t L, size_t E);

#endif
