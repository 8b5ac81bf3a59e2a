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

/* The discriminator D_psi on psi's final hidden state h [B, L, H] (SPEC 6.3), over the
 * mask-1 (target + pad) positions of each example:
 *   DISC_TOKEN:       logit[b, c] = mean_l h[b, l, c]           -> H logits per example
 *   DISC_HIDDEN_MEAN: logit[b]    = mean_l mean_c h[b, l, c]    -> 1 logit (inert; ablation)
 *   DISC_LINEAR:      logit[b, l] = w . h[b, l] + bias           -> L logits (0 where mask 0)
 * disc_logit_count gives the logits per example. */
typedef enum { DISC_TOKEN, DISC_HIDDEN_MEAN, DISC_LINEAR } DiscKind;
size_t disc_logit_count(DiscKind kind, size_t L, size_t H);
void disc_logits(float *logit, const float *hidden, const float *mask, DiscKind kind, const float *w,
                 float bias, size_t B, size_t L, size_t H);
/* grad_hidden from grad_logit (same layout as the logits); DISC_LINEAR also accumulates
 * the head's gradients into grad_w [H] and *grad_bias. */
void disc_backward(float *grad_hidden, float *grad_w, float *grad_bias, const float *grad_logit,
                   const float *hidden, const float *mask, DiscKind kind, const float *w, size_t B,
                   size_t L, size_t H);

/* BCE with logits clamped to [-c, c]: loss_b, and d loss_b / d logit_b (0 where clamped). */
void bce_with_logits(float *loss, float *grad, const float *logit, const float *target, float c,
                     size_t B);

#endif
