"""bf16 inference (AMX) against float32 on a trained teacher and student: BLEU and
sequences/s of the same samplers, same seeds, same sources. Issue 7 asks that bf16
keeps BLEU within 0.005 of float32.

  python benchmarks/bf16_quality.py --task builtin \\
      --teacher benchmarks/results/builtin/teacher/teacher \\
      --student benchmarks/results/builtin/student-two-stage --out benchmarks/results/bf16_builtin.json
  python benchmarks/bf16_quality.py --task ../shared/data/qqp --teacher runs/qqp-small/teacher \\
      --student benchmarks/results/qqp/student-two-stage --out benchmarks/results/bf16_qqp.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402

TOLERANCE = 0.005


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="builtin", help="'builtin' or a DiffuSeq data folder")
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=200, help="sources for the fast samplers")
    p.add_argument("--n-slow", type=int, default=100, help="sources for the T-step ancestral sampler")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import dlmone
    from dlmone.builtin_task import make_builtin_task
    from dlmone.checkpoint import atomic_write_json
    from dlmone.data import load_split
    from dlmone.demo import measure_generation

    if not dlmone.build_info()["amx_bf16"]:
        sys.exit("this machine or build has no AMX-BF16: nothing to compare")
    dlmone.set_num_threads(args.threads)
    if args.task == "builtin":
        pairs = make_builtin_task(n_train=20000, n_valid=200, n_test=max(args.n, 200))[args.split]
    else:
        pairs = load_split(args.task, args.split)
    pairs = pairs[:args.n]
    teacher, student = dlmone.load(args.teacher), dlmone.load(args.student)
    T = teacher.diffusion.T
    runs = [(f"teacher ancestral {T}", teacher, pairs[:args.n_slow], dict(method="ancestral")),
            ("teacher DDIM 10", teacher, pairs, dict(method="ddim", steps=10)),
            ("student 1 step", student, pairs, dict(steps=1)),
            ("student 4 steps", student, pairs, dict(steps=4))]
    rows = []
    print(f"{'generator':<24}{'BLEU fp32':>10}{'BLEU bf16':>10}{'diff':>8}{'seq/s fp32':>11}{'seq/s bf16':>11}"
          f"{'speed-up':>9}  within {TOLERANCE}")
    for name, model, subset, kw in runs:
        res = {}
        for precision in ("float32", "bf16"):
            model.model.inference_precision = precision
            t0 = time.perf_counter()
            res[precision] = measure_generation(model, subset, **kw)["scores"]
            res[precision]["wall_s"] = time.perf_counter() - t0
        model.model.inference_precision = "float32"
        a, b = res["float32"], res["bf16"]
        row = {"name": name, "n": len(subset), "bleu_fp32": a["bleu"], "bleu_bf16": b["bleu"],
               "bleu_diff": b["bleu"] - a["bleu"], "seq_per_s_fp32": a["seq_per_s"],
               "seq_per_s_bf16": b["seq_per_s"], "speedup": b["seq_per_s"] / a["seq_per_s"],
               "within_tolerance": abs(b["bleu"] - a["bleu"]) <= TOLERANCE}
        rows.append(row)
        print(f"{name:<24}{row['bleu_fp32']:>10.4f}{row['bleu_bf16']:>10.4f}{row['bleu_diff']:>+8.4f}"
              f"{row['seq_per_s_fp32']:>11.1f}{row['seq_per_s_bf16']:>11.1f}{row['speedup']:>8.2f}x  "
              f"{'yes' if row['within_tolerance'] else 'NO'}", flush=True)
        atomic_write_json(args.out, {"task": args.task, "teacher": args.teacher, "student": args.student,
                                     "tolerance": TOLERANCE, "machine": machine_info(), "rows": rows})


if __name__ == "__main__":
    main()
