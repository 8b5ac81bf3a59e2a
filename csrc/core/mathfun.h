/* Vectorisable float exp, erf and tanh. glibc's versions are scalar calls here (its
 * vector variants need -ffast-math, which we refuse), and in a transformer step they
 * cost more than the matrix products. NaN propagates; accuracy is measured in
 * tests/test_kernels.py against the double-precision functions. */
#ifndef DLMONE_MATHFUN_H
#define DLMONE_MATHFUN_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp(x): x = n ln2 + r, |r| <= ln2/2, Cephes' degree-6 polynomial; about 1 ulp.
 * Results below 2^-100 (x < -69.3) are 0: a softmax term that small is irrelevant,
 * and products of it would turn subnormal, which costs ~100x in a matrix product.
 * Overflow gives inf, NaN stays NaN. */
static inline float dl_expf(float x) {
    float xc = x < -87.33f ? -87.33f : x;
    xc = xc > 88.72f ? 88.72f : xc;
    float n = rintf(xc * 1.44269504088896341f);
    float r = fmaf(n, -0.693359375f, xc);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r) + 1.0f;
    int32_t bits = ((int32_t)n + 126) << 23; /* 2^(n-1): n = 128 still has an exponent */
    float half_scale;
    memcpy(&half_scale, &bits, sizeof half_scale);
    float y = p * half_scale * 2.0f;
    y = x < -69.3147f ? 0.0f : y;
    return x > 88.72f ? INFINITY : y;
}

/* erf(x) = 1 - erfc(|x|) with erfc from Numerical Recipes' Chebyshev fit (fractional
 * error < 1.2e-7): absolute error about 2e-7. */
static inline float dl_erff(float x) {
    float z = fabsf(x);
    float t = 1.0f / fmaf(0.5f, z, 1.0f);
    float p = 0.17087277f;
    p = fmaf(p, t, -0.82215223f);
    p = fmaf(p, t, 1.48851587f);
    p = fmaf(p, t, -1.13520398f);
    p = fmaf(p, t, 0.27886807f);
    p = fmaf(p, t, -0.18628806f);
    p = fmaf(p, t, 0.09678418f);
    p = fmaf(p, t, 0.37409196f);
    p = fmaf(p, t, 1.00002368f);
    p = fmaf(p, t, -1.26551223f);
    float r = 1.0f - t * dl_expf(fmaf(-z, z, p));
    return x < 0.0f ? -r : r;
}

/* tanh: Cephes' odd polynomial below 0.625, 1 - 2/(exp(2|x|) + 1) above. */
static inline float dl_tanhf(float x) {
    float a = fabsf(x), z = x * x;
    float p = -5.70498872745e-3f;
    p = fmaf(p, z, 2.06390887954e-2f);
    p = fmaf(p, z, -5.37397155531e-2f);
    p = fmaf(p, z, 1.33314422036e-1f);
    p = fmaf(p, z, -3.33332819422e-1f);
    float small = fmaf(x * z, p, x);
    float big = 1.0f - 2.0f / (dl_expf(2.0f * a) + 1.0f);
    big = x < 0.0f ? -big : big;
    return a < 0.625f ? small : big;
}

static inline float dl_sigmoidf(float x) { return 1.0f / (1.0f + dl_expf(-x)); }

#endif
