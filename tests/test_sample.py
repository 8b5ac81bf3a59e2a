"""dlmone.sample (SPEC §5 sampling, SPEC §6.1/§6.6 generation): the DDIM timestep
grid, the teacher's DDIM (η = 0) and ancestral (DiffuSeq p_sample, fixed-large
variance) loops against hand-written numpy loops that use the same network and
the same noise streams, clamping, re-anchoring of the source positions, and the
student's one- and few-step generation.

The numpy loops compute every update in float64 from an independent float64
schedule and hand the network float32 inputs, as the package does; they must
agree with the package to 1e-5 (absolute, on embeddings of order 1).
"""

from __future__ import annotations

import numpy as np
import pytest

from dlmone.diffusion import Diffusion, derive_seed, gaussian
from dlmone.sample import (
    batched,
    candidate_seeds,
    ddim_timesteps,
    student_sample,
    teacher_sample,
)

from conftest import make_config, make_model

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def np_sqrt_schedule(T):
    def abar_fn(s):
        return 1.0 - np.sqrt(s + 1e-4)

    betas = np.array([min(1.0 - abar_fn((i + 1) / T) / abar_fn(i / T), 0.999) for i in range(T)])
    return betas, np.cumprod(1.0 - betas)


def _setup(rng, T=20, B=3, seq_len=12):
    cfg = make_config(diffusion_steps=T, seq_len=seq_len)
    model = make_model(cfg, rng)
    d = Diffusion(T)
    L, V = cfg.seq_len, cfg.vocab_size
    src_tokens = rng.integers(0, V, size=(B, L))
    x_src = model.embed(src_tokens)
    mask = np.zeros((B, L), np.float32)
    for b in range(B):
        mask[b, 4 + b:] = 1.0
    return cfg, model, d, x_src, mask


def _f(model, x, t):
    B = x.shape[0]
    return model.forward(np.asarray(x, np.float32), np.full(B, t, dtype=np.int64)).astype(np.float64)


def _np_clamp(W, x0, mask):
    W64 = W.astype(np.float64)
    d2 = ((x0[:, :, None, :] - W64[None, None]) ** 2).sum(-1)
    return np.where(mask[:, :, None] > 0, W64[d2.argmin(-1)], x0)


def _anchor(x, x_src, mask):
    return np.where(mask[:, :, None] > 0, x, x_src.astype(np.float64))


def np_ddim(model, T, x_src, mask, ts, seed, clamp=False):
    """η = 0 DDIM over the timesteps ts (descending), re-anchoring the source every step."""
    _, abar = np_sqrt_schedule(T)
    x = _anchor(gaussian(x_src.shape, derive_seed(seed, 0)).astype(np.float64), x_src, mask)
    W = model.state_dict()["word_embedding.weight"]
    for i, t in enumerate(ts):
        x0 = _f(model, x, t)
        if clamp:
            x0 = _np_clamp(W, x0, mask)
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        eps = (x - np.sqrt(a_t) * x0) / np.sqrt(1.0 - a_t)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1.0 - a_prev) * eps
        x = _anchor(x, x_src, mask).astype(np.float32).astype(np.float64)
    return x


def np_ancestral(model, T, x_src, mask, seed, clamp=False):
    """DiffuSeq's p_sample_loop: posterior mean from the predicted x0, fixed-large variance
    [posterior_variance[1], betas[1:]], no noise at t = 0, source re-anchored every step."""
    betas, abar = np_sqrt_schedule(T)
    prev = np.append(1.0, abar[:-1])
    c1 = betas * np.sqrt(prev) / (1.0 - abar)
    c2 = (1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - abar)
    post_var = betas * (1.0 - prev) / (1.0 - abar)
    var = np.append(post_var[1], betas[1:])
    x = _anchor(gaussian(x_src.shape, derive_seed(seed, 0)).astype(np.float64), x_src, mask)
    W = model.state_dict()["word_embedding.weight"]
    for i, t in enumerate(range(T - 1, -1, -1)):
        x0 = _f(model, x, t)
        if clamp:
            x0 = _np_clamp(W, x0, mask)
        mean = c1[t] * x0 + c2[t] * x
        if t > 0:
            mean = mean + np.sqrt(var[t]) * gaussian(x_src.shape, derive_seed(seed, 1, i))
        x = _anchor(mean, x_src, mask).astype(np.float32).astype(np.float64)
    return x


def _assert_source_exact(out, x_src, mask):
    keep = mask == 0
    assert out.dtype == np.float32
    assert np.array_equal(out[keep], x_src[keep])


# ----------------------------------------------------------------------------
# DDIM timesteps
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("T,k", [(20, 2), (20, 3), (20, 7), (20, 19), (20, 20), (2000, 2), (2000, 10),
                                 (2000, 100), (2000, 1999), (2000, 2000), (7, 5)])
def test_ddim_timesteps(T, k):
    ts = ddim_timesteps(T, k)
    assert ts.dtype.kind == "i" and ts.shape == (k,)
    assert ts[0] == T - 1 and ts[-1] == 0
    assert (np.diff(ts) < 0).all()  # distinct, descending
    gaps = -np.diff(ts)
    assert gaps.max() - gaps.min() <= 1  # evenly spaced up to rounding
    if k == T:
        np.testing.assert_array_equal(ts, np.arange(T - 1, -1, -1))


def test_ddim_timesteps_one_step_and_bad_k():
    ts = ddim_timesteps(20, 1)
    assert ts.tolist() == [19]  # one step from pure noise
    for k in (0, -1, 21):
        with pytest.raises(ValueError):
            ddim_timesteps(20, k)


# ----------------------------------------------------------------------------
# teacher samplers against numpy loops
# ----------------------------------------------------------------------------


def test_ddim_all_steps_matches_numpy(rng):
    T = 20
    cfg, model, d, x_src, mask = _setup(rng, T=T)
    out = teacher_sample(model, d, x_src, mask, steps=T, method="ddim", clamp=False, seed=11)
    want = np_ddim(model, T, x_src, mask, list(range(T - 1, -1, -1)), seed=11)
    assert out.shape == x_src.shape
    np.testing.assert_allclose(out, want, rtol=0, atol=ATOL)
    _assert_source_exact(out, x_src, mask)
    # steps=None means all T steps
    out2 = teacher_sample(model, d, x_src, mask, method="ddim", clamp=False, seed=11)
    assert np.array_equal(out, out2)


def test_ddim_strided_matches_numpy(rng):
    T = 20
    cfg, model, d, x_src, mask = _setup(rng, T=T)
    ts = ddim_timesteps(T, 6)
    out = teacher_sample(model, d, x_src, mask, steps=6, method="ddim", clamp=False, seed=4)
    want = np_ddim(model, T, x_src, mask, [int(t) for t in ts], seed=4)
    np.testing.assert_allclose(out, want, rtol=0, atol=ATOL)
    _assert_source_exact(out, x_src, mask)


def test_ddim_clamped_matches_numpy(rng):
    T = 20
    cfg, model, d, x_src, mask = _setup(rng, T=T)
    out = teacher_sample(model, d, x_src, mask, steps=T, method="ddim", clamp=True, seed=2)
    want = np_ddim(model, T, x_src, mask, list(range(T - 1, -1, -1)), seed=2, clamp=True)
    np.testing.assert_allclose(out, want, rtol=0, atol=ATOL)
    _assert_source_exact(out, x_src, mask)
    # the last DDIM step (abar_prev = 1) returns the clamped x0: every target row is a word embedding
    W = model.state_dict()["word_embedding.weight"]
    rows = out[mask > 0]
    assert (rows[:, None, :] == W[None]).all(-1).any(-1).all()


def test_ancestral_matches_numpy(rng):
    T = 20
    cfg, model, d, x_src, mask = _setup(rng, T=T)
    calls = []
    out = teacher_sample(model, d, x_src, mask, method="ancestral", clamp=False, seed=5,
                         progress=calls.append)
    want = np_ancestral(model, T, x_src, mask, seed=5)
    assert out.shape == x_src.shape
    np.testing.assert_allclose(out, want, rtol=0, atol=ATOL)
    _assert_source_exact(out, x_src, mask)
    assert sum(calls) == T
    # steps=T is accepted and identical; another seed gives another sample
    assert np.array_equal(teacher_sample(model, d, x_src, mask, steps=T, clamp=False, seed=5), out)
    other = teacher_sample(model, d, x_src, mask, clamp=False, seed=6)
    assert not np.allclose(other[mask > 0], out[mask > 0])
    _assert_source_exact(other, x_src, mask)


def test_ancestral_clamped_matches_numpy(rng):
    T = 20
    cfg, model, d, x_src, mask = _setup(rng, T=T)
    out = teacher_sample(model, d, x_src, mask, method="ancestral", clamp=True, seed=8)
    want = np_ancestral(model, T, x_src, mask, seed=8, clamp=True)
    np.testing.assert_allclose(out, want, rtol=0, atol=ATOL)
    _assert_source_exact(out, x_src, mask)


def test_teacher_sample_bad_arguments(rng):
    T = 20
    cfg, model, d, x_src, mask = _setup(rng, T=T, B=2)
    with pytest.raises(ValueError):
        teacher_sample(model, d, x_src, mask, steps=5, method="ancestral")
    with pytest.raises(ValueError):
        teacher_sample(model, d, x_src, mask, method="euler")
    with pytest.raises(ValueError):
        teacher_sample(model, d, x_src, mask, steps=T + 1, method="ddim")
    with pytest.raises(ValueError):
        teacher_sample(model, d, x_src, mask, steps=0, method="ddim")


# ----------------------------------------------------------------------------
# student (SPEC §6.1, §6.6)
# ----------------------------------------------------------------------------


def test_student_one_step(rng):
    cfg, G, d, x_src, mask = _setup(rng, T=2000, B=4)
    t_init, seed = 1490, 21
    out = student_sample(G, d, x_src, mask, t_init=t_init, steps=1, seed=seed)
    z = gaussian(x_src.shape, derive_seed(seed, 0))
    s = np.sqrt(1.0 - np_sqrt_schedule(2000)[1][t_init])
    x_init = np.where(mask[:, :, None] > 0, s * z.astype(np.float64), x_src).astype(np.float32)
    want = _anchor(_f(G, x_init, t_init), x_src, mask)
    assert out.shape == x_src.shape
    np.testing.assert_allclose(out, want, rtol=0, atol=ATOL)
    _assert_source_exact(out, x_src, mask)
    # deterministic per seed
    assert np.array_equal(student_sample(G, d, x_src, mask, t_init=t_init, steps=1, seed=seed), out)


@pytest.mark.parametrize("K", [2, 3])
def test_student_few_steps(rng, K):
    cfg, G, d, x_src, mask = _setup(rng, T=2000, B=3)
    t_init, seed = 1490, 3
    out = student_sample(G, d, x_src, mask, t_init=t_init, steps=K, seed=seed)
    abar = np_sqrt_schedule(2000)[1]
    D = np.zeros(x_src.shape)
    for i in range(K):
        t = int(round(t_init * (1.0 - i / K)))
        eps = gaussian(x_src.shape, derive_seed(seed, i)).astype(np.float64)
        x = _anchor(np.sqrt(abar[t]) * D + np.sqrt(1 - abar[t]) * eps, x_src, mask)
        D = _anchor(_f(G, x, t), x_src, mask)
    np.testing.assert_allclose(out, D, rtol=0, atol=ATOL)
    _assert_source_exact(out, x_src, mask)


@pytest.mark.parametrize("steps", [0, -1, 9, 100])
def test_student_steps_out_of_range(rng, steps):
    cfg, G, d, x_src, mask = _setup(rng, T=2000, B=1)
    with pytest.raises(ValueError, match="steps"):
        student_sample(G, d, x_src, mask, t_init=1490, steps=steps)


def test_helpers():
    assert batched(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert batched(0, 3) == []
    seeds = candidate_seeds(5, 4)
    assert len(set(seeds)) == 4 and list(candidate_seeds(5, 4)) == list(seeds)
