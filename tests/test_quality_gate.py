"""The quality gate of issue 14: the demo-size built-in student keeps most of its
teacher's 2000-step BLEU on the same test sources.

This is `dlmone demo` itself (seed 0, the README's main command): a tiny teacher, 5,000
steps on 20,000 built-in pairs, then the default two-stage distillation. Every step is
deterministic for a seed and bitwise the same for any thread count, so the ratio is a
fixed number on a given build; a change that costs the student quality fails here.
About 4 minutes on 2 cores.

The gate is the issue's 85%: with α 0 in both stages (the default since session 6) a
fresh demo scores 91.9% (student 0.2839 against the teacher's 0.3090, on an AMD EPYC with
OpenBLAS's Haswell kernels; over 3 distillation seeds of the same recipe's teacher,
91.2% ± 2.5%, RESULTS §11c). Other CPUs' BLAS kernels change the last bits and with them
the trajectory; the margin covers about 2.5 sd of the seed spread. Earlier defaults: α 0.5
scored 82-84%, α 1.2 without an EMA of G 74-78%.
"""
from __future__ import annotations

import json

GATE = 0.85


def test_demo_student_keeps_85_percent_of_the_teacher(tmp_path):
    from dlmone.demo import run_demo

    result = run_demo(tmp_path / "demo", quick=False, seed=0, progress=False, print_fn=lambda s: None)
    rows = {r["name"]: r for r in result["rows"]}
    teacher, student = rows["teacher ancestral 2000"], rows["student 1 step"]
    # like with like: every row on the same test sources
    assert teacher["scores"]["n"] == student["scores"]["n"] == 200
    ratio = student["bleu"] / teacher["bleu"]
    summary = json.dumps({"teacher": teacher["bleu"], "student": student["bleu"], "ratio": ratio})
    assert ratio >= GATE, f"the one-step student fell below {GATE:.0%} of its teacher: {summary}"
    # and both beat the constant strings by far (a collapsed teacher would make any ratio meaningless)
    constant = max(b["scores"]["bleu"] for b in result["baselines"] if b["output"] is not None)
    assert teacher["bleu"] > 4 * constant and student["bleu"] > 4 * constant, summary
