/* Glue for the optimiser kernels (flat float32 buffers, in place). */
#include "args.h"
#include "optim.h"

static PyArrayObject *flat(PyObject *o, const char *name, npy_intp n, int writeable) {
    npy_intp s[1] = {n};
    return check_array(o, name, NPY_FLOAT32, 1, s, writeable);
}

static PyObject *py_adamw_step(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"params", "grads", "m", "v", "lr", "beta1", "beta2", "eps",
                             "weight_decay", "step", NULL};
    PyObject *po, *go, *mo, *vo;
    float lr, b1, b2, eps, wd;
    long step;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOfffffl", kwlist, &po, &go, &mo, &vo, &lr, &b1,
                                     &b2, &eps, &wd, &step))
        return NULL;
    PyArrayObject *p = check_array(po, "params", NPY_FLOAT32, 1, NULL, 1);
    if (!p) return NULL;
    npy_intp n = PyArray_DIM(p, 0);
    PyArrayObject *g = flat(go, "grads", n, 0), *m = g ? flat(mo, "m", n, 1) : NULL,
                  *v = m ? flat(vo, "v", n, 1) : NULL;
    if (!v) return NULL;
    if (step < 1) return PyErr_Format(PyExc_ValueError, "step must be >= 1, got %ld", step);
    if (!(b1 >= 0.0f && b1 < 1.0f) || !(b2 >= 0.0f && b2 < 1.0f))
        return PyErr_Format(PyExc_ValueError, "betas must be in [0, 1), got (%g, %g)", b1, b2);
    Py_BEGIN_ALLOW_THREADS
    adamw_step(fdata(p), fdata(g), fdata(m), fdata(v), (size_t)n, lr, b1, b2, eps, wd, step);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_clip_by_value(PyObject *mod, PyObject *args) {
    PyObject *go;
    float c;
    if (!PyArg_ParseTuple(args, "Of", &go, &c)) return NULL;
    PyArrayObject *g = check_array(go, "grads", NPY_FLOAT32, 1, NULL, 1);
    if (!g) return NULL;
    if (!(c > 0.0f)) return PyErr_Format(PyExc_ValueError, "clip_value must be positive, got %g", c);
    Py_BEGIN_ALLOW_THREADS
    clip_by_value(fdata(g), (size_t)PyArray_DIM(g, 0), c);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_global_norm(PyObject *mod, PyObject *args) {
    PyObject *go;
    if (!PyArg_ParseTuple(args, "O", &go)) return NULL;
    PyArrayObject *g = check_array(go, "grads", NPY_FLOAT32, 1, NULL, 0);
    if (!g) return NULL;
    double r;
    Py_BEGIN_ALLOW_THREADS
    r = global_norm(fdata(g), (size_t)PyArray_DIM(g, 0));
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(r);
}

static PyObject *py_scale(PyObject *mod, PyObject *args) {
    PyObject *go;
    float s;
    if (!PyArg_ParseTuple(args, "Of", &go, &s)) return NULL;
    PyArrayObject *g = check_array(go, "x", NPY_FLOAT32, 1, NULL, 1);
    if (!g) return NULL;
    Py_BEGIN_ALLOW_THREADS
    scale_inplace(fdata(g), (size_t)PyArray_DIM(g, 0), s);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_ema_update(PyObject *mod, PyObject *args) {
    PyObject *eo, *po;
    float decay;
    if (!PyArg_ParseTuple(args, "OOf", &eo, &po, &decay)) return NULL;
    PyArrayObject *e = check_array(eo, "ema", NPY_FLOAT32, 1, NULL, 1);
    if (!e) return NULL;
    PyArrayObject *p = flat(po, "params", PyArray_DIM(e, 0), 0);
    if (!p) return NULL;
    if (!(decay >= 0.0f && decay <= 1.0f))
        return PyErr_Format(PyExc_ValueError, "decay must be in [0, 1], got %g", decay);
    Py_BEGIN_ALLOW_THREADS
    ema_update(fdata(e), fdata(p), (size_t)PyArray_DIM(e, 0), decay);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_count_nonfinite(PyObject *mod, PyObject *args) {
    PyObject *xo;
    if (!PyArg_ParseTuple(args, "O", &xo)) return NULL;
    PyArrayObject *x = check_array(xo, "x", NPY_FLOAT32, 1, NULL, 0);
    if (!x) return NULL;
    size_t r;
    Py_BEGIN_ALLOW_THREADS
    r = count_nonfinite(fdata(x), (size_t)PyArray_DIM(x, 0));
    Py_END_ALLOW_THREADS
    return PyLong_FromSize_t(r);
}

PyMethodDef optim_methods[] = {
    {"adamw_step", (PyCFunction)(void (*)(void))py_adamw_step, METH_VARARGS | METH_KEYWORDS,
     "adamw_step(params, grads, m, v, lr, beta1, beta2, eps, weight_decay, step)"},
    {"clip_by_value", py_clip_by_value, METH_VARARGS, "clip_by_value(grads, c): in place"},
    {"global_norm", py_global_norm, METH_VARARGS, "global_norm(grads) -> float (L2)"},
    {"scale", py_scale, METH_VARARGS, "scale(x, s): x *= s in place"},
    {"ema_update", py_ema_update, METH_VARARGS, "ema_update(ema, params, decay): in place"},
    {"count_nonfinite", py_count_nonfinite, METH_VARARGS, "count_nonfinite(x) -> int"},
    {NULL}};
