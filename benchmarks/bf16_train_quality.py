"""Mixed-precision (bf16) training against float32, same seeds (issue 15 item 1's check):
the demo-size pipeline on the built-in task trained twice, once with every product in
float32 and once in bf16 (teacher and distillation), each scored in float32 on the
same test sources: the teacher's validation loss (goal: within 2%) and the students'
BLEU at 1 and 4 steps (goal: within 0.005), with the training times.

  python benchmarks/bf16_train_quality.py --threads 1 --out benchmarks/results/bf16_train_quality.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json_atomic  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/bf16_train_quality", help="folder for the runs (outside git)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import dlmone
    from dlmone.builtin_task import make_builtin_task
    from dlmone.data import Seq2SeqData
    from dlmone.demo import FULL, measure_generation
    from dlmone.distill import DistillConfig, distill
    from dlmone.teacher import TeacherConfig, train_teacher

    dlmone.set_num_threads(args.threads)
    data = Seq2SeqData.from_pairs(**make_builtin_task(n_train=FULL.n_train, n_valid=FULL.n_valid, n_test=FULL.n_test))
    quiet = dict(progress=False, print_fn=lambda s: None)
    result = {}
    for precision in ("float32", "bf16"):
        out = Path(args.runs) / precision
        t0 = time.perf_counter()
        tcfg = TeacherConfig(preset="tiny", steps=FULL.teacher_steps, vocab_size=1000, lr=1e-3, warmup=200,
                             batch_size=64, eval_every=FULL.teacher_steps // 4, save_every=FULL.teacher_steps,
                             eval_size=128, precision=precision, adaptive_threads=False)
        teacher = train_teacher(tcfg, data, out / "teacher", **quiet)
        t_teacher = time.perf_counter() - t0
        log = [json.loads(line) for line in (out / "teacher" / "log.jsonl").read_text().splitlines()]
        val = [r["val_loss"] for r in log if "val_loss" in r]
        t0 = time.perf_counter()
        dcfg = DistillConfig(steps=FULL.stage_steps, eval_every=FULL.eval_every, eval_size=FULL.n_valid,
                             save_every=FULL.stage_steps, lr_g=5e-4, lr_psi=1e-3, precision=precision,
                             adaptive_threads=False)
        student = distill(out / "teacher" / "teacher", data, dcfg, out / "distill", **quiet)
        t_distill = time.perf_counter() - t0
        scores = {f"student {k} step": measure_generation(student, data.test, steps=k)["scores"]["bleu"]
                  for k in (1, 4)}
        scores["teacher DDIM 10"] = measure_generation(teacher, data.test, method="ddim", steps=10)["scores"]["bleu"]
        result[precision] = {"teacher_val_loss": val, "bleu": scores, "teacher_seconds": t_teacher,
                             "distill_seconds": t_distill}
        print(precision, json.dumps(result[precision]), flush=True)
    f32, b16 = result["float32"], result["bf16"]
    result["val_loss_rel_diff"] = (b16["teacher_val_loss"][-1] - f32["teacher_val_loss"][-1]) / f32["teacher_val_loss"][-1]
    result["bleu_diff"] = {k: b16["bleu"][k] - f32["bleu"][k] for k in f32["bleu"]}
    result["machine"] = machine_info()
    result["threads"] = args.threads
    write_json_atomic(args.out, result)
    print(f"teacher val loss: float32 {f32['teacher_val_loss'][-1]:.4f}, bf16 {b16['teacher_val_loss'][-1]:.4f} "
          f"({100 * result['val_loss_rel_diff']:+.2f}%)")
    for k, d in result["bleu_diff"].items():
        print(f"{k}: float32 {f32['bleu'][k]:.4f}, bf16 {b16['bleu'][k]:.4f} ({d:+.4f})")


if __name__ == "__main__":
    main()
