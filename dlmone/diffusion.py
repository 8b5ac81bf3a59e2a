"""Continuous diffusion over word embeddings (SPEC §4-§5): the sqrt schedule,
partial noising, the teacher's training loss with its exact gradient, and the
sampler steps (ancestral p_sample, DDIM), clamping and argmax decoding.

Random numbers come from a counter-based generator in C (``gaussian``): the same
seed gives the same noise whatever the thread count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from . import _core
from .model import DiffusionTransformer, as_float32, as_tokens


def gaussian(shape: Sequence[int], seed: int) -> np.ndarray:
    """float32 N(0, 1) noise of ``shape``; depends only on (seed, index)."""
    out = np.empty(tuple(shape), dtype=np.float32)
    _core.gaussian_fill(out, int(seed) & (2**64 - 1))
    return out


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from integers (a run seed, a step, a stream id ...)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & (2**64 - 1)
        h = (h * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return h


class Diffusion:
    """The DiffuSeq sqrt schedule over T steps and everything derived from it."""

    def __init__(self, steps: int = 2000) -> None:
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"diffusion steps must be a positive int, got {steps!r}")
        self.T = int(steps)
        self.betas, self.alphas_cumprod = _core.sqrt_schedule(self.T)
        abar, betas = self.alphas_cumprod, self.betas
        self.alphas_cumprod_prev = np.append(1.0, abar[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(abar)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - abar)
        # posterior q(x_{t-1} | x_t, x0) = N(c1 x0 + c2 x_t, ...)
        self.posterior_coef_x0 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - abar)
        self.posterior_coef_xt = (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)
        posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - abar)
        # DiffuSeq's "fixedlarge" variance: beta_t, with the posterior's at t = 0
        self.fixedlarge_variance = np.append(posterior_variance[1] if self.T > 1 else betas[0], betas[1:])

    def ve_sigma(self, t: int) -> float:
        """Noise level in variance-exploding units, sqrt((1 - abar_t) / abar_t)."""
        return float(np.sqrt((1.0 - self.alphas_cumprod[t]) / self.alphas_cumprod[t]))

    def check_t(self, t: np.ndarray, name: str = "t") -> np.ndarray:
        t = np.asarray(t)
        if t.dtype.kind not in "iu":
            raise TypeError(f"{name} must be integer timesteps, got dtype {t.dtype}")
        if t.size and (t.min() < 0 or t.max() >= self.T):
            raise ValueError(f"{name} must lie in [0, {self.T}), got values in [{t.min()}, {t.max()}]")
        return t.astype(np.int64)

    def q_sample(self, x0: np.ndarray, t: np.ndarray, noise: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Partial noising: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise where mask is 1,
        x0 unchanged (bit for bit) where it is 0."""
        t = self.check_t(t)
        return _core.q_sample(as_float32(x0, "x0"), as_float32(noise, "noise"),
                              self.sqrt_alphas_cumprod[t].astype(np.float32),
                              self.sqrt_one_minus_alphas_cumprod[t].astype(np.float32),
                              as_float32(mask, "mask"))

    def q_sample_backward(self, grad_xt: np.ndarray, t: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """d(x_t)/d(x0)ᵀ applied to grad_xt: sqrt(abar_t) on noised positions, 1 elsewhere."""
        scale = self.sqrt_alphas_cumprod[self.check_t(t)].astype(np.float32)[:, None, None]
        m = np.asarray(mask, dtype=np.float32)[:, :, None]
        return grad_xt * (m * scale + (1.0 - m))


DECODERS = ("logits", "nearest")


def _nearest_offsets(W: np.ndarray) -> np.ndarray:
    """-½‖W_v‖²: argmax_v x·W_v - ½‖W_v‖² is the word embedding nearest to x (L2)."""
    return (-0.5 * np.einsum("ve,ve->v", W, W)).astype(np.float32)


def decode_tokens(model: DiffusionTransformer, x: np.ndarray, decode: str = "logits",
                  active: Optional[np.ndarray] = None) -> np.ndarray:
    """Token ids of embeddings x [.., E], without materialising [B, L, V]: ``"logits"``, the
    argmax of the tied logits x·Wᵀ + b (SPEC §5); ``"nearest"``, the nearest word embedding.
    ``active`` (bool, x's shape less E): decode only where True (0 elsewhere)."""
    sd = model.state_dict()
    W = sd["word_embedding.weight"]
    if decode == "logits":
        offsets = sd["lm_head.bias"]
    elif decode == "nearest":
        offsets = _nearest_offsets(W)
    else:
        raise ValueError(f"decode must be one of {DECODERS}, got {decode!r}")
    if active is None:
        return _core.affine_argmax(as_float32(x, "x"), W, offsets)
    return _core.affine_argmax(as_float32(x, "x"), W, offsets, np.ascontiguousarray(active, dtype=bool))


def clamp_to_embeddings(model: DiffusionTransformer, x0: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Replace x0 on the positions with mask 1 by the nearest word embedding (L2)."""
    W = model.state_dict()["word_embedding.weight"]
    offsets = _nearest_offsets(W)
    active = np.asarray(mask) > 0
    tok = _core.affine_argmax(as_float32(x0, "x0"), W, offsets, np.ascontiguousarray(active))
    out = x0.copy()
    out[active] = W[tok[active]]
    return out


def soft_absorb_positions(diffusion: Diffusion, t: np.ndarray, mask: np.ndarray, rate: float,
                          seed: int, row0: int = 0, total: Optional[int] = None) -> np.ndarray:
    """DiffuSeq-v2's discrete noise (its "soft absorbing state"): [B, L] bool, True where
    the noised x_t is replaced by the learned [MASK] vector. Each position with mask 1
    (target and pad) is chosen independently with probability rate * sqrt(1 - abar_t),
    as in DiffuSeq-v2's q_sample (its ``denoise_rate``, 0.5 in its scripts). The
    uniforms are drawn from ``seed`` for a whole batch of ``total`` rows (default B) of
    which these are rows ``row0...``: a data-parallel shard gets the whole batch's draws."""
    t = diffusion.check_t(t)
    B, L = np.shape(mask)
    u = np.random.default_rng(seed).random((B if total is None else total, L))[row0:row0 + B]
    p = float(rate) * diffusion.sqrt_one_minus_alphas_cumprod[t]
    return (u < p[:, None]) & (np.asarray(mask) > 0)


def self_cond_rows(batch: int, seed: int) -> np.ndarray:
    """The examples of a batch whose training pass is self-conditioned: each with
    probability 1/2 (per example, as in Analog Bits and CDCD), drawn from ``seed``."""
    return np.random.default_rng(seed).random(batch) < 0.5


@dataclass
class LossTerms:
    loss: float
    mse: float
    nll: float
    prior: float
    per_example: np.ndarray  # loss of each example before importance weighting


def training_loss(model: DiffusionTransformer, diffusion: Diffusion, tokens: np.ndarray,
                  mask: np.ndarray, t: np.ndarray, weights: Optional[np.ndarray] = None,
                  seed: int = 0, train: bool = True, backward: bool = True,
                  rows: Optional[slice] = None, soft_absorb: float = 0.0) -> LossTerms:
    """SPEC §5's loss on one batch, and its exact gradient accumulated into the model.

    loss_b = mean_{L,E}(f(x_t, t) - x0)² [x0_mean at t = 0] + mean_L CE(logits(x0), tokens)
             + mean_{L,E}(sqrt(abar_{T-1}) x0)², with x0 = Emb(tokens) + sqrt(1 - abar_0) eps0;
    the batch loss is mean_b(weights_b * loss_b) (weights: the importance weights of the
    timestep sampler, 1 for uniform sampling). Gradients reach the word embedding through
    x0 (target, rounding term and input). ``backward=False`` only evaluates.

    ``rows`` computes only those rows of the batch, as one data-parallel rank does
    (:mod:`dlmone.distributed`): they get the noise they get in the whole batch, and
    the loss terms and gradient are their share of the batch means (divided by the whole
    batch size), so the shares of disjoint rows add up to the whole batch's values.
    ``per_example`` then holds those rows only; dropout masks too are those of the whole
    batch (``DiffusionTransformer.forward(row_offset=...)``).

    Recipe options (SPEC §5.1). A ``self_conditioning`` model is trained as in Analog
    Bits: for each example with probability 1/2 (:func:`self_cond_rows`) a first pass
    without gradient and with a zero self-conditioning input predicts x̂0, which is the
    self-conditioning input of the second pass; the others get zeros. Only the second
    pass is differentiated (x̂0 is a stop-gradient). ``soft_absorb`` > 0 (a model with a
    ``mask_embedding``) adds DiffuSeq-v2's discrete noise: positions chosen by
    :func:`soft_absorb_positions` enter the network as the [MASK] vector instead of
    their noised x_t; the regression target stays the clean x0, and those positions'
    input gradient goes to the [MASK] vector instead of x0.
    """
    tokens = as_tokens(tokens)
    B, L = tokens.shape
    E = model.config.emb_dim
    mask = as_float32(mask, "mask")
    if mask.shape != (B, L):
        raise ValueError(f"mask has shape {mask.shape}, expected {(B, L)}")
    t = diffusion.check_t(t)
    if t.shape != (B,):
        raise ValueError(f"t has shape {t.shape}, expected ({B},)")
    w = np.ones(B, np.float32) if weights is None else as_float32(weights, "weights")
    rows = slice(0, B) if rows is None else rows
    total = B  # the batch the loss is a mean over
    tokens, mask, t, w = tokens[rows], mask[rows], t[rows], w[rows]
    B = len(tokens)
    x0_mean = model.embed(tokens)
    x0 = x0_mean + np.float32(diffusion.sqrt_one_minus_alphas_cumprod[0]) * gaussian(
        (total, L, E), derive_seed(seed, 0))[rows]
    x_t = diffusion.q_sample(x0, t, gaussian((total, L, E), derive_seed(seed, 1))[rows], mask)
    row0 = rows.indices(total)[0]
    absorbed = None
    if not 0.0 <= soft_absorb <= 1.0:
        raise ValueError(f"soft_absorb must be in [0, 1], got {soft_absorb}")
    if soft_absorb > 0:
        if "mask_embedding" not in model.layout:
            raise ValueError("soft_absorb needs a model with a [MASK] vector (ModelConfig.mask_embedding)")
        absorbed = soft_absorb_positions(diffusion, t, mask, soft_absorb, derive_seed(seed, 3),
                                         row0, total)
        x_t[absorbed] = model.state_dict()["mask_embedding"]
    x_sc = None
    if model.config.self_conditioning:
        use = self_cond_rows(total, derive_seed(seed, 4))[rows]
        if use.any():  # the first pass: zero self-conditioning input, no gradient
            first = model.forward(x_t, t, train=train, seed=derive_seed(seed, 5), row_offset=row0)
            x_sc = np.where(use[:, None, None], first, np.float32(0))
    pred = model.forward(x_t, t, train=train, seed=derive_seed(seed, 2), row_offset=row0,
                         x_self_cond=x_sc)

    at_zero = np.ascontiguousarray(t == 0)
    mse, grad_pred = _core.mse_loss(pred, x0, x0_mean, at_zero, w / np.float32(total))
    # the rounding loss; its gradients (the head's now, x0's below) with the backward
    nll_pos, grad_x0 = model.tied_cross_entropy(
        x0, tokens, np.broadcast_to((w / np.float32(total * L))[:, None], (B, L)), grads=backward)
    nll = nll_pos.mean(axis=1)
    abar_last = np.float32(diffusion.alphas_cumprod[-1])
    prior = (abar_last * np.square(x0)).reshape(B, -1).mean(axis=1)
    per_example = mse + nll + prior
    terms = LossTerms(loss=float(np.sum(w * per_example) / total), mse=float(mse.sum() / total),
                      nll=float(nll.sum() / total), prior=float(prior.sum() / total),
                      per_example=per_example)
    if not backward:
        return terms

    grad_xt = model.backward(grad_pred)
    if absorbed is not None:  # those inputs were the [MASK] vector, not a function of x0
        model.grads()["mask_embedding"] += grad_xt[absorbed].sum(axis=0)
        grad_xt[absorbed] = 0.0
    grad_x0 += (w / np.float32(total))[:, None, None] * (2.0 * abar_last / (L * E)) * x0
    grad_x0 += diffusion.q_sample_backward(grad_xt, t, mask)
    target_grad = -grad_pred  # the MSE target is x0 (or x0_mean at t = 0)
    grad_x0[~at_zero] += target_grad[~at_zero]
    grad_x0_mean = grad_x0
    grad_x0_mean[at_zero] += target_grad[at_zero]
    model.embed_backward(tokens, grad_x0_mean)
    return terms


class LossAwareSampler:
    """DiffuSeq's loss-second-moment timestep sampler: p(t) ∝ sqrt(E[loss_t²]) over
    the last ``history`` losses at t, mixed with ``uniform_prob`` of uniform; uniform
    until every t has a full history. Importance weight 1 / (T p(t))."""

    def __init__(self, steps: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        self.T, self.history, self.uniform_prob = steps, history, uniform_prob
        self.losses = np.zeros((steps, history), dtype=np.float64)
        self.counts = np.zeros(steps, dtype=np.int64)

    def probabilities(self) -> np.ndarray:
        if not (self.counts == self.history).all():
            return np.full(self.T, 1.0 / self.T)
        w = np.sqrt(np.mean(self.losses ** 2, axis=1))
        w /= w.sum()
        return w * (1.0 - self.uniform_prob) + self.uniform_prob / self.T

    def sample(self, batch: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        p = self.probabilities()
        t = rng.choice(self.T, size=batch, p=p)
        return t.astype(np.int64), (1.0 / (self.T * p[t])).astype(np.float32)

    def update(self, t: np.ndarray, losses: np.ndarray) -> None:
        for ti, li in zip(np.asarray(t).tolist(), np.asarray(losses).tolist()):
            if self.counts[ti] == self.history:
                self.losses[ti, :-1] = self.losses[ti, 1:]
                self.losses[ti, -1] = li
            else:
                self.losses[ti, self.counts[ti]] = li
                self.counts[ti] += 1

    def state_dict(self) -> Dict[str, np.ndarray]:
        return {"losses": self.losses.copy(), "counts": self.counts.copy()}

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        """Restore a saved history; a missing, misshapen or impossible one raises ValueError."""
        for name, own in (("losses", self.losses), ("counts", self.counts)):
            if name not in state or np.shape(state[name]) != own.shape:
                got = np.shape(state[name]) if name in state else "missing"
                raise ValueError(f"lossaware sampler state: {name} is {got}, expected shape {own.shape}")
        losses, counts = np.asarray(state["losses"]), np.asarray(state["counts"])
        if not np.isfinite(losses).all() or not ((counts >= 0) & (counts <= self.history)).all():
            raise ValueError(f"lossaware sampler state: non-finite losses or counts outside "
                             f"[0, {self.history}]")
        self.losses[...] = losses
        self.counts[...] = counts


class UniformSampler:
    """t ~ U{0..T-1}, weight 1."""

    def __init__(self, steps: int) -> None:
        self.T = steps

    def sample(self, batch: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        return rng.integers(0, self.T, size=batch).astype(np.int64), np.ones(batch, np.float32)

    def update(self, t: np.ndarray, losses: np.ndarray) -> None:
        pass

    def state_dict(self) -> Dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        pass


def make_timestep_sampler(kind: str, steps: int):
    if kind == "uniform":
        return UniformSampler(steps)
    if kind == "lossaware":
        return LossAwareSampler(steps)
    raise ValueError(f"timestep sampler must be 'uniform' or 'lossaware', got {kind!r}")
