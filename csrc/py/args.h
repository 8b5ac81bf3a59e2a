/* Argument validation shared by the bindings: arrays must be numpy float32
 * (tokens int32/int64), C-contiguous, aligned and of the documented shape. */
#ifndef DLMONE_PY_ARGS_H
#define DLMONE_PY_ARGS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define PY_ARRAY_UNIQUE_SYMBOL dlmone_ARRAY_API
#ifndef DLMONE_IMPORT_ARRAY
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include "common.h"

/* Borrowed check: obj must be an ndarray of dtype `type`, ndim `nd`, shape `shape`
 * (entries < 0 are free; shape may be NULL), C-contiguous, aligned, and writeable if asked. */
PyArrayObject *check_array(PyObject *obj, const char *name, int type, int nd,
                           const npy_intp *shape, int writeable);
/* float32 array [..., width]; *rows = size / width. */
PyArrayObject *check_rows(PyObject *o, const char *name, size_t width, size_t *rows);
/* New int64 copy of an int32/int64 [N0, N1] array, checked to lie in [0, V). */
int64_t *tokens_to_int64(PyObject *obj, const char *name, size_t V, npy_intp *shape2);
PyObject *new_float_array(int nd, const npy_intp *shape);
/* float32 [B, L, E]: with ble[0] < 0 any shape, which is then written into ble;
 * else exactly ble. */
PyArrayObject *check_ble(PyObject *o, const char *name, npy_intp *ble);

/* 0 when n fits a 32-bit BLAS size argument, else -1 with ValueError naming `what`. */
int check_blas_size(const char *what, size_t n);

static inline float *fdata(PyArrayObject *a) { return (float *)PyArray_DATA(a); }

extern PyMethodDef optim_methods[];
extern PyMethodDef diffusion_methods[];
extern PyMethodDef distill_methods[];
extern PyMethodDef kernel_methods[];
extern PyMethodDef model_functions[];
extern PyTypeObject ModelType;
extern PyTypeObject WordPieceType;

#endif
