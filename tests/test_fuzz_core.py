"""Fuzzing the C boundary: every _core entry point is called with random dtypes,
shapes (zero-sized included), strides and values. The process must never die; every
rejection must be a TypeError/ValueError (MemoryError for absurd sizes)."""
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dlmone import _core  # noqa: E402

# float32 (and int64 for ids) most often, so that calls get past the dtype check
DTYPES = [np.float32] * 5 + [np.int64] * 2 + [np.float64, np.int32, np.uint8, np.bool_, np.float16]
ALLOWED = (TypeError, ValueError, MemoryError, OverflowError, RuntimeError)


@st.composite
def arrays(draw, max_dims=4):
    ndim = draw(st.integers(0, max_dims))
    shape = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 8, 11, 12]), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(DTYPES))
    arr = (np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(shape) * 3).astype(dtype)
    if ndim and draw(st.booleans()) and shape[-1] > 1:
        arr = arr[..., ::2]  # non-contiguous
    if draw(st.booleans()) and arr.size:
        flat = arr.reshape(-1) if arr.flags.c_contiguous else None
        if flat is not None and arr.dtype.kind == "f":
            flat[0] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 0.0]))
    return arr


ARG = st.one_of(arrays(), st.none(), st.integers(-3, 10), st.floats(allow_nan=True), st.text(max_size=3))

FUNCTIONS = ["q_sample", "mse_loss", "cross_entropy", "affine_argmax", "posterior_step", "sid_loss",
             "denoise_loss", "disc_logits", "disc_backward", "bce_with_logits", "adamw_step",
             "clip_by_value", "global_norm", "scale", "ema_update", "count_nonfinite", "gaussian_fill",
             "elementwise", "layernorm", "layernorm_backward", "attention", "attention_backward",
             "timestep_embedding", "sqrt_schedule"]


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(FUNCTIONS), args=st.lists(ARG, min_size=0, max_size=10))
def test_core_functions_never_crash(name, args):
    fn = getattr(_core, name)
    if name == "sqrt_schedule" and args and isinstance(args[0], int) and args[0] > 0:
        args = [min(args[0], 100)] + args[1:]
    try:
        fn(*args)
    except ALLOWED:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(method=st.sampled_from(["forward", "backward", "logits", "logits_backward", "embed",
                               "embed_backward", "hidden", "zero_grad", "layout"]),
       args=st.lists(ARG, min_size=0, max_size=4))
def test_model_methods_never_crash(method, args):
    m = _core.Model(11, 4, 6, 1, 2, 8, 4, 5, 0.1, 1e-12, 0)
    try:
        getattr(m, method)(*args)
    except ALLOWED:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(sizes=st.lists(st.one_of(st.integers(-2, 7), st.just(2**40), st.just(2**62)), min_size=8, max_size=8),
       dropout=st.floats(allow_nan=True))
def test_model_constructor_rejects_bad_sizes(sizes, dropout):
    try:
        _core.Model(*sizes, dropout)
    except ALLOWED:
        pass
