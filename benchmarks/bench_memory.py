"""Target 6: peak memory of a training step against what the step needs.

Each measurement runs in a fresh interpreter (subprocess + exec, never a fork of this
process). The child imports numpy and dlmone (torch for the PyTorch figure), sets the
threads, draws the batch (x, t, gy: the caller's data), then reads its resident set
size: the baseline. It resets the RSS high-water mark, builds the model and AdamW and
runs two training steps (zero_grad + forward(train) + backward(gy) + AdamW step;
AdamW's state is touched on the first). Peak = VmHWM at the end - baseline RSS.

VmHWM rather than getrusage's ru_maxrss: both are the address space's RSS high-water
mark, but the kernel folds into a child's ru_maxrss the peak of the address space its
exec replaced, which under subprocess's vfork is this (large) parent's. The child's
ru_maxrss is recorded too.

Budget, what the step needs (bytes; P parameters, float32): parameters 4P, gradients
4P, AdamW m 4P and v 4P, activations (the one workspace csrc/core/model.c's model_reserve
lays out for batch B x length L: what the forward keeps for the backward plus the
backward's gradient scratch; the model's workspace_bytes, checked against
dlmone.resources.workspace_bytes, whose forward/backward split is reported), and the
step's two result arrays y and dx (B·L·E floats each). Goal: peak <= 1.2 x budget.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402
from common import BENCH_BATCH, Context, Row, log  # noqa: E402

SECTION = "memory"
TITLE = "6. Peak memory of a training step (fresh process) vs params + grads + AdamW m, v + activations"
TARGET = 1.2
MIB = 2.0 ** 20
PRESETS = {"full": ("small", "diffuseq_base"), "quick": ("tiny",)}
STEPS = 2
CHILD_TIMEOUT_S = 900


# -------------------------------------------------------------------- budget


def budget_bytes(cfg, params: int, B: int, L: int, workspace: int) -> Dict[str, int]:
    """What one training step needs, by part, and the ``total``; ``workspace`` is the
    activation workspace the C model holds (its workspace_bytes after the step)."""
    parts = {"params": 4 * params, "grads": 4 * params, "adamw_m": 4 * params, "adamw_v": 4 * params,
             "activations": workspace, "step_outputs_y_dx": 2 * 4 * B * L * cfg.emb_dim}
    parts["total"] = sum(parts.values())
    return parts


def workspace_estimate(cfg, B: int, L: int) -> Optional[Dict[str, int]]:
    """dlmone.resources' formula of the workspace (csrc/core/model.c's model_reserve): the
    forward's part (kept for the backward) and the total with the backward's scratch;
    None where that module is absent."""
    try:
        from dlmone.resources import workspace_bytes
    except ImportError:
        return None
    total = workspace_bytes(cfg, B, L)
    forward = workspace_bytes(cfg, B, L, backward=False)
    return {"forward": forward, "backward_scratch": total - forward, "total": total}


# --------------------------------------------------------------------- child


def _child(spec: Dict[str, Any]) -> Dict[str, Any]:
    import numpy as np

    import dlmone

    side, B, L, threads = spec["side"], spec["batch"], spec["seq_len"], spec["threads"]
    dlmone.set_num_threads(threads)
    cfg = dlmone.ModelConfig.preset(spec["preset"], seq_len=L, dropout=0.0)
    rng = np.random.default_rng(spec["seed"])
    x = rng.standard_normal((B, L, cfg.emb_dim)).astype(np.float32)
    t = rng.integers(0, cfg.diffusion_steps, size=B).astype(np.int64)
    gy = (rng.standard_normal((B, L, cfg.emb_dim)) * 1e-3).astype(np.float32)
    if side == "torch":
        import torch

        from reference import TorchDiffuSeq

        torch.set_num_threads(threads)
        x, gy = torch.from_numpy(x), torch.from_numpy(gy)
        t = torch.from_numpy(t.astype(np.float32) * np.float32(1000.0 / cfg.diffusion_steps))
        torch.ones(8, 8) @ torch.ones(8, 8)  # load torch's kernels before the baseline
    gc.collect()
    base = {"rss": common.rss_bytes(), "hwm": common.peak_rss_bytes(), "ru_maxrss": common.ru_maxrss_bytes()}
    reset = common.reset_peak_rss()
    out: Dict[str, Any] = {}
    if side == "dlmone":
        model = dlmone.DiffusionTransformer(cfg, seed=spec["seed"])
        opt = dlmone.AdamW(model, lr=1e-4)
        for _ in range(STEPS):
            model.zero_grad()
            y = model.forward(x, t, train=True)
            dx = model.backward(gy)
            opt.step()
            out["step_outputs_bytes"] = y.nbytes + dx.nbytes
        out["parameters"] = model.num_parameters()
        out["workspace_bytes"] = int(model._core.workspace_bytes)
    else:
        ref = TorchDiffuSeq(cfg)
        opt = common.torch_adamw(ref, spec.get("torch_adamw", "default"))
        for _ in range(STEPS):
            opt.zero_grad()
            (ref(x, t) * gy).sum().backward()
            opt.step()
        out["parameters"] = sum(p.numel() for p in ref.parameters())
    end = {"rss": common.rss_bytes(), "hwm": common.peak_rss_bytes(), "ru_maxrss": common.ru_maxrss_bytes()}
    out.update(baseline=base, end=end, hwm_reset=reset, peak_bytes=end["hwm"] - base["rss"],
               ru_maxrss_minus_baseline=end["ru_maxrss"] - base["rss"])
    return out


def measure(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Run _child(spec) in a fresh interpreter; its JSON answer."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {spec} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------- run


def run(ctx: Context) -> List[Row]:
    import dlmone

    rows: List[Row] = []
    for preset in ctx.pick(PRESETS):
        shape = BENCH_BATCH[preset]
        B, L = shape["batch"], shape["seq_len"]
        spec = {"preset": preset, "batch": B, "seq_len": L, "threads": ctx.threads, "seed": ctx.seed,
                "torch_adamw": ctx.torch_adamw}
        log(f"memory {preset}: batch {B}x{L}, dlmone in a fresh process")
        dl = measure({**spec, "side": "dlmone"})
        cfg = dlmone.ModelConfig.preset(preset, seq_len=L, dropout=0.0)
        budget = budget_bytes(cfg, dl["parameters"], B, L, dl["workspace_bytes"])
        estimate = workspace_estimate(cfg, B, L)
        if estimate is not None and estimate["total"] != dl["workspace_bytes"]:
            log(f"WARNING memory {preset}: dlmone.resources.workspace_bytes {estimate['total']} B != "
                f"the model's workspace_bytes {dl['workspace_bytes']} B")
        log(f"memory {preset}: torch in a fresh process")
        th = measure({**spec, "side": "torch"})
        details = {"batch": B, "seq_len": L, "budget_bytes": budget,
                   "budget_MiB": {k: v / MIB for k, v in budget.items()},
                   "peak_over_budget_MiB": (dl["peak_bytes"] - budget["total"]) / MIB,
                   "workspace_dlmone.resources": estimate, "dlmone": dl, "torch": th}
        rows.append(Row(SECTION, f"{preset} train step peak RSS vs budget, batch {B}x{L}", "MiB",
                        dl["peak_bytes"] / MIB, budget["total"] / MIB, TARGET, higher_is_better=False,
                        a_label="peak", b_label="budget", details=details))
        rows.append(Row(SECTION, f"{preset} train step peak RSS, dlmone vs torch", "MiB",
                        dl["peak_bytes"] / MIB, th["peak_bytes"] / MIB, a_label="dlmone", b_label="torch",
                        higher_is_better=False))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="the child process of bench_memory (run by run_all.py)")
    p.add_argument("--child", required=True, help="JSON spec: side, preset, batch, seq_len, threads, seed")
    args = p.parse_args(argv)
    print(json.dumps(_child(json.loads(args.child))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
