/* dlmone._core.Model (the network of csrc/core/model.c) and the layout functions that
 * need no model: argument checks, the busy flag, GIL release, dispatch. */
#include "args.h"
#include "amx.h"
#include "kernels.h"
#include "model.h"

typedef struct {
    PyObject_HEAD Model m;
    /* Set while a call uses the model's buffers: a second thread's call raises
     * RuntimeError instead of racing (the workspace may be reallocated by a forward).
     * Read and written only with the GIL held. */
    int busy;
} ModelObject;

/* Takes the busy flag; every method that touches the model's buffers or state calls it
 * before anything else and release() on every exit. */
static int acquire(ModelObject *self) {
    if (!self->m.params) {
        PyErr_SetString(PyExc_RuntimeError, "Model.__init__ has not completed");
        return -1;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this model is being used by another thread; use one model per thread");
        return -1;
    }
    self->busy = 1;
    return 0;
}

static void release(ModelObject *self) { self->busy = 0; }

/* ---------- the sizes: shared by Model(), param_layout() and workspace_bytes() ---------- */

#define DIM_NAMES "vocab_size", "emb_dim", "hidden_dim", "num_layers", "num_heads", "ffn_dim", \
                  "time_dim", "max_positions"
#define DIM_FORMAT "LLLLLLLL"
#define OPTION_NAMES "self_conditioning", "mask_embedding"
static const char *dim_names[8] = {DIM_NAMES};

/* ModelDims from the 8 sizes, dropout, eps and the two recipe options (model.h),
 * checked: 0, or -1 with ValueError. */
static int dims_from(const long long v[8], double dropout, double eps, int self_cond, int mask_emb,
                     ModelDims *d) {
    for (int i = 0; i < 8; i++) {
        if (v[i] <= 0) {
            PyErr_Format(PyExc_ValueError, "%s must be positive, got %lld", dim_names[i], v[i]);
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
    *d = (ModelDims){(size_t)v[0], (size_t)v[1], (size_t)v[2], (size_t)v[3], (size_t)v[4],
                     (size_t)v[5], (size_t)v[6], (size_t)v[7], (float)dropout, (float)eps,
                     self_cond, mask_emb};
    const char *err = NULL;
    if (model_dims_check(d, &err)) {
        PyErr_SetString(PyExc_ValueError, err);
        return -1;
    }
    return 0;
}

static void set_error(const char *err, int oom) {
    PyErr_SetString(oom ? PyExc_MemoryError : PyExc_ValueError, err);
}

/* [(name, offset, shape)] of a parameter table. */
static PyObject *layout_list(const ParamLayout *lay) {
    PyObject *lst = PyList_New((Py_ssize_t)lay->n_tensors);
    if (!lst) return NULL;
    for (size_t i = 0; i < lay->n_tensors; i++) {
        const ParamTensor *t = &lay->tensors[i];
        PyObject *item = t->cols ? Py_BuildValue("(sn(nn))", t->name, (Py_ssize_t)t->offset,
                                                 (Py_ssize_t)t->rows, (Py_ssize_t)t->cols)
                                 : Py_BuildValue("(sn(n))", t->name, (Py_ssize_t)t->offset,
                                                 (Py_ssize_t)t->rows);
        if (!item) {
            Py_DECREF(lst);
            return NULL;
        }
        PyList_SET_ITEM(lst, (Py_ssize_t)i, item);
    }
    return lst;
}

static PyObject *py_param_layout(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {DIM_NAMES, OPTION_NAMES, NULL};
    long long v[8];
    int self_cond = 0, mask_emb = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, DIM_FORMAT "|$pp", kwlist, &v[0], &v[1], &v[2],
                                     &v[3], &v[4], &v[5], &v[6], &v[7], &self_cond, &mask_emb))
        return NULL;
    ModelDims d;
    if (dims_from(v, 0.0, 1.0, self_cond, mask_emb, &d)) return NULL;
    ParamLayout lay;
    const char *err = NULL;
    int oom = 0;
    if (param_layout_build(&d, &lay, &err, &oom)) {
        set_error(err, oom);
        return NULL;
    }
    PyObject *lst = layout_list(&lay);
    param_layout_free(&lay);
    return lst;
}

static PyObject *py_workspace_bytes(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {DIM_NAMES, "batch", "length", "threads", "backward", OPTION_NAMES,
                             NULL};
    long long v[8], B, L;
    int threads = 0, backward = 1, self_cond = 0, mask_emb = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, DIM_FORMAT "LL|ip$pp", kwlist, &v[0], &v[1], &v[2],
                                     &v[3], &v[4], &v[5], &v[6], &v[7], &B, &L, &threads,
                                     &backward, &self_cond, &mask_emb))
        return NULL;
    ModelDims d;
    if (dims_from(v, 0.0, 1.0, self_cond, mask_emb, &d)) return NULL;
    if (B < 1 || L < 1)
        return PyErr_Format(PyExc_ValueError, "batch and length must be positive, got %lld, %lld",
                            B, L);
    if ((unsigned long long)L > d.P)
        return PyErr_Format(PyExc_ValueError, "length %lld > max_positions %zu", L, d.P);
    if (threads < 0) return PyErr_Format(PyExc_ValueError, "threads must be >= 0, got %d", threads);
    size_t total, forward;
    const char *err = NULL;
    if (model_workspace_floats(&d, (size_t)B, (size_t)L, threads ? threads : dl_max_threads(),
                               &total, &forward, &err)) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    return PyLong_FromSize_t((backward ? total : forward) * sizeof(float));
}

PyMethodDef model_functions[] = {
    {"param_layout", (PyCFunction)(void (*)(void))py_param_layout, METH_VARARGS | METH_KEYWORDS,
     "param_layout(vocab_size, emb_dim, hidden_dim, num_layers, num_heads, ffn_dim, time_dim, "
     "max_positions, *, self_conditioning=False, mask_embedding=False) -> [(name, offset, "
     "shape)]: Model(...).layout() without a model"},
    {"workspace_bytes", (PyCFunction)(void (*)(void))py_workspace_bytes,
     METH_VARARGS | METH_KEYWORDS,
     "workspace_bytes(<the 8 sizes>, batch, length, threads=0, backward=True, *, "
     "self_conditioning=False, mask_embedding=False) -> int: the "
     "activation workspace a Model holds after a forward of [batch, length] with `threads` "
     "OpenMP threads (0: the current setting); backward=False: the part a forward writes"},
    {NULL}};

/* ---------- the Model type ---------- */

static void Model_dealloc(ModelObject *self) {
    model_free(&self->m);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Model_init(ModelObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {DIM_NAMES, "dropout", "layer_norm_eps", "seed", OPTION_NAMES, NULL};
    long long v[8], seed = 0;
    double dropout = 0.0, eps = 1e-12;
    int self_cond = 0, mask_emb = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, DIM_FORMAT "|ddL$pp", kwlist, &v[0], &v[1], &v[2],
                                     &v[3], &v[4], &v[5], &v[6], &v[7], &dropout, &eps, &seed,
                                     &self_cond, &mask_emb))
        return -1;
    /* numpy views of params and grads may be alive: their buffers must stay */
    if (self->m.params) {
        PyErr_SetString(PyExc_RuntimeError,
                        "Model.__init__ called on an initialised model; create a new Model");
        return -1;
    }
    ModelDims d;
    if (dims_from(v, dropout, eps, self_cond, mask_emb, &d)) return -1;
    const char *err = NULL;
    int oom = 0;
    if (model_init(&self->m, &d, (uint64_t)seed, &err, &oom)) {
        set_error(err, oom);
        return -1;
    }
    return 0;
}

static PyObject *view_of(ModelObject *self, float *data) {
    if (!data) {
        PyErr_SetString(PyExc_RuntimeError, "Model.__init__ has not completed");
        return NULL;
    }
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

/* [(name, offset, shape)] in DiffuSeq's state-dict names. The table is fixed at
 * __init__, so no busy flag. */
static PyObject *Model_layout(ModelObject *self, PyObject *unused) {
    if (!self->m.params) {
        PyErr_SetString(PyExc_RuntimeError, "Model.__init__ has not completed");
        return NULL;
    }
    return layout_list(&self->m.lay);
}

/* A failed bf16 preparation: no AMX (RuntimeError), else out of memory. */
static void set_bf16_error(const char *err) {
    PyErr_SetString(amx_available() ? PyExc_MemoryError : PyExc_RuntimeError, err);
}

static PyObject *Model_forward(ModelObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "t", "train", "seed", "bf16", "row_offset", "x_self_cond", NULL};
    PyObject *xo, *to, *sco = Py_None;
    int train = 0, bf16 = 0;
    unsigned long long seed = 0;
    Py_ssize_t row0 = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|pKpnO", kwlist, &xo, &to, &train, &seed, &bf16,
                                     &row0, &sco))
        return NULL;
    if (row0 < 0 || (size_t)row0 > ((size_t)1 << 40)) {
        PyErr_Format(PyExc_ValueError, "row_offset must be in [0, 2^40], got %zd", row0);
        return NULL;
    }
    if (acquire(self)) return NULL;
    Model *m = &self->m;
    PyObject *y = NULL;
    npy_intp xs[3] = {-1, -1, (npy_intp)m->d.E};
    PyArrayObject *x = check_array(xo, "x", NPY_FLOAT32, 3, xs, 0), *t = NULL;
    if (!x) goto done;
    size_t B = (size_t)PyArray_DIM(x, 0), L = (size_t)PyArray_DIM(x, 1);
    if (B == 0 || L == 0) {
        PyErr_SetString(PyExc_ValueError, "x must have a positive batch size and length");
        goto done;
    }
    if (L > m->d.P) {
        PyErr_Format(PyExc_ValueError, "x has length %zu > max_positions %zu", L, m->d.P);
        goto done;
    }
    npy_intp ts[1] = {(npy_intp)B};
    if (!(t = check_array(to, "t", NPY_FLOAT32, 1, ts, 0))) goto done;
    const float *x_sc = NULL;
    if (sco != Py_None) {
        if (!m->d.self_cond) {
            PyErr_SetString(PyExc_ValueError, "x_self_cond given to a model without "
                                              "self-conditioning (self_conditioning=False)");
            goto done;
        }
        npy_intp ss[3] = {(npy_intp)B, (npy_intp)L, (npy_intp)m->d.E};
        PyArrayObject *sc = check_array(sco, "x_self_cond", NPY_FLOAT32, 3, ss, 0);
        if (!sc) goto done;
        x_sc = fdata(sc);
    }
    const char *err = NULL;
    int oom = 0;
    m->has_forward = 0; /* from here on a failure leaves no activations for backward */
    if (model_reserve(m, B, L, &err, &oom)) {
        PyErr_Format(oom ? PyExc_MemoryError : PyExc_ValueError, "%s (batch %zu, length %zu)", err,
                     B, L);
        goto done;
    }
    npy_intp ys[3] = {(npy_intp)B, (npy_intp)L, (npy_intp)m->d.E};
    if (!(y = new_float_array(3, ys))) goto done;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    failed = bf16 && (train ? model_prepare_bf16_products(m, B * L, &err) : model_prepare_bf16(m, B, L, &err));
    if (!failed)
        model_forward(m, fdata(x), x_sc, fdata(t), fdata((PyArrayObject *)y), B, L, train, seed,
                      (size_t)row0, bf16);
    Py_END_ALLOW_THREADS
    if (failed) {
        Py_CLEAR(y);
        set_bf16_error(err);
    }
done:
    release(self);
    return y;
}

static PyObject *Model_backward(ModelObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"grad_out", "grad_hidden", "param_grads", NULL};
    PyObject *go, *gho = Py_None;
    int pg = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|Op", kwlist, &go, &gho, &pg)) return NULL;
    if (acquire(self)) return NULL;
    Model *m = &self->m;
    PyObject *dx = NULL;
    if (!m->has_forward) {
        PyErr_SetString(PyExc_RuntimeError, "backward() called before forward()");
        goto done;
    }
    const Activations *a = &m->act;
    npy_intp ys[3] = {(npy_intp)a->B, (npy_intp)a->L, (npy_intp)m->d.E};
    PyArrayObject *g = check_array(go, "grad_out", NPY_FLOAT32, 3, ys, 0);
    if (!g) goto done;
    const float *gh = NULL;
    if (gho != Py_None) {
        npy_intp hs[3] = {(npy_intp)a->B, (npy_intp)a->L, (npy_intp)m->d.H};
        PyArrayObject *h = check_array(gho, "grad_hidden", NPY_FLOAT32, 3, hs, 0);
        if (!h) goto done;
        gh = fdata(h);
    }
    if (!(dx = new_float_array(3, ys))) goto done;
    int failed;
    const char *err = NULL;
    Py_BEGIN_ALLOW_THREADS
    failed = m->last_bf16 && model_prepare_bf16_products(m, a->B * a->L, &err) ? 2 : 0;
    if (!failed) failed = model_backward(m, fdata(g), gh, fdata((PyArrayObject *)dx), pg);
    Py_END_ALLOW_THREADS
    if (failed == 2) {
        Py_CLEAR(dx);
        set_bf16_error(err);
    } else if (failed) {
        Py_CLEAR(dx);
        PyErr_SetString(PyExc_MemoryError,
                        "out of memory in backward(); the parameter gradients are incomplete");
    }
done:
    release(self);
    return dx;
}

static PyObject *Model_hidden(ModelObject *self, PyObject *unused) {
    if (acquire(self)) return NULL;
    Model *m = &self->m;
    PyObject *h = NULL;
    if (!m->has_forward) {
        PyErr_SetString(PyExc_RuntimeError, "hidden() called before forward()");
        goto done;
    }
    const Activations *a = &m->act;
    npy_intp hs[3] = {(npy_intp)a->B, (npy_intp)a->L, (npy_intp)m->d.H};
    if (!(h = new_float_array(3, hs))) goto done;
    memcpy(fdata((PyArrayObject *)h), model_hidden(m), a->B * a->L * m->d.H * sizeof(float));
done:
    release(self);
    return h;
}

/* h[..., E] with at most DL_BLAS_MAX rows (the M of the head's product). */
static PyArrayObject *check_head_rows(PyObject *o, const char *name, size_t width, size_t *rows) {
    PyArrayObject *a = check_rows(o, name, width, rows);
    char what[64];
    snprintf(what, sizeof what, "the number of rows of %s", name);
    return a && check_blas_size(what, *rows) == 0 ? a : NULL;
}

static PyObject *Model_logits(ModelObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"h", "bf16", NULL};
    PyObject *ho;
    int bf16 = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|p", kwlist, &ho, &bf16)) return NULL;
    if (acquire(self)) return NULL;
    Model *m = &self->m;
    PyObject *out = NULL;
    size_t M;
    PyArrayObject *h = check_head_rows(ho, "h", m->d.E, &M);
    if (!h) goto done;
    int nd = PyArray_NDIM(h);
    npy_intp shape[NPY_MAXDIMS];
    memcpy(shape, PyArray_DIMS(h), nd * sizeof(npy_intp));
    shape[nd - 1] = (npy_intp)m->d.V;
    if (!(out = new_float_array(nd, shape))) goto done;
    const char *err = NULL;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = bf16 && model_prepare_bf16_products(m, M, &err);
    if (!failed) model_logits(m, fdata(h), fdata((PyArrayObject *)out), M, bf16);
    Py_END_ALLOW_THREADS
    if (failed) {
        Py_CLEAR(out);
        set_bf16_error(err);
    }
done:
    release(self);
    return out;
}

static PyObject *Model_tied_cross_entropy(ModelObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"h", "target", "scale", "grads", "bf16", NULL};
    PyObject *ho, *to, *so, *result = NULL, *nll = NULL, *dh = NULL;
    int grads = 1, bf16 = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|pp", kwlist, &ho, &to, &so, &grads, &bf16))
        return NULL;
    if (bf16 && !amx_available()) {
        set_bf16_error("bf16 needs a CPU with AMX-BF16 (Intel Sapphire Rapids or later); this "
                       "machine or build has none");
        return NULL;
    }
    if (acquire(self)) return NULL;
    Model *m = &self->m;
    npy_intp hs[2] = {-1, (npy_intp)m->d.E};
    PyArrayObject *h = check_array(ho, "h", NPY_FLOAT32, 2, hs, 0), *t = NULL, *sc = NULL;
    if (!h) goto done;
    npy_intp M = PyArray_DIM(h, 0), ms[1] = {M};
    if (check_blas_size("the number of rows of h", (size_t)M)) goto done;
    if (!(t = check_array(to, "target", NPY_INT64, 1, ms, 0)) ||
        !(sc = check_array(so, "scale", NPY_FLOAT32, 1, ms, 0)))
        goto done;
    const int64_t *tg = (const int64_t *)PyArray_DATA(t);
    for (npy_intp i = 0; i < M; i++) {
        if (tg[i] < 0 || (size_t)tg[i] >= m->d.V) {
            PyErr_Format(PyExc_ValueError, "target contains id %lld outside [0, %zu)",
                         (long long)tg[i], m->d.V);
            goto done;
        }
    }
    if (!(nll = new_float_array(1, ms))) goto done;
    if (grads && !(dh = new_float_array(2, PyArray_DIMS(h)))) goto done;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = model_tied_cross_entropy(m, fdata(h), tg, fdata(sc), fdata((PyArrayObject *)nll),
                                      dh ? fdata((PyArrayObject *)dh) : NULL, (size_t)M, bf16);
    Py_END_ALLOW_THREADS
    if (failed) {
        PyErr_SetString(PyExc_MemoryError, "out of memory in tied_cross_entropy(); the gradients "
                                           "may be incomplete");
        goto done;
    }
    result = Py_BuildValue("(OO)", nll, dh ? dh : Py_None);
done:
    Py_XDECREF(nll);
    Py_XDECREF(dh);
    release(self);
    return result;
}

static PyObject *Model_logits_backward(ModelObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"h", "grad_logits", "bf16", NULL};
    PyObject *ho, *go;
    int bf16 = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|p", kwlist, &ho, &go, &bf16)) return NULL;
    if (acquire(self)) return NULL;
    Model *m = &self->m;
    PyObject *dh = NULL;
    size_t M, Mg;
    PyArrayObject *h = check_head_rows(ho, "h", m->d.E, &M), *g = NULL;
    if (!h || !(g = check_rows(go, "grad_logits", m->d.V, &Mg))) goto done;
    if (M != Mg) {
        PyErr_Format(PyExc_ValueError, "grad_logits has %zu rows but h has %zu", Mg, M);
        goto done;
    }
    if (!(dh = new_float_array(PyArray_NDIM(h), PyArray_DIMS(h)))) goto done;
    int failed;
    const char *err = NULL;
    Py_BEGIN_ALLOW_THREADS
    failed = bf16 && model_prepare_bf16_products(m, M, &err) ? 2 : 0;
    if (!failed) failed = model_logits_backward(m, fdata(h), fdata(g), fdata((PyArrayObject *)dh), M, bf16);
    Py_END_ALLOW_THREADS
    if (failed == 2) {
        Py_CLEAR(dh);
        set_bf16_error(err);
    } else if (failed) {
        Py_CLEAR(dh);
        PyErr_SetString(PyExc_MemoryError,
                        "out of memory in logits_backward(); the gradients are incomplete");
    }
done:
    release(self);
    return dh;
}

static PyObject *Model_embed(ModelObject *self, PyObject *args) {
    PyObject *to;
    if (!PyArg_ParseTuple(args, "O", &to)) return NULL;
    if (acquire(self)) return NULL;
    const Model *m = &self->m;
    PyObject *out = NULL;
    npy_intp s[2];
    int64_t *tok = tokens_to_int64(to, "tokens", m->d.V, s);
    if (!tok) goto done;
    npy_intp os[3] = {s[0], s[1], (npy_intp)m->d.E};
    if (!(out = new_float_array(3, os))) goto done;
    Py_BEGIN_ALLOW_THREADS
    embedding_forward(fdata((PyArrayObject *)out), tok, m->params + m->lay.word_emb,
                      (size_t)(s[0] * s[1]), m->d.E);
    Py_END_ALLOW_THREADS
done:
    free(tok);
    release(self);
    return out;
}

static PyObject *Model_embed_backward(ModelObject *self, PyObject *args) {
    PyObject *to, *go;
    if (!PyArg_ParseTuple(args, "OO", &to, &go)) return NULL;
    if (acquire(self)) return NULL;
    Model *m = &self->m;
    PyObject *result = NULL;
    npy_intp s[2];
    int64_t *tok = tokens_to_int64(to, "tokens", m->d.V, s);
    if (!tok) goto done;
    npy_intp gs[3] = {s[0], s[1], (npy_intp)m->d.E};
    PyArrayObject *g = check_array(go, "grad", NPY_FLOAT32, 3, gs, 0);
    if (!g) goto done;
    Py_BEGIN_ALLOW_THREADS
    embedding_backward(m->grads + m->lay.word_emb, tok, fdata(g), (size_t)(s[0] * s[1]), m->d.E);
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
done:
    free(tok);
    release(self);
    return result;
}

static PyObject *Model_zero_grad(ModelObject *self, PyObject *unused) {
    if (acquire(self)) return NULL;
    memset(self->m.grads, 0, self->m.lay.total * sizeof(float));
    release(self);
    Py_RETURN_NONE;
}

/* work_floats changes only in forward() with the GIL held, so this read is consistent. */
static PyObject *Model_workspace_bytes(ModelObject *self, void *c) {
    return PyLong_FromSize_t(self->m.work_floats * sizeof(float));
}

static PyMethodDef Model_methods[] = {
    {"layout", (PyCFunction)Model_layout, METH_NOARGS, "[(name, offset, shape)] of every parameter tensor."},
    {"forward", (PyCFunction)(void (*)(void))Model_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(x[B,L,E] float32, t[B] float32 model-scale, train=False, seed=0, bf16=False, "
     "row_offset=0, x_self_cond=None) -> y[B,L,E]; x_self_cond [B,L,E] (None: zeros) only "
     "for a self_conditioning model; bf16: products in bf16 on AMX (packed weights for "
     "inference, mixed precision with train)"},
    {"backward", (PyCFunction)(void (*)(void))Model_backward, METH_VARARGS | METH_KEYWORDS,
     "backward(grad_out, grad_hidden=None, param_grads=True) -> grad_x; accumulates grads "
     "(products in bf16 after a bf16 forward)"},
    {"hidden", (PyCFunction)Model_hidden, METH_NOARGS, "Copy of the last encoder output [B,L,H]."},
    {"logits", (PyCFunction)(void (*)(void))Model_logits, METH_VARARGS | METH_KEYWORDS,
     "logits(h[...,E], bf16=False) -> [...,V] = h W^T + b"},
    {"logits_backward", (PyCFunction)(void (*)(void))Model_logits_backward, METH_VARARGS | METH_KEYWORDS,
     "logits_backward(h, grad_logits, bf16=False) -> grad_h; accumulates word_embedding and "
     "lm_head.bias grads"},
    {"tied_cross_entropy", (PyCFunction)(void (*)(void))Model_tied_cross_entropy,
     METH_VARARGS | METH_KEYWORDS,
     "tied_cross_entropy(h[M,E], target[M] int64, scale[M], grads=True, bf16=False) -> (nll[M], "
     "grad_h[M,E] or None); the rounding loss through the tied head, fused; accumulates the "
     "word_embedding and lm_head.bias grads scaled by scale"},
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

PyTypeObject ModelType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dlmone._core.Model",
    .tp_basicsize = sizeof(ModelObject),
    .tp_dealloc = (destructor)Model_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Model(vocab_size, emb_dim, hidden_dim, num_layers, num_heads, ffn_dim, time_dim, "
              "max_positions, dropout=0, layer_norm_eps=1e-12, seed=0, *, "
              "self_conditioning=False, mask_embedding=False): the C network. One "
              "thread at a time: a concurrent call raises RuntimeError.",
    .tp_methods = Model_methods,
    .tp_getset = Model_getset,
    .tp_init = (initproc)Model_init,
    .tp_new = PyType_GenericNew,
};
