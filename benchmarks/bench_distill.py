"""Target 3: one distillation step of dlmone.distill.Distiller (a ψ step then a G step,
SPEC §6.3-§6.4) against the same step written in PyTorch on the reference network
(tests/reference.py).

Both sides: teacher φ frozen; generator G and fake score ψ initialised from φ (the
same weights on both sides); word embedding and lm_head.bias frozen; every network
run in eval mode (the Distiller never enables dropout); the default token-pooled
discriminator (SPEC §6.3); stage-1 loss weights; Adam with β = (0, 0.999), clipping by value, a skipped
update on a non-finite loss or gradient (dlmone's NonFiniteGuard; torch: the total
gradient norm checked); DistillConfig's defaults (batch 64, t_init 1490, t in
[0, 1976]). Noise: dlmone's counter-based generator vs torch.randn/randint.

Before timing, a few dlmone steps move G and ψ away from φ (at φ = G = ψ the SiD
loss and its gradient vanish), the PyTorch networks take their weights, and one ψ
step and one G step run on both sides with learning rates 0 and dlmone's noise fed
to the PyTorch step: their losses and the G gradient norm are compared, a check that
the two implementations compute the same thing.
"""
from __future__ import annotations

import os
import sys
import types
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import common  # noqa: E402
from common import BENCH_BATCH, Context, Row, log  # noqa: E402

SECTION = "distill"
TITLE = "3. Distillation step (psi step + G step, SPEC 6.3-6.4) vs the same step in PyTorch"
TARGET = 1.5

PLANS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(reps=10, warmup=2, min_block=0.2),
    "small": dict(reps=7, warmup=1, min_block=0.2),
}
QUICK = dict(reps=1, warmup=1, min_block=0.0, batch=16)
PRESETS = {"full": ("tiny", "small"), "quick": ("tiny",)}
CHECK_RTOL = 1e-3
CHECK_AFTER_STEPS = 1


class TorchDistiller:
    """Distiller.psi_step / Distiller.g_step in PyTorch, on copies of a dlmone
    Distiller's three networks."""

    def __init__(self, dist, adam_kind: str = "default") -> None:
        import torch
        from dlmone.distill import FROZEN

        c = dist.config
        if c.disc_head != "token":
            raise ValueError("the PyTorch step implements the default 'token' discriminator only")
        self.torch = torch
        self.config, self.weights = c, dist.weights
        self.E = dist.phi.config.emb_dim
        self.phi, self.G, self.psi = (common.torch_reference_from(m).eval()
                                      for m in (dist.phi, dist.G, dist.psi))
        for p in self.phi.parameters():
            p.requires_grad_(False)
        self.g_params = self._trainable(self.G, FROZEN)
        self.psi_params = self._trainable(self.psi, FROZEN)
        kw: Dict[str, Any] = {"foreach": True} if adam_kind == "foreach" else \
            {"fused": True} if adam_kind == "fused" else {}
        self.opt_g = torch.optim.Adam(self.g_params, lr=c.lr_g, betas=(0.0, 0.999), eps=1e-8, **kw)
        self.opt_psi = torch.optim.Adam(self.psi_params, lr=c.lr_psi, betas=(0.0, 0.999), eps=1e-8, **kw)
        d = dist.diffusion
        self.sqrt_ab = torch.tensor(d.sqrt_alphas_cumprod, dtype=torch.float32)
        self.sqrt_1mab = torch.tensor(d.sqrt_one_minus_alphas_cumprod, dtype=torch.float32)
        self.s_init = float(np.float32(d.sqrt_one_minus_alphas_cumprod[c.t_init]))
        self.t_scale = float(np.float32(1000.0 / d.T))

    @staticmethod
    def _trainable(net, frozen) -> List[Any]:
        params = []
        for name, p in net.named_parameters():  # the tied lm_head.weight appears once
            p.requires_grad_(name not in frozen)
            if name not in frozen:
                params.append(p)
        return params

    # -- pieces --------------------------------------------------------------------
    def _ts(self, t):
        return t.to(self.torch.float32) * self.t_scale

    def _batch(self, ids, mask, given: Optional[Tuple[Any, Any, Any]]):
        torch = self.torch
        B = ids.shape[0]
        with torch.no_grad():
            x_real = self.phi.word_embedding(ids)
        m3 = (mask > 0)[:, :, None]
        if given is not None:
            x_init, t, eps = given
        else:
            x_init = torch.where(m3, self.s_init * torch.randn_like(x_real), x_real)
            t = torch.randint(self.config.t_min, self.config.t_max + 1, (B,))
            eps = torch.randn_like(x_real)
        return x_real, x_init, t, eps, m3

    def _q_sample(self, x0, t, eps, m3):
        a, s = self.sqrt_ab[t][:, None, None], self.sqrt_1mab[t][:, None, None]
        return self.torch.where(m3, a * x0 + s * eps, x0)

    @staticmethod
    def _disc(hidden, mask):
        """D: H logits per example, the hidden state averaged over target positions."""
        return (hidden * mask[:, :, None]).sum(1) / mask.sum(1)[:, None]

    def _bce(self, logit, target):
        """Per example: the mean BCE over its H logits."""
        F = self.torch.nn.functional
        full = target[:, None].expand_as(logit)
        return F.binary_cross_entropy_with_logits(logit.clamp(-10.0, 10.0), full, reduction="none").mean(1)

    def _update(self, loss, params, opt) -> None:
        torch = self.torch
        grads = [p.grad for p in params if p.grad is not None]
        if bool(torch.isfinite(loss + torch.nn.utils.get_total_norm(grads))):
            torch.nn.utils.clip_grad_value_(params, self.config.clip_value)
            opt.step()

    # -- the two steps -------------------------------------------------------------
    def psi_step(self, ids, mask, given=None) -> Dict[str, float]:
        torch, c, w = self.torch, self.config, self.weights
        B = ids.shape[0]
        x_real, x_init, t, eps, m3 = self._batch(ids, mask, given)
        with torch.no_grad():
            e_g = torch.where(m3, self.G(x_init, self._ts(torch.full((B,), c.t_init))), x_real)
        xt_fake = self._q_sample(e_g, t, eps, m3)
        adv = c.adversarial and w.b_psi > 0
        if adv:
            xt_real = self._q_sample(x_real, t, eps, m3)
            pred = self.psi(torch.cat([xt_fake, xt_real]), self._ts(torch.cat([t, t])))
        else:
            pred = self.psi(xt_fake, self._ts(t))
        dsm = (((pred[:B] - e_g) ** 2).sum(-1) * mask).sum() / mask.sum()
        loss, out = dsm, {"psi_dsm": dsm}
        if adv:
            logit = self._disc(self.psi.last_hidden, torch.cat([mask, mask]))
            bce = self._bce(logit, torch.cat([torch.zeros(B), torch.ones(B)]))
            loss = loss + w.b_psi * c.disc_weight * self.E * 0.5 * (bce[:B].mean() + bce[B:].mean())
            out["psi_bce"] = bce.mean()
        self.opt_psi.zero_grad()
        loss.backward()
        self._update(loss, self.psi_params, self.opt_psi)
        return {k: float(v.detach()) for k, v in out.items()}

    def g_step(self, ids, mask, given=None) -> Dict[str, float]:
        torch, c, w = self.torch, self.config, self.weights
        B = ids.shape[0]
        for p in self.psi_params:  # ψ is frozen in the G step: gradients flow through it only
            p.requires_grad_(False)
        try:
            x_real, x_init, t, eps, m3 = self._batch(ids, mask, given)
            e_g = torch.where(m3, self.G(x_init, self._ts(torch.full((B,), c.t_init))), x_real)
            x_t = self._q_sample(e_g, t, eps, m3)
            ts = self._ts(t)
            y_r = self.phi(x_t, ts)
            y_f = self.psi(x_t, ts)
            mf = m3.to(torch.float32)
            n_entries = mask.sum(1) * self.E
            omega = (((e_g - y_r).abs() * mf).sum((1, 2)) / n_entries).clamp_min(1e-5).detach()
            d = y_r - y_f
            sid = ((d * ((y_r - e_g) - w.alpha * d)) * mf).sum((1, 2)) / omega
            loss, out = sid.mean(), {"sid": sid.mean()}
            if c.adversarial and w.b_g > 0:
                bce = self._bce(self._disc(self.psi.last_hidden, mask), torch.ones(B))
                loss = loss + (w.b_g * c.adv_weight * n_entries * bce).mean()
                out["g_bce"] = bce.mean()
            self.opt_g.zero_grad()
            loss.backward()
            self._update(loss, self.g_params, self.opt_g)
        finally:
            for p in self.psi_params:
                p.requires_grad_(True)
        return {k: float(v.detach()) for k, v in out.items()}

    def g_grad_norm(self) -> float:
        return float(self.torch.nn.utils.get_total_norm([p.grad for p in self.g_params if p.grad is not None]))


def make_pair(preset: str, batch: int, seq_len: int, seed: int, adam_kind: str):
    """(dlmone Distiller, TorchDistiller, ids, mask) at a preset's size; the mask keeps
    the first half of every sequence as the source."""
    import dlmone
    from dlmone.diffusion import Diffusion
    from dlmone.distill import DistillConfig, Distiller

    cfg = dlmone.ModelConfig.preset(preset, seq_len=seq_len)
    phi = dlmone.DiffusionTransformer(cfg, seed=seed)
    teacher = types.SimpleNamespace(model=phi, diffusion=Diffusion(cfg.diffusion_steps))
    dist = Distiller(teacher, DistillConfig(batch_size=batch, seed=seed), stage=1)
    tdist = TorchDistiller(dist, adam_kind)
    rng = np.random.default_rng(seed + 2)
    ids = rng.integers(0, cfg.vocab_size, size=(batch, seq_len)).astype(np.int64)
    mask = np.zeros((batch, seq_len), np.float32)
    mask[:, seq_len // 2:] = 1.0
    return dist, tdist, ids, mask


def distiller_noise(dist, ids: np.ndarray, mask: np.ndarray, seed: int):
    """(x_init, t, eps) as Distiller draws them for a step seed: z, t and ε from the
    streams derive_seed(seed, 0 / 1 / 2). Written from the public helpers rather than
    Distiller's private _batch; should the Distiller draw differently, the check below
    reports differing losses (it does not fail)."""
    from dlmone.diffusion import derive_seed, gaussian

    c = dist.config
    x_real = dist.phi.embed(ids)
    z = gaussian(x_real.shape, derive_seed(seed, 0))
    s_init = np.float32(dist.diffusion.sqrt_one_minus_alphas_cumprod[c.t_init])
    x_init = np.where(mask[:, :, None] > 0, s_init * z, x_real).astype(np.float32)
    t = np.random.default_rng(derive_seed(seed, 1)).integers(c.t_min, c.t_max + 1, size=len(ids))
    eps = gaussian(x_real.shape, derive_seed(seed, 2))
    return x_init, t.astype(np.int64), eps


def check_same_step(dist, tdist, ids, mask, seed: int) -> Dict[str, Any]:
    """Torch's G and ψ take dlmone's current weights; then one ψ step and one G step on
    both sides, learning rates 0, dlmone's noise given to torch; relative differences
    of the losses and of the G gradient norm (after clipping)."""
    from reference import load_numpy_state

    torch = tdist.torch
    load_numpy_state(tdist.G, dist.G.state_dict())
    load_numpy_state(tdist.psi, dist.psi.state_dict())
    lrs = (dist.opt_g.lr, dist.opt_psi.lr)
    dist.opt_g.lr = dist.opt_psi.lr = 0.0
    for opt in (tdist.opt_g, tdist.opt_psi):
        for group in opt.param_groups:
            group["lr"] = 0.0
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)

    def noise(s: int):
        return tuple(torch.from_numpy(a) for a in distiller_noise(dist, ids, mask, s))

    dl = {**dist.psi_step(ids, mask, seed), **dist.g_step(ids, mask, seed + 1)}
    th = {**tdist.psi_step(ids_t, mask_t, noise(seed)), **tdist.g_step(ids_t, mask_t, noise(seed + 1))}
    dl["g_grad_norm"] = float(np.linalg.norm(dist.G.grad_buffer.astype(np.float64)))
    th["g_grad_norm"] = tdist.g_grad_norm()
    dist.opt_g.lr, dist.opt_psi.lr = lrs
    tdist.opt_g.param_groups[0]["lr"], tdist.opt_psi.param_groups[0]["lr"] = lrs
    rel = {k: abs(dl[k] - th[k]) / max(abs(th[k]), 1e-12) for k in th if k in dl}
    return {"dlmone": dl, "torch": th, "rel_diff": rel, "max_rel_diff": max(rel.values()),
            "compared": sorted(rel)}


def bench_preset(ctx: Context, preset: str) -> List[Row]:
    import torch

    plan = ctx.plan({**BENCH_BATCH[preset], **PLANS[preset]}, QUICK)
    B, L = plan["batch"], plan["seq_len"]
    torch.manual_seed(ctx.seed)
    dist, tdist, ids, mask = make_pair(preset, B, L, ctx.seed, ctx.torch_adamw)
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    seed = [ctx.seed + 100]

    def dl_step() -> None:
        seed[0] += 2
        dist.psi_step(ids, mask, seed[0])
        dist.g_step(ids, mask, seed[0] + 1)

    for _ in range(CHECK_AFTER_STEPS):
        dl_step()
    check = check_same_step(dist, tdist, ids, mask, seed=ctx.seed + 10)
    if check["max_rel_diff"] <= CHECK_RTOL:
        log(f"distill {preset}: the two steps agree (losses and G gradient norm within "
            f"{check['max_rel_diff']:.1e} relative)")
    else:
        log(f"WARNING distill {preset}: dlmone and torch steps differ: {check['rel_diff']}")

    def th_step() -> None:
        tdist.psi_step(ids_t, mask_t)
        tdist.g_step(ids_t, mask_t)

    log(f"distill step {preset}: batch {B}x{L}")
    tm = common.interleaved({"dlmone": dl_step, "torch": th_step}, reps=plan["reps"],
                            warmup=plan["warmup"], min_block_s=plan["min_block"])
    return [Row(SECTION, f"{preset} psi+G step, batch {B}x{L}", "steps/s", 1.0 / tm["dlmone"].median,
                1.0 / tm["torch"].median, TARGET,
                details={"batch": B, "seq_len": L, "parameters_per_network": dist.phi.num_parameters(),
                         "same_step_check": check, "torch_adam": ctx.torch_adamw,
                         "timings": {k: v.to_dict() for k, v in tm.items()}})]


def run(ctx: Context) -> List[Row]:
    return ctx.rows_for(PRESETS, bench_preset)
