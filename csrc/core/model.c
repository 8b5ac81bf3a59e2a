/* DiffuSeq TransformerNetModel forward and backward (SPEC §3). */
#include "model.h"

#include <stdarg.h>

#include "amx.h"
#include "diffusion.h"
#include "kernels.h"

/* Dropout sites: 0 after the embedding LayerNorm, then three per layer. */
#define SITE_EMB 0
#define SITE_ATT(l) (1 + 3 * (uint64_t)(l))
#define SITE_AO(l) (2 + 3 * (uint64_t)(l))
#define SITE_FO(l) (3 + 3 * (uint64_t)(l))

/* Offsets handed out in order from a buffer of `pos` floats so far; sizes are
 * overflow-checked, and with `base` set each take also returns its pointer. */
typedef struct {
    size_t pos;
    int overflow;
    float *base;
} Cursor;

static size_t take(Cursor *c, size_t a, size_t b) {
    size_t n, off = c->pos;
    if (dl_mul_overflows(a, b, &n) || c->pos + n < c->pos) c->overflow = 1;
    else c->pos += n;
    return off;
}

static float *take_ptr(Cursor *c, size_t a, size_t b) {
    size_t off = take(c, a, b);
    return c->base ? c->base + off : NULL;
}

/* ---------- the parameter table ---------- */

/* Fills a ParamLayout; without `fill` it only counts (tensors, Linear layers, floats),
 * which is how param_layout_build sizes the arrays before filling them. */
typedef struct {
    ParamLayout *lay;
    Cursor c;
    int fill;
} TableBuilder;

__attribute__((format(printf, 7, 8))) static void
add_tensor(TableBuilder *tb, size_t off, size_t rows, size_t cols, ParamKind kind, size_t fan_in,
           const char *fmt, ...) {
    ParamLayout *lay = tb->lay;
    if (tb->fill) {
        ParamTensor *t = &lay->tensors[lay->n_tensors];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(t->name, sizeof t->name, fmt, ap);
        va_end(ap);
        t->offset = off;
        t->rows = rows;
        t->cols = cols;
        t->kind = kind;
        t->fan_in = fan_in;
    }
    lay->n_tensors++;
}

static const LinearParams *add_linear_params(TableBuilder *tb, size_t w, size_t b, size_t out,
                                             size_t in) {
    ParamLayout *lay = tb->lay;
    LinearParams *p = NULL;
    if (tb->fill) {
        p = &lay->linear[lay->n_linear];
        *p = (LinearParams){w, b, out, in, lay->n_linear};
    }
    lay->n_linear++;
    return p;
}

/* Linear(in, out) named `prefix`.weight and `prefix`.bias. */
static const LinearParams *add_linear(TableBuilder *tb, const char *prefix, size_t out, size_t in) {
    size_t w = take(&tb->c, out, in), b = take(&tb->c, out, 1);
    add_tensor(tb, w, out, in, PARAM_WEIGHT, in, "%s.weight", prefix);
    add_tensor(tb, b, out, 0, PARAM_BIAS, in, "%s.bias", prefix);
    return add_linear_params(tb, w, b, out, in);
}

static void add_layernorm(TableBuilder *tb, const char *prefix, size_t H, size_t *w, size_t *b) {
    *w = take(&tb->c, H, 1);
    *b = take(&tb->c, H, 1);
    add_tensor(tb, *w, H, 0, PARAM_LN_WEIGHT, 0, "%s.weight", prefix);
    add_tensor(tb, *b, H, 0, PARAM_LN_BIAS, 0, "%s.bias", prefix);
}

static void build_table(const ModelDims *d, TableBuilder *tb) {
    ParamLayout *lay = tb->lay;
    size_t V = d->V, E = d->E, H = d->H, F = d->F, T4 = 4 * d->Dt;
    char prefix[DL_PARAM_NAME_MAX];
    lay->word_emb = take(&tb->c, V, E);
    add_tensor(tb, lay->word_emb, V, E, PARAM_EMBEDDING, 0, "word_embedding.weight");
    lay->lm_bias = take(&tb->c, V, 1);
    add_tensor(tb, lay->lm_bias, V, 0, PARAM_BIAS, E, "lm_head.bias");
    lay->te0 = add_linear(tb, "time_embed.0", T4, d->Dt);
    lay->te2 = add_linear(tb, "time_embed.2", H, T4);
    size_t in = d->self_cond ? 2 * E : E; /* the input's channels: x_t (and x0_self_cond) */
    if (E != H) {
        lay->up0 = add_linear(tb, "input_up_proj.0", H, in);
        lay->up2 = add_linear(tb, "input_up_proj.2", H, H);
    } else if (d->self_cond) { /* DiffuSeq has no input projection to grow when E == H */
        lay->sc_proj = add_linear(tb, "self_cond_proj", H, in);
    }
    lay->pos = take(&tb->c, d->P, H);
    add_tensor(tb, lay->pos, d->P, H, PARAM_EMBEDDING, 0, "position_embeddings.weight");
    add_layernorm(tb, "LayerNorm", H, &lay->ln_w, &lay->ln_b);
    for (size_t l = 0; l < d->N; l++) {
        size_t pos0 = tb->c.pos, tensors0 = lay->n_tensors, linear0 = lay->n_linear;
        LayerParams lp;
        /* query, key and value are separate Linear(H, H) tensors stored as one product */
        static const char *qkv[3] = {"query", "key", "value"};
        size_t w = take(&tb->c, 3 * H, H), b = take(&tb->c, 3 * H, 1);
        for (int j = 0; j < 3; j++) {
            add_tensor(tb, w + j * H * H, H, H, PARAM_WEIGHT, H,
                       "input_transformers.layer.%zu.attention.self.%s.weight", l, qkv[j]);
            add_tensor(tb, b + j * H, H, 0, PARAM_BIAS, H,
                       "input_transformers.layer.%zu.attention.self.%s.bias", l, qkv[j]);
        }
        lp.qkv = add_linear_params(tb, w, b, 3 * H, H);
#define LAYER_PREFIX(s) (snprintf(prefix, sizeof prefix, "input_transformers.layer.%zu." s, l), prefix)
        lp.ao = add_linear(tb, LAYER_PREFIX("attention.output.dense"), H, H);
        add_layernorm(tb, LAYER_PREFIX("attention.output.LayerNorm"), H, &lp.ln1_w, &lp.ln1_b);
        lp.fi = add_linear(tb, LAYER_PREFIX("intermediate.dense"), F, H);
        lp.fo = add_linear(tb, LAYER_PREFIX("output.dense"), H, F);
        add_layernorm(tb, LAYER_PREFIX("output.LayerNorm"), H, &lp.ln2_w, &lp.ln2_b);
#undef LAYER_PREFIX
        if (tb->fill) {
            lay->layers[l] = lp;
        } else { /* every layer has layer 0's sizes: count the other N-1 at once */
            size_t more, n = d->N - 1;
            if (dl_mul_overflows(tb->c.pos - pos0, n, &more) || tb->c.pos + more < tb->c.pos) {
                tb->c.overflow = 1;
            } else {
                tb->c.pos += more;
                lay->n_tensors += n * (lay->n_tensors - tensors0);
                lay->n_linear += n * (lay->n_linear - linear0);
            }
            break;
        }
    }
    if (E != H) {
        lay->down0 = add_linear(tb, "output_down_proj.0", H, H);
        lay->down2 = add_linear(tb, "output_down_proj.2", E, H);
    }
    if (d->mask_emb) { /* last, so that every other tensor initialises as without it */
        lay->mask_emb = take(&tb->c, E, 1);
        add_tensor(tb, lay->mask_emb, E, 0, PARAM_EMBEDDING, 0, "mask_embedding");
    }
    lay->total = tb->c.pos;
}

/* Checks the dims and counts the table into *counts (no arrays). 0, or -1 with *err. */
static int count_table(const ModelDims *d, ParamLayout *counts, const char **err) {
    memset(counts, 0, sizeof(*counts));
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
    /* the widths of the products (and their leading dimensions) reach 32-bit BLAS */
    if (d->V > DL_BLAS_MAX || d->E > DL_BLAS_MAX / 2 || d->H > DL_BLAS_MAX / 3 ||
        d->F > DL_BLAS_MAX || d->Dt > DL_BLAS_MAX / 4) {
        *err = "sizes too large: vocab_size, 2*emb_dim, 3*hidden_dim, ffn_dim and 4*time_dim "
               "must be at most 2^31-1 (32-bit BLAS)";
        return -1;
    }
    TableBuilder tb = {counts, {0, 0, NULL}, 0};
    build_table(d, &tb);
    if (tb.c.overflow || counts->total > DL_MAX_FLOATS) {
        *err = "sizes too large: more than 2^40 parameters";
        return -1;
    }
    return 0;
}

int model_dims_check(const ModelDims *d, const char **err) {
    ParamLayout counts;
    return count_table(d, &counts, err);
}

int param_layout_build(const ModelDims *d, ParamLayout *lay, const char **err, int *oom) {
    ParamLayout counts;
    memset(lay, 0, sizeof(*lay));
    *oom = 0;
    if (count_table(d, &counts, err)) return -1;
    ParamTensor *tensors = calloc(counts.n_tensors, sizeof(ParamTensor));
    LinearParams *linear = calloc(counts.n_linear, sizeof(LinearParams));
    LayerParams *layers = calloc(d->N, sizeof(LayerParams));
    lay->tensors = tensors;
    lay->linear = linear;
    lay->layers = layers;
    if (!tensors || !linear || !layers) {
        param_layout_free(lay);
        *err = "out of memory for the parameter table";
        *oom = 1;
        return -1;
    }
    TableBuilder tb = {lay, {0, 0, NULL}, 1};
    build_table(d, &tb);
    return 0;
}

void param_layout_free(ParamLayout *lay) {
    free(lay->tensors);
    free(lay->linear);
    free(lay->layers);
    memset(lay, 0, sizeof(*lay));
}

/* ---------- the activation workspace ---------- */

/* Takes every activation buffer from c in workspace order; with c->base set (and
 * a->layers holding N entries) the pointers land in a. The backward scratch comes
 * last: *forward_floats is what precedes it. */
static void plan_workspace(const ModelDims *d, size_t B, size_t L, int threads, Cursor *c,
                           Activations *a, size_t *forward_floats) {
    size_t E = d->E, H = d->H, F = d->F, T4 = 4 * d->Dt, M = 0, big = F > 3 * H ? F : 3 * H;
    if (dl_mul_overflows(B, L, &M)) c->overflow = 1;
    a->B = B;
    a->L = L;
    a->x = take_ptr(c, M, d->self_cond ? 2 * E : E);
    a->tsin = take_ptr(c, B, d->Dt);
    a->te_pre = take_ptr(c, B, T4);
    a->te_act = take_ptr(c, B, T4);
    a->temb = take_ptr(c, B, H);
    if (E != H) {
        a->up_pre = take_ptr(c, M, H);
        a->up_act = take_ptr(c, M, H);
    }
    if (E != H || d->self_cond) a->up = take_ptr(c, M, H);
    a->emb_res = take_ptr(c, M, H);
    a->mean0 = take_ptr(c, M, 1);
    a->rstd0 = take_ptr(c, M, 1);
    a->h0 = take_ptr(c, M, H);
    size_t heads, att_floats = 0; /* att[B, A, L, L] */
    if (dl_mul_overflows(B, d->A, &heads) || dl_mul_overflows(heads, L * L, &att_floats))
        c->overflow = 1;
    for (size_t l = 0; l < d->N; l++) {
        size_t pos0 = c->pos;
        LayerActs la;
        la.res1 = take_ptr(c, M, H);
        la.mean1 = take_ptr(c, M, 1);
        la.rstd1 = take_ptr(c, M, 1);
        la.ln1 = take_ptr(c, M, H);
        la.qkv = take_ptr(c, M, 3 * H);
        la.att = take_ptr(c, att_floats, 1);
        la.ctx = take_ptr(c, M, H);
        la.ff_pre = take_ptr(c, M, F);
        la.ff_act = take_ptr(c, M, F);
        la.res2 = take_ptr(c, M, H);
        la.mean2 = take_ptr(c, M, 1);
        la.rstd2 = take_ptr(c, M, 1);
        la.ln2 = take_ptr(c, M, H);
        if (c->base) {
            a->layers[l] = la;
        } else { /* every layer has layer 0's sizes: count the other N-1 at once */
            size_t more;
            if (dl_mul_overflows(c->pos - pos0, d->N - 1, &more) || c->pos + more < c->pos)
                c->overflow = 1;
            else
                c->pos += more;
            break;
        }
    }
    if (E != H) {
        a->down_pre = take_ptr(c, M, H);
        a->down_act = take_ptr(c, M, H);
    }
    a->att_threads = threads;
    a->att_scratch = take_ptr(c, (size_t)threads, attention_scratch_floats(L, H, d->A));
    *forward_floats = c->pos;
    a->g1 = take_ptr(c, M, H);
    a->g2 = take_ptr(c, M, H);
    a->gbig = take_ptr(c, M, big);
    a->gqkv = take_ptr(c, M, 3 * H);
    a->gtemb = take_ptr(c, B, T4 + H);
}

int model_workspace_floats(const ModelDims *d, size_t B, size_t L, int threads, size_t *total,
                           size_t *forward, const char **err) {
    size_t M;
    /* B*L rows (and, in the weight gradients, the K of a product) reach 32-bit BLAS */
    if (dl_mul_overflows(B, L, &M) || M > DL_BLAS_MAX) {
        *err = "batch too large: batch*length must be at most 2^31-1 (32-bit BLAS)";
        return -1;
    }
    Cursor c = {0, 0, NULL};
    Activations a;
    memset(&a, 0, sizeof(a));
    plan_workspace(d, B, L, threads, &c, &a, forward);
    if (c.overflow || c.pos > DL_MAX_FLOATS) {
        *err = "batch too large: the activations would take more than 2^40 floats";
        return -1;
    }
    *total = c.pos;
    return 0;
}

int model_reserve(Model *m, size_t B, size_t L, const char **err, int *oom) {
    const ModelDims *d = &m->d;
    size_t need, forward;
    int threads = dl_max_threads();
    *oom = 0;
    if (model_workspace_floats(d, B, L, threads, &need, &forward, err)) return -1;
    if (!m->act.layers) {
        m->act.layers = calloc(d->N, sizeof(LayerActs));
        if (!m->act.layers) goto out_of_memory;
    }
    if (need > m->work_floats) {
        float *w = malloc(need * sizeof(float));
        if (!w) goto out_of_memory;
        free(m->work);
        m->work = w;
        m->work_floats = need;
    }
    Cursor c = {0, 0, m->work};
    plan_workspace(d, B, L, threads, &c, &m->act, &forward);
    return 0;
out_of_memory:
    *err = "out of memory allocating activations";
    *oom = 1;
    return -1;
}

/* ---------- initialisation ---------- */

/* splitmix64 stream for initialisation */
static uint64_t next_u64(uint64_t *s) { return dl_mix64(*s += 0x9e3779b97f4a7c15ULL); }

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

/* Every tensor in table order from one stream, as its kind says. */
static void init_params(Model *m, uint64_t seed) {
    uint64_t s = seed * 0x2545f4914f6cdd1dULL + 0x1234567ULL;
    for (size_t i = 0; i < m->lay.n_tensors; i++) {
        const ParamTensor *t = &m->lay.tensors[i];
        float *p = m->params + t->offset;
        size_t n = t->rows * (t->cols ? t->cols : 1);
        switch (t->kind) {
        case PARAM_WEIGHT:
        case PARAM_BIAS: fill_uniform(p, n, 1.0f / sqrtf((float)t->fan_in), &s); break;
        case PARAM_LN_WEIGHT: fill_const(p, n, 1.0f); break;
        case PARAM_LN_BIAS: fill_const(p, n, 0.0f); break;
        case PARAM_EMBEDDING: fill_normal(p, n, &s); break;
        }
    }
}

int model_init(Model *m, const ModelDims *d, uint64_t seed, const char **err, int *oom) {
    memset(m, 0, sizeof(*m));
    if (param_layout_build(d, &m->lay, err, oom)) return -1;
    m->d = *d;
    m->params = malloc(m->lay.total * sizeof(float));
    m->grads = calloc(m->lay.total, sizeof(float));
    if (!m->params || !m->grads) {
        model_free(m);
        *err = "out of memory allocating the parameters and gradients";
        *oom = 1;
        return -1;
    }
    init_params(m, seed);
    return 0;
}

void model_free(Model *m) {
    free(m->bf16_products.scratch);
    free(m->bf16_w);
    free(m->bf16_x);
    free(m->bf16_offsets);
    free(m->params);
    free(m->grads);
    free(m->work);
    param_layout_free(&m->lay);
    free(m->act.layers);
    memset(m, 0, sizeof(*m));
}

/* ---------- bf16 inference ---------- */

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
    const ParamLayout *lay = &m->lay;
    size_t need_x = 0, need_w = 0, x_bytes, w_bytes, off_bytes;
    int overflow = 0;
    for (size_t i = 0; i < lay->n_linear; i++) {
        const LinearParams *p = &lay->linear[i];
        /* B*L and the widths are below 2^31: these sizes cannot overflow, their sum can't
         * either for 2^40 parameters, but the byte counts are checked all the same */
        size_t x = amx_input_size(B * L, p->in), w = amx_packed_weight_size(p->out, p->in);
        need_x = x > need_x ? x : need_x;
        overflow |= need_w + w < need_w;
        need_w += w;
    }
    if (overflow || dl_mul_overflows(need_x, sizeof(uint16_t), &x_bytes) ||
        dl_mul_overflows(need_w, sizeof(uint16_t), &w_bytes) ||
        dl_mul_overflows(lay->n_linear, sizeof(size_t), &off_bytes)) {
        *err = "bf16 buffers too large";
        return -1;
    }
    if (need_x > m->bf16_x_size) {
        uint16_t *x = malloc(x_bytes);
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
        m->bf16_w = malloc(w_bytes);
        m->bf16_offsets = malloc(off_bytes);
        if (!m->bf16_w || !m->bf16_offsets) {
            free(m->bf16_w);
            free(m->bf16_offsets);
            m->bf16_w = NULL;
            m->bf16_offsets = NULL;
            *err = "out of memory for the bf16 weights";
            return -1;
        }
    }
    for (size_t i = 0, pos = 0; i < lay->n_linear; i++) {
        const LinearParams *p = &lay->linear[i];
        m->bf16_offsets[i] = pos;
        amx_pack_weight(m->bf16_w + pos, m->params + p->w, p->out, p->in);
        pos += amx_packed_weight_size(p->out, p->in);
    }
    m->bf16_hash = h;
    return 0;
}

static size_t max3(size_t a, size_t b, size_t c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

/* The scratch of a linear layer's three products over M rows: y = x W^T, dx = dy W, dW = dy^T x. */
static size_t linear_products_scratch(size_t M, size_t in, size_t out) {
    return max3(amx_matmul_scratch(M, out, in), amx_matmul_scratch(M, in, out),
                amx_matmul_scratch(out, in, M));
}

int model_prepare_bf16_products(Model *m, size_t M, const char **err) {
    if (!amx_available()) {
        *err = "bf16 needs a CPU with AMX-BF16 (Intel Sapphire Rapids or later) and a kernel "
               "that grants AMX state";
        return -1;
    }
    /* M and the widths are below 2^31 (checked by the callers), so these sizes fit size_t */
    size_t need = linear_products_scratch(M, m->d.E, m->d.V), bytes;
    for (size_t i = 0; i < m->lay.n_linear; i++) {
        const LinearParams *p = &m->lay.linear[i];
        size_t n = linear_products_scratch(M, p->in, p->out);
        need = n > need ? n : need;
    }
    if (need <= m->bf16_products.elems) return 0;
    if (dl_mul_overflows(need, sizeof(uint16_t), &bytes)) {
        *err = "bf16 product scratch too large";
        return -1;
    }
    uint16_t *scratch = malloc(bytes);
    if (!scratch) {
        *err = "out of memory for the bf16 product scratch";
        return -1;
    }
    free(m->bf16_products.scratch);
    m->bf16_products.scratch = scratch;
    m->bf16_products.elems = need;
    return 0;
}

/* Routes the calling thread's products to bf16 (on) or float32 until the next call. */
static void use_bf16_products(Model *m, int on) {
    dl_bf16_products = on ? &m->bf16_products : NULL;
}

/* ---------- forward ---------- */

/* y = x W^T + b (and act = gelu(y) when act is not NULL), in bf16 when asked. */
static void layer_linear(Model *m, int bf16, float *y, float *act, const float *x,
                         const LinearParams *lin, size_t M) {
    const float *P = m->params;
    Epilogue e = {act ? EPI_BIAS_GELU : EPI_BIAS, P + lin->b, act, NULL};
    if (bf16)
        amx_linear(y, x, m->bf16_w + m->bf16_offsets[lin->index], &e, M, lin->in, lin->out,
                   m->bf16_x);
    else /* with an epilogue the product never splits K, so it cannot fail */
        matmul_epilogue(0, 1, M, lin->out, lin->in, 1.0f, x, lin->in, P + lin->w, lin->in, 0.0f,
                        y, lin->out, &e);
}

static void layer_forward(Model *m, size_t l, const float *x_in, float p, uint64_t seed, int bf16) {
    const ModelDims *d = &m->d;
    const LayerParams *lp = &m->lay.layers[l];
    LayerActs *a = &m->act.layers[l];
    const float *P = m->params;
    size_t B = m->act.B, L = m->act.L, M = B * L, H = d->H;
    layer_linear(m, bf16, a->qkv, NULL, x_in, lp->qkv, M);
    attention_forward(a->ctx, a->att, a->qkv, B, L, H, d->A, p, seed, SITE_ATT(l),
                      m->last_row0 * d->A * L * L, m->act.att_scratch, m->act.att_threads);
    layer_linear(m, bf16, a->res1, NULL, a->ctx, lp->ao, M);
    dropout_apply(a->res1, M * H, p, seed, SITE_AO(l), m->last_row0 * L * H);
    layernorm_forward(a->ln1, a->res1, a->mean1, a->rstd1, a->res1, x_in, P + lp->ln1_w,
                      P + lp->ln1_b, M, H, d->ln_eps);
    layer_linear(m, bf16, a->ff_pre, a->ff_act, a->ln1, lp->fi, M);
    layer_linear(m, bf16, a->res2, NULL, a->ff_act, lp->fo, M);
    dropout_apply(a->res2, M * H, p, seed, SITE_FO(l), m->last_row0 * L * H);
    layernorm_forward(a->ln2, a->res2, a->mean2, a->rstd2, a->res2, a->ln1, P + lp->ln2_w,
                      P + lp->ln2_b, M, H, d->ln_eps);
}

void model_forward(Model *m, const float *x, const float *x_sc, const float *t, float *y,
                   size_t B, size_t L, int train, uint64_t seed, size_t row0, int bf16) {
    const ModelDims *d = &m->d;
    const ParamLayout *lay = &m->lay;
    Activations *a = &m->act;
    const float *P = m->params;
    size_t M = B * L, E = d->E, H = d->H, T4 = 4 * d->Dt;
    float p = train ? d->dropout : 0.0f;
    m->last_row0 = row0; /* read by the dropout calls of forward and backward */
    int mixed = bf16 && train; /* a training forward packs every product's operands */
    use_bf16_products(m, mixed);
    if (mixed) bf16 = 0;

    if (d->self_cond) { /* input rows [x | x_sc] */
#pragma omp parallel for schedule(static) if (M * E > DL_PAR_MIN)
        for (size_t r = 0; r < M; r++) {
            float *o = a->x + r * 2 * E;
            memcpy(o, x + r * E, E * sizeof(float));
            if (x_sc) memcpy(o + E, x_sc + r * E, E * sizeof(float));
            else memset(o + E, 0, E * sizeof(float));
        }
    } else {
        memcpy(a->x, x, M * E * sizeof(float));
    }
    timestep_embedding(a->tsin, t, B, d->Dt);
    layer_linear(m, bf16, a->te_pre, NULL, a->tsin, lay->te0, B);
    silu_forward(a->te_act, a->te_pre, B * T4);
    layer_linear(m, bf16, a->temb, NULL, a->te_act, lay->te2, B);
    const float *up = a->x;
    if (E != H) {
        layer_linear(m, bf16, a->up_pre, NULL, a->x, lay->up0, M);
        tanh_forward(a->up_act, a->up_pre, M * H);
        layer_linear(m, bf16, a->up, NULL, a->up_act, lay->up2, M);
        up = a->up;
    } else if (d->self_cond) {
        layer_linear(m, bf16, a->up, NULL, a->x, lay->sc_proj, M);
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
        layer_linear(m, bf16, a->down_pre, NULL, h, lay->down0, M);
        tanh_forward(a->down_act, a->down_pre, M * H);
        layer_linear(m, bf16, y, NULL, a->down_act, lay->down2, M);
    } else {
        memcpy(y, h, M * H * sizeof(float));
    }
    use_bf16_products(m, 0);
    m->has_forward = 1;
    m->last_train = train;
    m->last_seed = seed;
    m->last_bf16 = bf16 || mixed;
}

const float *model_hidden(const Model *m) { return m->act.layers[m->d.N - 1].ln2; }

#define GRAD(off) (pg ? G + (off) : NULL)

/* The backward of layer_linear: dx (= or += when accumulate) dy W, and when pg the
 * parameter gradients. 0, or -1 out of memory (a K-split weight-gradient product). */
static int linear_grad(Model *m, float *dx, const LinearParams *lin, const float *dy,
                       const float *x, size_t M, int accumulate, int pg) {
    float *G = m->grads;
    return linear_backward(dx, GRAD(lin->w), GRAD(lin->b), dy, x, m->params + lin->w, M, lin->in,
                           lin->out, accumulate);
}

/* The backward of the input projection `lin`, whose input is a->x: its parameter
 * gradients when pg, and (dx not NULL) dx = dy W. With self_cond only the x_t half of
 * the input gets a gradient, dx = dy W[:, :E]: the self-conditioning input is a
 * stop-gradient. 0, or -1 out of memory. */
static int input_grad(Model *m, float *dx, const LinearParams *lin, const float *dy, int pg) {
    size_t M = m->act.B * m->act.L, E = m->d.E;
    if (!m->d.self_cond) return linear_grad(m, dx, lin, dy, m->act.x, M, 0, pg);
    if (pg && linear_grad(m, NULL, lin, dy, m->act.x, M, 0, pg)) return -1;
    return dx ? matmul(0, 0, M, E, lin->out, 1.0f, dy, lin->out, m->params + lin->w, lin->in,
                       0.0f, dx, E)
              : 0;
}

/* In: a->g1 = d(layer output). Out: a->g1 = d(layer input). 0, or -1 out of memory. */
static int layer_backward(Model *m, size_t l, const float *x_in, float p, uint64_t seed, int pg) {
    const ModelDims *d = &m->d;
    const LayerParams *lp = &m->lay.layers[l];
    LayerActs *la = &m->act.layers[l];
    Activations *a = &m->act;
    const float *P = m->params;
    float *G = m->grads;
    size_t B = a->B, L = a->L, M = B * L, H = d->H;

    layernorm_backward(a->g2, GRAD(lp->ln2_w), GRAD(lp->ln2_b), a->g1, la->res2, la->mean2,
                       la->rstd2, P + lp->ln2_w, M, H);
    const float *dfo = a->g2;
    if (p > 0.0f) {
        memcpy(a->g1, a->g2, M * H * sizeof(float));
        dropout_apply(a->g1, M * H, p, seed, SITE_FO(l), m->last_row0 * L * H);
        dfo = a->g1;
    }
    const LinearParams *fo = lp->fo;
    if (linear_backward_gelu(a->gbig, GRAD(fo->w), GRAD(fo->b), dfo, la->ff_act, P + fo->w,
                             la->ff_pre, M, fo->in, fo->out) ||
        linear_grad(m, a->g2, lp->fi, a->gbig, la->ln1, M, 1, pg))
        return -1;
    layernorm_backward(a->g1, GRAD(lp->ln1_w), GRAD(lp->ln1_b), a->g2, la->res1, la->mean1,
                       la->rstd1, P + lp->ln1_w, M, H);
    const float *dao = a->g1;
    if (p > 0.0f) {
        memcpy(a->g2, a->g1, M * H * sizeof(float));
        dropout_apply(a->g2, M * H, p, seed, SITE_AO(l), m->last_row0 * L * H);
        dao = a->g2;
    }
    if (linear_grad(m, a->gbig, lp->ao, dao, la->ctx, M, 0, pg)) return -1;
    attention_backward(a->gqkv, a->gbig, la->att, la->qkv, B, L, H, d->A, p, seed, SITE_ATT(l),
                       m->last_row0 * d->A * L * L, a->att_scratch, a->att_threads);
    return linear_grad(m, a->g1, lp->qkv, a->gqkv, x_in, M, 1, pg);
}

static int backward_pass(Model *m, const float *dy, const float *dhidden, float *dx, int pg) {
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
        if (linear_grad(m, a->g2, lay->down2, dy, a->down_act, M, 0, pg)) return -1;
        tanh_backward(a->g2, a->down_act, a->g2, M * H);
        if (linear_grad(m, a->g1, lay->down0, a->g2, hid, M, 0, pg)) return -1;
    } else {
        memcpy(a->g1, dy, M * H * sizeof(float));
    }
    if (dhidden) {
#pragma omp parallel for simd schedule(static) if (M * H > DL_PAR_MIN)
        for (size_t i = 0; i < M * H; i++) a->g1[i] += dhidden[i];
    }
    for (size_t l = d->N; l-- > 0;) {
        const float *x_in = l ? a->layers[l - 1].ln2 : a->h0;
        if (layer_backward(m, l, x_in, p, seed, pg)) return -1;
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
        if (linear_grad(m, gte, lay->te2, gt, a->te_act, B, 0, pg)) return -1;
        silu_backward(gte, a->te_pre, gte, B * T4);
        if (linear_grad(m, NULL, lay->te0, gte, a->tsin, B, 0, pg)) return -1;
    }
    if (E != H) {
        if (linear_grad(m, a->g1, lay->up2, a->g2, a->up_act, M, 0, pg)) return -1;
        tanh_backward(a->g1, a->up_act, a->g1, M * H);
        if (input_grad(m, dx, lay->up0, a->g1, pg)) return -1;
    } else if (d->self_cond) {
        if (input_grad(m, dx, lay->sc_proj, a->g2, pg)) return -1;
    } else if (dx) {
        memcpy(dx, a->g2, M * H * sizeof(float));
    }
    return 0;
}

/* A bf16 forward (inference or training) gets its backward's products in bf16 too. */
int model_backward(Model *m, const float *dy, const float *dhidden, float *dx, int pg) {
    use_bf16_products(m, m->last_bf16);
    int r = backward_pass(m, dy, dhidden, dx, pg);
    use_bf16_products(m, 0);
    return r;
}

void model_logits(Model *m, const float *h, float *out, size_t M, int bf16) {
    const float *P = m->params;
    use_bf16_products(m, bf16);
    /* with a bias the product never splits K, so it cannot fail */
    linear_forward(out, h, P + m->lay.word_emb, P + m->lay.lm_bias, M, m->d.E, m->d.V);
    use_bf16_products(m, 0);
}

int model_logits_backward(Model *m, const float *h, const float *dlogits, float *dh, size_t M,
                          int bf16) {
    use_bf16_products(m, bf16);
    int r = linear_backward(dh, m->grads + m->lay.word_emb, m->grads + m->lay.lm_bias, dlogits, h,
                            m->params + m->lay.word_emb, M, m->d.E, m->d.V, 0);
    use_bf16_products(m, 0);
    return r;
}

int model_tied_cross_entropy(Model *m, const float *h, const int64_t *target, const float *scale,
                             float *nll, float *dh, size_t M, int bf16) {
    const ParamLayout *lay = &m->lay;
    return tied_cross_entropy(nll, dh, m->grads + lay->word_emb, m->grads + lay->lm_bias, h,
                              m->params + lay->word_emb, m->params + lay->lm_bias, target, scale,
                              M, m->d.E, m->d.V, bf16);
}
