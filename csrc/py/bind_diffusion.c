/* Glue for the diffusion kernels. */
#include "diffusion.h"
#include "args.h"

static PyObject *py_sqrt_schedule(PyObject *mod, PyObject *args) {
    Py_ssize_t T;
    if (!PyArg_ParseTuple(args, "n", &T)) return NULL;
    if (T < 1 || T > 1000000) return PyErr_Format(PyExc_ValueError, "diffusion_steps must be in [1, 1e6], got %zd", T);
    npy_intp n = T;
    PyObject *b = PyArray_SimpleNew(1, &n, NPY_FLOAT64), *a = PyArray_SimpleNew(1, &n, NPY_FLOAT64);
    if (!a || !b) {
        Py_XDECREF(a);
        Py_XDECREF(b);
        return NULL;
    }
    sqrt_schedule((double *)PyArray_DATA((PyArrayObject *)b), (double *)PyArray_DATA((PyArrayObject *)a), (size_t)T);
    return Py_BuildValue("(NN)", b, a);
}

static PyObject *py_gaussian_fill(PyObject *mod, PyObject *args) {
    PyObject *o;
    unsigned long long seed;
    if (!PyArg_ParseTuple(args, "OK", &o, &seed)) return NULL;
    if (!PyArray_Check(o)) return PyErr_Format(PyExc_TypeError, "out must be a numpy.ndarray");
    PyArrayObject *a = check_array(o, "out", NPY_FLOAT32, PyArray_NDIM((PyArrayObject *)o), NULL, 1);
    if (!a) return NULL;
    Py_BEGIN_ALLOW_THREADS
    gaussian_fill(fdata(a), (size_t)PyArray_SIZE(a), seed);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_q_sample(PyObject *mod, PyObject *args) {
    PyObject *xo, *no, *ao, *so, *mo;
    if (!PyArg_ParseTuple(args, "OOOOO", &xo, &no, &ao, &so, &mo)) return NULL;
    npy_intp s[3] = {-1, -1, -1};
    PyArrayObject *x = check_ble(xo, "x0", s), *n = x ? check_ble(no, "noise", s) : NULL;
    if (!n) return NULL;
    PyArrayObject *a = check_array(ao, "sqrt_alpha_bar", NPY_FLOAT32, 1, s, 0);
    PyArrayObject *sd = a ? check_array(so, "sqrt_one_minus_alpha_bar", NPY_FLOAT32, 1, s, 0) : NULL;
    PyArrayObject *m = sd ? check_array(mo, "mask", NPY_FLOAT32, 2, s, 0) : NULL;
    if (!m) return NULL;
    PyObject *out = new_float_array(3, s);
    if (!out) return NULL;
    Py_BEGIN_ALLOW_THREADS
    q_sample(fdata((PyArrayObject *)out), fdata(x), fdata(n), fdata(a), fdata(sd), fdata(m),
             (size_t)s[0], (size_t)s[1], (size_t)s[2]);
    Py_END_ALLOW_THREADS
    return out;
}

static PyObject *py_mse_loss(PyObject *mod, PyObject *args) {
    PyObject *fo, *xo, *mo, *uo, *wo;
    if (!PyArg_ParseTuple(args, "OOOOO", &fo, &xo, &mo, &uo, &wo)) return NULL;
    npy_intp s[3] = {-1, -1, -1};
    PyArrayObject *f = check_ble(fo, "pred", s), *x = f ? check_ble(xo, "x0", s) : NULL;
    PyArrayObject *xm = x ? check_ble(mo, "x0_mean", s) : NULL;
    PyArrayObject *u = xm ? check_array(uo, "use_mean", NPY_BOOL, 1, s, 0) : NULL;
    PyArrayObject *w = u ? check_array(wo, "weight", NPY_FLOAT32, 1, s, 0) : NULL;
    if (!w) return NULL;
    PyObject *mse = new_float_array(1, s), *g = new_float_array(3, s);
    if (!mse || !g) {
        Py_XDECREF(mse);
        Py_XDECREF(g);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    mse_loss(fdata((PyArrayObject *)mse), fdata((PyArrayObject *)g), fdata(f), fdata(x), fdata(xm),
             (const uint8_t *)PyArray_DATA(u), fdata(w), (size_t)s[0], (size_t)s[1], (size_t)s[2]);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(NN)", mse, g);
}

static PyObject *py_cross_entropy(PyObject *mod, PyObject *args) {
    PyObject *lo, *to, *so;
    if (!PyArg_ParseTuple(args, "OOO", &lo, &to, &so)) return NULL;
    PyArrayObject *lg = check_array(lo, "logits", NPY_FLOAT32, 2, NULL, 1);
    if (!lg) return NULL;
    npy_intp M = PyArray_DIM(lg, 0), V = PyArray_DIM(lg, 1);
    if (V < 1) return PyErr_Format(PyExc_ValueError, "logits must have at least one class");
    npy_intp s[1] = {M};
    PyArrayObject *t = check_array(to, "target", NPY_INT64, 1, s, 0);
    PyArrayObject *sc = t ? check_array(so, "scale", NPY_FLOAT32, 1, s, 0) : NULL;
    if (!sc) return NULL;
    const int64_t *tg = (const int64_t *)PyArray_DATA(t);
    for (npy_intp i = 0; i < M; i++) {
        if (tg[i] < 0 || tg[i] >= V)
            return PyErr_Format(PyExc_ValueError, "target contains id %lld outside [0, %ld)",
                                (long long)tg[i], (long)V);
    }
    PyObject *nll = new_float_array(1, s);
    if (!nll) return NULL;
    Py_BEGIN_ALLOW_THREADS
    cross_entropy(fdata((PyArrayObject *)nll), fdata(lg), tg, fdata(sc), (size_t)M, (size_t)V);
    Py_END_ALLOW_THREADS
    return nll;
}

static PyObject *py_affine_argmax(PyObject *mod, PyObject *args) {
    PyObject *xo, *wo, *co, *ao = Py_None;
    if (!PyArg_ParseTuple(args, "OOO|O", &xo, &wo, &co, &ao)) return NULL;
    PyArrayObject *W = check_array(wo, "W", NPY_FLOAT32, 2, NULL, 0);
    if (!W) return NULL;
    size_t V = (size_t)PyArray_DIM(W, 0), E = (size_t)PyArray_DIM(W, 1), M;
    if (V == 0 || E == 0) return PyErr_Format(PyExc_ValueError, "W must be non-empty");
    if (check_blas_size("the number of rows of W", V) || check_blas_size("the width of W", E))
        return NULL;
    PyArrayObject *x = check_rows(xo, "x", E, &M);
    if (!x) return NULL;
    npy_intp vs[1] = {(npy_intp)V};
    PyArrayObject *c = check_array(co, "c", NPY_FLOAT32, 1, vs, 0);
    if (!c) return NULL;
    int nd = PyArray_NDIM(x);
    const uint8_t *active = NULL;
    if (ao != Py_None) {
        PyArrayObject *a = check_array(ao, "active", NPY_BOOL, nd - 1, PyArray_DIMS(x), 0);
        if (!a) return NULL;
        active = (const uint8_t *)PyArray_DATA(a);
    }
    PyObject *out = PyArray_ZEROS(nd - 1, PyArray_DIMS(x), NPY_INT64, 0);
    if (!out) return NULL;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = affine_argmax((int64_t *)PyArray_DATA((PyArrayObject *)out), fdata(x), fdata(W), fdata(c),
                           active, M, E, V);
    Py_END_ALLOW_THREADS
    if (failed) {
        Py_DECREF(out);
        return PyErr_NoMemory();
    }
    return out;
}

static PyObject *py_posterior_step(PyObject *mod, PyObject *args) {
    PyObject *x0o, *xto, *no, *c1o, *c2o, *sgo, *mo, *ano;
    if (!PyArg_ParseTuple(args, "OOOOOOOO", &x0o, &xto, &no, &c1o, &c2o, &sgo, &mo, &ano)) return NULL;
    npy_intp s[3] = {-1, -1, -1};
    PyArrayObject *x0 = check_ble(x0o, "x0", s), *xt = x0 ? check_ble(xto, "xt", s) : NULL;
    PyArrayObject *an = xt ? check_ble(ano, "anchor", s) : NULL;
    if (!an) return NULL;
    PyArrayObject *nz = NULL;
    if (no != Py_None && !(nz = check_ble(no, "noise", s))) return NULL;
    PyArrayObject *c1 = check_array(c1o, "coef_x0", NPY_FLOAT32, 1, s, 0);
    PyArrayObject *c2 = c1 ? check_array(c2o, "coef_xt", NPY_FLOAT32, 1, s, 0) : NULL;
    PyArrayObject *sg = c2 ? check_array(sgo, "sigma", NPY_FLOAT32, 1, s, 0) : NULL;
    PyArrayObject *m = sg ? check_array(mo, "mask", NPY_FLOAT32, 2, s, 0) : NULL;
    if (!m) return NULL;
    PyObject *out = new_float_array(3, s);
    if (!out) return NULL;
    Py_BEGIN_ALLOW_THREADS
    posterior_step(fdata((PyArrayObject *)out), fdata(x0), fdata(xt), nz ? fdata(nz) : NULL, fdata(c1),
                   fdata(c2), fdata(sg), fdata(m), fdata(an), (size_t)s[0], (size_t)s[1], (size_t)s[2]);
    Py_END_ALLOW_THREADS
    return out;
}

PyMethodDef diffusion_methods[] = {
    {"sqrt_schedule", py_sqrt_schedule, METH_VARARGS, "sqrt_schedule(T) -> (betas, alphas_cumprod), float64"},
    {"gaussian_fill", py_gaussian_fill, METH_VARARGS, "gaussian_fill(out, seed): counter-based N(0,1), in place"},
    {"q_sample", py_q_sample, METH_VARARGS,
     "q_sample(x0, noise, sqrt_alpha_bar[B], sqrt_one_minus_alpha_bar[B], mask[B,L]) -> x_t (mask 0 keeps x0)"},
    {"mse_loss", py_mse_loss, METH_VARARGS,
     "mse_loss(pred, x0, x0_mean, use_mean[B] bool, weight[B]) -> (mse[B], grad_pred)"},
    {"cross_entropy", py_cross_entropy, METH_VARARGS,
     "cross_entropy(logits[M,V], target[M] int64, scale[M]) -> nll[M]; logits become scale*(softmax-onehot)"},
    {"affine_argmax", py_affine_argmax, METH_VARARGS,
     "affine_argmax(x[...,E], W[V,E], c[V], active=None) -> argmax_v(x.W_v + c_v), int64[...]"},
    {"posterior_step", py_posterior_step, METH_VARARGS,
     "posterior_step(x0, xt, noise|None, coef_x0[B], coef_xt[B], sigma[B], mask[B,L], anchor) -> x_prev"},
    {NULL}};
