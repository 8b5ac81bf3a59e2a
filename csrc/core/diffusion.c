/* Diffusion kernels: schedule, noising, loss terms, sampler steps, decoding. */
#include "diffusion.h"
#include "mathfun.h"

#include <float.h>

static double abar_sqrt(double s) { return 1.0 - sqrt(s + 1e-4); }

void sqrt_schedule(double *betas, double *alphas_cumprod, size_t T) {
    double prod = 1.0;
    for (size_t i = 0; i < T; i++) {
        double b = 1.0 - abar_sqrt((double)(i + 1) / (double)T) / abar_sqrt((double)i / (double)T);
        if (b > 0.999) b = 0.999;
        betas[i] = b;
        prod *= 1.0 - b;
        alphas_cumprod[i] = prod;
    }
}

void gaussian_fill(float *out, size_t n, uint64_t seed) {
    DL_PROFILE_BEGIN;
    uint64_t key = dl_mix64(seed + 0x9e3779b97f4a7c15ULL);
    size_t pairs = (n + 1) / 2;
#pragma omp parallel for schedule(static) if (n > DL_PAR_MIN)
    for (size_t i = 0; i < pairs; i++) {
        uint64_t r1 = dl_mix64(key ^ dl_mix64(2 * i + 1)), r2 = dl_mix64(key ^ dl_mix64(2 * i + 2));
        double u1 = ((r1 >> 11) + 0.5) * (1.0 / 9007199254740992.0);
        double u2 = (r2 >> 11) * (1.0 / 9007199254740992.0);
        double rad = sqrt(-2.0 * log(u1)), ang = 6.283185307179586 * u2;
        out[2 * i] = (float)(rad * cos(ang));
        if (2 * i + 1 < n) out[2 * i + 1] = (float)(rad * sin(ang));
    }
    DL_PROFILE_END(DL_K_SAMPLER);
}

void q_sample(float *xt, const float *x0, const float *noise, const float *a, const float *s,
              const float *mask, size_t B, size_t L, size_t E) {
    DL_PROFILE_BEGIN;
#pragma omp parallel for schedule(static) if (B * L * E > DL_PAR_MIN)
    for (size_t r = 0; r < B * L; r++) {
        size_t b = r / L;
        const float *x = x0 + r * E, *z = noise + r * E;
        float *o = xt + r * E;
        if (mask[r] != 0.0f) {
            float ab = a[b], sb = s[b];
#pragma omp simd
            for (size_t e = 0; e < E; e++) o[e] = ab * x[e] + sb * z[e];
        } else if (o != x) {
            memcpy(o, x, E * sizeof(float));
        }
    }
    DL_PROFILE_END(DL_K_SAMPLER);
}

void mse_loss(float *mse, float *grad_f, const float *f, const float *x0, const float *x0_mean,
              const uint8_t *use_mean, const float *weight, size_t B, size_t L, size_t E) {
    DL_PROFILE_BEGIN;
    size_t n = L * E;
#pragma omp parallel for schedule(static) if (B * n > DL_PAR_MIN)
    for (size_t b = 0; b < B; b++) {
        const float *fb = f + b * n, *tb = (use_mean[b] ? x0_mean : x0) + b * n;
        float *gb = grad_f + b * n;
        float g = weight[b] * 2.0f / (float)n;
        double s = 0.0;
        for (size_t i = 0; i < n; i++) {
            float d = fb[i] - tb[i];
            s += (double)d * d;
            gb[i] = g * d;
        }
        mse[b] = (float)(s / (double)n);
    }
    DL_PROFILE_END(DL_K_LOSS);
}

void cross_entropy(float *nll, float *logits, const int64_t *target, const float *scale,
                   size_t M, size_t V) {
    DL_PROFILE_BEGIN;
#pragma omp parallel for schedule(static) if (M * V > DL_PAR_MIN)
    for (size_t m = 0; m < M; m++) {
        float *z = logits + m * V, mx = z[0];
#pragma omp simd reduction(max : mx)
        for (size_t v = 1; v < V; v++) mx = z[v] > mx ? z[v] : mx;
        size_t y = (size_t)target[m];
        float target_logit = z[y], s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (size_t v = 0; v < V; v++) {
            z[v] = dl_expf(z[v] - mx);
            s += z[v];
        }
        nll[m] = logf(s) - (target_logit - mx); /* no exp underflow for far-off targets */
        float k = scale[m] / s;
#pragma omp simd
        for (size_t v = 0; v < V; v++) { /* no subnormals: they make the next GEMM crawl */
            float g = z[v] * k;
            z[v] = fabsf(g) < FLT_MIN ? 0.0f : g;
        }
        z[y] -= scale[m];
    }
    DL_PROFILE_END(DL_K_LOSS);
}

#define ARGMAX_ROWS 64

/* Per thread: scores S[ARGMAX_ROWS, V], the gathered rows xs[ARGMAX_ROWS, E]. */
static int argmax_scratch_floats(size_t E, size_t V, size_t *n) {
    return dl_mul_overflows(ARGMAX_ROWS, V + E, n);
}

int affine_argmax(int64_t *tokens, const float *x, const float *W, const float *c,
                  const uint8_t *active, size_t M, size_t E, size_t V) {
    int threads = dl_max_threads();
    size_t per_thread, bytes;
    if (argmax_scratch_floats(E, V, &per_thread) ||
        dl_mul_overflows(per_thread * sizeof(float), (size_t)threads, &bytes))
        return -1;
    float *scratch = malloc(bytes);
    if (!scratch) return -1;
    DL_PROFILE_BEGIN;
    size_t nb = (M + ARGMAX_ROWS - 1) / ARGMAX_ROWS;
#pragma omp parallel num_threads(threads)
    {
        float *S = scratch + (size_t)dl_thread_id() * per_thread, *xs = S + ARGMAX_ROWS * V;
        size_t rows[ARGMAX_ROWS];
#pragma omp for schedule(dynamic)
        for (size_t blk = 0; blk < nb; blk++) {
            size_t m0 = blk * ARGMAX_ROWS, m1 = m0 + ARGMAX_ROWS < M ? m0 + ARGMAX_ROWS : M, k = 0;
            for (size_t m = m0; m < m1; m++) {
                if (active && !active[m]) continue;
                rows[k] = m;
                memcpy(xs + k * E, x + m * E, E * sizeof(float));
                k++;
            }
            if (!k) continue;
            SGEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)k, (blasint)V, (blasint)E, 1.0f,
                  xs, (blasint)E, W, (blasint)E, 0.0f, S, (blasint)V);
            for (size_t i = 0; i < k; i++) {
                const float *sr = S + i * V;
                size_t best = 0;
                float bv = sr[0] + c[0];
                for (size_t v = 1; v < V; v++) {
                    float val = sr[v] + c[v];
                    if (val > bv) {
                        bv = val;
                        best = v;
                    }
                }
                tokens[rows[i]] = (int64_t)best;
            }
        }
    }
    free(scratch);
    DL_PROFILE_END(DL_K_DECODE);
    return 0;
}

void posterior_step(float *x_prev, const float *x0, const float *xt, const float *noise,
                    const float *c1, const float *c2, const float *sigma, const float *mask,
                    const float *anchor, size_t B, size_t L, size_t E) {
    DL_PROFILE_BEGIN;
#pragma omp parallel for schedule(static) if (B * L * E > DL_PAR_MIN)
    for (size_t r = 0; r < B * L; r++) {
        size_t b = r / L;
        float *o = x_prev + r * E;
        if (mask[r] == 0.0f) {
            memcpy(o, anchor + r * E, E * sizeof(float));
            continue;
        }
        const float *a = x0 + r * E, *x = xt + r * E;
        float k1 = c1[b], k2 = c2[b], sg = sigma[b];
        if (noise && sg != 0.0f) {
            const float *z = noise + r * E;
#pragma omp simd
            for (size_t e = 0; e < E; e++) o[e] = k1 * a[e] + k2 * x[e] + sg * z[e];
        } else {
#pragma omp simd
            for (size_t e = 0; e < E; e++) o[e] = k1 * a[e] + k2 * x[e];
        }
    }
    DL_PROFILE_END(DL_K_SAMPLER);
}
