/* DiffuSeq TransformerNetModel forward and backward (SPEC §3). */
#include "model.h"
#include "amx.h"
#include "kernels.h"

/* Dropout sites: 0 after the embedding LayerNorm, then three per layer. */
#define SITE_EMB 0
#define SITE_ATT(l) (1 + 3 * (uint64_t)(l))
#define SITE_AO(l) (2 + 3 * (uint64_t)(l))
#define SITE_FO(l) (3 + 3 * (uint64_t)(l))

typedef struct {
    size_t pos;
    int overflow;
} Cursor;

static size_t take(Cursor *c, size_t a, size_t b) {
    size_t n, off = c->pos;
    if (!dl_mul(a, b, &n) || c->pos + n < c->pos) c->overflow = 1;
    else c->pos += n;
    return off;
}

int model_layout(const ModelDims *d, ParamLayout *lay, const char **err) {
    if (!d->V || !d->E || !d->H || !d->N || !d->A || !d->F || !d->Dt || !d->P) {
        *err = "every size must be positive";
        return -1;
    }
    if (d->H % d->A) {
        *err = "hidden_dim must be divisible by num_heads";
        return -1;
    }
    if (d->Dt < 2) {
        *err = "time_dim must be at least 2";
        return -1;
    }
    size_t V = d->V, E = d->E, H = d->H, F = d->F, T4 = 4 * d->Dt;
    Cursor c = {0, 0};
    memset(lay, 0, sizeof(*lay));
    lay->word_emb = take(&c, V, E);
    lay->lm_bias = take(&c, V, 1);
    lay->te0_w = take(&c, T4, d->Dt);
    lay->te0_b = take(&c, T4, 1);
    lay->te2_w = take(&c, H, T4);
    lay->te2_b = take(&c, H, 1);
    if (E != H) {
        lay->up0_w = take(&c, H, E);
        lay->up0_b = take(&c, H, 1);
        lay->up2_w = take(&c, H, H);
        lay->up2_b = take(&c, H, 1);
    }
    lay->pos = take(&c, d->P, H);
    lay->ln_w = take(&c, H, 1);
    lay->ln_b = take(&c, H, 1);
    lay->layers = calloc(d->N, sizeof(LayerParams));
    if (!lay->layers) {
        *err = "out of memory";
        return -1;
    }
    for (size_t l = 0; l < d->N; l++) {
        LayerParams *p = &lay->layers[l];
        p->qkv_w = take(&c, 3 * H, H);
        p->qkv_b = take(&c, 3 * H, 1);
        p->ao_w = take(&c, H, H);
        p->ao_b = take(&c, H, 1);
        p->ln1_w = take(&c, H, 1);
        p->ln1_b = take(&c, H, 1);
        p->fi_w = take(&c, F, H);
        p->fi_b = take(&c, F, 1);
        p->fo_w = take(&c, H, F);
        p->fo_b = take(&c, H, 1);
        p->ln2_w = take(&c, H, 1);
        p->ln2_b = take(&c, H, 1);
    }
    if (E != H) {
        lay->down0_w = take(&c, H, H);
        lay->down0_b = take(&c, H, 1);
        lay->down2_w = take(&c, E, H);
        lay->down2_b = take(&c, E, 1);
    }
    lay->total = c.pos;
    if (c.overflow || c.pos > ((size_t)1 << 40)) {
        free(lay->layers);
        lay->layers = NULL;
        *err = "sizes too large: the parameter buffer would overflow";
        return -1;
    }
    return 0;
}

int model_reserve(Model *m, size_t B, size_t L, const char **err) {
    const ModelDims *d = &m->d;
    size_t E = d->E, H = d->H, F = d->F, N = d->N, M, MH;
    if (!dl_mul(B, L, &M) || !dl_mul(M, H * 4 + F + E, &MH) || M > (size_t)1 << 31 ||
        !dl_mul(M, F > 3 * H ? F : 3 * H, &MH)) {
        *err = "batch too large: activation sizes overflow";
        return -1;
    }
    Cursor c = {0, 0};
    Activations a;
    memset(&a, 0, sizeof(a));
    size_t o_x = take(&c, M, E), o_tsin = take(&c, B, d->Dt), o_tep = take(&c, B, 4 * d->Dt),
           o_tea = take(&c, B, 4 * d->Dt), o_temb = take(&c, B, H);
    size_t o_upp = 0, o_upa = 0, o_up = 0, o_dp = 0, o_da = 0;
    if (E != H) {
        o_upp = take(&c, M, H);
        o_upa = take(&c, M, H);
        o_up = take(&c, M, H);
    }
    size_t o_er = take(&c, M, H), o_m0 = take(&c, M, 1), o_r0 = take(&c, M, 1),
           o_h0 = take(&c, M, H);
    size_t *lo = malloc(N * 13 * sizeof(size_t));
    if (!lo) {
        *err = "out of memory";
        return -1;
    }
    for (size_t l = 0; l < N; l++) {
        size_t *o = lo + 13 * l;
        o[0] = take(&c, M, H);               /* res1 */
        o[1] = take(&c, M, 1);               /* mean1 */
        o[2] = take(&c, M, 1);               /* rstd1 */
        o[3] = take(&c, M, H);               /* ln1 */
        o[4] = take(&c, M, 3 * H);           /* qkv */
        o[5] = take(&c, B * d->A, L * L);    /* att */
        o[6] = take(&c, M, H);               /* ctx */
        o[7] = take(&c, M, F);               /* ff_pre */
        o[8] = take(&c, M, F);               /* ff_act */
        o[9] = take(&c, M, H);               /* res2 */
        o[10] = take(&c, M, 1);              /* mean2 */
        o[11] = take(&c, M, 1);              /* rstd2 */
        o[12] = take(&c, M, H);              /* ln2 */
    }
    if (E != H) {
        o_dp = take(&c, M, H);
        o_da = take(&c, M, H);
    }
    size_t big = F > 3 * H ? F : 3 * H;
    size_t o_g1 = take(&c, M, H), o_g2 = take(&c, M, H), o_gb = take(&c, M, big),
           o_gq = take(&c, M, 3 * H), o_gt = take(&c, B, 4 * d->Dt + H);
    int att_threads = dl_max_threads();
    size_t o_as = take(&c, (size_t)att_threads, attention_scratch_floats(L, H, d->A));
    if (c.overflow) {
        free(lo);
        *err = "batch too large: activation sizes overflow";
        return -1;
    }
    if (c.pos > m->work_floats) {
        float *w = malloc(c.pos * sizeof(float));
        if (!w) {
            free(lo);
            *err = "out of memory allocating activations";
            return -1;
        }
        free(m->work);
        m->work = w;
        m->work_floats = c.pos;
    }
    float *w = m->work;
    LayerActs *layers = m->act.layers ? m->act.layers : calloc(N, sizeof(LayerActs));
    if (!layers) {
        free(lo);
        *err = "out of memory";
        return -1;
    }
    a.B = B;
    a.L = L;
    a.x = w + o_x;
    a.tsin = w + o_tsin;
    a.te_pre = w + o_tep;
    a.te_act = w + o_tea;
    a.temb = w + o_temb;
    if (E != H) {
        a.up_pre = w + o_upp;
        a.up_act = w + o_upa;
        a.up = w + o_up;
        a.down_pre = w + o_dp;
        a.down_act = w + o_da;
    }
    a.emb_res = w + o_er;
    a.mean0 = w + o_m0;
    a.rstd0 = w + o_r0;
    a.h0 = w + o_h0;
    for (size_t l = 0; l < N; l++) {
        size_t *o = lo + 13 * l;
        LayerActs *la = &layers[l];
        la->res1 = w + o[0];
        la->mean1 = w + o[1];
        la->rstd1 = w + o[2];
        la->ln1 = w + o[3];
        la->qkv = w + o[4];
        la->att = w + o[5];
        la->ctx = w + o[6];
        la->ff_pre = w + o[7];
        la->ff_act = w + o[8];
        la->res2 = w + o[9];
        la->mean2 = w + o[10];
        la->rstd2 = w + o[11];
        la->ln2 = w + o[12];
    }
    free(lo);
    a.layers = layers;
    a.g1 = w + o_g1;
    a.g2 = w + o_g2;
    a.gbig = w + o_gb;
    a.gqkv = w + o_gq;
    a.gtemb = w + o_gt;
    a.att_scratch = w + o_as;
    a.att_threads = att_threads;
    m->act = a;
    return 0;
}

/* splitmix64 stream for initialisation */
static uint64_t next_u64(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static double next_unit(uint64_t *s) { return ((next_u64(s) >> 11) + 0.5) * (1.0 / 9007199254740992.0); }

static void fill_uniform(float *p, size_t n, float bound, uint64_t *s) {
    for (size_t i = 0; i < n; i++) p[i] = (float)((2.0 * next_unit(s) - 1.0) * bound);
}

static void fill_normal(float *p, size_t n, uint64_t *s) {
    for (size_t i = 0; i < n; i++) {
        double u1 = next_unit(s), u2 = next_unit(s);
        p[i] = (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
    }
}

static void fill_const(float *p, size_t n, float v) {
    for (size_t i = 0; i < n; i++) p[i] = v;
}

/* PyTorch's defaults, as DiffuSeq gets them: Linear U(±1/sqrt(in)) for weight and
 * bias, Embedding N(0,1), LayerNorm (1, 0). */
static void init_linear(float *P, size_t w, size_t b, size_t out, size_t in, uint64_t *s) {
    float bound = 1.0f / sqrtf((float)in);
    fill_uniform(P + w, out * in, bound, s);
    fill_uniform(P + b, out, bound, s);
}

void model_init_params(Model *m, uint64_t seed) {
    const ModelDims *d = &m->d;
    const ParamLayout *L = &m->lay;
    float *P = m->params;
    uint64_t s = seed * 0x2545f4914f6cdd1dULL + 0x1234567ULL;
    size_t E = d->E, H = d->H, F = d->F, T4 = 4 * d->Dt;
    fill_normal(P + L->word_emb, d->V * E, &s);
    fill_uniform(P + L->lm_bias, d->V, 1.0f / sqrtf((float)E), &s);
    init_linear(P, L->te0_w, L->te0_b, T4, d->Dt, &s);
    init_linear(P, L->te2_w, L->te2_b, H, T4, &s);
    if (E != H) {
        init_linear(P, L->up0_w, L->up0_b, H, E, &s);
        init_linear(P, L->up2_w, L->up2_b, H, H, &s);
    }
    fill_normal(P + L->pos, d->P * H, &s);
    fill_const(P + L->ln_w, H, 1.0f);
    fill_const(P + L->ln_b, H, 0.0f);
    for (size_t l = 0; l < d->N; l++) {
        const LayerParams *p = &L->layers[l];
        for (int j = 0; j < 3; j++) /* query, key, value: each its own Linear(H, H) */
            init_linear(P, p->qkv_w + j * H * H, p->qkv_b + j * H, H, H, &s);
        init_linear(P, p->ao_w, p->ao_b, H, H, &s);
        fill_const(P + p->ln1_w, H, 1.0f);
        fill_const(P + p->ln1_b, H, 0.0f);
        init_linear(P, p->fi_w, p->fi_b, F, H, &s);
        init_linear(P, p->fo_w, p->fo_b, H, F, &s);
        fill_const(P + p->ln2_w, H, 1.0f);
        fill_const(P + p->ln2_b, H, 0.0f);
    }
    if (E != H) {
        init_linear(P, L->down0_w, L->down0_b, H, H, &s);
        init_linear(P, L->down2_w, L->down2_b, E, H, &s);
    }
}

void model_free(Model *m) {
    free(m->bf16_w);
    free(m->bf16_x);
    free(m->bf16_offsets);
    free(m->params);
    free(m->grads);
    free(m->work);
    free(m->lay.layers);
    free(m->act.layers);
    memset(m, 0, sizeof(*m));
}

/* Every linear weight of the forward: offset in the parameters, out and in sizes, in
 * a fixed order. Returns the count; fills the arrays when they are not NULL. */
static size_t linear_weights(const Model *m, size_t *off, size_t *out, size_t *in) {
    const ModelDims *d = &m->d;
    const ParamLayout *L = &m->lay;
    size_t n = 0, E = d->E, H = d->H, F = d->F, T4 = 4 * d->Dt;
#define ADD(o, rows, cols)              \
    do {                                \
        if (off) off[n] = (o);          \
        if (out) out[n] = (rows);       \
        if (in) in[n] = (cols);         \
        n++;                            \
    } while (0)
    ADD(L->te0_w, T4, d->Dt);
    ADD(L->te2_w, H, T4);
    if (E != H) {
        ADD(L->up0_w, H, E);
        ADD(L->up2_w, H, H);
        ADD(L->down0_w, H, H);
        ADD(L->down2_w, E, H);
    }
    for (size_t l = 0; l < d->N; l++) {
        ADD(L->layers[l].qkv_w, 3 * H, H);
        ADD(L->layers[l].ao_w, H, H);
        ADD(L->layers[l].fi_w, F, H);
        ADD(L->layers[l].fo_w, H, F);
    }
#undef ADD
    return n;
}

/* Position-weighted sum of the parameter bits: any single changed value changes it. */
static uint64_t params_hash(const Model *m) {
    const uint32_t *w = (const uint32_t *)m->params;
    size_t n = m->lay.total;
    uint64_t h = 0;
#pragma omp parallel for simd reduction(+ : h) schedule(static) if (n > DL_PAR_MIN)
    for (size_t i = 0; i < n; i++) h += (uint64_t)w[i] * (2 * (uint64_t)i + 1);
    return h;
}

int model_prepare_bf16(Model *m, size_t B, size_t L, const char **err) {
    if (!amx_available()) {
        *err = "bf16 inference needs a CPU with AMX-BF16 (Intel Sapphire Rapids or later) "
               "and a kernel that grants AMX state";
        return -1;
    }
    size_t n = linear_weights(m, NULL, NULL, NULL);
    size_t off[n], out[n], in[n], need_x = 0, need_w = 0;
    linear_weights(m, off, out, in);
    for (size_t i = 0; i < n; i++) {
        size_t x = amx_input_size(B * L, in[i]);
        need_x = x > need_x ? x : need_x;
        need_w += amx_packed_weight_size(out[i], in[i]);
    }
    if (need_x > m->bf16_x_size) {
        uint16_t *x = malloc(need_x * sizeof(uint16_t));
        if (!x) {
            *err = "out of memory for the bf16 input buffer";
            return -1;
        }
        free(m->bf16_x);
        m->bf16_x = x;
        m->bf16_x_size = need_x;
    }
    uint64_t h = params_hash(m);
    if (m->bf16_w && h == m->bf16_hash) return 0;
    if (!m->bf16_w) {
        m->bf16_w = malloc(need_w * sizeof(uint16_t));
        m->bf16_offsets = malloc(n * sizeof(size_t));
        if (!m->bf16_w || !m->bf16_offsets) {
            free(m->bf16_w);
            free(m->bf16_offsets);
            m->bf16_w = NULL;
            m->bf16_offsets = NULL;
            *err = "out of memory for the bf16 weights";
            return -1;
        }
    }
    for (size_t i = 0, pos = 0; i < n; i++) {
        m->bf16_offsets[i] = pos;
        amx_pack_weight(m->bf16_w + pos, m->params + off[i], out[i], in[i]);
        pos += amx_packed_weight_size(out[i], in[i]);
    }
    m->bf16_hash = h;
    return 0;
}

/* y = x W^T + b (and act = gelu(y) when act is not NULL), in bf16 when asked. */
static void layer_linear(Model *m, int bf16, float *y, float *act, const float *x, size_t w,
                         size_t b, size_t M, size_t in, size_t out) {
    const float *P = m->params;
    Epilogue e = {act ? EPI_BIAS_GELU : EPI_BIAS, P + b, act, NULL};
    if (!bf16) {
        matmul_epilogue(0, 1, M, out, in, 1.0f, x, in, P + w, in, 0.0f, y, out, &e);
        return;
    }
    size_t n = linear_weights(m, NULL, NULL, NULL), off[n], i = 0;
    linear_weights(m, off, NULL, NULL);
    while (off[i] != w) i++;
    amx_linear(y, x, m->bf16_w + m->bf16_offsets[i], &e, M, in, out, m->bf16_x);
}

static void layer_forward(Model *m, size_t l, const float *x_in, float p, uint64_t seed, int bf16) {
    const ModelDims *d = &m->d;
    const LayerParams *lp = &m->lay.layers[l];
    LayerActs *a = &m->act.layers[l];
    const float *P = m->params;
    size_t B = m->act.B, L = m->act.L, M = B * L, H = d->H, F = d->F;
    layer_linear(m, bf16, a->qkv, NULL, x_in, lp->qkv_w, lp->qkv_b, M, H, 3 * H);
    attention_forward(a->ctx, a->att, a->qkv, B, L, H, d->A, p, seed, SITE_ATT(l),
                      m->last_row0 * d->A * L * L, m->act.att_scratch, m->act.att_threads);
    layer_linear(m, bf16, a->res1, NULL, a->ctx, lp->ao_w, lp->ao_b, M, H, H);
    dropout_apply(a->res1, M * H, p, seed, SITE_AO(l), m->last_row0 * L * H);
    layernorm_forward(a->ln1, a->res1, a->mean1, a->rstd1, a->res1, x_in, P + lp->ln1_w,
                      P + lp->ln1_b, M, H, d->ln_eps);
    layer_linear(m, bf16, a->ff_pre, a->ff_act, a->ln1, lp->fi_w, lp->fi_b, M, H, F);
    layer_linear(m, bf16, a->res2, NULL, a->ff_act, lp->fo_w, lp->fo_b, M, F, H);
    dropout_apply(a->res2, M * H, p, seed, SITE_FO(l), m->last_row0 * L * H);
    layernorm_forward(a->ln2, a->res2, a->mean2, a->rstd2, a->res2, a->ln1, P + lp->ln2_w,
                      P + lp->ln2_b, M, H, d->ln_eps);
}

void model_forward(Model *m, const float *x, const float *t, float *y, size_t B, size_t L,
                   int train, uint64_t seed, size_t row0, int bf16) {
    const ModelDims *d = &m->d;
    const ParamLayout *lay = &m->lay;
    Activations *a = &m->act;
    const float *P = m->params;
    size_t M = B * L, E = d->E, H = d->H, T4 = 4 * d->Dt;
    float p = train ? d->dropout : 0.0f;
    m->last_row0 = row0; /* read by the dropout calls of forward and backward */

    memcpy(a->x, x, M * E * sizeof(float));
    timestep_embedding(a->tsin, t, B, d->Dt);
    layer_linear(m, bf16, a->te_pre, NULL, a->tsin, lay->te0_w, lay->te0_b, B, d->Dt, T4);
    silu_forward(a->te_act, a->te_pre, B * T4);
    layer_linear(m, bf16, a->temb, NULL, a->te_act, lay->te2_w, lay->te2_b, B, T4, H);
    const float *up = a->x;
    if (E != H) {
        layer_linear(m, bf16, a->up_pre, NULL, a->x, lay->up0_w, lay->up0_b, M, E, H);
        tanh_forward(a->up_act, a->up_pre, M * H);
        layer_linear(m, bf16, a->up, NULL, a->up_act, lay->up2_w, lay->up2_b, M, H, H);
        up = a->up;
    }
    const float *pos = P + lay->pos;
#pragma omp parallel for schedule(static) if (M * H > DL_PAR_MIN)
    for (size_t r = 0; r < M; r++) {
        const float *pr = pos + (r % L) * H, *ur = up + r * H, *tr = a->temb + (r / L) * H;
        float *o = a->emb_res + r * H;
#pragma omp simd
        for (size_t c = 0; c < H; c++) o[c] = (pr[c] + ur[c]) + tr[c];
    }
    layernorm_forward(a->h0, a->emb_res, a->mean0, a->rstd0, a->emb_res, NULL, P + lay->ln_w,
                      P + lay->ln_b, M, H, d->ln_eps);
    dropout_apply(a->h0, M * H, p, seed, SITE_EMB, m->last_row0 * L * H);
    const float *h = a->h0;
    for (size_t l = 0; l < d->N; l++) {
        layer_forward(m, l, h, p, seed, bf16);
        h = a->layers[l].ln2;
    }
    if (E != H) {
        layer_linear(m, bf16, a->down_pre, NULL, h, lay->down0_w, lay->down0_b, M, H, H);
        tanh_forward(a->down_act, a->down_pre, M * H);
        layer_linear(m, bf16, y, NULL, a->down_act, lay->down2_w, lay->down2_b, M, H, E);
    } else {
        memcpy(y, h, M * H * sizeof(float));
    }
    m->has_forward = 1;
    m->last_train = train;
    m->last_seed = seed;
    m->last_bf16 = bf16;
}

const float *model_hidden(const Model *m) { return m->act.layers[m->d.N - 1].ln2; }

#define GRAD(off) (pg ? G + (off) : NULL)

/* In: a->g1 = d(layer output). Out: a->g1 = d(layer input). */
static void layer_backward(Model *m, size_t l, const float *x_in, float p, uint64_t seed, int pg) {
    const ModelDims *d = &m->d;
    const LayerParams *lp = &m->lay.layers[l];
    LayerActs *la = &m->act.layers[l];
    Activations *a = &m->act;
    const float *P = m->params;
    float *G = m->grads;
    size_t B = a->B, L = a->L, M = B * L, H = d->H, F = d->F;

    layernorm_backward(a->g2, GRAD(lp->ln2_w), GRAD(lp->ln2_b), a->g1, la->res2, la->mean2,
                       la->rstd2, P + lp->ln2_w, M, H);
    const float *dfo = a->g2;
    if (p > 0.0f) {
        memcpy(a->g1, a->g2, M * H * sizeof(float));
        dropout_apply(a->g1, M * H, p, seed, SITE_FO(l), m->last_row0 * L * H);
        dfo = a->g1;
    }
    linear_backward_gelu(a->gbig, GRAD(lp->fo_w), GRAD(lp->fo_b), dfo, la->ff_act, P + lp->fo_w,
                         la->ff_pre, M, F, H);
    linear_backward(a->g2, GRAD(lp->fi_w), GRAD(lp->fi_b), a->gbig, la->ln1, P + lp->fi_w, M, H,
                    F, 1);
    layernorm_backward(a->g1, GRAD(lp->ln1_w), GRAD(lp->ln1_b), a->g2, la->res1, la->mean1,
                       la->rstd1, P + lp->ln1_w, M, H);
    const float *dao = a->g1;
    if (p > 0.0f) {
        memcpy(a->g2, a->g1, M * H * sizeof(float));
        dropout_apply(a->g2, M * H, p, seed, SITE_AO(l), m->last_row0 * L * H);
        dao = a->g2;
    }
    linear_backward(a->gbig, GRAD(lp->ao_w), GRAD(lp->ao_b), dao, la->ctx, P + lp->ao_w, M, H, H,
                    0);
    attention_backward(a->gqkv, a->gbig, la->att, la->qkv, B, L, H, d->A, p, seed, SITE_ATT(l),
                       m->last_row0 * d->A * L * L, a->att_scratch, a->att_threads);
    linear_backward(a->g1, GRAD(lp->qkv_w), GRAD(lp->qkv_b), a->gqkv, x_in, P + lp->qkv_w, M, H,
                    3 * H, 1);
}

void model_backward(Model *m, const float *dy, const float *dhidden, float *dx, int pg) {
    const ModelDims *d = &m->d;
    const ParamLayout *lay = &m->lay;
    Activations *a = &m->act;
    const float *P = m->params;
    float *G = m->grads;
    size_t B = a->B, L = a->L, M = B * L, E = d->E, H = d->H, T4 = 4 * d->Dt;
    float p = m->last_train ? d->dropout : 0.0f;
    uint64_t seed = m->last_seed;
    const float *hid = model_hidden(m);

    if (E != H) {
        linear_backward(a->g2, GRAD(lay->down2_w), GRAD(lay->down2_b), dy, a->down_act,
                        P + lay->down2_w, M, H, E, 0);
        tanh_backward(a->g2, a->down_act, a->g2, M * H);
        linear_backward(a->g1, GRAD(lay->down0_w), GRAD(lay->down0_b), a->g2, hid,
                        P + lay->down0_w, M, H, H, 0);
    } else {
        memcpy(a->g1, dy, M * H * sizeof(float));
    }
    if (dhidden) {
#pragma omp parallel for simd schedule(static) if (M * H > DL_PAR_MIN)
        for (size_t i = 0; i < M * H; i++) a->g1[i] += dhidden[i];
    }
    for (size_t l = d->N; l-- > 0;) {
        const float *x_in = l ? a->layers[l - 1].ln2 : a->h0;
        layer_backward(m, l, x_in, p, seed, pg);
    }
    dropout_apply(a->g1, M * H, p, seed, SITE_EMB, m->last_row0 * L * H);
    layernorm_backward(a->g2, GRAD(lay->ln_w), GRAD(lay->ln_b), a->g1, a->emb_res, a->mean0,
                       a->rstd0, P + lay->ln_w, M, H);
    if (pg) {
        float *gpos = G + lay->pos;
#pragma omp parallel for schedule(static) if (B * L * H > DL_PAR_MIN)
        for (size_t l = 0; l < L; l++)
            for (size_t b = 0; b < B; b++) {
                const float *g = a->g2 + (b * L + l) * H;
#pragma omp simd
                for (size_t c = 0; c < H; c++) gpos[l * H + c] += g[c];
            }
        float *gt = a->gtemb, *gte = a->gtemb + B * H;
#pragma omp parallel for schedule(static) if (B * L * H > DL_PAR_MIN)
        for (size_t b = 0; b < B; b++) {
            float *o = gt + b * H;
            memset(o, 0, H * sizeof(float));
            for (size_t l = 0; l < L; l++) {
                const float *g = a->g2 + (b * L + l) * H;
#pragma omp simd
                for (size_t c = 0; c < H; c++) o[c] += g[c];
            }
        }
        linear_backward(gte, G + lay->te2_w, G + lay->te2_b, gt, a->te_act, P + lay->te2_w, B, T4,
                        H, 0);
        silu_backward(gte, a->te_pre, gte, B * T4);
        linear_backward(NULL, G + lay->te0_w, G + lay->te0_b, gte, a->tsin, P + lay->te0_w, B,
                        d->Dt, T4, 0);
    }
    if (E != H) {
        linear_backward(a->g1, GRAD(lay->up2_w), GRAD(lay->up2_b), a->g2, a->up_act,
                        P + lay->up2_w, M, H, H, 0);
        tanh_backward(a->g1, a->up_act, a->g1, M * H);
        linear_backward(dx, GRAD(lay->up0_w), GRAD(lay->up0_b), a->g1, a->x, P + lay->up0_w, M, E,
                        H, 0);
    } else if (dx) {
        memcpy(dx, a->g2, M * H * sizeof(float));
    }
}

void model_logits(const Model *m, const float *h, float *out, size_t M) {
    const float *P = m->params;
    linear_forward(out, h, P + m->lay.word_emb, P + m->lay.lm_bias, M, m->d.E, m->d.V);
}

void model_logits_backward(Model *m, const float *h, const float *dlogits, float *dh, size_t M) {
    linear_backward(dh, m->grads + m->lay.word_emb, m->grads + m->lay.lm_bias, dlogits, h,
                    m->params + m->lay.word_emb, M, m->d.E, m->d.V, 0);
}
