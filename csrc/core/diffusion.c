/* Diffusion kernels: schedule, noising, loss terms, sampler steps, decoding. */
#include "diffusion.h"
#include "amx.h"
#include "kernels.h"
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

/* Rows per chunk of tied_cross_entropy, a multiple of 32 (the AMX block) and a function
 * of V only, so that the chunks never depend on the thread count. bf16: the chunk's
 * float32 logits stay near 1 MiB, in cache through its three products; float32: near
 * 16 MiB, because OpenBLAS re-packs W for every call and wants long ones (measured). */
static size_t tce_chunk_rows(size_t V, int bf16) {
    size_t r = ((size_t)1 << (bf16 ? 18 : 22)) / V / 32 * 32;
    return r < 32 ? 32 : r > 1024 ? 1024 : r;
}

/* The bf16 operands of tied_cross_entropy, carved out of one allocation. */
typedef struct {
    uint16_t *w_logits, *w_dh; /* W as op(B) of h W^T (K = E) and of G W (K = V) */
    uint16_t *h_rows, *h_tiles, *g_rows, *g_cols;
} TceBf16;

static size_t tce_bf16_elems(size_t R, size_t E, size_t V) {
    return amx_packed_weight_size(V, E) + amx_packed_weight_size(E, V) +
           amx_input_size(R, E) + amx_packed_weight_size(E, R) + amx_input_size(R, V) +
           amx_input_size(V, R);
}

int tied_cross_entropy(float *nll, float *dh, float *dW, float *db, const float *h, const float *W,
                       const float *b, const int64_t *target, const float *scale, size_t M,
                       size_t E, size_t V, int bf16) {
    size_t R = tce_chunk_rows(V, bf16), n_logits, n_bf16 = 0, bytes;
    if (dl_mul_overflows(R, V, &n_logits)) return -1;
    if (bf16) {
        n_bf16 = tce_bf16_elems(R, E, V);
    }
    if (dl_mul_overflows(n_logits, sizeof(float), &bytes) || bytes + n_bf16 * sizeof(uint16_t) < bytes)
        return -1;
    float *S = malloc(bytes + n_bf16 * sizeof(uint16_t));
    if (!S) return -1;
    TceBf16 p = {0};
    if (bf16) {
        p.w_logits = (uint16_t *)(S + n_logits);
        p.w_dh = p.w_logits + amx_packed_weight_size(V, E);
        p.h_rows = p.w_dh + amx_packed_weight_size(E, V);
        p.h_tiles = p.h_rows + amx_input_size(R, E);
        p.g_rows = p.h_tiles + amx_packed_weight_size(E, R);
        p.g_cols = p.g_rows + amx_input_size(R, V);
        amx_pack_b(p.w_logits, 1, W, E, E, V);
        if (dh) amx_pack_b(p.w_dh, 0, W, E, V, E);
    }
    Epilogue bias = {EPI_BIAS, b, NULL, NULL};
    for (size_t m0 = 0; m0 < M; m0 += R) {
        size_t r = M - m0 < R ? M - m0 : R;
        const float *hc = h + m0 * E;
        if (bf16) {
            amx_pack_a(p.h_rows, 0, hc, E, r, E);
            amx_packed_product(r, V, E, 1.0f, p.h_rows, p.w_logits, 0.0f, S, V, &bias);
        } else {
            matmul_epilogue(0, 1, r, V, E, 1.0f, hc, E, W, E, 0.0f, S, V, &bias);
        }
        cross_entropy(nll + m0, S, target + m0, scale + m0, r, V);
        if (!dh) continue;
        float *dhc = dh + m0 * E;
        if (bf16) {
            amx_pack_a(p.g_rows, 0, S, V, r, V);
            amx_packed_product(r, E, V, 1.0f, p.g_rows, p.w_dh, 0.0f, dhc, E, NULL);
            amx_pack_a(p.g_cols, 1, S, V, V, r);
            amx_pack_b(p.h_tiles, 0, hc, E, r, E);
            amx_packed_product(V, E, r, 1.0f, p.g_cols, p.h_tiles, 1.0f, dW, E, NULL);
        } else if (matmul(0, 0, r, E, V, 1.0f, S, V, W, E, 0.0f, dhc, E) ||
                   matmul(1, 0, V, E, r, 1.0f, S, V, hc, E, 1.0f, dW, E)) {
            free(S);
            return -1;
        }
        colsum_accumulate(db, S, r, V);
    }
    free(S);
    return 0;
}

/* affine_argmax in blocks of ARGMAX_ROWS rows x ARGMAX_COLS vocabulary entries: W is packed
 * by OpenBLAS once per row block (at 64 rows and the whole vocabulary, the packing was a
 * quarter of the time), and a block's scores (4 MiB) stay in cache for their scan. */
#define ARGMAX_ROWS 256
#define ARGMAX_COLS 4096

/* Per thread: scores S[ARGMAX_ROWS, ARGMAX_COLS], the gathered rows xs[ARGMAX_ROWS, E]. */
static int argmax_scratch_floats(size_t E, size_t *n) {
    return dl_mul_overflows(ARGMAX_ROWS, ARGMAX_COLS + E, n);
}

/* best, *bv: the first index of the largest s[j] + c[j] of the n entries, where it beats
 * *bv (NaN never does); as one left-to-right scan with a strict '>', vectorised in two. */
static void argmax_update(const float *restrict s, const float *restrict c, size_t n, size_t v0,
                          size_t *best, float *bv) {
    float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
    for (size_t j = 0; j < n; j++) {
        float val = s[j] + c[j];
        mx = val > mx ? val : mx;
    }
    if (!(mx > *bv)) return;
    size_t j = 0;
    while (!(s[j] + c[j] == mx)) j++;
    *best = v0 + j;
    *bv = mx;
}

int affine_argmax(int64_t *tokens, const float *x, const float *W, const float *c,
                  const uint8_t *active, size_t M, size_t E, size_t V) {
    int threads = dl_max_threads();
    size_t per_thread, bytes;
    if (argmax_scratch_floats(E, &per_thread) ||
        dl_mul_overflows(per_thread * sizeof(float), (size_t)threads, &bytes))
        return -1;
    float *scratch = malloc(bytes);
    if (!scratch) return -1;
    DL_PROFILE_BEGIN;
    size_t nb = (M + ARGMAX_ROWS - 1) / ARGMAX_ROWS;
#pragma omp parallel num_threads(threads)
    {
        float *S = scratch + (size_t)dl_thread_id() * per_thread, *xs = S + ARGMAX_ROWS * ARGMAX_COLS;
        size_t rows[ARGMAX_ROWS], best[ARGMAX_ROWS];
        float bv[ARGMAX_ROWS];
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
            for (size_t v0 = 0; v0 < V; v0 += ARGMAX_COLS) {
                size_t nc = V - v0 < ARGMAX_COLS ? V - v0 : ARGMAX_COLS;
                SGEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)k, (blasint)nc, (blasint)E,
                      1.0f, xs, (blasint)E, W + v0 * E, (blasint)E, 0.0f, S, (blasint)nc);
                for (size_t i = 0; i < k; i++) {
                    if (v0 == 0) { /* the scan starts at entry 0 */
                        best[i] = 0;
                        bv[i] = S[i * nc] + c[0];
                    }
                    argmax_update(S + i * nc, c + v0, nc, v0, &best[i], &bv[i]);
                }
            }
            for (size_t i = 0; i < k; i++) tokens[rows[i]] = (int64_t)best[i];
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
