/* Optimiser kernels over flat float32 buffers. */
#ifndef DLMONE_OPTIM_H
#define DLMONE_OPTIM_H

#include "common.h"

/* torch.optim.AdamW: p -= lr*wd*p; m,v moments; p -= (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps) */
void adamw_step(float *p, const float *g, float *m, float *v, size_t n, float lr, float beta1,
                float beta2, float eps, float weight_decay, long step);
void clip_by_value(float *g, size_t n, float c);
/* sqrt(sum g^2), summed in fixed-size chunks in double: independent of threads */
double global_norm(const float *g, size_t n);
void scale_inplace(float *g, size_t n, float s);
void ema_update(float *ema, const float *p, size_t n, float decay);
/* number of non-finite entries */
size_t count_nonfinite(const float *x, size_t n);

#endif
