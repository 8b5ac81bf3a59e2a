"""``dlmone demo``: the whole pipeline on the built-in task, side by side.

Trains a tiny teacher, distils it (both stages), generates with the teacher (2000
ancestral steps and DDIM 10) and the student (1 and 4 steps), and prints one table
with BLEU (both orientations, SPEC §7), ROUGE-L, self-BLEU, network evaluations per
sequence, sequences/s and the speed-up over the teacher's sampler, with the baselines
of SPEC §7.1 (copy the source, the best constant strings) as rows; a model that does not
beat the constant string is warned about. Everything lands in the run folder.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

from .baselines import baseline_rows, constant_strings, constant_warnings, tokenizer_protocol
from .checkpoint import atomic_write_bytes, atomic_write_json
from .data import Seq2SeqData, decode_targets, encode_pairs
from .metrics import BLEU_PROTOCOL, evaluate, self_bleu

PathLike = Union[str, Path]


@dataclass
class DemoSize:
    n_train: int
    teacher_steps: int
    stage_steps: int
    eval_every: int
    n_test: int          # test sources, the same for every row (the 2000-step sampler's included)
    n_valid: int         # validation pairs for distillation's checkpoint choice


FULL = DemoSize(n_train=20000, teacher_steps=5000, stage_steps=300, eval_every=100, n_test=200, n_valid=1000)
QUICK = DemoSize(n_train=4000, teacher_steps=400, stage_steps=30, eval_every=15, n_test=24, n_valid=100)


def measure_generation(model: Any, pairs: Sequence[Tuple[str, str]], seed: int = 0, diversity: bool = True,
                       **generate_kw: Any) -> Dict[str, Any]:
    """Generate for ``pairs`` twice (seeds ``seed`` and ``seed+1``), score the first run
    against the tokenised references (DiffuSeq's protocol), self-BLEU across the two,
    and the sequences/s of the first run. ``diversity=False`` skips the second run and
    its self-BLEU (for the slowest samplers)."""
    sources = [p[0] for p in pairs]
    ids, mask = encode_pairs(pairs, model.tokenizer, model.config.seq_len)
    refs = decode_targets(ids, mask, model.tokenizer)
    t0 = time.perf_counter()
    texts = model.generate(sources, seed=seed, **generate_kw)
    elapsed = time.perf_counter() - t0
    scores = evaluate(texts, refs)
    if diversity:
        other = model.generate(sources, seed=seed + 1, **generate_kw)
        scores["self_bleu"] = self_bleu([[a, b] for a, b in zip(texts, other)])
    scores["seq_per_s"] = len(sources) / elapsed
    scores["n"] = len(sources)
    return {"scores": scores, "rows": [{"source": s, "reference": r, "recover": h}
                                       for s, r, h in zip(sources, refs, texts)]}


def measure_baselines(model: Any, pairs: Sequence[Tuple[str, str]], train: Sequence[Tuple[str, str]],
                      valid: Sequence[Tuple[str, str]], k: int = 10) -> List[Dict[str, Any]]:
    """SPEC §7.1's baselines on ``pairs``, under :func:`measure_generation`'s protocol: their
    texts and the references are tokenised and decoded by ``model``'s tokenizer. Rows as
    :func:`dlmone.baselines.baseline_rows` (``name``, ``kind``, ``output``, ``scores``)."""
    to_protocol = tokenizer_protocol(model.tokenizer, model.config.seq_len)
    sources = [p[0] for p in pairs]
    refs = to_protocol(sources, [p[1] for p in pairs])
    return baseline_rows(sources, refs, constant_strings(train, valid, k, to_protocol), to_protocol)


#: The footnote of every results table: what the BLEU columns are.
TABLE_NOTE = ("BLEU: standard orientation, nltk reference = gold; BLEU-DS: DiffuSeq's eval_seq2seq.py "
              "orientation (generated text as nltk's reference), the one of the papers' figures")


def _table(rows: List[Dict[str, Any]], baselines: List[Dict[str, Any]]) -> str:
    head = (f"{'generator':<46}{'NFE/seq':>8}{'BLEU':>8}{'BLEU-DS':>9}{'ROUGE-L':>9}{'self-BLEU':>10}"
            f"{'seq/s':>10}{'speed-up':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        s = r["scores"]
        lines.append(f"{r['name']:<46}{r['nfe']:>8}{s['bleu']:>8.4f}{s['bleu_diffuseq']:>9.4f}{s['rouge_l']:>9.4f}"
                     f"{s['self_bleu']:>10.4f}{s['seq_per_s']:>10.1f}{r['speedup']:>9.0f}x")
    for b in baselines:
        s = b["scores"]
        lines.append(f"{b['name']:<46}{'-':>8}{s['bleu']:>8.4f}{s['bleu_diffuseq']:>9.4f}{s['rouge_l']:>9.4f}"
                     f"{'-':>10}{'-':>10}{'-':>10}")
    lines.append(TABLE_NOTE)
    return "\n".join(lines)


def run_demo(out_dir: PathLike = "runs/demo", quick: bool = False, seed: int = 0,
             progress: bool = True, print_fn: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run the demo; returns the metrics dict also written to ``out_dir/metrics.json``."""
    from .builtin_task import make_builtin_task
    from .distill import DistillConfig, distill
    from .plots import bleu_vs_nfe, training_curves
    from .teacher import TeacherConfig, train_teacher

    size = QUICK if quick else FULL
    out = Path(out_dir)
    t_start = time.perf_counter()
    splits = make_builtin_task(n_train=size.n_train, n_valid=size.n_valid, n_test=size.n_test, seed=seed)
    data = Seq2SeqData.from_pairs(**splits)
    say = print_fn if progress else (lambda s: None)
    say(f"[1/4] teacher: tiny preset, {size.teacher_steps} steps on {size.n_train} built-in pairs")
    tcfg = TeacherConfig(preset="tiny", steps=size.teacher_steps, vocab_size=1000, lr=1e-3, warmup=200,
                         batch_size=64, eval_every=max(size.teacher_steps // 4, 1),
                         save_every=size.teacher_steps, seed=seed, eval_size=128)
    teacher = train_teacher(tcfg, data, out / "teacher", progress=progress, print_fn=say)
    say(f"[2/4] distillation: two stages of {size.stage_steps} steps")
    # the tiny model takes larger steps than SPEC §6.5a's small one (5e-5 / 2e-4)
    dcfg = DistillConfig(steps=size.stage_steps, eval_every=size.eval_every, eval_size=size.n_valid,
                         save_every=size.stage_steps, seed=seed, lr_g=5e-4, lr_psi=1e-3)
    student = distill(out / "teacher" / "teacher", data, dcfg, out / "distill", progress=progress,
                      print_fn=say)
    say("[3/4] generation: teacher (2000 ancestral, DDIM 10) and student (1 and 4 steps)")
    test = data.test
    T = teacher.diffusion.T
    runs = [
        ("teacher ancestral 2000", "teacher", T, teacher, test, dict(method="ancestral")),
        ("teacher DDIM 10", "teacher", 10, teacher, test, dict(method="ddim", steps=10)),
        ("student 1 step", "student", 1, student, test, dict(steps=1)),
        ("student 4 steps", "student", 4, student, test, dict(steps=4)),
    ]
    rows: List[Dict[str, Any]] = []
    for name, kind, nfe, model, pairs, kw in runs:
        res = measure_generation(model, pairs, seed=seed, **kw)
        fname = name.replace(" ", "_") + ".jsonl"
        atomic_write_bytes(out / "generations" / fname,
                           "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in res["rows"]).encode())
        rows.append({"name": name, "kind": kind, "nfe": nfe, "scores": res["scores"], "file": fname})
    base = rows[0]["scores"]["seq_per_s"]
    for r in rows:
        r["speedup"] = r["scores"]["seq_per_s"] / base
        r["bleu"] = r["scores"]["bleu"]
    baselines = measure_baselines(teacher, test, data.train, data.valid)
    warnings = constant_warnings(rows, baselines)
    say("[4/4] plots and metrics")
    training_curves(out / "teacher" / "log.jsonl", out / "distill", out / "training_curves.png")
    bleu_vs_nfe(rows, out / "bleu_vs_nfe.png", "built-in task")
    result = {"quick": quick, "seconds": time.perf_counter() - t_start, "rows": rows,
              "baselines": baselines, "warnings": warnings, "bleu_protocol": BLEU_PROTOCOL,
              "teacher_steps": size.teacher_steps, "stage_steps": size.stage_steps}
    atomic_write_json(out / "metrics.json", result)
    print_fn("\n" + _table(rows, baselines))
    for warning in warnings:
        print_fn(warning)
    print_fn(f"\n(every row on the same {len(test)} test sources; {result['seconds']:.0f} s in all; "
             f"everything is in {out})")
    return result
