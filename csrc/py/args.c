/* Argument validation for the bindings. */
#include "args.h"

static const char *shape_str(char *buf, size_t n, int nd, const npy_intp *s) {
    size_t k = (size_t)snprintf(buf, n, "(");
    for (int i = 0; i < nd && k < n; i++)
        k += (size_t)snprintf(buf + k, n - k, i ? ", %ld" : "%ld", (long)s[i]);
    if (k < n) snprintf(buf + k, n - k, nd == 1 ? ",)" : ")");
    return buf;
}

/* Borrowed check: obj must be an ndarray of dtype `type`, ndim `nd`, shape `shape`
 * (entries < 0 are free), C-contiguous, aligned, and writeable if asked. */
PyArrayObject *check_array(PyObject *obj, const char *name, int type, int nd,
                                  const npy_intp *shape, int writeable) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray, got %s", name,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != type) {
        PyArray_Descr *want = PyArray_DescrFromType(type);
        PyErr_Format(PyExc_TypeError, "%s must have dtype %S, got %S", name, (PyObject *)want,
                     (PyObject *)PyArray_DESCR(a));
        Py_DECREF(want);
        return NULL;
    }
    if (PyArray_NDIM(a) != nd) {
        PyErr_Format(PyExc_ValueError, "%s must have %d dimension(s), got %d", name, nd,
                     PyArray_NDIM(a));
        return NULL;
    }
    for (int i = 0; i < nd; i++) {
        if (shape && shape[i] >= 0 && PyArray_DIM(a, i) != shape[i]) {
            char got[128], want[128];
            PyErr_Format(PyExc_ValueError, "%s has shape %s, expected %s", name,
                         shape_str(got, sizeof got, nd, PyArray_DIMS(a)),
                         shape_str(want, sizeof want, nd, shape));
            return NULL;
        }
    }
    if (!PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous and aligned", name);
        return NULL;
    }
    if (writeable && !PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be writeable", name);
        return NULL;
    }
    return a;
}

/* Copy int32/int64 token ids to a new int64 buffer, checking range [0, V). */
int64_t *tokens_to_int64(PyObject *obj, const char *name, size_t V, npy_intp *shape2) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray of integers", name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    int t = PyArray_TYPE(a);
    if (t != NPY_INT32 && t != NPY_INT64) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype int32 or int64, got %S", name,
                     (PyObject *)PyArray_DESCR(a));
        return NULL;
    }
    if (!check_array(obj, name, t, 2, NULL, 0)) return NULL;
    shape2[0] = PyArray_DIM(a, 0);
    shape2[1] = PyArray_DIM(a, 1);
    size_t n = (size_t)PyArray_SIZE(a), bytes;
    int64_t *out = dl_mul_overflows(n ? n : 1, sizeof(int64_t), &bytes) ? NULL : malloc(bytes);
    if (!out) {
        PyErr_NoMemory();
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        int64_t v = t == NPY_INT32 ? ((int32_t *)PyArray_DATA(a))[i] : ((int64_t *)PyArray_DATA(a))[i];
        if (v < 0 || (uint64_t)v >= V) {
            PyErr_Format(PyExc_ValueError, "%s contains id %lld outside [0, %zu)", name,
                         (long long)v, V);
            free(out);
            return NULL;
        }
        out[i] = v;
    }
    return out;
}

PyObject *new_float_array(int nd, const npy_intp *shape) {
    return PyArray_SimpleNew(nd, (npy_intp *)shape, NPY_FLOAT32);
}

/* a float32 array [..., width] */
PyArrayObject *check_rows(PyObject *o, const char *name, size_t width, size_t *rows) {
    if (!PyArray_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray, got %s", name, Py_TYPE(o)->tp_name);
        return NULL;
    }
    int nd = PyArray_NDIM((PyArrayObject *)o);
    if (nd < 1) {
        PyErr_Format(PyExc_ValueError, "%s must have at least 1 dimension", name);
        return NULL;
    }
    npy_intp shape[NPY_MAXDIMS];
    for (int i = 0; i < nd; i++) shape[i] = -1;
    shape[nd - 1] = (npy_intp)width;
    PyArrayObject *a = check_array(o, name, NPY_FLOAT32, nd, shape, 0);
    if (!a) return NULL;
    *rows = (size_t)(PyArray_SIZE(a) / (npy_intp)width);
    return a;
}


/* float32 [B, L, E]; with ble[0] < 0 any shape, written back into ble */
PyArrayObject *check_ble(PyObject *o, const char *name, npy_intp *ble) {
    PyArrayObject *a = check_array(o, name, NPY_FLOAT32, 3, ble[0] >= 0 ? ble : NULL, 0);
    if (a && ble[0] < 0) {
        for (int i = 0; i < 3; i++) ble[i] = PyArray_DIM(a, i);
    }
    return a;
}

int check_blas_size(const char *what, size_t n) {
    if (n <= DL_BLAS_MAX) return 0;
    PyErr_Format(PyExc_ValueError, "%s is %zu, more than 2^31-1, the largest size the 32-bit BLAS takes",
                 what, n);
    return -1;
}
