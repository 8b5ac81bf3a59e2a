"""Target 4: generation against PyTorch doing the same, same weights, batch, threads.

One-step generation (the student, SPEC §6.6), sequences/s: embed the source tokens,
x_init = where(mask, sqrt(1 - abar_t_init)·z, Emb(src)), one network forward at
t_init, re-anchor the source positions, tokens = argmax of the tied logits. dlmone:
model.embed + dlmone.sample.student_sample(steps=1) + dlmone.diffusion.decode_tokens
(argmax without materialising the logits). The goal compares it with PyTorch's bare
forward on the same batch under no_grad (the issue's wording; stricter than the
whole generation); a row for information compares it with the same generation in
torch (the ops above under no_grad, logits through the reference's lm_head, argmax).

Teacher sampler (SPEC §5, ancestral with clamping), sampler steps/s: dlmone's
dlmone.sample.teacher_sample itself, given a Diffusion of n steps, so that it runs n
ancestral steps (each: one forward, clamping of x0 to the nearest word embedding on
the target positions, the posterior step with fresh noise, re-anchoring); the work
per step is that of the 2000-step sampler, only the schedule's constants differ.
torch: the same loop (clamping as argmax of x0·Wᵀ - ½|W|², the norms computed once);
before timing, both run once from the same noise and their outputs are compared.
Full 2000-step sequences/s = batch x steps/s / 2000.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import common  # noqa: E402
from common import Context, Row, log  # noqa: E402

SECTION_ONE_STEP = "generate"
SECTION_SAMPLER = "sampler"
TITLE = "4. Generation vs PyTorch: student one-step generation and the teacher's clamped sampler"
ONE_STEP_TARGET = 2.0
SAMPLER_TARGET = 2.0
T_INIT = 1490  # DistillConfig's default

ONE_STEP_PLANS = {
    "full": [dict(preset="diffuseq_base", batch=16, seq_len=128, reps=5, warmup=1, min_block=0.0)],
    "quick": [dict(preset="tiny", batch=16, seq_len=32, reps=2, warmup=1, min_block=0.0)],
}
SAMPLER_PLANS = {
    "full": [dict(preset="tiny", batch=64, seq_len=32, steps=20, reps=7, warmup=1, min_block=0.0),
             dict(preset="small", batch=64, seq_len=32, steps=20, reps=5, warmup=1, min_block=0.0),
             dict(preset="diffuseq_base", batch=8, seq_len=128, steps=2, reps=3, warmup=1, min_block=0.0)],
    "quick": [dict(preset="tiny", batch=8, seq_len=32, steps=3, reps=2, warmup=1, min_block=0.0)],
}


def _inputs(cfg, batch: int, seed: int):
    """Random token ids and a DiffuSeq mask (first half source, second half target)."""
    rng = np.random.default_rng(seed + 3)
    L = cfg.seq_len
    ids = rng.integers(0, cfg.vocab_size, size=(batch, L)).astype(np.int64)
    mask = np.zeros((batch, L), np.float32)
    mask[:, L // 2:] = 1.0
    return ids, mask


def amx_bf16() -> bool:
    import dlmone

    return bool(dlmone.build_info().get("amx_bf16"))


def in_bf16(model, fn):
    """fn run with the model's inference in bf16 (AMX), float32 again afterwards."""
    def run():
        model.inference_precision = "bf16"
        try:
            return fn()
        finally:
            model.inference_precision = "float32"
    return run


# ------------------------------------------------------------------ one step


def one_step(ctx: Context, plan: Dict[str, Any]) -> List[Row]:
    import torch

    from dlmone.diffusion import Diffusion, decode_tokens
    from dlmone.sample import student_sample

    plan = ctx.plan(plan)
    preset, B = plan["preset"], plan["batch"]
    cfg, model, ref = common.model_pair(preset, plan["seq_len"], seed=ctx.seed)
    ref.eval()
    diffusion = Diffusion(cfg.diffusion_steps)
    ids, mask = _inputs(cfg, B, ctx.seed)
    ids_t, m3 = torch.from_numpy(ids), torch.from_numpy(mask > 0)[:, :, None]
    s_init = float(np.float32(diffusion.sqrt_one_minus_alphas_cumprod[T_INIT]))
    t_scaled = torch.full((B,), float(model.scale_timesteps(np.array([T_INIT]), 1)[0]))
    seed = [ctx.seed]

    def dl_generate() -> np.ndarray:
        seed[0] += 1
        x_src = model.embed(ids)
        D = student_sample(model, diffusion, x_src, mask, T_INIT, steps=1, seed=seed[0])
        return decode_tokens(model, D)

    def th_generate():
        with torch.no_grad():
            x_src = ref.get_embeds(ids_t)
            x = torch.where(m3, s_init * torch.randn_like(x_src), x_src)
            D = torch.where(m3, ref(x, t_scaled), x_src)
            return ref.get_logits(D).argmax(-1)

    x_fixed = torch.where(m3, s_init * torch.randn(B, plan["seq_len"], cfg.emb_dim), ref.get_embeds(ids_t))

    def th_forward():
        with torch.no_grad():
            return ref(x_fixed, t_scaled)

    log(f"one-step generation {preset}: batch {B}x{plan['seq_len']}")
    sides = {"dlmone": dl_generate, "torch forward": th_forward, "torch": th_generate}
    if amx_bf16():
        sides["dlmone bf16"] = in_bf16(model, dl_generate)
    tm = common.interleaved(sides, reps=plan["reps"], warmup=plan["warmup"], min_block_s=plan["min_block"])
    name = f"{preset} one-step generation, batch {B}x{plan['seq_len']}"
    details = {"plan": plan, "t_init": T_INIT, "parameters": model.num_parameters(),
               "timings": {k: v.to_dict() for k, v in tm.items()}}
    rows = [Row(SECTION_ONE_STEP, f"{name}, vs torch forward", "seq/s", B / tm["dlmone"].median,
                B / tm["torch forward"].median, ONE_STEP_TARGET, details=details, b_label="torch forward"),
            Row(SECTION_ONE_STEP, f"{name}, vs the same generation in torch", "seq/s",
                B / tm["dlmone"].median, B / tm["torch"].median, b_label="torch generation")]
    if "dlmone bf16" in tm:
        rows.append(Row(SECTION_ONE_STEP, f"{name}, bf16 (AMX) vs torch float32 forward", "seq/s",
                        B / tm["dlmone bf16"].median, B / tm["torch forward"].median, ONE_STEP_TARGET,
                        b_label="torch forward"))
    return rows


# ------------------------------------------------------------- teacher sampler


def torch_ancestral(ref, diffusion, x_src, m3, t_scale: float, eps_like):
    """n ancestral steps with clamping in torch (n = diffusion.T); mirrors
    dlmone.sample.teacher_sample(method="ancestral", clamp=True)."""
    import torch

    W = ref.word_embedding.weight
    offsets = -0.5 * (W * W).sum(1)
    B, L, E = x_src.shape
    x = torch.where(m3, eps_like(), x_src)
    for t in range(diffusion.T - 1, -1, -1):
        x0 = ref(x, torch.full((B,), t * t_scale))
        tok = torch.addmm(offsets, x0.reshape(-1, E), W.t()).argmax(-1).view(B, L)
        x0 = torch.where(m3, W[tok], x0)
        x = float(diffusion.posterior_coef_x0[t]) * x0 + float(diffusion.posterior_coef_xt[t]) * x
        if t > 0:
            x = x + float(np.sqrt(diffusion.fixedlarge_variance[t])) * eps_like()
        x = torch.where(m3, x, x_src)
    return x


def sampler_noise(shape, seed: int, steps: int):
    """The noise teacher_sample draws for a seed, in order: x_T's from derive_seed(seed, 0),
    then step i's from derive_seed(seed, 1, i). Written from the public helpers; should
    the sampler draw differently, the check below reports disagreement (it does not fail)."""
    from dlmone.diffusion import derive_seed, gaussian

    yield gaussian(shape, derive_seed(seed, 0))
    for i in range(steps):
        yield gaussian(shape, derive_seed(seed, 1, i))


def check_same_sampler(model, ref, diffusion, x_src, mask, t_scale: float, seed: int) -> Dict[str, Any]:
    """Both samplers from the same noise: the fraction of output entries that agree
    (clamping is an argmax: a near tie can flip one position's token)."""
    import torch

    from dlmone.sample import teacher_sample

    noise = sampler_noise(x_src.shape, seed, diffusion.T)
    with torch.no_grad():
        th = torch_ancestral(ref, diffusion, torch.from_numpy(x_src), torch.from_numpy(mask > 0)[:, :, None],
                             t_scale, lambda: torch.from_numpy(next(noise))).numpy()
    dl = teacher_sample(model, diffusion, x_src, mask, method="ancestral", clamp=True, seed=seed)
    return {"agreeing_fraction": float(np.mean(np.isclose(dl, th, rtol=1e-4, atol=1e-4))),
            "max_abs_diff": float(np.max(np.abs(dl - th)))}


def sampler(ctx: Context, plan: Dict[str, Any]) -> List[Row]:
    import torch

    from dlmone.diffusion import Diffusion
    from dlmone.sample import teacher_sample

    plan = ctx.plan(plan)
    preset, B, n = plan["preset"], plan["batch"], plan["steps"]
    cfg, model, ref = common.model_pair(preset, plan["seq_len"], seed=ctx.seed)
    ref.eval()
    diffusion = Diffusion(n)  # n ancestral steps of the real sampler code (module doc)
    ids, mask = _inputs(cfg, B, ctx.seed)
    x_src = model.embed(ids)
    x_src_t, m3 = torch.from_numpy(x_src), torch.from_numpy(mask > 0)[:, :, None]
    t_scale = float(np.float32(1000.0 / cfg.diffusion_steps))
    check = check_same_sampler(model, ref, diffusion, x_src, mask, t_scale, ctx.seed + 10)
    if check["agreeing_fraction"] < 0.99:
        log(f"WARNING sampler {preset}: dlmone and torch samplers disagree: {check}")
    seed = [ctx.seed]

    def dl_sample() -> np.ndarray:
        seed[0] += 1
        return teacher_sample(model, diffusion, x_src, mask, method="ancestral", clamp=True, seed=seed[0])

    def th_sample():
        with torch.no_grad():
            return torch_ancestral(ref, diffusion, x_src_t, m3, t_scale, lambda: torch.randn_like(x_src_t))

    log(f"teacher sampler {preset}: {n} ancestral steps with clamping, batch {B}x{plan['seq_len']}")
    sides = {"dlmone": dl_sample, "torch": th_sample}
    if amx_bf16():
        sides["dlmone bf16"] = in_bf16(model, dl_sample)
    tm = common.interleaved(sides, reps=plan["reps"], warmup=plan["warmup"], min_block_s=plan["min_block"])
    rate = {k: n / v.median for k, v in tm.items()}
    T = cfg.diffusion_steps
    name = f"{preset} ancestral+clamp sampler, {n} steps, batch {B}x{plan['seq_len']}"
    rows = [Row(SECTION_SAMPLER, name, "steps/s", rate["dlmone"], rate["torch"], SAMPLER_TARGET,
                details={"plan": plan, "parameters": model.num_parameters(), "same_noise_check": check,
                         f"projected_{T}_step_seq_per_s": {k: B * r / T for k, r in rate.items()},
                         "timings": {k: v.to_dict() for k, v in tm.items()}})]
    if "dlmone bf16" in rate:
        rows.append(Row(SECTION_SAMPLER, f"{name}, bf16 (AMX) vs torch float32", "steps/s",
                        rate["dlmone bf16"], rate["torch"], SAMPLER_TARGET))
    return rows


def run_one_step(ctx: Context) -> List[Row]:
    return ctx.rows_for(ONE_STEP_PLANS, one_step)


def run_sampler(ctx: Context) -> List[Row]:
    return ctx.rows_for(SAMPLER_PLANS, sampler)
