/* Layer kernels of the DiffuSeq transformer, forward and backward. */
#include "kernels.h"
#include "mathfun.h"

/* Fixed block sizes: the same blocks (hence bitwise the same results) for any
 * number of threads. */
#define MM_ROW_BLOCK 256
#define MM_COL_BLOCK 128
#define COL_BLOCK 32

static void sgemm_block(int ta, int tb, size_t M, size_t N, size_t K, float alpha,
                        const float *A, size_t lda, const float *B, size_t ldb, float beta,
                        float *C, size_t ldc) {
    SGEMM(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
          (blasint)M, (blasint)N, (blasint)K, alpha, A, (blasint)lda, B, (blasint)ldb, beta, C,
          (blasint)ldc);
}

void matmul(int ta, int tb, size_t M, size_t N, size_t K, float alpha, const float *A,
            size_t lda, const float *B, size_t ldb, float beta, float *C, size_t ldc) {
    if (M == 0 || N == 0) return;
    if (M >= 2 * MM_ROW_BLOCK) {
        size_t nb = (M + MM_ROW_BLOCK - 1) / MM_ROW_BLOCK;
#pragma omp parallel for schedule(static)
        for (size_t blk = 0; blk < nb; blk++) {
            size_t m0 = blk * MM_ROW_BLOCK, m1 = m0 + MM_ROW_BLOCK < M ? m0 + MM_ROW_BLOCK : M;
            const float *Ab = ta ? A + m0 : A + m0 * lda;
            sgemm_block(ta, tb, m1 - m0, N, K, alpha, Ab, lda, B, ldb, beta, C + m0 * ldc, ldc);
        }
    } else if (N >= 2 * MM_COL_BLOCK) {
        size_t nb = (N + MM_COL_BLOCK - 1) / MM_COL_BLOCK;
#pragma omp parallel for schedule(static)
        for (size_t blk = 0; blk < nb; blk++) {
            size_t n0 = blk * MM_COL_BLOCK, n1 = n0 + MM_COL_BLOCK < N ? n0 + MM_COL_BLOCK : N;
            const float *Bb = tb ? B + n0 * ldb : B + n0;
            sgemm_block(ta, tb, M, n1 - n0, K, alpha, A, lda, Bb, ldb, beta, C + n0, ldc);
        }
    } else {
        sgemm_block(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    }
}

void linear_forward(float *y, const float *x, const float *W, const float *b, size_t M,
                    size_t in, size_t out) {
    if (b) {
#pragma omp parallel for schedule(static) if (M * out > DL_PAR_MIN)
        for (size_t m = 0; m < M; m++) memcpy(y + m * out, b, out * sizeof(float));
    }
    matmul(0, 1, M, out, in, 1.0f, x, in, W, in, b ? 1.0f : 0.0f, y, out);
}

void colsum_accumulate(float *out, const float *x, size_t M, size_t C) {
    size_t nb = (C + COL_BLOCK - 1) / COL_BLOCK;
#pragma omp parallel for schedule(static) if (M * C > DL_PAR_MIN)
    for (size_t blk = 0; blk < nb; blk++) {
        size_t c0 = blk * COL_BLOCK, c1 = c0 + COL_BLOCK < C ? c0 + COL_BLOCK : C;
        float acc[COL_BLOCK] = {0};
        for (size_t m = 0; m < M; m++) {
            const float *row = x + m * C;
#pragma omp simd
            for (size_t c = c0; c < c1; c++) acc[c - c0] += row[c];
        }
        for (size_t c = c0; c < c1; c++) out[c] += acc[c - c0];
    }
}

void linear_backward(float *dx, float *dW, float *db, const float *dy, const float *x,
                     const float *W, size_t M, size_t in, size_t out, int accumulate_dx) {
    if (dx) matmul(0, 0, M, in, out, 1.0f, dy, out, W, in, accumulate_dx ? 1.0f : 0.0f, dx, in);
    if (dW) matmul(1, 0, out, in, M, 1.0f, dy, out, x, in, 1.0f, dW, in);
    if (db) colsum_accumulate(db, dy, M, out);
}

void layernorm_forward(float *out, float *res, float *mean, float *rstd, const float *a,
                       const float *b, const float *w, const float *bias, size_t M, size_t C,
                       float eps) {
#pragma omp parallel for schedule(static) if (M * C > DL_PAR_MIN)
    for (size_t m = 0; m < M; m++) {
        const float *ar = a + m * C;
        float *rr = res + m * C, *o = out + m * C;
        if (b) {
            const float *br = b + m * C;
#pragma omp simd
            for (size_t c = 0; c < C; c++) rr[c] = ar[c] + br[c];
        } else if (rr != ar) {
            memcpy(rr, ar, C * sizeof(float));
        }
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (size_t c = 0; c < C; c++) s += rr[c];
        float mu = s / (float)C, v = 0.0f;
#pragma omp simd reduction(+ : v)
        for (size_t c = 0; c < C; c++) v += (rr[c] - mu) * (rr[c] - mu);
        float rs = 1.0f / sqrtf(v / (float)C + eps);
        mean[m] = mu;
        rstd[m] = rs;
#pragma omp simd
        for (size_t c = 0; c < C; c++) o[c] = (rr[c] - mu) * rs * w[c] + bias[c];
    }
}

void layernorm_backward(float *dx, float *dw, float *db, const float *dout, const float *res,
                        const float *mean, const float *rstd, const float *w, size_t M, size_t C) {
    if (dx) {
#pragma omp parallel for schedule(static) if (M * C > DL_PAR_MIN)
        for (size_t m = 0; m < M; m++) {
            const float *g = dout + m * C, *r = res + m * C;
            float mu = mean[m], rs = rstd[m], s1 = 0.0f, s2 = 0.0f;
#pragma omp simd reduction(+ : s1, s2)
            for (size_t c = 0; c < C; c++) {
                float dn = g[c] * w[c];
                s1 += dn;
                s2 += dn * (r[c] - mu) * rs;
            }
            s1 /= (float)C;
            s2 /= (float)C;
            float *d = dx + m * C;
#pragma omp simd
            for (size_t c = 0; c < C; c++) {
                float nrm = (r[c] - mu) * rs;
                d[c] = (g[c] * w[c] - s1 - nrm * s2) * rs;
            }
        }
    }
    if (dw || db) {
        size_t nb = (C + COL_BLOCK - 1) / COL_BLOCK;
#pragma omp parallel for schedule(static) if (M * C > DL_PAR_MIN)
        for (size_t blk = 0; blk < nb; blk++) {
            size_t c0 = blk * COL_BLOCK, c1 = c0 + COL_BLOCK < C ? c0 + COL_BLOCK : C;
            float aw[COL_BLOCK] = {0}, ab[COL_BLOCK] = {0};
            for (size_t m = 0; m < M; m++) {
                const float *g = dout + m * C, *r = res + m * C;
                float mu = mean[m], rs = rstd[m];
#pragma omp simd
                for (size_t c = c0; c < c1; c++) {
                    aw[c - c0] += g[c] * (r[c] - mu) * rs;
                    ab[c - c0] += g[c];
                }
            }
            for (size_t c = c0; c < c1; c++) {
                if (dw) dw[c] += aw[c - c0];
                if (db) db[c] += ab[c - c0];
            }
        }
    }
}

void gelu_forward(float *out, const float *x, size_t n) {
#pragma omp parallel for simd schedule(static) if (n > DL_PAR_MIN)
    for (size_t i = 0; i < n; i++) out[i] = 0.5f * x[i] * (1.0f + dl_erff(x[i] * (float)M_SQRT1_2));
}

void gelu_backward(float *dx, const float *x, const float *dout, size_t n) {
    const float inv_sqrt_2pi = 0.3989422804014327f;
#pragma omp parallel for simd schedule(static) if (n > DL_PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        float cdf = 0.5f * (1.0f + dl_erff(x[i] * (float)M_SQRT1_2));
        float pdf = dl_expf(-0.5f * x[i] * x[i]) * inv_sqrt_2pi;
        dx[i] = dout[i] * (cdf + x[i] * pdf);
    }
}

void tanh_forward(float *out, const float *x, size_t n) {
#pragma omp parallel for simd schedule(static) if (n > DL_PAR_MIN)
    for (size_t i = 0; i < n; i++) out[i] = dl_tanhf(x[i]);
}

void tanh_backward(float *dx, const float *y, const float *dout, size_t n) {
#pragma omp parallel for simd schedule(static) if (n > DL_PAR_MIN)
    for (size_t i = 0; i < n; i++) dx[i] = dout[i] * (1.0f - y[i] * y[i]);
}

void silu_forward(float *out, const float *x, size_t n) {
#pragma omp parallel for simd schedule(static) if (n > DL_PAR_MIN)
    for (size_t i = 0; i < n; i++) out[i] = x[i] * dl_sigmoidf(x[i]);
}

void silu_backward(float *dx, const float *x, const float *dout, size_t n) {
#pragma omp parallel for simd schedule(static) if (n > DL_PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        float s = dl_sigmoidf(x[i]);
        dx[i] = dout[i] * s * (1.0f + x[i] * (1.0f - s));
    }
}

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline uint64_t site_key(uint64_t seed, uint64_t site) {
    return mix64(seed ^ mix64(site + 0x632be59bd9b4e019ULL));
}

static inline int keep_bit(uint64_t key, size_t i, uint32_t threshold) {
    return (uint32_t)(mix64(key + (uint64_t)i * 0x9e3779b97f4a7c15ULL) >> 32) >= threshold;
}

int dropout_keep(uint64_t seed, uint64_t site, size_t i, uint32_t threshold) {
    return keep_bit(site_key(seed, site), i, threshold);
}

uint32_t dropout_threshold(float p) {
    double t = (double)p * 4294967296.0;
    return t >= 4294967295.0 ? 4294967295u : (uint32_t)t;
}

/* x *= mask/(1-p); used for both directions (the backward of dropout is itself). */
void dropout_apply(float *x, size_t n, float p, uint64_t seed, uint64_t site) {
    if (p <= 0.0f) return;
    uint64_t key = site_key(seed, site);
    uint32_t thr = dropout_threshold(p);
    float scale = 1.0f / (1.0f - p);
#pragma omp parallel for schedule(static) if (n > DL_PAR_MIN)
    for (size_t i = 0; i < n; i++) x[i] = keep_bit(key, i, thr) ? x[i] * scale : 0.0f;
}

/* Copy of one (b,h) probability block with dropout applied; block index base. */
static void dropout_block(float *dst, const float *src, size_t n, size_t base, uint64_t key,
                          uint32_t thr, float scale) {
    for (size_t i = 0; i < n; i++) dst[i] = keep_bit(key, base + i, thr) ? src[i] * scale : 0.0f;
}

void attention_forward(float *ctx, float *att, const float *qkv, size_t B, size_t L, size_t H,
                       size_t A, float p, uint64_t seed, uint64_t site) {
    size_t d = H / A, ld = 3 * H;
    float scale = 1.0f / sqrtf((float)d);
    uint64_t key = site_key(seed, site);
    uint32_t thr = dropout_threshold(p);
    float keep_scale = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
#pragma omp parallel
    {
        float *scratch = p > 0.0f ? malloc(L * L * sizeof(float)) : NULL;
#pragma omp for schedule(static)
        for (size_t bh = 0; bh < B * A; bh++) {
            size_t b = bh / A, h = bh % A;
            const float *q = qkv + b * L * ld + h * d, *k = q + H, *v = q + 2 * H;
            float *P = att + bh * L * L;
            sgemm_block(0, 1, L, L, d, scale, q, ld, k, ld, 0.0f, P, L);
            for (size_t i = 0; i < L; i++) {
                float *row = P + i * L, mx = row[0], s = 0.0f;
#pragma omp simd reduction(max : mx)
                for (size_t j = 1; j < L; j++) mx = row[j] > mx ? row[j] : mx;
#pragma omp simd reduction(+ : s)
                for (size_t j = 0; j < L; j++) {
                    row[j] = dl_expf(row[j] - mx);
                    s += row[j];
                }
                float inv = 1.0f / s;
#pragma omp simd
                for (size_t j = 0; j < L; j++) row[j] *= inv;
            }
            const float *Pd = P;
            if (scratch) {
                dropout_block(scratch, P, L * L, bh * L * L, key, thr, keep_scale);
                Pd = scratch;
            }
            sgemm_block(0, 0, L, d, L, 1.0f, Pd, L, v, ld, 0.0f, ctx + b * L * H + h * d, H);
        }
        free(scratch);
    }
}

void attention_backward(float *dqkv, const float *dctx, const float *att, const float *qkv,
                        size_t B, size_t L, size_t H, size_t A, float p, uint64_t seed,
                        uint64_t site) {
    size_t d = H / A, ld = 3 * H;
    float scale = 1.0f / sqrtf((float)d);
    uint64_t key = site_key(seed, site);
    uint32_t thr = dropout_threshold(p);
    float keep_scale = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
#pragma omp parallel
    {
        float *dP = malloc(L * L * sizeof(float));
        float *Pd = p > 0.0f ? malloc(L * L * sizeof(float)) : NULL;
#pragma omp for schedule(static)
        for (size_t bh = 0; bh < B * A; bh++) {
            size_t b = bh / A, h = bh % A;
            const float *q = qkv + b * L * ld + h * d, *k = q + H, *v = q + 2 * H;
            float *dq = dqkv + b * L * ld + h * d, *dk = dq + H, *dv = dq + 2 * H;
            const float *P = att + bh * L * L, *dc = dctx + b * L * H + h * d;
            const float *Pused = P;
            if (Pd) {
                dropout_block(Pd, P, L * L, bh * L * L, key, thr, keep_scale);
                Pused = Pd;
            }
            sgemm_block(1, 0, L, d, L, 1.0f, Pused, L, dc, H, 0.0f, dv, ld);
            sgemm_block(0, 1, L, L, d, 1.0f, dc, H, v, ld, 0.0f, dP, L);
            if (Pd) { /* through the dropout mask: same mask, same scale */
                for (size_t i = 0; i < L * L; i++)
                    dP[i] = keep_bit(key, bh * L * L + i, thr) ? dP[i] * keep_scale : 0.0f;
            }
            for (size_t i = 0; i < L; i++) {
                const float *pr = P + i * L;
                float *gr = dP + i * L, s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (size_t j = 0; j < L; j++) s += gr[j] * pr[j];
#pragma omp simd
                for (size_t j = 0; j < L; j++) gr[j] = pr[j] * (gr[j] - s);
            }
            sgemm_block(0, 0, L, d, L, scale, dP, L, k, ld, 0.0f, dq, ld);
            sgemm_block(1, 0, L, d, L, scale, dP, L, q, ld, 0.0f, dk, ld);
        }
        free(dP);
        free(Pd);
    }
}

/* Computed in double and rounded once: float32 versions (torch's included) differ
 * by an ulp of the frequency, which at t ~ 1000 moves the angle by ~1e-4. */
void timestep_embedding(float *out, const float *t, size_t B, size_t D) {
    size_t half = D / 2;
    for (size_t b = 0; b < B; b++) {
        float *o = out + b * D;
        for (size_t k = 0; k < half; k++) {
            double a = (double)t[b] * exp(-log(10000.0) * (double)k / (double)half);
            o[k] = (float)cos(a);
            o[half + k] = (float)sin(a);
        }
        if (D % 2) o[D - 1] = 0.0f;
    }
}

void embedding_forward(float *out, const int64_t *tok, const float *W, size_t M, size_t E) {
#pragma omp parallel for schedule(static) if (M * E > DL_PAR_MIN)
    for (size_t m = 0; m < M; m++) memcpy(out + m * E, W + (size_t)tok[m] * E, E * sizeof(float));
}

void embedding_backward(float *dW, const int64_t *tok, const float *g, size_t M, size_t E) {
    size_t nb = (E + COL_BLOCK - 1) / COL_BLOCK;
#pragma omp parallel for schedule(static) if (M * E > DL_PAR_MIN)
    for (size_t blk = 0; blk < nb; blk++) {
        size_t c0 = blk * COL_BLOCK, c1 = c0 + COL_BLOCK < E ? c0 + COL_BLOCK : E;
        for (size_t m = 0; m < M; m++) {
            float *dst = dW + (size_t)tok[m] * E;
            const float *src = g + m * E;
            for (size_t c = c0; c < c1; c++) dst[c] += src[c];
        }
    }
}
