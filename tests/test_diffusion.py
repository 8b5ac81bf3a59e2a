"""dlmone.diffusion (SPEC §4-§5): the sqrt schedule, the counter-based Gaussian
generator, partial noising and its transpose, the teacher's training loss and its
exact gradient (against torch autograd in float64), the C loss kernels, argmax
decoding and clamping, the timestep samplers and bad input.

Gradient tolerance (stated once, used for every parameter tensor): the float32 C
gradient ``g`` and the float64 torch autograd gradient ``r`` of the same loss on
the same float32 weights and the same noise must satisfy, per tensor,
``max|g - r| <= 1e-4 * max|r| + 1e-7`` (scale-relative), and additionally the
element-wise ``|g - r| <= 1e-5 + 1e-4 |r|``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from dlmone import _core
from dlmone.diffusion import (
    Diffusion,
    LossAwareSampler,
    UniformSampler,
    clamp_to_embeddings,
    decode_tokens,
    derive_seed,
    gaussian,
    make_timestep_sampler,
    training_loss,
)

from conftest import assert_close, make_config, make_model


def _torch():
    return pytest.importorskip("torch")


def assert_grad_close(actual, expected, name):
    """Scale-relative per tensor (max|diff| <= 1e-4 max|ref|) and element-wise rtol 1e-4, atol 1e-5."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    scale = np.abs(expected).max()
    diff = np.abs(actual - expected).max()
    assert diff <= 1e-4 * scale + 1e-7, f"{name}: max|diff| {diff:.3e} > 1e-4 * max|ref| ({scale:.3e})"
    assert_close(actual, expected, name, rtol=1e-4, atol=1e-5)


def sig(x, n=3):
    """x rounded to n significant digits."""
    return float(f"{x:.{n - 1}e}")


# ----------------------------------------------------------------------------
# schedule (SPEC §4)
# ----------------------------------------------------------------------------


def np_sqrt_schedule(T):
    """DiffuSeq's betas_for_alpha_bar with alpha_bar(s) = 1 - sqrt(s + 1e-4), float64."""
    def abar_fn(s):
        return 1.0 - np.sqrt(s + 1e-4)

    betas = np.array([min(1.0 - abar_fn((i + 1) / T) / abar_fn(i / T), 0.999) for i in range(T)])
    return betas, np.cumprod(1.0 - betas)


def test_schedule_reference_values():
    d = Diffusion(2000)
    a = d.alphas_cumprod
    assert a.shape == (2000,) and d.betas.shape == (2000,)
    assert sig(a[0]) == 0.985, a[0]
    assert sig(a[1490]) == 0.138, a[1490]
    assert sig(a[1976], 2) == 0.0058, a[1976]  # SPEC writes it to 2 digits; 0.00577 to 3
    assert sig(a[1976]) == 0.00577, a[1976]
    # VE noise level sqrt((1 - abar) / abar) (SPEC §6.1-6.2)
    assert sig(d.ve_sigma(1490), 2) == 2.5, d.ve_sigma(1490)
    assert sig(d.ve_sigma(1976)) == 13.1, d.ve_sigma(1976)
    assert sig(d.ve_sigma(0), 2) == 0.12, d.ve_sigma(0)
    assert d.ve_sigma(0) == pytest.approx(np.sqrt((1 - a[0]) / a[0]), rel=1e-12)


@pytest.mark.parametrize("T", [1, 2, 10, 100, 2000, 4000])
def test_schedule_matches_numpy_formula(T):
    d = Diffusion(T)
    betas, abar = np_sqrt_schedule(T)
    assert d.betas.dtype == np.float64 and d.alphas_cumprod.dtype == np.float64
    np.testing.assert_allclose(d.betas, betas, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(d.alphas_cumprod, abar, rtol=1e-12, atol=1e-300)
    assert (d.betas <= 0.999).all() and (d.betas > 0).all()
    assert d.betas[-1] == 0.999  # abar(1) < 0, so the last beta is always clipped
    assert (np.diff(d.alphas_cumprod) < 0).all()
    assert 0 < d.alphas_cumprod[-1] <= d.alphas_cumprod[0] < 1
    np.testing.assert_allclose(d.sqrt_alphas_cumprod, np.sqrt(abar), rtol=1e-12)
    np.testing.assert_allclose(d.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - abar), rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod_prev, np.append(1.0, abar[:-1]), rtol=1e-12)


@pytest.mark.parametrize("T", [10, 100, 2000])
def test_posterior_coefficients_match_diffuseq(T):
    d = Diffusion(T)
    betas, abar = np_sqrt_schedule(T)
    prev = np.append(1.0, abar[:-1])
    c1 = betas * np.sqrt(prev) / (1 - abar)
    c2 = (1 - prev) * np.sqrt(1 - betas) / (1 - abar)
    post_var = betas * (1 - prev) / (1 - abar)
    np.testing.assert_allclose(d.posterior_coef_x0, c1, rtol=1e-10)
    np.testing.assert_allclose(d.posterior_coef_xt, c2, rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(d.fixedlarge_variance, np.append(post_var[1], betas[1:]), rtol=1e-10)
    # the posterior mean of x0 itself, diffused to t, is x0's diffusion to t-1 in expectation:
    # c1 + c2 sqrt(abar_t) == sqrt(abar_{t-1})
    np.testing.assert_allclose(c1 + c2 * np.sqrt(abar), np.sqrt(prev), rtol=1e-10)


@pytest.mark.parametrize("bad", [0, -3, True, 2.0, "10"])
def test_schedule_bad_steps(bad):
    with pytest.raises(ValueError):
        Diffusion(bad)


# ----------------------------------------------------------------------------
# gaussian()
# ----------------------------------------------------------------------------


def test_gaussian_deterministic_and_seed_dependent():
    a = gaussian((7, 13, 5), 123)
    b = gaussian((7, 13, 5), 123)
    c = gaussian((7, 13, 5), 124)
    assert a.dtype == np.float32 and a.shape == (7, 13, 5)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.mean(a == c) < 0.01
    assert np.isfinite(a).all()
    # counter based: element k depends only on (seed, k), also for odd sizes
    big = gaussian((1001,), 99)
    for n in (1, 2, 3, 500, 1000):
        assert np.array_equal(gaussian((n,), 99), big[:n])
    # large and 64-bit seeds work
    for s in (0, 2**63, 2**64 - 1, derive_seed(1, 2, 3)):
        z = gaussian((100,), s)
        assert np.isfinite(z).all() and z.std() > 0.5
    assert gaussian((0, 3), 1).shape == (0, 3)


def test_gaussian_moments():
    z = gaussian((1_000_000,), 7).astype(np.float64)
    # sd of the mean estimate 1e-3, of the variance estimate ~1.4e-3
    assert abs(z.mean()) < 5e-3
    assert abs(z.std() - 1.0) < 5e-3
    assert abs(np.mean(z ** 3)) < 1.5e-2  # skewness
    assert abs(np.mean(z ** 4) - 3.0) < 5e-2  # kurtosis
    assert abs(np.mean(z < 0) - 0.5) < 3e-3
    assert abs(np.mean(np.abs(z) < 1.0) - 0.6826894921) < 3e-3
    # neighbouring elements (the two halves of a Box-Muller pair) are uncorrelated
    assert abs(np.corrcoef(z[0::2], z[1::2])[0, 1]) < 5e-3
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 5e-3


_GAUSS_SCRIPT = r"""
import hashlib, sys
import dlmone
from dlmone.diffusion import gaussian
z = gaussian((3, 1001, 7), 424242)
print(dlmone.get_num_threads(), hashlib.sha256(z.tobytes()).hexdigest())
"""


def test_gaussian_identical_across_thread_counts():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {}
    for n in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": n,
               "PYTHONPATH": os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        r = subprocess.run([sys.executable, "-c", _GAUSS_SCRIPT], env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        threads, digest = r.stdout.split()
        assert int(threads) == int(n)
        out[n] = digest
    assert out["1"] == out["2"]
    here = hashlib.sha256(gaussian((3, 1001, 7), 424242).tobytes()).hexdigest()
    assert here == out["1"]


def test_derive_seed():
    assert derive_seed(1, 0) == derive_seed(1, 0)
    seeds = {derive_seed(s, k) for s in range(5) for k in range(5)}
    assert len(seeds) == 25
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert derive_seed(1, 1, 0) != derive_seed(1, 1, 1)
    assert all(0 <= s < 2**64 for s in seeds)


# ----------------------------------------------------------------------------
# q_sample and its transpose
# ----------------------------------------------------------------------------


def _mask(B, L, rng):
    m = np.zeros((B, L), np.float32)
    for b in range(B):
        m[b, rng.integers(1, L):] = 1.0  # source prefix (mask 0), target/pad suffix (mask 1)
    m[0, :] = 1.0  # one row entirely noised
    return m


def test_q_sample_partial_noising(rng):
    d = Diffusion(2000)
    B, L, E = 5, 9, 6
    x0 = rng.standard_normal((B, L, E)).astype(np.float32)
    noise = rng.standard_normal((B, L, E)).astype(np.float32)
    mask = _mask(B, L, rng)
    mask[-1, :] = 0.0  # one row entirely source
    t = np.array([0, 1490, 1999, 7, 1000])
    xt = d.q_sample(x0, t, noise, mask)
    assert xt.dtype == np.float32 and xt.shape == x0.shape
    keep = mask == 0
    assert np.array_equal(xt[keep], x0[keep])  # bit for bit
    a = np.sqrt(np.asarray(d.alphas_cumprod, np.float64))[t][:, None, None]
    want = a * x0 + np.sqrt(1 - a ** 2) * noise
    np.testing.assert_allclose(xt[~keep], want[np.broadcast_to(~keep[:, :, None], want.shape)].reshape(-1, E),
                               rtol=0, atol=1e-6)
    # inputs are not modified, other float dtypes and layouts are accepted
    x0_f64 = np.asfortranarray(x0.astype(np.float64))
    assert np.array_equal(d.q_sample(x0_f64, t, noise, mask.astype(np.float64)), xt)


def test_q_sample_backward_is_transpose(rng):
    d = Diffusion(100)
    B, L, E = 4, 7, 5
    mask = _mask(B, L, rng)
    t = np.array([0, 50, 99, 13])
    dx = rng.standard_normal((B, L, E)).astype(np.float32)
    g = rng.standard_normal((B, L, E)).astype(np.float32)
    lin = d.q_sample(dx, t, np.zeros_like(dx), mask)  # the linear part in x0
    back = d.q_sample_backward(g, t, mask)
    lhs = np.dot(lin.astype(np.float64).ravel(), g.astype(np.float64).ravel())
    rhs = np.dot(dx.astype(np.float64).ravel(), back.astype(np.float64).ravel())
    assert lhs == pytest.approx(rhs, rel=1e-5)
    # and element-wise: sqrt(abar_t) on noised positions, 1 on source positions
    s = np.sqrt(d.alphas_cumprod[t])[:, None, None]
    want = g * np.where(mask[:, :, None] > 0, s, 1.0)
    np.testing.assert_allclose(back, want, rtol=1e-6, atol=0)


def test_q_sample_bad_input(rng):
    d = Diffusion(100)
    B, L, E = 2, 3, 4
    x0 = rng.standard_normal((B, L, E)).astype(np.float32)
    noise = np.zeros_like(x0)
    mask = np.ones((B, L), np.float32)
    with pytest.raises(ValueError, match=r"\bt\b"):
        d.q_sample(x0, np.array([0, 100]), noise, mask)
    with pytest.raises(ValueError, match=r"\bt\b"):
        d.q_sample(x0, np.array([-1, 3]), noise, mask)
    with pytest.raises(TypeError, match=r"\bt\b"):
        d.q_sample(x0, np.array([1.0, 2.0]), noise, mask)
    with pytest.raises(ValueError, match="mask"):
        d.q_sample(x0, np.array([1, 2]), noise, np.ones((B, L + 1), np.float32))
    with pytest.raises(ValueError, match="mask"):
        d.q_sample(x0, np.array([1, 2]), noise, np.ones((B, L, 1), np.float32))
    with pytest.raises(ValueError, match="noise"):
        d.q_sample(x0, np.array([1, 2]), noise[:, :2], mask)
    with pytest.raises(TypeError, match="x0"):
        d.q_sample(x0.astype(np.int32), np.array([1, 2]), noise, mask)
    with pytest.raises(ValueError):
        d.q_sample(x0, np.array([1, 2, 3]), noise, mask)  # t of the wrong length


# ----------------------------------------------------------------------------
# training loss: value and exact gradient against torch autograd
# ----------------------------------------------------------------------------


def _torch_loss(ref, d, tokens, mask, t, w, seed, E):
    """SPEC §5's loss written in torch (float64) on the same noise as the implementation."""
    torch = _torch()
    B, L = tokens.shape
    dt = torch.float64
    eps0 = torch.tensor(gaussian((B, L, E), derive_seed(seed, 0)), dtype=dt)
    eps = torch.tensor(gaussian((B, L, E), derive_seed(seed, 1)), dtype=dt)
    tok = torch.tensor(tokens)
    abar = torch.tensor(d.alphas_cumprod, dtype=dt)
    tt = torch.tensor(t)
    m = torch.tensor(mask, dtype=dt)[:, :, None]

    x0_mean = ref.word_embedding(tok)
    x0 = x0_mean + torch.sqrt(1 - abar[0]) * eps0
    a = abar[tt][:, None, None]
    x_t = m * (torch.sqrt(a) * x0 + torch.sqrt(1 - a) * eps) + (1 - m) * x0
    t_scaled = torch.tensor(np.asarray(t, np.float64) * (1000.0 / d.T), dtype=dt)
    pred = ref(x_t, t_scaled)
    target = torch.where(torch.tensor(t == 0)[:, None, None], x0_mean, x0)
    mse = ((pred - target) ** 2).mean(dim=(1, 2))
    logits = x0 @ ref.word_embedding.weight.T + ref.lm_head.bias
    nll = torch.nn.functional.cross_entropy(logits.reshape(B * L, -1), tok.reshape(-1),
                                            reduction="none").reshape(B, L).mean(dim=1)
    prior = ((torch.sqrt(abar[-1]) * x0) ** 2).mean(dim=(1, 2))
    per = mse + nll + prior
    loss = (torch.tensor(w, dtype=dt) * per).mean()
    return loss, mse, nll, prior, per


def _loss_setup(T, rng, B=5):
    cfg = make_config(diffusion_steps=T)
    model = make_model(cfg, rng)
    d = Diffusion(T)
    L, V = cfg.seq_len, cfg.vocab_size
    tokens = rng.integers(0, V, size=(B, L))
    mask = np.zeros((B, L), np.float32)
    for b in range(B):
        mask[b, 3 + b:] = 1.0
    t = rng.integers(1, T, size=B)
    t[0] = 0
    t[2] = 0
    t[3] = T - 1
    w = np.array([0.5, 1.7, 1.0, 2.3, 0.8][:B], np.float32)
    return cfg, model, d, tokens, mask, t, w


def _check_loss_parity(cfg, model, d, tokens, mask, t, w, seed):
    torch = _torch()
    from reference import TorchDiffuSeq, load_numpy_state

    ref = TorchDiffuSeq(cfg).to(torch.float64)
    load_numpy_state(ref, model.state_dict())
    ref.eval()

    model.zero_grad()
    terms = training_loss(model, d, tokens, mask, t, weights=w, seed=seed)
    loss, mse, nll, prior, per = _torch_loss(ref, d, tokens, mask, t, w, seed, cfg.emb_dim)
    loss.backward()

    assert_close(terms.per_example, per.detach().numpy(), "per_example", rtol=1e-5, atol=1e-6)
    assert terms.loss == pytest.approx(loss.item(), rel=1e-5)
    assert terms.mse == pytest.approx(mse.mean().item(), rel=1e-5)
    assert terms.nll == pytest.approx(nll.mean().item(), rel=1e-5)
    assert terms.prior == pytest.approx(prior.mean().item(), rel=1e-4, abs=1e-12)
    assert terms.prior > 0

    grads = model.grads()
    names = [k for k, _ in ref.named_parameters()]
    assert "word_embedding.weight" in names and "lm_head.bias" in names
    assert set(names) | {"lm_head.weight"} == set(grads)
    for k, p in ref.named_parameters():
        assert p.grad is not None, k
        assert_grad_close(grads[k], p.grad.numpy(), k)
    # tied head: lm_head.weight's gradient is the embedding's
    assert np.array_equal(grads["lm_head.weight"], grads["word_embedding.weight"])
    assert np.abs(grads["lm_head.bias"]).max() > 0
    return terms


@pytest.mark.parametrize("T", [2000, 20])
def test_training_loss_matches_torch(T, rng):
    cfg, model, d, tokens, mask, t, w = _loss_setup(T, rng)
    _check_loss_parity(cfg, model, d, tokens, mask, t, w, seed=31337)


def test_training_loss_prior_term_gradient(rng):
    """The sqrt schedule keeps abar_{T-1} <= 1e-3 (beta_{T-1} is clipped to 0.999), so the
    prior term's gradient is below the parity tolerance on real schedules. Here the last
    abar is raised to 0.3 (no t in the batch is T-1, so q_sample is unaffected): the loss
    formula is the same, and the prior's gradient now matters."""
    cfg, model, d, tokens, mask, t, w = _loss_setup(20, rng)
    t = np.minimum(t, 18)
    assert (t == 0).sum() == 2
    d.alphas_cumprod = d.alphas_cumprod.copy()
    d.alphas_cumprod[-1] = 0.3
    terms = _check_loss_parity(cfg, model, d, tokens, mask, t, w, seed=77)
    assert terms.prior > 0.05


def test_training_loss_embedding_gradient_paths(rng):
    """Each path into word_embedding.weight is needed: dropping the rounding term's, the
    input's or the target's contribution from the torch reference changes the gradient
    by far more than the tolerance, so the parity above checks all of them."""
    torch = _torch()
    from reference import TorchDiffuSeq, load_numpy_state

    cfg, model, d, tokens, mask, t, w = _loss_setup(20, rng)
    model.zero_grad()
    training_loss(model, d, tokens, mask, t, weights=w, seed=5)
    g = model.grads()["word_embedding.weight"].astype(np.float64).copy()

    ref = TorchDiffuSeq(cfg).to(torch.float64)
    load_numpy_state(ref, model.state_dict())
    loss, mse, nll, prior, per = _torch_loss(ref, d, tokens, mask, t, w, 5, cfg.emb_dim)
    wt = torch.tensor(w, dtype=torch.float64)
    parts = {"mse": (wt * mse).mean(), "nll": (wt * nll).mean(), "prior": (wt * prior).mean()}
    pg = {}
    for k, part in parts.items():
        (gk,) = torch.autograd.grad(part, ref.word_embedding.weight, retain_graph=True)
        pg[k] = gk.numpy()
    total = pg["mse"] + pg["nll"] + pg["prior"]
    assert_grad_close(g, total, "word_embedding.weight")
    for k in ("mse", "nll"):
        assert np.abs(g - (total - pg[k])).max() > 1e-2 * np.abs(total).max(), k


def test_training_loss_backward_false_and_accumulation(rng):
    cfg, model, d, tokens, mask, t, w = _loss_setup(20, rng)
    model.zero_grad()
    training_loss(model, d, tokens, mask, t, weights=w, seed=1)
    g1 = model.grad_buffer.copy()
    p0 = model.params.copy()
    assert np.abs(g1).max() > 0
    terms = training_loss(model, d, tokens, mask, t, weights=w, seed=1, backward=False)
    assert np.array_equal(model.grad_buffer, g1)
    assert np.array_equal(model.params, p0)
    # same seed, same loss; backward accumulates
    terms2 = training_loss(model, d, tokens, mask, t, weights=w, seed=1)
    assert terms2.loss == terms.loss
    np.testing.assert_allclose(model.grad_buffer, 2 * g1, rtol=1e-6, atol=1e-9)
    # a different seed gives different noise
    assert training_loss(model, d, tokens, mask, t, weights=w, seed=2, backward=False).loss != terms.loss
    # weights default to 1
    u = training_loss(model, d, tokens, mask, t, seed=1, backward=False)
    assert u.loss == pytest.approx(float(np.mean(u.per_example)), rel=1e-6)
    np.testing.assert_allclose(u.per_example, terms.per_example, rtol=1e-6)


def test_training_loss_bad_input(rng):
    cfg, model, d, tokens, mask, t, w = _loss_setup(20, rng)
    with pytest.raises(ValueError, match="mask"):
        training_loss(model, d, tokens, mask[:, :-1], t, backward=False)
    with pytest.raises(ValueError, match=r"\bt\b"):
        training_loss(model, d, tokens, mask, t[:-1], backward=False)
    with pytest.raises(ValueError, match=r"\bt\b"):
        training_loss(model, d, tokens, mask, np.full_like(t, 20), backward=False)
    with pytest.raises(TypeError, match=r"\bt\b"):
        training_loss(model, d, tokens, mask, t.astype(np.float32), backward=False)
    with pytest.raises(TypeError, match="tokens"):
        training_loss(model, d, tokens.astype(np.float32), mask, t, backward=False)


# ----------------------------------------------------------------------------
# loss kernels
# ----------------------------------------------------------------------------


def test_cross_entropy_kernel(rng):
    torch = _torch()
    M, V = 37, 23
    logits = (3 * rng.standard_normal((M, V))).astype(np.float32)
    logits[0, 5] = 80.0  # large logits are stable (max subtracted)
    logits[1] = -60.0
    target = rng.integers(0, V, size=M)
    target[0] = 5
    scale = rng.uniform(-1.0, 2.0, size=M).astype(np.float32)
    scale[2] = 0.0

    buf = logits.copy()
    nll = _core.cross_entropy(buf, target, scale)
    lt = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(lt, torch.tensor(target), reduction="none")
    (ref * torch.tensor(scale, dtype=torch.float64)).sum().backward()
    assert nll.dtype == np.float32 and nll.shape == (M,)
    assert_close(nll, ref.detach().numpy(), "nll", rtol=1e-5, atol=1e-5)
    # the logits buffer is replaced, in place, by scale * (softmax - onehot)
    assert_close(buf, lt.grad.numpy(), "dlogits", rtol=1e-5, atol=1e-6)
    assert np.array_equal(buf[2], np.zeros(V, np.float32))
    with pytest.raises(ValueError, match="target"):
        _core.cross_entropy(logits.copy(), np.full(M, V, np.int64), scale)
    with pytest.raises(ValueError, match="scale"):
        _core.cross_entropy(logits.copy(), target, scale[:-1])


def test_cross_entropy_kernel_large_logit_gap():
    gaps = np.array([50.0, 95.0, 100.0, 103.0, 104.0, 110.0, 200.0], np.float32)
    logits = np.stack([np.zeros_like(gaps), gaps], axis=1)
    nll = _core.cross_entropy(logits.copy(), np.zeros(len(gaps), np.int64), np.ones(len(gaps), np.float32))
    np.testing.assert_allclose(nll, np.logaddexp(0.0, gaps.astype(np.float64)), rtol=1e-6)


def test_mse_loss_kernel(rng):
    torch = _torch()
    B, L, E = 4, 6, 5
    f = rng.standard_normal((B, L, E)).astype(np.float32)
    x0 = rng.standard_normal((B, L, E)).astype(np.float32)
    xm = rng.standard_normal((B, L, E)).astype(np.float32)
    use_mean = np.array([True, False, False, True])
    weight = np.array([0.25, 1.5, -0.5, 3.0], np.float32)
    mse, grad = _core.mse_loss(f, x0, xm, use_mean, weight)

    ft = torch.tensor(f, dtype=torch.float64, requires_grad=True)
    tgt = torch.where(torch.tensor(use_mean)[:, None, None], torch.tensor(xm, dtype=torch.float64),
                      torch.tensor(x0, dtype=torch.float64))
    ref = ((ft - tgt) ** 2).mean(dim=(1, 2))
    (ref * torch.tensor(weight, dtype=torch.float64)).sum().backward()
    assert mse.shape == (B,) and grad.shape == (B, L, E)
    assert_close(mse, ref.detach().numpy(), "mse", rtol=1e-6, atol=1e-7)
    assert_close(grad, ft.grad.numpy(), "grad", rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="use_mean"):
        _core.mse_loss(f, x0, xm, use_mean[:-1], weight)
    with pytest.raises(TypeError, match="use_mean"):
        _core.mse_loss(f, x0, xm, use_mean.astype(np.float32), weight)


# ----------------------------------------------------------------------------
# argmax decoding and clamping
# ----------------------------------------------------------------------------


def _assert_argmax(tok, scores, name):
    """tok is the argmax of scores (float64), up to float32 near-ties."""
    best = scores.argmax(-1)
    picked = np.take_along_axis(scores, tok[..., None], -1)[..., 0]
    top = scores.max(-1)
    bad = (tok != best) & (picked < top - 1e-4 * (1 + np.abs(top)))
    assert not bad.any(), f"{name}: {bad.sum()} rows not the argmax"
    assert np.mean(tok == best) > 0.98, name


def test_affine_argmax(rng):
    V, E = 41, 9
    W = rng.standard_normal((V, E)).astype(np.float32)
    c = rng.standard_normal(V).astype(np.float32)
    for shape in [(E,), (300, E), (3, 100, E)]:  # more than one block of 256 rows
        x = rng.standard_normal(shape).astype(np.float32)
        tok = _core.affine_argmax(x, W, c)
        assert tok.dtype == np.int64 and tok.shape == shape[:-1]
        scores = x.astype(np.float64) @ W.T.astype(np.float64) + c
        _assert_argmax(tok, scores, f"affine_argmax {shape}")
    x = rng.standard_normal((3, 50, E)).astype(np.float32)
    active = rng.random((3, 50)) < 0.4
    tok_a = _core.affine_argmax(x, W, c, active)
    tok = _core.affine_argmax(x, W, c)
    assert np.array_equal(tok_a[active], tok[active])
    with pytest.raises(ValueError, match="active"):
        _core.affine_argmax(x, W, c, active[:, :-1].copy())
    with pytest.raises(ValueError, match="c"):
        _core.affine_argmax(x, W, c[:-1])


def test_affine_argmax_across_vocabulary_blocks():
    """The vocabulary is scanned in blocks (4096 entries): still the index one
    left-to-right scan with '>' from entry 0 gives: the first of the largest scores; a NaN
    never replaces the best so far, and a NaN at entry 0 is never replaced."""
    V = 10000
    x = np.ones((2, 1), np.float32)  # scores are exactly W[:, 0] + c

    def argmax(values, c=None):
        W = np.asarray(values, np.float32).reshape(V, 1)
        return _core.affine_argmax(x, W, np.zeros(V, np.float32) if c is None else c)[0]

    base = np.linspace(-1.0, 0.0, V, dtype=np.float32)[::-1].copy()  # falling: 0 wins
    assert argmax(base) == 0
    v = base.copy(); v[9000] = 5.0
    assert argmax(v) == 9000  # in the last block
    v[100] = 5.0
    assert argmax(v) == 100  # a tie goes to the first, blocks apart
    v = base.copy(); v[4095] = v[4096] = 5.0
    assert argmax(v) == 4095  # a tie across a block boundary
    v = base.copy(); v[4096] = np.nan; v[5000] = 5.0
    assert argmax(v) == 5000  # a NaN opening a block does not hide it
    c = np.zeros(V, np.float32); c[7000] = 9.0
    assert argmax(v, c) == 7000  # the offsets count
    v = base.copy(); v[0] = np.nan; v[5000] = 5.0
    assert argmax(v) == 0  # the scan starts from entry 0, and nothing is '>' a NaN


def test_clamp_to_embeddings(rng, tiny_cfg):
    model = make_model(tiny_cfg, rng)
    W = model.state_dict()["word_embedding.weight"].copy()
    B, L, E = 3, tiny_cfg.seq_len, tiny_cfg.emb_dim
    x0 = rng.standard_normal((B, L, E)).astype(np.float32)
    x0[0, :4] = W[[3, 7, 7, 11]] + 0.01 * rng.standard_normal((4, E)).astype(np.float32)
    mask = _mask(B, L, rng)
    x0_before = x0.copy()
    out = clamp_to_embeddings(model, x0, mask)
    assert out.shape == x0.shape and out.dtype == np.float32
    active = mask > 0
    assert np.array_equal(out[~active], x0[~active])
    assert np.array_equal(x0, x0_before)  # input untouched
    d2 = ((x0.astype(np.float64)[:, :, None, :] - W.astype(np.float64)[None, None]) ** 2).sum(-1)
    nn = d2.argmin(-1)
    # every active row is exactly a word embedding, and the nearest one (up to float32 ties)
    rows = out[active]
    match = (rows[:, None, :] == W[None]).all(-1)
    assert match.any(-1).all()
    picked = match.argmax(-1)
    dmin = d2[active].min(-1)
    dpick = d2[active][np.arange(len(picked)), picked]
    assert (dpick <= dmin + 1e-4 * (1 + dmin)).all()
    assert np.mean(picked == nn[active]) > 0.98
    assert np.array_equal(out[0, :4], W[[3, 7, 7, 11]])


def test_decode_tokens(rng, tiny_cfg):
    model = make_model(tiny_cfg, rng)
    x = rng.standard_normal((4, tiny_cfg.seq_len, tiny_cfg.emb_dim)).astype(np.float32)
    tok = decode_tokens(model, x)
    logits = model.logits(x)
    assert tok.shape == (4, tiny_cfg.seq_len) and tok.dtype == np.int64
    _assert_argmax(tok, logits.astype(np.float64), "decode_tokens")
    assert np.mean(tok == logits.argmax(-1)) == 1.0
    # embeddings of tokens decode back to mostly the same tokens under a tied head
    sd = model.state_dict()
    assert np.array_equal(decode_tokens(model, x[:1]), tok[:1])
    np.testing.assert_allclose(logits, x @ sd["word_embedding.weight"].T + sd["lm_head.bias"],
                               rtol=1e-5, atol=1e-5)


def test_decode_tokens_nearest_embedding(rng, tiny_cfg):
    model = make_model(tiny_cfg, rng)
    W = model.state_dict()["word_embedding.weight"].astype(np.float64)
    x = rng.standard_normal((3, tiny_cfg.seq_len, tiny_cfg.emb_dim)).astype(np.float32)
    tok = decode_tokens(model, x, "nearest")
    d2 = ((x.astype(np.float64)[:, :, None, :] - W[None, None]) ** 2).sum(-1)
    _assert_argmax(tok, -d2, "nearest decoding")
    # a word embedding decodes to its own token, whatever the output bias says
    ids = rng.integers(0, tiny_cfg.vocab_size, size=(1, tiny_cfg.seq_len))
    assert np.array_equal(decode_tokens(model, model.embed(ids), "nearest"), ids)
    with pytest.raises(ValueError, match="decode"):
        decode_tokens(model, x, "beam")


# ----------------------------------------------------------------------------
# timestep samplers
# ----------------------------------------------------------------------------


def test_loss_aware_sampler_uniform_until_full():
    T = 6
    s = LossAwareSampler(T)
    rng = np.random.default_rng(0)
    np.testing.assert_allclose(s.probabilities(), np.full(T, 1 / T))
    t, w = s.sample(1000, rng)
    assert t.dtype == np.int64 and w.dtype == np.float32
    assert t.min() >= 0 and t.max() < T and set(t.tolist()) == set(range(T))
    np.testing.assert_allclose(w, 1.0)
    for k in range(10):
        ts = np.arange(T) if k < 9 else np.arange(T - 1)  # the last t stays at 9 losses
        s.update(ts, (ts + 1.0) * (k + 1))
        np.testing.assert_allclose(s.probabilities(), np.full(T, 1 / T))
    s.update(np.array([T - 1]), np.array([5.0]))
    p = s.probabilities()
    assert not np.allclose(p, 1 / T)


def test_loss_aware_sampler_probabilities_and_weights():
    T, hist = 5, 10
    s = LossAwareSampler(T)
    losses = {ti: [] for ti in range(T)}
    rng = np.random.default_rng(3)
    for _ in range(12):  # 12 > 10: the oldest losses roll out
        ts = rng.permutation(T)
        ls = rng.uniform(0.1, 3.0, size=T) * (ts + 1)
        s.update(ts, ls)
        for ti, li in zip(ts, ls):
            losses[ti].append(li)
    assert (s.counts == hist).all()
    last = np.array([losses[ti][-hist:] for ti in range(T)])
    w = np.sqrt(np.mean(last ** 2, axis=1))
    p_want = 0.999 * w / w.sum() + 0.001 / T
    p = s.probabilities()
    np.testing.assert_allclose(p, p_want, rtol=1e-12)
    assert p.sum() == pytest.approx(1.0)
    t, weights = s.sample(4000, np.random.default_rng(1))
    np.testing.assert_allclose(weights, 1.0 / (T * p_want[t]), rtol=1e-6)
    freq = np.bincount(t, minlength=T) / len(t)
    np.testing.assert_allclose(freq, p_want, atol=0.03)
    # importance weights make the estimate unbiased: E_p[w f(t)] = mean_t f(t)
    assert np.sum(p * (1.0 / (T * p)) * np.arange(T)) == pytest.approx(np.mean(np.arange(T)))

    # state dict round trip (copies, not views)
    st = s.state_dict()
    s2 = LossAwareSampler(T)
    s2.load_state_dict(st)
    np.testing.assert_array_equal(s2.probabilities(), p)
    a = s.sample(50, np.random.default_rng(9))
    b = s2.sample(50, np.random.default_rng(9))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    s.update(np.array([0]), np.array([1e6]))
    np.testing.assert_array_equal(s2.probabilities(), p)
    assert not np.array_equal(s.probabilities(), p)
    st["losses"][:] = 0
    np.testing.assert_array_equal(s2.probabilities(), p)


def test_uniform_sampler_and_factory():
    s = UniformSampler(7)
    t, w = s.sample(3000, np.random.default_rng(0))
    assert t.dtype == np.int64 and set(t.tolist()) == set(range(7))
    np.testing.assert_array_equal(w, np.ones(3000, np.float32))
    assert isinstance(make_timestep_sampler("uniform", 7), UniformSampler)
    assert isinstance(make_timestep_sampler("lossaware", 7), LossAwareSampler)
    with pytest.raises(ValueError):
        make_timestep_sampler("nope", 7)
