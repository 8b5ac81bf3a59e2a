"""``dlmone`` command line: demo, train-teacher, distill, generate, evaluate, info."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import build_info, set_num_threads
from .checkpoint import atomic_write_bytes, atomic_write_json
from .config_io import apply_overrides, read_config_file
from .distributed import world
from .model import DiffusionTransformer, PrecisionUnavailableError

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


def _config(args: argparse.Namespace, cls, flags: Dict[str, Any],
            under: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None):
    """The config file, then the explicit flags (--steps, --preset), then --set; with
    ``under``, all of that over the defaults it adds (a preset's recipe)."""
    data: Dict[str, Any] = read_config_file(args.config) if getattr(args, "config", None) else {}
    data.update(flags)
    data = apply_overrides(data, args.set or [], prefix=getattr(args, "set_prefix", ""))
    return cls.from_dict(under(data) if under else data)


def cmd_train_teacher(args: argparse.Namespace) -> int:
    from .teacher import TeacherConfig, train_teacher, with_recipe
    base: Dict[str, Any] = {}
    if args.preset:
        base["preset"] = args.preset
    if args.steps is not None:
        base["steps"] = args.steps
    if args.precision is not None:
        base["precision"] = args.precision
    config = _config(args, TeacherConfig, base, under=with_recipe)
    data = load_data(args.data, ("train", "valid"), config.train_limit)
    teacher = train_teacher(config, data, args.out, resume=not args.restart, progress=not args.quiet,
                            print_fn=(lambda s: None) if args.quiet else print, comm=args.comm)
    if not args.quiet and args.comm.is_root:
        print(f"teacher written to {Path(args.out) / 'teacher'}: {teacher}")
    return 0


def _say(args: argparse.Namespace):
    """Messages go to stderr (stdout carries the results, for pipes); --quiet drops them."""
    return (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr))


def _generation_input(args: argparse.Namespace):
    """(sources, gold targets or None) from --input FILE|- or --data DIR|builtin --split."""
    from .data import load_split, read_sources
    if args.input is not None:
        if args.split is not None:
            raise ValueError("--split goes with --data; --input reads every line of its file")
        # under mpirun only rank 0 gets stdin: it reads, the others receive
        comm = args.comm
        sources, targets = comm.bcast(read_sources(args.input) if comm.is_root else None)
    else:
        split = args.split or "test"
        if args.data == "builtin":
            from .builtin_task import make_builtin_task
            pairs = make_builtin_task()[split]
        else:
            pairs = load_split(args.data, split, limit=args.limit)
        sources, targets = [p[0] for p in pairs], [p[1] for p in pairs]
    if args.limit:
        sources = sources[:args.limit]
        targets = targets[:args.limit] if targets is not None else None
    return sources, targets


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .api import load
    from .data import decode_targets, encode_pairs
    from .metrics import evaluate
    DiffusionTransformer.check_precision("--precision", args.precision)  # before loading anything
    say = _say(args)
    model = load(args.model)
    sources, targets = _generation_input(args)
    references = None
    if targets is not None:  # the gold targets tokenised and decoded, as DiffuSeq writes them
        ids, mask = encode_pairs(list(zip(sources, targets)), model.tokenizer, model.config.seq_len)
        references = decode_targets(ids, mask, model.tokenizer)
    comm = args.comm  # under mpirun the batches are shared out over the ranks
    kw: Dict[str, Any] = dict(seed=args.seed, batch_size=args.batch_size, return_candidates=True,
                              num_candidates=args.candidates, comm=comm, precision=args.precision,
                              decode=args.decode)
    if model.kind == "teacher":
        kw.update(steps=args.steps, method=args.method, clamp=not args.no_clamp)
        total = (model.diffusion.T if args.method == "ancestral" else (args.steps or model.diffusion.T))
        batches = -(-len(sources) // args.batch_size) * args.candidates
        total *= len(range(comm.rank, batches, comm.size))  # this rank's batches
    else:
        kw.update(steps=args.steps or 1)
        total = None
    bar = tqdm(total=total, disable=args.quiet or total is None or not comm.is_root, desc="generate",
               unit="step", file=sys.stderr)
    if model.kind == "teacher":
        kw["progress"] = bar.update
    t0 = time.perf_counter()
    texts, cands = model.generate(sources, **kw)
    elapsed = time.perf_counter() - t0
    bar.close()
    if not comm.is_root:
        return 0
    lines = []
    for i, (src, rec, cs) in enumerate(zip(sources, texts, cands)):
        row: Dict[str, Any] = {"source": src}
        if references is not None:
            row["reference"] = references[i]
        row["recover"] = rec
        if args.candidates > 1:
            row["candidates"] = cs
        lines.append(json.dumps(row, ensure_ascii=False))
    data = ("\n".join(lines) + "\n").encode()
    if args.out == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        atomic_write_bytes(args.out, data)
    say(f"{len(texts)} sequences in {elapsed:.2f}s ({len(texts) / elapsed:.1f} seq/s) -> "
        f"{'stdout' if args.out == '-' else args.out}")
    if references is not None and not args.quiet:
        scores = evaluate(texts, references)
        say("  " + "  ".join(f"{k}={v:.4f}" for k, v in scores.items() if isinstance(v, float)))
    return 0


# DiffuSeq's eval_seq2seq.py deletes these from its generation files before scoring
_DIFFUSEQ_SPECIALS = ("[CLS]", "[SEP]", "[PAD]")


def _strip_specials(text: str) -> str:
    for token in _DIFFUSEQ_SPECIALS:
        text = text.replace(token, "")
    return text.strip()


def _baseline_table(model_scores: Dict[str, Any], baselines: List[Dict[str, Any]]) -> str:
    head = f"{'outputs':<46}{'BLEU':>8}{'BLEU-DS':>9}{'ROUGE-L':>9}{'sacreBLEU':>10}"
    lines = [head, "-" * len(head)]
    for name, s in [("evaluated file", model_scores)] + [(b["name"], b["scores"]) for b in baselines]:
        lines.append(f"{name:<46}{s['bleu']:>8.4f}{s['bleu_diffuseq']:>9.4f}{s['rouge_l']:>9.4f}"
                     f"{s['sacrebleu']:>10.2f}")
    lines.append("BLEU: standard orientation (nltk reference = gold); BLEU-DS: DiffuSeq's eval_seq2seq.py "
                 "orientation (the papers' figures)")
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .baselines import baseline_rows, constant_strings, constant_warnings, tokenizer_protocol
    from .data import load_split, read_generations, read_lines
    from .metrics import bertscore, evaluate, mbr_select
    say = _say(args)
    if args.model and not args.baselines:
        raise ValueError("--model goes with --baselines (it decodes the baselines' texts)")
    name, rows = read_generations(args.file)
    hyps = [_strip_specials(r["recover"]) for _, r in rows]
    cands = [[_strip_specials(c) for c in r["candidates"]] if r.get("candidates") else None for _, r in rows]
    if args.refs:
        refs = read_lines(args.refs)
        if len(refs) != len(rows):
            raise ValueError(f"--refs {args.refs} has {len(refs)} lines but {name} has {len(rows)} rows")
    else:
        missing = next((n for n, r in rows if "reference" not in r), None)
        if missing is not None:
            raise ValueError(f"{name}:{missing}: no 'reference' in the row; give the references with "
                             "--refs FILE (one a line)")
        refs = [r["reference"] for _, r in rows]
    refs = [_strip_specials(r) for r in refs]
    have_cands = all(c and len(c) >= 2 for c in cands)
    if args.mbr:
        if not have_cands:
            raise ValueError("--mbr needs rows with 'candidates' (generate --candidates S, S >= 2)")
        hyps = mbr_select(cands, args.mbr_orientation)
    scores: Dict[str, Any] = evaluate(hyps, refs, cands if have_cands else None)
    if args.mbr:
        scores["mbr_orientation"] = args.mbr_orientation
    if args.bertscore:
        scores["bertscore"] = bertscore(hyps, refs, args.bertscore, args.bertscore_layers)
    scores["n"] = len(rows)
    if args.baselines:
        missing = next((n for n, r in rows if "source" not in r), None)
        if missing is not None:
            raise ValueError(f"{name}:{missing}: no 'source' in the row; --baselines needs the sources")
        to_protocol = None
        if args.model:
            from .api import load
            model = load(args.model)
            to_protocol = tokenizer_protocol(model.tokenizer, model.config.seq_len)
        train = load_split(args.baselines, "train")
        valid = load_split(args.baselines, "valid")
        constants = constant_strings(train, valid, args.baseline_candidates, to_protocol)
        baselines = baseline_rows([r["source"] for _, r in rows], refs, constants, to_protocol)
        for b in baselines:  # the protocol strings are said once, at the top
            b["scores"] = {k: v for k, v in b["scores"].items() if not isinstance(v, str)}
        scores["baselines"] = baselines
        scores["baseline_texts"] = ("tokenised and decoded by the model's tokenizer, as the references"
                                    if args.model else "as written in the data folder")
        say(_baseline_table(scores, baselines))
        for warning in constant_warnings([{"name": name, "scores": scores}], baselines):
            say(warning)
    out = args.out or (None if args.file == "-" else str(Path(args.file).with_suffix(".metrics.json")))
    if out:
        atomic_write_json(out, scores)
    print(json.dumps(scores, indent=2, ensure_ascii=False))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .distill import DistillConfig, distill
    base: Dict[str, Any] = {}
    if args.steps is not None:
        base["steps"] = args.steps
    if args.precision is not None:
        base["precision"] = args.precision
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
    t.add_argument("--precision", choices=["float32", "bf16"],
                   help="bf16: mixed-precision training on Intel AMX (float32 master weights)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (model.dropout=0.1)")
    t.add_argument("--out", required=True)
    t.add_argument("--restart", action="store_true", help="ignore checkpoints in --out")
    t.set_defaults(func=cmd_train_teacher)

    d = sub.add_parser("distill", help="distill a teacher into a one-step student (DLM-One)")
    d.add_argument("--teacher", required=True, help="teacher folder")
    d.add_argument("--data", required=True, help="DiffuSeq jsonl folder, or 'builtin'")
    d.add_argument("--config", help="JSON or TOML file of DistillConfig fields")
    d.add_argument("--stage", default="all",
                   help="'all' (or 'both'): stages 1 to the config's 'stages' (default 2); N: stage N alone")
    d.add_argument("--from", dest="from_dir", help="run folder holding stage N-1, to continue from (--stage N)")
    d.add_argument("--steps", type=int, help="steps per stage")
    d.add_argument("--precision", choices=["float32", "bf16"],
                   help="bf16: G and psi train in mixed precision on Intel AMX")
    d.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field (stage1.alpha=1.0, adv_weight=10)")
    d.add_argument("--out", required=True)
    d.set_defaults(func=cmd_distill, set_prefix="distill.")

    g = sub.add_parser("generate", help="generate targets with a teacher or student")
    g.add_argument("--model", required=True, help="teacher or student folder")
    where = g.add_mutually_exclusive_group(required=True)
    where.add_argument("--data", help="DiffuSeq jsonl folder, or 'builtin' (with --split)")
    where.add_argument("--input", metavar="FILE|-",
                       help="sources: plain text (one a line) or jsonl with 'src' and optional 'trg' "
                            "(the reference); '-' reads stdin")
    g.add_argument("--split", choices=["train", "valid", "test"], help="with --data (default test)")
    g.add_argument("--steps", type=int, help="teacher: DDIM steps (ancestral: T); student: 1..8")
    g.add_argument("--method", default="ancestral", choices=["ancestral", "ddim"])
    g.add_argument("--no-clamp", action="store_true", help="teacher: no nearest-embedding clamping")
    g.add_argument("--candidates", type=int, default=1, help="S samples per source, MBR choice")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--precision", default="float32", choices=["float32", "bf16"],
                   help="bf16: the network's products in bf16 on Intel AMX (about 2x faster on large "
                        "models; BLEU within 0.005 of float32 in RESULTS.md)")
    g.add_argument("--decode", default="logits", choices=["logits", "nearest"],
                   help="tokens from the output embeddings: argmax of the tied logits (SPEC) or the "
                        "nearest word embedding")
    g.add_argument("--limit", type=int, help="first N examples only")
    g.add_argument("--out", required=True, metavar="FILE|-",
                   help="output jsonl, one {source, reference (when known), recover} a line; '-' "
                        "writes it to stdout (messages go to stderr)")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("evaluate", help="score a generation jsonl (DiffuSeq protocol, sacreBLEU, baselines)")
    e.add_argument("file", metavar="FILE|-", help="generation jsonl ('recover', 'reference', 'source'); "
                                                  "'-' reads stdin")
    e.add_argument("--refs", metavar="FILE", help="references, one a line, aligned with FILE's rows "
                                                  "(instead of the rows' 'reference')")
    e.add_argument("--mbr", action="store_true", help="MBR over each row's candidates")
    e.add_argument("--mbr-orientation", default="standard", choices=["standard", "diffuseq"],
                   help="BLEU orientation of the MBR choice (diffuseq: DiffuSeq's selectBest; "
                        "default standard, as generate --candidates)")
    e.add_argument("--bertscore", metavar="MODEL_DIR",
                   help="BERTScore F1 with a local model folder (offline; pip install dlmone[bertscore])")
    e.add_argument("--bertscore-layers", type=int, help="BERTScore layer (default: bert-score's for "
                                                         "the folder's model name)")
    e.add_argument("--baselines", metavar="DATA_DIR",
                   help="also score copy-the-source and the best constant strings (train/valid of "
                        "DATA_DIR) on the same sources and references (SPEC 7.1)")
    e.add_argument("--baseline-candidates", type=int, default=10,
                   help="frequent training targets tried as the constant on valid (default 10)")
    e.add_argument("--model", help="with --baselines: tokenise and decode the baselines' texts with this "
                                   "model's tokenizer, as generate does with references")
    e.add_argument("--out", help="metrics JSON (default: FILE.metrics.json; none for stdin)")
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
    except (ValueError, TypeError, FileNotFoundError, ImportError, PrecisionUnavailableError) as e:
        print(f"dlmone: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dlmone: interrupted (checkpoints written so far are intact)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
