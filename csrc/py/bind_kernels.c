/* Glue exposing single layer kernels, for kernel-level tests (finite differences,
 * accuracy of the vectorised math) and for benchmarks. */
#include "args.h"
#include "amx.h"
#include "kernels.h"
#include "mathfun.h"

/* elementwise(op, x) -> y for a float32 array of any shape; op names below. */
static PyObject *py_elementwise(PyObject *mod, PyObject *args) {
    const char *op;
    PyObject *xo;
    if (!PyArg_ParseTuple(args, "sO", &op, &xo)) return NULL;
    if (!PyArray_Check(xo)) return PyErr_Format(PyExc_TypeError, "x must be a numpy.ndarray");
    PyArrayObject *x = check_array(xo, "x", NPY_FLOAT32, PyArray_NDIM((PyArrayObject *)xo), NULL, 0);
    if (!x) return NULL;
    size_t n = (size_t)PyArray_SIZE(x);
    PyObject *out = new_float_array(PyArray_NDIM(x), PyArray_DIMS(x));
    if (!out) return NULL;
    float *y = fdata((PyArrayObject *)out);
    const float *a = fdata(x);
    float *ones = NULL;
    if (!strcmp(op, "exp")) {
        for (size_t i = 0; i < n; i++) y[i] = dl_expf(a[i]);
    } else if (!strcmp(op, "erf")) {
        for (size_t i = 0; i < n; i++) y[i] = dl_erff(a[i]);
    } else if (!strcmp(op, "tanh")) {
        tanh_forward(y, a, n);
    } else if (!strcmp(op, "gelu")) {
        gelu_forward(y, a, n);
    } else if (!strcmp(op, "silu")) {
        silu_forward(y, a, n);
    } else if (!strcmp(op, "gelu_grad") || !strcmp(op, "silu_grad")) {
        size_t bytes;
        ones = dl_mul_overflows(n ? n : 1, sizeof(float), &bytes) ? NULL : malloc(bytes);
        if (!ones) {
            Py_DECREF(out);
            return PyErr_NoMemory();
        }
        for (size_t i = 0; i < n; i++) ones[i] = 1.0f;
        if (op[0] == 'g') gelu_backward(y, a, ones, n);
        else silu_backward(y, a, ones, n);
        free(ones);
    } else {
        Py_DECREF(out);
        return PyErr_Format(PyExc_ValueError, "unknown op %s (exp, erf, tanh, gelu, silu, gelu_grad, silu_grad)", op);
    }
    return out;
}

static PyObject *py_layernorm(PyObject *mod, PyObject *args) {
    PyObject *xo, *wo, *bo;
    float eps;
    if (!PyArg_ParseTuple(args, "OOOf", &xo, &wo, &bo, &eps)) return NULL;
    PyArrayObject *x = check_array(xo, "x", NPY_FLOAT32, 2, NULL, 0);
    if (!x) return NULL;
    npy_intp M = PyArray_DIM(x, 0), C = PyArray_DIM(x, 1), cs[1] = {C}, ms[1] = {M};
    PyArrayObject *w = check_array(wo, "weight", NPY_FLOAT32, 1, cs, 0);
    PyArrayObject *b = w ? check_array(bo, "bias", NPY_FLOAT32, 1, cs, 0) : NULL;
    if (!b) return NULL;
    PyObject *y = new_float_array(2, PyArray_DIMS(x)), *res = new_float_array(2, PyArray_DIMS(x));
    PyObject *mean = new_float_array(1, ms), *rstd = new_float_array(1, ms);
    if (!y || !res || !mean || !rstd) {
        Py_XDECREF(y); Py_XDECREF(res); Py_XDECREF(mean); Py_XDECREF(rstd);
        return NULL;
    }
    layernorm_forward(fdata((PyArrayObject *)y), fdata((PyArrayObject *)res), fdata((PyArrayObject *)mean),
                      fdata((PyArrayObject *)rstd), fdata(x), NULL, fdata(w), fdata(b), (size_t)M, (size_t)C, eps);
    Py_DECREF(res);
    return Py_BuildValue("(NNN)", y, mean, rstd);
}

static PyObject *py_layernorm_backward(PyObject *mod, PyObject *args) {
    PyObject *go, *xo, *mo, *ro, *wo;
    if (!PyArg_ParseTuple(args, "OOOOO", &go, &xo, &mo, &ro, &wo)) return NULL;
    PyArrayObject *x = check_array(xo, "x", NPY_FLOAT32, 2, NULL, 0);
    if (!x) return NULL;
    npy_intp M = PyArray_DIM(x, 0), C = PyArray_DIM(x, 1), cs[1] = {C}, ms[1] = {M};
    PyArrayObject *g = check_array(go, "grad_out", NPY_FLOAT32, 2, PyArray_DIMS(x), 0);
    PyArrayObject *mn = g ? check_array(mo, "mean", NPY_FLOAT32, 1, ms, 0) : NULL;
    PyArrayObject *rs = mn ? check_array(ro, "rstd", NPY_FLOAT32, 1, ms, 0) : NULL;
    PyArrayObject *w = rs ? check_array(wo, "weight", NPY_FLOAT32, 1, cs, 0) : NULL;
    if (!w) return NULL;
    PyObject *dx = new_float_array(2, PyArray_DIMS(x));
    PyObject *dw = PyArray_ZEROS(1, cs, NPY_FLOAT32, 0), *db = PyArray_ZEROS(1, cs, NPY_FLOAT32, 0);
    if (!dx || !dw || !db) {
        Py_XDECREF(dx); Py_XDECREF(dw); Py_XDECREF(db);
        return NULL;
    }
    layernorm_backward(fdata((PyArrayObject *)dx), fdata((PyArrayObject *)dw), fdata((PyArrayObject *)db),
                       fdata(g), fdata(x), fdata(mn), fdata(rs), fdata(w), (size_t)M, (size_t)C);
    return Py_BuildValue("(NNN)", dx, dw, db);
}

/* The sizes of attention and attention_backward from qkv[B, L, 3H] and the heads: both
 * directions check the same things. 0, or -1 with an exception. */
static int attention_sizes(PyArrayObject *q, Py_ssize_t A, float p, size_t *B, size_t *L,
                           size_t *H) {
    npy_intp b = PyArray_DIM(q, 0), l = PyArray_DIM(q, 1), h3 = PyArray_DIM(q, 2);
    if (A < 1 || h3 < 3 || h3 % (3 * A) || b < 1 || l < 1) {
        PyErr_Format(PyExc_ValueError,
                     "qkv must be [B, L, 3H] with B, L >= 1 and H a positive multiple of heads=%zd", A);
        return -1;
    }
    if (!(p >= 0.0f && p < 1.0f)) {
        PyErr_Format(PyExc_ValueError, "dropout must be in [0, 1), got %g", p);
        return -1;
    }
    /* L and 3H are sizes and leading dimensions of the per-head products */
    if (check_blas_size("the length of qkv", (size_t)l) || check_blas_size("the width of qkv", (size_t)h3))
        return -1;
    *B = (size_t)b;
    *L = (size_t)l;
    *H = (size_t)(h3 / 3);
    return 0;
}

/* Scratch of attention_scratch_floats for each thread; NULL with MemoryError. */
static float *attention_scratch(size_t L, size_t H, size_t A, int threads) {
    size_t bytes;
    float *s = NULL;
    if (!dl_mul_overflows(attention_scratch_floats(L, H, A), (size_t)threads * sizeof(float), &bytes))
        s = malloc(bytes);
    if (!s) PyErr_NoMemory();
    return s;
}

static PyObject *py_attention(PyObject *mod, PyObject *args) {
    PyObject *qo;
    Py_ssize_t A;
    float p = 0.0f;
    unsigned long long seed = 0;
    if (!PyArg_ParseTuple(args, "On|fK", &qo, &A, &p, &seed)) return NULL;
    PyArrayObject *q = check_array(qo, "qkv", NPY_FLOAT32, 3, NULL, 0);
    size_t B, L, H;
    if (!q || attention_sizes(q, A, p, &B, &L, &H)) return NULL;
    npy_intp cs[3] = {(npy_intp)B, (npy_intp)L, (npy_intp)H}, as[4] = {(npy_intp)B, (npy_intp)A, (npy_intp)L, (npy_intp)L};
    PyObject *ctx = new_float_array(3, cs), *att = new_float_array(4, as);
    int threads = dl_max_threads();
    float *scratch = ctx && att ? attention_scratch(L, H, (size_t)A, threads) : NULL;
    if (!scratch) {
        Py_XDECREF(ctx);
        Py_XDECREF(att);
        return NULL;
    }
    attention_forward(fdata((PyArrayObject *)ctx), fdata((PyArrayObject *)att), fdata(q), B, L, H,
                      (size_t)A, p, seed, 0, 0, scratch, threads);
    free(scratch);
    return Py_BuildValue("(NN)", ctx, att);
}

static PyObject *py_attention_backward(PyObject *mod, PyObject *args) {
    PyObject *go, *ao, *qo;
    Py_ssize_t A;
    float p = 0.0f;
    unsigned long long seed = 0;
    if (!PyArg_ParseTuple(args, "OOOn|fK", &go, &ao, &qo, &A, &p, &seed)) return NULL;
    PyArrayObject *q = check_array(qo, "qkv", NPY_FLOAT32, 3, NULL, 0);
    size_t B, L, H;
    if (!q || attention_sizes(q, A, p, &B, &L, &H)) return NULL;
    npy_intp cs[3] = {(npy_intp)B, (npy_intp)L, (npy_intp)H}, as[4] = {(npy_intp)B, (npy_intp)A, (npy_intp)L, (npy_intp)L};
    PyArrayObject *g = check_array(go, "grad_ctx", NPY_FLOAT32, 3, cs, 0);
    PyArrayObject *a = g ? check_array(ao, "att", NPY_FLOAT32, 4, as, 0) : NULL;
    if (!a) return NULL;
    PyObject *dq = new_float_array(3, PyArray_DIMS(q));
    int threads = dl_max_threads();
    float *scratch = dq ? attention_scratch(L, H, (size_t)A, threads) : NULL;
    if (!scratch) {
        Py_XDECREF(dq);
        return NULL;
    }
    attention_backward(fdata((PyArrayObject *)dq), fdata(g), fdata(a), fdata(q), B, L, H, (size_t)A,
                       p, seed, 0, 0, scratch, threads);
    free(scratch);
    return dq;
}

static PyObject *py_timestep_embedding(PyObject *mod, PyObject *args) {
    PyObject *to;
    Py_ssize_t D;
    if (!PyArg_ParseTuple(args, "On", &to, &D)) return NULL;
    PyArrayObject *t = check_array(to, "t", NPY_FLOAT32, 1, NULL, 0);
    if (!t) return NULL;
    if (D < 2) return PyErr_Format(PyExc_ValueError, "dim must be >= 2, got %zd", D);
    npy_intp s[2] = {PyArray_DIM(t, 0), (npy_intp)D};
    PyObject *out = new_float_array(2, s);
    if (!out) return NULL;
    timestep_embedding(fdata((PyArrayObject *)out), fdata(t), (size_t)s[0], (size_t)D);
    return out;
}

/* linear(x[M,K], W[N,K], b[N] or None) -> x W^T + b: the product every model layer uses
 * (fixed blocks over OpenMP threads, single-threaded sgemm per block). */
static PyObject *py_linear(PyObject *mod, PyObject *args) {
    PyObject *xo, *wo, *bo = Py_None;
    if (!PyArg_ParseTuple(args, "OO|O", &xo, &wo, &bo)) return NULL;
    PyArrayObject *x = check_array(xo, "x", NPY_FLOAT32, 2, NULL, 0);
    if (!x) return NULL;
    npy_intp M = PyArray_DIM(x, 0), K = PyArray_DIM(x, 1), ws[2] = {-1, K};
    PyArrayObject *w = check_array(wo, "weight", NPY_FLOAT32, 2, ws, 0);
    if (!w) return NULL;
    npy_intp N = PyArray_DIM(w, 0), bs[1] = {N}, ys[2] = {M, N};
    PyArrayObject *b = NULL;
    if (bo != Py_None && !(b = check_array(bo, "bias", NPY_FLOAT32, 1, bs, 0))) return NULL;
    if (check_blas_size("the number of rows of x", (size_t)M) ||
        check_blas_size("the width of x", (size_t)K) ||
        check_blas_size("the number of rows of weight", (size_t)N))
        return NULL;
    PyObject *y = new_float_array(2, ys);
    if (!y) return NULL;
    float *yd = fdata((PyArrayObject *)y);
    const float *xd = fdata(x), *wd = fdata(w), *bd = b ? fdata(b) : NULL;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = linear_forward(yd, xd, wd, bd, (size_t)M, (size_t)K, (size_t)N);
    Py_END_ALLOW_THREADS
    if (failed) {
        Py_DECREF(y);
        return PyErr_NoMemory();
    }
    return y;
}

static PyObject *py_matmul(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"a", "b", "trans_a", "trans_b", "bf16", NULL};
    PyObject *ao, *bo;
    int ta = 0, tb = 0, bf16 = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|ppp", kwlist, &ao, &bo, &ta, &tb, &bf16))
        return NULL;
    PyArrayObject *a = check_array(ao, "a", NPY_FLOAT32, 2, NULL, 0);
    if (!a) return NULL;
    npy_intp M = PyArray_DIM(a, ta ? 1 : 0), K = PyArray_DIM(a, ta ? 0 : 1);
    npy_intp bs[2] = {tb ? -1 : K, tb ? K : -1};
    PyArrayObject *b = check_array(bo, "b", NPY_FLOAT32, 2, bs, 0);
    if (!b) return NULL;
    npy_intp N = PyArray_DIM(b, tb ? 0 : 1), cs[2] = {M, N};
    if (check_blas_size("the rows of a", (size_t)PyArray_DIM(a, 0)) ||
        check_blas_size("the columns of a", (size_t)PyArray_DIM(a, 1)) ||
        check_blas_size("the rows of b", (size_t)PyArray_DIM(b, 0)) ||
        check_blas_size("the columns of b", (size_t)PyArray_DIM(b, 1)))
        return NULL;
    Bf16Products products = {NULL, 0};
    if (bf16) {
        if (!amx_available()) {
            PyErr_SetString(PyExc_RuntimeError, "bf16 needs a CPU with AMX-BF16 (Intel Sapphire "
                                                "Rapids or later); this machine or build has none");
            return NULL;
        }
        size_t bytes;
        products.elems = amx_matmul_scratch((size_t)M, (size_t)N, (size_t)K);
        if (dl_mul_overflows(products.elems, sizeof(uint16_t), &bytes) ||
            !(products.scratch = malloc(bytes ? bytes : 1)))
            return PyErr_NoMemory();
    }
    PyObject *c = new_float_array(2, cs);
    if (!c) {
        free(products.scratch);
        return NULL;
    }
    const float *ad = fdata(a), *bd = fdata(b);
    float *cd = fdata((PyArrayObject *)c);
    int failed;
    Py_BEGIN_ALLOW_THREADS
    dl_bf16_products = bf16 ? &products : NULL;
    failed = matmul(ta, tb, (size_t)M, (size_t)N, (size_t)K, 1.0f, ad, (size_t)PyArray_DIM(a, 1), bd,
                    (size_t)PyArray_DIM(b, 1), 0.0f, cd, (size_t)N);
    dl_bf16_products = NULL;
    Py_END_ALLOW_THREADS
    free(products.scratch);
    if (failed) {
        Py_DECREF(c);
        return PyErr_NoMemory();
    }
    return c;
}

static PyObject *py_set_profiling(PyObject *mod, PyObject *args) {
    int on;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    dl_profile_on = on;
    Py_RETURN_NONE;
}

static PyObject *py_profile(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"reset", NULL};
    int reset = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p", kwlist, &reset)) return NULL;
    uint64_t calls[DL_K_COUNT], ns[DL_K_COUNT];
    dl_profile_read(calls, ns, reset);
    PyObject *d = PyDict_New();
    for (int k = 0; d && k < DL_K_COUNT; k++) {
        if (!calls[k]) continue;
        PyObject *v = Py_BuildValue("(Kd)", (unsigned long long)calls[k], (double)ns[k] * 1e-9);
        if (!v || PyDict_SetItemString(d, dl_kernel_names[k], v) < 0) {
            Py_XDECREF(v);
            Py_CLEAR(d);
            break;
        }
        Py_DECREF(v);
    }
    return d;
}

PyMethodDef kernel_methods[] = {
    {"linear", py_linear, METH_VARARGS, "linear(x[M,K], weight[N,K], bias[N]=None) -> x weight^T + bias"},
    {"matmul", (PyCFunction)(void (*)(void))py_matmul, METH_VARARGS | METH_KEYWORDS,
     "matmul(a, b, trans_a=False, trans_b=False, bf16=False) -> op(a) op(b); bf16: inputs "
     "rounded to bf16, float32 accumulation on AMX"},
    {"set_profiling", py_set_profiling, METH_VARARGS, "set_profiling(on): per-kernel timers on/off"},
    {"profile", (PyCFunction)(void (*)(void))py_profile, METH_VARARGS | METH_KEYWORDS,
     "profile(reset=False) -> {kernel: (calls, seconds)} since the last reset"},
    {"elementwise", py_elementwise, METH_VARARGS,
     "elementwise(op, x): exp, erf (the vectorised versions), tanh, gelu, silu, gelu_grad, silu_grad"},
    {"layernorm", py_layernorm, METH_VARARGS, "layernorm(x[M,C], w, b, eps) -> (y, mean, rstd)"},
    {"layernorm_backward", py_layernorm_backward, METH_VARARGS,
     "layernorm_backward(grad_out, x, mean, rstd, w) -> (dx, dw, db)"},
    {"attention", py_attention, METH_VARARGS,
     "attention(qkv[B,L,3H], heads, dropout=0, seed=0) -> (ctx[B,L,H], att[B,A,L,L])"},
    {"attention_backward", py_attention_backward, METH_VARARGS,
     "attention_backward(grad_ctx, att, qkv, heads, dropout=0, seed=0) -> grad_qkv"},
    {"timestep_embedding", py_timestep_embedding, METH_VARARGS,
     "timestep_embedding(t[B] float32, dim) -> [B, dim]"},
    {NULL}};
