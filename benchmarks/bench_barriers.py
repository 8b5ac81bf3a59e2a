"""Issue 15 item 4: what OpenMP's fork/join barriers cost a training step.

Every kernel of dlmone's core is its own parallel region, so a step opens about a
hundred of them. Measured here:

- the regions a step forks and the implicit barriers of ``omp for`` loops inside them,
  counted by interposing libgomp's ``GOMP_parallel`` and ``GOMP_barrier`` (an LD_PRELOAD
  library built here with the C compiler). Regions whose ``if`` clause keeps them on one
  thread are counted apart: they fork nothing. The training step's kernels use only
  these two entry points (the core's dynamic loop, in affine_argmax, is not in a step);
- what one region costs: an empty ``parallel for`` over the threads, 10^5 times, with
  the workers spinning between regions, as they do between the kernels of one forward
  or backward (each is a single C call);
- the step at --threads and at 1 thread, alternated, in a child process; the children
  run POLICY_ROUNDS times, alternated with children under ``OMP_WAIT_POLICY=active``
  (workers that never sleep), and each policy keeps its fastest: if active is no
  faster, waking sleeping workers costs the step nothing and the spinning region cost
  applies.

  cost share   = (forked regions + barriers) x region cost / the step at --threads
  of shortfall = the same / (the step at --threads - the 1-thread step / --threads)

  python benchmarks/run_all.py --only barriers --threads 2
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import BENCH_BATCH, Context, Row, log  # noqa: E402

SECTION = "barriers"
TITLE = "OpenMP fork/join barriers in a training step (issue 15 item 4)"
PRESETS = {"full": ("tiny", "small"), "quick": ("tiny",)}
STEPS = {"full": 60, "quick": 16}  # per thread count, in ROUNDS alternated blocks
ROUNDS = 4
WARMUP = 3
POLICY_ROUNDS = 2

REGION_C = r"""
#include <omp.h>
#include <stdio.h>
int main(void) {
    enum { REGIONS = 100000 };
    static volatile int slot[256][16]; /* a cache line per thread: no sharing */
    int threads = omp_get_max_threads();
    double best = 1e30;
    for (int round = 0; round < 3; round++) {
        double t0 = omp_get_wtime();
        for (int i = 0; i < REGIONS; i++) {
#pragma omp parallel for schedule(static)
            for (int j = 0; j < threads; j++) slot[j & 255][0] = i;
        }
        double t = (omp_get_wtime() - t0) / REGIONS;
        if (t < best) best = t;
    }
    printf("%.4e\n", best);
    return 0;
}
"""

# The real functions are looked up in the libgomp already loaded (dlmone._core's): an
# extension module's libraries are not in the global scope that RTLD_NEXT searches.
SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
static unsigned long forked, serial, barriers;
static void *libgomp_symbol(const char *name) {
    void *lib = dlopen("libgomp.so.1", RTLD_NOW | RTLD_NOLOAD), *f = lib ? dlsym(lib, name) : NULL;
    if (!f) {
        fprintf(stderr, "barrier shim: %s not found in a loaded libgomp.so.1\n", name);
        abort();
    }
    return f;
}
typedef void (*parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
typedef void (*barrier_fn)(void);
typedef int (*thread_num_fn)(void);
void GOMP_parallel(void (*fn)(void *), void *data, unsigned threads, unsigned flags) {
    static parallel_fn real;
    parallel_fn f = __atomic_load_n(&real, __ATOMIC_ACQUIRE);
    if (!f) __atomic_store_n(&real, f = (parallel_fn)libgomp_symbol("GOMP_parallel"), __ATOMIC_RELEASE);
    /* an if clause that is false passes 1 thread: the region runs on the caller alone */
    __atomic_add_fetch(threads == 1 ? &serial : &forked, 1, __ATOMIC_RELAXED);
    f(fn, data, threads, flags);
}
void GOMP_barrier(void) {
    static barrier_fn real;
    static thread_num_fn thread_num;
    barrier_fn f = __atomic_load_n(&real, __ATOMIC_ACQUIRE);
    thread_num_fn t = __atomic_load_n(&thread_num, __ATOMIC_ACQUIRE);
    if (!f) __atomic_store_n(&real, f = (barrier_fn)libgomp_symbol("GOMP_barrier"), __ATOMIC_RELEASE);
    if (!t) __atomic_store_n(&thread_num, t = (thread_num_fn)libgomp_symbol("omp_get_thread_num"), __ATOMIC_RELEASE);
    if (t() == 0) __atomic_add_fetch(&barriers, 1, __ATOMIC_RELAXED); /* once a team */
    f();
}
unsigned long barrier_shim_forked(void) { return forked; }
unsigned long barrier_shim_serial(void) { return serial; }
unsigned long barrier_shim_barriers(void) { return barriers; }
"""

# Runs in a child with the shim preloaded: counts one block of steps at --threads, then
# times --threads (and, with_one, 1 thread) in alternated blocks. Not 1 thread under
# OMP_WAIT_POLICY=active: the idle worker would spin through those blocks.
CHILD = r"""
import ctypes, json, sys, time
sys.path.insert(0, sys.argv[1])
import common, dlmone
preset, batch, seq_len, threads, steps, rounds, warmup, seed, with_one = sys.argv[2:3] + [int(a) for a in sys.argv[3:]]
process_symbols = ctypes.CDLL(None)  # the preloaded shim's counters are in the global scope
counters = {k: getattr(process_symbols, "barrier_shim_" + k) for k in ("forked", "serial", "barriers")}
for f in counters.values():
    f.restype = ctypes.c_ulong
cfg = dlmone.ModelConfig.preset(preset, seq_len=seq_len, dropout=0.0)
step = common.train_step(cfg, dlmone.DiffusionTransformer(cfg, seed=seed), None, batch, seed=seed).dlmone
dlmone.set_num_threads(threads)
for _ in range(warmup): step()
before = {k: f() for k, f in counters.items()}
per_block = max(1, steps // rounds)
for _ in range(per_block): step()
out = {k: (f() - before[k]) / per_block for k, f in counters.items()}
times = {threads: [], 1: []}
for _ in range(rounds):
    for n in (threads, 1) if with_one else (threads,):
        dlmone.set_num_threads(n)
        for _ in range(warmup): step()
        for _ in range(per_block):
            t = time.perf_counter(); step(); times[n].append(time.perf_counter() - t)
median = lambda xs: sorted(xs)[len(xs) // 2]
out["step_s"] = median(times[threads])
if with_one:
    out["step_1_thread_s"] = median(times[1])
print(json.dumps(out))
"""


def _compile(cc: List[str], source: str, out: str, flags: List[str], libs: List[str]) -> Optional[str]:
    """None, or why the C compiler could not build ``source``."""
    src = out + ".c"
    with open(src, "w") as f:
        f.write(source)
    try:
        r = subprocess.run(cc + flags + [src, "-o", out] + libs, capture_output=True, text=True)
    except OSError as e:
        return f"{cc[0]}: {e}"
    if r.returncode == 0:
        return None
    lines = r.stderr.strip().splitlines()
    return next((ln for ln in lines if "error" in ln), lines[0] if lines else f"exit {r.returncode}")


def _child(preset: str, ctx: Context, env: Dict[str, str], with_one: bool) -> Dict[str, Any]:
    shape = BENCH_BATCH[preset]
    args = [shape["batch"], shape["seq_len"], ctx.threads, ctx.pick(STEPS), ROUNDS, WARMUP, ctx.seed, int(with_one)]
    child = subprocess.run([sys.executable, "-c", CHILD, os.path.dirname(os.path.abspath(__file__)), preset]
                           + [str(a) for a in args], env=env, capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"barriers child for {preset} failed (exit {child.returncode}): "
                           f"{child.stderr[-2000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def run(ctx: Context) -> List[Row]:
    n = ctx.threads
    if n < 2:
        return [Row(SECTION, "barriers", "% of step", None, note="not measured: needs --threads 2 or more")]
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    with tempfile.TemporaryDirectory() as tmp:
        region_exe, shim_so = os.path.join(tmp, "region"), os.path.join(tmp, "shim.so")
        err = (_compile(cc, REGION_C, region_exe, ["-O2", "-fopenmp"], [])
               or _compile(cc, SHIM_C, shim_so, ["-O2", "-shared", "-fPIC"], ["-ldl"]))
        if err:
            return [Row(SECTION, "barriers", "% of step", None, note=f"not measured: C compiler: {err}")]
        env = dict(os.environ, OMP_NUM_THREADS=str(n))
        timer = subprocess.run([region_exe], env=env, capture_output=True, text=True)
        if timer.returncode != 0:
            return [Row(SECTION, "barriers", "% of step", None,
                        note=f"not measured: the region timer failed: {timer.stderr.strip()[-300:]}")]
        region_s = float(timer.stdout)
        log(f"barriers: an empty parallel region costs {region_s * 1e6:.2f} us at {n} threads")
        preload = " ".join(p for p in (os.environ.get("LD_PRELOAD", ""), shim_so) if p)
        env = dict(env, LD_PRELOAD=preload)
        rows = []
        for preset in ctx.pick(PRESETS):
            # separate processes drift by a few per cent: the policies alternate, and
            # each keeps its faster run
            runs: Dict[str, List[Dict[str, Any]]] = {"default": [], "active": []}
            for _ in range(POLICY_ROUNDS):
                runs["default"].append(_child(preset, ctx, env, True))
                runs["active"].append(_child(preset, ctx, dict(env, OMP_WAIT_POLICY="active"), False))
            m = min(runs["default"], key=lambda r: r["step_s"])
            active = min(runs["active"], key=lambda r: r["step_s"])
            m["step_wait_policy_active_s"] = active["step_s"]
            if m["forked"] == 0:
                rows.append(Row(SECTION, f"{preset} train step", "% of step", None,
                                note="not measured: no region forked (dlmone built without GNU OpenMP?)"))
                continue
            opened = m["forked"] + m["barriers"]
            cost = opened * region_s
            shortfall = m["step_s"] - m["step_1_thread_s"] / n
            details = dict(m, region_s=region_s, barrier_cost_s=cost, shortfall_s=shortfall)
            shape = BENCH_BATCH[preset]
            label = f"{preset} train step, batch {shape['batch']}x{shape['seq_len']}"
            log(f"barriers {preset}: {m['forked']:.0f} forked regions ({m['serial']:.0f} on one thread) + "
                f"{m['barriers']:.0f} barriers a step, {cost * 1e3:.3f} ms of {m['step_s'] * 1e3:.2f} ms; "
                f"1 thread {m['step_1_thread_s'] * 1e3:.2f} ms; workers spinning "
                f"{active['step_s'] * 1e3:.2f} ms")
            rows.append(Row(SECTION, f"{label}: forked regions + barriers a step", "count", opened,
                            details=details))
            rows.append(Row(SECTION, f"{label}: their fork/join cost", "% of step", 100 * cost / m["step_s"]))
            rows.append(Row(SECTION, f"{label}: OMP_WAIT_POLICY=active against the default", "s/step",
                            active["step_s"], m["step_s"], a_label="active", b_label="default",
                            higher_is_better=False))
            if shortfall > 0:
                rows.append(Row(SECTION, f"{label}: share of the loss against perfect scaling", "%",
                                100 * cost / shortfall,
                                note=f"{n} threads {m['step_s'] * 1e3:.2f} ms, 1 thread "
                                     f"{m['step_1_thread_s'] * 1e3:.2f} ms"))
        return rows
