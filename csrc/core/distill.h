/* DLM-One distillation kernels (SPEC §6.3-§6.4): the SiD generator loss, the
 * score estimator's denoising loss, the discriminator logit and BCE. */
#ifndef DLMONE_DISTILL_H
#define DLMONE_DISTILL_H

#include "common.h"

/* Per example b over the entries with mask 1 (target and padding):
 *   omega_b = max(mean |e_g - y_r|, 1e-5)                     (no gradient)
 *   loss_b  = sum (y_r - y_f) . ((y_r - e_g) - alpha (y_r - y_f)) / omega_b
 * Gradients of mean_b(loss_b) w.r.t. y_r, y_f, e_g (zero where mask is 0). */
void sid_loss(float *loss, float *omega, float *g_yr, float *g_yf, float *g_eg, const float *y_r,
              const float *y_f, const float *e_g, const float *mask, float alpha, size_t B,
              size_t L, size_t E);

/* sum over mask-1 positions of ||pred - target||^2, divided by the number of such
 * positions in the batch (returned); grad = d/dpred. */
double denoise_loss(float *grad, const float *pred, const float *target, const float *mask,
                    size_t B, size_t L, size_t E);

/* logit_b = mean over mask-1 positions of (w . h + b) if w, else of mean_h h. */
void disc_logits(float *logit, const float *hidden, const float *mask, const float *w, float bias,
                 size_t B, size_t L, size_t H);
/* grad_hidden from grad_logit; accumulates the head's gradients when w is given. */
void disc_backward(float *grad_hidden, float *grad_w, float *grad_bias, const float *grad_logit,
                   const float *hidden, const float *mask, const float *w, size_t B, size_t L,
                   size_t H);

/* BCE with logits clamped to [-c, c]: loss_b, and d loss_b / d logit_b (0 where clamped). */
void bce_with_logits(float *loss, float *grad, const float *logit, const float *target, float c,
                     size_t B);

#endif
