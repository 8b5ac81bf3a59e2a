"""Single C kernels: accuracy of the vectorised math, finite-difference checks of the
layer kernels' backward passes, and bad input at the kernel entry points."""
import math

import numpy as np
import pytest

from dlmone import _core

EPS32 = np.finfo(np.float32).eps


def test_exp_within_one_ulp_and_special_values():
    x = np.linspace(-69.0, 88.7, 1_000_001).astype(np.float32)
    ref = np.exp(x.astype(np.float64))
    rel = np.abs(_core.elementwise("exp", x) - ref) / ref
    assert rel.max() < 1.0 * EPS32
    special = _core.elementwise("exp", np.array([np.nan, np.inf, -np.inf, 89.0, -100.0, 0.0, -70.0], np.float32))
    assert np.isnan(special[0]) and special[1] == np.inf and special[3] == np.inf
    assert special[2] == 0.0 and special[4] == 0.0 and special[5] == 1.0
    assert special[6] == 0.0  # flushed below 2^-100: no subnormals downstream


def test_erf_and_tanh_accuracy():
    x = np.linspace(-10, 10, 400_001).astype(np.float32)
    erf = np.vectorize(math.erf)(x.astype(np.float64))
    assert np.abs(_core.elementwise("erf", x) - erf).max() < 4e-7
    assert np.abs(_core.elementwise("tanh", x) - np.tanh(x.astype(np.float64))).max() < 2e-7
    small = np.linspace(-0.6, 0.6, 10_001).astype(np.float32)
    small = small[small != 0]
    rel = np.abs(_core.elementwise("tanh", small) / np.tanh(small.astype(np.float64)) - 1)
    assert rel.max() < 4 * EPS32
    for op in ("erf", "tanh", "gelu", "silu"):
        assert np.isnan(_core.elementwise(op, np.array([np.nan], np.float32))[0])


def test_activation_gradients_match_central_differences():
    x = np.linspace(-6, 6, 2001).astype(np.float64)
    h = 1e-3
    for op in ("gelu", "silu"):
        f = lambda v: _core.elementwise(op, v.astype(np.float32)).astype(np.float64)  # noqa: E731
        fd = (f(x + h) - f(x - h)) / (2 * h)
        grad = _core.elementwise(op + "_grad", x.astype(np.float32))
        assert np.abs(grad - fd).max() < 2e-3, op
    gelu = _core.elementwise("gelu", x.astype(np.float32))
    exact = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    assert np.abs(gelu - exact).max() < 1e-6


def _layernorm_loss(x, w, b, g, eps=1e-5):
    y, _, _ = _core.layernorm(x.astype(np.float32), w.astype(np.float32), b.astype(np.float32), eps)
    return float((y.astype(np.float64) * g).sum())


def test_layernorm_backward_matches_finite_differences(rng):
    M, C = 5, 12
    x = rng.standard_normal((M, C)).astype(np.float32)
    w = (1 + 0.3 * rng.standard_normal(C)).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    g = rng.standard_normal((M, C))
    _, mean, rstd = _core.layernorm(x, w, b, 1e-5)
    dx, dw, db = _core.layernorm_backward(g.astype(np.float32), x, mean, rstd, w)
    h = 1e-2
    for arr, grad in ((x, dx), (w, dw), (b, db)):
        direction = rng.standard_normal(arr.shape)
        plus, minus = arr + h * direction, arr - h * direction
        args = lambda a: (a, w, b) if arr is x else ((x, a, b) if arr is w else (x, w, a))  # noqa: E731
        fd = (_layernorm_loss(*args(plus), g) - _layernorm_loss(*args(minus), g)) / (2 * h)
        analytic = float((grad * direction).sum())
        assert abs(fd - analytic) <= 2e-3 * (1 + abs(analytic))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_attention_backward_matches_finite_differences(rng, dropout):
    B, L, A, d = 2, 5, 2, 3
    qkv = rng.standard_normal((B, L, 3 * A * d)).astype(np.float32)
    g = rng.standard_normal((B, L, A * d))
    ctx, att = _core.attention(qkv, A, dropout, 7)
    assert np.allclose(att.sum(-1), 1.0, atol=1e-6)
    dqkv = _core.attention_backward(g.astype(np.float32), att, qkv, A, dropout, 7)
    loss = lambda q: float((_core.attention(q.astype(np.float32), A, dropout, 7)[0] * g).sum())  # noqa: E731
    h = 1e-2
    for _ in range(4):
        direction = rng.standard_normal(qkv.shape)
        fd = (loss(qkv + h * direction) - loss(qkv - h * direction)) / (2 * h)
        analytic = float((dqkv * direction).sum())
        assert abs(fd - analytic) <= 2e-3 * (1 + abs(analytic))


def test_attention_matches_numpy_softmax(rng):
    B, L, A, d = 2, 6, 3, 4
    H = A * d
    qkv = rng.standard_normal((B, L, 3 * H)).astype(np.float32)
    ctx, att = _core.attention(qkv, A)
    q, k, v = (qkv[..., i * H:(i + 1) * H].reshape(B, L, A, d).transpose(0, 2, 1, 3).astype(np.float64)
               for i in range(3))
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = (p @ v).transpose(0, 2, 1, 3).reshape(B, L, H)
    assert np.abs(att - p).max() < 1e-6 and np.abs(ctx - ref).max() < 1e-5


def test_timestep_embedding_is_exact():
    t = np.array([0.0, 1.0, 500.0, 999.5], np.float32)
    emb = _core.timestep_embedding(t, 9)
    half = 4
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    args = t.astype(np.float64)[:, None] * freqs
    ref = np.concatenate([np.cos(args), np.sin(args), np.zeros((4, 1))], axis=1)
    assert np.abs(emb - ref).max() < 1e-7


def test_kernel_entry_points_reject_bad_input():
    with pytest.raises(ValueError, match="unknown op"):
        _core.elementwise("cosh", np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="x"):
        _core.elementwise("exp", np.zeros(3))
    with pytest.raises(ValueError, match="bias"):
        _core.layernorm(np.zeros((2, 3), np.float32), np.ones(3, np.float32), np.zeros(4, np.float32), 1e-5)
    with pytest.raises(ValueError, match="heads"):
        _core.attention(np.zeros((1, 2, 9), np.float32), 2)
    with pytest.raises(ValueError, match="dim"):
        _core.timestep_embedding(np.zeros(2, np.float32), 1)


THREAD_COUNTS = (1, 2, 3, 4, 8)


def _at_threads(fn, counts=THREAD_COUNTS):
    """fn() at each OpenMP thread count; the count is restored afterwards."""
    import dlmone

    before = dlmone.get_num_threads()
    try:
        outs = []
        for threads in counts:
            dlmone.set_num_threads(threads)
            outs.append(fn())
        return outs
    finally:
        dlmone.set_num_threads(before)


def _assert_product_close(got, ref, K, name):
    """float32 sums of K terms of |x| <= ~4: error about sqrt(K) eps of the largest entry."""
    err = np.abs(got - ref).max()
    assert err < 1e-5 * np.sqrt(K) * np.abs(ref).max() + 1e-6, f"{name}: max error {err:.3e}"


# matmul_plan() in csrc/core/kernels.c splits products of >= 2^21 multiply-adds in tiles of
# at least 128 rows by 192 columns and 2^24 multiply-adds (an 8th of a smaller product,
# down to 2^21), and, with no epilogue and
# K >= max(512, 2 max(M, N)) when there are fewer than 64 tiles, K in chunks; the
# comments name the plan with bias / without.
@pytest.mark.parametrize("M,K,N", [
    (1, 1, 1),          # one call / one call
    (7, 33, 5),         # one call / one call
    (2049, 300, 96),    # 8 row tiles, the last short / the same
    (40, 400, 2030),    # 10 column tiles / the same
    (600, 256, 800),    # 2 x 2 tiles / the same
    (384, 2048, 128),   # 3 row tiles / 3 row tiles x 2 K chunks
    (64, 11000, 48),    # one call / 8 K chunks
    (48, 1200, 40),     # one call / one call (too little work for a tile)
])
def test_linear_matches_numpy_and_is_thread_independent(M, K, N):
    """The tiled product y = x w^T (+ b), bias epilogue or none, against float64, and
    bitwise the same for 1, 2, 3, 4 and 8 threads."""
    rng = np.random.default_rng(M * 7 + N)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    for bias in (b, None):
        args = (x, w) if bias is None else (x, w, bias)
        outs = _at_threads(lambda: _core.linear(*args))
        for threads, out in zip(THREAD_COUNTS[1:], outs[1:]):
            assert np.array_equal(outs[0], out), f"1 and {threads} threads differ"
        _assert_product_close(outs[0], ref if bias is None else ref + b, K, f"bias={bias is not None}")


@pytest.mark.parametrize("V,E,M", [
    (300, 130, 3000),  # dW = dlogits^T h: 2 row tiles x 4 K chunks (A transposed, accumulating); dh = dlogits W: 11 row tiles
    (120, 140, 2200),  # dW: 8 K chunks; dh: 8 row tiles
    (48, 1000, 50),    # dW: 2 column tiles; dh: 2 column tiles
])
def test_weight_gradient_products_match_numpy_and_are_thread_independent(V, E, M):
    """Model.logits_backward runs linear_backward: dh = g W (B not transposed), dW += g^T h
    (A transposed, accumulating into the gradients), db += colsum(g); against float64, the
    second call doubles the gradients exactly, and 1, 2, 3, 4 and 8 threads agree bitwise."""
    rng = np.random.default_rng(V + E + M)
    h = rng.standard_normal((M, E)).astype(np.float32)
    g = rng.standard_normal((M, V)).astype(np.float32)

    def run():
        m = _core.Model(V, E, 8, 1, 2, 8, 4, 4, 0.0, 1e-12, 0)
        m.params[:] = np.random.default_rng(0).standard_normal(m.params.shape)
        (_, w_off, _), (_, b_off, _) = m.layout()[:2]
        dh = m.logits_backward(h, g)
        first = m.grads.copy()
        m.logits_backward(h, g)
        assert np.array_equal(m.grads, 2 * first), "the second backward does not accumulate exactly"
        W = m.params[w_off:w_off + V * E].reshape(V, E).copy()
        return dh, first[w_off:w_off + V * E].reshape(V, E), first[b_off:b_off + V], W

    outs = _at_threads(run)
    for threads, out in zip(THREAD_COUNTS[1:], outs[1:]):
        for a, b in zip(outs[0], out):
            assert np.array_equal(a, b), f"1 and {threads} threads differ"
    dh, dW, db, W = outs[0]
    g64, h64 = g.astype(np.float64), h.astype(np.float64)
    _assert_product_close(dh, g64 @ W, V, "dh")
    _assert_product_close(dW, g64.T @ h64, M, "dW")
    _assert_product_close(db, g64.sum(axis=0), M, "db")


def test_linear_bad_input():
    x = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="weight"):
        _core.linear(x, np.ones((5, 3), np.float32))
    with pytest.raises(ValueError, match="bias"):
        _core.linear(x, np.ones((5, 4), np.float32), np.ones(4, np.float32))
    with pytest.raises(TypeError):
        _core.linear(x.astype(np.float64), np.ones((5, 4), np.float32))


def test_profile_counts_kernel_calls():
    x = np.ones((64, 32), np.float32)
    w = np.ones((16, 32), np.float32)
    _core.set_profiling(True)
    try:
        _core.profile(reset=True)
        for _ in range(3):
            _core.linear(x, w)
        _core.layernorm(x, np.ones(32, np.float32), np.zeros(32, np.float32), 1e-5)
        prof = _core.profile(reset=True)
    finally:
        _core.set_profiling(False)
    assert prof["matmul"][0] == 3 and prof["matmul"][1] > 0
    assert prof["layernorm"][0] == 1
    assert _core.profile() == {}
    _core.linear(x, w)  # timers off: nothing recorded
    assert _core.profile() == {}
