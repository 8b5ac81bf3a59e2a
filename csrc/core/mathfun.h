/* Vectorisable float exp, erf and tanh. glibc's versions are scalar calls here (its
 * vector variants need -ffast-math, which we refuse), and in a transformer step they
 * cost more than the matrix products. NaN propagates; accuracy is measured in
 * tests/test_kernels.py against the double-precision functions. */
#ifndef DLMONE_MATHFUN_H
#define DLMONE_MATHFUN_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* a*b + c. fmaf is one instruction where the target has FMA (the AVX2 and AVX-512 builds,
 * any -march=native of the last decade, every aarch64); on the x86-64-v2 baseline it is a
 * libm call that also stops the loops from vectorising, so there a product and a sum
 * stand in: two roundings instead of one, within the accuracy the tests ask. */
#if defined(__x86_64__) && !defined(__FMA__)
#define dl_fma(a, b, c) ((a) * (b) + (c))
#else
#define dl_fma(a, b, c) fmaf(a, b, c)
#endif

/* exp(x): x = n ln2 + r, |r| <= ln2/2, Cephes' degree-6 polynomial; about 1 ulp.
 * Results below 2^-100 (x < -69.3) are 0: a softmax term that small is irrelevant,
 * and products of it would turn subnormal, which costs ~100x in a matrix product.
 * Overflow gives inf, NaN stays NaN. */
static inline float dl_expf(float x) {
    float xc = x < -87.33f ? -87.33f : x;
    xc = xc > 88.72f ? 88.72f : xc;
    float n = rintf(xc * 1.44269504088896341f);
    float r = dl_fma(n, -0.693359375f, xc);
    r = dl_fma(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = dl_fma(p, r, 1.3981999507e-3f);
    p = dl_fma(p, r, 8.3334519073e-3f);
    p = dl_fma(p, r, 4.1665795894e-2f);
    p = dl_fma(p, r, 1.6666665459e-1f);
    p = dl_fma(p, r, 5.0000001201e-1f);
    p = dl_fma(p, r * r, r) + 1.0f;
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
    float t = 1.0f / dl_fma(0.5f, z, 1.0f);
    float p = 0.17087277f;
    p = dl_fma(p, t, -0.82215223f);
    p = dl_fma(p, t, 1.48851587f);
    p = dl_fma(p, t, -1.13520398f);
    p = dl_fma(p, t, 0.27886807f);
    p = dl_fma(p, t, -0.18628806f);
    p = dl_fma(p, t, 0.09678418f);
    p = dl_fma(p, t, 0.37409196f);
    p = dl_fma(p, t, 1.00002368f);
    p = dl_fma(p, t, -1.26551223f);
    float r = 1.0f - t * dl_expf(dl_fma(-z, z, p));
    return x < 0.0f ? -r : r;
}

/* tanh: Cephes' odd polynomial below 0.625, 1 - 2/(exp(2|x|) + 1) above. */
static inline float dl_tanhf(float x) {
    float a = fabsf(x), z = x * x;
    float p = -5.70498872745e-3f;
    p = dl_fma(p, z, 2.06390887954e-2f);
    p = dl_fma(p, z, -5.37397155531e-2f);
    p = dl_fma(p, z, 1.33314422036e-1f);
    p = dl_fma(p, z, -3.33332819422e-1f);
    float small = dl_fma(x * z, p, x);
    float big = 1.0f - 2.0f / (dl_expf(2.0f * a) + 1.0f);
    big = x < 0.0f ? -big : big;
    return a < 0.625f ? small : big;
}

static inline float dl_sigmoidf(float x) { return 1.0f / (1.0f + dl_expf(-x)); }

#endif
