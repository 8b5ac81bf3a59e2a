"""DLM-One (SPEC §6): distil a teacher into a one-step generator by score identity
distillation with adversarial regularisation, in two stages (or more: ``stages``).

Three networks of the teacher's architecture: φ (the frozen teacher), G_θ (the
generator, initialised from φ) and ψ (the fake-score estimator, initialised from φ,
which is also the discriminator). Word embeddings stay φ's. One ψ step and one G
step alternate; Adam with β1 = 0 and clipping by value for both.

A teacher trained with the recipe options of SPEC §5.1 distils as it is: G and ψ get
its architecture. A self-conditioned teacher's three networks all get zeros as their
self-conditioning input (what a self-conditioned network sees in its first pass, or at
the first sampling step), and so does the student when it generates. A [MASK] vector
(``mask_embedding``, used only by the teacher's training loss) is frozen like the word
embeddings.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core, get_num_threads
from . import checkpoint as ckpt
from .checkpoint import PathLike
from .config_io import RunConfig
from .data import Seq2SeqData, decode_targets, encode_pairs
from .diffusion import derive_seed, gaussian
from .distributed import LocalComm, world
from .metrics import bleu, empty_rate, mean_length, repeated_token_rate, self_bleu
from .model import DiffusionTransformer
from .optim import EMA, AdamW, NonFiniteGuard
from .resources import check_memory, estimate_memory, parse_bytes
from .sample import student_sample
from .threads import ThreadGovernor
from .generator import SequenceModel
from .runlog import JsonlLog, NullLog, discard
from .teacher import Teacher

FROZEN = ("word_embedding.weight", "lm_head.bias")
FROZEN_IF_PRESENT = ("mask_embedding",)
DISC_HEADS = ("token", "hidden_mean", "linear")


def disc_weights(kind: str, mask: np.ndarray, hidden_dim: int) -> np.ndarray:
    """[n, K] weights that average the BCE of an example's K discriminator logits: 1/H
    over the H pooled channels ("token"), 1 for the single logit ("hidden_mean"), 1/count
    over its target+pad positions ("linear")."""
    n = len(mask)
    if kind == "token":
        return np.full((n, hidden_dim), 1.0 / hidden_dim, np.float32)
    if kind == "hidden_mean":
        return np.ones((n, 1), np.float32)
    m = (mask > 0).astype(np.float32)
    return m / np.maximum(m.sum(axis=1, keepdims=True), 1.0)


def auc(real: np.ndarray, fake: np.ndarray) -> float:
    """P(score_real > score_fake) + ½ P(tie): the area under D's ROC curve."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if not len(real) or not len(fake):
        return float("nan")
    greater = (real[:, None] > fake[None, :]).mean()
    ties = (real[:, None] == fake[None, :]).mean()
    return float(greater + 0.5 * ties)


@dataclass
class StageConfig:
    """The loss weights of one stage (SPEC §6.5), and its length when not ``steps``."""
    alpha: float = 1.2
    b_psi: float = 0.5
    b_g: float = 0.5
    steps: Optional[int] = None   # None: DistillConfig.steps


@dataclass
class DistillConfig(RunConfig):
    """Every hyper-parameter of SPEC §6; defaults are §6.5a's small-scale settings."""

    t_init: int = 1490
    t_min: int = 0
    t_max: int = 1976
    # α 0 in both stages rather than SiD's 1.2 / DLM-One's 0.5: on the built-in task the
    # one-step student's BLEU rises as α falls from 0.5 to 0.25 to 0, 3 seeds each (RESULTS §11c);
    # 0.5 beat 1.0 and 1.2 in stage 1 (§11)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(alpha=0.0))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(alpha=0.0, b_psi=0.9, b_g=0.1))
    # Stages in all: each one after the first re-initialises ψ from φ, continues G from the
    # previous stage's best and takes stage2's weights (repeated ψ resets, issue 14).
    stages: int = 2
    adversarial: bool = True
    # D_psi on psi's last hidden state (SPEC §6.3): "token" pools over target+pad positions,
    # H logits per example; "hidden_mean" (inert, an ablation) averages over the hidden
    # dim too; "linear" is a Linear(H -> 1) head with one logit per position.
    disc_head: str = "token"
    # The BCE terms per entry, as the losses they join: L_SiD sums over an example's n_b
    # target entries, the DSM term over E per position (SiDA multiplies its GAN term by
    # C·H·W). λ_adv: L_G = L_SiD + b_G λ_adv n_b BCE_b; λ_D: L_ψ = DSM + b_ψ λ_D E ½(BCE_real
    # + BCE_fake). Calibrated on the built-in task (RESULTS §11): the adversarial share of
    # G's gradient ‖∇L_adv‖/‖∇L_SiD‖ is 0.15-0.3 in stage 1, D's AUC 0.5-0.62. The share is
    # what to match on another task: on QQP (§13b) 100 gives 0.3-0.6 and hurts, 10 gives ~0.1 and helps.
    adv_weight: float = 100.0
    disc_weight: float = 6.0
    psi_warmup: int = 0             # ψ-only steps at the start of each stage (G frozen)
    adv_start: int = 0              # G's adversarial term is off before this step of a stage
    g_ema: float = 0.99             # decay of an EMA of G that validation and the student use; 0: off
    # K > 1 trains G for K-step generation (the paper's open question 3): each row's input is
    # the state at a random step k < K of the K-step sampler (SPEC §6.6), reached by G without
    # gradient; L_SiD and ψ then see G's output at that step. 1: the one-step generator.
    train_steps: int = 1
    precision: str = "float32"      # or "bf16": G's and ψ's products in mixed precision on AMX
    adaptive_threads: bool = True   # the thread count chosen by measured step times (dlmone.threads)
    lr_g: float = 5e-5
    lr_psi: float = 2e-4
    clip_value: float = 1.0
    batch_size: int = 64
    steps: int = 600                # per stage (a stage's own ``steps`` overrides it)
    eval_every: int = 100
    eval_size: int = 1000            # validation pairs (fewer when the split is smaller): selection noise falls with n
    eval_steps: int = 1             # student inference steps at validation
    log_every: int = 10
    save_every: int = 200
    max_bad_steps: int = 10         # consecutive non-finite steps before training stops
    seed: int = 0
    # degeneration thresholds (warn when crossed at a validation)
    warn_empty: float = 0.2
    warn_repeat: float = 0.3
    warn_self_bleu: float = 0.95
    max_memory: Optional[Union[int, str]] = None  # bytes or "8GiB"; default: what is available

    def __post_init__(self) -> None:
        if self.max_memory is not None:
            parse_bytes(self.max_memory)
        for name in ("stage1", "stage2"):
            v = getattr(self, name)
            if isinstance(v, Mapping):
                setattr(self, name, StageConfig(**v))
            own = getattr(self, name).steps
            if own is not None and (isinstance(own, bool) or not isinstance(own, int) or own < 1):
                raise ValueError(f"{name}.steps must be a positive int or None, got {own!r}")
        self.check_positive_ints(("stages", "batch_size", "steps", "eval_every", "eval_size", "log_every", "save_every"))
        if not 0 <= self.t_min <= self.t_max:
            raise ValueError(f"need 0 <= t_min <= t_max, got t_min={self.t_min}, t_max={self.t_max}")
        if self.disc_head not in DISC_HEADS:
            raise ValueError(f"disc_head must be one of {DISC_HEADS}, got {self.disc_head!r}")
        for name in ("psi_warmup", "adv_start"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if not 0.0 <= self.g_ema < 1.0:
            raise ValueError(f"g_ema must be in [0, 1), got {self.g_ema}")
        if self.precision not in DiffusionTransformer.PRECISIONS:
            raise ValueError(f"precision must be one of {DiffusionTransformer.PRECISIONS}, got {self.precision!r}")
        for name in ("adv_weight", "disc_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("eval_steps", "train_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 8:
                raise ValueError(f"{name} must be an int in [1, 8], got {v!r}")
        for name in ("lr_g", "lr_psi", "clip_value"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def check_against(self, T: int) -> None:
        for name in ("t_init", "t_max"):
            if not 0 <= getattr(self, name) < T:
                raise ValueError(f"{name}={getattr(self, name)} outside the teacher's [0, {T})")

    def stage(self, n: int) -> StageConfig:
        return self.stage1 if n == 1 else self.stage2

    def stage_steps(self, n: int) -> int:
        own = self.stage(n).steps
        return self.steps if own is None else own


class Student(SequenceModel):
    """A one-step generator: ``generate(sources, steps=1..8)`` (SPEC §6.6)."""

    kind = "student"

    @property
    def t_init(self) -> int:
        return int(self.info["t_init"])

    def generate(self, sources: Sequence[str], steps: int = 1, seed: int = 0, batch_size: int = 256,
                 num_candidates: int = 1, return_ids: bool = False,
                 return_candidates: bool = False, comm: Optional[LocalComm] = None,
                 precision: Optional[str] = None, decode: str = "logits") -> Any:
        """One forward pass per batch (or ``steps`` ≤ 8 passes). Same outputs as
        :meth:`Teacher.generate`: strings, optionally ids and the S candidates; ``comm``
        shares the batches out over MPI ranks; ``precision="bf16"`` as there. ``decode``:
        ``"logits"`` (argmax of the tied logits, SPEC §6.6) or ``"nearest"`` (the nearest
        word embedding)."""
        if not 1 <= steps <= 8:
            raise ValueError(f"student steps must be in [1, 8], got {steps}")

        def sample(x_src: np.ndarray, mask: np.ndarray, batch_seed: int) -> np.ndarray:
            return student_sample(self.model, self.diffusion, x_src, mask, self.t_init, steps, batch_seed)

        return self._generate(sources, sample, num_candidates, seed, batch_size, return_ids,
                              return_candidates, comm, precision, decode)

    @classmethod
    def load(cls, path: PathLike) -> "Student":
        student = super().load(path)
        t_init, T = student.info.get("t_init"), student.config.diffusion_steps
        if isinstance(t_init, bool) or not isinstance(t_init, int) or not 0 <= t_init < T:
            raise ValueError(f"{path}/config.json: t_init must be a timestep in [0, {T}), got {t_init!r}")
        return student


# --------------------------------------------------------------------- steps
class Distiller:
    """The networks, optimisers and one ψ step / one G step of SPEC §6.3-§6.4.

    A step takes the whole (global) batch; with a communicator of K ranks each rank
    computes its rows (:mod:`dlmone.distributed`), its losses and gradients are its
    rows' share of the global means, and the gradients are summed over the ranks
    before the update, so every rank takes the same step."""

    def __init__(self, teacher: Teacher, config: DistillConfig, stage: int,
                 generator_params: Optional[np.ndarray] = None, comm: Optional[LocalComm] = None) -> None:
        self.config, self.stage = config, stage
        self.comm = LocalComm() if comm is None else comm
        self.weights = config.stage(stage)
        self.phi = teacher.model
        self.diffusion = teacher.diffusion
        mcfg = self.phi.config
        config.check_against(self.diffusion.T)
        self.G = DiffusionTransformer(mcfg)
        self.psi = DiffusionTransformer(mcfg)
        self.G.precision = self.psi.precision = config.precision
        self.G.copy_from(self.phi)
        if generator_params is not None:
            np.copyto(self.G.params, generator_params)
        self.psi.copy_from(self.phi)
        betas = (0.0, 0.999)
        frozen = FROZEN + tuple(k for k in FROZEN_IF_PRESENT if k in self.G.layout)
        self.opt_g = AdamW(self.G, lr=config.lr_g, betas=betas, clip_value=config.clip_value, frozen=frozen)
        self.opt_psi = AdamW(self.psi, lr=config.lr_psi, betas=betas, clip_value=config.clip_value,
                             frozen=frozen)
        # G_ema (SiD evaluates an EMA of G): what validation scores and the student keeps
        self.G_ema = EMA(self.G, config.g_ema) if config.g_ema > 0 else None
        H = mcfg.hidden_dim
        # the optional Linear(H -> 1) discriminator head, zero-initialised, trained with ψ
        self.head_w = np.zeros(H, np.float32)
        self.head_b = np.zeros(1, np.float32)
        self.head_m = np.zeros(H + 1, np.float32)
        self.head_v = np.zeros(H + 1, np.float32)
        self.guard = NonFiniteGuard(config.max_bad_steps)

    def head(self):
        return (self.head_w, float(self.head_b[0])) if self.config.disc_head == "linear" else None

    @property
    def generator_params(self) -> np.ndarray:
        """The weights a student gets: G_ema's when the EMA is on, else G's."""
        return self.G.params if self.G_ema is None else self.G_ema.params

    def _disc(self, hidden: np.ndarray, mask: np.ndarray, target: np.ndarray):
        """D_ψ's BCE per example (the mean over its logits), its gradient with respect to
        the logits, and each example's score: the mean over its logits of σ(logit) − ½,
        > 0 meaning "real". (Not the mean logit: with token pooling that is the mean of
        the post-LayerNorm state over the hidden dimension, the inert quantity of SPEC §6.3.)"""
        kind = self.config.disc_head
        logit = _core.disc_logits(hidden, mask, kind, self.head())
        w = disc_weights(kind, mask, hidden.shape[-1])
        bce, g_logit = _core.bce_with_logits(logit.ravel(), np.repeat(target, logit.shape[1]), 10.0)
        bce, g_logit = bce.reshape(logit.shape), g_logit.reshape(logit.shape)
        g_logit *= w
        prob = 1.0 / (1.0 + np.exp(-np.clip(logit, -30.0, 30.0)))
        return (bce * w).sum(axis=1), g_logit, (prob * w).sum(axis=1) - 0.5

    def _adv_scale(self, mask: np.ndarray, batch: int) -> np.ndarray:
        """[n, 1]: b_G λ_adv n_b / batch, n_b an example's target entries (its share of the
        batch mean of b_G λ_adv n_b BCE_b)."""
        n_entries = mask.sum(axis=1, keepdims=True) * self.phi.config.emb_dim
        return (self.weights.b_g * self.config.adv_weight * n_entries / batch).astype(np.float32)

    def _disc_backward(self, g_logit: np.ndarray, hidden: np.ndarray, mask: np.ndarray):
        return _core.disc_backward(g_logit, hidden, mask, self.config.disc_head, self.head())

    def _batch(self, ids: np.ndarray, mask: np.ndarray, seed: int, all_rows: bool = False):
        """This rank's rows (every row with ``all_rows``) of the step's inputs (its mask,
        x_real, G's input x_in at its timesteps t_in, t, eps and the [n,L,1] target mask),
        drawn for the whole batch as one process draws them."""
        c = self.config
        B = len(ids)
        rows = slice(None) if all_rows else self.comm.rows(B)
        x_pair = self.phi.embed(ids)          # Emb of the real pairs: source + real target
        x_in, t_in = self._generator_input(x_pair, mask, seed)
        mask = mask[rows]
        x_real = x_pair[rows]
        shape = (B,) + x_real.shape[1:]
        m3 = mask[:, :, None] > 0
        rng = np.random.default_rng(derive_seed(seed, 1))
        t = rng.integers(c.t_min, c.t_max + 1, size=B).astype(np.int64)[rows]
        eps = gaussian(shape, derive_seed(seed, 2))[rows]
        return mask, x_real, x_in[rows], t_in[rows], t, eps, m3

    def _generator_input(self, x_src: np.ndarray, mask: np.ndarray, seed: int):
        """G's input for the whole batch (``x_src``: its embedded pairs, whose source
        positions G's input keeps): x_init at t_init (SPEC §6.6), or with ``train_steps``
        K > 1 the K-step sampler's state at a random step k < K per row, reached by G's
        earlier steps without gradient (the same on every rank)."""
        c = self.config
        m3 = mask[:, :, None] > 0
        z = gaussian(x_src.shape, derive_seed(seed, 0))
        s_init = np.float32(self.diffusion.sqrt_one_minus_alphas_cumprod[c.t_init])
        x_in = np.where(m3, s_init * z, x_src).astype(np.float32)
        B = len(x_src)
        t_in = np.full(B, c.t_init, np.int64)
        K = c.train_steps
        if K == 1:
            return x_in, t_in
        k = np.random.default_rng(derive_seed(seed, 3)).integers(0, K, size=B)
        x = x_in
        for i in range(1, int(k.max()) + 1):
            D = np.where(m3, self.G.forward(x, t_in), x_src).astype(np.float32)
            t_i = int(round(c.t_init * (1.0 - i / K)))
            x_next = self.diffusion.q_sample(D, np.full(B, t_i, np.int64),
                                             gaussian(x_src.shape, derive_seed(seed, 4, i)), mask)
            later = k >= i
            x = np.where(later[:, None, None], x_next, x).astype(np.float32)
            t_in = np.where(later, t_i, t_in)
        return x, t_in

    def _summed(self, stats: Dict[str, float]) -> Dict[str, float]:
        """Per-rank shares of the step's statistics -> the global batch's values."""
        return dict(zip(stats, self.comm.sum_inplace(np.array(list(stats.values()))).tolist()))

    def psi_step(self, ids: np.ndarray, mask: np.ndarray, seed: int) -> Dict[str, float]:
        """L_ψ = mean_target ||f_ψ(x_t) - e_g||² + b_ψ λ_D ½[BCE(D(x_t^real), 1) + BCE(D(x_t^fake), 0)]."""
        c, B = self.config, len(ids)
        positions = np.count_nonzero(mask)  # the global batch's target positions
        mask, x_real, x_in, t_in, t, eps, m3 = self._batch(ids, mask, seed)
        n = len(x_real)
        e_g = np.where(m3, self.G.forward(x_in, t_in), x_real).astype(np.float32)
        xt_fake = self.diffusion.q_sample(e_g, t, eps, mask)
        adv = c.adversarial and self.weights.b_psi > 0
        if adv:
            xt_real = self.diffusion.q_sample(x_real, t, eps, mask)
            pred = self.psi.forward(np.concatenate([xt_fake, xt_real]), np.concatenate([t, t]))
        else:
            pred = self.psi.forward(xt_fake, t)
        loss_dsm, g_pred = _core.denoise_loss(np.ascontiguousarray(pred[:n]), e_g, mask)
        # denoise_loss averages over this rank's target positions; its share of the global mean:
        share = np.count_nonzero(mask) / max(positions, 1)
        g_pred *= np.float32(share)
        out = {"psi_dsm": loss_dsm * share}
        grad_out = np.zeros_like(pred)
        grad_out[:n] = g_pred
        grad_hidden = None
        if adv:
            mask2 = np.concatenate([mask, mask])
            hidden = self.psi.hidden
            target = np.concatenate([np.zeros(n, np.float32), np.ones(n, np.float32)])
            bce, g_logit, score = self._disc(hidden, mask2, target)
            g_logit *= np.float32(self.weights.b_psi * c.disc_weight * self.phi.config.emb_dim * 0.5 / B)
            grad_hidden, g_w, g_b = self._disc_backward(g_logit, hidden, mask2)
            if g_w is not None:
                self._head_step(g_w, g_b)
            out.update(psi_bce=float(bce.sum() / (2 * B)), disc_acc_fake=float((score[:n] < 0).sum() / B),
                       disc_acc_real=float((score[n:] > 0).sum() / B))
        self.psi.zero_grad()
        self.psi.backward(grad_out, grad_hidden)
        self.comm.sum_inplace(self.psi.grad_buffer)
        out = self._summed(out)
        if self.guard.ok(out["psi_dsm"] + out.get("psi_bce", 0.0), self.psi.grad_buffer, "ψ step"):
            self.opt_psi.step()
        return out

    def _head_step(self, g_w: np.ndarray, g_b: float) -> None:
        grads = self.comm.sum_inplace(np.append(g_w, np.float32(g_b)).astype(np.float32))
        np.clip(grads, -self.config.clip_value, self.config.clip_value, out=grads)
        params = np.concatenate([self.head_w, self.head_b])
        _core.adamw_step(params, grads, self.head_m, self.head_v, self.opt_psi.lr, 0.0, 0.999,
                         1e-8, 0.0, self.opt_psi.step_count + 1)
        self.head_w[:] = params[:-1]
        self.head_b[:] = params[-1:]

    def g_step(self, ids: np.ndarray, mask: np.ndarray, seed: int, adversarial: bool = True) -> Dict[str, float]:
        """L_G = L_SiD + b_G λ_adv BCE(D_ψ(x_t), 1), gradients through G, q_sample, φ and ψ;
        ``adversarial=False`` leaves the BCE term out (SiD-only phase)."""
        c, B = self.config, len(ids)
        mask, x_real, x_in, t_in, t, eps, m3 = self._batch(ids, mask, seed)
        n = len(x_real)
        e_g = np.where(m3, self.G.forward(x_in, t_in), x_real).astype(np.float32)
        x_t = self.diffusion.q_sample(e_g, t, eps, mask)
        y_r = self.phi.forward(x_t, t)
        y_f = self.psi.forward(x_t, t)
        loss, omega, g_yr, g_yf, g_eg = _core.sid_loss(y_r, y_f, e_g, mask, np.float32(self.weights.alpha))
        share = np.float32(n / B)  # sid_loss averages over this rank's rows; their share of the global mean
        g_yr *= share
        g_yf *= share
        g_eg *= share
        out = {"sid": float(loss.sum() / B), "omega": float(omega.sum() / B)}
        grad_hidden = None
        if adversarial and c.adversarial and self.weights.b_g > 0:
            hidden = self.psi.hidden
            bce, g_logit, _ = self._disc(hidden, mask, np.ones(n, np.float32))
            g_logit *= self._adv_scale(mask, B)
            grad_hidden, _, _ = self._disc_backward(g_logit, hidden, mask)
            out["g_bce"] = float(bce.sum() / B)
        gx = self.phi.backward(g_yr, param_grads=False)
        gx += self.psi.backward(g_yf, grad_hidden, param_grads=False)
        g_eg += self.diffusion.q_sample_backward(gx, t, mask)
        g_eg *= m3
        self.G.zero_grad()
        self.G.backward(g_eg)
        self.comm.sum_inplace(self.G.grad_buffer)
        out = self._summed(out)
        if self.guard.ok(out["sid"] + out.get("g_bce", 0.0), self.G.grad_buffer, "G step"):
            self.opt_g.step()
            if self.G_ema is not None:
                self.G_ema.update()
        return out

    def monitor(self, ids: np.ndarray, mask: np.ndarray, seed: int) -> Dict[str, float]:
        """On one batch, with no update: D_ψ's accuracy on real and fake inputs and its AUC,
        and the adversarial share of G's gradient on e_g, ‖∇L_adv‖ / ‖∇L_SiD‖ (SPEC §6.4),
        with this stage's b_G λ_adv. Every rank computes the whole batch."""
        w = self.weights
        mask, x_real, x_in, t_in, t, eps, m3 = self._batch(ids, mask, seed, all_rows=True)
        n = len(x_real)
        e_g = np.where(m3, self.G.forward(x_in, t_in), x_real).astype(np.float32)
        x_t = self.diffusion.q_sample(e_g, t, eps, mask)
        xt_real = self.diffusion.q_sample(x_real, t, eps, mask)
        self.psi.forward(np.concatenate([x_t, xt_real]), np.concatenate([t, t]))
        target = np.concatenate([np.zeros(n, np.float32), np.ones(n, np.float32)])
        _, _, score = self._disc(self.psi.hidden, np.concatenate([mask, mask]), target)
        out = {"disc_acc_fake": float((score[:n] < 0).mean()), "disc_acc_real": float((score[n:] > 0).mean()),
               "disc_auc": auc(score[n:], score[:n])}
        y_r = self.phi.forward(x_t, t)
        y_f = self.psi.forward(x_t, t)
        _, _, g_yr, g_yf, g_sid = _core.sid_loss(y_r, y_f, e_g, mask, np.float32(w.alpha))
        gx = self.phi.backward(g_yr, param_grads=False)
        gx += self.psi.backward(g_yf, param_grads=False)
        g_sid += self.diffusion.q_sample_backward(gx, t, mask)
        g_sid *= m3
        _, g_logit, _ = self._disc(self.psi.hidden, mask, np.ones(n, np.float32))
        g_logit *= self._adv_scale(mask, n)
        grad_hidden, _, _ = self._disc_backward(g_logit, self.psi.hidden, mask)
        gx = self.psi.backward(np.zeros_like(y_f), grad_hidden, param_grads=False)
        g_adv = self.diffusion.q_sample_backward(gx, t, mask) * m3
        sid_norm = float(np.linalg.norm(g_sid))
        if sid_norm > 0:  # 0 while ψ = φ (a stage's start): no share to speak of
            out["adv_share"] = float(np.linalg.norm(g_adv)) / sid_norm
        return out


# ------------------------------------------------------------------- the loop
def _warn_monitors(m: Dict[str, float], c: DistillConfig, say: Callable[[str], None]) -> List[str]:
    notes = []
    if m["empty"] > c.warn_empty:
        notes.append(f"collapse: {m['empty']:.0%} of outputs are empty (all [PAD])")
    if m["repeat"] > c.warn_repeat:
        notes.append(f"loops: {m['repeat']:.0%} of adjacent tokens repeat (adversarial term too weak?)")
    if m.get("self_bleu", 0.0) > c.warn_self_bleu:
        notes.append(f"diversity collapse: self-BLEU across seeds {m['self_bleu']:.3f}")
    for n in notes:
        say(f"WARNING: {n}")
        warnings.warn(n, RuntimeWarning, stacklevel=3)
    return notes


def validate(student: Student, sources: Sequence[str], references: Sequence[str], steps: int,
             seed: int, comm: Optional[LocalComm] = None) -> Dict[str, float]:
    """BLEU and the degeneration monitors of one validation. With a communicator the
    generation is shared out over the ranks; rank 0 scores it and sends every rank the scores."""
    comm = LocalComm() if comm is None else comm
    texts, tok = student.generate(sources, steps=steps, seed=seed, return_ids=True, comm=comm)
    other = student.generate(sources, steps=steps, seed=seed + 1, comm=comm)
    if not comm.is_root:
        return comm.bcast(None)
    _, mask = student.encode_sources(sources)
    targets = [row[m > 0] for row, m in zip(tok, mask)]
    pad = student.tokenizer.pad_id
    targets = [r[r != pad] for r in targets]
    return comm.bcast({"bleu": bleu(texts, references), "empty": empty_rate(texts),
                       "repeat": repeated_token_rate(targets), "len": mean_length(texts),
                       "self_bleu": self_bleu([[a, b] for a, b in zip(texts, other)])})


def _run_stage(teacher: Teacher, data: Seq2SeqData, config: DistillConfig, stage: int, out: Path,
               generator_params: Optional[np.ndarray], progress: bool,
               say: Callable[[str], None], comm: LocalComm) -> Tuple[Student, Dict[str, Any]]:
    from tqdm.auto import tqdm

    tok = teacher.tokenizer
    L = teacher.config.seq_len
    ids, mask = encode_pairs(data.train, tok, L)
    valid_pairs = (data.valid or data.train)[:config.eval_size]
    vids, vmask = encode_pairs(valid_pairs, tok, L)
    sources = [p[0] for p in valid_pairs]
    references = decode_targets(vids, vmask, tok)
    dist = Distiller(teacher, config, stage, generator_params, comm)
    rng = np.random.default_rng(derive_seed(config.seed, stage))
    info = {"t_init": config.t_init, "stage": stage, "distill_config": config.to_dict()}
    step, best = 0, {"bleu": -1.0, "step": 0}
    acc: Dict[str, List[float]] = {}  # the step values the next log record averages
    start = comm.bcast(ckpt.latest_checkpoint(out) if comm.is_root else None)
    if start is not None:
        step, best, acc = _restore(dist, rng, start, config)
        say(f"stage {stage}: resuming from {start} at step {step}")
    log = JsonlLog(out / "log.jsonl", keep_through=step if start is not None else -1) \
        if comm.is_root else NullLog()

    student_model = DiffusionTransformer(teacher.config) if dist.G_ema is not None else dist.G
    monitor_rows = slice(0, min(len(vids), config.batch_size))

    def student_now() -> Student:
        if dist.G_ema is not None:
            np.copyto(student_model.params, dist.G_ema.params)
        return Student(student_model, tok, info)

    def validation(step: int) -> Dict[str, float]:
        m = validate(student_now(), sources, references, config.eval_steps, config.seed, comm)
        if config.adversarial:
            m.update(dist.monitor(vids[monitor_rows], vmask[monitor_rows], derive_seed(config.seed, stage, step, 2)))
        return m

    def save_state() -> None:
        def fill(tmp: Path) -> None:
            ckpt.save_tensors(tmp / "state.safetensors", {
                "G": dist.G.params, "psi": dist.psi.params, "g_m": dist.opt_g.m, "g_v": dist.opt_g.v,
                "psi_m": dist.opt_psi.m, "psi_v": dist.opt_psi.v, "head_w": dist.head_w,
                "head_b": dist.head_b, "head_m": dist.head_m, "head_v": dist.head_v,
                **({"G_ema": dist.G_ema.params} if dist.G_ema is not None else {})})
            (tmp / "run.json").write_text(json.dumps({
                "config": config.to_dict(), "step": step, "stage": stage, "best": best,
                "g_step": dist.opt_g.step_count, "psi_step": dist.opt_psi.step_count,
                "rng": rng.bit_generator.state, "guard": dist.guard.state_dict(), "log_acc": acc},
                indent=2))

        comm.check_identical(dist.G.params, "generator weights")
        comm.check_identical(dist.psi.params, "fake-score (ψ) weights")
        comm.check_identical(np.append(dist.head_w, dist.head_b), "discriminator head weights")
        if comm.is_root:
            ckpt.save_run_checkpoint(out, step, fill, keep=1)

    def save_best() -> None:
        if comm.is_root:
            student_now().save(out / "best")

    steps = config.stage_steps(stage)
    bar = tqdm(total=steps, initial=step, disable=not progress, desc=f"stage {stage}",
               unit="step", dynamic_ncols=True)
    emit = bar.write if progress else say  # above the bar when there is one
    governor = ThreadGovernor() if config.adaptive_threads else None
    try:
        if step == 0:  # the generator as initialised: the teacher in one step, or stage 1's best
            m = validation(0)
            log.write(step=0, stage=stage, **{f"val_{k}": v for k, v in m.items()})
            emit(f"stage {stage} step 0: BLEU {m['bleu']:.4f} (generator as initialised, "
                      f"{config.eval_steps} step)")
            best = {"bleu": m["bleu"], "step": 0}
            save_best()
        t0, comm_s0 = time.perf_counter(), comm.seconds
        last_val: Dict[str, float] = {}
        while step < steps:
            wall_before = time.perf_counter()
            idx = rng.integers(0, len(ids), size=config.batch_size)
            s_psi = dist.psi_step(ids[idx], mask[idx], derive_seed(config.seed, stage, step, 0))
            idx = rng.integers(0, len(ids), size=config.batch_size)
            s_g = {}
            if step >= config.psi_warmup:  # G waits while ψ warms up
                s_g = dist.g_step(ids[idx], mask[idx], derive_seed(config.seed, stage, step, 1),
                                  adversarial=step >= config.adv_start)
            for k, v in {**s_psi, **s_g}.items():
                acc.setdefault(k, []).append(v)
            step += 1
            if governor:
                governor.step(time.perf_counter() - wall_before)
            bar.update(1)
            if step % config.log_every == 0:
                means = {k: float(np.mean(v)) for k, v in acc.items()}
                acc = {}
                dt = time.perf_counter() - t0
                if comm.size > 1:
                    means["comm_s_per_step"] = (comm.seconds - comm_s0) / config.log_every
                t0, comm_s0 = time.perf_counter(), comm.seconds
                postfix = dict(sid=f"{means.get('sid', 0):.3g}", dsm=f"{means.get('psi_dsm', 0):.3g}")
                if "disc_acc_real" in means:
                    postfix.update(D_real=f"{means['disc_acc_real']:.2f}", D_fake=f"{means['disc_acc_fake']:.2f}")
                if "disc_auc" in last_val:
                    postfix["D_auc"] = f"{last_val['disc_auc']:.2f}"
                bar.set_postfix(**postfix)
                log.write(step=step, stage=stage, steps_per_s=config.log_every / dt,
                          skipped_steps=dist.guard.skipped, threads=get_num_threads(), **means)
            if step % config.eval_every == 0 or step == steps:
                m = last_val = validation(step)
                notes = _warn_monitors(m, config, emit) if comm.is_root else []
                log.write(step=step, stage=stage, warnings=notes, **{f"val_{k}": v for k, v in m.items()})
                improved = m["bleu"] > best["bleu"]
                d_part = (f" D acc {m['disc_acc_real']:.2f}/{m['disc_acc_fake']:.2f} AUC {m['disc_auc']:.2f}"
                          if "disc_auc" in m else "")
                d_part += f" adv share {m['adv_share']:.3g}" if "adv_share" in m else ""
                emit(f"stage {stage} step {step}: BLEU {m['bleu']:.4f} empty {m['empty']:.3f} "
                          f"repeat {m['repeat']:.3f} len {m['len']:.1f} self-BLEU {m['self_bleu']:.3f}"
                          + d_part + (" (best)" if improved else ""))
                if improved:
                    best = {"bleu": m["bleu"], "step": step}
                    save_best()
            if step % config.save_every == 0 or step == steps:
                save_state()
    finally:
        if governor:
            governor.close()
        bar.close()
        log.close()
    if comm.is_root and not (out / "best").exists():
        save_best()
    comm.barrier()  # rank 0 has written best/: every rank continues from it
    dist = None  # free the three networks and their optimisers before loading the best student
    return Student.load(out / "best"), best




def _restore(dist: Distiller, rng: np.random.Generator, path: Path, config: DistillConfig):
    run = ckpt.read_run_json(path, {"config": dict, "step": int, "g_step": int, "psi_step": int,
                                    "rng": dict, "best": dict})
    if DistillConfig.from_dict(run["config"]).run_fields() != config.run_fields():
        raise ValueError(f"{path} belongs to a run with a different config")
    best = run["best"]
    if not (isinstance(best.get("bleu"), (int, float)) and isinstance(best.get("step"), int)):
        raise ValueError(f"{path / 'run.json'}: 'best' must hold a bleu and a step, got {best!r}")
    st = ckpt.load_tensors(path / "state.safetensors")
    n = (dist.G.params.size,)
    H = dist.head_w.size
    expected = {"G": n, "psi": n, "g_m": n, "g_v": n, "psi_m": n, "psi_v": n,
                "head_w": (H,), "head_b": (1,), "head_m": (H + 1,), "head_v": (H + 1,)}
    if dist.G_ema is not None:
        expected["G_ema"] = n
    ckpt.check_tensors(st, expected, str(path))
    for name, dst in (("G", dist.G.params), ("psi", dist.psi.params), ("g_m", dist.opt_g.m),
                      ("g_v", dist.opt_g.v), ("psi_m", dist.opt_psi.m), ("psi_v", dist.opt_psi.v),
                      ("head_w", dist.head_w), ("head_b", dist.head_b), ("head_m", dist.head_m),
                      ("head_v", dist.head_v)):
        np.copyto(dst, st[name])
    if dist.G_ema is not None:
        np.copyto(dist.G_ema.params, st["G_ema"])
    dist.opt_g.step_count, dist.opt_psi.step_count = run["g_step"], run["psi_step"]
    ckpt.restore_rng(rng, run["rng"], str(path / "run.json"))
    # both absent from checkpoints of older versions
    if "guard" in run:
        dist.guard.load_state_dict(run["guard"])
    acc = run.get("log_acc", {})
    if not (isinstance(acc, dict) and all(isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)
                                          for v in acc.values())):
        raise ValueError(f"{path / 'run.json'}: 'log_acc' must map names to lists of numbers")
    return run["step"], best, acc


def distill(teacher_dir: PathLike, data: Union[Seq2SeqData, PathLike], config: DistillConfig,
            out_dir: PathLike, stage: Union[int, str] = "all", from_dir: Optional[PathLike] = None,
            progress: bool = True, print_fn: Callable[[str], None] = print,
            comm: Optional[LocalComm] = None) -> Student:
    """Distil the teacher in ``teacher_dir`` into a one-step student.

    ``stage="all"`` (or ``"both"``) runs stages 1 to ``config.stages``: each stage after
    the first re-initialises ψ from φ and continues G from the previous stage's best
    checkpoint. ``stage=n`` runs stage n alone (for n >= 2, G comes from ``from_dir``: a
    run folder holding stage n-1, or a student folder). Each stage writes
    ``out_dir/stageN/{log.jsonl,best,checkpoints}``; the final student is ``out_dir/student``.

    ``comm`` (default :func:`dlmone.distributed.world`: MPI ranks under mpirun) shares
    every batch out over the ranks as in :func:`dlmone.teacher.train_teacher`; rank 0
    alone writes ``out_dir``, which every rank must see.
    """
    comm = world() if comm is None else comm
    comm.rows(config.batch_size)  # every rank takes an equal share of each batch
    if not comm.is_root:
        progress, print_fn = False, discard
    out_dir = Path(out_dir)
    stages = _stages(stage, config.stages)
    teacher = Teacher.load(teacher_dir)
    if not isinstance(data, Seq2SeqData):
        data = Seq2SeqData.from_dir(data, splits=("train", "valid"))
    if not data.train:
        raise ValueError("no training pairs")
    comm.check_same({**config.to_dict(), "stage": str(stage), "training pairs": len(data.train)})
    # validation generates with Student.generate's default batches of 256
    check_memory(estimate_memory(teacher.config, config.batch_size, "distill", eval_batch=min(config.eval_size, 256),
                                 adversarial=config.adversarial, g_ema=config.g_ema > 0),
                 config.max_memory, "distill")
    generator: Optional[np.ndarray] = None
    if stages[0] > 1:
        if from_dir is None:
            raise ValueError(f"stage {stages[0]} alone needs from_dir: a run folder holding stage "
                             f"{stages[0] - 1}, or a student folder")
        src = Path(from_dir)
        prev = src / f"stage{stages[0] - 1}" / "best"
        generator = Student.load(prev if prev.exists() else src).model.params.copy()
    student = None
    summary: Dict[str, Any] = {}
    for n in stages:
        student, best = _run_stage(teacher, data, config, n, out_dir / f"stage{n}", generator,
                                   progress, print_fn, comm)
        summary[f"stage{n}"] = best
        generator = student.model.params.copy()
    assert student is not None
    student.info["stages"] = summary
    if comm.is_root:
        student.save(out_dir / "student")
        ckpt.atomic_write_json(out_dir / "summary.json", summary)
    return student


def _stages(stage: Union[int, str], n_stages: int) -> Tuple[int, ...]:
    """The stage numbers ``distill(stage=...)`` runs."""
    if stage in ("all", "both"):
        return tuple(range(1, n_stages + 1))
    numbers = [str(n) for n in range(1, n_stages + 1)]
    if isinstance(stage, bool) or str(stage) not in numbers:
        raise ValueError(f"stage must be 'all' or a stage number in 1..{n_stages} (config.stages), got {stage!r}")
    return (int(stage),)
