"""Issue 15 item 4: a training step next to a busy neighbour.

The small preset's training step (bench_train's: forward, backward, AdamW), in steps of
``STEPS`` each timed: quiet at --threads, then with one other process spinning on the CPU
(a Python busy loop in a subprocess, one core's worth) at --threads fixed, at one thread
fixed, and under dlmone.threads.ThreadGovernor (the default of train-teacher and distill),
which starts at --threads. Reported: each busy variant's median step against the quiet
one; goal: within 2x.

  python benchmarks/run_all.py --only busy --threads 2
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Callable, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import BENCH_BATCH, Context, Row, log  # noqa: E402

SECTION = "busy"
TITLE = "Training step next to a busy process (issue 15 item 4)"
GOAL = 2.0  # at most this many times the quiet step
STEPS = {"full": 60, "quick": 16}


def _steps(step: Callable[[], None], n: int, after: Callable[[float], None] = lambda s: None) -> List[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
        after(times[-1])
    return times


def _median(xs: List[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


def run(ctx: Context) -> List[Row]:
    import dlmone
    from dlmone.threads import ThreadGovernor

    n = ctx.threads
    if n < 2:
        return [Row(SECTION, "busy neighbour", "s/step", None, note="not measured: needs --threads 2 or more")]
    preset = "tiny" if ctx.quick else "small"
    shape = BENCH_BATCH[preset]
    steps = ctx.pick(STEPS)
    cfg = dlmone.ModelConfig.preset(preset, seq_len=shape["seq_len"], dropout=0.0)
    model = dlmone.DiffusionTransformer(cfg, seed=ctx.seed)
    step = common.train_step(cfg, model, None, shape["batch"], seed=ctx.seed).dlmone
    dlmone.set_num_threads(n)
    _steps(step, 3)
    quiet = _median(_steps(step, steps))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        fixed = _median(_steps(step, steps))
        dlmone.set_num_threads(1)
        one = _median(_steps(step, steps))
        gov = ThreadGovernor(max_threads=n)
        governed_times = _steps(step, steps, gov.step)
        governed = _median(governed_times[steps // 3:])  # after it has settled
        final_threads, switches = gov.threads, gov.switches
        gov.close()
    finally:
        busy.kill()
        busy.wait()
        dlmone.set_num_threads(n)
    log(f"busy: quiet {quiet * 1e3:.1f} ms, busy {n} threads {fixed * 1e3:.1f}, 1 thread {one * 1e3:.1f}, "
        f"governed {governed * 1e3:.1f} ({final_threads} threads at the end, {switches} switches)")
    label = f"{preset} train step, batch {shape['batch']}x{shape['seq_len']}"
    rows = []
    for name, value, goal in ((f"{n} threads fixed", fixed, None), ("1 thread fixed", one, None),
                              ("ThreadGovernor", governed, GOAL)):
        rows.append(Row(SECTION, f"{label}, busy neighbour: {name}", "s/step", value, quiet, goal,
                        a_label="busy", b_label=f"quiet, {n} threads", higher_is_better=False,
                        details={"steps": steps, "governor_threads_at_end": final_threads,
                                 "governor_switches": switches}))
    return rows
