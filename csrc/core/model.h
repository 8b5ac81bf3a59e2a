/* The DiffuSeq TransformerNetModel (SPEC §3): parameter layout in one flat buffer,
 * activations in one workspace, forward and backward. */
#ifndef DLMONE_MODEL_H
#define DLMONE_MODEL_H

#include "common.h"

typedef struct {
    size_t V, E, H, N, A, F, Dt, P; /* P = max positions */
    float dropout, ln_eps;
} ModelDims;

typedef struct {
    size_t qkv_w, qkv_b, ao_w, ao_b, ln1_w, ln1_b, fi_w, fi_b, fo_w, fo_b, ln2_w, ln2_b;
} LayerParams;

/* Offsets (in floats) of every tensor in the flat parameter buffer. The word
 * embedding comes first so that "everything but the embedding" is a suffix. */
typedef struct {
    size_t word_emb, lm_bias, te0_w, te0_b, te2_w, te2_b;
    size_t up0_w, up0_b, up2_w, up2_b; /* only when E != H */
    size_t pos, ln_w, ln_b;
    size_t down0_w, down0_b, down2_w, down2_b; /* only when E != H */
    LayerParams *layers;
    size_t total;
} ParamLayout;

typedef struct {
    float *res1, *mean1, *rstd1, *ln1; /* attention block: LN input, stats, output */
    float *qkv, *att, *ctx;
    float *ff_pre, *ff_act;
    float *res2, *mean2, *rstd2, *ln2; /* feed-forward block; ln2 is the layer output */
} LayerActs;

typedef struct {
    size_t B, L;
    float *x, *tsin, *te_pre, *te_act, *temb;
    float *up_pre, *up_act, *up;
    float *emb_res, *mean0, *rstd0, *h0;
    LayerActs *layers;
    float *down_pre, *down_act;
    /* backward scratch */
    float *g1, *g2, *gbig, *gqkv, *gtemb;
    float *att_scratch; /* attention_scratch_floats() for each of att_threads threads */
    int att_threads;
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
    size_t bf16_x_size, *bf16_offsets; /* bf16_offsets[i]: packed offset of linear weight i */
    uint64_t bf16_hash;
} Model;

/* 0 on success; -1 with *err set (static string) on invalid dims or overflow. */
int model_layout(const ModelDims *d, ParamLayout *lay, const char **err);
/* Ensure workspace for batch B and length L; -1 on allocation failure/overflow. */
int model_reserve(Model *m, size_t B, size_t L, const char **err);
void model_init_params(Model *m, uint64_t seed);
void model_free(Model *m);

/* Before a bf16 forward of batch B x L: checks AMX, (re)packs the weights if they
 * changed, sizes the input buffer. 0 or -1 with *err set. */
int model_prepare_bf16(Model *m, size_t B, size_t L, const char **err);

/* x[B,L,E], t[B] (model-scale timesteps), y[B,L,E]. The rows are rows row0.. of a
 * larger batch as far as dropout masks go (data-parallel shards get the whole batch's
 * masks). With bf16 (inference only, after model_prepare_bf16) the linear layers run
 * in bf16 on AMX. */
void model_forward(Model *m, const float *x, const float *t, float *y, size_t B, size_t L,
                   int train, uint64_t seed, size_t row0, int bf16);
/* dy[B,L,E], dhidden[B,L,H] or NULL, dx[B,L,E] or NULL; accumulates into m->grads
 * when param_grads. Uses the activations of the last forward. */
void model_backward(Model *m, const float *dy, const float *dhidden, float *dx, int param_grads);
/* The last encoder layer's output of the last forward, [B,L,H]. */
const float *model_hidden(const Model *m);

void model_logits(const Model *m, const float *h, float *out, size_t M);
void model_logits_backward(Model *m, const float *h, const float *dlogits, float *dh, size_t M);

#endif
