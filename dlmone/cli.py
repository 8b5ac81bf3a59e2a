"""``dlmone`` command line: demo, train-teacher, distill, generate, evaluate, info."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from . import build_info, set_num_threads
from .checkpoint import atomic_write_bytes, atomic_write_json
from .config_io import apply_overrides, read_config_file
from .distributed import world

# the commands that run data-parallel under mpirun (the others run in one process)
MPI_COMMANDS = ("train-teacher", "distill", "generate")


def load_data(spec: str, splits: Sequence[str], limit: Optional[int] = None):
    """``builtin`` (the synthetic task) or a DiffuSeq jsonl folder."""
    from .data import Seq2SeqData
    if spec == "builtin":
        from .builtin_task import make_builtin_task
        return Seq2SeqData.from_pairs(**make_builtin_task())
    if not Path(spec).is_dir():
        raise SystemExit(f"dlmone: --data {spec}: not a folder (and not 'builtin')")
    return Seq2SeqData.from_dir(spec, splits=splits, limit=limit)


def _config(args: argparse.Namespace, cls, flags: Dict[str, Any]):
    """The config file, then the explicit flags (--steps, --preset), then --set."""
    data: Dict[str, Any] = read_config_file(args.config) if getattr(args, "config", None) else {}
    data.update(flags)
    data = apply_overrides(data, args.set or [], prefix=getattr(args, "set_prefix", ""))
    return cls.from_dict(data)


def cmd_train_teacher(args: argparse.Namespace) -> int:
    from .teacher import TeacherConfig, train_teacher
    base: Dict[str, Any] = {}
    if args.preset:
        base["preset"] = args.preset
    if args.steps is not None:
        base["steps"] = args.steps
    config = _config(args, TeacherConfig, base)
    data = load_data(args.data, ("train", "valid"), config.train_limit)
    teacher = train_teacher(config, data, args.out, resume=not args.restart, progress=not args.quiet,
                            print_fn=(lambda s: None) if args.quiet else print, comm=args.comm)
    if not args.quiet and args.comm.is_root:
        print(f"teacher written to {Path(args.out) / 'teacher'}: {teacher}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .api import load
    from .data import decode_targets, encode_pairs, load_split
    from .metrics import evaluate
    if args.precision == "bf16" and not build_info()["amx_bf16"]:
        raise ValueError("--precision bf16 needs a CPU with AMX-BF16 (Intel Sapphire Rapids or later)")
    model = load(args.model)
    model.model.inference_precision = args.precision
    if args.data == "builtin":
        from .builtin_task import make_builtin_task
        pairs = make_builtin_task()[args.split]
    else:
        pairs = load_split(args.data, args.split, limit=args.limit)
    pairs = pairs[:args.limit] if args.limit else pairs
    sources = [p[0] for p in pairs]
    ids, mask = encode_pairs(pairs, model.tokenizer, model.config.seq_len)
    references = decode_targets(ids, mask, model.tokenizer)  # as DiffuSeq writes them
    comm = args.comm  # under mpirun the batches are shared out over the ranks
    kw: Dict[str, Any] = dict(seed=args.seed, batch_size=args.batch_size, return_candidates=True,
                              num_candidates=args.candidates, comm=comm)
    if model.kind == "teacher":
        kw.update(steps=args.steps, method=args.method, clamp=not args.no_clamp)
        total = (model.diffusion.T if args.method == "ancestral" else (args.steps or model.diffusion.T))
        batches = -(-len(sources) // args.batch_size) * args.candidates
        total *= len(range(comm.rank, batches, comm.size))  # this rank's batches
    else:
        kw.update(steps=args.steps or 1)
        total = None
    bar = tqdm(total=total, disable=args.quiet or total is None or not comm.is_root, desc="generate",
               unit="step")
    if model.kind == "teacher":
        kw["progress"] = bar.update
    t0 = time.perf_counter()
    texts, cands = model.generate(sources, **kw)
    elapsed = time.perf_counter() - t0
    bar.close()
    if not comm.is_root:
        return 0
    lines = []
    for src, ref, rec, cs in zip(sources, references, texts, cands):
        row = {"source": src, "reference": ref, "recover": rec}
        if args.candidates > 1:
            row["candidates"] = cs
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_bytes(args.out, ("\n".join(lines) + "\n").encode())
    if not args.quiet:
        scores = evaluate(texts, references)
        print(f"{len(texts)} sequences in {elapsed:.2f}s ({len(texts) / elapsed:.1f} seq/s) -> {args.out}")
        print("  " + "  ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .metrics import evaluate, mbr_select
    rows = []
    with open(args.file) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append((row["recover"], row["reference"], row.get("candidates")))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SystemExit(f"dlmone: {args.file}:{n}: not a generation row ({e})")
    hyps = [r[0] for r in rows]
    refs = [r[1] for r in rows]
    cands = [r[2] for r in rows]
    have_cands = all(c and len(c) >= 2 for c in cands)
    if args.mbr:
        if not have_cands:
            raise SystemExit("dlmone: --mbr needs rows with 'candidates' (generate --candidates S, S >= 2)")
        hyps = mbr_select(cands)
    scores = evaluate(hyps, refs, cands if have_cands else None)
    scores["n"] = len(rows)
    out = args.out or str(Path(args.file).with_suffix(".metrics.json"))
    atomic_write_json(out, scores)
    print(json.dumps(scores, indent=2))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .distill import DistillConfig, distill
    base: Dict[str, Any] = {}
    if args.steps is not None:
        base["steps"] = args.steps
    config = _config(args, DistillConfig, base)
    data = load_data(args.data, ("train", "valid"))
    student = distill(args.teacher, data, config, args.out, stage=args.stage, from_dir=args.from_dir,
                      progress=not args.quiet, print_fn=(lambda s: None) if args.quiet else print,
                      comm=args.comm)
    if not args.quiet and args.comm.is_root:
        print(f"student written to {Path(args.out) / 'student'}: {student}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    run_demo(args.out, quick=args.quick, seed=args.seed, progress=not args.quiet,
             print_fn=print)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import platform

    from . import __version__
    info = build_info()
    print(f"dlmone {__version__} on Python {platform.python_version()} ({platform.machine()})")
    for k, v in info.items():
        print(f"  {k}: {v}")
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
        simd = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16") if f in flags]
        print(f"  cpu features: {' '.join(simd)}")
    except (OSError, StopIteration):
        pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlmone", description="DLM-One: one-step diffusion language models")
    p.add_argument("--threads", type=int, help="OpenMP threads for the C core, per rank under mpirun "
                                               "(default: every core this process may run on)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or console output")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-teacher", help="train a DiffuSeq-style teacher")
    t.add_argument("--data", required=True, help="DiffuSeq jsonl folder, or 'builtin'")
    t.add_argument("--config", help="JSON or TOML file of TeacherConfig fields")
    t.add_argument("--preset", choices=["tiny", "small", "diffuseq_base"])
    t.add_argument("--steps", type=int)
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (model.dropout=0.1)")
    t.add_argument("--out", required=True)
    t.add_argument("--restart", action="store_true", help="ignore checkpoints in --out")
    t.set_defaults(func=cmd_train_teacher)

    d = sub.add_parser("distill", help="distill a teacher into a one-step student (DLM-One)")
    d.add_argument("--teacher", required=True, help="teacher folder")
    d.add_argument("--data", required=True, help="DiffuSeq jsonl folder, or 'builtin'")
    d.add_argument("--config", help="JSON or TOML file of DistillConfig fields")
    d.add_argument("--stage", default="both", choices=["1", "2", "both"])
    d.add_argument("--from", dest="from_dir", help="stage-1 run folder to continue from (--stage 2)")
    d.add_argument("--steps", type=int, help="steps per stage")
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="override (distill.alpha=1.0)")
    d.add_argument("--out", required=True)
    d.set_defaults(func=cmd_distill, set_prefix="distill.")

    g = sub.add_parser("generate", help="generate targets with a teacher or student")
    g.add_argument("--model", required=True, help="teacher or student folder")
    g.add_argument("--data", required=True, help="DiffuSeq jsonl folder, or 'builtin'")
    g.add_argument("--split", default="test", choices=["train", "valid", "test"])
    g.add_argument("--steps", type=int, help="teacher: DDIM steps (ancestral: T); student: 1..8")
    g.add_argument("--method", default="ancestral", choices=["ancestral", "ddim"])
    g.add_argument("--no-clamp", action="store_true", help="teacher: no nearest-embedding clamping")
    g.add_argument("--candidates", type=int, default=1, help="S samples per source, MBR choice")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--precision", default="float32", choices=["float32", "bf16"],
                   help="bf16: the network's products in bf16 on Intel AMX (about 2x faster on large "
                        "models; BLEU within 0.005 of float32 in RESULTS.md)")
    g.add_argument("--limit", type=int, help="first N examples only")
    g.add_argument("--out", required=True, help="output jsonl (source, reference, recover)")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("evaluate", help="score a generation jsonl (DiffuSeq protocol)")
    e.add_argument("file")
    e.add_argument("--mbr", action="store_true", help="MBR over each row's candidates")
    e.add_argument("--out", help="metrics JSON (default: FILE.metrics.json)")
    e.set_defaults(func=cmd_evaluate)

    m = sub.add_parser("demo", help="the whole pipeline on the built-in task, side by side")
    m.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    m.add_argument("--quick", action="store_true", help="a sub-minute version (used in CI)")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_demo)

    i = sub.add_parser("info", help="build and CPU information")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        set_num_threads(args.threads)  # per rank under mpirun
    try:
        args.comm = world()
    except RuntimeError as e:
        print(f"dlmone: error: {e}", file=sys.stderr)
        return 2
    if args.comm.size > 1 and args.command not in MPI_COMMANDS:
        if args.comm.is_root:
            print(f"dlmone: error: {args.command} runs in one process; only {', '.join(MPI_COMMANDS)} "
                  f"run under mpirun", file=sys.stderr)
        return 2
    try:
        with args.comm.fail_fast():  # under mpirun: an error on one rank stops every rank
            return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"dlmone: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dlmone: interrupted (checkpoints written so far are intact)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
