/* Glue for the distillation kernels. */
#include "distill.h"
#include "args.h"

static PyObject *py_sid_loss(PyObject *mod, PyObject *args) {
    PyObject *ro, *fo, *eo, *mo;
    float alpha;
    if (!PyArg_ParseTuple(args, "OOOOf", &ro, &fo, &eo, &mo, &alpha)) return NULL;
    npy_intp s[3] = {-1, -1, -1};
    PyArrayObject *yr = check_ble(ro, "y_real", s), *yf = yr ? check_ble(fo, "y_fake", s) : NULL;
    PyArrayObject *eg = yf ? check_ble(eo, "e_g", s) : NULL;
    PyArrayObject *m = eg ? check_array(mo, "mask", NPY_FLOAT32, 2, s, 0) : NULL;
    if (!m) return NULL;
    PyObject *loss = new_float_array(1, s), *om = new_float_array(1, s), *gr = new_float_array(3, s),
             *gf = new_float_array(3, s), *ge = new_float_array(3, s);
    if (!loss || !om || !gr || !gf || !ge) {
        Py_XDECREF(loss); Py_XDECREF(om); Py_XDECREF(gr); Py_XDECREF(gf); Py_XDECREF(ge);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    sid_loss(fdata((PyArrayObject *)loss), fdata((PyArrayObject *)om), fdata((PyArrayObject *)gr),
             fdata((PyArrayObject *)gf), fdata((PyArrayObject *)ge), fdata(yr), fdata(yf), fdata(eg),
             fdata(m), alpha, (size_t)s[0], (size_t)s[1], (size_t)s[2]);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(NNNNN)", loss, om, gr, gf, ge);
}

static PyObject *py_denoise_loss(PyObject *mod, PyObject *args) {
    PyObject *po, *to, *mo;
    if (!PyArg_ParseTuple(args, "OOO", &po, &to, &mo)) return NULL;
    npy_intp s[3] = {-1, -1, -1};
    PyArrayObject *p = check_ble(po, "pred", s), *t = p ? check_ble(to, "target", s) : NULL;
    PyArrayObject *m = t ? check_array(mo, "mask", NPY_FLOAT32, 2, s, 0) : NULL;
    if (!m) return NULL;
    PyObject *g = new_float_array(3, s);
    if (!g) return NULL;
    double loss;
    Py_BEGIN_ALLOW_THREADS
    loss = denoise_loss(fdata((PyArrayObject *)g), fdata(p), fdata(t), fdata(m), (size_t)s[0],
                        (size_t)s[1], (size_t)s[2]);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(dN)", loss, g);
}

/* kind: "token" | "hidden_mean" | "linear"; head: (w[H] float32, bias float), given
 * exactly when kind is "linear". */
static int parse_disc(const char *kind_name, PyObject *ho, npy_intp H, DiscKind *kind,
                      PyArrayObject **w, float *bias) {
    *w = NULL;
    *bias = 0.0f;
    if (!strcmp(kind_name, "token"))
        *kind = DISC_TOKEN;
    else if (!strcmp(kind_name, "hidden_mean"))
        *kind = DISC_HIDDEN_MEAN;
    else if (!strcmp(kind_name, "linear"))
        *kind = DISC_LINEAR;
    else {
        PyErr_Format(PyExc_ValueError, "kind must be 'token', 'hidden_mean' or 'linear', got '%s'",
                     kind_name);
        return -1;
    }
    if ((*kind == DISC_LINEAR) != (ho != Py_None)) {
        PyErr_SetString(PyExc_ValueError, "head=(w, bias) is needed by kind 'linear' and only by it");
        return -1;
    }
    if (ho == Py_None) return 0;
    PyObject *wo;
    double b;
    if (!PyArg_ParseTuple(ho, "Od", &wo, &b)) return -1;
    npy_intp ws[1] = {H};
    *w = check_array(wo, "head weight", NPY_FLOAT32, 1, ws, 0);
    if (!*w) return -1;
    *bias = (float)b;
    return 0;
}

/* The arguments disc_logits and disc_backward share: hidden [B,L,H] (s = its shape),
 * mask [B,L], the kind and its head. 0, or -1 with the exception set. */
typedef struct {
    npy_intp s[3];
    PyArrayObject *h, *m, *w;
    DiscKind kind;
    float bias;
} DiscArgs;

static int disc_args(DiscArgs *a, PyObject *ho, PyObject *mo, const char *kind_name, PyObject *heado) {
    a->s[0] = a->s[1] = a->s[2] = -1;
    a->h = check_ble(ho, "hidden", a->s);
    a->m = a->h ? check_array(mo, "mask", NPY_FLOAT32, 2, a->s, 0) : NULL;
    if (!a->m) return -1;
    return parse_disc(kind_name, heado, a->s[2], &a->kind, &a->w, &a->bias);
}

static PyObject *py_disc_logits(PyObject *mod, PyObject *args) {
    PyObject *ho, *mo, *heado = Py_None;
    const char *kind_name;
    DiscArgs a;
    if (!PyArg_ParseTuple(args, "OOs|O", &ho, &mo, &kind_name, &heado)) return NULL;
    if (disc_args(&a, ho, mo, kind_name, heado)) return NULL;
    size_t B = (size_t)a.s[0], L = (size_t)a.s[1], H = (size_t)a.s[2];
    npy_intp os[2] = {a.s[0], (npy_intp)disc_logit_count(a.kind, L, H)};
    PyObject *out = new_float_array(2, os);
    if (!out) return NULL;
    Py_BEGIN_ALLOW_THREADS
    disc_logits(fdata((PyArrayObject *)out), fdata(a.h), fdata(a.m), a.kind, a.w ? fdata(a.w) : NULL,
                a.bias, B, L, H);
    Py_END_ALLOW_THREADS
    return out;
}

static PyObject *py_disc_backward(PyObject *mod, PyObject *args) {
    PyObject *go, *ho, *mo, *heado = Py_None;
    const char *kind_name;
    DiscArgs a;
    if (!PyArg_ParseTuple(args, "OOOs|O", &go, &ho, &mo, &kind_name, &heado)) return NULL;
    if (disc_args(&a, ho, mo, kind_name, heado)) return NULL;
    size_t B = (size_t)a.s[0], L = (size_t)a.s[1], H = (size_t)a.s[2];
    npy_intp gs[2] = {a.s[0], (npy_intp)disc_logit_count(a.kind, L, H)};
    PyArrayObject *g = check_array(go, "grad_logit", NPY_FLOAT32, 2, gs, 0);
    if (!g) return NULL;
    npy_intp hs[1] = {a.s[2]};
    PyObject *gh = new_float_array(3, a.s), *gw = PyArray_ZEROS(1, hs, NPY_FLOAT32, 0);
    if (!gh || !gw) {
        Py_XDECREF(gh);
        Py_XDECREF(gw);
        return NULL;
    }
    float gb = 0.0f;
    Py_BEGIN_ALLOW_THREADS
    disc_backward(fdata((PyArrayObject *)gh), fdata((PyArrayObject *)gw), &gb, fdata(g), fdata(a.h),
                  fdata(a.m), a.kind, a.w ? fdata(a.w) : NULL, B, L, H);
    Py_END_ALLOW_THREADS
    if (!a.w) {
        Py_DECREF(gw);
        return Py_BuildValue("(NOO)", gh, Py_None, Py_None);
    }
    return Py_BuildValue("(NNf)", gh, gw, gb);
}

static PyObject *py_bce_with_logits(PyObject *mod, PyObject *args) {
    PyObject *lo, *to;
    float c = 10.0f;
    if (!PyArg_ParseTuple(args, "OO|f", &lo, &to, &c)) return NULL;
    PyArrayObject *l = check_array(lo, "logit", NPY_FLOAT32, 1, NULL, 0);
    if (!l) return NULL;
    npy_intp s[1] = {PyArray_DIM(l, 0)};
    PyArrayObject *t = check_array(to, "target", NPY_FLOAT32, 1, s, 0);
    if (!t) return NULL;
    if (!(c > 0.0f)) return PyErr_Format(PyExc_ValueError, "clamp must be positive, got %g", c);
    PyObject *loss = new_float_array(1, s), *g = new_float_array(1, s);
    if (!loss || !g) {
        Py_XDECREF(loss);
        Py_XDECREF(g);
        return NULL;
    }
    bce_with_logits(fdata((PyArrayObject *)loss), fdata((PyArrayObject *)g), fdata(l), fdata(t), c,
                    (size_t)s[0]);
    return Py_BuildValue("(NN)", loss, g);
}

PyMethodDef distill_methods[] = {
    {"sid_loss", py_sid_loss, METH_VARARGS,
     "sid_loss(y_real, y_fake, e_g, mask, alpha) -> (loss[B], omega[B], g_y_real, g_y_fake, g_e_g); "
     "gradients of mean_b loss_b"},
    {"denoise_loss", py_denoise_loss, METH_VARARGS,
     "denoise_loss(pred, target, mask) -> (mean over mask-1 positions of ||pred-target||^2, grad)"},
    {"disc_logits", py_disc_logits, METH_VARARGS,
     "disc_logits(hidden[B,L,H], mask, kind, head=None) -> logit[B,K]: kind 'token' (K=H, token "
     "pooling), 'hidden_mean' (K=1) or 'linear' (K=L, head=(w[H], bias))"},
    {"disc_backward", py_disc_backward, METH_VARARGS,
     "disc_backward(grad_logit[B,K], hidden, mask, kind, head=None) -> (grad_hidden, grad_w|None, "
     "grad_b|None)"},
    {"bce_with_logits", py_bce_with_logits, METH_VARARGS,
     "bce_with_logits(logit[B], target[B], clamp=10) -> (loss[B], grad_logit[B])"},
    {NULL}};
