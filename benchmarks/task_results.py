"""Quality and speed of teacher and student on one task: the tables of RESULTS.md.

Trains (or reuses) a teacher, evaluates its samplers (ancestral T steps with clamping,
DDIM k), distils it in the configured variants (two stages, one stage, SiD only,
linear discriminator head ...), evaluates the students at 1/2/4 steps, and writes a
JSON, a markdown table and a PNG of BLEU against network evaluations per sequence. The
table has both BLEU orientations (SPEC §7) and SPEC §7.1's baselines as rows (copy the
source, the most frequent training target, the best of 10 frequent targets on valid),
and warns about every model row that does not beat the constant string.

  python benchmarks/task_results.py --task builtin --out benchmarks/results/builtin
  python benchmarks/task_results.py --task ../shared/data/qqp --teacher runs/qqp-small/teacher \
      --split test --variants two-stage --out benchmarks/results/qqp
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json_atomic  # noqa: E402

VARIANTS = {
    "two-stage": {},
    "one-stage": {"stages": 1, "steps_factor": 2},
    "SiD only (no adversarial)": {"adversarial": False},
    "linear D head": {"disc_head": "linear"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="builtin", help="'builtin' or a DiffuSeq data folder")
    p.add_argument("--teacher", help="an existing teacher folder, or a training run / checkpoint folder "
                                     "(its EMA weights; else a teacher is trained)")
    p.add_argument("--teacher-steps", type=int, default=4000)
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=200, help="sources for the fast samplers")
    p.add_argument("--skip", type=int, default=0,
                   help="skip the split's first N pairs (when --split valid: distillation validates on the first 200)")
    p.add_argument("--n-slow", type=int, default=200, help="sources for the T-step ancestral sampler")
    p.add_argument("--slow-once", action="store_true",
                   help="run the T-step sampler once (no second seed, no self-BLEU): half its time")
    p.add_argument("--mbr", type=int, default=0, metavar="S",
                   help="also the teacher's DDIM 10 and the students' 1 step with MBR over S candidates "
                        "(DiffuSeq's protocol for its headline figures: S = 10)")
    p.add_argument("--stage-steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--set", action="append", default=[], help="DistillConfig override key=value (all variants)")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--table-only", action="store_true",
                   help="rebuild table.md, the plot and the warnings from --out's results.json")
    args = p.parse_args()
    if args.table_only:
        record = json.loads((Path(args.out) / "results.json").read_text())
        rows = record.pop("rows")
        finish(Path(args.out), record, rows, max(r["nfe"] for r in rows if r["kind"] == "teacher"), args.task)
        return

    import dlmone
    from dlmone.builtin_task import make_builtin_task
    from dlmone.config_io import apply_overrides
    from dlmone.data import Seq2SeqData, load_split
    from dlmone.demo import measure_baselines, measure_generation
    from dlmone.metrics import BLEU_PROTOCOL
    from dlmone.distill import DistillConfig, distill
    from dlmone.teacher import Teacher, TeacherConfig, train_teacher

    dlmone.set_num_threads(args.threads)
    out = Path(args.out)
    if args.task == "builtin":
        data = Seq2SeqData.from_pairs(**make_builtin_task(n_train=20000, n_valid=200, n_test=max(args.n, 200)))
    else:
        data = Seq2SeqData(train=load_split(args.task, "train", limit=args.train_limit),
                           valid=load_split(args.task, "valid", limit=200))
        setattr(data, args.split, load_split(args.task, args.split))
    eval_pairs = getattr(data, args.split)[args.skip:args.skip + args.n]
    record = {"task": args.task, "split": args.split, "machine": machine_info(), "args": vars(args),
              "bleu_protocol": BLEU_PROTOCOL}
    if args.teacher and not (Path(args.teacher) / "config.json").exists():
        # a training run (its latest checkpoint) or one checkpoint folder: its EMA teacher
        from dlmone.teacher import teacher_from_checkpoint
        exported = teacher_from_checkpoint(args.teacher)
        teacher_dir = out / f"teacher-step-{exported.info['checkpoint_step']}"
        exported.save(teacher_dir)
        record["teacher_checkpoint_step"] = exported.info["checkpoint_step"]
    elif args.teacher:
        teacher_dir = Path(args.teacher)
    else:
        t0 = time.perf_counter()
        cfg = TeacherConfig(preset="tiny", steps=args.teacher_steps, vocab_size=1000, lr=1e-3, warmup=200,
                            eval_every=1000, save_every=args.teacher_steps)
        train_teacher(cfg, data, out / "teacher", progress=False)
        record["teacher_train_s"] = time.perf_counter() - t0
        teacher_dir = out / "teacher" / "teacher"
    teacher = Teacher.load(teacher_dir)
    T = teacher.diffusion.T
    rows = []
    # the baselines' texts go through the teacher's tokenizer like the references
    baselines = {n: measure_baselines(teacher, eval_pairs[:n], data.train, data.valid)
                 for n in sorted({len(eval_pairs), len(eval_pairs[:args.n_slow])})}
    record["baselines"] = baselines[len(eval_pairs)]

    def run(name, kind, nfe, model, pairs, **kw):
        res = measure_generation(model, pairs, **kw)
        row = {"name": name, "kind": kind, "nfe": nfe, "n": len(pairs), **res["scores"]}
        rows.append(row)
        self_b = f"{row['self_bleu']:.4f}" if "self_bleu" in row else "-"
        print(f"{name:<40} NFE {nfe:>5}  BLEU {row['bleu']:.4f}  ROUGE-L {row['rouge_l']:.4f}  "
              f"self-BLEU {self_b}  {row['seq_per_s']:.1f} seq/s", flush=True)
        write_json_atomic(str(out / "results.json"), {**record, "rows": rows})

    run(f"teacher ancestral {T}", "teacher", T, teacher, eval_pairs[:args.n_slow], method="ancestral",
        diversity=not args.slow_once)
    for k in (100, 10, 1):
        run(f"teacher DDIM {k}", "teacher", k, teacher, eval_pairs, method="ddim", steps=k)
    if args.mbr > 1:
        run(f"teacher DDIM 10, MBR of {args.mbr}", "teacher-mbr", 10 * args.mbr, teacher, eval_pairs,
            method="ddim", steps=10, num_candidates=args.mbr, diversity=False)
    for vname in [v for v in args.variants.split(",") if v]:
        spec = dict(VARIANTS[vname])
        factor = spec.pop("steps_factor", 1)
        base = {"steps": args.stage_steps * factor, "eval_every": args.eval_every, "eval_size": 200, **spec}
        cfg = DistillConfig.from_dict(apply_overrides(base, args.set, prefix="distill."))
        t0 = time.perf_counter()
        student = distill(teacher_dir, data, cfg, out / ("student-" + vname.split()[0]),
                          progress=False, print_fn=lambda s: None)
        secs = time.perf_counter() - t0
        for k in (1, 2, 4):
            run(f"student {vname}, {k} step{'s' if k > 1 else ''}", "student" if vname == "two-stage" else "ablation",
                k, student, eval_pairs, steps=k)
            rows[-1]["distill_s"] = secs
        if args.mbr > 1:
            run(f"student {vname}, 1 step, MBR of {args.mbr}", "student-mbr", args.mbr, student, eval_pairs,
                steps=1, num_candidates=args.mbr, diversity=False)
            rows[-1]["distill_s"] = secs
    record["baselines_by_n"] = {str(n): b for n, b in baselines.items()}
    finish(out, record, rows, T, args.task)


def finish(out: Path, record: dict, rows: list, T: int, task: str) -> None:
    """Speed-ups, constant-string warnings, results.json, the plot and table.md."""
    from dlmone.baselines import constant_warnings
    from dlmone.demo import TABLE_NOTE
    from dlmone.plots import bleu_vs_nfe

    baselines = record.get("baselines_by_n") or {str(rows[0]["n"]): record["baselines"]}
    base = next(r for r in rows if r["nfe"] == T)["seq_per_s"]
    for r in rows:
        r["speedup_vs_ancestral"] = r["seq_per_s"] / base
    # constant_warnings reads rows of {"name", "scores"}; these rows hold their scores flat
    warnings = [w for r in rows for w in constant_warnings([{"name": r["name"], "scores": r}], baselines[str(r["n"])])]
    record["warnings"] = warnings
    write_json_atomic(str(out / "results.json"), {**record, "rows": rows})
    bleu_vs_nfe([r for r in rows if r["kind"] in ("teacher", "student")], out / "bleu_vs_nfe.png", task)
    lines = ["| generator | NFE/seq | BLEU | BLEU-DS | ROUGE-L | Dist-1 | Len | self-BLEU | seq/s | speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['nfe']} | {r['bleu']:.4f} | {r['bleu_diffuseq']:.4f} | {r['rouge_l']:.4f} | "
                     f"{r['dist1']:.3f} | {r['len']:.1f} | {format(r['self_bleu'], '.3f') if 'self_bleu' in r else '-'} | "
                     f"{r['seq_per_s']:.1f} | {r['speedup_vs_ancestral']:.0f}x |")
    for b in record["baselines"]:
        s = b["scores"]
        name = (b["name"] + (f" ({b['output']!r})" if b["output"] is not None else "")).replace("|", "\\|")
        lines.append(f"| {name} | - | {s['bleu']:.4f} | {s['bleu_diffuseq']:.4f} | {s['rouge_l']:.4f} | "
                     f"{s['dist1']:.3f} | {s['len']:.1f} | - | - | - |")
    n_eval = max(r["n"] for r in rows)
    lines += ["", TABLE_NOTE + f"; baselines on the same {n_eval} sources."] + [""] * bool(warnings) + warnings
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
