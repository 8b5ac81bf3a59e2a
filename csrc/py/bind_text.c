/* The WordPiece type: a vocabulary in C for dlmone.tokenizer's batched encoding and
 * decoding (csrc/core/text.h). Rows it does not handle are reported back for the
 * Python reference: non-ASCII texts (encode) and rows with a token that holds
 * whitespace (decode). */
#include "args.h"
#include "text.h"

typedef struct {
    PyObject_HEAD
    WordPieceVocab vocab;
    uint8_t *plain;  /* plain[i]: token i holds no character that str.isspace() accepts */
} WordPieceObject;

static void WordPiece_dealloc(WordPieceObject *self) {
    wp_vocab_free(&self->vocab);
    free(self->plain);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Python int in [0, n) from item, or -1 with TypeError/ValueError naming it. */
static int64_t token_id_arg(PyObject *item, const char *name, size_t n) {
    if (!PyLong_Check(item) || PyBool_Check(item)) {
        PyErr_Format(PyExc_TypeError, "%s is %s, expected int", name, Py_TYPE(item)->tp_name);
        return -1;
    }
    long long value = PyLong_AsLongLong(item);
    if (value == -1 && PyErr_Occurred()) return -1;
    if (value < 0 || (unsigned long long)value >= n) {
        PyErr_Format(PyExc_ValueError, "%s = %lld is not a token id in [0, %zu)", name, value, n);
        return -1;
    }
    return value;
}

static int WordPiece_init(WordPieceObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"tokens", "unk_id", "special_ids", NULL};
    PyObject *tokens_obj, *unk_obj, *special_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO", kwlist, &tokens_obj, &unk_obj, &special_obj)) return -1;
    if (self->plain) {
        PyErr_SetString(PyExc_RuntimeError, "WordPiece is already initialised");
        return -1;
    }
    PyObject *tokens = PySequence_Fast(tokens_obj, "tokens must be a list or tuple of str");
    if (!tokens) return -1;
    PyObject *specials = PySequence_Fast(special_obj, "special_ids must be a list or tuple of int");
    if (!specials) {
        Py_DECREF(tokens);
        return -1;
    }
    size_t n = (size_t)PySequence_Fast_GET_SIZE(tokens), n_special = (size_t)PySequence_Fast_GET_SIZE(specials);
    size_t *offsets = malloc((n + 1) * sizeof *offsets);
    int32_t *special_ids = malloc((n_special ? n_special : 1) * sizeof *special_ids);
    uint8_t *plain = malloc(n ? n : 1);
    char *bytes = NULL;
    int status = -1;
    if (!offsets || !special_ids || !plain) {
        PyErr_NoMemory();
        goto done;
    }
    if (n == 0 || n > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "tokens must hold 1 to %d tokens, got %zu", INT32_MAX, n);
        goto done;
    }
    offsets[0] = 0;
    for (size_t i = 0; i < n; i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(tokens, i);
        if (!PyUnicode_Check(t)) {
            PyErr_Format(PyExc_TypeError, "tokens[%zu] is %s, expected str", i, Py_TYPE(t)->tp_name);
            goto done;
        }
        Py_ssize_t len;
        if (!PyUnicode_AsUTF8AndSize(t, &len)) goto done;
        offsets[i + 1] = offsets[i] + (size_t)len;
        int kind = PyUnicode_KIND(t);
        const void *data = PyUnicode_DATA(t);
        plain[i] = len > 0;
        for (Py_ssize_t k = 0; k < PyUnicode_GET_LENGTH(t) && plain[i]; k++)
            if (Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, k))) plain[i] = 0;
    }
    if (!(bytes = malloc(offsets[n] ? offsets[n] : 1))) {
        PyErr_NoMemory();
        goto done;
    }
    for (size_t i = 0; i < n; i++)
        memcpy(bytes + offsets[i], PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(tokens, i)), offsets[i + 1] - offsets[i]);
    int64_t unk = token_id_arg(unk_obj, "unk_id", n);
    if (unk < 0) goto done;
    for (size_t k = 0; k < n_special; k++) {
        int64_t id = token_id_arg(PySequence_Fast_GET_ITEM(specials, k), "an item of special_ids", n);
        if (id < 0) goto done;
        special_ids[k] = (int32_t)id;
    }
    if (wp_vocab_init(&self->vocab, bytes, offsets, n, (int32_t)unk, special_ids, n_special)) {
        PyErr_NoMemory();
        goto done;
    }
    self->plain = plain;
    plain = NULL;
    status = 0;
done:
    free(offsets);
    free(special_ids);
    free(plain);
    free(bytes);
    Py_DECREF(tokens);
    Py_DECREF(specials);
    return status;
}

static int check_ready(WordPieceObject *self) {
    if (self->plain) return 0;
    PyErr_SetString(PyExc_RuntimeError, "WordPiece is not initialised");
    return -1;
}

/* encode(texts) -> (ids int32[total], offsets int64[N+1], backend_rows list of int) */
static PyObject *WordPiece_encode(WordPieceObject *self, PyObject *texts_obj) {
    if (check_ready(self)) return NULL;
    if (PyUnicode_Check(texts_obj))
        return PyErr_Format(PyExc_TypeError, "texts must be a sequence of strings, not a single str");
    PyObject *texts = PySequence_Fast(texts_obj, "texts must be a list or tuple of str");
    if (!texts) return NULL;
    size_t n = (size_t)PySequence_Fast_GET_SIZE(texts);
    /* Own references: another thread may change the list while the GIL is released. */
    PyObject **held = malloc((n ? n : 1) * sizeof *held);
    const char **data = malloc((n ? n : 1) * sizeof *data);
    size_t *lengths = malloc((n ? n : 1) * sizeof *lengths);
    npy_intp n_offsets = (npy_intp)n + 1;
    PyObject *offsets = PyArray_ZEROS(1, &n_offsets, NPY_INT64, 0), *backend_rows = PyList_New(0);
    PyObject *result = NULL, *ids = NULL;
    int32_t *buffer = NULL;
    char *scratch = NULL;
    size_t n_held = 0, total = 0, longest = 0;
    if (!held || !data || !lengths) {
        PyErr_NoMemory();
        goto done;
    }
    if (!offsets || !backend_rows) goto done;
    for (; n_held < n; n_held++) {
        PyObject *t = PySequence_Fast_GET_ITEM(texts, n_held);
        if (!PyUnicode_Check(t)) {
            PyErr_Format(PyExc_TypeError, "texts[%zu] is %s, expected str", n_held, Py_TYPE(t)->tp_name);
            goto done;
        }
        Py_INCREF(t);
        held[n_held] = t;
        if (PyUnicode_IS_ASCII(t)) {
            data[n_held] = (const char *)PyUnicode_DATA(t);
            lengths[n_held] = (size_t)PyUnicode_GET_LENGTH(t);
        } else {
            PyObject *row = PyLong_FromSize_t(n_held);
            int failed = !row || PyList_Append(backend_rows, row);
            Py_XDECREF(row);
            if (failed) goto done;
            data[n_held] = NULL;
            lengths[n_held] = 0;
        }
        total += lengths[n_held];
        if (lengths[n_held] > longest) longest = lengths[n_held];
    }
    buffer = malloc((total ? total : 1) * sizeof *buffer);
    scratch = malloc(longest ? longest : 1);
    if (!buffer || !scratch) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t *row_start = (int64_t *)PyArray_DATA((PyArrayObject *)offsets);
    size_t count = 0;
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < n; i++) {
        row_start[i] = (int64_t)count;
        if (data[i]) count += wp_encode_ascii(&self->vocab, data[i], lengths[i], buffer + count, scratch);
    }
    row_start[n] = (int64_t)count;
    Py_END_ALLOW_THREADS
    npy_intp n_ids = (npy_intp)count;
    if (!(ids = PyArray_EMPTY(1, &n_ids, NPY_INT32, 0))) goto done;
    memcpy(PyArray_DATA((PyArrayObject *)ids), buffer, count * sizeof *buffer);
    result = PyTuple_Pack(3, ids, offsets, backend_rows);
done:
    for (size_t i = 0; i < n_held; i++) Py_DECREF(held[i]);
    free(held);
    free(data);
    free(lengths);
    free(buffer);
    free(scratch);
    Py_XDECREF(ids);
    Py_XDECREF(offsets);
    Py_XDECREF(backend_rows);
    Py_DECREF(texts);
    return result;
}

/* decode(ids int32|int64 [N, L], selected bool [N, L]) -> list of N str or None: the
 * decoded text of each row's selected tokens; None where one of them holds whitespace. */
static PyObject *WordPiece_decode(WordPieceObject *self, PyObject *args) {
    PyObject *ids_obj, *selected_obj;
    if (check_ready(self) || !PyArg_ParseTuple(args, "OO", &ids_obj, &selected_obj)) return NULL;
    if (!PyArray_Check(ids_obj) || (PyArray_TYPE((PyArrayObject *)ids_obj) != NPY_INT32 &&
                                    PyArray_TYPE((PyArrayObject *)ids_obj) != NPY_INT64))
        return PyErr_Format(PyExc_TypeError, "ids must be a numpy.ndarray of int32 or int64");
    PyArrayObject *ids = check_array(ids_obj, "ids", PyArray_TYPE((PyArrayObject *)ids_obj), 2, NULL, 0);
    if (!ids) return NULL;
    PyArrayObject *selected = check_array(selected_obj, "selected", NPY_BOOL, 2, PyArray_DIMS(ids), 0);
    if (!selected) return NULL;
    size_t N = (size_t)PyArray_DIM(ids, 0), L = (size_t)PyArray_DIM(ids, 1), V = self->vocab.n_tokens;
    int wide = PyArray_TYPE(ids) == NPY_INT64;
    const void *id_data = PyArray_DATA(ids);
    const uint8_t *sel = (const uint8_t *)PyArray_DATA(selected);
    /* text_start[r]: where row r's text goes in text (its joined length bounds it);
     * row_ids: each row's selected ids; status: 0 decoded, 1 left to Python, 2 bad id. */
    size_t *text_start = malloc((N + 1) * sizeof *text_start), *text_len = malloc((N ? N : 1) * sizeof *text_len);
    int64_t *row_ids = malloc((L ? L : 1) * sizeof *row_ids);
    uint8_t *status = malloc(N ? N : 1);
    char *text = NULL;
    PyObject *out = NULL;
    int alloc_failed = !text_start || !text_len || !row_ids || !status;
    size_t bad_row = 0, bad_col = 0;
    int64_t bad_id = 0;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    if (!alloc_failed) {
        text_start[0] = 0;
        for (size_t r = 0; r < N && !bad; r++) {
            size_t bytes = 0;
            status[r] = 0;
            for (size_t c = 0; c < L; c++) {
                if (!sel[r * L + c]) continue;
                int64_t id = wide ? ((const int64_t *)id_data)[r * L + c] : ((const int32_t *)id_data)[r * L + c];
                if (id < 0 || (uint64_t)id >= V) {
                    bad = 1, bad_row = r, bad_col = c, bad_id = id;
                    break;
                }
                if (!self->plain[id]) status[r] = 1;
                bytes += self->vocab.offsets[id + 1] - self->vocab.offsets[id] + 1;
            }
            text_start[r + 1] = text_start[r] + (status[r] ? 0 : bytes);
        }
        if (!bad && !(text = malloc(text_start[N] ? text_start[N] : 1))) alloc_failed = 1;
        for (size_t r = 0; r < N && !bad && !alloc_failed; r++) {
            if (status[r]) continue;
            size_t n = 0;
            for (size_t c = 0; c < L; c++)
                if (sel[r * L + c])
                    row_ids[n++] = wide ? ((const int64_t *)id_data)[r * L + c] : ((const int32_t *)id_data)[r * L + c];
            text_len[r] = wp_decode(&self->vocab, row_ids, n, text + text_start[r]);
        }
    }
    Py_END_ALLOW_THREADS
    if (alloc_failed) {
        PyErr_NoMemory();
    } else if (bad) {
        PyErr_Format(PyExc_ValueError, "ids[%zu, %zu] = %lld is not a token id in [0, %zu)", bad_row, bad_col,
                     (long long)bad_id, V);
    } else if ((out = PyList_New((Py_ssize_t)N))) {
        for (size_t r = 0; r < N; r++) {
            PyObject *s = status[r] ? Py_None
                                    : PyUnicode_DecodeUTF8(text + text_start[r], (Py_ssize_t)text_len[r], "strict");
            if (s == Py_None) Py_INCREF(s);
            if (!s) {
                Py_CLEAR(out);
                break;
            }
            PyList_SET_ITEM(out, (Py_ssize_t)r, s);
        }
    }
    free(text_start);
    free(text_len);
    free(row_ids);
    free(status);
    free(text);
    return out;
}

static PyMethodDef WordPiece_methods[] = {
    {"encode", (PyCFunction)WordPiece_encode, METH_O,
     "encode(texts) -> (ids int32[total], offsets int64[N+1], backend_rows): the ids of ASCII text i are "
     "ids[offsets[i]:offsets[i+1]]; the rows in backend_rows (non-ASCII) are left empty"},
    {"decode", (PyCFunction)WordPiece_decode, METH_VARARGS,
     "decode(ids int32|int64 [N, L], selected bool [N, L]) -> list of str or None (a token holds whitespace)"},
    {NULL}};

PyTypeObject WordPieceType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dlmone._core.WordPiece",
    .tp_basicsize = sizeof(WordPieceObject),
    .tp_dealloc = (destructor)WordPiece_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "WordPiece(tokens, unk_id, special_ids): a vocabulary for BERT-uncased WordPiece encoding "
              "of ASCII text and DiffuSeq's decoding (dlmone.tokenizer holds the reference)",
    .tp_methods = WordPiece_methods,
    .tp_init = (initproc)WordPiece_init,
    .tp_new = PyType_GenericNew,
};
