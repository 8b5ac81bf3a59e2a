"""Targets 2 and 5: the training step (forward + backward + AdamW) against PyTorch,
its model-FLOP utilisation, and its scaling from 1 thread to all of them.

Training step (common.train_step): dlmone zero_grad + forward(train) + backward(gy) +
AdamW against torch zero_grad + forward + (y·gy).sum().backward() + AdamW (torch's
default AdamW unless --torch-adamw), same weights, same batch x, t, gy, same threads,
dropout 0 on both sides (the small and diffuseq_base presets default to 0.1), timed
alternately; medians.

Model FLOP utilisation (MFU) = model FLOPs per step / dlmone's median step time /
sgemm peak, where model FLOPs = 6 x P_mm x tokens + 12 x N x B x L² x H
(common.train_step_flops; P_mm = weights applied to every token, common.matmul_params)
and the peak is numpy's best sgemm GFLOP/s on a big square product at the same
threads (bench_matmul.sgemm_peak).

Thread scaling: dlmone's training step at 1 thread and at --threads (OpenMP via
dlmone.set_num_threads), alternated; goal 0.9 x threads (1.8x from 1 to 2 cores).
"""
from __future__ import annotations

import gc
import os
import sys
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import common  # noqa: E402
from common import BENCH_BATCH, Context, Row, log  # noqa: E402

SECTION_TRAIN = "train"
SECTION_SCALING = "scaling"
TITLE = "2. Training step (forward + backward + AdamW) vs PyTorch, and model FLOP utilisation"
SCALING_TITLE = "5. Thread scaling of dlmone's training step"
TARGETS = {"tiny": 2.0, "small": 1.5, "diffuseq_base": 1.1}
MFU_TARGET = 0.5
SCALING_EFFICIENCY = 0.9  # goal: speed-up >= 0.9 x threads

# repetitions per preset (dlmone and torch alternated); min_block: seconds per sample
PLANS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(reps=15, warmup=2, min_block=0.2),
    "small": dict(reps=15, warmup=2, min_block=0.2),
    "diffuseq_base": dict(reps=5, warmup=1, min_block=0.0),
}
QUICK = dict(reps=2, warmup=1, min_block=0.02)
TRAIN_PRESETS = {"full": ("tiny", "small", "diffuseq_base"), "quick": ("tiny",)}
MFU_PRESET = {"full": "diffuseq_base", "quick": "tiny"}
SCALING_PRESETS = {"full": ("small", "diffuseq_base"), "quick": ("tiny",)}


def run(ctx: Context) -> List[Row]:
    from bench_matmul import sgemm_peak

    rows: List[Row] = []
    measured: Dict[str, Any] = {}
    for preset in ctx.pick(TRAIN_PRESETS):
        shape = BENCH_BATCH[preset]
        plan = ctx.plan(PLANS[preset], QUICK)
        cfg, model, ref = common.model_pair(preset, shape["seq_len"], seed=ctx.seed)
        step = common.train_step(cfg, model, ref, shape["batch"], seed=ctx.seed,
                                 torch_adamw_kind=ctx.torch_adamw)
        info = step.info
        if not info["forward_max_abs_diff"] <= 1e-3 * max(1.0, info["forward_max_abs_ref"]):
            log(f"WARNING train {preset}: dlmone and torch outputs differ by {info['forward_max_abs_diff']:.3g}")
        log(f"train step {preset}: {model!r}, batch {shape['batch']}")
        tm = common.interleaved({"dlmone": step.dlmone, "torch": step.torch}, reps=plan["reps"],
                                warmup=plan["warmup"], min_block_s=plan["min_block"])
        tok = step.tokens
        rows.append(Row(SECTION_TRAIN, f"{preset} train step, batch {shape['batch']}x{shape['seq_len']}",
                        "tok/s", tok / tm["dlmone"].median, tok / tm["torch"].median, TARGETS[preset],
                        details={**info, "parameters": model.num_parameters(),
                                 "timings": {k: v.to_dict() for k, v in tm.items()}}))
        measured[preset] = {"cfg": cfg, "shape": shape, "dlmone_s": tm["dlmone"].median,
                            "torch_s": tm["torch"].median}
        del model, ref, step
        gc.collect()

    if "small" in measured:
        rows.append(_rounding_loss_row(ctx))

    preset = ctx.pick(MFU_PRESET)
    if preset in measured:
        m = measured[preset]
        flops = common.train_step_flops(m["cfg"], m["shape"]["batch"], m["shape"]["seq_len"])
        peak = sgemm_peak(ctx)
        achieved = flops["total"] / m["dlmone_s"] / 1e9
        if achieved > peak["gflops"]:
            log(f"WARNING MFU {preset}: {achieved:.0f} GFLOP/s above the sgemm peak {peak['gflops']:.0f}: "
                f"the peak measurement was disturbed (a busy machine?)")
        rows.append(Row(SECTION_TRAIN, f"{preset} MFU: model GFLOP/s vs sgemm peak", "GFLOP/s", achieved,
                        peak["gflops"], MFU_TARGET, b_label="sgemm peak",
                        note="model FLOPs = 6 x P_mm x tokens + 12 x N x B x L^2 x H; peak = numpy's "
                             f"best {peak['n']}^3 sgemm at the same threads",
                        details={"flops_per_step": flops, "matmul_params": common.matmul_params(m["cfg"]),
                                 "tokens": m["shape"]["batch"] * m["shape"]["seq_len"],
                                 "dlmone_step_s": m["dlmone_s"], "torch_step_s": m["torch_s"],
                                 "torch_gflops": flops["total"] / m["torch_s"] / 1e9,
                                 "torch_mfu": flops["total"] / m["torch_s"] / 1e9 / peak["gflops"],
                                 "peak": {k: v for k, v in peak.items() if k != "timings"}}))
    ctx.info[SECTION_TRAIN] = {"torch_adamw": ctx.torch_adamw, "dropout": 0.0,
                               "flops_formula": common.train_step_flops.__doc__}
    return rows


ROUNDING_VOCAB = 30522  # BERT's, the vocabulary of the real data sets (QQP, ...)


def _rounding_loss_row(ctx: Context) -> Row:
    """The teacher's rounding loss (SPEC §4: cross-entropy of the tied logits x0·Wᵀ + b on
    every position) with its gradients, at the small preset with BERT's vocabulary, where it
    costs more than the network's step (the train-step rows above leave it out): dlmone's
    fused tied_cross_entropy against the logits-then-cross_entropy PyTorch code of DiffuSeq."""
    import torch

    shape, plan = BENCH_BATCH["small"], ctx.plan(PLANS["small"], QUICK)
    B, L, V = shape["batch"], shape["seq_len"], ROUNDING_VOCAB
    cfg, model, ref = common.model_pair("small", L, seed=ctx.seed, vocab_size=V)
    rng = np.random.default_rng(ctx.seed + 2)
    h = rng.standard_normal((B, L, cfg.emb_dim)).astype(np.float32)
    tokens = rng.integers(0, V, size=(B, L))
    scale = np.full((B, L), 1.0 / (B * L), np.float32)
    h_t, tok_t, scale_t = torch.from_numpy(h).requires_grad_(), torch.from_numpy(tokens), torch.from_numpy(scale)

    def dl_loss():
        model.zero_grad()
        return model.tied_cross_entropy(h, tokens, scale)

    def th_loss():
        ref.zero_grad()
        h_t.grad = None
        nll = torch.nn.functional.cross_entropy(ref.get_logits(h_t).reshape(-1, V), tok_t.reshape(-1),
                                                reduction="none").reshape(B, L)
        (nll * scale_t).sum().backward()
        return nll

    nll, dh = dl_loss()
    nll_t = th_loss()
    check = {"nll_max_abs_diff": float(np.max(np.abs(nll - nll_t.detach().numpy()))),
             "grad_h_max_abs_diff": float(np.max(np.abs(dh - h_t.grad.numpy()))),
             "grad_h_max_abs": float(np.max(np.abs(dh)))}
    log(f"rounding loss small, V {V}: {check}")
    if not (check["nll_max_abs_diff"] <= 1e-3 and check["grad_h_max_abs_diff"] <= 1e-3 * check["grad_h_max_abs"]):
        log(f"WARNING rounding loss: dlmone and torch differ: {check}")
    tm = common.interleaved({"dlmone": dl_loss, "torch": th_loss}, reps=plan["reps"],
                            warmup=plan["warmup"], min_block_s=plan["min_block"])
    return Row(SECTION_TRAIN, f"small rounding loss, tied head V {V}, fwd+bwd, batch {B}x{L}", "tok/s",
               B * L / tm["dlmone"].median, B * L / tm["torch"].median,
               note="the teacher step's loss term the train-step rows leave out; torch materialises the logits",
               details={"batch": B, "seq_len": L, "vocab_size": V, "emb_dim": cfg.emb_dim, "check": check,
                        "timings": {k: v.to_dict() for k, v in tm.items()}})


def run_scaling(ctx: Context) -> List[Row]:
    if ctx.threads < 2:
        return [Row(SECTION_SCALING, "thread scaling", "tok/s", None,
                    note="not measured: needs --threads 2 or more")]
    rows = [_gemm_scaling(ctx)]
    for preset in ctx.pick(SCALING_PRESETS):
        rows.append(_scaling(ctx, preset))
        gc.collect()
    return rows


def _gemm_scaling(ctx: Context) -> Row:
    """The machine's own ceiling: a large product alone (dlmone._core.linear, fixed
    blocks over OpenMP threads), N threads vs 1; no training step can scale better."""
    import dlmone
    from dlmone import _core

    n = ctx.threads
    size = 512 if ctx.quick else 2048
    rng = np.random.default_rng(ctx.seed)
    x = rng.standard_normal((size, size)).astype(np.float32)
    w = rng.standard_normal((size, size)).astype(np.float32)

    def at(threads: int):
        def call() -> None:
            dlmone.set_num_threads(threads)
            _core.linear(x, w)
        return call

    plan = ctx.plan(dict(reps=5, warmup=1, min_block=0.2), QUICK)
    try:
        tm = common.interleaved({"1": at(1), str(n): at(n)}, reps=plan["reps"],
                                warmup=plan["warmup"], min_block_s=plan["min_block"])
    finally:
        dlmone.set_num_threads(n)
    flops = 2.0 * size ** 3
    return Row(SECTION_SCALING, f"sgemm {size}^3 alone (the machine's ceiling), {n} threads vs 1", "GFLOP/s",
               flops / tm[str(n)].median / 1e9, flops / tm["1"].median / 1e9,
               a_label=f"{n} threads", b_label="1 thread",
               details={"timings": {k: v.to_dict() for k, v in tm.items()}})


def _scaling(ctx: Context, preset: str) -> Row:
    import dlmone

    n = ctx.threads
    shape = BENCH_BATCH[preset]
    plan = ctx.plan(PLANS[preset], QUICK)
    cfg = dlmone.ModelConfig.preset(preset, seq_len=shape["seq_len"], dropout=0.0)
    model = dlmone.DiffusionTransformer(cfg, seed=ctx.seed)
    step = common.train_step(cfg, model, None, shape["batch"], seed=ctx.seed)

    def at(threads: int):
        def call() -> None:
            dlmone.set_num_threads(threads)
            step.dlmone()
        return call

    log(f"thread scaling {preset}: 1 vs {n} threads")
    try:
        tm = common.interleaved({"1": at(1), str(n): at(n)}, reps=plan["reps"],
                                warmup=plan["warmup"], min_block_s=plan["min_block"])
    finally:
        dlmone.set_num_threads(n)
    tok = step.tokens
    return Row(SECTION_SCALING, f"{preset} train step, {n} threads vs 1", "tok/s",
               tok / tm[str(n)].median, tok / tm["1"].median, SCALING_EFFICIENCY * n,
               a_label=f"{n} threads", b_label="1 thread",
               details={**step.info, "timings": {k: v.to_dict() for k, v in tm.items()}})
