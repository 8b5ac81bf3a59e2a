"""Issue 15 item 4: what OpenMP's fork/join barriers cost a training step.

Every kernel of dlmone's core is its own parallel region, so a step opens about a
hundred of them. A region's fork and join cost is measured by a C program (an empty
``parallel for`` over the threads, 10^5 times), and the regions and explicit barriers a
step opens are counted by interposing libgomp's ``GOMP_parallel`` and ``GOMP_barrier``
(an LD_PRELOAD library, built here with the C compiler). Their product, against the
step's time, bounds what one parallel region per layer or a persistent team could save:

  cost share   = (regions + barriers) x region cost / the step at --threads
  of shortfall = the same / (the step at --threads - the 1-thread step / --threads)

The second is the fraction of the step's loss against perfect scaling that barriers
explain; the rest is threads waiting for each other (unequal work, serial Python
between kernels).

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
STEPS = {"full": 60, "quick": 15}

REGION_C = r"""
#include <omp.h>
#include <stdio.h>
int main(void) {
    volatile int sink = 0;
    double best = 1e30;
    for (int round = 0; round < 3; round++) {
        double t0 = omp_get_wtime();
        for (int i = 0; i < 100000; i++) {
#pragma omp parallel for schedule(static)
            for (int j = 0; j < omp_get_num_threads(); j++) sink += j;
        }
        double t = (omp_get_wtime() - t0) / 100000;
        if (t < best) best = t;
    }
    printf("%.9f\n", best);
    return 0;
}
"""

# Counts libgomp's region entries and explicit barriers; the real functions are looked
# up in the libgomp already loaded (dlmone._core's), since an extension module's
# libraries are not in the global scope that RTLD_NEXT searches.
SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
static unsigned long regions, barriers;
static void *gomp(const char *name) {
    void *lib = dlopen("libgomp.so.1", RTLD_NOW | RTLD_NOLOAD);
    return lib ? dlsym(lib, name) : 0;
}
void GOMP_parallel(void (*fn)(void *), void *data, unsigned threads, unsigned flags) {
    static void (*real)(void (*)(void *), void *, unsigned, unsigned);
    if (!real) real = gomp("GOMP_parallel");
    __atomic_add_fetch(&regions, 1, __ATOMIC_RELAXED);
    real(fn, data, threads, flags);
}
void GOMP_barrier(void) {
    static void (*real)(void);
    if (!real) real = gomp("GOMP_barrier");
    __atomic_add_fetch(&barriers, 1, __ATOMIC_RELAXED);
    real();
}
unsigned long barrier_shim_regions(void) { return regions; }
unsigned long barrier_shim_barriers(void) { return barriers; }
"""

# Runs in a child with the shim preloaded: steps at --threads (counted) and at 1 thread.
CHILD = r"""
import ctypes, json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
import common, dlmone
preset, batch, seq_len, threads, steps = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
shim = ctypes.CDLL(None)
for f in ("barrier_shim_regions", "barrier_shim_barriers"):
    getattr(shim, f).restype = ctypes.c_ulong
cfg = dlmone.ModelConfig.preset(preset, seq_len=seq_len)
step = common.train_step(cfg, dlmone.DiffusionTransformer(cfg, seed=0), None, batch).dlmone
def median_step(n):
    dlmone.set_num_threads(n)
    for _ in range(3): step()
    ts = []
    for _ in range(steps):
        t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]
r0, b0 = shim.barrier_shim_regions(), shim.barrier_shim_barriers()
out = {"step_s": median_step(threads)}
# the 3 warm-up steps were counted too
out["regions"] = (shim.barrier_shim_regions() - r0) / (steps + 3)
out["barriers"] = (shim.barrier_shim_barriers() - b0) / (steps + 3) / threads  # each thread calls it
out["step_1_thread_s"] = median_step(1)
out["dropout"] = cfg.dropout
print(json.dumps(out))
"""


def _compile(cc: List[str], source: str, out: str, flags: List[str]) -> Optional[str]:
    src = out + ".c"
    with open(src, "w") as f:
        f.write(source)
    r = subprocess.run(cc + flags + [src, "-o", out], capture_output=True, text=True)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["failed"])[-1]


def run(ctx: Context) -> List[Row]:
    n = ctx.threads
    if n < 2:
        return [Row(SECTION, "barriers", "% of step", None, note="not measured: needs --threads 2 or more")]
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    with tempfile.TemporaryDirectory() as tmp:
        region_exe, shim_so = os.path.join(tmp, "region"), os.path.join(tmp, "shim.so")
        err = (_compile(cc, REGION_C, region_exe, ["-O2", "-fopenmp"])
               or _compile(cc, SHIM_C, shim_so, ["-O2", "-shared", "-fPIC", "-ldl"]))
        if err:
            return [Row(SECTION, "barriers", "% of step", None, note=f"not measured: C compiler: {err}")]
        env = dict(os.environ, OMP_NUM_THREADS=str(n))
        region_s = float(subprocess.run([region_exe], env=env, capture_output=True, text=True,
                                        check=True).stdout)
        log(f"barriers: an empty parallel region costs {region_s * 1e6:.2f} us at {n} threads")
        rows = []
        for preset in ctx.pick(PRESETS):
            shape = BENCH_BATCH[preset]
            child = subprocess.run(
                [sys.executable, "-c", CHILD, os.path.dirname(os.path.abspath(__file__)), preset,
                 str(shape["batch"]), str(shape["seq_len"]), str(n), str(ctx.pick(STEPS))],
                env=dict(env, LD_PRELOAD=shim_so), capture_output=True, text=True)
            if child.returncode != 0:
                raise RuntimeError(f"barriers child for {preset} failed: {child.stderr[-2000:]}")
            m: Dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
            if m["regions"] == 0:
                rows.append(Row(SECTION, f"{preset} train step", "% of step", None,
                                note="not measured: no GOMP_parallel call seen (dlmone not on the system libgomp)"))
                continue
            cost = (m["regions"] + m["barriers"]) * region_s
            shortfall = m["step_s"] - m["step_1_thread_s"] / n
            details = dict(m, region_s=region_s, barrier_cost_s=cost, shortfall_s=shortfall)
            label = f"{preset} train step, batch {shape['batch']}x{shape['seq_len']}, dropout {m['dropout']}"
            log(f"barriers {preset}: {m['regions']:.0f} regions + {m['barriers']:.0f} barriers a step, "
                f"{cost * 1e3:.3f} ms of {m['step_s'] * 1e3:.2f} ms; 1 thread {m['step_1_thread_s'] * 1e3:.2f} ms")
            rows.append(Row(SECTION, f"{label}: regions + barriers a step", "count",
                            m["regions"] + m["barriers"], details=details))
            rows.append(Row(SECTION, f"{label}: their fork/join cost", "% of step", 100 * cost / m["step_s"]))
            if shortfall > 0:
                rows.append(Row(SECTION, f"{label}: share of the loss against perfect scaling", "%",
                                100 * cost / shortfall,
                                note=f"{n} threads {m['step_s'] * 1e3:.2f} ms, 1 thread "
                                     f"{m['step_1_thread_s'] * 1e3:.2f} ms"))
        return rows
