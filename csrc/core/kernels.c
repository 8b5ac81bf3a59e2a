/* Layer kernels of the DiffuSeq transformer, forward and backward. */
#include "kernels.h"
#include "amx.h"
#include "mathfun.h"

/* Fixed block size for column reductions: the same blocks (hence bitwise the same
 * results) for any number of threads. */
#define COL_BLOCK 32

/* The (blasint) casts narrow sizes the bindings have checked against DL_BLAS_MAX. */
static void sgemm_block(int ta, int tb, size_t M, size_t N, size_t K, float alpha,
                        const float *A, size_t lda, const float *B, size_t ldb, float beta,
                        float *C, size_t ldc) {
    SGEMM(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
          (blasint)M, (blasint)N, (blasint)K, alpha, A, (blasint)lda, B, (blasint)ldb, beta, C,
          (blasint)ldc);
}

/* How a product is split over threads; the plan depends on the shape only, never on
 * the thread count, so every C element is computed by the same sgemm calls and summed
 * in the same order (bitwise the same results) for any number of threads.
 *  - small products (< MM_MIN_SPLIT multiply-adds): one call;
 *  - else tiles of the output, at least MM_TILE_M rows by MM_TILE_N columns (a side
 *    shorter than twice its tile's stays whole) and a tile's least work: MM_TILE_WORK
 *    multiply-adds, or a 1/MM_FEW_TILES share of a smaller product (down to
 *    MM_MIN_SPLIT), so the tile count grows with M N and a mid-sized product still
 *    gives every thread a part;
 *  - products with no epilogue whose K is at least twice the output's longer side (the
 *    weight gradients dW = dy^T x, K = the batch rows; the tied head's dh = G W, K = V)
 *    and whose output gives fewer than MM_MIN_TILES tiles also cut K in chunks (of at
 *    least MM_CHUNK_K and a tile's least work), each chunk's product into its own
 *    buffer, summed in chunk order.
 * Each tile is a single-threaded sgemm. Its sides keep the packing copies near 1% of its
 * multiply-adds, and its work keeps OpenBLAS's per-call cost (buffer pool, locks) small:
 * 4x smaller tiles cost up to a third of the 2-thread speed at K 256 (measured). Without
 * the 1/MM_FEW_TILES share, the tiny preset's products (2^22-2^25 multiply-adds) were
 * one or two tiles, and its step ran 1.3x faster on 2 threads than on 1 (1.85x with it);
 * a 16th instead of an 8th re-packs the weights more often, 3% of the SPEC small
 * teacher's 1-thread step, for no gain at 2 (measured). */
#define MM_MIN_SPLIT ((size_t)1 << 21)
#define MM_TILE_M 128
#define MM_TILE_N 192
#define MM_TILE_WORK ((size_t)1 << 24)
#define MM_FEW_TILES 8
#define MM_CHUNK_K 256
#define MM_MIN_TILES 64

static size_t ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }

/* n cut in parts of at least `least` (rounded up to `align`); the part size */
static size_t part_of(size_t n, size_t least, size_t align) {
    size_t parts = n / least ? n / least : 1;
    return ceil_div(ceil_div(n, parts), align) * align;
}

MatmulPlan matmul_plan(size_t M, size_t N, size_t K, int plain) {
    MatmulPlan t = {M, N, K, 1, 1, 1};
    if (M * N * K < MM_MIN_SPLIT) return t;
    size_t work = M * N * K / MM_FEW_TILES; /* a tile's least work */
    if (work > MM_TILE_WORK) work = MM_TILE_WORK;
    if (work < MM_MIN_SPLIT) work = MM_MIN_SPLIT;
    size_t lm = MM_TILE_M, ln = MM_TILE_N; /* least tile sides: grown to the least work */
    while (lm * ln * K < work && (2 * lm <= M || 2 * ln <= N)) {
        if (2 * ln <= N && (ln <= lm || 2 * lm > M)) ln *= 2;
        else lm *= 2;
    }
    t.tm = part_of(M, lm, 32);
    t.tn = part_of(N, ln, 16);
    t.mt = ceil_div(M, t.tm);
    t.nt = ceil_div(N, t.tn);
    size_t tiles = t.mt * t.nt;
    if (plain && tiles < MM_MIN_TILES && K >= 2 * MM_CHUNK_K && K >= 2 * (M > N ? M : N)) {
        size_t chunks = K / MM_CHUNK_K, want = ceil_div(MM_MIN_TILES, tiles);
        size_t by_work = K * (t.tm * t.tn) / work;
        if (chunks > by_work) chunks = by_work > 1 ? by_work : 1;
        t.tk = ceil_div(ceil_div(K, chunks < want ? chunks : want), 16) * 16;
        t.kt = ceil_div(K, t.tk);
    }
    return t;
}

/* C = alpha op(A) op(B) + beta C over the plan's tiles and K chunks, each chunk into its
 * own buffer, summed in chunk order. Returns 0, or -1 when the buffers cannot be had: no
 * fallback to another plan, whose different summation order would change the bits. */
static int matmul_split_k(int ta, int tb, size_t M, size_t N, size_t K, const MatmulPlan *p,
                          float alpha, const float *A, size_t lda, const float *B, size_t ldb,
                          float beta, float *C, size_t ldc) {
    size_t n;
    if (dl_mul_overflows(p->kt * sizeof(float), M, &n) || dl_mul_overflows(n, N, &n)) return -1;
    float *part = malloc(n);
    if (!part) return -1;
    size_t tiles = p->mt * p->nt;
#pragma omp parallel for schedule(static)
    for (size_t item = 0; item < tiles * p->kt; item++) {
        size_t c = item / tiles, tile = item % tiles;
        size_t m0 = tile / p->nt * p->tm, n0 = tile % p->nt * p->tn, k0 = c * p->tk;
        size_t m1 = m0 + p->tm < M ? m0 + p->tm : M, n1 = n0 + p->tn < N ? n0 + p->tn : N;
        size_t k1 = k0 + p->tk < K ? k0 + p->tk : K;
        const float *At = ta ? A + k0 * lda + m0 : A + m0 * lda + k0;
        const float *Bt = tb ? B + n0 * ldb + k0 : B + k0 * ldb + n0;
        sgemm_block(ta, tb, m1 - m0, n1 - n0, k1 - k0, alpha, At, lda, Bt, ldb, 0.0f,
                    part + c * M * N + m0 * N + n0, N);
    }
#pragma omp parallel for schedule(static) if (M * N > DL_PAR_MIN)
    for (size_t m = 0; m < M; m++) {
        float *c = C + m * ldc;
        for (size_t n = 0; n < N; n++) {
            float s = part[m * N + n];
            for (size_t k = 1; k < p->kt; k++) s += part[k * M * N + m * N + n];
            c[n] = beta == 0.0f ? s : beta * c[n] + s;
        }
    }
    free(part);
    return 0;
}

/* gelu'(x) = Phi(x) + x phi(x), given cdf = Phi(x). */
static inline float gelu_grad_with_cdf(float x, float cdf) {
    const float inv_sqrt_2pi = 0.3989422804014327f;
    /* explicit fma: left to the compiler, the vector loop and its scalar remainder
     * contract differently, and results would depend on where threads split */
    return fmaf(x * dl_expf(-0.5f * x * x), inv_sqrt_2pi, cdf);
}

static inline float gelu_grad(float x) {
    return gelu_grad_with_cdf(x, 0.5f * (1.0f + dl_erff(x * (float)M_SQRT1_2)));
}

/* gelu'(x) from y = gelu(x) = x Phi(x): Phi = y / x (to an ulp or two of computing it
 * again from erf; 1/2 where x is too small to divide by). */
static inline float gelu_grad_from_act(float x, float y) {
    return gelu_grad_with_cdf(x, fabsf(x) > 1e-20f ? y / x : 0.5f);
}

static void bias_row(float *restrict c, const float *restrict bias, size_t n) {
#pragma omp simd
    for (size_t j = 0; j < n; j++) c[j] += bias[j];
}

static void bias_gelu_row(float *restrict c, float *restrict act, const float *restrict bias,
                          size_t n) {
#pragma omp simd
    for (size_t j = 0; j < n; j++) {
        float x = c[j] + bias[j];
        c[j] = x;
        act[j] = 0.5f * x * (1.0f + dl_erff(x * (float)M_SQRT1_2));
    }
}

static void gelu_grad_row(float *restrict c, const float *restrict x, size_t n) {
#pragma omp simd
    for (size_t j = 0; j < n; j++) c[j] *= gelu_grad(x[j]);
}

static void gelu_grad_act_row(float *restrict c, const float *restrict x,
                              const float *restrict y, size_t n) {
#pragma omp simd
    for (size_t j = 0; j < n; j++) c[j] *= gelu_grad_from_act(x[j], y[j]);
}

void apply_epilogue(const Epilogue *e, float *C, size_t ldc, size_t m0, size_t m1,
                           size_t n0, size_t n1) {
    for (size_t m = m0; m < m1; m++) {
        size_t off = m * ldc + n0;
        if (e->kind == EPI_BIAS) bias_row(C + off, e->bias + n0, n1 - n0);
        else if (e->kind == EPI_BIAS_GELU) bias_gelu_row(C + off, e->out + off, e->bias + n0, n1 - n0);
        else if (e->kind == EPI_GELU_GRAD && e->act)
            gelu_grad_act_row(C + off, e->in + off, e->act + off, n1 - n0);
        else if (e->kind == EPI_GELU_GRAD) gelu_grad_row(C + off, e->in + off, n1 - n0);
    }
}

int matmul_epilogue(int ta, int tb, size_t M, size_t N, size_t K, float alpha, const float *A,
                    size_t lda, const float *B, size_t ldb, float beta, float *C, size_t ldc,
                    const Epilogue *epi) {
    if (M == 0 || N == 0) return 0;
    Bf16Products *bf16 = dl_bf16_products;
    /* (K < 2^26: the packers' int32 scatter offsets) */
    if (bf16 && K < ((size_t)1 << 26) && amx_matmul_scratch(M, N, K) <= bf16->elems) {
        amx_matmul(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, epi, bf16->scratch);
        return 0;
    }
    DL_PROFILE_BEGIN;
    int plain = !epi || epi->kind == EPI_NONE;
    MatmulPlan plan = matmul_plan(M, N, K, plain);
    if (plan.kt > 1) {
        int r = matmul_split_k(ta, tb, M, N, K, &plan, alpha, A, lda, B, ldb, beta, C, ldc);
        DL_PROFILE_END(DL_K_MATMUL);
        return r;
    }
    size_t tm = plan.tm, tn = plan.tn, nt = plan.nt;
#pragma omp parallel for schedule(static) if (plan.mt * nt > 1)
    for (size_t tile = 0; tile < plan.mt * nt; tile++) {
        size_t m0 = tile / nt * tm, n0 = tile % nt * tn;
        size_t m1 = m0 + tm < M ? m0 + tm : M, n1 = n0 + tn < N ? n0 + tn : N;
        const float *At = ta ? A + m0 : A + m0 * lda;
        const float *Bt = tb ? B + n0 * ldb : B + n0;
        sgemm_block(ta, tb, m1 - m0, n1 - n0, K, alpha, At, lda, Bt, ldb, beta, C + m0 * ldc + n0,
                    ldc);
        if (!plain) apply_epilogue(epi, C, ldc, m0, m1, n0, n1);
    }
    DL_PROFILE_END(DL_K_MATMUL);
    return 0;
}

int matmul(int ta, int tb, size_t M, size_t N, size_t K, float alpha, const float *A,
           size_t lda, const float *B, size_t ldb, float beta, float *C, size_t ldc) {
    return matmul_epilogue(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, NULL);
}

int linear_forward(float *y, const float *x, const float *W, const float *b, size_t M,
                   size_t in, size_t out) {
    Epilogue e = {b ? EPI_BIAS : EPI_NONE, b, NULL, NULL};
    return matmul_epilogue(0, 1, M, out, in, 1.0f, x, in, W, in, 0.0f, y, out, &e);
}

/* Columns a block of colsum_accumulate: each column is summed over the rows in order
 * whatever the block, so its width changes no bit; 1 KiB of each row at a time streams
 * where 128 bytes a row (COL_BLOCK) left each row's other lines to be fetched again. */
#define COLSUM_BLOCK 256

void colsum_accumulate(float *out, const float *x, size_t M, size_t C) {
    DL_PROFILE_BEGIN;
    size_t nb = (C + COLSUM_BLOCK - 1) / COLSUM_BLOCK;
#pragma omp parallel for schedule(static) if (M * C > DL_PAR_MIN)
    for (size_t blk = 0; blk < nb; blk++) {
        size_t c0 = blk * COLSUM_BLOCK, c1 = c0 + COLSUM_BLOCK < C ? c0 + COLSUM_BLOCK : C;
        float acc[COLSUM_BLOCK] = {0};
        for (size_t m = 0; m < M; m++) {
            const float *row = x + m * C;
#pragma omp simd
            for (size_t c = c0; c < c1; c++) acc[c - c0] += row[c];
        }
        for (size_t c = c0; c < c1; c++) out[c] += acc[c - c0];
    }
    DL_PROFILE_END(DL_K_BIAS);
}

int linear_backward(float *dx, float *dW, float *db, const float *dy, const float *x,
                    const float *W, size_t M, size_t in, size_t out, int accumulate_dx) {
    if (dx && matmul(0, 0, M, in, out, 1.0f, dy, out, W, in, accumulate_dx ? 1.0f : 0.0f, dx, in))
        return -1;
    if (dW && matmul(1, 0, out, in, M, 1.0f, dy, out, x, in, 1.0f, dW, in)) return -1;
    if (db) colsum_accumulate(db, dy, M, out);
    return 0;
}

int linear_backward_gelu(float *dx, float *dW, float *db, const float *dy, const float *x,
                         const float *W, const float *gelu_in, size_t M, size_t in, size_t out) {
    Epilogue e = {EPI_GELU_GRAD, NULL, NULL, gelu_in, x}; /* x = gelu(gelu_in) */
    if (matmul_epilogue(0, 0, M, in, out, 1.0f, dy, out, W, in, 0.0f, dx, in, &e)) return -1;
    if (dW && matmul(1, 0, out, in, M, 1.0f, dy, out, x, in, 1.0f, dW, in)) return -1;
    if (db) colsum_accumulate(db, dy, M, out);
    return 0;
}

void layernorm_forward(float *out, float *res, float *mean, float *rstd, const float *a,
                       const float *b, const float *w, const float *bias, size_t M, size_t C,
                       float eps) {
    DL_PROFILE_BEGIN;
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
    DL_PROFILE_END(DL_K_LAYERNORM);
}

void layernorm_backward(float *dx, float *dw, float *db, const float *dout, const float *res,
                        const float *mean, const float *rstd, const float *w, size_t M, size_t C) {
    DL_PROFILE_BEGIN;
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
    DL_PROFILE_END(DL_K_LAYERNORM_BWD);
}

void gelu_forward(float *out, const float *x, size_t n) {
    DL_PROFILE_BEGIN;
#pragma omp parallel for simd schedule(static) if (n > DL_PAR_MIN)
    for (size_t i = 0; i < n; i++) out[i] = 0.5f * x[i] * (1.0f + dl_erff(x[i] * (float)M_SQRT1_2));
    DL_PROFILE_END(DL_K_GELU);
}

void gelu_backward(float *dx, const float *x, const float *dout, size_t n) {
    DL_PROFILE_BEGIN;
#pragma omp parallel for simd schedule(static) if (n > DL_PAR_MIN)
    for (size_t i = 0; i < n; i++) dx[i] = dout[i] * gelu_grad(x[i]);
    DL_PROFILE_END(DL_K_GELU_BWD);
}

void tanh_forward(float *out, const float *x, size_t n) {
    DL_PROFILE_BEGIN;
#pragma omp parallel for simd schedule(static) if (n > DL_PAR_MIN)
    for (size_t i = 0; i < n; i++) out[i] = dl_tanhf(x[i]);
    DL_PROFILE_END(DL_K_ACTIVATION);
}

void tanh_backward(float *dx, const float *y, const float *dout, size_t n) {
    DL_PROFILE_BEGIN;
#pragma omp parallel for simd schedule(static) if (n > DL_PAR_MIN)
    for (size_t i = 0; i < n; i++) dx[i] = dout[i] * (1.0f - y[i] * y[i]);
    DL_PROFILE_END(DL_K_ACTIVATION);
}

void silu_forward(float *out, const float *x, size_t n) {
    DL_PROFILE_BEGIN;
#pragma omp parallel for simd schedule(static) if (n > DL_PAR_MIN)
    for (size_t i = 0; i < n; i++) out[i] = x[i] * dl_sigmoidf(x[i]);
    DL_PROFILE_END(DL_K_ACTIVATION);
}

void silu_backward(float *dx, const float *x, const float *dout, size_t n) {
    DL_PROFILE_BEGIN;
#pragma omp parallel for simd schedule(static) if (n > DL_PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        float s = dl_sigmoidf(x[i]);
        dx[i] = dout[i] * s * fmaf(x[i], 1.0f - s, 1.0f); /* explicit fma: see gelu_grad */
    }
    DL_PROFILE_END(DL_K_ACTIVATION);
}

static inline uint64_t site_key(uint64_t seed, uint64_t site) {
    return dl_mix64(seed ^ dl_mix64(site + 0x632be59bd9b4e019ULL));
}

static inline int keep_bit(uint64_t key, size_t i, uint32_t threshold) {
    return (uint32_t)(dl_mix64(key + (uint64_t)i * 0x9e3779b97f4a7c15ULL) >> 32) >= threshold;
}

int dropout_keep(uint64_t seed, uint64_t site, size_t i, uint32_t threshold) {
    return keep_bit(site_key(seed, site), i, threshold);
}

uint32_t dropout_threshold(float p) {
    double t = (double)p * 4294967296.0;
    return t >= 4294967295.0 ? 4294967295u : (uint32_t)t;
}

/* One dropout site's mask: element i is kept when keep_bit(key, i, thr); kept values
 * are scaled by 1/(1-p). */
typedef struct {
    uint64_t key;
    uint32_t thr;
    float scale;
} DropoutSite;

static DropoutSite dropout_site(float p, uint64_t seed, uint64_t site) {
    DropoutSite ds = {site_key(seed, site), dropout_threshold(p), p > 0.0f ? 1.0f / (1.0f - p) : 1.0f};
    return ds;
}

/* x *= mask/(1-p); used for both directions (the backward of dropout is itself). */
void dropout_apply(float *x, size_t n, float p, uint64_t seed, uint64_t site, size_t base) {
    if (p <= 0.0f) return;
    DL_PROFILE_BEGIN;
    const DropoutSite ds = dropout_site(p, seed, site);
#pragma omp parallel for schedule(static) if (n > DL_PAR_MIN)
    for (size_t i = 0; i < n; i++) x[i] = keep_bit(ds.key, base + i, ds.thr) ? x[i] * ds.scale : 0.0f;
    DL_PROFILE_END(DL_K_DROPOUT);
}

/* Copy of one (b,h) probability block with dropout applied; block index base. */
static void dropout_block(float *dst, const float *src, size_t n, size_t base, const DropoutSite *ds) {
    for (size_t i = 0; i < n; i++) dst[i] = keep_bit(ds->key, base + i, ds->thr) ? src[i] * ds->scale : 0.0f;
}

static void softmax_rows(float *P, size_t L) {
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
}

size_t attention_scratch_floats(size_t L, size_t H, size_t A) {
    (void)H;
    (void)A;
    return 2 * L * L;
}

void attention_forward(float *ctx, float *att, const float *qkv, size_t B, size_t L, size_t H,
                       size_t A, float p, uint64_t seed, uint64_t site, size_t base,
                       float *scratch, int threads) {
    DL_PROFILE_BEGIN;
    size_t d = H / A, ld = 3 * H;
    float scale = 1.0f / sqrtf((float)d);
    const DropoutSite ds = dropout_site(p, seed, site);
#pragma omp parallel num_threads(threads) if (B * A * L * L * d > DL_PAR_MIN)
    {
        /* probabilities after dropout */
        float *dropped = p > 0.0f ? scratch + (size_t)dl_thread_id() * attention_scratch_floats(L, H, A) : NULL;
#pragma omp for schedule(static)
        for (size_t bh = 0; bh < B * A; bh++) {
            size_t b = bh / A, h = bh % A;
            const float *q = qkv + b * L * ld + h * d, *k = q + H, *v = q + 2 * H;
            float *P = att + bh * L * L;
            sgemm_block(0, 1, L, L, d, scale, q, ld, k, ld, 0.0f, P, L);
            softmax_rows(P, L);
            const float *Pd = P;
            if (dropped) {
                dropout_block(dropped, P, L * L, base + bh * L * L, &ds);
                Pd = dropped;
            }
            sgemm_block(0, 0, L, d, L, 1.0f, Pd, L, v, ld, 0.0f, ctx + b * L * H + h * d, H);
        }
    }
    DL_PROFILE_END(DL_K_ATTENTION);
}

void attention_backward(float *dqkv, const float *dctx, const float *att, const float *qkv,
                        size_t B, size_t L, size_t H, size_t A, float p, uint64_t seed,
                        uint64_t site, size_t base, float *scratch, int threads) {
    DL_PROFILE_BEGIN;
    size_t d = H / A, ld = 3 * H;
    float scale = 1.0f / sqrtf((float)d);
    const DropoutSite ds = dropout_site(p, seed, site);
#pragma omp parallel num_threads(threads) if (B * A * L * L * d > DL_PAR_MIN)
    {
        /* dP: gradient of the probabilities, then of the scores; Pd: P after dropout */
        float *dP = scratch + (size_t)dl_thread_id() * attention_scratch_floats(L, H, A);
        float *Pd = p > 0.0f ? dP + L * L : NULL;
#pragma omp for schedule(static)
        for (size_t bh = 0; bh < B * A; bh++) {
            size_t b = bh / A, h = bh % A;
            const float *q = qkv + b * L * ld + h * d, *k = q + H, *v = q + 2 * H;
            float *dq = dqkv + b * L * ld + h * d, *dk = dq + H, *dv = dq + 2 * H;
            const float *P = att + bh * L * L, *dc = dctx + b * L * H + h * d;
            const float *Pused = P;
            if (Pd) {
                dropout_block(Pd, P, L * L, base + bh * L * L, &ds);
                Pused = Pd;
            }
            sgemm_block(1, 0, L, d, L, 1.0f, Pused, L, dc, H, 0.0f, dv, ld);  /* dV = P^T dctx */
            sgemm_block(0, 1, L, L, d, 1.0f, dc, H, v, ld, 0.0f, dP, L);      /* dP = dctx V^T */
            if (Pd) { /* through the dropout mask: same mask, same scale */
                for (size_t i = 0; i < L * L; i++)
                    dP[i] = keep_bit(ds.key, base + bh * L * L + i, ds.thr) ? dP[i] * ds.scale : 0.0f;
            }
            for (size_t i = 0; i < L; i++) {
                const float *pr = P + i * L;
                float *gr = dP + i * L, s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (size_t j = 0; j < L; j++) s += gr[j] * pr[j];
#pragma omp simd
                for (size_t j = 0; j < L; j++) gr[j] = pr[j] * (gr[j] - s);
            }
            sgemm_block(0, 0, L, d, L, scale, dP, L, k, ld, 0.0f, dq, ld);    /* dQ = scale dS K */
            sgemm_block(1, 0, L, d, L, scale, dP, L, q, ld, 0.0f, dk, ld);    /* dK = scale dS^T Q */
        }
    }
    DL_PROFILE_END(DL_K_ATTENTION_BWD);
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
    DL_PROFILE_BEGIN;
#pragma omp parallel for schedule(static) if (M * E > DL_PAR_MIN)
    for (size_t m = 0; m < M; m++) memcpy(out + m * E, W + (size_t)tok[m] * E, E * sizeof(float));
    DL_PROFILE_END(DL_K_EMBEDDING);
}

void embedding_backward(float *dW, const int64_t *tok, const float *g, size_t M, size_t E) {
    DL_PROFILE_BEGIN;
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
    DL_PROFILE_END(DL_K_EMBEDDING);
}
