/* dlmone._core: Python glue. Validates arguments, releases the GIL, dispatches.
 * Array arguments are checked by args.c; the Python layer (dlmone/model.py)
 * converts user input first. */
#define DLMONE_IMPORT_ARRAY
#include "args.h"

#include "kernels.h"
#include "amx.h"
#include "isa.h"
#include "model.h"

#ifndef DLMONE_CFLAGS
#define DLMONE_CFLAGS "unknown"
#endif

/* ---------- Model type ---------- */

typedef struct {
    PyObject_HEAD Model m;
    int busy; /* set while a C call runs without the GIL */
} ModelObject;

static int acquire(ModelObject *self) {
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this model is being used by another thread; use one model per thread");
        return -1;
    }
    self->busy = 1;
    return 0;
}

static void Model_dealloc(ModelObject *self) {
    model_free(&self->m);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Model_init(ModelObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"vocab_size", "emb_dim",       "hidden_dim", "num_layers",
                             "num_heads",  "ffn_dim",       "time_dim",   "max_positions",
                             "dropout",    "layer_norm_eps", "seed",      NULL};
    long long V, E, H, N, A, F, Dt, P, seed = 0;
    double dropout = 0.0, eps = 1e-12;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "LLLLLLLL|ddL", kwlist, &V, &E, &H, &N, &A, &F,
                                     &Dt, &P, &dropout, &eps, &seed))
        return -1;
    const long long vals[] = {V, E, H, N, A, F, Dt, P};
    for (int i = 0; i < 8; i++) {
        if (vals[i] <= 0) {
            PyErr_Format(PyExc_ValueError, "%s must be positive, got %lld", kwlist[i], vals[i]);
            return -1;
        }
    }
    if (!(dropout >= 0.0 && dropout < 1.0)) {
        PyErr_Format(PyExc_ValueError, "dropout must be in [0, 1), got %g", dropout);
        return -1;
    }
    if (!(eps > 0.0)) {
        PyErr_Format(PyExc_ValueError, "layer_norm_eps must be positive, got %g", eps);
        return -1;
    }
    model_free(&self->m);
    ModelDims d = {(size_t)V, (size_t)E, (size_t)H, (size_t)N, (size_t)A, (size_t)F,
                   (size_t)Dt, (size_t)P, (float)dropout, (float)eps};
    const char *err = NULL;
    if (model_layout(&d, &self->m.lay, &err)) {
        PyErr_SetString(PyExc_ValueError, err);
        return -1;
    }
    self->m.d = d;
    size_t bytes = self->m.lay.total * sizeof(float);
    self->m.params = malloc(bytes);
    self->m.grads = calloc(self->m.lay.total, sizeof(float));
    if (!self->m.params || !self->m.grads) {
        model_free(&self->m);
        PyErr_Format(PyExc_MemoryError, "cannot allocate %zu bytes of parameters", 2 * bytes);
        return -1;
    }
    model_init_params(&self->m, (uint64_t)seed);
    return 0;
}

static PyObject *view_of(ModelObject *self, float *data) {
    npy_intp n = (npy_intp)self->m.lay.total;
    PyObject *arr = PyArray_SimpleNewFromData(1, &n, NPY_FLOAT32, data);
    if (!arr) return NULL;
    Py_INCREF(self);
    if (PyArray_SetBaseObject((PyArrayObject *)arr, (PyObject *)self) < 0) {
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

static PyObject *Model_get_params(ModelObject *self, void *c) { return view_of(self, self->m.params); }
static PyObject *Model_get_grads(ModelObject *self, void *c) { return view_of(self, self->m.grads); }

static int add_entry(PyObject *list, const char *name, size_t off, size_t d0, size_t d1) {
    PyObject *item = d1 ? Py_BuildValue("(sn(nn))", name, (Py_ssize_t)off, (Py_ssize_t)d0, (Py_ssize_t)d1)
                        : Py_BuildValue("(sn(n))", name, (Py_ssize_t)off, (Py_ssize_t)d0);
    if (!item) return -1;
    int r = PyList_Append(list, item);
    Py_DECREF(item);
    return r;
}

/* [(name, offset, shape)] in DiffuSeq's state-dict names. */
static PyObject *Model_layout(ModelObject *self, PyObject *unused) {
    const ModelDims *d = &self->m.d;
    const ParamLayout *L = &self->m.lay;
    size_t E = d->E, H = d->H, F = d->F, T4 = 4 * d->Dt;
    PyObject *lst = PyList_New(0);
    if (!lst) return NULL;
    char name[160];
#define ADD(nm, off, a, b) if (add_entry(lst, nm, off, a, b)) goto fail
    ADD("word_embedding.weight", L->word_emb, d->V, E);
    ADD("lm_head.bias", L->lm_bias, d->V, 0);
    ADD("time_embed.0.weight", L->te0_w, T4, d->Dt);
    ADD("time_embed.0.bias", L->te0_b, T4, 0);
    ADD("time_embed.2.weight", L->te2_w, H, T4);
    ADD("time_embed.2.bias", L->te2_b, H, 0);
    if (E != H) {
        ADD("input_up_proj.0.weight", L->up0_w, H, E);
        ADD("input_up_proj.0.bias", L->up0_b, H, 0);
        ADD("input_up_proj.2.weight", L->up2_w, H, H);
        ADD("input_up_proj.2.bias", L->up2_b, H, 0);
    }
    ADD("position_embeddings.weight", L->pos, d->P, H);
    ADD("LayerNorm.weight", L->ln_w, H, 0);
    ADD("LayerNorm.bias", L->ln_b, H, 0);
    for (size_t l = 0; l < d->N; l++) {
        const LayerParams *p = &L->layers[l];
        static const char *qkv[3] = {"query", "key", "value"};
        for (int j = 0; j < 3; j++) {
            snprintf(name, sizeof name, "input_transformers.layer.%zu.attention.self.%s.weight", l, qkv[j]);
            ADD(name, p->qkv_w + j * H * H, H, H);
            snprintf(name, sizeof name, "input_transformers.layer.%zu.attention.self.%s.bias", l, qkv[j]);
            ADD(name, p->qkv_b + j * H, H, 0);
        }
#define LAYER(suffix, off, a, b)                                                        \
    snprintf(name, sizeof name, "input_transformers.layer.%zu.%s", l, suffix);          \
    ADD(name, off, a, b)
        LAYER("attention.output.dense.weight", p->ao_w, H, H);
        LAYER("attention.output.dense.bias", p->ao_b, H, 0);
        LAYER("attention.output.LayerNorm.weight", p->ln1_w, H, 0);
        LAYER("attention.output.LayerNorm.bias", p->ln1_b, H, 0);
        LAYER("intermediate.dense.weight", p->fi_w, F, H);
        LAYER("intermediate.dense.bias", p->fi_b, F, 0);
        LAYER("output.dense.weight", p->fo_w, H, F);
        LAYER("output.dense.bias", p->fo_b, H, 0);
        LAYER("output.LayerNorm.weight", p->ln2_w, H, 0);
        LAYER("output.LayerNorm.bias", p->ln2_b, H, 0);
#undef LAYER
    }
    if (E != H) {
        ADD("output_down_proj.0.weight", L->down0_w, H, H);
        ADD("output_down_proj.0.bias", L->down0_b, H, 0);
        ADD("output_down_proj.2.weight", L->down2_w, E, H);
        ADD("output_down_proj.2.bias", L->down2_b, E, 0);
    }
#undef ADD
    return lst;
fail:
    Py_DECREF(lst);
    return NULL;
}

static PyObject *Model_forward(ModelObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "t", "train", "seed", "bf16", "row_offset", NULL};
    PyObject *xo, *to;
    int train = 0, bf16 = 0;
    unsigned long long seed = 0;
    Py_ssize_t row0 = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|pKpn", kwlist, &xo, &to, &train, &seed, &bf16, &row0))
        return NULL;
    if (row0 < 0 || (size_t)row0 > ((size_t)1 << 40)) {
        PyErr_Format(PyExc_ValueError, "row_offset must be in [0, 2^40], got %zd", row0);
        return NULL;
    }
    if (bf16 && train) {
        PyErr_SetString(PyExc_ValueError, "bf16 is for inference only: train must be False");
        return NULL;
    }
    const ModelDims *d = &self->m.d;
    npy_intp xs[3] = {-1, -1, (npy_intp)d->E};
    PyArrayObject *x = check_array(xo, "x", NPY_FLOAT32, 3, xs, 0);
    if (!x) return NULL;
    size_t B = (size_t)PyArray_DIM(x, 0), L = (size_t)PyArray_DIM(x, 1);
    if (B == 0 || L == 0) {
        PyErr_SetString(PyExc_ValueError, "x must have a positive batch size and length");
        return NULL;
    }
    if (L > d->P) {
        PyErr_Format(PyExc_ValueError, "x has length %zu > max_positions %zu", L, d->P);
        return NULL;
    }
    npy_intp ts[1] = {(npy_intp)B};
    PyArrayObject *t = check_array(to, "t", NPY_FLOAT32, 1, ts, 0);
    if (!t) return NULL;
    const char *err = NULL;
    if (model_reserve(&self->m, B, L, &err)) {
        PyErr_Format(PyExc_MemoryError, "%s (batch %zu, length %zu)", err, B, L);
        return NULL;
    }
    npy_intp ys[3] = {(npy_intp)B, (npy_intp)L, (npy_intp)d->E};
    PyObject *y = new_float_array(3, ys);
    if (!y || acquire(self)) {
        Py_XDECREF(y);
        return NULL;
    }
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    failed = bf16 && model_prepare_bf16(&self->m, B, L, &err);
    if (!failed)
        model_forward(&self->m, fdata(x), fdata(t), fdata((PyArrayObject *)y), B, L, train, seed,
                      (size_t)row0, bf16);
    Py_END_ALLOW_THREADS
    if (failed) {
        self->busy = 0;
        Py_DECREF(y);
        PyErr_SetString(PyExc_RuntimeError, err);
        return NULL;
    }
    self->busy = 0;
    return y;
}

static PyObject *Model_backward(ModelObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"grad_out", "grad_hidden", "param_grads", NULL};
    PyObject *go, *gho = Py_None;
    int pg = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|Op", kwlist, &go, &gho, &pg)) return NULL;
    if (!self->m.has_forward) {
        PyErr_SetString(PyExc_RuntimeError, "backward() called before forward()");
        return NULL;
    }
    if (self->m.last_bf16) {
        PyErr_SetString(PyExc_RuntimeError, "backward() after a bf16 forward: gradients need a float32 forward");
        return NULL;
    }
    const Activations *a = &self->m.act;
    npy_intp ys[3] = {(npy_intp)a->B, (npy_intp)a->L, (npy_intp)self->m.d.E};
    PyArrayObject *g = check_array(go, "grad_out", NPY_FLOAT32, 3, ys, 0);
    if (!g) return NULL;
    const float *gh = NULL;
    if (gho != Py_None) {
        npy_intp hs[3] = {(npy_intp)a->B, (npy_intp)a->L, (npy_intp)self->m.d.H};
        PyArrayObject *h = check_array(gho, "grad_hidden", NPY_FLOAT32, 3, hs, 0);
        if (!h) return NULL;
        gh = fdata(h);
    }
    PyObject *dx = new_float_array(3, ys);
    if (!dx || acquire(self)) {
        Py_XDECREF(dx);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    model_backward(&self->m, fdata(g), gh, fdata((PyArrayObject *)dx), pg);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    return dx;
}

static PyObject *Model_hidden(ModelObject *self, PyObject *unused) {
    if (!self->m.has_forward) {
        PyErr_SetString(PyExc_RuntimeError, "hidden() called before forward()");
        return NULL;
    }
    const Activations *a = &self->m.act;
    npy_intp hs[3] = {(npy_intp)a->B, (npy_intp)a->L, (npy_intp)self->m.d.H};
    PyObject *h = new_float_array(3, hs);
    if (!h) return NULL;
    memcpy(fdata((PyArrayObject *)h), model_hidden(&self->m), a->B * a->L * self->m.d.H * sizeof(float));
    return h;
}

static PyObject *Model_logits(ModelObject *self, PyObject *args) {
    PyObject *ho;
    if (!PyArg_ParseTuple(args, "O", &ho)) return NULL;
    size_t M;
    PyArrayObject *h = check_rows(ho, "h", self->m.d.E, &M);
    if (!h) return NULL;
    int nd = PyArray_NDIM(h);
    npy_intp shape[NPY_MAXDIMS];
    memcpy(shape, PyArray_DIMS(h), nd * sizeof(npy_intp));
    shape[nd - 1] = (npy_intp)self->m.d.V;
    PyObject *out = new_float_array(nd, shape);
    if (!out || acquire(self)) {
        Py_XDECREF(out);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    model_logits(&self->m, fdata(h), fdata((PyArrayObject *)out), M);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    return out;
}

static PyObject *Model_logits_backward(ModelObject *self, PyObject *args) {
    PyObject *ho, *go;
    if (!PyArg_ParseTuple(args, "OO", &ho, &go)) return NULL;
    size_t M, Mg;
    PyArrayObject *h = check_rows(ho, "h", self->m.d.E, &M);
    if (!h) return NULL;
    PyArrayObject *g = check_rows(go, "grad_logits", self->m.d.V, &Mg);
    if (!g) return NULL;
    if (M != Mg) {
        PyErr_Format(PyExc_ValueError, "grad_logits has %zu rows but h has %zu", Mg, M);
        return NULL;
    }
    PyObject *dh = new_float_array(PyArray_NDIM(h), PyArray_DIMS(h));
    if (!dh || acquire(self)) {
        Py_XDECREF(dh);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    model_logits_backward(&self->m, fdata(h), fdata(g), fdata((PyArrayObject *)dh), M);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    return dh;
}

static PyObject *Model_embed(ModelObject *self, PyObject *args) {
    PyObject *to;
    if (!PyArg_ParseTuple(args, "O", &to)) return NULL;
    npy_intp s[2];
    int64_t *tok = tokens_to_int64(to, "tokens", self->m.d.V, s);
    if (!tok) return NULL;
    npy_intp os[3] = {s[0], s[1], (npy_intp)self->m.d.E};
    PyObject *out = new_float_array(3, os);
    if (!out) {
        free(tok);
        return NULL;
    }
    const Model *m = &self->m;
    Py_BEGIN_ALLOW_THREADS
    embedding_forward(fdata((PyArrayObject *)out), tok, m->params + m->lay.word_emb,
                      (size_t)(s[0] * s[1]), m->d.E);
    Py_END_ALLOW_THREADS
    free(tok);
    return out;
}

static PyObject *Model_embed_backward(ModelObject *self, PyObject *args) {
    PyObject *to, *go;
    if (!PyArg_ParseTuple(args, "OO", &to, &go)) return NULL;
    npy_intp s[2];
    int64_t *tok = tokens_to_int64(to, "tokens", self->m.d.V, s);
    if (!tok) return NULL;
    npy_intp gs[3] = {s[0], s[1], (npy_intp)self->m.d.E};
    PyArrayObject *g = check_array(go, "grad", NPY_FLOAT32, 3, gs, 0);
    if (!g || acquire(self)) {
        free(tok);
        return NULL;
    }
    Model *m = &self->m;
    Py_BEGIN_ALLOW_THREADS
    embedding_backward(m->grads + m->lay.word_emb, tok, fdata(g), (size_t)(s[0] * s[1]), m->d.E);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    free(tok);
    Py_RETURN_NONE;
}

static PyObject *Model_zero_grad(ModelObject *self, PyObject *unused) {
    if (acquire(self)) return NULL;
    memset(self->m.grads, 0, self->m.lay.total * sizeof(float));
    self->busy = 0;
    Py_RETURN_NONE;
}

static PyObject *Model_workspace_bytes(ModelObject *self, void *c) {
    return PyLong_FromSize_t(self->m.work_floats * sizeof(float));
}

static PyMethodDef Model_methods[] = {
    {"layout", (PyCFunction)Model_layout, METH_NOARGS, "[(name, offset, shape)] of every parameter tensor."},
    {"forward", (PyCFunction)(void (*)(void))Model_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(x[B,L,E] float32, t[B] float32 model-scale, train=False, seed=0) -> y[B,L,E]"},
    {"backward", (PyCFunction)(void (*)(void))Model_backward, METH_VARARGS | METH_KEYWORDS,
     "backward(grad_out, grad_hidden=None, param_grads=True) -> grad_x; accumulates grads"},
    {"hidden", (PyCFunction)Model_hidden, METH_NOARGS, "Copy of the last encoder output [B,L,H]."},
    {"logits", (PyCFunction)Model_logits, METH_VARARGS, "logits(h[...,E]) -> [...,V] = h W^T + b"},
    {"logits_backward", (PyCFunction)Model_logits_backward, METH_VARARGS,
     "logits_backward(h, grad_logits) -> grad_h; accumulates word_embedding and lm_head.bias grads"},
    {"embed", (PyCFunction)Model_embed, METH_VARARGS, "embed(tokens[B,L]) -> [B,L,E]"},
    {"embed_backward", (PyCFunction)Model_embed_backward, METH_VARARGS,
     "embed_backward(tokens, grad[B,L,E]); accumulates into the word_embedding grad"},
    {"zero_grad", (PyCFunction)Model_zero_grad, METH_NOARGS, "Set all gradients to zero."},
    {NULL}};

static PyGetSetDef Model_getset[] = {
    {"params", (getter)Model_get_params, NULL, "flat float32 view of the parameters", NULL},
    {"grads", (getter)Model_get_grads, NULL, "flat float32 view of the gradients", NULL},
    {"workspace_bytes", (getter)Model_workspace_bytes, NULL, "bytes held for activations", NULL},
    {NULL}};

static PyTypeObject ModelType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dlmone._core.Model",
    .tp_basicsize = sizeof(ModelObject),
    .tp_dealloc = (destructor)Model_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Model(vocab_size, emb_dim, hidden_dim, num_layers, num_heads, ffn_dim, time_dim, "
              "max_positions, dropout=0, layer_norm_eps=1e-12, seed=0): the C network.",
    .tp_methods = Model_methods,
    .tp_getset = Model_getset,
    .tp_init = (initproc)Model_init,
    .tp_new = PyType_GenericNew,
};

/* ---------- threads and build info ---------- */

static PyObject *py_set_num_threads(PyObject *mod, PyObject *args) {
    int n;
    if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    if (n < 1) return PyErr_Format(PyExc_ValueError, "threads must be >= 1, got %d", n);
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *mod, PyObject *unused) {
    return PyLong_FromLong(dl_max_threads());
}

/* The ISA levels, as names, that `keep` accepts. */
static PyObject *isa_level_list(int (*keep)(DlIsa)) {
    PyObject *list = PyList_New(0);
    for (int i = 0; list && i < DL_ISA_COUNT; i++) {
        if (!keep((DlIsa)i)) continue;
        PyObject *name = PyUnicode_FromString(dl_isa_names[i]);
        if (!name || PyList_Append(list, name) < 0) Py_CLEAR(list);
        Py_XDECREF(name);
    }
    return list;
}

static int isa_built(DlIsa isa) {
    (void)isa;
    return dl_isa_dispatching();
}

static PyObject *py_build_info(PyObject *mod, PyObject *unused) {
#ifdef _OPENMP
    PyObject *omp = Py_True;
#else
    PyObject *omp = Py_False;
#endif
    char *cfg = scipy_openblas_get_config();
    PyObject *built = isa_level_list(isa_built), *cpu = isa_level_list(dl_isa_supported);
    PyObject *info = NULL;
    if (built && cpu)
        info = Py_BuildValue("{s:O,s:s,s:s,s:s,s:i,s:s,s:O,s:s,s:O,s:O}", "openmp", omp, "blas",
                             "scipy-openblas32 (single-threaded inside dlmone; OpenMP splits products)",
                             "blas_config", cfg ? cfg : "", "blas_core", scipy_openblas_get_corename(),
                             "threads", dl_max_threads(), "cflags", DLMONE_CFLAGS, "amx_bf16",
                             amx_available() ? Py_True : Py_False, "isa", dl_isa_in_use(), "isa_levels",
                             built, "cpu_isa", cpu);
    Py_XDECREF(built);
    Py_XDECREF(cpu);
    return info;
}

static PyMethodDef module_methods[] = {
    {"set_num_threads", py_set_num_threads, METH_VARARGS, "set_num_threads(n)"},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads() -> int"},
    {"build_info", py_build_info, METH_NOARGS, "build_info() -> dict"},
    {NULL}};

static struct PyModuleDef core_module = {PyModuleDef_HEAD_INIT, "_core",
                                         "dlmone's C core: transformer, diffusion and distillation kernels.",
                                         -1, module_methods};

PyMODINIT_FUNC PyInit__core(void) {
    if (!dl_isa_request_valid()) {
        PyErr_Format(PyExc_ImportError, "DLMONE_ISA=%s: expected one of baseline, avx2, avx512",
                     getenv("DLMONE_ISA"));
        return NULL;
    }
    if (getenv("DLMONE_ISA") && *getenv("DLMONE_ISA") && !dl_isa_dispatching() &&
        PyErr_WarnFormat(PyExc_RuntimeWarning, 1, "DLMONE_ISA is ignored: this build of dlmone (%s) has "
                         "one build of its core, not a run-time choice", dl_isa_in_use()) < 0)
        return NULL;
    import_array();
    if (PyType_Ready(&ModelType) < 0) return NULL;
    PyObject *m = PyModule_Create(&core_module);
    if (!m) return NULL;
    if (PyModule_AddFunctions(m, optim_methods) < 0 || PyModule_AddFunctions(m, diffusion_methods) < 0 ||
        PyModule_AddFunctions(m, distill_methods) < 0 ||
        PyModule_AddFunctions(m, kernel_methods) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&ModelType);
    if (PyModule_AddObject(m, "Model", (PyObject *)&ModelType) < 0) {
        Py_DECREF(&ModelType);
        Py_DECREF(m);
        return NULL;
    }
    /* Policy: BLAS calls run single-threaded; dlmone splits every product into
     * fixed blocks over OpenMP threads, so the two pools never compete. */
    scipy_openblas_set_num_threads(1);
    return m;
}
