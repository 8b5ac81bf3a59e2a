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

double global_norm(const float *g, size_t n) {
    size_t nc = (n + NORM_CHUNK - 1) / NORM_CHUNK;
    double *part = malloc((nc ? nc : 1) * sizeof(double));
    if (!part) return NAN;
#pragma omp parallel for schedule(static) if (n > DL_PAR_MIN)
    for (size_t c = 0; c < nc; c++) {
        size_t i0 = c * NORM_CHUNK, i1 = i0 + NORM_CHUNK < n ? i0 + NORM_CHUNK : n;
        double s = 0.0;
        for (size_t i = i0; i < i1; i++) s += (double)g[i] * g[i];
        part[c] = s;
    }
    double total = 0.0;
    for (size_t c = 0; c < nc; c++) total += part[c];
    free(part);
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
