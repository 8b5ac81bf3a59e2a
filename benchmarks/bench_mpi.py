"""Data-parallel training over MPI (issue 8): the all-reduce against the step it serves.

    python benchmarks/bench_mpi.py [--quick] [--ranks 2] [--data DIR] [--json PATH]

Needs Open MPI's mpirun and mpi4py. Sections:
  allreduce  one in-place Allreduce (sum) of each preset's float32 gradient buffer over
             --ranks ranks on this machine, as every training step does once per network:
             median over repetitions, each started after a Barrier and timed on the
             slowest rank.
  step       one teacher training step of each preset (training_loss forward + backward,
             AdamW, EMA; dropout as the preset) at bench_core's batch (64 x 32 for tiny and
             small, 8 x 128 for diffuseq_base) in one process with every core as a thread,
             and a rank's share of it: 1/--ranks of the batch on one thread.
  scaling    ``dlmone train-teacher --preset small`` on --data (QQP's first 20k pairs,
             vocabulary 6000) as 1 process x all cores and as --ranks ranks x 1 core
             (mpirun binds each to a core), the runs alternating: steps/s (median of the
             logged 5-step windows, the first one left out) and the time per step inside
             MPI collectives that rank 0 logs.
  estimate   ring all-reduce over K nodes, 2(K-1)·α + 2(K-1)/K · bytes/β, for K = 2 and 16
             on 10 GbE and 100 Gb/s InfiniBand (the assumptions are written into the JSON).

The machine may be shared with other jobs: every figure is a median and the load
average at the start is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import common  # noqa: E402  (puts the repository root on sys.path)
from common import ROOT, log  # noqa: E402

DEFAULT_JSON = os.path.join(HERE, "results", "bench_mpi.json")
QUICK_JSON = os.path.join(HERE, "results", "bench_mpi_quick.json")
PRESETS = ("tiny", "small", "diffuseq_base")
STEP_PLANS = {"tiny": dict(batch=64, seq_len=32, reps=10), "small": dict(batch=64, seq_len=32, reps=10),
              "diffuseq_base": dict(batch=8, seq_len=128, reps=3)}
# effective bandwidth β (bytes/s) and per-message latency α (s) of the two networks
NETWORKS = {"10GbE": dict(bandwidth=1.1e9, latency=50e-6),
            "100Gb/s InfiniBand": dict(bandwidth=11e9, latency=2e-6)}
NETWORK_NOTE = ("ring all-reduce 2(K-1)·α + 2(K-1)/K·bytes/β; β is ~90% of the line rate "
                "(10 GbE: 1.1 GB/s, 100 Gb/s IB: 11 GB/s), α is 50 µs over TCP and 2 µs over IB verbs; "
                "one rank per node, the gradient sent as one float32 buffer, no overlap with compute")
SMALL_RUN = ["--preset", "small", "--set", "vocab_size=6000", "--set", "train_limit=20000",
             "--set", "eval_every=100000", "--set", "save_every=100000", "--set", "log_every=5",
             "--set", "eval_samples=1", "--set", "eval_sample_steps=1", "--set", "eval_size=64"]


def mpi_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")])),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.pop("OMP_NUM_THREADS", None)
    return env


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few repetitions and steps (smoke test)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--data", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "qqp"),
                   help="data folder of the scaling runs ('builtin' if the default is missing)")
    p.add_argument("--json", default=None, help=f"output (default {os.path.relpath(DEFAULT_JSON, ROOT)}, "
                                                 f"with --quick {os.path.relpath(QUICK_JSON, ROOT)})")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side in the scaling section")
    p.add_argument("--steps", type=int, default=60, help="training steps of each scaling run")
    p.add_argument("--allreduce-worker", nargs=2, metavar=("SIZES", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.steps = 1, 15
    if args.json is None:
        args.json = QUICK_JSON if args.quick else DEFAULT_JSON
    if not os.path.isdir(args.data):
        args.data = "builtin"
    return args


# ---------------------------------------------------------------- allreduce
def allreduce_worker(sizes: List[int], reps: int, out: str) -> None:
    """Runs under mpirun: times comm.sum_inplace (one in-place Allreduce) per size."""
    from dlmone.distributed import world

    comm = world()
    if comm.size < 2:
        raise SystemExit("the allreduce worker runs under mpirun with at least 2 ranks")
    result = []
    for n in sizes:
        buf = np.ones(n, np.float32)
        samples = []
        for i in range(reps + 2):  # two warm-up calls
            comm.barrier()
            t0 = time.perf_counter()
            comm.sum_inplace(buf)
            slowest = max(comm.allgather(time.perf_counter() - t0))
            if i >= 2:
                samples.append(slowest)
        assert buf[0] == comm.size ** (reps + 2), "the all-reduce did not sum"
        result.append({"floats": n, "median_s": statistics.median(samples), "samples_s": samples})
    if comm.is_root:
        common.write_json_atomic(out, result)


def bench_allreduce(params: Dict[str, int], ranks: int, quick: bool) -> Dict[str, Any]:
    reps = 3 if quick else 10
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "allreduce.json")
        sizes = ",".join(str(params[name]) for name in PRESETS)
        cmd = ["mpirun", "-n", str(ranks), "--oversubscribe", sys.executable, os.path.abspath(__file__),
               "--reps", str(reps), "--allreduce-worker", sizes, out]
        subprocess.run(cmd, env=mpi_env(), check=True, timeout=1800)
        with open(out) as f:
            rows = json.load(f)
    return {name: {"params": params[name], "bytes": 4 * params[name], **row}
            for name, row in zip(PRESETS, rows)}


# ---------------------------------------------------------------------- step
def bench_step(name: str, quick: bool, ranks: int = 1) -> Dict[str, Any]:
    """A training step at the plan's batch with every core (ranks=1), or a rank's share of
    it, 1/ranks of the batch on one thread."""
    import dlmone
    from dlmone.diffusion import Diffusion, LossAwareSampler, training_loss
    from dlmone.optim import EMA, AdamW

    plan = STEP_PLANS[name]
    B, L = plan["batch"] // ranks, plan["seq_len"]
    threads = dlmone.get_num_threads()
    if ranks > 1:
        dlmone.set_num_threads(1)
    cfg = dlmone.ModelConfig.preset(name, seq_len=L)
    model = dlmone.DiffusionTransformer(cfg, seed=0)
    opt, ema = AdamW(model, lr=1e-4), EMA(model, 0.9999)
    diffusion = Diffusion(cfg.diffusion_steps)
    sampler = LossAwareSampler(diffusion.T)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (B, L))
    mask = np.zeros((B, L), np.float32)
    mask[:, L // 2:] = 1.0

    def step(i: int) -> None:
        model.zero_grad()
        t, w = sampler.sample(B, rng)
        training_loss(model, diffusion, tokens, mask, t, w, seed=i)
        opt.step()
        ema.update()

    try:
        step(0)  # warm-up
        samples = []
        for i in range(1 if quick else plan["reps"]):
            t0 = time.perf_counter()
            step(i + 1)
            samples.append(time.perf_counter() - t0)
        return {"batch": B, "seq_len": L, "threads": dlmone.get_num_threads(), "dropout": cfg.dropout,
                "params": model.num_parameters(), "median_s": statistics.median(samples),
                "samples_s": samples}
    finally:
        dlmone.set_num_threads(threads)


# ------------------------------------------------------------------- scaling
def train_run(ranks: int, args: argparse.Namespace, out: str) -> Dict[str, Any]:
    cores = len(os.sched_getaffinity(0))
    dl = [sys.executable, "-m", "dlmone", "--quiet", "--threads", str(cores if ranks == 1 else 1),
          "train-teacher", "--data", args.data, "--steps", str(args.steps), *SMALL_RUN, "--out", out]
    cmd = dl if ranks == 1 else ["mpirun", "-n", str(ranks), "--bind-to", "core", *dl]
    subprocess.run(cmd, env=mpi_env(), check=True, timeout=3600)
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [r for r in map(json.loads, f) if "tokens_per_s" in r]
    with open(os.path.join(out, "teacher", "config.json")) as f:
        tc = json.load(f)["teacher_config"]
    tokens_per_step = tc["batch_size"] * tc["grad_accum"] * tc["seq_len"]
    windows = records[1:] or records  # the first window holds the warm-up
    return {"steps_per_s": [r["tokens_per_s"] / tokens_per_step for r in windows],
            "comm_s_per_step": [r["comm_s_per_step"] for r in windows if "comm_s_per_step" in r]}


def bench_scaling(args: argparse.Namespace) -> Dict[str, Any]:
    sides: Dict[int, Dict[str, List[float]]] = {1: {"steps_per_s": [], "comm_s_per_step": []},
                                                args.ranks: {"steps_per_s": [], "comm_s_per_step": []}}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for ranks in sides if rep % 2 == 0 else reversed(list(sides)):
                log(f"scaling: small, {ranks} rank(s), run {rep + 1}/{args.repeats}")
                out = os.path.join(tmp, f"run-{ranks}-{rep}")
                for key, values in train_run(ranks, args, out).items():
                    sides[ranks][key].extend(values)
                shutil.rmtree(out)
    cores = len(os.sched_getaffinity(0))
    result = {}
    for ranks, s in sides.items():
        row = {"ranks": ranks, "threads_per_rank": cores if ranks == 1 else 1,
               "steps_per_s_median": statistics.median(s["steps_per_s"]),
               "steps_per_s_windows": s["steps_per_s"]}
        if s["comm_s_per_step"]:
            row["comm_s_per_step_median"] = statistics.median(s["comm_s_per_step"])
        result[f"{ranks}_rank{'s' if ranks > 1 else ''}"] = row
    return result


# ------------------------------------------------------------------ estimate
def ring_allreduce_s(nbytes: int, nodes: int, bandwidth: float, latency: float) -> float:
    return 2 * (nodes - 1) * latency + 2 * (nodes - 1) / nodes * nbytes / bandwidth


def estimates(params: Dict[str, int], steps: Dict[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {"assumptions": NETWORK_NOTE, "presets": {}}
    for name in PRESETS:
        nbytes = 4 * params[name]
        rows = {}
        for net, spec in NETWORKS.items():
            for nodes in (2, 16):
                s = ring_allreduce_s(nbytes, nodes, spec["bandwidth"], spec["latency"])
                rows[f"{net}, {nodes} nodes"] = {"allreduce_s": s,
                                                 "fraction_of_step": s / steps[name]["median_s"]}
        out["presets"][name] = {"bytes": nbytes, "step_s_one_node": steps[name]["median_s"], "networks": rows}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.allreduce_worker:
        sizes, out = args.allreduce_worker
        allreduce_worker([int(n) for n in sizes.split(",")], args.reps, out)
        return 0
    if shutil.which("mpirun") is None:
        raise SystemExit("bench_mpi needs mpirun (apt-get install openmpi-bin libopenmpi-dev) and mpi4py")
    doc: Dict[str, Any] = {"quick": args.quick, "ranks": args.ranks,
                           "environment": {"machine": common.machine_info(), "dlmone": common.dlmone_info()}}
    steps, rank_steps = {}, {}
    for name in PRESETS:
        log(f"step: {name}")
        steps[name] = bench_step(name, args.quick)
        rank_steps[name] = bench_step(name, args.quick, args.ranks)
    doc["step"], doc["rank_step"] = steps, rank_steps
    log(f"allreduce: {args.ranks} ranks")
    doc["allreduce"] = bench_allreduce({n: steps[n]["params"] for n in PRESETS}, args.ranks, args.quick)
    for name in PRESETS:
        a = doc["allreduce"][name]
        a["fraction_of_step"] = a["median_s"] / steps[name]["median_s"]
        a["fraction_of_rank_step"] = a["median_s"] / rank_steps[name]["median_s"]
    doc["scaling"] = {"data": args.data, "steps": args.steps, "repeats": args.repeats, **bench_scaling(args)}
    doc["estimate"] = estimates({n: steps[n]["params"] for n in PRESETS}, steps)
    common.write_json_atomic(args.json, doc)

    print(f"{'preset':14} {'params':>11} {'step, 1 proc':>13} {'rank step':>11} {'allreduce':>11} "
          f"{'/ rank step':>11}")
    for name in PRESETS:
        a, s, r = doc["allreduce"][name], steps[name], rank_steps[name]
        print(f"{name:14} {a['params']:>11,} {s['median_s'] * 1e3:>10.1f} ms {r['median_s'] * 1e3:>8.1f} ms "
              f"{a['median_s'] * 1e3:>8.2f} ms {a['fraction_of_rank_step']:>11.1%}")
    for key, row in doc["scaling"].items():
        if isinstance(row, dict):
            comm_s = row.get("comm_s_per_step_median")
            print(f"small, {key}: {row['steps_per_s_median']:.2f} steps/s"
                  + (f", {comm_s * 1e3:.1f} ms/step in MPI collectives" if comm_s is not None else ""))
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
