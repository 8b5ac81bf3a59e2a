"""Two builds of dlmone side by side: the float32 training step (bench_train's: forward +
backward + AdamW, dropout 0) of each, at each thread count, in rounds that alternate the
builds (each round a fresh process per build); the fastest time of each over the rounds.

    git worktree add ../old HEAD~1 && (cd ../old && python setup.py -q build_ext --inplace)
    python benchmarks/ab_builds.py ../old . --rounds 3 --presets small,diffuseq_base \\
        --threads 1,2 --out benchmarks/results/ab_builds.json

A build is a checkout with its extension built in place; its folder goes first on the
child's sys.path. "tiny" is the built-in task's model at batch 64 x 32; "small" is the
preset (SPEC's E 64, H 128, 3 layers) at V 16000, batch 32 x 64; "diffuseq_base" batch
8 x 128. Prints B's speed relative to A per preset and thread count; writes JSON.
"""
import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, write_json_atomic  # noqa: E402

SHAPES = {"tiny": (32, 64, {}), "small": (64, 32, {"vocab_size": 16000}), "diffuseq_base": (128, 8, {})}

CHILD = r"""
import json, sys, time
import numpy as np
root, presets, threads = sys.argv[1], sys.argv[2].split(","), [int(t) for t in sys.argv[3].split(",")]
sys.path.insert(0, root)
sys.path.insert(0, root + "/benchmarks")
import dlmone, common
shapes = json.loads(sys.argv[4])
out = {"dlmone": dlmone.__file__}
for preset in presets:
    L, B, over = shapes[preset]
    cfg = dlmone.ModelConfig.preset(preset, seq_len=L, dropout=0.0, **over)
    step = common.train_step(cfg, dlmone.DiffusionTransformer(cfg, seed=0), None, B)
    for n in threads:
        dlmone.set_num_threads(n)
        step.dlmone()
        times = []
        for _ in range(15 if preset != "diffuseq_base" else 3):
            t0 = time.perf_counter()
            step.dlmone()
            times.append(time.perf_counter() - t0)
        out[f"{preset} {n}t"] = float(np.median(times))
print(json.dumps(out))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("build_a")
    p.add_argument("build_b")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--presets", default="small,diffuseq_base")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    for name in args.presets.split(","):
        if name not in SHAPES:
            p.error(f"--presets: unknown preset {name!r} (one of {', '.join(SHAPES)})")
    builds = [os.path.abspath(args.build_a), os.path.abspath(args.build_b)]
    runs = {b: [] for b in builds}
    for r in range(args.rounds):
        for b in builds:
            proc = subprocess.run([sys.executable, "-c", CHILD, b, args.presets, args.threads, json.dumps(SHAPES)],
                                  capture_output=True, text=True, cwd=b)
            if proc.returncode:
                sys.exit(f"build {b} failed:\n{proc.stderr[-3000:]}")
            runs[b].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}, {b}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in runs[b][-1].items()
                                                     if k != "dlmone"), flush=True)
    table = {}
    print(f"\n{'step':<22}{'A (ms)':>12}{'B (ms)':>12}{'B speed / A':>14}")
    for key in runs[builds[0]][0]:
        if key == "dlmone":
            continue
        a, b = (min(r[key] for r in runs[x]) for x in builds)
        table[key] = {"a_s": a, "b_s": b, "b_speed_over_a": a / b}
        print(f"{key:<22}{a * 1e3:>12.1f}{b * 1e3:>12.1f}{a / b:>14.3f}")
    if args.out:
        write_json_atomic(args.out, {"machine": machine_info(), "builds": builds, "rounds": runs, "fastest": table})


if __name__ == "__main__":
    main()
