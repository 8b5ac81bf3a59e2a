"""Distillation variants over several seeds on the built-in task (RESULTS §11).

One teacher (the demo's: `tiny`, 5,000 steps on 20,000 built-in pairs), then for each
variant and seed a two-stage distillation with the demo's settings, validated on 1,000
pairs; every student is scored at 1, 2, 4 and 8 steps on the same test sources as the
teacher's 2000-step ancestral sampler (and its DDIM curve). Prints mean ± sd over seeds,
the share of the teacher's BLEU and D's largest validation AUC; writes JSON.

    python benchmarks/distill_seeds.py --out benchmarks/results/distill_seeds.json \\
        --variant sid_only='{"adversarial": false}' --variant default='{}' --seeds 0 1 2
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json_atomic  # noqa: E402


STEPS = (1, 2, 4, 8)  # student inference steps scored


def monitors(run: Path) -> dict:
    """The run's discriminator AUC (largest over its validations) and mean adversarial share."""
    vals = [json.loads(line) for log in sorted(run.glob("stage*/log.jsonl"))
            for line in log.read_text().splitlines() if "val_bleu" in line]
    aucs = [r["val_disc_auc"] for r in vals if "val_disc_auc" in r]
    shares = [r["val_adv_share"] for r in vals if "val_adv_share" in r]
    return {"max_disc_auc": max(aucs) if aucs else None,
            "mean_adv_share": float(np.mean(shares)) if shares else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/distill_seeds", help="folder for the teacher and the runs")
    p.add_argument("--out", default="benchmarks/results/distill_seeds.json")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                   help="DistillConfig fields of one variant (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--teacher-steps", type=int, default=5000)
    p.add_argument("--stage-steps", type=int, default=300)
    p.add_argument("--n-test", type=int, default=200)
    args = p.parse_args()

    from dlmone.builtin_task import make_builtin_task
    from dlmone.data import Seq2SeqData
    from dlmone.demo import measure_baselines, measure_generation
    from dlmone.distill import DistillConfig, distill
    from dlmone.teacher import Teacher, TeacherConfig, train_teacher

    variants = dict(v.split("=", 1) for v in args.variant) or {"default": "{}"}
    work = Path(args.work)
    data = Seq2SeqData.from_pairs(**make_builtin_task(n_train=20000, n_valid=1000, n_test=args.n_test, seed=0))
    quiet = dict(progress=False, print_fn=lambda s: None)
    if not (work / "teacher" / "teacher").exists():
        train_teacher(TeacherConfig(preset="tiny", steps=args.teacher_steps, vocab_size=1000, lr=1e-3,
                                    warmup=min(200, args.teacher_steps), batch_size=64, eval_every=args.teacher_steps,
                                    save_every=args.teacher_steps, seed=0, eval_size=128),
                      data, work / "teacher", **quiet)
    teacher = Teacher.load(work / "teacher" / "teacher")
    # the teacher's figures on these test sources, measured once per --work and --n-test
    scores_path = work / "teacher" / f"scores-{len(data.test)}.json"
    if scores_path.exists():
        scores = json.loads(scores_path.read_text())
    else:
        scores = {"bleu": measure_generation(teacher, data.test, method="ancestral")["scores"]["bleu"],
                  # the teacher's DDIM curve on the same sources, for the students' BLEU-vs-NFE comparison
                  "ddim": {k: measure_generation(teacher, data.test, method="ddim", steps=k,
                                                 diversity=False)["scores"]["bleu"] for k in STEPS + (10,)},
                  "baselines": {b["name"]: b["scores"]["bleu"]
                                for b in measure_baselines(teacher, data.test, data.train, data.valid)}}
        write_json_atomic(str(scores_path), scores)
    teacher_bleu, baselines = scores["bleu"], scores["baselines"]
    teacher_ddim = {int(k): v for k, v in scores["ddim"].items()}
    print(f"teacher, 2000 ancestral steps, {len(data.test)} test sources: BLEU {teacher_bleu:.4f}", flush=True)
    print("teacher DDIM: " + " ".join(f"{k} step(s) {v:.4f}" for k, v in teacher_ddim.items()), flush=True)
    for name, bleu in baselines.items():
        print(f"{name}: BLEU {bleu:.4f}", flush=True)
    result = {"machine": machine_info(), "teacher_bleu": teacher_bleu, "teacher_ddim": teacher_ddim,
              "baselines": baselines,
              "n_test": len(data.test), "variants": {}}
    for name, fields in variants.items():
        runs = []
        for seed in args.seeds:
            # a variant's fields override the demo's settings (e.g. "steps" with "stages")
            fields_now = {"steps": args.stage_steps, "eval_every": 100, "eval_size": 1000, "lr_g": 5e-4,
                          "lr_psi": 1e-3, "seed": seed, **json.loads(fields)}
            cfg = DistillConfig(save_every=fields_now["steps"], **fields_now)
            student = distill(work / "teacher" / "teacher", data, cfg, work / f"{name}-seed{seed}", **quiet)
            bleu = {k: measure_generation(student, data.test, steps=k, diversity=False)["scores"]["bleu"]
                    for k in STEPS}
            print(f"{name} seed {seed}: " + " ".join(f"{k} step {v:.4f}" for k, v in bleu.items()), flush=True)
            runs.append({**bleu, **monitors(work / f"{name}-seed{seed}")})
        result["variants"][name] = {"config": json.loads(fields), "runs": runs}
    print(f"\n{'variant':<28}" + "".join(f"{f'{k} step(s)':>22}" for k in STEPS) + f"{'max D AUC':>11}")
    for name, v in result["variants"].items():
        cells = []
        for k in STEPS:
            x = np.array([r[k] for r in v["runs"]])
            sd = x.std(ddof=1) if len(x) > 1 else 0.0
            share = f"{x.mean() / teacher_bleu:4.0%}" if teacher_bleu > 0 else "n/a"
            cells.append(f"{x.mean():.4f}±{sd:.4f} ({share})")
        aucs = [r["max_disc_auc"] for r in v["runs"] if r.get("max_disc_auc") is not None]
        print(f"{name:<28}" + "".join(f"{c:>22}" for c in cells) + (f"{np.mean(aucs):>11.3f}" if aucs else f"{'-':>11}"))
    write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
