/* The pure-C core (csrc/core) tested without Python: matrix products at shapes that
 * reach every branch of matmul_epilogue's tile plan against a double-precision loop,
 * layer kernels against double-precision references and their finite differences, the
 * optimiser kernels, whole-model forward + backward passes, and the text paths (text.c).
 * Every check runs at 1, 2, 3, 4 and 8 OpenMP threads and the results must be bitwise
 * identical. Built and run by the Makefile beside it (plain, ASan + UBSan,
 * ThreadSanitizer). Exit status 1 on any failure. */
#include <stdio.h>

#include "kernels.h"
#include "model.h"
#include "optim.h"
#include "text.h"

static int failures;

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        if (!(cond)) {                                                     \
            failures++;                                                    \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);           \
            fprintf(stderr, __VA_ARGS__);                                  \
            fputc('\n', stderr);                                           \
        }                                                                  \
    } while (0)

#ifdef _OPENMP
static const int THREAD_COUNTS[] = {1, 2, 3, 4, 8};
#define N_THREAD_COUNTS 5
static void set_threads(int n) { omp_set_num_threads(n); }
#else
static const int THREAD_COUNTS[] = {1};
#define N_THREAD_COUNTS 1
static void set_threads(int n) { (void)n; }
#endif

static const float EPS32 = 1.1920929e-7f;

/* ---- helpers ------------------------------------------------------------------ */

static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* uniform in [-scale, scale) */
static void fill(float *x, size_t n, float scale, uint64_t *s) {
    for (size_t i = 0; i < n; i++)
        x[i] = (float)(((double)(rng_next(s) >> 11) / 9007199254740992.0 * 2.0 - 1.0) * scale);
}

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "out of memory (%zu bytes)\n", bytes);
        exit(2);
    }
    return p;
}

static float *floats(size_t n) { return xmalloc(n * sizeof(float)); }
static double *doubles(size_t n) { return xmalloc(n * sizeof(double)); }

static float *copy_floats(const float *x, size_t n) {
    float *y = floats(n);
    memcpy(y, x, n * sizeof(float));
    return y;
}

static double gelu_ref(double x) { return 0.5 * x * (1.0 + erf(x * M_SQRT1_2)); }
static double gelu_grad_ref(double x) {
    return 0.5 * (1.0 + erf(x * M_SQRT1_2)) + x * exp(-0.5 * x * x) / sqrt(2.0 * M_PI);
}

/* Passes when every |got - want| <= atol + rtol |want|; reports the worst entry. */
static void worst(const char *what, const float *got, const double *want, size_t n,
                    double rtol, double atol) {
    double w = 0.0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        double r = fabs((double)got[i] - want[i]) / (atol + rtol * fabs(want[i]));
        if (!(r <= w)) { /* catches NaN */
            w = r;
            at = i;
        }
    }
    CHECK(w <= 1.0, "%s: entry %zu is %.9g, want %.9g (rtol %g, atol %g)", what, at,
          n ? (double)got[at] : 0.0, n ? want[at] : 0.0, rtol, atol);
}

static void same_bits(const char *what, const float *a, const float *b, size_t n, int threads) {
    size_t i = 0, differ = 0;
    for (size_t j = n; j-- > 0;)
        if (memcmp(a + j, b + j, sizeof(float))) differ++, i = j;
    CHECK(differ == 0, "%s: %zu of %zu entries at %d threads differ bitwise from 1 thread "
          "(first: entry %zu, %.9g against %.9g)", what, differ, n, threads, i, b[i], a[i]);
}

/* ---- matrix products ------------------------------------------------------------ */

/* Each case names the branch of matmul_plan() in csrc/core/kernels.c it reaches (products
 * of at least MM_MIN_SPLIT = 2^21 multiply-adds are split): one call; row tiles (at least
 * 128 rows and, in large products, 2^24 multiply-adds each); column tiles (at least 192
 * columns); both; K
 * chunks (no epilogue, fewer than 64 output tiles, K >= 512 and >= twice the output's
 * longer side), alone or with output tiles. Sizes are
 * not multiples of the tile alignments, so the last tiles are short ones; `pad` widens the
 * leading dimensions to catch stride mistakes. */
typedef struct {
    const char *branch;
    int ta, tb;
    size_t M, N, K;
    float alpha, beta;
    EpilogueKind epi;
    size_t pad;
    int with_act; /* EPI_GELU_GRAD given act = gelu(in) as EPI_BIAS_GELU computes it */
} MatmulCase;

static const MatmulCase MATMUL_CASES[] = {
    {"one call (small)", 0, 1, 7, 5, 33, 1.0f, 0.0f, EPI_BIAS, 0},
    {"one call (small, 1 x 1 x 1)", 1, 0, 1, 1, 1, 1.0f, 0.0f, EPI_NONE, 0},
    {"rows, bias", 0, 1, 2049, 96, 300, 1.0f, 0.0f, EPI_BIAS, 0},
    {"rows, bias + GELU", 0, 1, 1100, 200, 256, 1.0f, 0.0f, EPI_BIAS_GELU, 3},
    {"rows, GELU gradient", 0, 0, 1024, 160, 400, 1.0f, 0.0f, EPI_GELU_GRAD, 0},
    {"rows, GELU gradient from the forward's act", 0, 0, 1024, 160, 400, 1.0f, 0.0f, EPI_GELU_GRAD, 2, 1},
    /* K 1: the product exact to rounding, so the tolerance is the GELU gradient's own */
    {"one call, GELU gradient, K 1", 0, 0, 64, 300, 1, 1.0f, 0.0f, EPI_GELU_GRAD, 0},
    {"one call, GELU gradient from the act, K 1", 0, 0, 64, 300, 1, 1.0f, 0.0f, EPI_GELU_GRAD, 1, 1},
    {"rows, accumulate (dx += dy W)", 0, 0, 1500, 64, 512, 1.0f, 1.0f, EPI_NONE, 2},
    {"rows, K long but with an epilogue", 0, 1, 300, 40, 2000, 1.0f, 0.0f, EPI_BIAS, 0},
    {"columns, bias", 0, 1, 40, 2030, 400, 1.0f, 0.0f, EPI_BIAS, 0},
    {"columns, A transposed", 1, 0, 48, 1700, 512, 1.0f, 0.0f, EPI_NONE, 5},
    {"columns, both transposed", 1, 1, 50, 1900, 400, 0.5f, 0.0f, EPI_NONE, 0},
    {"rows and columns, bias + GELU", 0, 1, 600, 800, 256, 1.0f, 0.0f, EPI_BIAS_GELU, 1},
    {"rows and columns, accumulate", 0, 0, 560, 800, 256, 1.0f, 1.0f, EPI_NONE, 0},
    {"K chunks, weight gradient (dW += dy^T x)", 1, 0, 120, 140, 2200, 1.0f, 1.0f, EPI_NONE, 0},
    {"K chunks, both transposed", 1, 1, 100, 90, 4000, 1.0f, 0.0f, EPI_NONE, 0},
    {"K chunks, x W^T", 0, 1, 64, 48, 11000, 0.5f, 0.0f, EPI_NONE, 1},
    {"K chunks, neither transposed, beta 0.5", 0, 0, 100, 100, 3400, 1.0f, 0.5f, EPI_NONE, 0},
    {"K chunks and tiles, weight gradient, beta 0.5", 1, 0, 520, 100, 2400, 1.0f, 0.5f, EPI_NONE, 3},
    {"K chunks and tiles, the head's dh = G W", 0, 0, 300, 130, 3000, 1.0f, 0.0f, EPI_NONE, 0},
    {"one call (large, too little work a tile)", 0, 1, 48, 40, 1200, 1.0f, 0.0f, EPI_BIAS, 0},
};

static void test_matmul_case(const MatmulCase *c, uint64_t *s) {
    size_t M = c->M, N = c->N, K = c->K;
    /* stored shapes: A is [M,K] or [K,M] when transposed, B is [K,N] or [N,K] */
    size_t a_rows = c->ta ? K : M, a_cols = c->ta ? M : K;
    size_t b_rows = c->tb ? N : K, b_cols = c->tb ? K : N;
    size_t lda = a_cols + c->pad, ldb = b_cols + c->pad, ldc = N + c->pad;
    float *A = floats(a_rows * lda), *B = floats(b_rows * ldb), *C0 = floats(M * ldc);
    float *bias = floats(N), *gelu_in = floats(M * ldc);
    fill(A, a_rows * lda, 1.0f, s);
    fill(B, b_rows * ldb, 1.0f, s);
    fill(C0, M * ldc, 1.0f, s);
    fill(bias, N, 1.0f, s);
    fill(gelu_in, M * ldc, 3.0f, s);
    float *gelu_act = NULL;
    if (c->with_act) { /* the forward's epilogue on gelu_in, zero bias */
        float *pre = copy_floats(gelu_in, M * ldc), *zero = floats(N);
        gelu_act = floats(M * ldc);
        memset(zero, 0, N * sizeof(float));
        Epilogue fwd = {EPI_BIAS_GELU, zero, gelu_act, NULL, NULL};
        apply_epilogue(&fwd, pre, ldc, 0, M, 0, N);
        free(pre), free(zero);
    }

    /* reference in double, and the scale of each entry's sum for its tolerance */
    double *ref = doubles(M * N), *act_ref = doubles(M * N), *mag = doubles(M * N);
    for (size_t m = 0; m < M; m++)
        for (size_t n = 0; n < N; n++) {
            double acc = 0.0, amag = 0.0;
            for (size_t k = 0; k < K; k++) {
                double a = c->ta ? A[k * lda + m] : A[m * lda + k];
                double b = c->tb ? B[n * ldb + k] : B[k * ldb + n];
                acc += a * b;
                amag += fabs(a * b);
            }
            double v = c->alpha * acc + c->beta * C0[m * ldc + n];
            mag[m * N + n] = fabs(c->alpha) * amag + fabs(c->beta * C0[m * ldc + n]);
            if (c->epi == EPI_BIAS || c->epi == EPI_BIAS_GELU) v += bias[n];
            if (c->epi == EPI_BIAS_GELU) act_ref[m * N + n] = gelu_ref(v);
            if (c->epi == EPI_GELU_GRAD) v *= gelu_grad_ref(gelu_in[m * ldc + n]);
            ref[m * N + n] = v;
        }

    float *first = NULL, *first_act = NULL;
    float *got = floats(M * N), *got_act = floats(M * N);
    for (int ti = 0; ti < N_THREAD_COUNTS; ti++) {
        set_threads(THREAD_COUNTS[ti]);
        float *C = copy_floats(C0, M * ldc), *act = floats(M * ldc);
        memset(act, 0, M * ldc * sizeof(float));
        Epilogue e = {c->epi, bias, act, gelu_in, gelu_act};
        matmul_epilogue(c->ta, c->tb, M, N, K, c->alpha, A, lda, B, ldb, c->beta, C, ldc, &e);
        for (size_t m = 0; m < M; m++) {
            memcpy(got + m * N, C + m * ldc, N * sizeof(float));
            memcpy(got_act + m * N, act + m * ldc, N * sizeof(float));
            for (size_t n = N; n < ldc; n++) /* the padding is never written */
                CHECK(C[m * ldc + n] == C0[m * ldc + n] && act[m * ldc + n] == 0.0f,
                      "%s: padding column %zu of row %zu written", c->branch, n, m);
        }
        if (ti == 0) {
            /* float32 sums of K terms: error about sqrt(K) eps of the sum of |terms| */
            double w = 0.0;
            for (size_t i = 0; i < M * N; i++) {
                double tol = 4.0 * EPS32 * sqrt((double)K + 1.0) * (mag[i] + 1.0);
                if (c->epi == EPI_GELU_GRAD) tol *= 1.2;
                double r = fabs(got[i] - ref[i]) / tol;
                if (!(r <= w)) w = r;
                if (c->epi == EPI_BIAS_GELU) {
                    /* gelu' <= 1.13; dl_erff is within 2e-7 absolute */
                    double ra = fabs(got_act[i] - act_ref[i]) / (1.2 * tol + 1e-6 * fabs(ref[i]) + 1e-6);
                    if (!(ra <= w)) w = ra;
                }
            }
            CHECK(w <= 1.0, "matmul %s (%zu x %zu x %zu, ta %d tb %d): error %.3g of tolerance",
                  c->branch, M, N, K, c->ta, c->tb, w);
            first = copy_floats(got, M * N);
            first_act = copy_floats(got_act, M * N);
        } else {
            same_bits(c->branch, first, got, M * N, THREAD_COUNTS[ti]);
            same_bits(c->branch, first_act, got_act, M * N, THREAD_COUNTS[ti]);
        }
        free(C);
        free(act);
    }
    free(A), free(B), free(C0), free(bias), free(gelu_in), free(gelu_act), free(ref), free(act_ref),
        free(mag);
    free(got), free(got_act), free(first), free(first_act);
}

/* The case reaches the branch its name says. */
static void check_branch(const MatmulCase *c) {
    MatmulPlan p = matmul_plan(c->M, c->N, c->K, c->epi == EPI_NONE);
    int one = p.mt == 1 && p.nt == 1 && p.kt == 1;
    CHECK(!!strstr(c->branch, "one call") == one, "%s: plan %zu x %zu tiles, %zu K chunks",
          c->branch, p.mt, p.nt, p.kt);
    CHECK(!!strstr(c->branch, "K chunks") == (p.kt > 1), "%s: %zu K chunks", c->branch, p.kt);
    if (strstr(c->branch, "rows")) CHECK(p.mt > 1, "%s: %zu row tiles", c->branch, p.mt);
    if (strstr(c->branch, "columns")) CHECK(p.nt > 1, "%s: %zu column tiles", c->branch, p.nt);
    if (strstr(c->branch, "tiles")) CHECK(p.mt * p.nt > 1, "%s: one tile", c->branch);
}

static void test_matmul(uint64_t *s) {
    size_t n = sizeof(MATMUL_CASES) / sizeof(MATMUL_CASES[0]);
    for (size_t i = 0; i < n; i++) {
        check_branch(&MATMUL_CASES[i]);
        test_matmul_case(&MATMUL_CASES[i], s);
    }
    printf("matmul_epilogue: %zu shapes (every tile-plan branch) against double precision\n", n);
}

/* The least work items (tiles times K chunks) over the products of one transformer layer
 * (forward, dx, dW of QKV, attention out, FFN up and down) at M token rows; every product
 * must offer at least `want`. */
static size_t layer_plan_least(const char *preset, size_t M, size_t H, size_t F, size_t want) {
    const size_t layer[][2] = {{H, 3 * H}, {H, H}, {H, F}, {F, H}}; /* in, out */
    size_t least = (size_t)-1;
    for (size_t i = 0; i < 4; i++) {
        size_t in = layer[i][0], out = layer[i][1];
        MatmulPlan p[3] = {matmul_plan(M, out, in, 0),  /* y = x W^T + b */
                           matmul_plan(M, in, out, 1),  /* dx = dy W */
                           matmul_plan(out, in, M, 1)}; /* dW += dy^T x */
        for (int j = 0; j < 3; j++) {
            size_t items = p[j].mt * p[j].nt * p[j].kt;
            CHECK(items >= want, "%s layer product %zu -> %zu (%d): %zu work items", preset, in, out, j,
                  items);
            if (items < least) least = items;
        }
    }
    return least;
}

/* The plan scales with the thread count: at DiffuSeq base's shapes (B 16 x L 128 rows,
 * H 768, FFN 3072) every product of a transformer layer (12 layers, 94% of the
 * multiply-adds of a step's products outside attention) offers at least 64 independent
 * work items. The tied head (V 30522, E 128, in float32 chunks of 128 rows) has K = 128 on
 * two of its products, whose tiles need more outputs to pay for a call: at least 16.
 * Mid-sized products split too: at the tiny preset's shapes (the built-in task: B 64 x
 * L 32 rows, H 64, FFN 256; 2^23-2^25 multiply-adds a product) every layer product offers
 * at least 4 (with tiles of 2^24 alone, most were one tile and 2 threads ran the step 1.3x
 * faster than 1). */
static void test_matmul_plan_scales(void) {
    const size_t E = 128, V = 30522, R = 128;
    size_t least = layer_plan_least("base", 16 * 128, 768, 3072, 64), head_least = (size_t)-1;
    MatmulPlan head[3] = {matmul_plan(R, V, E, 0), matmul_plan(R, E, V, 1), matmul_plan(V, E, R, 1)};
    for (int j = 0; j < 3; j++) {
        size_t items = head[j].mt * head[j].nt * head[j].kt;
        CHECK(items >= 16, "tied head product %d: %zu work items", j, items);
        head_least = items < head_least ? items : head_least;
    }
    size_t tiny_least = layer_plan_least("tiny", 64 * 32, 64, 256, 4);
    printf("matmul_plan: every layer product offers >= %zu work items at base shapes (the "
           "head's >= %zu), >= %zu at tiny shapes\n", least, head_least, tiny_least);
}

/* ---- layernorm -------------------------------------------------------------------- */

/* out = LN(x) w + bias over rows of C, in double; returns sum(out * g). */
static double layernorm_ref(double *out, const double *x, const double *w, const double *b,
                            const double *g, size_t M, size_t C, double eps) {
    double loss = 0.0;
    for (size_t m = 0; m < M; m++) {
        const double *r = x + m * C;
        double mu = 0.0, var = 0.0;
        for (size_t c = 0; c < C; c++) mu += r[c];
        mu /= (double)C;
        for (size_t c = 0; c < C; c++) var += (r[c] - mu) * (r[c] - mu);
        double rs = 1.0 / sqrt(var / (double)C + eps);
        for (size_t c = 0; c < C; c++) {
            double o = (r[c] - mu) * rs * w[c] + b[c];
            if (out) out[m * C + c] = o;
            loss += o * g[m * C + c];
        }
    }
    return loss;
}

/* Central differences of `loss(v)` for entry i of v (double, so h can be small). */
#define CENTRAL_DIFF(v, i, h, loss_expr)        \
    ({                                          \
        double v0_ = (v)[i];                    \
        (v)[i] = v0_ + (h);                     \
        double lp_ = (loss_expr);               \
        (v)[i] = v0_ - (h);                     \
        double lm_ = (loss_expr);               \
        (v)[i] = v0_;                           \
        (lp_ - lm_) / (2.0 * (h));              \
    })

static void test_layernorm_shape(size_t M, size_t C, uint64_t *s) {
    const float eps = 1e-5f;
    size_t n = M * C;
    float *a = floats(n), *b = floats(n), *w = floats(C), *bias = floats(C), *g = floats(n);
    fill(a, n, 2.0f, s);
    fill(b, n, 1.0f, s);
    fill(w, C, 0.5f, s);
    fill(bias, C, 0.5f, s);
    fill(g, n, 1.0f, s);
    for (size_t c = 0; c < C; c++) w[c] += 1.0f;
    float *dw0 = floats(C), *db0 = floats(C); /* gradients accumulate onto these */
    fill(dw0, C, 1.0f, s);
    fill(db0, C, 1.0f, s);

    double *xd = doubles(n), *wd = doubles(C), *bd = doubles(C), *gd = doubles(n);
    double *out_ref = doubles(n), *dx_ref = doubles(n), *dw_ref = doubles(C), *db_ref = doubles(C);
    for (size_t i = 0; i < n; i++) xd[i] = (double)(a[i] + b[i]), gd[i] = g[i];
    for (size_t c = 0; c < C; c++) wd[c] = w[c], bd[c] = bias[c];
    layernorm_ref(out_ref, xd, wd, bd, gd, M, C, eps);
    /* rows are independent: differences of one row's loss give that row's dx */
    for (size_t m = 0; m < M; m++)
        for (size_t c = 0; c < C; c++)
            dx_ref[m * C + c] = CENTRAL_DIFF(xd + m * C, c, 1e-6,
                                             layernorm_ref(NULL, xd + m * C, wd, bd, gd + m * C, 1, C, eps));
    for (size_t c = 0; c < C; c++) {
        dw_ref[c] = dw0[c] + CENTRAL_DIFF(wd, c, 1e-6, layernorm_ref(NULL, xd, wd, bd, gd, M, C, eps));
        db_ref[c] = db0[c] + CENTRAL_DIFF(bd, c, 1e-6, layernorm_ref(NULL, xd, wd, bd, gd, M, C, eps));
    }

    float *out = floats(n), *res = floats(n), *mean = floats(M), *rstd = floats(M), *dx = floats(n);
    float *first = floats(2 * n + 2 * C);
    for (int ti = 0; ti < N_THREAD_COUNTS; ti++) {
        set_threads(THREAD_COUNTS[ti]);
        float *dw = copy_floats(dw0, C), *db = copy_floats(db0, C);
        layernorm_forward(out, res, mean, rstd, a, b, w, bias, M, C, eps);
        layernorm_backward(dx, dw, db, g, res, mean, rstd, w, M, C);
        if (ti == 0) {
            worst("layernorm forward", out, out_ref, n, 1e-5, 1e-5);
            /* float32 statistics and differences of double: agree to ~1e-5 of the scale */
            worst("layernorm dx", dx, dx_ref, n, 1e-4, 1e-4);
            worst("layernorm dw", dw, dw_ref, C, 1e-4, 1e-4 * sqrt((double)M));
            worst("layernorm db", db, db_ref, C, 1e-4, 1e-4 * sqrt((double)M));
            memcpy(first, out, n * sizeof(float));
            memcpy(first + n, dx, n * sizeof(float));
            memcpy(first + 2 * n, dw, C * sizeof(float));
            memcpy(first + 2 * n + C, db, C * sizeof(float));
        } else {
            int t = THREAD_COUNTS[ti];
            same_bits("layernorm forward", first, out, n, t);
            same_bits("layernorm dx", first + n, dx, n, t);
            same_bits("layernorm dw", first + 2 * n, dw, C, t);
            same_bits("layernorm db", first + 2 * n + C, db, C, t);
        }
        free(dw), free(db);
    }
    free(a), free(b), free(w), free(bias), free(g), free(dw0), free(db0), free(xd), free(wd);
    free(bd), free(gd), free(out_ref), free(dx_ref), free(dw_ref), free(db_ref), free(out);
    free(res), free(mean), free(rstd), free(dx), free(first);
}

static void test_layernorm(uint64_t *s) {
    test_layernorm_shape(5, 37, s);     /* a partial column block */
    test_layernorm_shape(1100, 40, s);  /* above DL_PAR_MIN: rows and column blocks in parallel */
    printf("layernorm: forward against double, backward against finite differences\n");
}

/* ---- activations ------------------------------------------------------------------ */

static double silu_ref(double x) { return x / (1.0 + exp(-x)); }

typedef struct {
    const char *name;
    void (*forward)(float *out, const float *x, size_t n);
    void (*backward)(float *dx, const float *x, const float *dout, size_t n);
    int backward_takes_output; /* tanh_backward gets y = tanh(x), not x */
    double (*ref)(double);
    double fwd_rtol, fwd_atol;
} Activation;

/* Forward against double precision, backward against central differences of it, on
 * 8 sub-arrays that start at successive floats: every alignment, so that threads split
 * the vector loops with every possible remainder (above DL_PAR_MIN, so in parallel). */
static void test_activation(const Activation *f, uint64_t *s) {
    size_t n_all = 40008, shifts = 8;
    float *x = floats(n_all), *g = floats(n_all), *y = floats(n_all), *out = floats(n_all);
    float *dx = floats(n_all), *first = floats(2 * n_all);
    double *out_ref = doubles(n_all), *dx_ref = doubles(n_all);
    fill(x, n_all, 6.0f, s);
    fill(g, n_all, 1.0f, s);
    const double h = 1e-5;
    for (size_t i = 0; i < n_all; i++) {
        out_ref[i] = f->ref(x[i]);
        dx_ref[i] = g[i] * (f->ref(x[i] + h) - f->ref(x[i] - h)) / (2.0 * h);
    }
    for (size_t off = 0; off < shifts; off++) {
        size_t n = n_all - off;
        for (int ti = 0; ti < N_THREAD_COUNTS; ti++) {
            set_threads(THREAD_COUNTS[ti]);
            f->forward(out, x + off, n);
            f->forward(y, x + off, n);
            f->backward(dx, f->backward_takes_output ? y : x + off, g + off, n);
            if (ti == 0) {
                char what[64];
                snprintf(what, sizeof what, "%s forward (offset %zu)", f->name, off);
                worst(what, out, out_ref + off, n, f->fwd_rtol, f->fwd_atol);
                snprintf(what, sizeof what, "%s backward (offset %zu)", f->name, off);
                worst(what, dx, dx_ref + off, n, 1e-5, 1e-6);
                memcpy(first, out, n * sizeof(float));
                memcpy(first + n, dx, n * sizeof(float));
            } else {
                char what[64];
                snprintf(what, sizeof what, "%s forward (offset %zu)", f->name, off);
                same_bits(what, first, out, n, THREAD_COUNTS[ti]);
                snprintf(what, sizeof what, "%s backward (offset %zu)", f->name, off);
                same_bits(what, first + n, dx, n, THREAD_COUNTS[ti]);
            }
        }
    }
    free(x), free(g), free(y), free(out), free(dx), free(first), free(out_ref), free(dx_ref);
}

static void test_activations(uint64_t *s) {
    const Activation acts[] = {
        {"gelu", gelu_forward, gelu_backward, 0, gelu_ref, 2e-6, 1e-6},
        {"tanh", tanh_forward, tanh_backward, 1, tanh, 2e-6, 1e-7},
        {"silu", silu_forward, silu_backward, 0, silu_ref, 2e-6, 1e-7},
    };
    for (size_t i = 0; i < sizeof(acts) / sizeof(acts[0]); i++) test_activation(&acts[i], s);
    printf("gelu, tanh, silu: forward against double, backward against finite differences\n");
}

/* ---- softmax attention ------------------------------------------------------------ */

typedef struct {
    size_t B, L, H, A;
    float p;
    uint64_t seed, site;
    size_t base;
} AttShape;

/* Multi-head attention of qkv[B,L,3H] in double with the kernel's dropout mask on the
 * probabilities; ctx (may be NULL) and att (may be NULL) out; returns sum(ctx * g). */
static double attention_ref(double *ctx, double *att, const double *qkv, const double *g,
                            const AttShape *a) {
    size_t B = a->B, L = a->L, H = a->H, A = a->A, d = H / A, ld = 3 * H;
    uint32_t thr = dropout_threshold(a->p);
    double keep = a->p > 0.0f ? 1.0 / (1.0 - (double)a->p) : 1.0, loss = 0.0;
    double *P = doubles(L * L);
    for (size_t b = 0; b < B; b++)
        for (size_t h = 0; h < A; h++) {
            size_t bh = b * A + h;
            const double *q = qkv + b * L * ld + h * d, *k = q + H, *v = q + 2 * H;
            for (size_t i = 0; i < L; i++) {
                double mx = -INFINITY, sum = 0.0;
                for (size_t j = 0; j < L; j++) {
                    double sc = 0.0;
                    for (size_t c = 0; c < d; c++) sc += q[i * ld + c] * k[j * ld + c];
                    P[i * L + j] = sc / sqrt((double)d);
                    mx = P[i * L + j] > mx ? P[i * L + j] : mx;
                }
                for (size_t j = 0; j < L; j++) sum += (P[i * L + j] = exp(P[i * L + j] - mx));
                for (size_t j = 0; j < L; j++) {
                    P[i * L + j] /= sum;
                    if (att) att[bh * L * L + i * L + j] = P[i * L + j];
                    if (a->p > 0.0f)
                        P[i * L + j] *= dropout_keep(a->seed, a->site, a->base + bh * L * L + i * L + j, thr)
                                            ? keep : 0.0;
                }
                for (size_t c = 0; c < d; c++) {
                    double o = 0.0;
                    for (size_t j = 0; j < L; j++) o += P[i * L + j] * v[j * ld + c];
                    if (ctx) ctx[(b * L + i) * H + h * d + c] = o;
                    loss += o * g[(b * L + i) * H + h * d + c];
                }
            }
        }
    free(P);
    return loss;
}

/* Forward against the reference; backward against its finite differences at every
 * `stride`-th entry of qkv. */
static void test_attention_shape(const AttShape *a, size_t stride, uint64_t *s) {
    size_t B = a->B, L = a->L, H = a->H, A = a->A, nqkv = B * L * 3 * H, nctx = B * L * H;
    size_t natt = B * A * L * L;
    float *qkv = floats(nqkv), *g = floats(nctx);
    fill(qkv, nqkv, 1.5f, s);
    fill(g, nctx, 1.0f, s);
    double *qd = doubles(nqkv), *gd = doubles(nctx), *ctx_ref = doubles(nctx), *att_ref = doubles(natt);
    for (size_t i = 0; i < nqkv; i++) qd[i] = qkv[i];
    for (size_t i = 0; i < nctx; i++) gd[i] = g[i];
    attention_ref(ctx_ref, att_ref, qd, gd, a);
    size_t nchecked = (nqkv + stride - 1) / stride;
    double *dq_ref = doubles(nchecked);
    for (size_t i = 0, j = 0; i < nqkv; i += stride, j++)
        dq_ref[j] = CENTRAL_DIFF(qd, i, 1e-6, attention_ref(NULL, NULL, qd, gd, a));

    int max_threads = THREAD_COUNTS[N_THREAD_COUNTS - 1];
    float *scratch = floats((size_t)max_threads * attention_scratch_floats(L, H, A));
    float *ctx = floats(nctx), *att = floats(natt), *dqkv = floats(nqkv), *picked = floats(nchecked);
    float *first = floats(nctx + natt + nqkv);
    for (int ti = 0; ti < N_THREAD_COUNTS; ti++) {
        int t = THREAD_COUNTS[ti];
        set_threads(t);
        attention_forward(ctx, att, qkv, B, L, H, A, a->p, a->seed, a->site, a->base, scratch, t);
        attention_backward(dqkv, g, att, qkv, B, L, H, A, a->p, a->seed, a->site, a->base, scratch, t);
        if (ti == 0) {
            worst("attention context", ctx, ctx_ref, nctx, 1e-5, 1e-5);
            worst("attention probabilities", att, att_ref, natt, 1e-5, 1e-7);
            for (size_t i = 0, j = 0; i < nqkv; i += stride, j++) picked[j] = dqkv[i];
            worst("attention backward", picked, dq_ref, nchecked, 1e-4, 1e-5);
            memcpy(first, ctx, nctx * sizeof(float));
            memcpy(first + nctx, att, natt * sizeof(float));
            memcpy(first + nctx + natt, dqkv, nqkv * sizeof(float));
        } else {
            same_bits("attention context", first, ctx, nctx, t);
            same_bits("attention probabilities", first + nctx, att, natt, t);
            same_bits("attention backward", first + nctx + natt, dqkv, nqkv, t);
        }
    }
    free(qkv), free(g), free(qd), free(gd), free(ctx_ref), free(att_ref), free(dq_ref);
    free(scratch), free(ctx), free(att), free(dqkv), free(picked), free(first);
}

static void test_attention(uint64_t *s) {
    AttShape small = {2, 7, 12, 3, 0.0f, 0, 0, 0};
    AttShape dropped = {2, 7, 12, 3, 0.25f, 11, 5, 98};
    AttShape big = {4, 20, 32, 4, 0.1f, 3, 1, 0}; /* above DL_PAR_MIN: heads in parallel */
    test_attention_shape(&small, 1, s);
    test_attention_shape(&dropped, 1, s);
    test_attention_shape(&big, 37, s);
    printf("attention: forward against double (with dropout), backward against finite differences\n");
}

/* ---- optimiser ------------------------------------------------------------------- */

static void test_optim(uint64_t *s) {
    size_t n = 50000; /* above DL_PAR_MIN */
    const float lr = 1e-2f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, wd = 0.01f;
    float *p0 = floats(n), *g = floats(n);
    fill(p0, n, 1.0f, s);
    fill(g, n, 1.0f, s);
    double *p_ref = doubles(n), *m_ref = doubles(n), *v_ref = doubles(n);
    for (size_t i = 0; i < n; i++) p_ref[i] = p0[i], m_ref[i] = 0.0, v_ref[i] = 0.0;
    for (long step = 1; step <= 3; step++) {
        double bc1 = 1.0 - pow(b1, (double)step), bc2 = 1.0 - pow(b2, (double)step);
        for (size_t i = 0; i < n; i++) {
            double gi = g[i] * (double)step; /* a different gradient each step */
            m_ref[i] = b1 * m_ref[i] + (1.0 - b1) * gi;
            v_ref[i] = b2 * v_ref[i] + (1.0 - b2) * gi * gi;
            p_ref[i] = p_ref[i] * (1.0 - (double)lr * wd) -
                       (lr / bc1) * m_ref[i] / (sqrt(v_ref[i]) / sqrt(bc2) + eps);
        }
    }
    double norm_ref = 0.0;
    for (size_t i = 0; i < n; i++) norm_ref += (double)g[i] * g[i];
    norm_ref = sqrt(norm_ref);

    float *first = NULL;
    for (int ti = 0; ti < N_THREAD_COUNTS; ti++) {
        set_threads(THREAD_COUNTS[ti]);
        float *p = copy_floats(p0, n), *m = floats(n), *v = floats(n), *gs = floats(n);
        memset(m, 0, n * sizeof(float));
        memset(v, 0, n * sizeof(float));
        for (long step = 1; step <= 3; step++) {
            for (size_t i = 0; i < n; i++) gs[i] = g[i] * (float)step;
            adamw_step(p, gs, m, v, n, lr, b1, b2, eps, wd, step);
        }
        double norm = global_norm(g, n);
        float *c = copy_floats(g, n), *e = copy_floats(p0, n);
        clip_by_value(c, n, 0.5f);
        ema_update(e, g, n, 0.75f);
        scale_inplace(gs, n, 0.5f);
        if (ti == 0) {
            worst("adamw parameters", p, p_ref, n, 1e-5, 1e-6);
            worst("adamw first moment", m, m_ref, n, 1e-5, 1e-7);
            worst("adamw second moment", v, v_ref, n, 1e-5, 1e-9);
            CHECK(fabs(norm - norm_ref) <= 1e-10 * norm_ref, "global_norm %.17g, want %.17g", norm, norm_ref);
            size_t bad = 0;
            for (size_t i = 0; i < n; i++) {
                float want_c = g[i] > 0.5f ? 0.5f : (g[i] < -0.5f ? -0.5f : g[i]);
                double want_e = 0.75 * p0[i] + 0.25 * g[i];
                bad += c[i] != want_c || fabs(e[i] - want_e) > 1e-6 || gs[i] != g[i] * 3.0f * 0.5f;
            }
            CHECK(bad == 0, "clip_by_value / ema_update / scale_inplace: %zu wrong entries", bad);
            first = floats(3 * n);
            memcpy(first, p, n * sizeof(float));
            memcpy(first + n, m, n * sizeof(float));
            memcpy(first + 2 * n, v, n * sizeof(float));
        } else {
            same_bits("adamw parameters", first, p, n, THREAD_COUNTS[ti]);
            same_bits("adamw first moment", first + n, m, n, THREAD_COUNTS[ti]);
            same_bits("adamw second moment", first + 2 * n, v, n, THREAD_COUNTS[ti]);
            CHECK(norm == global_norm(g, n), "global_norm depends on the thread count");
        }
        e[7] = NAN, e[100] = INFINITY, e[n - 1] = -INFINITY;
        CHECK(count_nonfinite(e, n) == 3, "count_nonfinite: %zu, want 3", count_nonfinite(e, n));
        free(p), free(m), free(v), free(gs), free(c), free(e);
    }
    free(p0), free(g), free(p_ref), free(m_ref), free(v_ref), free(first);
    printf("optimiser: AdamW (3 steps), global norm, clipping, EMA, scaling against double\n");
}

/* ---- the whole model -------------------------------------------------------------- */

typedef struct {
    const char *name;
    ModelDims d;
    size_t B, L;
    int finite_differences; /* check a directional derivative (small models only) */
} ModelCase;

static int model_create(Model *m, const ModelDims *d, uint64_t seed) {
    const char *err = NULL;
    int oom = 0;
    memset(m, 0, sizeof(*m));
    if (model_init(m, d, seed, &err, &oom)) {
        CHECK(0, "model_init: %s", err);
        return -1;
    }
    return 0;
}

/* sum(y * gy) + sum(hidden * gh) of an inference forward, in double */
static double model_loss(Model *m, const float *x, const float *t, const float *gy,
                         const float *gh, float *y, size_t B, size_t L) {
    model_forward(m, x, NULL, t, y, B, L, 0, 0, 0, 0);
    const float *hid = model_hidden(m);
    double loss = 0.0;
    for (size_t i = 0; i < B * L * m->d.E; i++) loss += (double)y[i] * gy[i];
    for (size_t i = 0; i < B * L * m->d.H; i++) loss += (double)hid[i] * gh[i];
    return loss;
}

/* The directional derivatives along random u (parameters) and ux (input) against
 * central differences of the float32 forward. */
static void model_finite_differences(const ModelCase *c, Model *m, const float *x, const float *t,
                                     const float *gy, const float *gh, uint64_t *s) {
    size_t B = c->B, L = c->L, nx = B * L * c->d.E, np = m->lay.total;
    float *y = floats(nx), *dx = floats(nx), *u = floats(np), *ux = floats(nx), *xs = floats(nx);
    fill(u, np, 1.0f, s);
    fill(ux, nx, 1.0f, s);
    memset(m->grads, 0, np * sizeof(float));
    model_loss(m, x, t, gy, gh, y, B, L);
    model_backward(m, gy, gh, dx, 1);
    double analytic_p = 0.0, analytic_x = 0.0;
    for (size_t i = 0; i < np; i++) analytic_p += (double)m->grads[i] * u[i];
    for (size_t i = 0; i < nx; i++) analytic_x += (double)dx[i] * ux[i];
    const double h = 1e-3;
    float *p0 = copy_floats(m->params, np);
    double lp, lm;
    for (size_t i = 0; i < np; i++) m->params[i] = p0[i] + (float)h * u[i];
    lp = model_loss(m, x, t, gy, gh, y, B, L);
    for (size_t i = 0; i < np; i++) m->params[i] = p0[i] - (float)h * u[i];
    lm = model_loss(m, x, t, gy, gh, y, B, L);
    memcpy(m->params, p0, np * sizeof(float));
    double numeric_p = (lp - lm) / (2 * h);
    for (size_t i = 0; i < nx; i++) xs[i] = x[i] + (float)h * ux[i];
    lp = model_loss(m, xs, t, gy, gh, y, B, L);
    for (size_t i = 0; i < nx; i++) xs[i] = x[i] - (float)h * ux[i];
    lm = model_loss(m, xs, t, gy, gh, y, B, L);
    double numeric_x = (lp - lm) / (2 * h);
    /* float32 forward passes: differences good to ~1e-3 relative at this step */
    CHECK(fabs(analytic_p - numeric_p) <= 1e-2 * fabs(numeric_p) + 1e-3,
          "model %s: parameter directional derivative %.6g, differences give %.6g", c->name,
          analytic_p, numeric_p);
    CHECK(fabs(analytic_x - numeric_x) <= 1e-2 * fabs(numeric_x) + 1e-3,
          "model %s: input directional derivative %.6g, differences give %.6g", c->name,
          analytic_x, numeric_x);
    free(y), free(dx), free(u), free(ux), free(xs), free(p0);
}

static void test_model_case(const ModelCase *c, uint64_t *s) {
    size_t B = c->B, L = c->L, E = c->d.E, H = c->d.H, V = c->d.V, M = B * L;
    Model m;
    if (model_create(&m, &c->d, 1234)) return;
    size_t np = m.lay.total;
    float *x = floats(M * E), *t = floats(B), *gy = floats(M * E), *gh = floats(M * H);
    float *logit_grad = floats(M * V);
    fill(x, M * E, 1.0f, s);
    fill(gy, M * E, 1.0f, s);
    fill(gh, M * H, 0.5f, s);
    fill(logit_grad, M * V, 0.1f, s);
    for (size_t b = 0; b < B; b++) t[b] = (float)((rng_next(s) >> 11) % 2000);

    /* per thread count: y, hidden, dx, logits, dh, then the gradients */
    size_t nout = M * E + M * H + M * E + M * V + M * E + np;
    float *out = floats(nout), *first = floats(nout);
    for (int ti = 0; ti < N_THREAD_COUNTS; ti++) {
        int threads = THREAD_COUNTS[ti];
        set_threads(threads);
        const char *err = NULL;
        int oom = 0;
        if (model_reserve(&m, B, L, &err, &oom)) {
            CHECK(0, "model %s: model_reserve: %s", c->name, err);
            break;
        }
        memset(m.grads, 0, np * sizeof(float));
        float *y = out, *hid = y + M * E, *dx = hid + M * H, *logits = dx + M * E;
        float *dh = logits + M * V, *grads = dh + M * E;
        model_forward(&m, x, NULL, t, y, B, L, 1, 99, 3, 0); /* training: dropout on */
        memcpy(hid, model_hidden(&m), M * H * sizeof(float));
        model_backward(&m, gy, gh, dx, 1);
        model_logits(&m, y, logits, M, 0);
        model_logits_backward(&m, y, logit_grad, dh, M, 0);
        memcpy(grads, m.grads, np * sizeof(float));
        CHECK(count_nonfinite(out, nout) == 0, "model %s: %zu non-finite outputs or gradients at %d threads",
              c->name, count_nonfinite(out, nout), threads);
        if (ti == 0) {
            /* every parameter tensor gets a gradient: the largest |g| of the buffer's
             * first and last tensor (word embedding, last bias) is not zero */
            float g_first = 0.0f, g_last = 0.0f;
            for (size_t i = 0; i < V * E; i++) g_first = fmaxf(g_first, fabsf(grads[i]));
            for (size_t i = np - (E != H ? E : H); i < np; i++) g_last = fmaxf(g_last, fabsf(grads[i]));
            CHECK(g_first > 0.0f && g_last > 0.0f, "model %s: zero gradient (%g, %g)", c->name,
                  g_first, g_last);
            memcpy(first, out, nout * sizeof(float));
        } else {
            same_bits(c->name, first, out, nout, threads);
        }
    }
    if (c->finite_differences) {
        set_threads(THREAD_COUNTS[N_THREAD_COUNTS - 1]);
        model_finite_differences(c, &m, x, t, gy, gh, s);
    }
    model_free(&m);
    free(x), free(t), free(gy), free(gh), free(logit_grad), free(out), free(first);
}

static void test_model(uint64_t *s) {
    /* V, E, H, N, A, F, Dt, P, dropout, ln_eps */
    const ModelCase cases[] = {
        {"E != H, small", {50, 16, 24, 2, 3, 40, 16, 20, 0.1f, 1e-12f}, 3, 12, 1},
        {"E == H, odd time_dim", {37, 20, 20, 2, 4, 36, 15, 16, 0.1f, 1e-12f}, 2, 10, 1},
        /* M = 1024 rows: the products split rows and the weight gradients split K */
        {"E != H, 1024 rows", {64, 32, 64, 2, 4, 128, 16, 64, 0.1f, 1e-12f}, 16, 64, 0},
    };
    size_t n = sizeof(cases) / sizeof(cases[0]);
    for (size_t i = 0; i < n; i++) test_model_case(&cases[i], s);
    printf("model: %zu configurations, forward + backward + logits (training, dropout), "
           "directional derivatives of the small ones\n", n);
}

/* WordPiece encoding and decoding (text.c) on a small vocabulary; the expected ids and
 * texts are those of tokenizers and Tokenizer.decode (tests/test_textio.py compares the
 * two on many more). */
static void test_text(void) {
    static const char *tokens[] = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "##b",
                                   "ab",    "!",     "'",     "s",     "n",      "##t", "x"};
    enum { N_TOKENS = sizeof tokens / sizeof tokens[0] };
    char bytes[64];
    size_t offsets[N_TOKENS + 1] = {0};
    for (size_t i = 0; i < N_TOKENS; i++) {
        memcpy(bytes + offsets[i], tokens[i], strlen(tokens[i]));
        offsets[i + 1] = offsets[i] + strlen(tokens[i]);
    }
    const int32_t specials[] = {0, 1, 2, 3, 4};
    WordPieceVocab v;
    CHECK(wp_vocab_init(&v, bytes, offsets, N_TOKENS, 1, specials, 5) == 0, "wp_vocab_init");
    for (size_t i = 0; i < N_TOKENS; i++)
        CHECK(wp_lookup(&v, "", 0, tokens[i], strlen(tokens[i])) == (int32_t)i, "lookup %s", tokens[i]);
    CHECK(wp_lookup(&v, "##", 2, "b", 1) == 6 && wp_lookup(&v, "##", 2, "a", 1) == -1, "prefixed lookup");

    char long_word[102];
    memset(long_word, 'a', 101);
    long_word[101] = 0;
    const struct { const char *text; size_t n; int32_t ids[4]; } encodings[] = {
        {"AB!", 2, {7, 8}},  {"abb", 2, {7, 6}},          {"a\001b", 1, {7}},
        {"ac", 1, {1}},      {"x[UNK]a", 3, {13, 1, 5}}, {"[MASK][mask]", 4, {4, 1, 1, 1}},
        {"", 0, {0}},        {"a\tab", 2, {5, 7}},        {long_word, 1, {1}},
    };
    for (size_t c = 0; c < sizeof encodings / sizeof encodings[0]; c++) {
        size_t n = strlen(encodings[c].text);
        int32_t *ids = malloc((n + 1) * sizeof *ids);
        char *scratch = malloc(n + 1);
        size_t count = wp_encode_ascii(&v, encodings[c].text, n, ids, scratch);
        int same = count == encodings[c].n;
        for (size_t i = 0; same && i < count; i++) same = ids[i] == encodings[c].ids[i];
        CHECK(same, "encode case %zu: %zu ids", c, count);
        free(ids);
        free(scratch);
    }

    static const struct { int64_t ids[6]; size_t n; const char *text; } decodings[] = {
        {{2, 5, 6, 8, 3, 0}, 6, "ab!"}, {{5, 9, 10}, 3, "a's"}, {{9, 9, 9}, 3, "'''"},
        {{11, 12}, 2, "nt"},           {{0}, 0, ""},           {{0, 0}, 2, ""},
        {{13, 9, 9, 10}, 4, "x'' s"},
    };
    for (size_t c = 0; c < sizeof decodings / sizeof decodings[0]; c++) {
        char out[64];
        size_t len = wp_decode(&v, decodings[c].ids, decodings[c].n, out);
        CHECK(len == strlen(decodings[c].text) && !memcmp(out, decodings[c].text, len), "decode case %zu: %.*s",
              c, (int)len, out);
    }
    wp_vocab_free(&v);
}

int main(void) {
    scipy_openblas_set_num_threads(1); /* as dlmone._core does: OpenMP splits the products */
    uint64_t s = 20240611;
#ifdef _OPENMP
    printf("OpenMP: results compared at 1, 2, 3, 4 and 8 threads\n");
#else
    printf("built without OpenMP: one thread only\n");
#endif
    test_matmul(&s);
    test_matmul_plan_scales();
    test_layernorm(&s);
    test_activations(&s);
    test_attention(&s);
    test_optim(&s);
    test_model(&s);
    test_text();
    if (failures) {
        printf("%d check(s) failed\n", failures);
        return 1;
    }
    printf("all checks passed\n");
    return 0;
}
