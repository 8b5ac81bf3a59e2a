"""Every performance target of issue 7, measured side by side in one run.

    python benchmarks/run_all.py [--quick] [--only matmul,train,...] [--threads N] [--out PATH]

Prints one table (target | unit | dlmone | reference | ratio | goal | status) and writes
the JSON (atomically, dlmone.checkpoint.atomic_write_json) and a PNG bar chart of the
ratio against its goal for every row that has one (matplotlib, Agg).

Sections (--only takes their names):
  matmul    1. dlmone's linear-layer product kernel vs numpy matmul (OpenBLAS), GFLOP/s,
               at the linear shapes of tiny, small and diffuseq_base; sgemm peak
  train     2. training step vs PyTorch, tokens/s; MFU on diffuseq_base vs the sgemm peak
  distill   3. distillation step (ψ + G) vs the same step in PyTorch
  generate  4. one-step generation on diffuseq_base vs PyTorch, sequences/s
  sampler   4. the teacher's ancestral sampler with clamping vs PyTorch, steps/s
  endtoend  4. text in, text out: the student's one step vs the teacher's 2000-step
               sampler on the built-in task, sequences/s, and where the student's time goes
  bf16      bf16 on AMX (training step, forward, MFU vs the AMX peak) vs PyTorch bf16 autocast
  busy      the training step next to a busy process: fixed threads, 1 thread, ThreadGovernor
  barriers  OpenMP regions and barriers a training step opens, and their share of the step
  scaling   5. dlmone's training step at --threads vs 1 thread
  memory    6. peak RSS of a training step (fresh process) vs params+grads+AdamW+activations

Method: dlmone and the reference run in the same process with the same thread count
(dlmone.set_num_threads, torch.set_num_threads, numpy's OpenBLAS set through its C
API), the same weights and inputs; their repetitions alternate (common.interleaved)
and the medians are compared. The bench_*.py modules document each measurement.
--quick: tiny sizes and few repetitions, a smoke test whose timings mean nothing.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_barriers  # noqa: E402
import bench_bf16  # noqa: E402
import bench_busy  # noqa: E402
import bench_distill  # noqa: E402
import bench_generate  # noqa: E402
import bench_matmul  # noqa: E402
import bench_memory  # noqa: E402
import bench_train  # noqa: E402
import common  # noqa: E402  (puts the repository root and tests/ on sys.path)
from common import Context, Row, log  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results", "run_all.json")
QUICK_OUT = os.path.join(HERE, "results", "run_all_quick.json")


@dataclass
class Section:
    name: str
    title: str
    run: Callable[[Context], List[Row]]
    needs_torch: bool  # in this process (bench_memory's child imports its own)


SECTIONS: Dict[str, Section] = {s.name: s for s in (
    Section("matmul", bench_matmul.TITLE, bench_matmul.run, False),
    Section("train", bench_train.TITLE, bench_train.run, True),
    Section("distill", bench_distill.TITLE, bench_distill.run, True),
    Section("generate", "4a. One-step generation (student) vs PyTorch, same batch",
            bench_generate.run_one_step, True),
    Section("sampler", "4b. Teacher's ancestral sampler with clamping vs PyTorch, per sampler step",
            bench_generate.run_sampler, True),
    Section("endtoend", "4c. Text in, text out: the student's one step vs the teacher's 2000-step sampler",
            bench_generate.run_end_to_end, False),
    Section("bf16", bench_bf16.TITLE, bench_bf16.run, True),
    Section("busy", bench_busy.TITLE, bench_busy.run, False),
    Section("barriers", bench_barriers.TITLE, bench_barriers.run, False),
    Section("scaling", bench_train.SCALING_TITLE, bench_train.run_scaling, False),
    Section("memory", bench_memory.TITLE, bench_memory.run, False),
)}

NOTES = [
    "ratio = dlmone / reference; goal: the minimum ratio (>=), or for memory the maximum (<=)",
    "timings: dlmone and the reference alternate (A B, B A, ...), medians of the samples; "
    "numpy's BLAS gets an untimed 0.1 s pause before each sample (its idle workers spin)",
    "dropout 0 wherever dropout could run (training step, scaling, memory); the distillation and "
    "generation run the networks in eval mode, as dlmone does",
    "matmul: dlmone has no standalone product entry point; its linear kernels are reached through "
    "the tied output head of a probe model (bench_matmul.py)",
    "MFU: model FLOPs per step = 6 x P_mm x tokens + 12 x N x B x L^2 x H (common.train_step_flops), "
    "divided by dlmone's median step time and by numpy's best sgemm GFLOP/s on a big square product",
    "memory: peak = VmHWM - RSS before the model is built, in a fresh process (bench_memory.py)",
]


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny sizes, few repetitions (< 60 s; timings not meaningful)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated sections to run, of {','.join(SECTIONS)} (default: all)")
    p.add_argument("--threads", type=int, default=default_threads(),
                   help="threads for dlmone, torch and numpy's BLAS alike (default: the usable cores)")
    p.add_argument("--out", default=None,
                   help=f"output JSON (default {os.path.relpath(DEFAULT_OUT)}; with --quick "
                        f"{os.path.relpath(QUICK_OUT)}); the PNG goes beside it with a .png suffix")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per side (overrides every plan)")
    p.add_argument("--torch-adamw", choices=("default", "foreach", "fused"), default="default",
                   help="torch's AdamW/Adam implementation (default: torch's own choice on CPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be >= 1")
    names = list(SECTIONS) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        p.error(f"unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    args.sections = names
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    args.png = os.path.splitext(args.out)[0] + ".png"
    return args


# ---------------------------------------------------------------- environment


def setup_threads(n: int, with_torch: bool) -> Dict[str, Any]:
    """Give dlmone, numpy's OpenBLAS and (when loaded) torch n threads each; the
    environment description for the JSON."""
    import dlmone

    dlmone.set_num_threads(n)
    numpy_libs = common.set_numpy_blas_threads(n)
    env: Dict[str, Any] = {"machine": common.machine_info(), "dlmone": common.dlmone_info(),
                           "numpy_blas": common.numpy_blas_info(), "numpy_blas_threads_set": numpy_libs}
    if with_torch:
        import torch

        torch.set_num_threads(n)
        env["torch"] = common.torch_info()
    else:
        env["torch"] = {"version": _installed_version("torch"), "imported": False}
    return env


def _installed_version(package: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def thread_counts(with_torch: bool) -> Dict[str, Any]:
    import dlmone

    counts: Dict[str, Any] = {"dlmone": dlmone.get_num_threads(),
                              "numpy_blas": [lib.get("threads") for lib in common.numpy_blas_libraries()]}
    if with_torch:
        import torch

        counts["torch"] = torch.get_num_threads()
    return counts


def check_threads(n: int, with_torch: bool, when: str) -> None:
    counts = thread_counts(with_torch)
    values = [counts["dlmone"], *counts["numpy_blas"]] + ([counts["torch"]] if with_torch else [])
    if any(v != n for v in values):
        log(f"WARNING {when}: thread counts {counts}, asked {n}")


# --------------------------------------------------------------------- report


COLUMNS = ["target", "unit", "dlmone", "reference", "ratio", "goal", "status"]


def _cells(r: Row) -> List[str]:
    return [r.name, r.unit, common.fmt_num(r.a), common.fmt_num(r.b),
            "-" if r.ratio is None else f"{r.ratio:.2f}x", r.goal, r.status.lower() if r.status else ""]


def format_report(names: List[str], rows: Dict[str, List[Row]]) -> str:
    """The table, one block per section (its title above its rows), then the notes."""
    body = [_cells(r) for n in names for r in rows.get(n, [])]
    widths = [max(len(c) for c in col) for col in zip(COLUMNS, *body)]

    def line(cells: List[str]) -> str:
        out = [cells[0].ljust(widths[0]), cells[1].ljust(widths[1])]
        out += [c.rjust(w) for c, w in zip(cells[2:], widths[2:])]
        return "  ".join(out).rstrip()

    lines = ["  " + line(COLUMNS), "  " + "  ".join("-" * w for w in widths)]
    for n in names:
        lines.append(SECTIONS[n].title)
        lines.extend("  " + line(_cells(r)) for r in rows.get(n, []))
    notes = [f"  * {r.name}: {r.note}" for n in names for r in rows.get(n, []) if r.note]
    return "\n".join(lines + ([""] + notes if notes else []))


def summary(rows: List[Row], errors: Dict[str, str]) -> Dict[str, Any]:
    judged = [r for r in rows if r.status]
    return {"pass": sum(r.status == "PASS" for r in judged),
            "short": sum(r.status == "SHORT" for r in judged),
            "targets": len(judged), "info_rows": len(rows) - len(judged),
            "short_rows": [r.name for r in judged if r.status == "SHORT"],
            "errors": errors}


def plot(rows: List[Row], path: str, title: str) -> Optional[str]:
    """Horizontal bars of the ratio of every row with a goal, the goal marked on each
    bar; green pass, red short. Written atomically; returns the path (None if matplotlib
    is missing)."""
    try:
        import matplotlib
    except ImportError:
        log("matplotlib missing: no PNG")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dlmone.checkpoint import atomic_write_bytes

    judged = [r for r in rows if r.status]
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.36 * max(len(judged), 1)))
    if judged:
        ys = list(range(len(judged)))[::-1]
        ratios = [r.ratio for r in judged]
        colors = ["tab:green" if r.status == "PASS" else "tab:red" for r in judged]
        ax.barh(ys, ratios, color=colors, height=0.6)
        for y, r in zip(ys, judged):
            ax.plot([r.target, r.target], [y - 0.4, y + 0.4], color="black", lw=2)
            ax.text(max(r.ratio, r.target), y, f"  {r.ratio:.2f}x (goal {r.goal})", va="center", fontsize=8)
        ax.set_yticks(ys)
        ax.set_yticklabels([f"[{r.section}] {r.name}" for r in judged], fontsize=8)
        ax.set_xlim(0, max(max(ratios), max(r.target for r in judged)) * 1.35)
        ax.set_xlabel("dlmone / reference (black tick: goal; memory: goal is a maximum)")
    else:
        ax.text(0.5, 0.5, "no row with a goal was measured", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ----------------------------------------------------------------------- main


def result_doc(args, env, ctx: Context, rows: Dict[str, List[Row]], errors: Dict[str, str],
               elapsed: Dict[str, float], started: float, complete: bool) -> Dict[str, Any]:
    flat = [r for n in args.sections for r in rows.get(n, [])]
    return {"benchmark": "run_all", "complete": complete, "quick": bool(args.quick),
            "threads": args.threads, "sections": args.sections, "argv": sys.argv[1:],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "elapsed_s": time.time() - started, "section_elapsed_s": elapsed,
            "torch_adamw": args.torch_adamw, "seed": args.seed,
            "summary": summary(flat, errors), "notes": NOTES, "environment": env,
            "section_info": ctx.info, "png": args.png,
            "rows": [dict(r.to_dict(), title=SECTIONS[r.section].title if r.section in SECTIONS else None)
                     for r in flat]}


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    with_torch = any(SECTIONS[n].needs_torch for n in args.sections)
    env = setup_threads(args.threads, with_torch)
    check_threads(args.threads, with_torch, "at start")
    m = env["machine"]
    log(f"{m['cpu_model']}, {m['usable_cpus']} usable cpus, load {m['loadavg_at_start']}; threads "
        f"{args.threads}; torch {env['torch']['version']}; dlmone {env['dlmone']['version']}")
    if args.quick:
        log("--quick: smoke test, timings are not meaningful")
    ctx = Context(quick=args.quick, threads=args.threads, seed=args.seed, torch_adamw=args.torch_adamw,
                  reps=args.reps)
    rows: Dict[str, List[Row]] = {}
    errors: Dict[str, str] = {}
    elapsed: Dict[str, float] = {}
    for name in args.sections:
        t0 = time.time()
        log(f"== {name}: {SECTIONS[name].title}")
        try:
            rows[name] = SECTIONS[name].run(ctx)
        except Exception as e:  # report it, go on with the other sections, exit 1 at the end
            errors[name] = traceback.format_exc()
            log(f"ERROR in section {name}:\n{errors[name]}")
            rows[name] = [Row(name, f"{name}: failed ({type(e).__name__})", "", None, note=str(e)[:300])]
        elapsed[name] = time.time() - t0
        check_threads(args.threads, with_torch, f"after {name}")
        common.write_json_atomic(args.out, result_doc(args, env, ctx, rows, errors, elapsed, started, False))

    try:
        env["machine"]["loadavg_at_end"] = list(os.getloadavg())
    except OSError:
        pass
    doc = result_doc(args, env, ctx, rows, errors, elapsed, started, True)
    common.write_json_atomic(args.out, doc)
    title = (f"dlmone run_all{' --quick' if args.quick else ''}: {m['cpu_model']}, {args.threads} threads, "
             f"torch {env['torch']['version']}, {time.strftime('%Y-%m-%d')}")
    png = plot([r for n in args.sections for r in rows[n]], args.png, title)

    print()
    print(format_report(args.sections, rows))
    s = doc["summary"]
    print(f"\n{s['pass']} pass, {s['short']} short of {s['targets']} targets; {s['info_rows']} "
          f"row{'s' if s['info_rows'] != 1 else ''} for information"
          + (f"; ERRORS in {', '.join(errors)}" if errors else ""))
    print(f"cpu {m['cpu_model']} ({m['usable_cpus']} usable), threads {args.threads}, numpy "
          f"{env['numpy_blas']['numpy']}, torch {env['torch']['version']}, dlmone "
          f"{env['dlmone']['version']} ({env['dlmone']['build_info'].get('blas_core')}), "
          f"elapsed {time.time() - started:.0f}s")
    print(f"JSON: {args.out}" + (f"\nPNG:  {png}" if png else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
