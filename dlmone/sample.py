"""Samplers: the teacher's ancestral and DDIM loops (SPEC §5) and the student's
one-step and few-step generation (SPEC §6.6), all batched over [B, L, E]."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import numpy as np

from . import _core
from .diffusion import Diffusion, clamp_to_embeddings, derive_seed, gaussian
from .model import DiffusionTransformer

Progress = Optional[Callable[[int], None]]


def ddim_timesteps(T: int, k: int) -> np.ndarray:
    """k evenly spaced timesteps from T-1 down to 0 (distinct, descending); k = 1 is
    the single step from pure noise, t = T-1."""
    if not 1 <= k <= T:
        raise ValueError(f"steps must be in [1, {T}], got {k}")
    return np.round(np.linspace(T - 1, 0, k)).astype(np.int64)


def _anchor_start(x_src: np.ndarray, mask: np.ndarray, seed: int) -> np.ndarray:
    """x_T: N(0, I) on target and pad positions, the source embeddings elsewhere."""
    noise = gaussian(x_src.shape, seed)
    return np.where(mask[:, :, None] > 0, noise, x_src).astype(np.float32)


def teacher_sample(model: DiffusionTransformer, diffusion: Diffusion, x_src: np.ndarray,
                   mask: np.ndarray, steps: Optional[int] = None, method: str = "ancestral",
                   clamp: bool = True, seed: int = 0, progress: Progress = None) -> np.ndarray:
    """Run the reverse process from x_T and return the final x0 [B, L, E].

    ``method="ancestral"``: DiffuSeq's p_sample over all T steps (posterior mean from the
    predicted x0, fixed-large variance, no noise at the last step). ``method="ddim"``:
    η = 0 over ``steps`` evenly spaced timesteps. ``clamp`` replaces each predicted x0
    by its nearest word embedding. The source positions are re-anchored after every step.
    A ``self_conditioning`` model gets the previous step's predicted x0 (the network's
    output, before clamping; zeros at the first step) as its self-conditioning input.
    """
    T = diffusion.T
    mask = np.ascontiguousarray(mask, dtype=np.float32)
    x_src = np.ascontiguousarray(x_src, dtype=np.float32)
    B = x_src.shape[0]
    if method == "ancestral":
        if steps not in (None, T):
            raise ValueError(f"ancestral sampling runs all T={T} steps; use method='ddim' for {steps}")
        ts = np.arange(T - 1, -1, -1)
    elif method == "ddim":
        ts = ddim_timesteps(T, T if steps is None else int(steps))
    else:
        raise ValueError(f"method must be 'ancestral' or 'ddim', got {method!r}")
    x = _anchor_start(x_src, mask, derive_seed(seed, 0))
    abar = diffusion.alphas_cumprod
    x0_prev = None  # the self-conditioning input: None (zeros) at the first step
    for i, t in enumerate(ts):
        x0 = model.forward(x, np.full(B, t, dtype=np.int64), x_self_cond=x0_prev)
        if model.config.self_conditioning:
            x0_prev = x0
        if clamp:
            x0 = clamp_to_embeddings(model, x0, mask)
        if method == "ancestral":
            c1, c2 = diffusion.posterior_coef_x0[t], diffusion.posterior_coef_xt[t]
            sigma = np.sqrt(diffusion.fixedlarge_variance[t]) if t > 0 else 0.0
            noise = gaussian(x.shape, derive_seed(seed, 1, i)) if t > 0 else None
        else:
            prev = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
            c2 = np.sqrt(1.0 - prev) / np.sqrt(1.0 - abar[t])
            c1 = np.sqrt(prev) - c2 * np.sqrt(abar[t])
            sigma, noise = 0.0, None
        full = lambda v: np.full(B, v, dtype=np.float32)  # noqa: E731
        x = _core.posterior_step(x0, x, noise, full(c1), full(c2), full(sigma), mask, x_src)
        if progress:
            progress(1)
    return x


def student_sample(generator: DiffusionTransformer, diffusion: Diffusion, x_src: np.ndarray,
                   mask: np.ndarray, t_init: int, steps: int = 1, seed: int = 0) -> np.ndarray:
    """SPEC §6.6: one step e = G(x_init, t_init) with x_init = where(mask, sqrt(1-abar) z, src);
    K steps: t_i = t_init (1 - i/K), x = q_sample(D, t_i, fresh noise) anchored, D = G(x, t_i)."""
    if not 1 <= steps <= 8:
        raise ValueError(f"student steps must be in [1, 8], got {steps}")
    mask = np.ascontiguousarray(mask, dtype=np.float32)
    x_src = np.ascontiguousarray(x_src, dtype=np.float32)
    B = x_src.shape[0]
    D = np.zeros_like(x_src)
    for i in range(steps):
        t = int(round(t_init * (1.0 - i / steps)))
        tb = np.full(B, t, dtype=np.int64)
        x = diffusion.q_sample(np.where(mask[:, :, None] > 0, D, x_src), tb,
                               gaussian(x_src.shape, derive_seed(seed, i)), mask)
        D = generator.forward(x, tb)
        D = np.where(mask[:, :, None] > 0, D, x_src).astype(np.float32)
    return D


def batched(n: int, batch_size: int) -> List[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def candidate_seeds(seed: int, num_candidates: int) -> Sequence[int]:
    return [derive_seed(seed, 1000 + s) for s in range(num_candidates)]
