"""AdamW (with optional clipping) and EMA over a model's flat parameter buffer."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from . import _core
from .model import DiffusionTransformer


def _trainable_ranges(model: DiffusionTransformer, frozen: Iterable[str]) -> List[Tuple[int, int]]:
    """Merged [start, end) offsets of every parameter tensor not in ``frozen``."""
    frozen = set(frozen)
    unknown = frozen - set(model.layout) - {"lm_head.weight"}
    if unknown:
        raise ValueError(f"frozen names unknown parameters: {sorted(unknown)}")
    if "lm_head.weight" in frozen:
        frozen.add("word_embedding.weight")
    spans = sorted((off, off + int(np.prod(shape))) for name, (off, shape) in model.layout.items()
                   if name not in frozen)
    merged: List[Tuple[int, int]] = []
    for a, b in spans:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


class AdamW:
    """torch.optim.AdamW semantics (decoupled weight decay, bias correction).

    ``betas=(0.0, 0.999)`` is Adam with β1 = 0 as SiD uses. ``clip_value`` clamps every
    gradient to [-c, c] and ``clip_norm`` rescales them to a global L2 norm (both in place,
    before the update, like torch's clip_grad_value_/clip_grad_norm_). ``frozen`` names
    tensors that are never updated. Set ``lr`` between steps for a schedule.
    """

    def __init__(self, model: DiffusionTransformer, lr: float = 1e-4,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, clip_value: Optional[float] = None,
                 clip_norm: Optional[float] = None, frozen: Iterable[str] = ()) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two values in [0, 1), got {betas}")
        if not eps > 0.0:
            raise ValueError(f"eps must be positive, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        for name, v in (("clip_value", clip_value), ("clip_norm", clip_norm)):
            if v is not None and not v > 0.0:
                raise ValueError(f"{name} must be positive, got {v}")
        self.model = model
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.weight_decay = float(weight_decay)
        self.clip_value, self.clip_norm = clip_value, clip_norm
        self.frozen = tuple(frozen)
        self.ranges = _trainable_ranges(model, self.frozen)
        self.m = np.zeros_like(model.params)
        self.v = np.zeros_like(model.params)
        self.step_count = 0
        self.last_grad_norm: Optional[float] = None

    def grad_norm(self) -> float:
        """Global L2 norm of the trainable gradients."""
        g = self.model.grad_buffer
        return float(np.sqrt(sum(_core.global_norm(g[a:b]) ** 2 for a, b in self.ranges)))

    def step(self) -> None:
        g = self.model.grad_buffer
        if self.clip_value is not None:
            for a, b in self.ranges:
                _core.clip_by_value(g[a:b], float(self.clip_value))
        if self.clip_norm is not None:
            norm = self.grad_norm()
            self.last_grad_norm = norm
            coef = float(self.clip_norm) / (norm + 1e-6)
            if coef < 1.0:
                for a, b in self.ranges:
                    _core.scale(g[a:b], coef)
        self.step_count += 1
        p = self.model.params
        for a, b in self.ranges:
            _core.adamw_step(p[a:b], g[a:b], self.m[a:b], self.v[a:b], self.lr, self.betas[0],
                             self.betas[1], self.eps, self.weight_decay, self.step_count)

    def state_dict(self) -> Dict[str, np.ndarray]:
        return {"m": self.m, "v": self.v, "step": np.array(self.step_count, dtype=np.int64)}

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        for key in ("m", "v"):
            arr = np.asarray(state[key])
            if arr.shape != self.m.shape:
                raise ValueError(f"optimizer {key} has shape {arr.shape}, expected {self.m.shape}")
            np.copyto(getattr(self, key), arr)
        self.step_count = int(state["step"])


def ema_decay_at(decay: float, step: int, warmup: bool) -> float:
    """The EMA decay of the update after optimiser step ``step`` (0 for the first):
    ``decay``, or with ``warmup`` min(decay, (1 + step) / (10 + step)) (SPEC §5.1), so
    that a short run's average forgets the random initialisation (which a constant
    0.999 still weighs at 0.999^2000 = 13.5% after 2,000 steps)."""
    if warmup:
        return min(float(decay), (1.0 + step) / (10.0 + step))
    return float(decay)


class EMA:
    """Exponential moving average of a model's parameters: ema = d*ema + (1-d)*params,
    with d = ``decay``, or with ``warmup`` :func:`ema_decay_at` of the optimiser step."""

    def __init__(self, model: DiffusionTransformer, decay: float = 0.9999, warmup: bool = False) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.model, self.decay, self.warmup = model, float(decay), bool(warmup)
        self.params = model.params.copy()

    def update(self, step: int = 0) -> None:
        """Average in the current parameters; ``step`` is the optimiser step that produced
        them (0 for the first), which sets the decay when ``warmup`` is on."""
        _core.ema_update(self.params, self.model.params, ema_decay_at(self.decay, step, self.warmup))

    def state_dict(self) -> Dict[str, np.ndarray]:
        views = self.model._views(self.params)
        return views

    def copy_to(self, model: DiffusionTransformer) -> None:
        if model.params.shape != self.params.shape:
            raise ValueError("copy_to needs a model of the same config")
        np.copyto(model.params, self.params)


class NonFiniteGuard:
    """Skips an update whose loss or gradients are not finite (checked in C, one pass
    over the gradient buffer) and stops training after ``limit`` such steps in a row."""

    def __init__(self, limit: int = 10) -> None:
        if limit < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {limit}")
        self.limit, self.skipped, self.in_a_row = int(limit), 0, 0

    def ok(self, loss: float, grads: np.ndarray, where: str) -> bool:
        if np.isfinite(loss) and _core.count_nonfinite(grads) == 0:
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise FloatingPointError(
                f"{where}: {self.in_a_row} consecutive steps with a non-finite loss or gradient; "
                f"training stopped (the last checkpoint is intact; lower the learning rate or check "
                f"the data)")
        return False

    def state_dict(self) -> Dict[str, int]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: Any) -> None:
        """Restore the counts (a resumed run logs and stops as the uninterrupted one would)."""
        counts = [state.get(k) if isinstance(state, dict) else None for k in ("skipped", "in_a_row")]
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError(f"non-finite guard state must hold the counts 'skipped' and 'in_a_row', "
                             f"got {state!r}")
        self.skipped, self.in_a_row = counts
