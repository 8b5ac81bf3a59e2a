"""Smoke test of benchmarks/run_all.py (issue 7's benchmark harness): one quick section
runs end to end, prints the table and writes strict JSON and a PNG (a few seconds; the
matmul section needs no torch). Also the pass/short logic of the result rows and the
JSON sanitising of benchmarks/common.py."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def common():
    sys.path.insert(0, str(BENCH))
    try:
        import common as mod
        yield mod
    finally:
        sys.path.remove(str(BENCH))


def _strict_json(text: str):
    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=reject)


def test_run_all_quick_writes_table_json_and_png(tmp_path):
    out = tmp_path / "results" / "run_all.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--quick", "--only", "matmul", "--threads", "1",
         "--reps", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for column in ("target", "dlmone", "reference", "ratio", "goal", "status"):
        assert column in proc.stdout
    assert "JSON:" in proc.stdout and "PNG:" in proc.stdout

    doc = _strict_json(out.read_text())
    assert doc["complete"] and doc["quick"] and doc["sections"] == ["matmul"] and doc["threads"] == 1
    assert doc["environment"]["machine"]["cpu_model"]
    assert "build_info" in doc["environment"]["dlmone"]
    rows = doc["rows"]
    judged = [r for r in rows if r["target"] is not None]
    assert judged and all(r["section"] == "matmul" for r in rows)
    for r in judged:
        assert r["a"] > 0 and r["b"] > 0 and math.isclose(r["ratio"], r["a"] / r["b"], rel_tol=1e-9)
        assert r["status"] == ("PASS" if r["ratio"] >= r["target"] else "SHORT")
        assert r["goal"] == f">={r['target']:g}x"
    s = doc["summary"]
    assert s["pass"] + s["short"] == s["targets"] == len(judged) and not s["errors"]
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.parent.glob(".*.tmp")), "atomic writes left temporary files"


def test_run_all_rejects_unknown_section(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--only", "nosuch",
                           "--out", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown sections" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_barriers_section_counts_the_regions_of_a_step(tmp_path):
    """run_all's barriers section builds its libgomp shim and region timer with the C
    compiler and counts what a tiny training step opens: every step the same whole number
    of forked regions (one per kernel, dozens), and one implicit barrier a layer in each
    of attention's forward and backward."""
    import dlmone

    out = tmp_path / "barriers.json"
    proc = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--quick", "--only", "barriers",
                           "--threads", "2", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["name"].split(": ")[-1]: r for r in _strict_json(out.read_text())["rows"]}
    count = rows["forked regions + barriers a step"]
    assert count["a"] is not None, count["note"]
    m = count["details"]
    assert m["forked"] == int(m["forked"]) and 20 <= m["forked"] <= 1000
    assert m["barriers"] == 2 * dlmone.ModelConfig.preset("tiny").num_layers
    assert count["a"] == m["forked"] + m["barriers"]
    assert 0 < m["region_s"] < 1e-3
    assert math.isclose(rows["their fork/join cost"]["a"], 100 * count["a"] * m["region_s"] / m["step_s"])


def test_ab_builds_compares_a_build_with_itself(tmp_path):
    """benchmarks/ab_builds.py on this checkout against itself: one round, small, 1 thread."""
    root = BENCH.parent
    out = tmp_path / "ab.json"
    proc = subprocess.run([sys.executable, str(BENCH / "ab_builds.py"), str(root), str(root), "--rounds", "1",
                           "--presets", "small", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = _strict_json(out.read_text())
    row = doc["fastest"]["small 1t"]
    assert row["a_s"] > 0 and row["b_s"] > 0 and math.isclose(row["b_speed_over_a"], row["a_s"] / row["b_s"])
    assert all(r["dlmone"].startswith(str(root)) for runs in doc["rounds"].values() for r in runs)
    bad = subprocess.run([sys.executable, str(BENCH / "ab_builds.py"), str(root), str(root), "--presets", "huge"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown preset" in bad.stderr


def test_distill_seeds_on_a_diffuseq_folder(tmp_path):
    """benchmarks/distill_seeds.py on a real task: a folder of QQP pairs, a teacher's training
    checkpoint as --teacher, one seed of two 2-step stages, scored on 3 test sources."""
    from conftest import SHARED_DATA
    from dlmone.data import load_split
    from dlmone.teacher import TeacherConfig, train_teacher

    if not (SHARED_DATA / "qqp").is_dir():
        pytest.skip("no shared data folder")
    task = tmp_path / "qqp"
    task.mkdir()
    for split, n in (("train", 300), ("valid", 12), ("test", 3)):
        pairs = load_split(SHARED_DATA / "qqp", split, limit=n)
        (task / f"{split}.jsonl").write_text("".join(json.dumps({"src": s, "trg": t}) + "\n" for s, t in pairs))
    train_teacher(TeacherConfig(preset="tiny", steps=4, vocab_size=200, seq_len=24, batch_size=8, save_every=4,
                                eval_every=4, eval_size=4, eval_bleu=0), task, tmp_path / "teacher", progress=False)
    out = tmp_path / "seeds.json"
    proc = subprocess.run([sys.executable, str(BENCH / "distill_seeds.py"), "--task", str(task), "--teacher",
                           str(tmp_path / "teacher" / "checkpoints" / "step-00000004"), "--work", str(tmp_path / "w"),
                           "--stage-steps", "2", "--seeds", "0", "--n-test", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = _strict_json(out.read_text())
    assert doc["task"] == str(task) and doc["n_test"] == 3 and doc["teacher_info"] == {"checkpoint_step": 4}
    assert 0 <= doc["teacher_bleu"] <= 1 and set(doc["teacher_ddim"]) == {"1", "2", "4", "8", "10"}
    (run,) = doc["variants"]["default"]["runs"]
    assert all(0 <= run[str(k)] <= 1 for k in (1, 2, 4, 8))
    assert 0 <= run["init_val_bleu"] <= 1 and [r["step"] in (0, 1, 2) for r in run["selected"]] == [True, True]
    bad = subprocess.run([sys.executable, str(BENCH / "distill_seeds.py"), "--teacher", str(tmp_path / "teacher"),
                          "--out", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--teacher goes with" in bad.stderr


def test_row_status_both_directions(common):
    Row = common.Row
    assert Row("s", "n", "u", 3.0, 2.0, 1.5).status == "PASS"
    assert Row("s", "n", "u", 2.0, 2.0, 1.5).status == "SHORT"
    memory = Row("s", "n", "MiB", 110.0, 100.0, 1.2, higher_is_better=False)
    assert memory.status == "PASS" and memory.goal == "<=1.2x"
    assert Row("s", "n", "MiB", 130.0, 100.0, 1.2, higher_is_better=False).status == "SHORT"
    assert Row("s", "n", "u", 1.0, None, 1.5).status == "" and Row("s", "n", "u", 1.0, 2.0).goal == ""


def test_jsonable_is_strict(common):
    obj = {"a": np.float32(1.5), "b": float("nan"), "c": (np.int64(3), np.arange(2)), 4: math.inf}
    assert _strict_json(json.dumps(common.jsonable(obj))) == {"a": 1.5, "b": None, "c": [3, [0, 1]], "4": None}


def test_train_step_flops_formula(common):
    import dlmone

    cfg = dlmone.ModelConfig.diffuseq_base()
    E, H, F, N = 128, 768, 3072, 12
    assert common.matmul_params(cfg) == N * (4 * H * H + 2 * H * F) + 2 * E * H + 2 * H * H
    f = common.train_step_flops(cfg, batch=8, seq_len=128)
    assert f["dense"] == 6 * common.matmul_params(cfg) * 8 * 128
    assert f["attention"] == 12 * N * 8 * 128 * 128 * H and f["total"] == f["dense"] + f["attention"]
