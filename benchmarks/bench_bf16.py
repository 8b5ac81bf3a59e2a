"""Issue 15: bf16 on AMX against PyTorch as users run it on this CPU (bf16 autocast).

At issue 15's two shapes (small: V 16000, E 128, H 256, 4 layers, F 1024, L 64, B 32;
base: DiffuSeq's 12 x 768, V 30522, L 128, B 16 for forwards and B 8 for training),
side by side in one run, same weights, inputs and threads, alternated (medians):

- training step (zero_grad + forward(train) + backward of sum(y·gy) + AdamW, as
  bench_train): dlmone ``precision="bf16"`` vs torch under
  ``torch.autocast("cpu", torch.bfloat16)`` (goal 1.3x), and dlmone float32 vs torch
  float32 (goals 1.5x small, 1.1x base);
- inference forward: dlmone ``inference_precision="bf16"`` vs torch autocast under
  no_grad (goal 1.5x), and the two float32 forwards for information;
- MFU of the bf16 training step: model FLOPs (bench_train's formula) per second over
  the AMX bf16 peak measured here (dlmone's bf16 product on a 2048^3 square, packing
  included), for dlmone and torch alike.

On a CPU without AMX-BF16 the float32 rows (the issue's float32 goals at its shapes)
are still measured; torch's autocast there runs bf16 without hardware support, so it is
timed once, on the small forward, as the evidence that float32 is the peer on such a CPU.

  python benchmarks/run_all.py --only bf16 --threads 2
"""
from __future__ import annotations

import gc
import os
import sys
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import common  # noqa: E402
from common import Context, Row, log  # noqa: E402

SECTION = "bf16"
TITLE = "bf16 on AMX vs PyTorch bf16 autocast (issue 15)"
SHAPES: Dict[str, Dict[str, Any]] = {
    "small": dict(preset="small", seq_len=64, train_batch=32, forward_batch=32,
                  overrides=dict(vocab_size=16000, emb_dim=128, hidden_dim=256, num_layers=4,
                                 ffn_dim=1024, time_dim=128)),
    "base": dict(preset="diffuseq_base", seq_len=128, train_batch=8, forward_batch=16, overrides={}),
}
QUICK_SHAPES = {"tiny": dict(preset="tiny", seq_len=32, train_batch=8, forward_batch=8, overrides={})}
TRAIN_GOAL_BF16 = 1.3
TRAIN_GOAL_FP32 = {"small": 1.5, "base": 1.1}
FORWARD_GOAL_BF16 = 1.5
PLAN = dict(reps=7, warmup=2, min_block=0.2)
BASE_PLAN = dict(reps=3, warmup=1, min_block=0.0)
QUICK = dict(reps=2, warmup=1, min_block=0.02)


def amx_peak(ctx: Context) -> Dict[str, Any]:
    """dlmone's best bf16 product GFLOP/s on a big square at the run's threads."""
    if "amx_peak" in ctx.cache:
        return ctx.cache["amx_peak"]
    from dlmone import _core

    n = 512 if ctx.quick else 2048
    rng = np.random.default_rng(ctx.seed)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    tm = common.interleaved({"amx": lambda: _core.matmul(a, b, bf16=True)}, reps=5, warmup=1, min_block_s=0.2)
    peak = {"n": n, "gflops": 2.0 * n ** 3 / tm["amx"].best / 1e9}
    ctx.cache["amx_peak"] = peak
    return peak


def _forward_fns(model, ref, batch: int, seed: int) -> Dict[str, Any]:
    import torch

    cfg = model.config
    rng = np.random.default_rng(seed + 2)
    x = rng.standard_normal((batch, cfg.seq_len, cfg.emb_dim)).astype(np.float32)
    t = rng.integers(0, cfg.diffusion_steps, size=batch)
    xt, tt = torch.from_numpy(x), torch.from_numpy(model.scale_timesteps(t, batch))
    ref.eval()

    def dl(precision: str):
        def call() -> None:
            model.inference_precision = precision
            model.forward(x, t)
        return call

    def th(autocast: bool):
        def call() -> None:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                ref(xt, tt)
        return call

    return {"dlmone bf16": dl("bf16"), "torch bf16": th(True), "dlmone fp32": dl("float32"),
            "torch fp32": th(False)}


def _train_fns(cfg, model, ref, batch: int, seed: int) -> Dict[str, Any]:
    import torch

    step = common.train_step(cfg, model, ref, batch, seed=seed)
    ref.train()
    rng = np.random.default_rng(seed + 1)
    B, L, E = batch, cfg.seq_len, cfg.emb_dim
    x = rng.standard_normal((B, L, E)).astype(np.float32)
    t = rng.integers(0, cfg.diffusion_steps, size=B)
    gy = torch.from_numpy((rng.standard_normal((B, L, E)) * 1e-3).astype(np.float32))
    xt, tt = torch.from_numpy(x), torch.from_numpy(model.scale_timesteps(t, B))
    topt = common.torch_adamw(ref, "default", 1e-4)

    def dl(precision: str):
        def call() -> None:
            model.precision = precision
            step.dlmone()
        return call

    def th_bf16() -> None:
        topt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (ref(xt, tt).float() * gy).sum()
        loss.backward()
        topt.step()

    return {"dlmone bf16": dl("bf16"), "torch bf16": th_bf16, "dlmone fp32": dl("float32"),
            "torch fp32": step.torch}


def _without_amx(fns: Dict[str, Any], name: str, forward: bool) -> Dict[str, Any]:
    """The timings a CPU without AMX-BF16 can give: no dlmone bf16; torch's autocast only
    on the small forward (it emulates bf16 there, about 9x slower than its float32)."""
    keep = {"dlmone fp32", "torch fp32"} | ({"torch bf16"} if forward and name != "base" else set())
    return {k: v for k, v in fns.items() if k in keep}


def run(ctx: Context) -> List[Row]:
    import dlmone

    amx = dlmone.build_info()["amx_bf16"]
    rows: List[Row] = []
    peak = None
    if amx:
        peak = amx_peak(ctx)
        log(f"AMX bf16 product peak: {peak['gflops']:.0f} GFLOP/s ({peak['n']}^3)")
    else:
        log("no AMX-BF16 on this CPU: float32 rows only")
    for name, s in (QUICK_SHAPES if ctx.quick else SHAPES).items():
        plan = ctx.plan(BASE_PLAN if name == "base" else PLAN, QUICK)
        cfg, model, ref = common.model_pair(s["preset"], s["seq_len"], seed=ctx.seed, **s["overrides"])
        log(f"bf16 {name}: {model!r}")
        fwd_fns = _forward_fns(model, ref, s["forward_batch"], ctx.seed)
        fwd = common.interleaved(fwd_fns if amx else _without_amx(fwd_fns, name, True), reps=plan["reps"],
                                 warmup=plan["warmup"], min_block_s=plan["min_block"])
        model.inference_precision = "float32"
        tok = s["forward_batch"] * cfg.seq_len
        timings = {k: v.to_dict() for k, v in fwd.items()}
        if amx:
            rows.append(Row(SECTION, f"{name} forward bf16, batch {s['forward_batch']}x{cfg.seq_len}", "tok/s",
                            tok / fwd["dlmone bf16"].median, tok / fwd["torch bf16"].median, FORWARD_GOAL_BF16,
                            b_label="torch autocast", details={"timings": timings}))
        rows.append(Row(SECTION, f"{name} forward fp32, batch {s['forward_batch']}x{cfg.seq_len}", "tok/s",
                        tok / fwd["dlmone fp32"].median, tok / fwd["torch fp32"].median,
                        details={"timings": timings}))
        if not amx and "torch bf16" in fwd:
            rows.append(Row(SECTION, f"{name} forward, torch fp32 vs torch bf16 autocast (no AMX)", "tok/s",
                            tok / fwd["torch fp32"].median, tok / fwd["torch bf16"].median, a_label="torch fp32",
                            b_label="torch autocast", note="no AMX-BF16: torch's autocast emulates bf16",
                            details={"timings": timings}))
        train_fns = _train_fns(cfg, model, ref, s["train_batch"], ctx.seed)
        train = common.interleaved(train_fns if amx else _without_amx(train_fns, name, False), reps=plan["reps"],
                                   warmup=plan["warmup"], min_block_s=plan["min_block"])
        model.precision = "float32"
        tok = s["train_batch"] * cfg.seq_len
        timings = {k: v.to_dict() for k, v in train.items()}
        if amx:
            rows.append(Row(SECTION, f"{name} train step bf16, batch {s['train_batch']}x{cfg.seq_len}", "tok/s",
                            tok / train["dlmone bf16"].median, tok / train["torch bf16"].median, TRAIN_GOAL_BF16,
                            b_label="torch autocast", details={"timings": timings}))
        rows.append(Row(SECTION, f"{name} train step fp32, batch {s['train_batch']}x{cfg.seq_len}", "tok/s",
                        tok / train["dlmone fp32"].median, tok / train["torch fp32"].median,
                        TRAIN_GOAL_FP32.get(name), details={"timings": timings}))
        if amx:
            flops = common.train_step_flops(cfg, s["train_batch"], cfg.seq_len)["total"]
            mfu = {k: flops / train[k].median / 1e9 / peak["gflops"] for k in ("dlmone bf16", "torch bf16")}
            rows.append(Row(SECTION, f"{name} bf16 train step MFU vs the AMX peak", "fraction", mfu["dlmone bf16"],
                            mfu["torch bf16"], b_label="torch autocast",
                            note=f"model FLOPs {flops / 1e9:.1f} G a step; AMX peak {peak['gflops']:.0f} GFLOP/s",
                            details={"peak": peak, "flops": flops}))
        del model, ref
        gc.collect()
    ctx.info[SECTION] = {"amx_peak": peak, "shapes": {k: {kk: vv for kk, vv in v.items()}
                                                      for k, v in (QUICK_SHAPES if ctx.quick else SHAPES).items()}}
    return rows
