"""A smoke run of the teacher recipe options (SPEC §5.1) on the built-in task: a short
`tiny` teacher per option, its training and validation loss, 1- and 20-step DDIM BLEU on
100 test pairs and one generated example. It shows that each option trains and
generates, and what the EMA warm-up does to a short run; it is not the budget study of
issue 13 item 3 (which compares the options at a fixed wall-clock budget).

  python benchmarks/recipe_smoke.py --steps 400 --out benchmarks/results/recipe_smoke.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json_atomic  # noqa: E402

RUNS = {
    "constant EMA 0.999 (ema_warmup=false)": {"ema_warmup": False},
    "EMA warm-up (the default)": {},
    "+ self-conditioning": {"model": {"self_conditioning": True}},
    "+ soft absorbing state 0.5": {"soft_absorb": 0.5},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import dlmone
    from dlmone.builtin_task import make_builtin_task
    from dlmone.data import Seq2SeqData
    from dlmone.demo import measure_generation
    from dlmone.teacher import TeacherConfig, train_teacher

    dlmone.set_num_threads(args.threads)
    data = Seq2SeqData.from_pairs(**make_builtin_task(n_train=4000, n_valid=64, n_test=100))
    quiet = dict(progress=False, print_fn=lambda s: None)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, kw) in enumerate(RUNS.items()):
            cfg = TeacherConfig(preset="tiny", steps=args.steps, lr=2e-3, warmup=50, vocab_size=1000,
                                eval_every=args.steps, save_every=args.steps, eval_size=64,
                                log_every=50, **kw)
            out = Path(tmp) / str(i)
            t0 = time.perf_counter()
            teacher = train_teacher(cfg, data, out, **quiet)
            seconds = time.perf_counter() - t0
            log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
            losses = [r["loss"] for r in log if "loss" in r]
            source = data.test[0][0]
            rows[name] = {
                "config": kw, "train_seconds": seconds,
                "first_logged_loss": losses[0], "last_logged_loss": losses[-1],
                "val_loss": [r for r in log if "val_loss" in r][-1]["val_loss"],
                "bleu_ddim1": measure_generation(teacher, data.test, method="ddim", steps=1)["scores"]["bleu"],
                "bleu_ddim20": measure_generation(teacher, data.test, method="ddim", steps=20)["scores"]["bleu"],
                "example": {"source": source,
                            "ddim20": teacher.generate([source], steps=20, method="ddim")[0]},
            }
            print(name, json.dumps(rows[name]), flush=True)
    write_json_atomic(args.out, {"machine": machine_info(), "steps": args.steps, "runs": rows})


if __name__ == "__main__":
    main()
