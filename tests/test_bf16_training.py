"""Mixed-precision (bf16) training on AMX (issue 15): the products, the fused rounding
loss, and whole training steps against float32 and against bf16-rounded references."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY, TINY_SAME

import dlmone
from dlmone import _core


def _amx():
    if not dlmone.build_info()["amx_bf16"]:
        pytest.skip("no AMX-BF16 on this CPU or build")


def bf16_round(x):
    """float32 -> bf16 -> float32, round to nearest even (subnormals to zero, as AMX)."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
    return np.where(np.abs(r) < np.finfo(np.float32).tiny, np.float32(0), r)


SHAPES = [(1, 1, 1), (3, 5, 7), (31, 33, 17), (32, 32, 32), (100, 257, 65), (700, 96, 40), (40, 64, 1100)]


@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_bf16_matmul_is_the_product_of_rounded_inputs(ta, tb, rng):
    _amx()
    for M, N, K in SHAPES:
        a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
        b = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
        op_a, op_b = (a.T if ta else a), (b.T if tb else b)
        ref = bf16_round(op_a).astype(np.float64) @ bf16_round(op_b).astype(np.float64)
        got = _core.matmul(a, b, ta, tb, bf16=True)
        assert got.shape == (M, N)
        # float32 accumulation of exact bf16 products: error of a float32 sum of K terms
        tol = 1e-6 * K * np.abs(bf16_round(op_a)).max() * np.abs(bf16_round(op_b)).max() + 1e-30
        assert np.abs(got - ref).max() <= tol, (M, N, K)
        np.testing.assert_allclose(_core.matmul(a, b, ta, tb), op_a @ op_b, rtol=1e-4, atol=1e-4 * K)


def test_bf16_matmul_is_bitwise_the_same_for_any_thread_count(rng):
    _amx()
    a = rng.standard_normal((300, 700)).astype(np.float32)
    b = rng.standard_normal((700, 260)).astype(np.float32)
    before = dlmone.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3, 4, 8):
            dlmone.set_num_threads(n)
            outs.append([_core.matmul(a, b, bf16=True), _core.matmul(a.T.copy(), b, True, False, bf16=True)])
    finally:
        dlmone.set_num_threads(before)
    for o in outs[1:]:
        for x, y in zip(outs[0], o):
            np.testing.assert_array_equal(x, y)


def test_matmul_checks_its_arguments(rng):
    a = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="b"):
        _core.matmul(a, np.ones((5, 2), np.float32))
    with pytest.raises(TypeError, match="a"):
        _core.matmul(a.astype(np.float64), np.ones((4, 2), np.float32))
    np.testing.assert_array_equal(_core.matmul(a, np.ones((4, 2), np.float32)), np.full((3, 2), 4, np.float32))


@pytest.mark.parametrize("V,E,M", [(37, 20, 10), (1000, 32, 100), (6000, 64, 700)])
def test_tied_cross_entropy_equals_logits_then_cross_entropy(V, E, M, rng):
    cfg = dlmone.ModelConfig(**dict(TINY, vocab_size=V, emb_dim=E))
    m = dlmone.DiffusionTransformer(cfg, seed=2)
    h = rng.standard_normal((M, E)).astype(np.float32)
    y = rng.integers(0, V, M)
    scale = rng.random(M).astype(np.float32)
    logits = m.logits(h)
    nll_ref = _core.cross_entropy(logits, y, scale)
    dh_ref = m.logits_backward(h, logits)
    g_ref = m.grad_buffer.copy()
    m.zero_grad()
    nll, dh = m.tied_cross_entropy(h, y, scale)
    np.testing.assert_allclose(nll, nll_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dh, dh_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m.grad_buffer, g_ref, rtol=1e-4, atol=1e-6)
    m.zero_grad()
    nll2, none = m.tied_cross_entropy(h.reshape(1, M, E), y.reshape(1, M), scale.reshape(1, M), grads=False)
    assert none is None and nll2.shape == (1, M) and not m.grad_buffer.any()
    np.testing.assert_array_equal(nll2[0], nll)
    if dlmone.build_info()["amx_bf16"]:
        m.precision = "bf16"
        nll16, dh16 = m.tied_cross_entropy(h, y, scale)
        assert np.abs(nll16 - nll_ref).max() < 1e-2 * np.abs(nll_ref).max()
        assert np.abs(dh16 - dh_ref).max() < 3e-2 * np.abs(dh_ref).max()
        assert np.abs(m.grad_buffer - g_ref).max() < 3e-2 * np.abs(g_ref).max()


def test_tied_cross_entropy_checks_its_arguments(rng):
    cfg = dlmone.ModelConfig(**TINY)
    m = dlmone.DiffusionTransformer(cfg)
    h = np.zeros((4, cfg.emb_dim), np.float32)
    ok = np.zeros(4, np.int64), np.ones(4, np.float32)
    with pytest.raises(ValueError, match="outside"):
        m.tied_cross_entropy(h, np.array([0, 1, 2, cfg.vocab_size]), ok[1])
    with pytest.raises(TypeError, match="integers"):
        m.tied_cross_entropy(h, ok[0].astype(np.float32), ok[1])
    with pytest.raises(ValueError, match="tokens have shape"):
        m.tied_cross_entropy(h, np.zeros(3, np.int64), ok[1])
    with pytest.raises(ValueError, match="scale"):
        m.tied_cross_entropy(h, ok[0], np.ones(5, np.float32))
    with pytest.raises(ValueError, match="h"):
        m._core.tied_cross_entropy(np.zeros((4, cfg.emb_dim + 1), np.float32), *ok)


@pytest.mark.parametrize("kw", [TINY, TINY_SAME], ids=["proj", "same"])
def test_bf16_training_step_is_close_to_float32_and_thread_invariant(kw, rng):
    """A whole training-loss step in mixed precision: loss and every gradient within bf16's
    error of float32, really different from it, and bitwise the same for 1-4 threads."""
    _amx()
    from dlmone.diffusion import Diffusion, training_loss

    cfg = dlmone.ModelConfig(**dict(kw, vocab_size=300))
    diffusion = Diffusion(cfg.diffusion_steps)
    B, L = 6, cfg.seq_len
    tokens = rng.integers(0, cfg.vocab_size, (B, L))
    mask = np.zeros((B, L), np.float32)
    mask[:, L // 2:] = 1
    t = rng.integers(0, cfg.diffusion_steps, B)

    def run(precision, threads):
        before = dlmone.get_num_threads()
        dlmone.set_num_threads(threads)
        try:
            m = dlmone.DiffusionTransformer(cfg, seed=5)
            m.precision = precision
            terms = training_loss(m, diffusion, tokens, mask, t, seed=9)
            return terms.loss, m.grad_buffer.copy()
        finally:
            dlmone.set_num_threads(before)

    loss32, g32 = run("float32", 1)
    loss16, g16 = run("bf16", 1)
    assert abs(loss16 - loss32) < 1e-2 * abs(loss32)
    assert not np.array_equal(g16, g32)
    assert np.abs(g16 - g32).max() < 5e-2 * np.abs(g32).max()
    cos = float(g16 @ g32 / np.linalg.norm(g16) / np.linalg.norm(g32))
    assert cos > 0.999
    for threads in (2, 3, 4):
        loss_n, g_n = run("bf16", threads)
        assert loss_n == loss16
        np.testing.assert_array_equal(g_n, g16)


def test_bf16_teacher_training_follows_float32(tmp_path):
    """A short teacher run in bf16 reaches float32's validation loss within 2%."""
    _amx()
    from dlmone.builtin_task import make_builtin_task
    from dlmone.data import Seq2SeqData
    from dlmone.teacher import TeacherConfig, train_teacher

    data = Seq2SeqData.from_pairs(**make_builtin_task(n_train=2000, n_valid=64, n_test=8))
    losses = {}
    for precision in ("float32", "bf16"):
        cfg = TeacherConfig(preset="tiny", steps=150, lr=2e-3, warmup=20, eval_every=150, save_every=150,
                            eval_size=64, log_every=50, precision=precision)
        out = tmp_path / precision
        train_teacher(cfg, data, out, progress=False, print_fn=lambda s: None)
        log = [__import__("json").loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        losses[precision] = [r["val_loss"] for r in log if "val_loss" in r][-1]
    assert abs(losses["bf16"] - losses["float32"]) <= 0.02 * losses["float32"], losses


def test_bf16_needs_amx_and_says_so():
    """Capped below AVX-512 (DLMONE_ISA=avx2) there is no AMX: precision='bf16' is refused."""
    code = ("import dlmone, pytest\n"
            "m = dlmone.DiffusionTransformer(dlmone.ModelConfig.tiny())\n"
            "try:\n    m.precision = 'bf16'\nexcept RuntimeError as e:\n    print('refused:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "DLMONE_ISA"}
    env["DLMONE_ISA"] = "avx2"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "refused:" in out.stdout and "AMX" in out.stdout
