/* AdamW, clipping, EMA. Elementwise, hence bitwise the same for any thread count. */
#include "optim.h"

#define NORM_CHUNK 8192

void adamw_step(float *p, const float *g, float *m, float *v, size_t n, float lr, float beta1,
                float beta2, float eps, float weight_decay, long step) {
    DL_PROFILE_BEGIN;
    float bc1 = 1.0f - powf(beta1, (float)step);
    float bc2_sqrt = sqrtf(1.0f - powf(beta2, (float)step));
    float step_size = lr / bc1, decay = 1.0f - lr * weight_decay;
#pragma omp parallel for simd schedule(static) if (n > DL_PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        float gi = g[i];
        float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
    DL_PROFILE_END(DL_K_OPTIMIZER);
}

void clip_by_value(float *g, size_t n, float c) {
    DL_PROFILE_BEGIN;
#pragma omp parallel for simd schedule(static) if (n > DL_PAR_MIN)
    for (size_t i = 0; i < n; i++) g[i] = g[i] > c ? c : (g[i] < -c ? -c : g[i]);
    DL_PROFILE_END(DL_K_OPTIMIZER);
}

/* Chunk sums in double, added in chunk order; NORM_GROUP chunks at a time so that the
 * partial sums live on the stack (no allocation that could fail). */
#define NORM_GROUP 256

double global_norm(const float *g, size_t n) {
    size_t nc = (n + NORM_CHUNK - 1) / NORM_CHUNK;
    double total = 0.0, part[NORM_GROUP];
    for (size_t c0 = 0; c0 < nc; c0 += NORM_GROUP) {
        size_t c1 = c0 + NORM_GROUP < nc ? c0 + NORM_GROUP : nc;
#pragma omp parallel for schedule(static) if ((c1 - c0) * NORM_CHUNK > DL_PAR_MIN)
        for (size_t c = c0; c < c1; c++) {
            size_t i0 = c * NORM_CHUNK, i1 = i0 + NORM_CHUNK < n ? i0 + NORM_CHUNK : n;
            double s = 0.0;
            for (size_t i = i0; i < i1; i++) s += (double)g[i] * g[i];
            part[c - c0] = s;
        }
        for (size_t c = c0; c < c1; c++) total += part[c - c0];
    }
    return sqrt(total);
}

void scale_inplace(float *g, size_t n, float s) {
    DL_PROFILE_BEGIN;
#pragma omp parallel for simd schedule(static) if (n > DL_PAR_MIN)
    for (size_t i = 0; i < n; i++) g[i] *= s;
    DL_PROFILE_END(DL_K_OPTIMIZER);
}

void ema_update(float *ema, const float *p, size_t n, float decay) {
    DL_PROFILE_BEGIN;
#pragma omp parallel for simd schedule(static) if (n > DL_PAR_MIN)
    for (size_t i = 0; i < n; i++) ema[i] = decay * ema[i] + (1.0f - decay) * p[i];
    DL_PROFILE_END(DL_K_OPTIMIZER);
}

size_t count_nonfinite(const float *x, size_t n) {
    size_t bad = 0;
#pragma omp parallel for simd reduction(+ : bad) schedule(static) if (n > DL_PAR_MIN)
    for (size_t i = 0; i < n; i++) bad += !isfinite(x[i]);
    return bad;
}
