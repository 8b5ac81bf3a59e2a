/* dlmone._core: Python glue. Validates arguments, releases the GIL, dispatches.
 * Array arguments are checked by args.c; the Python layer (dlmone/model.py)
 * converts user input first. The Model type is in model_object.c. */
#define DLMONE_IMPORT_ARRAY
#include "args.h"

#include "amx.h"
#include "isa.h"

#ifndef DLMONE_CFLAGS
#define DLMONE_CFLAGS "unknown"
#endif

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
    if (PyType_Ready(&ModelType) < 0 || PyType_Ready(&WordPieceType) < 0) return NULL;
    PyObject *m = PyModule_Create(&core_module);
    if (!m) return NULL;
    if (PyModule_AddFunctions(m, optim_methods) < 0 || PyModule_AddFunctions(m, diffusion_methods) < 0 ||
        PyModule_AddFunctions(m, distill_methods) < 0 ||
        PyModule_AddFunctions(m, kernel_methods) < 0 || PyModule_AddFunctions(m, model_functions) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&ModelType);
    if (PyModule_AddObject(m, "Model", (PyObject *)&ModelType) < 0) {
        Py_DECREF(&ModelType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&WordPieceType);
    if (PyModule_AddObject(m, "WordPiece", (PyObject *)&WordPieceType) < 0) {
        Py_DECREF(&WordPieceType);
        Py_DECREF(m);
        return NULL;
    }
    /* Policy: BLAS calls run single-threaded; dlmone splits every product into
     * fixed blocks over OpenMP threads, so the two pools never compete. */
    scipy_openblas_set_num_threads(1);
    return m;
}
