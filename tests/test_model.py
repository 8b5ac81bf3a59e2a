"""DiffusionTransformer (the C core) against the PyTorch reference of SPEC §3,
finite differences, dropout, state dicts, threading determinism, bad input.

The torch parity tests compare the float32 C model with the reference run in
float64 on the same (float32) weights, so the tolerances measure the C core's
own rounding only."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import dlmone

from conftest import assert_close, TINY, TINY_SAME, make_config, make_model, random_state


def _torch():
    return pytest.importorskip("torch")


def _ref(cfg, model, dtype="float64"):
    torch = _torch()
    from reference import TorchDiffuSeq, load_numpy_state

    ref = TorchDiffuSeq(cfg).to(getattr(torch, dtype))
    load_numpy_state(ref, model.state_dict())
    ref.eval()
    return ref


def _t_scaled(t, cfg):
    return np.asarray(t, dtype=np.float64) * (1000.0 / cfg.diffusion_steps)


def _inputs(cfg, rng, B, L):
    x = rng.standard_normal((B, L, cfg.emb_dim)).astype(np.float32)
    t = rng.integers(0, cfg.diffusion_steps, size=B)
    t[0] = cfg.diffusion_steps - 1  # extremes of the range
    if B > 1:
        t[1] = 0
    return x, t


def _max_positions(cfg):
    return cfg.max_positions or cfg.seq_len


# ----------------------------------------------------------------------------
# the reference itself (torch only)
# ----------------------------------------------------------------------------


def _ns(**kw):
    from types import SimpleNamespace

    base = dict(max_positions=None, layer_norm_eps=1e-12)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("kw", [TINY, TINY_SAME], ids=["proj", "same"])
def test_reference_state_keys_are_diffuseq(kw):
    _torch()
    from reference import TorchDiffuSeq, expected_state_keys

    cfg = _ns(**kw)
    ref = TorchDiffuSeq(cfg)
    assert list(ref.state_dict()) == expected_state_keys(cfg)
    assert ref.lm_head.weight is ref.word_embedding.weight
    has_proj = kw["emb_dim"] != kw["hidden_dim"]
    assert ("input_up_proj.0.weight" in ref.state_dict()) == has_proj
    assert ref.position_embeddings.weight.shape == (_max_positions(cfg), kw["hidden_dim"])


def _np_ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _np_diffuseq(s, cfg, x, ts):
    """Hand-written float64 numpy TransformerNetModel (independent of reference.py)."""
    from scipy.special import erf

    def lin(z, p):
        return z @ s[p + ".weight"].T + s[p + ".bias"]

    B, L, _ = x.shape
    H, A, Dt = cfg.hidden_dim, cfg.num_heads, cfg.time_dim
    half = Dt // 2
    a = ts[:, None] * np.exp(-math.log(10000.0) * np.arange(half) / half)
    te = np.concatenate([np.cos(a), np.sin(a)] + ([np.zeros((B, 1))] if Dt % 2 else []), -1)
    z = lin(te, "time_embed.0")
    te = lin(z / (1 + np.exp(-z)), "time_embed.2")
    ex = lin(np.tanh(lin(x, "input_up_proj.0")), "input_up_proj.2") if cfg.emb_dim != H else x
    h = s["position_embeddings.weight"][:L] + ex + te[:, None]
    h = _np_ln(h, s["LayerNorm.weight"], s["LayerNorm.bias"], cfg.layer_norm_eps)
    d = H // A
    for i in range(cfg.num_layers):
        p = f"input_transformers.layer.{i}."
        q, k, v = (
            lin(h, p + "attention.self." + n).reshape(B, L, A, d).transpose(0, 2, 1, 3)
            for n in ("query", "key", "value")
        )
        sc = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        sc /= sc.sum(-1, keepdims=True)
        ctx = (sc @ v).transpose(0, 2, 1, 3).reshape(B, L, H)
        a = _np_ln(lin(ctx, p + "attention.output.dense") + h,
                   s[p + "attention.output.LayerNorm.weight"], s[p + "attention.output.LayerNorm.bias"],
                   cfg.layer_norm_eps)
        g = lin(a, p + "intermediate.dense")
        g = 0.5 * g * (1 + erf(g / np.sqrt(2)))
        h = _np_ln(lin(g, p + "output.dense") + a,
                   s[p + "output.LayerNorm.weight"], s[p + "output.LayerNorm.bias"], cfg.layer_norm_eps)
    y = lin(np.tanh(lin(h, "output_down_proj.0")), "output_down_proj.2") if cfg.emb_dim != H else h
    return y, h


@pytest.mark.parametrize("kw", [TINY, TINY_SAME], ids=["proj", "same"])
def test_reference_matches_numpy(kw):
    torch = _torch()
    pytest.importorskip("scipy")
    from reference import TorchDiffuSeq

    cfg = _ns(**kw)
    torch.manual_seed(0)
    ref = TorchDiffuSeq(cfg).double().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    s = {k: v.numpy() for k, v in ref.state_dict().items()}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7, cfg.emb_dim))
    ts = np.array([0.0, 333.25, 999.5])
    y, h = _np_diffuseq(s, cfg, x, ts)
    with torch.no_grad():
        yt = ref(torch.tensor(x), torch.tensor(ts)).numpy()
    assert_close(yt, y, "reference y", rtol=1e-10, atol=1e-12)
    assert_close(ref.last_hidden.numpy(), h, "reference hidden", rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------
# forward / backward parity with torch
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("B,L", [(1, 1), (2, 5), (3, 10)])
def test_forward_matches_torch(any_cfg, rng, B, L):
    torch = _torch()
    cfg = any_cfg
    m = make_model(cfg, rng)
    ref = _ref(cfg, m)
    x, t = _inputs(cfg, rng, B, L)
    y = np.array(m.forward(x, t, train=False))
    hidden = np.array(m.hidden)
    with torch.no_grad():
        yr = ref(torch.tensor(x, dtype=torch.float64), torch.tensor(_t_scaled(t, cfg)))
    assert y.dtype == np.float32
    assert_close(y, yr.numpy(), "forward y")
    assert_close(hidden, ref.last_hidden.numpy(), "hidden")


def test_forward_full_length(any_cfg, rng):
    """L == max_positions uses every position embedding row."""
    torch = _torch()
    cfg = any_cfg
    m = make_model(cfg, rng)
    ref = _ref(cfg, m)
    x, t = _inputs(cfg, rng, 2, _max_positions(cfg))
    y = np.array(m.forward(x, t, train=False))
    with torch.no_grad():
        yr = ref(torch.tensor(x, dtype=torch.float64), torch.tensor(_t_scaled(t, cfg)))
    assert_close(y, yr.numpy(), "forward y (L = max_positions)")


@pytest.mark.parametrize("eps", [1e-12, 1e-5])
def test_forward_layer_norm_eps(rng, eps):
    """Tiny pre-LayerNorm variance makes layer_norm_eps visible (1e-12 vs 1e-5)."""
    torch = _torch()
    cfg = make_config(layer_norm_eps=eps)
    m = make_model(cfg, rng)
    sd = m.state_dict()
    for k in ("position_embeddings.weight", "time_embed.2.weight", "time_embed.2.bias",
              "input_up_proj.2.weight", "input_up_proj.2.bias"):
        sd[k][...] *= np.float32(1e-3)
    ref = _ref(cfg, m)
    x, t = _inputs(cfg, rng, 2, 6)
    y = np.array(m.forward(x, t, train=False))
    with torch.no_grad():
        yr = ref(torch.tensor(x, dtype=torch.float64), torch.tensor(_t_scaled(t, cfg)))
    assert_close(y, yr.numpy(), f"forward y (layer_norm_eps={eps})")


def test_forward_rescaled_float_timesteps(any_cfg, rng):
    torch = _torch()
    cfg = any_cfg
    m = make_model(cfg, rng)
    ref = _ref(cfg, m)
    x, _ = _inputs(cfg, rng, 3, 6)
    ts = np.array([0.0, 12.345, 999.5], dtype=np.float32)
    y = np.array(m.forward(x, ts, rescaled=True, train=False))
    with torch.no_grad():
        yr = ref(torch.tensor(x, dtype=torch.float64), torch.tensor(ts.astype(np.float64)))
    assert_close(y, yr.numpy(), "forward y (rescaled float t)")
    # integer t and its rescaled float give the same result
    t = np.array([0, 7, cfg.diffusion_steps - 1])
    y1 = np.array(m.forward(x, t, train=False))
    y2 = np.array(m.forward(x, (t * (1000.0 / cfg.diffusion_steps)).astype(np.float32), rescaled=True, train=False))
    assert_close(y1, y2, "int t vs rescaled float t", rtol=1e-6, atol=1e-6)


def _torch_grads(cfg, m, x, t, gy, gh=None):
    torch = _torch()
    ref = _ref(cfg, m)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y = ref(xt, torch.tensor(_t_scaled(t, cfg)))
    loss = (y * torch.tensor(gy, dtype=torch.float64)).sum()
    if gh is not None:
        loss = loss + (ref.last_hidden * torch.tensor(gh, dtype=torch.float64)).sum()
    loss.backward()
    grads = {}
    for k, p in ref.named_parameters(remove_duplicate=False):
        grads[k] = np.zeros(tuple(p.shape)) if p.grad is None else p.grad.numpy().copy()
    return xt.grad.numpy(), grads


@pytest.mark.parametrize("with_hidden", [False, True], ids=["gy", "gy+grad_hidden"])
def test_backward_matches_torch(any_cfg, rng, with_hidden):
    cfg = any_cfg
    _torch()
    m = make_model(cfg, rng)
    B, L = 3, 7
    x, t = _inputs(cfg, rng, B, L)
    gy = rng.standard_normal((B, L, cfg.emb_dim)).astype(np.float32)
    gh = rng.standard_normal((B, L, cfg.hidden_dim)).astype(np.float32) if with_hidden else None
    m.zero_grad()
    m.forward(x, t, train=False)
    gx = np.array(m.backward(gy, grad_hidden=gh) if with_hidden else m.backward(gy))
    gx_ref, g_ref = _torch_grads(cfg, m, x, t, gy, gh)
    assert_close(gx, gx_ref, "grad x")
    grads = m.grads()
    assert set(grads) == set(g_ref), set(grads) ^ set(g_ref)
    for k in g_ref:
        assert_close(grads[k], g_ref[k], f"grad {k}")


def test_backward_param_grads_false(any_cfg, rng):
    cfg = any_cfg
    _torch()
    m = make_model(cfg, rng)
    x, t = _inputs(cfg, rng, 2, 6)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    gh = rng.standard_normal((2, 6, cfg.hidden_dim)).astype(np.float32)
    sentinel = rng.standard_normal(m.grad_buffer.shape).astype(np.float32)
    m.grad_buffer[...] = sentinel
    m.forward(x, t, train=False)
    gx = np.array(m.backward(gy, grad_hidden=gh, param_grads=False))
    assert np.array_equal(m.grad_buffer, sentinel), "param_grads=False touched the grad buffer"
    gx_ref, _ = _torch_grads(cfg, m, x, t, gy, gh)
    assert_close(gx, gx_ref, "grad x (param_grads=False)")


def test_backward_accumulates_and_zero_grad(tiny_cfg, rng):
    m = make_model(tiny_cfg, rng)
    x, t = _inputs(tiny_cfg, rng, 2, 5)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    m.zero_grad()
    assert not m.grad_buffer.any()
    m.forward(x, t, train=False)
    m.backward(gy)
    g1 = m.grad_buffer.copy()
    assert np.abs(g1).sum() > 0
    m.forward(x, t, train=False)
    m.backward(gy)
    assert_close(m.grad_buffer, 2 * g1, "accumulated grads", rtol=1e-6, atol=1e-7)
    m.zero_grad()
    assert not m.grad_buffer.any()


def test_backward_before_forward_raises(tiny_cfg):
    m = dlmone.DiffusionTransformer(tiny_cfg, seed=0)
    with pytest.raises(RuntimeError):
        m.backward(np.zeros((1, 4, tiny_cfg.emb_dim), np.float32))


# ----------------------------------------------------------------------------
# logits / embeddings
# ----------------------------------------------------------------------------


def test_logits_matches_torch(any_cfg, rng):
    torch = _torch()
    cfg = any_cfg
    m = make_model(cfg, rng)
    ref = _ref(cfg, m)
    h = rng.standard_normal((2, 5, cfg.emb_dim)).astype(np.float32)
    G = rng.standard_normal((2, 5, cfg.vocab_size)).astype(np.float32)
    logits = np.array(m.logits(h))
    ht = torch.tensor(h, dtype=torch.float64, requires_grad=True)
    lt = ref.get_logits(ht)
    assert_close(logits, lt.detach().numpy(), "logits")
    (lt * torch.tensor(G, dtype=torch.float64)).sum().backward()
    m.zero_grad()
    gh = np.array(m.logits_backward(h, G))
    assert_close(gh, ht.grad.numpy(), "logits_backward grad h")
    grads = m.grads()
    assert_close(grads["word_embedding.weight"], ref.word_embedding.weight.grad.numpy(), "grad word_embedding (logits)")
    assert_close(grads["lm_head.weight"], ref.word_embedding.weight.grad.numpy(), "grad lm_head.weight (tied)")
    assert_close(grads["lm_head.bias"], ref.lm_head.bias.grad.numpy(), "grad lm_head.bias")
    others = [k for k in grads if k not in ("word_embedding.weight", "lm_head.weight", "lm_head.bias")]
    assert all(not np.any(grads[k]) for k in others), "logits_backward touched other grads"


def test_embed_matches_torch(any_cfg, rng):
    torch = _torch()
    cfg = any_cfg
    m = make_model(cfg, rng)
    ref = _ref(cfg, m)
    tokens = rng.integers(0, cfg.vocab_size, size=(3, 8))
    tokens[0, :4] = 0  # repeated ids: scatter-add must accumulate
    tokens[1, -1] = cfg.vocab_size - 1
    e = np.array(m.embed(tokens))
    assert e.shape == (3, 8, cfg.emb_dim) and e.dtype == np.float32
    tt = torch.tensor(tokens)
    et = ref.get_embeds(tt)
    assert_close(e, et.detach().numpy(), "embed", rtol=0, atol=0)
    G = rng.standard_normal(e.shape).astype(np.float32)
    (et * torch.tensor(G, dtype=torch.float64)).sum().backward()
    m.zero_grad()
    m.embed_backward(tokens, G)
    assert_close(m.grads()["word_embedding.weight"], ref.word_embedding.weight.grad.numpy(), "embed_backward")
    # accumulates
    m.embed_backward(tokens, G)
    assert_close(m.grads()["word_embedding.weight"], 2 * ref.word_embedding.weight.grad.numpy(),
                 "embed_backward (accumulated)")


# ----------------------------------------------------------------------------
# finite differences (no torch needed)
# ----------------------------------------------------------------------------

FD_EPS = 1e-2
# float32 forward: loss noise ~1e-4 after dividing by 2*eps, truncation O(eps^2).
# |fd - analytic| <= FD_RTOL*|analytic| + FD_GTOL*||grad tensor|| + FD_ATOL
FD_RTOL, FD_GTOL, FD_ATOL = 1e-2, 1e-3, 1e-3


def _fd_check(name, fd, an, gnorm):
    tol = FD_RTOL * abs(an) + FD_GTOL * gnorm + FD_ATOL
    assert abs(fd - an) <= tol, f"{name}: finite difference {fd:.6g} vs analytic {an:.6g} (tol {tol:.2e})"


def _fd_setup(cfg, rng, B=2, L=6):
    m = make_model(cfg, rng)
    x, t = _inputs(cfg, rng, B, L)
    R = rng.standard_normal((B, L, cfg.emb_dim))
    Rh = rng.standard_normal((B, L, cfg.hidden_dim))
    return m, x, t, R, Rh


def _fd_loss(m, x, t, R, Rh, **kw):
    y = np.asarray(m.forward(x, t, **kw), dtype=np.float64)
    return float((y * R).sum() + (np.asarray(m.hidden, dtype=np.float64) * Rh).sum())


@pytest.mark.parametrize("train", [False, True], ids=["eval", "dropout"])
def test_finite_differences_params(rng, train):
    cfg = make_config(dropout=0.2 if train else 0.0)
    m, x, t, R, Rh = _fd_setup(cfg, rng)
    kw = dict(train=True, seed=1234) if train else dict(train=False)
    m.zero_grad()
    m.forward(x, t, **kw)
    m.backward(R.astype(np.float32), grad_hidden=Rh.astype(np.float32))
    grads = {k: np.array(v, dtype=np.float64) for k, v in m.grads().items()}
    sd = m.state_dict()
    for k, view in sd.items():
        if k in ("lm_head.weight", "word_embedding.weight", "lm_head.bias"):
            continue  # not used by forward; covered by the logits/embed tests
        p0 = np.array(view)
        g = grads[k]
        # one random unit direction over the whole tensor
        d = rng.standard_normal(view.shape)
        d /= np.linalg.norm(d)
        pp, pm = (p0 + FD_EPS * d).astype(np.float32), (p0 - FD_EPS * d).astype(np.float32)
        view[...] = pp
        lp = _fd_loss(m, x, t, R, Rh, **kw)
        view[...] = pm
        lm = _fd_loss(m, x, t, R, Rh, **kw)
        view[...] = p0
        an = float((g * (pp.astype(np.float64) - pm)).sum()) / (2 * FD_EPS)  # the step actually taken
        _fd_check(f"{k} (direction)", (lp - lm) / (2 * FD_EPS), an, np.linalg.norm(g))
        # two single entries
        for _ in range(2):
            idx = tuple(int(rng.integers(0, n)) for n in view.shape)
            view[idx] = p0[idx] + FD_EPS
            lp = _fd_loss(m, x, t, R, Rh, **kw)
            view[idx] = p0[idx] - FD_EPS
            lm = _fd_loss(m, x, t, R, Rh, **kw)
            view[idx] = p0[idx]
            _fd_check(f"{k}{list(idx)}", (lp - lm) / (2 * FD_EPS), float(g[idx]), np.linalg.norm(g))
    # the parameters are restored exactly
    assert all(np.array_equal(sd[k], m.state_dict()[k]) for k in sd)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "dropout"])
def test_finite_differences_input(rng, train):
    cfg = make_config(dropout=0.2 if train else 0.0)
    m, x, t, R, Rh = _fd_setup(cfg, rng)
    kw = dict(train=True, seed=99) if train else dict(train=False)
    m.forward(x, t, **kw)
    gx = np.array(m.backward(R.astype(np.float32), grad_hidden=Rh.astype(np.float32)), dtype=np.float64)
    gnorm = np.linalg.norm(gx)
    for i in range(3):
        d = rng.standard_normal(x.shape)
        d /= np.linalg.norm(d)
        xp, xm = (x + FD_EPS * d).astype(np.float32), (x - FD_EPS * d).astype(np.float32)
        lp = _fd_loss(m, xp, t, R, Rh, **kw)
        lm = _fd_loss(m, xm, t, R, Rh, **kw)
        an = float((gx * (xp.astype(np.float64) - xm)).sum()) / (2 * FD_EPS)
        _fd_check(f"x direction {i}", (lp - lm) / (2 * FD_EPS), an, gnorm)
    for _ in range(4):
        idx = tuple(int(rng.integers(0, n)) for n in x.shape)
        xp, xm = x.copy(), x.copy()
        xp[idx] += FD_EPS
        xm[idx] -= FD_EPS
        fd = (_fd_loss(m, xp, t, R, Rh, **kw) - _fd_loss(m, xm, t, R, Rh, **kw)) / (2 * FD_EPS)
        _fd_check(f"x{list(idx)}", fd, float(gx[idx]), gnorm)


# ----------------------------------------------------------------------------
# dropout
# ----------------------------------------------------------------------------


def test_dropout_seed_reproducible(rng):
    cfg = make_config(dropout=0.1)
    m = make_model(cfg, rng)
    x, t = _inputs(cfg, rng, 2, 8)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    y1 = np.array(m.forward(x, t, train=True, seed=5))
    m.zero_grad()
    g1 = np.array(m.backward(gy))
    p1 = m.grad_buffer.copy()
    y2 = np.array(m.forward(x, t, train=True, seed=5))
    m.zero_grad()
    g2 = np.array(m.backward(gy))
    assert np.array_equal(y1, y2)
    assert np.array_equal(g1, g2)
    assert np.array_equal(p1, m.grad_buffer)
    y3 = np.array(m.forward(x, t, train=True, seed=6))
    assert not np.array_equal(y1, y3), "different seeds gave identical dropout"
    ye = np.array(m.forward(x, t, train=False))
    assert not np.allclose(y1, ye), "train=True with dropout 0.1 equals eval output"
    # a second model with the same weights gives the same train output (no hidden state in the RNG)
    m2 = dlmone.DiffusionTransformer(cfg, seed=123)
    m2.load_state_dict({k: np.array(v) for k, v in m.state_dict().items()})
    assert np.array_equal(np.array(m2.forward(x, t, train=True, seed=5)), y1)


def test_eval_ignores_dropout(rng):
    cfg0 = make_config(dropout=0.0)
    cfg3 = make_config(dropout=0.3)
    m0 = make_model(cfg0, rng)
    m3 = dlmone.DiffusionTransformer(cfg3, seed=1)
    m3.load_state_dict({k: np.array(v) for k, v in m0.state_dict().items()})
    x, t = _inputs(cfg0, rng, 2, 8)
    y0 = np.array(m0.forward(x, t, train=False))
    assert np.array_equal(np.array(m3.forward(x, t, train=False)), y0)
    assert np.array_equal(np.array(m3.forward(x, t, train=False, seed=77)), y0)
    # dropout probability 0 in train mode is the identity
    assert_close(np.array(m0.forward(x, t, train=True, seed=3)), y0, "train with p=0", rtol=1e-6, atol=1e-6)


def _probe_model(p, site, rng, B=8, L=16):
    """Weights that make the sign pattern of `hidden` equal one dropout mask.

    site 'embed': h0 = Dropout(LayerNorm with weight 0, bias 1) = mask/(1-p);
    every later sub-layer adds zero and re-normalises, so hidden = LN(mask)
    (kept > 0, dropped < 0).  site 'attn_out' / 'ffn_out': h0 = 0 and the
    layer-0 dense bias 1 with zero weights feeds Dropout(ones) into the
    post-LN of that sub-layer instead.
    """
    cfg = make_config(vocab_size=20, seq_len=L, emb_dim=32, hidden_dim=32, num_heads=4, ffn_dim=48,
                      time_dim=32, dropout=p)
    m = dlmone.DiffusionTransformer(cfg, seed=0)
    sd = random_state(m, rng)
    for k in sd:
        if ("attention.output.dense" in k or ".output.dense" in k) and "layer." in k:
            sd[k][...] = 0.0
        if k.endswith("LayerNorm.weight"):
            sd[k][...] = 1.0
        if k.endswith("LayerNorm.bias"):
            sd[k][...] = 0.0
    sd["LayerNorm.weight"][...] = 0.0
    if site == "embed":
        sd["LayerNorm.bias"][...] = 1.0
    elif site == "attn_out":
        sd["input_transformers.layer.0.attention.output.dense.bias"][...] = 1.0
    elif site == "ffn_out":
        sd["input_transformers.layer.0.output.dense.bias"][...] = 1.0
    m.load_state_dict(sd)
    x = rng.standard_normal((B, L, cfg.emb_dim)).astype(np.float32)
    t = rng.integers(0, cfg.diffusion_steps, size=B)
    return m, x, t


@pytest.mark.parametrize("site", ["embed", "attn_out", "ffn_out"])
@pytest.mark.parametrize("p", [0.5, 0.2])
def test_dropout_mask_statistics(rng, site, p):
    m, x, t = _probe_model(p, site, rng)
    masks = []
    for seed in (11, 12):
        m.forward(x, t, train=True, seed=seed)
        h = np.array(m.hidden)
        rows = np.abs(h).max(-1) > 1e-3  # rows with all kept / all dropped normalise to 0
        dropped = h[rows] < 0
        n = dropped.size
        assert n > 0.5 * h.size, "too many rows with all entries kept or dropped"
        frac = dropped.mean()
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(frac - p) < 6 * sigma + 0.01, f"{site}: dropped fraction {frac:.4f}, p={p}"
        # masks differ between batch rows and positions (not one broadcast mask)
        full = (h < 0)
        assert not np.array_equal(full[0], full[1])
        assert not np.array_equal(full[:, 0], full[:, 1])
        masks.append(full)
    assert not np.array_equal(masks[0], masks[1]), "seed does not change the mask"


def test_attention_probs_dropout_present(rng):
    """h0 = 0, q = k = 0 (uniform attention), v = 1: without dropout on the
    attention probabilities every head's context is exactly 1; with it each
    head's context is (#kept / L)/(1-p), so kept entries differ across heads."""
    L, A = 16, 4
    cfg = make_config(vocab_size=20, seq_len=L, emb_dim=32, hidden_dim=32, num_heads=A, ffn_dim=48,
                      time_dim=32, dropout=0.3)
    m = dlmone.DiffusionTransformer(cfg, seed=0)
    sd = random_state(m, rng)
    for k in sd:
        if "layer." in k and (".output.dense" in k or "attention.self" in k):
            sd[k][...] = 0.0
        if k.endswith("LayerNorm.weight"):
            sd[k][...] = 1.0
        if k.endswith("LayerNorm.bias"):
            sd[k][...] = 0.0
    sd["LayerNorm.weight"][...] = 0.0
    sd["input_transformers.layer.0.attention.self.value.bias"][...] = 1.0
    sd["input_transformers.layer.0.attention.output.dense.weight"][...] = np.eye(32, dtype=np.float32)
    m.load_state_dict(sd)
    x = rng.standard_normal((4, L, 32)).astype(np.float32)
    t = np.zeros(4, dtype=np.int64)
    m.forward(x, t, train=False)
    he = np.array(m.hidden)
    assert np.allclose(he, 0, atol=1e-5)  # LN of a constant vector
    m.forward(x, t, train=True, seed=3)
    h = np.array(m.hidden).reshape(4, L, A, 32 // A)
    kept = h > 1e-4
    varying = 0
    for b in range(4):
        for i in range(L):
            vals = [h[b, i, a][kept[b, i, a]] for a in range(A)]
            heads = [v.mean() for v in vals if v.size]
            if len(heads) >= 2 and np.ptp(heads) > 1e-3:
                varying += 1
    assert varying > L, f"attention-probability dropout not visible ({varying} rows vary)"


# ----------------------------------------------------------------------------
# state dicts
# ----------------------------------------------------------------------------


def test_state_dict_keys_and_shapes(any_cfg):
    cfg = any_cfg
    m = dlmone.DiffusionTransformer(cfg, seed=0)
    sd = m.state_dict()
    pytest.importorskip("torch")
    from reference import TorchDiffuSeq

    ref = TorchDiffuSeq(cfg)
    ref_sd = ref.state_dict()
    assert set(sd) == set(ref_sd), f"missing {set(ref_sd) - set(sd)}, extra {set(sd) - set(ref_sd)}"
    for k, v in sd.items():
        assert tuple(v.shape) == tuple(ref_sd[k].shape), k
        assert v.dtype == np.float32, k
    n = sum(p.numel() for p in ref.parameters())  # tied weight counted once
    assert m.num_parameters() == n == m.params.size
    assert m.grad_buffer.shape == m.params.shape and m.grad_buffer.dtype == np.float32
    assert np.array_equal(sd["lm_head.weight"], sd["word_embedding.weight"])


def test_state_dict_zero_copy(tiny_cfg, rng):
    m = make_model(tiny_cfg, rng)
    sd = m.state_dict()
    gr = m.grads()
    assert set(gr) == set(sd)
    for k in sd:
        assert np.shares_memory(sd[k], m.params), k
        assert np.shares_memory(gr[k], m.grad_buffer), k
    assert np.shares_memory(sd["lm_head.weight"], sd["word_embedding.weight"])
    assert np.shares_memory(gr["lm_head.weight"], gr["word_embedding.weight"])
    x, t = _inputs(tiny_cfg, rng, 2, 5)
    y0 = np.array(m.forward(x, t, train=False))
    sd["LayerNorm.bias"][0] += 1.0
    y1 = np.array(m.forward(x, t, train=False))
    assert not np.allclose(y0, y1), "writing into a state_dict view did not change forward"
    sd["LayerNorm.bias"][0] -= 1.0
    # writing into m.params is seen by the state_dict views (and vice versa)
    before = {k: np.array(v) for k, v in sd.items()}
    m.params[...] += np.float32(0.5)
    for k in sd:
        assert np.array_equal(sd[k], (before[k] + np.float32(0.5)).astype(np.float32)), k
    m.params[...] -= np.float32(0.5)
    m.grad_buffer[...] = 3.0
    assert all((g == 3.0).all() for g in gr.values())


def test_state_dict_round_trip(any_cfg, rng):
    cfg = any_cfg
    m = make_model(cfg, rng)
    saved = {k: np.array(v) for k, v in m.state_dict().items()}
    m2 = dlmone.DiffusionTransformer(cfg, seed=7)
    x, t = _inputs(cfg, rng, 2, 5)
    assert not np.array_equal(np.array(m2.forward(x, t, train=False)), np.array(m.forward(x, t, train=False)))
    m2.load_state_dict(saved, strict=True)
    for k, v in m2.state_dict().items():
        assert np.array_equal(v, saved[k]), k
    assert np.array_equal(np.array(m2.forward(x, t, train=False)), np.array(m.forward(x, t, train=False)))
    # load copies: later changes to the source dict do not leak in
    saved["LayerNorm.bias"] += 1.0
    assert not np.array_equal(m2.state_dict()["LayerNorm.bias"], saved["LayerNorm.bias"])
    # dlmone state -> torch reference -> back is the identity
    pytest.importorskip("torch")
    from reference import TorchDiffuSeq, load_numpy_state, numpy_state_from_torch

    back = numpy_state_from_torch(load_numpy_state(TorchDiffuSeq(cfg), m.state_dict()))
    m3 = dlmone.DiffusionTransformer(cfg, seed=8)
    m3.load_state_dict(back)
    assert np.array_equal(m3.params, m.params)


def test_load_state_dict_strict_errors(tiny_cfg, rng):
    m = make_model(tiny_cfg, rng)
    good = {k: np.array(v) for k, v in m.state_dict().items()}

    d = dict(good)
    del d["input_transformers.layer.1.output.LayerNorm.bias"]
    with pytest.raises((KeyError, ValueError), match=r"input_transformers\.layer\.1\.output\.LayerNorm\.bias"):
        m.load_state_dict(d, strict=True)

    d = dict(good)
    d["input_transformers.layer.2.output.dense.weight"] = np.zeros((24, 40), np.float32)
    with pytest.raises((KeyError, ValueError), match=r"input_transformers\.layer\.2\.output\.dense\.weight"):
        m.load_state_dict(d, strict=True)

    d = dict(good)
    d["time_embed.2.weight"] = np.zeros((24, 63), np.float32)
    with pytest.raises(ValueError, match=r"time_embed\.2\.weight"):
        m.load_state_dict(d, strict=True)

    d = dict(good)
    d["LayerNorm.bias"] = np.zeros((1, 24), np.float32)
    with pytest.raises(ValueError, match=r"LayerNorm\.bias"):
        m.load_state_dict(d, strict=True)

    # a failed load leaves the model unchanged
    assert all(np.array_equal(v, good[k]) for k, v in m.state_dict().items())


# ----------------------------------------------------------------------------
# threads: bitwise identical results with 1 and 2 OpenMP threads
# ----------------------------------------------------------------------------

_THREAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import dlmone
    cfg_kw, src, dst = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    cfg = dlmone.ModelConfig(**cfg_kw)
    d = dict(np.load(src))
    m = dlmone.DiffusionTransformer(cfg, seed=0)
    m.load_state_dict({k[2:]: v for k, v in d.items() if k.startswith("p:")})
    x, t, gy, gh, tok, gl = d["x"], d["t"], d["gy"], d["gh"], d["tok"], d["gl"]
    out = {"threads": np.array(dlmone.get_num_threads())}
    m.zero_grad()
    out["y_eval"] = np.array(m.forward(x, t, train=False))
    out["h_eval"] = np.array(m.hidden)
    out["gx_eval"] = np.array(m.backward(gy, grad_hidden=gh))
    out["y_train"] = np.array(m.forward(x, t, train=True, seed=42))
    out["gx_train"] = np.array(m.backward(gy, grad_hidden=gh))
    out["logits"] = np.array(m.logits(out["y_eval"]))
    out["gh_logits"] = np.array(m.logits_backward(out["y_eval"], gl))
    m.embed_backward(tok, gy)
    out["emb"] = np.array(m.embed(tok))
    out["grads"] = m.grad_buffer.copy()
    np.savez(dst, **out)
    """
)


def test_threads_bitwise_identical(tmp_path):
    rng = np.random.default_rng(5)
    cfg_kw = dict(vocab_size=301, seq_len=40, emb_dim=32, hidden_dim=64, num_layers=2, num_heads=4,
                  ffn_dim=256, time_dim=32, dropout=0.1, diffusion_steps=2000)
    cfg = dlmone.ModelConfig(**cfg_kw)
    m = dlmone.DiffusionTransformer(cfg, seed=0)
    st = random_state(m, rng)
    B, L = 5, 37
    data = {f"p:{k}": v for k, v in st.items()}
    data.update(
        x=rng.standard_normal((B, L, 32)).astype(np.float32),
        t=rng.integers(0, 2000, size=B),
        gy=rng.standard_normal((B, L, 32)).astype(np.float32),
        gh=rng.standard_normal((B, L, 64)).astype(np.float32),
        tok=rng.integers(0, 301, size=(B, L)),
        gl=rng.standard_normal((B, L, 301)).astype(np.float32),
    )
    src = tmp_path / "in.npz"
    np.savez(src, **data)
    results = {}
    for n in ("1", "2"):
        dst = tmp_path / f"out{n}.npz"
        root = os.path.dirname(os.path.dirname(os.path.abspath(dlmone.__file__)))
        env = {**os.environ, "OMP_NUM_THREADS": n,
               "PYTHONPATH": os.pathsep.join([root] + [q for q in [os.environ.get("PYTHONPATH")] if q])}
        r = subprocess.run([sys.executable, "-c", _THREAD_SCRIPT, json.dumps(cfg_kw), str(src), str(dst)],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"OMP_NUM_THREADS={n}: {r.stderr[-3000:]}"
        results[n] = dict(np.load(dst))
        assert int(results[n]["threads"]) == int(n), f"get_num_threads() = {results[n]['threads']} with OMP_NUM_THREADS={n}"
    for k in results["1"]:
        if k == "threads":
            continue
        a, b = results["1"][k], results["2"][k]
        assert a.shape == b.shape and a.dtype == b.dtype, k
        same = a.view(np.uint8) == b.view(np.uint8)
        assert same.all(), f"{k}: 1 vs 2 threads differ, max abs diff {np.abs(a.astype(np.float64) - b).max():.3e}"


def test_set_num_threads_roundtrip():
    old = dlmone.get_num_threads()
    try:
        dlmone.set_num_threads(1)
        assert dlmone.get_num_threads() == 1
    finally:
        dlmone.set_num_threads(old)
    assert dlmone.get_num_threads() == old


def test_build_info():
    info = dlmone.build_info()
    assert isinstance(info, dict)
    for k in ("openmp", "blas", "cflags", "threads"):
        assert k in info, k
    flags = str(info["cflags"])
    for bad in ("-ffast-math", "-Ofast", "-funsafe-math-optimizations"):
        assert bad not in flags, bad


# ----------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------


def test_bad_inputs(tiny_cfg, rng):
    cfg = tiny_cfg
    m = make_model(cfg, rng)
    E, T = cfg.emb_dim, cfg.diffusion_steps
    x, t = _inputs(cfg, rng, 2, 5)
    with pytest.raises(TypeError):
        m.forward(x.astype(np.int32), t)
    with pytest.raises(ValueError, match=r"\bx\b"):
        m.forward(x[0], t)  # rank 2
    with pytest.raises(ValueError, match=r"\bx\b"):
        m.forward(x[..., :-1], t)  # wrong E
    with pytest.raises(ValueError, match=r"\bt\b"):
        m.forward(x, t[:1])  # wrong batch
    for bad in (T, -1):
        with pytest.raises(ValueError, match=r"\bt\b"):
            m.forward(x, np.array([0, bad]))
    L_big = _max_positions(cfg) + 1
    with pytest.raises(ValueError):
        m.forward(rng.standard_normal((1, L_big, E)).astype(np.float32), t[:1])
    with pytest.raises(ValueError):
        m.forward(np.zeros((1, 0, E), np.float32), t[:1])  # L = 0
    # gy of the wrong shape
    m.forward(x, t, train=False)
    with pytest.raises(ValueError):
        m.backward(np.zeros((2, 4, E), np.float32))
    with pytest.raises(ValueError):
        m.backward(np.zeros((2, 5, E), np.float32), grad_hidden=np.zeros((2, 5, E + 1), np.float32))
    # tokens out of range
    for bad in (cfg.vocab_size, -1):
        with pytest.raises(ValueError, match="tokens"):
            m.embed(np.array([[0, bad]]))
        with pytest.raises(ValueError, match="tokens"):
            m.embed_backward(np.array([[0, bad]]), np.zeros((1, 2, E), np.float32))
    with pytest.raises(TypeError):
        m.embed(np.array([[0.5, 1.0]]))
    with pytest.raises(ValueError):
        m.logits(np.zeros((2, 3, E + 1), np.float32))
    with pytest.raises(ValueError):
        m.logits_backward(np.zeros((2, 3, E), np.float32), np.zeros((2, 3, cfg.vocab_size + 1), np.float32))
    # after all these errors the model still works and agrees with itself
    y = np.array(m.forward(x, t, train=False))
    assert np.isfinite(y).all()


def test_float64_x_is_converted_or_rejected(tiny_cfg, rng):
    """float64 x must either be converted (same result as float32) or raise TypeError."""
    m = make_model(tiny_cfg, rng)
    x, t = _inputs(tiny_cfg, rng, 2, 5)
    y32 = np.array(m.forward(x, t, train=False))
    try:
        y64 = np.array(m.forward(x.astype(np.float64), t, train=False))
    except TypeError:
        return
    assert np.array_equal(y64, y32)


def test_non_contiguous_input(tiny_cfg, rng):
    m = make_model(tiny_cfg, rng)
    x, t = _inputs(tiny_cfg, rng, 3, 6)
    xt = np.ascontiguousarray(x.transpose(1, 0, 2)).transpose(1, 0, 2)  # same values, strided
    assert not xt.flags.c_contiguous
    assert np.array_equal(np.array(m.forward(xt, t, train=False)), np.array(m.forward(x, t, train=False)))


def test_bad_config():
    with pytest.raises(ValueError, match="num_heads"):
        dlmone.DiffusionTransformer(make_config(hidden_dim=25, num_heads=3), seed=0)
    for field in ("vocab_size", "seq_len", "emb_dim", "hidden_dim", "num_heads", "ffn_dim", "time_dim",
                  "diffusion_steps"):
        with pytest.raises(ValueError, match=field):
            dlmone.DiffusionTransformer(make_config(**{field: 0}), seed=0)
    with pytest.raises(ValueError, match="max_positions"):
        dlmone.DiffusionTransformer(make_config(max_positions=4), seed=0)  # < seq_len
    for p in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout"):
            dlmone.DiffusionTransformer(make_config(dropout=p), seed=0)


def test_config_dict_round_trip():
    cfg = make_config(max_positions=20)
    d = cfg.to_dict()
    assert d["max_positions"] == 20 and d["layer_norm_eps"] == 1e-12
    assert dlmone.ModelConfig.from_dict(d) == cfg
    assert dlmone.ModelConfig.from_dict(json.loads(json.dumps(d))) == cfg
    for preset in ("tiny", "small", "diffuseq_base"):
        c = getattr(dlmone.ModelConfig, preset)()
        assert c.hidden_dim % c.num_heads == 0
    base = dlmone.ModelConfig.diffuseq_base()
    assert (base.vocab_size, base.emb_dim, base.hidden_dim, base.num_layers, base.num_heads, base.ffn_dim) == (
        30522, 128, 768, 12, 12, 3072)


def test_diffuseq_base_parameter_count():
    """SPEC §3: about 91M parameters at DiffuSeq's published size."""
    pytest.importorskip("torch")
    from reference import TorchDiffuSeq

    cfg = dlmone.ModelConfig.diffuseq_base()
    n = sum(p.numel() for p in TorchDiffuSeq(cfg).parameters())
    assert 85e6 < n < 95e6


# ----------------------------------------------------------------------------
# no -ffast-math side effects (FTZ/DAZ) after importing and running dlmone
# ----------------------------------------------------------------------------


def test_subnormals_survive(tiny_cfg, rng):
    def check():
        assert 5e-324 != 0.0
        assert np.float32(1e-40) * np.float32(1) != 0
        assert np.float64(5e-324) * 1.0 != 0
        assert (np.array([1e-40], np.float32) * 1).item() != 0

    check()
    m = make_model(tiny_cfg, rng)
    x, t = _inputs(tiny_cfg, rng, 2, 5)
    m.forward(x, t, train=False)
    m.backward(x)
    check()


def test_two_models_in_two_threads_match_sequential(tiny_cfg, rng):
    """The GIL is released during C calls; two models in two threads give what they
    give one after the other."""
    import threading

    x = rng.standard_normal((4, tiny_cfg.seq_len, tiny_cfg.emb_dim)).astype(np.float32)
    t = np.array([0, 10, 500, 1999])

    def work(model, out, key):
        for _ in range(20):
            model.zero_grad()
            y = model.forward(x, t)
            model.backward(y)
        out[key] = (y, model.grad_buffer.copy())

    seq, par = {}, {}
    for key, seed in (("a", 1), ("b", 2)):
        work(dlmone.DiffusionTransformer(tiny_cfg, seed=seed), seq, key)
    models = {k: dlmone.DiffusionTransformer(tiny_cfg, seed=s) for k, s in (("a", 1), ("b", 2))}
    threads = [threading.Thread(target=work, args=(models[k], par, k)) for k in ("a", "b")]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for k in ("a", "b"):
        assert np.array_equal(seq[k][0], par[k][0]) and np.array_equal(seq[k][1], par[k][1])


def test_nan_input_propagates_to_output(tiny_cfg, rng):
    """Documented: NaN in x is not checked by forward; it reaches the output (never a
    crash, never silently finite)."""
    m = dlmone.DiffusionTransformer(tiny_cfg)
    x = rng.standard_normal((2, tiny_cfg.seq_len, tiny_cfg.emb_dim)).astype(np.float32)
    x[1, 3, 0] = np.nan
    y = m.forward(x, np.array([5, 5]))
    assert np.isfinite(y[0]).all() and np.isnan(y[1]).any()


def _amx():
    import dlmone

    if not dlmone.build_info()["amx_bf16"]:
        pytest.skip("no AMX-BF16 on this CPU or build")


@pytest.mark.parametrize("kw", [TINY, TINY_SAME], ids=["proj", "same"])
def test_bf16_inference_close_to_float32(kw, rng):
    import dlmone

    _amx()
    cfg = dlmone.ModelConfig(**kw)
    m = dlmone.DiffusionTransformer(cfg, seed=3)
    x, t = _inputs(cfg, rng, 5, cfg.seq_len)
    y32 = m.forward(x, t)
    m.inference_precision = "bf16"
    y16 = m.forward(x, t)
    assert not np.array_equal(y16, y32)  # really ran in bf16
    assert np.abs(y16 - y32).max() < 2e-2 * np.abs(y32).max()
    # the bf16 copy follows parameter changes (here: an optimiser-like in-place update)
    m.params[m.layout["input_transformers.layer.0.intermediate.dense.weight"][0]] += 1.0
    y16b = m.forward(x, t)
    m.inference_precision = "float32"
    y32b = m.forward(x, t)
    assert not np.array_equal(y32b, y32)
    assert np.abs(y16b - y32b).max() < 2e-2 * np.abs(y32b).max()


def test_inference_precision_leaves_training_float32(tiny_cfg, rng):
    import dlmone

    _amx()
    m = dlmone.DiffusionTransformer(tiny_cfg)
    ref = dlmone.DiffusionTransformer(tiny_cfg)
    x, t = _inputs(tiny_cfg, rng, 2, tiny_cfg.seq_len)
    m.inference_precision = "bf16"
    assert m.precision == "float32"
    np.testing.assert_array_equal(m.forward(x, t, train=True, seed=1), ref.forward(x, t, train=True, seed=1))
    np.testing.assert_array_equal(m.backward(np.ones_like(x)), ref.backward(np.ones_like(x)))
    m.forward(x, t)  # a bf16 inference forward: its backward runs in bf16 too
    ref.forward(x, t)
    g16, g32 = m.backward(np.ones_like(x)), ref.backward(np.ones_like(x))
    assert not np.array_equal(g16, g32)
    assert np.abs(g16 - g32).max() < 3e-2 * np.abs(g32).max()
    with pytest.raises(ValueError, match="inference_precision"):
        m.inference_precision = "fp8"
    with pytest.raises(ValueError, match="precision"):
        m.precision = "float16"


def test_row_offset_gives_shards_the_whole_batch_dropout(rng):
    """Two halves of a batch, each told its row offset, get the whole batch's dropout
    masks: the same outputs and input gradients (to rounding), and parameter gradients
    that sum to the whole batch's."""
    import dlmone

    cfg = dlmone.ModelConfig(**dict(TINY, dropout=0.3))
    m = dlmone.DiffusionTransformer(cfg, seed=1)
    x, t = _inputs(cfg, rng, 4, cfg.seq_len)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    y = m.forward(x, t, train=True, seed=77)
    dx = m.backward(gy)
    whole = m.grad_buffer.copy()
    parts, dxs = [], []
    for lo, hi in ((0, 2), (2, 4)):
        m.zero_grad()
        parts.append(m.forward(x[lo:hi], t[lo:hi], train=True, seed=77, row_offset=lo))
        dxs.append(m.backward(gy[lo:hi]))
        whole -= m.grad_buffer
    # the same masks; the products' last bits may differ with the number of rows (OpenBLAS
    # picks its kernels by shape: seen with its Haswell kernels, not with SkylakeX's)
    np.testing.assert_allclose(np.concatenate(parts), y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(dxs), dx, rtol=1e-5, atol=1e-6)
    assert np.abs(whole).max() < 1e-5
    # without the offset the second half would reuse the first rows' masks: far off
    assert np.abs(m.forward(x[2:], t[2:], train=True, seed=77) - y[2:]).max() > 1e-2
    with pytest.raises(ValueError, match="row_offset"):
        m.forward(x, t, train=True, seed=77, row_offset=-1)


# ----------------------------------------------------------------------------
# one model, several Python threads; re-initialisation; sizes at the limits
# (named without "thread": the CI's ASan run keeps these)
# ----------------------------------------------------------------------------


def test_concurrent_calls_on_one_model_return_the_result_or_raise(rng):
    """Four Python threads share one model, with batch sizes 1, 64, 3, 128 (each forward
    may reallocate the workspace), and a fifth mixes the other methods in. Every call
    returns exactly the single-threaded result or raises RuntimeError; none crashes."""
    import threading

    cfg = dlmone.ModelConfig(vocab_size=40, seq_len=16, emb_dim=16, hidden_dim=32, num_layers=2,
                             num_heads=4, ffn_dim=64, time_dim=16, dropout=0.0)
    m = dlmone.DiffusionTransformer(cfg, seed=3)
    batches = (1, 64, 3, 128)
    xs = {B: rng.standard_normal((B, cfg.seq_len, cfg.emb_dim)).astype(np.float32) for B in batches}
    ts = {B: rng.integers(0, cfg.diffusion_steps, size=B) for B in batches}
    tokens = rng.integers(0, cfg.vocab_size, size=(5, cfg.seq_len))
    expected = {B: m.forward(xs[B], ts[B]) for B in batches}
    expected_logits = m.logits(expected[3])
    expected_embed = m.embed(tokens)
    iterations = 40
    start = threading.Barrier(len(batches) + 1)
    outcome = {}

    def forwards(B):
        ok = busy = 0
        start.wait()
        for _ in range(iterations):
            try:
                y = m.forward(xs[B], ts[B])
            except RuntimeError as e:
                assert "another thread" in str(e), e
                busy += 1
                continue
            assert np.array_equal(y, expected[B]), f"batch {B}: a concurrent forward changed the result"
            ok += 1
        outcome[B] = (ok, busy)

    def others():
        ok = busy = 0
        start.wait()
        for i in range(iterations):
            try:
                if i % 4 == 0:
                    assert np.array_equal(m.logits(expected[3]), expected_logits)
                elif i % 4 == 1:
                    assert np.array_equal(m.embed(tokens), expected_embed)
                elif i % 4 == 2:
                    m.embed_backward(tokens, expected_embed)
                else:
                    m.zero_grad()
                ok += 1
            except RuntimeError as e:
                assert "another thread" in str(e), e
                busy += 1
        outcome["others"] = (ok, busy)

    workers = [threading.Thread(target=forwards, args=(B,)) for B in batches]
    workers.append(threading.Thread(target=others))
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(outcome) == len(workers), "a worker failed an assertion (see the thread's traceback)"
    for key, (ok, busy) in outcome.items():
        assert ok + busy == iterations, key
    assert sum(ok for ok, _ in outcome.values()) > 0
    # afterwards the model works as before
    for B in batches:
        assert np.array_equal(m.forward(xs[B], ts[B]), expected[B])
    m.zero_grad()
    m.backward(np.ones_like(xs[128]))
    assert np.isfinite(m.grad_buffer).all()


def test_second_init_raises_and_keeps_the_buffers():
    """__init__ on a live model would free the buffers under live numpy views."""
    core = dlmone._core.Model(31, 8, 12, 2, 3, 20, 8, 12, 0.0, 1e-12, 1)
    params, grads = core.params, core.grads
    before = params.copy()
    with pytest.raises(RuntimeError, match="initialised"):
        core.__init__(5, 4, 4, 1, 1, 4, 2, 4)
    assert params.shape == before.shape and np.array_equal(params, before)
    grads[:] = 1.0  # still the model's memory
    assert np.array_equal(core.grads, grads)
    y = core.forward(np.zeros((2, 3, 8), np.float32), np.zeros(2, np.float32))
    assert y.shape == (2, 3, 8)


def test_model_without_init_raises():
    core = dlmone._core.Model.__new__(dlmone._core.Model)
    for call in (lambda: core.forward(np.zeros((1, 1, 8), np.float32), np.zeros(1, np.float32)),
                 lambda: core.backward(np.zeros((1, 1, 8), np.float32)), core.hidden, core.zero_grad,
                 core.layout, lambda: core.params, lambda: core.grads,
                 lambda: core.logits(np.zeros((1, 8), np.float32))):
        with pytest.raises(RuntimeError, match="__init__"):
            call()


SMALL_DIMS = dict(vocab_size=5, emb_dim=4, hidden_dim=4, num_layers=1, num_heads=1, ffn_dim=4,
                  time_dim=2, max_positions=4)


@pytest.mark.parametrize("overrides, match", [
    (dict(vocab_size=2**31), "2\\^31-1"),                       # a product width beyond 32-bit BLAS
    (dict(hidden_dim=2**30, num_heads=1), "2\\^31-1"),          # 3H beyond 32-bit BLAS
    (dict(time_dim=2**29), "2\\^31-1"),                         # 4*time_dim
    (dict(vocab_size=2**30, emb_dim=2**20), "2\\^40"),          # V*E parameters
    (dict(num_layers=2**62), "2\\^40"),                         # layers x layer size
    (dict(max_positions=2**62), "2\\^40"),                      # P*H overflows size_t
    (dict(num_layers=2**40, hidden_dim=2**20), "2\\^40"),
])
def test_huge_sizes_raise_value_error(overrides, match):
    dims = dict(SMALL_DIMS, **overrides)
    with pytest.raises(ValueError, match=match):
        dlmone._core.Model(**dims)
    with pytest.raises(ValueError, match=match):
        dlmone._core.param_layout(**dims)
    with pytest.raises(ValueError, match=match):
        dlmone._core.workspace_bytes(**dims, batch=1, length=1)


def test_huge_batches_raise_value_error():
    # batch*length beyond the 32-bit BLAS; then activations beyond 2^40 floats
    with pytest.raises(ValueError, match="2\\^31-1"):
        dlmone._core.workspace_bytes(**dict(SMALL_DIMS, max_positions=2**16), batch=2**15, length=2**16)
    with pytest.raises(ValueError, match="2\\^40"):
        dlmone._core.workspace_bytes(**dict(SMALL_DIMS, num_layers=2**12, max_positions=2**15),
                                     batch=2**15, length=2**15)
    with pytest.raises(ValueError, match="max_positions"):
        dlmone._core.workspace_bytes(**SMALL_DIMS, batch=1, length=5)
    assert dlmone._core.workspace_bytes(**SMALL_DIMS, batch=2**31 - 1, length=1) > 2**31


def test_forward_of_a_batch_beyond_blas_raises_value_error(tmp_path):
    """x with 2^31 rows (a sparse file: no memory) is refused before anything is read."""
    dims = dict(SMALL_DIMS, emb_dim=1, max_positions=2**16)
    core = dlmone._core.Model(**dims)
    B, L = 2**15, 2**16
    path = tmp_path / "x.bin"
    with open(path, "wb") as f:
        f.truncate(B * L * 4)
    x = np.memmap(path, dtype=np.float32, mode="r", shape=(B, L, 1))
    core.forward(np.zeros((1, 2, 1), np.float32), np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="2\\^31-1"):
        core.forward(x, np.zeros(B, np.float32))
    with pytest.raises(RuntimeError, match="before forward"):
        core.backward(np.zeros((1, 2, 1), np.float32))  # the failed forward left no activations
    with pytest.raises(ValueError, match="rows of h"):
        core.logits(x.reshape(B * L, 1))
    del x


def test_param_layout_is_the_model_layout():
    for dims in (SMALL_DIMS, dict(SMALL_DIMS, emb_dim=3, num_layers=3),
                 dict(vocab_size=31, emb_dim=8, hidden_dim=12, num_layers=2, num_heads=3, ffn_dim=20,
                      time_dim=8, max_positions=12)):
        core = dlmone._core.Model(**dims)
        layout = dlmone._core.param_layout(**dims)
        assert layout == core.layout()
        covered = np.zeros(core.params.size, np.int64)
        for name, off, shape in layout:
            covered[off:off + int(np.prod(shape))] += 1
        assert (covered == 1).all(), "the tensors tile the buffer exactly once"
        from dlmone.resources import _num_parameters
        cfg = dlmone.ModelConfig(vocab_size=dims["vocab_size"], seq_len=dims["max_positions"],
                                 **{k: v for k, v in dims.items() if k not in ("vocab_size",)})
        assert _num_parameters(cfg) == core.params.size
