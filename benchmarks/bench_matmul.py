"""Target 1: dlmone's matrix-product kernel against numpy's matmul (OpenBLAS), GFLOP/s
at the shapes of the model's linear layers, the same threads on both sides; and the
sgemm peak (numpy on a big square product) that the model-FLOP utilisation of
bench_train.py is measured against.

What is measured on the dlmone side. Every linear layer of the network runs the
products of csrc/core/kernels.c (split over OpenMP threads by a plan fixed by the shape, each
block one single-threaded scipy-openblas32 sgemm). ``dlmone._core.linear`` reaches only
the forward product; the entry points that reach both the forward and the backward
(``linear_forward`` / ``linear_backward``) with a caller-chosen shape are the tied output
head: ``Model.logits(h)`` = ``linear_forward`` (y = h·Wᵀ, the bias added to each block
right after its product) and ``Model.logits_backward(h, g)`` =
``linear_backward`` (dh = g·W, dW += gᵀ·h, db += column sums of g). A *probe* model whose
vocabulary is N and embedding width K (hidden width 1, so its other tensors are a few
floats) therefore runs exactly the kernel of a K→N linear layer of the network.
The dlmone side pays for the bias (forward) and the bias gradient (backward), which
numpy's plain products do not compute.

numpy side: forward ``x @ W.T``; backward ``g @ W`` and ``g.T @ x``; same W (the probe's
embedding), same x and g. FLOPs: forward 2MNK, backward 4MNK.
"""
from __future__ import annotations

import os
import sys
from collections import OrderedDict
from typing import Any, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import common  # noqa: E402
from common import BENCH_BATCH, Context, Row, log  # noqa: E402

SECTION = "matmul"
TITLE = "1. Matrix products at the model's linear-layer shapes: dlmone linear kernel vs numpy matmul"
TARGET = 0.85

# settle: an untimed pause before each sample: OpenBLAS's workers (numpy's) spin for
# ~0.1 s after a call and would take the cores from dlmone's OpenMP threads (and back);
# left out by --quick, whose timings mean nothing anyway
PLAN = dict(presets=("tiny", "small", "diffuseq_base"), reps=7, warmup=2, min_block=0.05, settle=0.1)
QUICK = dict(presets=("tiny",), reps=2, warmup=1, min_block=0.005, settle=0.0)
PEAK_PLAN = dict(n=2048, reps=5, warmup=2, settle=0.1)
PEAK_QUICK = dict(n=512, reps=2, warmup=1, settle=0.0)


def linear_layers(cfg) -> List[Tuple[str, int, int, int]]:
    """(name, in K, out N, uses per training step) of every per-token linear layer of
    the network, and the tied output head of the training loss's rounding term."""
    E, H, F, N, V = cfg.emb_dim, cfg.hidden_dim, cfg.ffn_dim, cfg.num_layers, cfg.vocab_size
    layers = [("qkv", H, 3 * H, N), ("attn_out", H, H, N), ("ffn_up", H, F, N), ("ffn_down", F, H, N)]
    if E != H:
        layers += [("up_proj.0", E, H, 1), ("up_proj.2", H, H, 1), ("down_proj.0", H, H, 1),
                   ("down_proj.2", H, E, 1)]
    layers.append(("logits", E, V, 1))
    return layers


def distinct_shapes(cfg) -> List[Dict[str, Any]]:
    """linear_layers merged by (K, N): [{"K", "N", "layers": [...], "uses": n}]."""
    merged: "OrderedDict[Tuple[int, int], Dict[str, Any]]" = OrderedDict()
    for name, K, N, uses in linear_layers(cfg):
        entry = merged.setdefault((K, N), {"K": K, "N": N, "layers": [], "uses": 0})
        entry["layers"].append(name)
        entry["uses"] += uses
    return list(merged.values())


def probe_model(K: int, N: int, seed: int = 0):
    """A dlmone model whose tied output head is a K→N linear layer (see the module doc)."""
    import dlmone

    cfg = dlmone.ModelConfig(vocab_size=N, seq_len=1, emb_dim=K, hidden_dim=1, num_layers=1,
                             num_heads=1, ffn_dim=1, time_dim=2, dropout=0.0)
    return dlmone.DiffusionTransformer(cfg, seed=seed)


def product_callables(M: int, K: int, N: int, seed: int) -> Dict[str, Any]:
    """Forward and backward of a K→N linear layer on M rows, dlmone and numpy, on the
    same W, x and upstream gradient g."""
    probe = probe_model(K, N, seed)
    W = probe.state_dict()["word_embedding.weight"]  # [N, K], the layer's weight
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, K)).astype(np.float32)
    g = (rng.standard_normal((M, N)) * 1e-3).astype(np.float32)
    return {
        "dlmone fwd": lambda: probe.logits(x),
        "numpy fwd": lambda: x @ W.T,
        "dlmone bwd": lambda: probe.logits_backward(x, g),
        "numpy bwd": lambda: (g @ W, g.T @ x),
    }


def time_products(M: int, K: int, N: int, plan: Dict[str, Any], seed: int) -> Dict[str, common.Timing]:
    return common.interleaved(product_callables(M, K, N, seed), reps=plan["reps"], warmup=plan["warmup"],
                              min_block_s=plan["min_block"], settle_s=plan["settle"])


def sgemm_peak(ctx: Context) -> Dict[str, Any]:
    """numpy's best sgemm GFLOP/s on an n x n x n product (and dlmone's at the same
    shape, for information), measured once per run and cached in ctx."""
    if "sgemm_peak" in ctx.cache:
        return ctx.cache["sgemm_peak"]
    plan = ctx.plan(PEAK_PLAN, PEAK_QUICK)
    n = plan["n"]
    log(f"sgemm peak: {n}x{n}x{n}, numpy and dlmone")
    fns = product_callables(n, n, n, ctx.seed)
    fns = {"numpy": fns["numpy fwd"], "dlmone": fns["dlmone fwd"]}
    tm = common.interleaved(fns, reps=plan["reps"], warmup=plan["warmup"], min_block_s=0.0,
                            settle_s=plan["settle"])
    flops = 2.0 * n ** 3
    peak = {"n": n, "gflops": flops / tm["numpy"].best / 1e9,
            "numpy_median_gflops": flops / tm["numpy"].median / 1e9,
            "dlmone_best_gflops": flops / tm["dlmone"].best / 1e9,
            "dlmone_median_gflops": flops / tm["dlmone"].median / 1e9,
            "timings": {k: v.to_dict() for k, v in tm.items()}}
    ctx.cache["sgemm_peak"] = peak
    return peak


def run(ctx: Context) -> List[Row]:
    import dlmone

    plan = ctx.plan(PLAN, QUICK)
    rows: List[Row] = []
    for preset in plan["presets"]:
        shape = BENCH_BATCH[preset]
        cfg = dlmone.ModelConfig.preset(preset, seq_len=shape["seq_len"])
        M = shape["batch"] * shape["seq_len"]
        total = {"dlmone": 0.0, "numpy": 0.0, "flops": 0.0}
        for entry in distinct_shapes(cfg):
            K, N = entry["K"], entry["N"]
            label = "+".join(entry["layers"])
            log(f"matmul {preset} {label} [{M},{K}]x[{K},{N}]")
            tm = time_products(M, K, N, plan, ctx.seed)
            fl = {"fwd": 2.0 * M * N * K, "bwd": 4.0 * M * N * K}
            t_dl = tm["dlmone fwd"].median + tm["dlmone bwd"].median
            t_np = tm["numpy fwd"].median + tm["numpy bwd"].median
            per_dir = {f"{side} {d} GFLOP/s": fl[d] / tm[f"{side} {d}"].median / 1e9
                       for side in ("dlmone", "numpy") for d in ("fwd", "bwd")}
            rows.append(Row(SECTION, f"{preset} {label} [{M},{K}]x[{K},{N}] fwd+bwd", "GFLOP/s",
                            6.0 * M * N * K / t_dl / 1e9, 6.0 * M * N * K / t_np / 1e9, TARGET,
                            details={"M": M, "K": K, "N": N, "layers": entry["layers"],
                                     "uses_per_step": entry["uses"], **per_dir,
                                     "fwd_ratio": tm["numpy fwd"].median / tm["dlmone fwd"].median,
                                     "bwd_ratio": tm["numpy bwd"].median / tm["dlmone bwd"].median,
                                     "timings": {k: v.to_dict() for k, v in tm.items()}},
                            b_label="numpy"))
            total["dlmone"] += entry["uses"] * t_dl
            total["numpy"] += entry["uses"] * t_np
            total["flops"] += entry["uses"] * 6.0 * M * N * K
        # the rows above, each weighted by how many times a training step (with the
        # rounding term's output head) runs it: the product mix of the model
        rows.append(Row(SECTION, f"{preset} all linear layers, weighted by use per step", "GFLOP/s",
                        total["flops"] / total["dlmone"] / 1e9, total["flops"] / total["numpy"] / 1e9,
                        b_label="numpy"))
    peak = sgemm_peak(ctx)
    n = peak["n"]
    rows.append(Row(SECTION, f"square {n}x{n}x{n} forward, best sample (sgemm peak)", "GFLOP/s",
                    peak["dlmone_best_gflops"], peak["gflops"],
                    note="numpy's figure is the sgemm peak the MFU row divides by",
                    details=peak, b_label="numpy"))
    ctx.info[SECTION] = {
        "dlmone_entry_points": "Model.logits (linear_forward) and Model.logits_backward "
                               "(linear_backward) of a probe model with vocab N, embedding K",
        "numpy_blas": common.numpy_blas_info()}
    return rows
