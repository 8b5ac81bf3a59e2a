/* The DiffuSeq TransformerNetModel (SPEC §3): parameter layout in one flat buffer,
 * activations in one workspace, forward and backward. */
#ifndef DLMONE_MODEL_H
#define DLMONE_MODEL_H

#include "common.h"
#include "kernels.h"

typedef struct {
    size_t V, E, H, N, A, F, Dt, P; /* P = max positions */
    float dropout, ln_eps;
    /* Recipe options (SPEC §5.1), both off in DiffuSeq's network:
     * self_cond: the input is concat(x_t, x0_self_cond), 2E channels, projected by
     *   input_up_proj.0 (E != H) or by self_cond_proj, a Linear(2E -> H) (E == H);
     * mask_emb: one more tensor, mask_embedding [E], the learned [MASK] vector of
     *   DiffuSeq-v2's soft absorbing state (used by the training loss, not the forward). */
    int self_cond, mask_emb;
} ModelDims;

/* Largest parameter buffer and activation workspace, in floats: far above any real
 * model, low enough that every size and byte count derived from them fits size_t. */
#define DL_MAX_FLOATS ((size_t)1 << 40)
#define DL_PARAM_NAME_MAX 96

/* How a tensor is initialised (PyTorch's defaults, as DiffuSeq gets them). */
typedef enum {
    PARAM_WEIGHT,    /* Linear weight: U(+-1/sqrt(fan_in)) */
    PARAM_BIAS,      /* Linear bias (and the tied head's bias): U(+-1/sqrt(fan_in)) */
    PARAM_LN_WEIGHT, /* LayerNorm weight: 1 */
    PARAM_LN_BIAS,   /* LayerNorm bias: 0 */
    PARAM_EMBEDDING  /* Embedding: N(0, 1) */
} ParamKind;

/* One named tensor of the flat parameter buffer. */
typedef struct {
    char name[DL_PARAM_NAME_MAX]; /* DiffuSeq's state-dict key */
    size_t offset, rows, cols;    /* in floats; cols == 0: a vector of `rows` */
    ParamKind kind;
    size_t fan_in;
} ParamTensor;

/* One Linear layer of the forward, y = x W^T + b: W[out,in] at w, b[out] at b; index
 * numbers the layers (the bf16 weight copy of layer i is bf16_w + bf16_offsets[i]).
 * The query, key and value layers of an encoder layer are one product of 3H outputs. */
typedef struct {
    size_t w, b, out, in, index;
} LinearParams;

typedef struct {
    const LinearParams *qkv, *ao, *fi, *fo;
    size_t ln1_w, ln1_b, ln2_w, ln2_b;
} LayerParams;

/* The parameter layout, built from ModelDims by param_layout_build: the one table of
 * every tensor (names, offsets, shapes, kinds) and the views the forward uses. The
 * word embedding comes first so that "everything but the embedding" is a suffix. */
typedef struct {
    ParamTensor *tensors; /* n_tensors, in state-dict (and initialisation) order */
    LinearParams *linear; /* n_linear */
    LayerParams *layers;  /* N */
    size_t n_tensors, n_linear, total;
    size_t word_emb, lm_bias, pos, ln_w, ln_b, mask_emb; /* mask_emb only with dims.mask_emb */
    const LinearParams *te0, *te2, *up0, *up2, *down0, *down2; /* up/down only when E != H */
    const LinearParams *sc_proj; /* self_cond_proj: only with self_cond when E == H */
} ParamLayout;

typedef struct {
    float *res1, *mean1, *rstd1, *ln1; /* attention block: LN input, stats, output */
    float *qkv, *att, *ctx;
    float *ff_pre, *ff_act;
    float *res2, *mean2, *rstd2, *ln2; /* feed-forward block; ln2 is the layer output */
} LayerActs;

typedef struct {
    size_t B, L;
    float *x, *tsin, *te_pre, *te_act, *temb; /* x: the input rows, E wide (2E with self_cond) */
    float *up_pre, *up_act, *up;
    float *emb_res, *mean0, *rstd0, *h0;
    LayerActs *layers;
    float *down_pre, *down_act;
    float *att_scratch; /* attention_scratch_floats() for each of att_threads threads */
    int att_threads;
    /* backward scratch: last in the workspace, untouched by a model that only runs forwards */
    float *g1, *g2, *gbig, *gqkv, *gtemb;
} Activations;

typedef struct {
    ModelDims d;
    ParamLayout lay;
    float *params, *grads;
    float *work; /* one buffer for all activations */
    size_t work_floats;
    Activations act;
    int has_forward, last_train, last_bf16;
    uint64_t last_seed;
    size_t last_row0;
    /* bf16 inference copy of the linear weights (amx.h): packed on the first bf16
     * forward and again whenever the parameters' hash has changed since */
    uint16_t *bf16_w, *bf16_x;
    size_t bf16_x_size, *bf16_offsets; /* bf16_offsets[i]: packed offset of linear layer i */
    uint64_t bf16_hash;
    /* mixed-precision training: the scratch of every bf16 product (kernels.h) */
    Bf16Products bf16_products;
} Model;

/* 0 when the dims are valid and the parameters fit DL_MAX_FLOATS; else -1 with *err
 * set (a static string). Allocates nothing. */
int model_dims_check(const ModelDims *d, const char **err);
/* Checks the dims and builds the layout: 0, or -1 with *err set (a static string) and
 * *oom telling an allocation failure (1) from invalid or too large sizes (0). */
int param_layout_build(const ModelDims *d, ParamLayout *lay, const char **err, int *oom);
void param_layout_free(ParamLayout *lay);

/* Floats of the activation workspace for batch B x length L with `threads` OpenMP
 * threads: all of it (*total) and the part a forward writes (*forward). 0, or -1 with
 * *err set when the sizes overflow or exceed what the 32-bit BLAS addresses. */
int model_workspace_floats(const ModelDims *d, size_t B, size_t L, int threads, size_t *total,
                           size_t *forward, const char **err);

/* 0, or -1 with *err set: invalid dims (*oom = 0) or out of memory (*oom = 1).
 * Parameters initialised from seed, gradients zero. */
int model_init(Model *m, const ModelDims *d, uint64_t seed, const char **err, int *oom);
/* Ensure workspace for batch B and length L: 0, or -1 with *err set and *oom as above. */
int model_reserve(Model *m, size_t B, size_t L, const char **err, int *oom);
void model_free(Model *m);

/* Before a bf16 forward of batch B x L: checks AMX, (re)packs the weights if they
 * changed, sizes the input buffer. 0 or -1 with *err set. */
int model_prepare_bf16(Model *m, size_t B, size_t L, const char **err);

/* Before mixed-precision (bf16) calls over M = B*L rows (a training forward, the
 * backward of a bf16 forward, the tied logits and their backward): checks AMX and sizes
 * the scratch of the largest product. 0 or -1 with *err set. */
int model_prepare_bf16_products(Model *m, size_t M, const char **err);

/* x[B,L,E], t[B] (model-scale timesteps), y[B,L,E]; x_sc[B,L,E] is the self-conditioning
 * input of a self_cond model (NULL: zeros; ignored without self_cond). The rows are
 * rows row0.. of a larger batch as far as dropout masks go (data-parallel shards get
 * the whole batch's masks). With bf16 the linear layers run in bf16 on AMX: an
 * inference forward (after model_prepare_bf16) with weights packed once, a training
 * forward (after model_prepare_bf16_products) packing both operands of every product,
 * as does the backward of any bf16 forward. */
void model_forward(Model *m, const float *x, const float *x_sc, const float *t, float *y,
                   size_t B, size_t L, int train, uint64_t seed, size_t row0, int bf16);
/* dy[B,L,E], dhidden[B,L,H] or NULL, dx[B,L,E] or NULL (with respect to x only: the
 * self-conditioning input is a stop-gradient); accumulates into m->grads
 * when param_grads. Uses the activations of the last forward. 0, or -1 when a product
 * could not get its scratch memory (the gradients are then incomplete). */
int model_backward(Model *m, const float *dy, const float *dhidden, float *dx, int param_grads);
/* The last encoder layer's output of the last forward, [B,L,H]. */
const float *model_hidden(const Model *m);

/* The tied logits h W_emb^T + b over M rows, and their backward; with bf16 in mixed
 * precision (after model_prepare_bf16_products). */
void model_logits(Model *m, const float *h, float *out, size_t M, int bf16);
/* The rounding loss through the tied head over M rows of h (diffusion.h's
 * tied_cross_entropy with the model's word embedding and head bias): nll[M], and with dh
 * dh[M,E] and the two parameters' gradients accumulated. 0, or -1 out of memory. */
int model_tied_cross_entropy(Model *m, const float *h, const int64_t *target, const float *scale,
                             float *nll, float *dh, size_t M, int bf16);
/* 0, or -1 out of memory (see model_backward). */
int model_logits_backward(Model *m, const float *h, const float *dlogits, float *dh, size_t M,
                          int bf16);

#endif
