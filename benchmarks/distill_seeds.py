"""Distillation variants over several seeds, on the built-in task or a real one (RESULTS §11, §13).

One teacher (on the built-in task the demo's: `tiny`, 5,000 steps on 20,000 built-in pairs;
on a DiffuSeq data folder the EMA weights of ``--teacher``, a teacher folder or training
checkpoint), then for each variant and seed a two-stage distillation with the demo's
settings, validated on 1,000 validation pairs; every student is scored at 1, 2, 4 and 8
steps on the same test sources as the teacher's 2000-step ancestral sampler (and its DDIM
curve). Prints mean ± sd over seeds, the share of the teacher's BLEU and D's largest
validation AUC; writes JSON. The teacher's figures are measured after the students, once per
``--work`` and ``--n-test``: runs of single seeds side by side (one thread each) share them,
and ``--seeds`` with no seed measures them alone.

    python benchmarks/distill_seeds.py --out benchmarks/results/distill_seeds.json \\
        --variant sid_only='{"adversarial": false}' --variant default='{}' --seeds 0 1 2
    python benchmarks/distill_seeds.py --task ../shared/data/qqp --teacher runs/qqp-long/checkpoints/step-00006000 \\
        --work runs/qqp-seeds --n-test 200 --stage-steps 200 --variant 'tinit1999={"t_init": 1999}' --seeds 0
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
    """The run's discriminator AUC (largest over its validations), mean adversarial share, the
    generator's validation BLEU as initialised and each stage's selected step (0: the stage
    never beat its starting point, so the student is that starting point)."""
    logs = sorted(run.glob("stage*/log.jsonl"))
    by_stage = [[json.loads(line) for line in log.read_text().splitlines() if "val_bleu" in line] for log in logs]
    vals = [r for stage in by_stage for r in stage]
    aucs = [r["val_disc_auc"] for r in vals if "val_disc_auc" in r]
    shares = [r["val_adv_share"] for r in vals if "val_adv_share" in r]
    # the first of equal maxima: distill keeps a validation only when it is strictly better
    selected = [max(stage, key=lambda r: (r["val_bleu"], -r["step"])) for stage in by_stage if stage]
    return {"max_disc_auc": max(aucs) if aucs else None,
            "mean_adv_share": float(np.mean(shares)) if shares else None,
            "init_val_bleu": by_stage[0][0]["val_bleu"] if by_stage and by_stage[0] else None,
            "selected": [{"step": r["step"], "val_bleu": r["val_bleu"]} for r in selected]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="builtin", help="'builtin' or a DiffuSeq data folder")
    p.add_argument("--teacher", help="a DiffuSeq task's teacher: a teacher folder, or a training run or checkpoint "
                                     "folder (its EMA weights)")
    p.add_argument("--split", default="test", help="the split whose first --n-test pairs are scored")
    p.add_argument("--work", default="runs/distill_seeds", help="folder for the teacher and the runs")
    p.add_argument("--out", default="benchmarks/results/distill_seeds.json")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                   help="DistillConfig fields of one variant (repeatable)")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                   help="none: the teacher's scores only")
    p.add_argument("--teacher-steps", type=int, default=5000)
    p.add_argument("--stage-steps", type=int, default=300)
    p.add_argument("--n-test", type=int, default=200)
    args = p.parse_args()
    if (args.task == "builtin") == bool(args.teacher):
        p.error("--teacher goes with a DiffuSeq --task folder, and only with it")

    from dlmone.builtin_task import make_builtin_task
    from dlmone.data import Seq2SeqData, load_split
    from dlmone.demo import measure_baselines, measure_generation
    from dlmone.distill import DistillConfig, distill
    from dlmone.teacher import Teacher, TeacherConfig, teacher_from_checkpoint, train_teacher

    variants = dict(v.split("=", 1) for v in args.variant) or {"default": "{}"}
    work = Path(args.work)
    quiet = dict(progress=False, print_fn=lambda s: None)
    if args.task == "builtin":
        data = Seq2SeqData.from_pairs(**make_builtin_task(n_train=20000, n_valid=1000, n_test=args.n_test, seed=0))
    else:
        data = Seq2SeqData(train=load_split(args.task, "train"), valid=load_split(args.task, "valid", limit=1000),
                           test=load_split(args.task, args.split, limit=args.n_test))
        if not (work / "teacher" / "teacher").exists():
            source = Path(args.teacher)
            teacher = (Teacher.load(source) if (source / "config.json").exists()
                       else teacher_from_checkpoint(source))
            teacher.save(work / "teacher" / "teacher")
    if not (work / "teacher" / "teacher").exists():
        train_teacher(TeacherConfig(preset="tiny", steps=args.teacher_steps, vocab_size=1000, lr=1e-3,
                                    warmup=min(200, args.teacher_steps), batch_size=64, eval_every=args.teacher_steps,
                                    save_every=args.teacher_steps, seed=0, eval_size=128),
                      data, work / "teacher", **quiet)
    teacher = Teacher.load(work / "teacher" / "teacher")
    result = {"machine": machine_info(), "task": args.task, "split": args.split,
              "teacher_info": {k: v for k, v in teacher.info.items() if k == "checkpoint_step"},
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
            mon = monitors(work / f"{name}-seed{seed}")
            print(f"{name} seed {seed}: " + " ".join(f"{k} step {v:.4f}" for k, v in bleu.items())
                  + f"; validation BLEU as initialised {mon['init_val_bleu']:.4f}, selected "
                  + ", ".join(f"step {r['step']} ({r['val_bleu']:.4f})" for r in mon["selected"]), flush=True)
            runs.append({**bleu, **mon})
        result["variants"][name] = {"config": json.loads(fields), "runs": runs}
    # the teacher's figures on these test sources, measured once per --work and --n-test (after
    # the students, so that runs of other seeds beside this one can share them)
    scores_path = work / "teacher" / f"scores-{len(data.test)}.json"
    if scores_path.exists():
        scores = json.loads(scores_path.read_text())
    else:
        scores = {"bleu": measure_generation(teacher, data.test, method="ancestral", diversity=False)["scores"]["bleu"],
                  # the teacher's DDIM curve on the same sources, for the students' BLEU-vs-NFE comparison
                  "ddim": {k: measure_generation(teacher, data.test, method="ddim", steps=k,
                                                 diversity=False)["scores"]["bleu"] for k in STEPS + (10,)},
                  "baselines": {b["name"]: b["scores"]["bleu"]
                                for b in measure_baselines(teacher, data.test, data.train, data.valid)}}
        write_json_atomic(str(scores_path), scores)
    teacher_bleu, baselines = scores["bleu"], scores["baselines"]
    teacher_ddim = {int(k): v for k, v in scores["ddim"].items()}
    result.update(teacher_bleu=teacher_bleu, teacher_ddim=teacher_ddim, baselines=baselines)
    print(f"teacher, 2000 ancestral steps, {len(data.test)} test sources: BLEU {teacher_bleu:.4f}", flush=True)
    print("teacher DDIM: " + " ".join(f"{k} step(s) {v:.4f}" for k, v in teacher_ddim.items()), flush=True)
    for name, bleu in baselines.items():
        print(f"{name}: BLEU {bleu:.4f}", flush=True)
    print(f"\n{'variant':<28}" + "".join(f"{f'{k} step(s)':>22}" for k in STEPS) + f"{'max D AUC':>11}")
    for name, v in result["variants"].items():
        if not v["runs"]:
            continue
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
