"""The ``dlmone`` command line, called in-process through ``dlmone.cli.main``:
info, train-teacher (JSON/TOML configs, --set overrides, resume/restart), generate
(DDIM, candidates, --input text/jsonl/stdin, --out -), evaluate (metrics file, stdin,
--refs, --mbr, --baselines, BERTScore errors, malformed input) and the error exits;
plus, in subprocesses, ``python -m dlmone --help`` and the pipe
``cat sources | dlmone generate --input - --out - | dlmone evaluate - --refs refs``.
``demo`` is too slow for a unit test and is not run here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dlmone
from dlmone.builtin_task import write_builtin_task
from dlmone.cli import main

MODEL = {"emb_dim": 8, "hidden_dim": 16, "num_layers": 1, "num_heads": 2, "ffn_dim": 32, "time_dim": 8}
TINY_RUN = dict(preset="tiny", model=MODEL, seq_len=24, vocab_size=120, steps=6, batch_size=8,
                eval_every=3, save_every=3, eval_size=8, eval_samples=2, eval_sample_steps=2,
                log_every=2, diffusion_steps=50)

TOML = """
preset = "tiny"
seq_len = 24
vocab_size = 120
steps = 5
batch_size = 8
eval_every = 5
save_every = 5
eval_size = 8
eval_samples = 1
eval_sample_steps = 2
log_every = 5
diffusion_steps = 40
lr = 0.002

[model]
emb_dim = 8
hidden_dim = 16
num_layers = 1
num_heads = 2
ffn_dim = 32
time_dim = 8
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny data folder, a JSON config, and a teacher trained through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    data = write_builtin_task(root / "data", n_train=200, n_valid=20, n_test=20)
    cfg = root / "cfg.json"
    cfg.write_text(json.dumps(TINY_RUN))
    out = root / "run"
    assert main(["--quiet", "train-teacher", "--data", str(data), "--config", str(cfg), "--out", str(out)]) == 0
    return {"root": root, "data": str(data), "cfg": str(cfg), "teacher": str(out / "teacher")}


@pytest.fixture(scope="module")
def gen_files(env):
    """Two generation files: without and with candidates."""
    root = env["root"]
    plain, cands = root / "gen.jsonl", root / "gen_c.jsonl"
    base = ["generate", "--model", env["teacher"], "--data", env["data"], "--split", "test", "--method", "ddim",
            "--steps", "3", "--limit", "10"]
    assert main(["--quiet"] + base + ["--out", str(plain)]) == 0
    assert main(["--quiet"] + base + ["--candidates", "2", "--out", str(cands)]) == 0
    return plain, cands


def _rows(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def _teacher_config(run_dir):
    return json.loads((run_dir / "teacher" / "config.json").read_text())["teacher_config"]


# ------------------------------------------------------------------ info / help
def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"dlmone {dlmone.__version__} on Python")
    for key in dlmone.build_info():
        assert f"  {key}: " in out


def test_module_help():
    r = subprocess.run([sys.executable, "-m", "dlmone", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for cmd in ("train-teacher", "distill", "generate", "evaluate", "demo", "info"):
        assert cmd in r.stdout


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "x", "--data", "y", "--out", "z", "--method", "euler"])
    assert e.value.code == 2


# ------------------------------------------------------------------ train-teacher
def test_train_teacher_json_config_and_overrides(env, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["--threads", "1", "train-teacher", "--data", env["data"], "--config", env["cfg"],
               "--set", "steps=4", "--set", "model.ffn_dim=24", "--set", "lr=0.002",
               "--set", "timestep_sampler=uniform", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"teacher written to {out / 'teacher'}" in printed
    tc = _teacher_config(out)
    assert tc["steps"] == 4 and tc["model"]["ffn_dim"] == 24 and tc["lr"] == 0.002
    assert tc["timestep_sampler"] == "uniform"
    assert tc["model"]["emb_dim"] == 8 and tc["seq_len"] == 24  # the rest from the file
    log = _rows(out / "log.jsonl")
    assert max(r["step"] for r in log) == 4
    loaded = dlmone.load(out / "teacher")
    assert loaded.config.ffn_dim == 24

    # same command again: resumes (nothing left to do); a changed config is refused
    rc = main(["train-teacher", "--data", env["data"], "--config", env["cfg"], "--set", "steps=4",
               "--set", "model.ffn_dim=24", "--set", "lr=0.002", "--set", "timestep_sampler=uniform",
               "--out", str(out)])
    assert rc == 0 and "resuming from" in capsys.readouterr().out
    rc = main(["--quiet", "train-teacher", "--data", env["data"], "--config", env["cfg"], "--out", str(out)])
    assert rc == 2 and "different config" in capsys.readouterr().err
    # --restart ignores the checkpoints
    rc = main(["--quiet", "train-teacher", "--data", env["data"], "--config", env["cfg"], "--restart",
               "--out", str(out)])
    assert rc == 0 and _teacher_config(out)["steps"] == TINY_RUN["steps"]


def test_train_teacher_toml_config(env, tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(TOML)
    out = tmp_path / "run"
    assert main(["--quiet", "train-teacher", "--data", env["data"], "--config", str(cfg),
                 "--set", "model.dropout=0.1", "--out", str(out)]) == 0
    tc = _teacher_config(out)
    assert tc["steps"] == 5 and tc["diffusion_steps"] == 40 and tc["lr"] == 0.002
    assert tc["model"] == dict(MODEL, dropout=0.1)
    assert dlmone.load(out / "teacher").config.diffusion_steps == 40


def test_train_teacher_flags_without_config(env, tmp_path):
    out = tmp_path / "run"
    sets = [x for k, v in TINY_RUN.items() if k not in ("steps", "preset", "model")
            for x in ("--set", f"{k}={json.dumps(v)}")]
    sets += [x for k, v in MODEL.items() for x in ("--set", f"model.{k}={v}")]
    assert main(["--quiet", "train-teacher", "--data", env["data"], "--preset", "small", "--steps", "2"]
                + sets + ["--out", str(out)]) == 0
    tc = _teacher_config(out)
    assert tc["steps"] == 2 and tc["preset"] == "small"
    # the small preset's teacher recipe (PRESET_RECIPES) under what was given: the sizes come
    # from --set, the soft absorbing state and dropout 0 from the recipe
    assert tc["soft_absorb"] == 0.5 and tc["timestep_sampler"] == "uniform"
    assert dlmone.load(out / "teacher").config.dropout == 0.0
    out2 = tmp_path / "run2"
    assert main(["--quiet", "train-teacher", "--data", env["data"], "--preset", "small", "--steps", "2"]
                + sets + ["--set", "model.dropout=0.1", "--set", "soft_absorb=0", "--out", str(out2)]) == 0
    tc = _teacher_config(out2)
    assert tc["soft_absorb"] == 0 and dlmone.load(out2 / "teacher").config.dropout == 0.1


def test_steps_flag_overrides_config_file(env, tmp_path):
    out = tmp_path / "run"
    assert main(["--quiet", "train-teacher", "--data", env["data"], "--config", env["cfg"], "--steps", "2",
                 "--out", str(out)]) == 0
    assert _teacher_config(out)["steps"] == 2


def test_quiet_train_teacher_prints_nothing(env, tmp_path, capsys):
    capsys.readouterr()
    assert main(["--quiet", "train-teacher", "--data", env["data"], "--config", env["cfg"],
                 "--out", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out == ""


def test_train_teacher_errors(env, tmp_path, capsys):
    out = str(tmp_path / "run")
    base = ["--quiet", "train-teacher", "--data", env["data"], "--out", out]
    assert main(base + ["--config", env["cfg"], "--set", "steps"]) == 2
    assert "--set expects key=value" in capsys.readouterr().err
    assert main(base + ["--config", env["cfg"], "--set", "lerning_rate=1"]) == 2
    assert "unknown TeacherConfig keys" in capsys.readouterr().err
    assert main(base + ["--config", env["cfg"], "--set", "steps=0"]) == 2
    assert "steps must be a positive int" in capsys.readouterr().err
    assert main(base + ["--config", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{steps: 3")
    assert main(base + ["--config", str(bad)]) == 2
    assert "invalid JSON" in capsys.readouterr().err
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("steps = = 3")
    assert main(base + ["--config", str(bad_toml)]) == 2
    assert "invalid TOML" in capsys.readouterr().err
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    assert main(base + ["--config", str(arr)]) == 2
    assert "table/object" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not a folder"):
        main(["--quiet", "train-teacher", "--data", str(tmp_path / "nope"), "--out", out])


# ------------------------------------------------------------------ generate
def test_generate_writes_rows(env, gen_files, tmp_path, capsys):
    plain, cands = gen_files
    rows = _rows(plain)
    assert len(rows) == 10
    for r in rows:
        assert set(r) == {"source", "reference", "recover"}
        assert all(isinstance(r[k], str) for k in r)
    test_sources = [json.loads(line)["src"] for line in open(env["data"] + "/test.jsonl")][:10]
    assert [r["source"] for r in rows] == test_sources
    crow = _rows(cands)
    assert len(crow) == 10
    for r in crow:
        assert set(r) == {"source", "reference", "recover", "candidates"}
        assert len(r["candidates"]) == 2 and r["recover"] in r["candidates"]
    # the same command again gives the same file (seeded); stdout reports speed and scores
    again = tmp_path / "again.jsonl"
    assert main(["generate", "--model", env["teacher"], "--data", env["data"], "--method", "ddim",
                 "--steps", "3", "--limit", "10", "--out", str(again)]) == 0
    assert again.read_text() == plain.read_text()
    captured = capsys.readouterr()  # messages go to stderr, stdout stays clean
    assert captured.out == ""
    assert "10 sequences in" in captured.err and "bleu=" in captured.err and "rouge_l=" in captured.err


def test_generate_bf16(env, gen_files, tmp_path):
    import dlmone

    plain, _ = gen_files
    out = tmp_path / "bf16.jsonl"
    cmd = ["--quiet", "generate", "--model", env["teacher"], "--data", env["data"], "--method", "ddim",
           "--steps", "3", "--limit", "10", "--precision", "bf16", "--out", str(out)]
    if not dlmone.build_info()["amx_bf16"]:
        assert main(cmd) == 2
        return
    assert main(cmd) == 0
    rows, ref = _rows(out), _rows(plain)
    assert [r["source"] for r in rows] == [r["source"] for r in ref]
    # bf16 products move a few clamped tokens at most on this tiny teacher
    same = sum(a["recover"] == b["recover"] for a, b in zip(rows, ref))
    assert same >= 5


def test_bf16_training_without_amx_is_a_clean_error(env, tmp_path, capsys):
    """--precision bf16 (or a config saying so) on a CPU without AMX-BF16: exit 2 with one
    'dlmone: error:' line naming the requirement, no traceback, nothing written."""
    import dlmone

    if dlmone.build_info()["amx_bf16"]:
        pytest.skip("this CPU runs bf16: nothing to refuse")
    for n, cmd in enumerate((
            ["train-teacher", "--data", env["data"], "--steps", "1", "--precision", "bf16"],
            ["train-teacher", "--data", env["data"], "--steps", "1", "--set", "precision=bf16"],
            ["distill", "--teacher", env["teacher"], "--data", env["data"], "--steps", "1",
             "--set", "t_init=40", "--set", "t_max=45", "--precision", "bf16"],
            ["generate", "--model", env["teacher"], "--data", env["data"], "--precision", "bf16"])):
        out = tmp_path / f"run{n}"
        assert main(["--quiet"] + cmd + ["--out", str(out)]) == 2, cmd
        err = capsys.readouterr().err
        assert err.startswith("dlmone: error:") and "AMX-BF16" in err and "Traceback" not in err, err
        assert not out.exists(), cmd


def test_generate_builtin_data_and_ancestral(env, tmp_path):
    out = tmp_path / "b.jsonl"
    assert main(["--quiet", "generate", "--model", env["teacher"], "--data", "builtin", "--split", "valid",
                 "--limit", "3", "--batch-size", "2", "--out", str(out)]) == 0  # ancestral, all T steps
    assert len(_rows(out)) == 3


def test_generate_errors(env, tmp_path, capsys):
    out = str(tmp_path / "g.jsonl")
    base = ["--quiet", "generate", "--data", env["data"], "--out", out]
    assert main(base + ["--model", env["teacher"], "--method", "ancestral", "--steps", "3", "--limit", "2"]) == 2
    assert "ancestral" in capsys.readouterr().err
    assert main(base + ["--model", str(tmp_path / "nope")]) == 2
    assert "no checkpoint folder" in capsys.readouterr().err
    assert main(["--quiet", "generate", "--model", env["teacher"], "--data", str(tmp_path), "--out", out]) == 2
    assert "test.jsonl" in capsys.readouterr().err


# ------------------------------------------------------------------ evaluate
def test_evaluate_writes_metrics(gen_files, capsys):
    plain, _ = gen_files
    assert main(["evaluate", str(plain)]) == 0
    metrics_path = plain.with_suffix(".metrics.json")
    assert metrics_path.name == "gen.metrics.json"
    m = json.loads(metrics_path.read_text())
    assert set(m) == {"bleu", "bleu_diffuseq", "rouge_l", "dist1", "len", "sacrebleu", "bleu_protocol",
                      "sacrebleu_signature", "n"} and m["n"] == 10
    assert 0.0 <= m["bleu"] <= 1.0 and 0.0 <= m["rouge_l"] <= 1.0 and 0.0 <= m["sacrebleu"] <= 100.0
    assert m["bleu_protocol"] == dlmone.metrics.BLEU_PROTOCOL
    assert m["sacrebleu_signature"].startswith("nrefs:1|")
    assert json.loads(capsys.readouterr().out) == m


def test_evaluate_with_candidates_and_mbr(gen_files, tmp_path):
    _, cands = gen_files
    out = tmp_path / "m.json"
    assert main(["evaluate", str(cands), "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert {"self_bleu", "div4"} <= set(m)
    assert main(["evaluate", "--mbr", str(cands), "--out", str(tmp_path / "mbr.json")]) == 0
    assert {"bleu", "self_bleu", "div4"} <= set(json.loads((tmp_path / "mbr.json").read_text()))


def test_evaluate_mbr_without_candidates_exits(gen_files, capsys):
    plain, _ = gen_files
    assert main(["evaluate", "--mbr", str(plain), "--out", str(plain.parent / "x.json")]) == 2
    assert "--mbr needs rows with 'candidates'" in capsys.readouterr().err


def test_evaluate_mbr_orientations(tmp_path):
    rows = [{"source": "s", "reference": "c b c f c d e", "recover": "c c",
             "candidates": ["d e a", "c c", "c b c f c d e"]}]
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps(rows[0]) + "\n")
    assert main(["evaluate", "--mbr", str(f), "--out", str(tmp_path / "std.json")]) == 0
    assert main(["evaluate", "--mbr", "--mbr-orientation", "diffuseq", str(f),
                 "--out", str(tmp_path / "ds.json")]) == 0
    std, ds = (json.loads((tmp_path / n).read_text()) for n in ("std.json", "ds.json"))
    # the standard choice is the reference itself, DiffuSeq's selectBest picks another
    assert std["bleu"] == 1.0 and ds["bleu"] < 1.0
    assert (std["mbr_orientation"], ds["mbr_orientation"]) == ("standard", "diffuseq")


@pytest.mark.parametrize("bad_line", ['{"recover": "a"', '{"reference": "a"}', '[1, 2]', "null",
                                      '{"recover": 3}', '{"recover": "a", "candidates": "a"}'])
def test_evaluate_malformed_line_names_it(tmp_path, bad_line, capsys):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"recover": "a b", "reference": "a b"}\n\n' + bad_line + "\n")
    assert main(["evaluate", str(f)]) == 2
    assert "bad.jsonl:3: not a generation row" in capsys.readouterr().err
    assert not (tmp_path / "bad.metrics.json").exists()


def test_evaluate_empty_or_missing_file(tmp_path, capsys):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n")
    assert main(["evaluate", str(f)]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing.jsonl")]) == 2


# ------------------------------------------------------- the researcher's own files
def _test_pairs(env, n):
    return [json.loads(line) for line in open(env["data"] + "/test.jsonl")][:n]


@pytest.fixture(scope="module")
def own_files(env):
    """Sources as plain text, as jsonl with and without 'trg', and references as text."""
    root = env["root"]
    pairs = _test_pairs(env, 6)
    files = {"txt": root / "sources.txt", "jsonl": root / "pairs.jsonl", "src_only": root / "src_only.jsonl",
             "noext": root / "pairs_noext", "refs": root / "refs.txt"}
    files["txt"].write_text("".join(p["src"] + "\n" for p in pairs))
    files["jsonl"].write_text("".join(json.dumps(p) + "\n" for p in pairs))
    files["src_only"].write_text("".join(json.dumps({"src": p["src"]}) + "\n" for p in pairs))
    files["noext"].write_text(files["jsonl"].read_text())
    files["refs"].write_text("".join(p["trg"] + "\n" for p in pairs))
    return files


GEN = ["--quiet", "generate", "--method", "ddim", "--steps", "3"]


def test_generate_from_input_files_matches_data_path(env, own_files, gen_files, tmp_path):
    """--input reads plain text, jsonl (by extension or content) and gives the rows that
    --data gives for the same pairs; without references the rows have none."""
    plain, _ = gen_files
    want = _rows(plain)[:6]
    for key in ("jsonl", "noext"):
        out = tmp_path / f"{key}.jsonl"
        assert main(GEN + ["--model", env["teacher"], "--input", str(own_files[key]), "--out", str(out)]) == 0
        assert _rows(out) == want
    for key in ("txt", "src_only"):
        out = tmp_path / f"{key}.jsonl"
        assert main(GEN + ["--model", env["teacher"], "--input", str(own_files[key]), "--out", str(out)]) == 0
        assert _rows(out) == [{"source": r["source"], "recover": r["recover"]} for r in want]


def test_generate_out_dash_writes_only_jsonl_to_stdout(env, own_files, gen_files, capsys, monkeypatch):
    import io

    plain, _ = gen_files
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(own_files["jsonl"].read_bytes())))
    assert main(["generate", "--method", "ddim", "--steps", "3", "--model", env["teacher"],
                 "--input", "-", "--out", "-"]) == 0
    captured = capsys.readouterr()
    assert [json.loads(line) for line in captured.out.splitlines()] == _rows(plain)[:6]
    assert "6 sequences in" in captured.err and "-> stdout" in captured.err


def test_generate_input_errors(env, own_files, tmp_path, capsys):
    out = str(tmp_path / "g.jsonl")
    base = GEN + ["--model", env["teacher"], "--out", out]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"src": "a b", "trg": "c"}\n{"src": "a b"}\n')
    assert main(base + ["--input", str(bad)]) == 2
    assert "bad.jsonl:2: line 1 has a 'trg' and line 2 has none" in capsys.readouterr().err
    bad.write_text('{"src": "a b"}\n{"src": 3}\n')
    assert main(base + ["--input", str(bad)]) == 2
    assert "bad.jsonl:2: 'src' is int" in capsys.readouterr().err
    gap = tmp_path / "gap.txt"
    gap.write_text("first source\n\nthird source\n")
    assert main(base + ["--input", str(gap)]) == 2
    assert "gap.txt:2: empty line" in capsys.readouterr().err
    assert main(base + ["--input", str(own_files["txt"]), "--split", "valid"]) == 2
    assert "--split goes with --data" in capsys.readouterr().err
    assert main(base + ["--input", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert not Path(out).exists()
    with pytest.raises(SystemExit):  # --data and --input together: a usage error
        main(base + ["--input", str(own_files["txt"]), "--data", env["data"]])


def test_evaluate_refs_file_and_stdin(gen_files, own_files, tmp_path, capsys, monkeypatch):
    """--refs replaces the rows' references; '-' reads the rows from stdin and writes no
    metrics file unless --out."""
    import io

    plain, _ = gen_files
    rows = _rows(plain)[:6]
    no_refs = tmp_path / "noref.jsonl"
    no_refs.write_text("".join(json.dumps({"source": r["source"], "recover": r["recover"]}) + "\n" for r in rows))
    assert main(["evaluate", str(no_refs)]) == 2
    assert "noref.jsonl:1: no 'reference' in the row; give the references with --refs" in capsys.readouterr().err
    assert main(["evaluate", str(no_refs), "--refs", str(own_files["refs"])]) == 0
    with_refs = json.loads(capsys.readouterr().out)
    raw_refs = own_files["refs"].read_text().splitlines()
    assert with_refs["bleu"] == pytest.approx(dlmone.metrics.bleu([r["recover"] for r in rows], raw_refs))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(no_refs.read_bytes())))
    assert main(["evaluate", "-", "--refs", str(own_files["refs"])]) == 0
    assert json.loads(capsys.readouterr().out) == with_refs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noref.jsonl", "noref.metrics.json"]
    short = tmp_path / "short.txt"
    short.write_text("one\ntwo\n")
    assert main(["evaluate", str(no_refs), "--refs", str(short)]) == 2
    assert "has 2 lines but" in capsys.readouterr().err


def test_evaluate_strips_diffuseq_special_tokens(tmp_path):
    f = tmp_path / "ds.jsonl"
    f.write_text(json.dumps({"source": "[CLS] a b [SEP]", "reference": "[CLS] how can i learn python quickly ? [SEP]",
                             "recover": "[CLS] how can i learn python quickly ? [SEP] [PAD] [PAD]"}) + "\n")
    assert main(["evaluate", str(f), "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["bleu"] == pytest.approx(1.0)


def test_evaluate_baselines(env, gen_files, tmp_path, capsys):
    """--baselines DIR: copy-the-source and the constants on the file's sources, with the
    model's tokenizer when --model is given; a warning when the model loses to the constant."""
    from dlmone.baselines import constant_strings, tokenizer_protocol
    from dlmone.data import load_split

    plain, _ = gen_files
    out = tmp_path / "m.json"
    assert main(["evaluate", str(plain), "--baselines", env["data"], "--model", env["teacher"],
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    m = json.loads(out.read_text())
    names = [b["name"] for b in m["baselines"]]
    assert names == ["baseline: copy the source", "baseline: most frequent train target",
                     "baseline: best of 10 frequent targets on valid"]
    teacher = dlmone.load(env["teacher"])
    to_protocol = tokenizer_protocol(teacher.tokenizer, teacher.config.seq_len)
    rows = _rows(plain)
    sources, refs = [r["source"] for r in rows], [r["reference"] for r in rows]
    constants = constant_strings(load_split(env["data"], "train"), load_split(env["data"], "valid"), 10, to_protocol)
    assert [b["output"] for b in m["baselines"][1:]] == list(constants.values())
    assert m["baselines"][0]["scores"]["bleu"] == pytest.approx(
        dlmone.metrics.bleu(to_protocol(sources, sources), refs))
    assert "baseline: copy the source" in err and "BLEU-DS" in err
    # a 6-step teacher has not learnt the task: the warning says so
    assert m["bleu"] < m["baselines"][2]["scores"]["bleu"]
    assert "does not beat the constant string" in err
    # without --model the texts are scored as written
    assert main(["evaluate", str(plain), "--baselines", env["data"], "--out", str(out)]) == 0
    assert json.loads(out.read_text())["baseline_texts"] == "as written in the data folder"
    assert main(["evaluate", str(plain), "--model", env["teacher"], "--out", str(out)]) == 2
    assert "--model goes with --baselines" in capsys.readouterr().err
    no_src = tmp_path / "nosrc.jsonl"
    no_src.write_text(json.dumps({"recover": "a", "reference": "a"}) + "\n")
    assert main(["evaluate", str(no_src), "--baselines", env["data"]]) == 2
    assert "nosrc.jsonl:1: no 'source'" in capsys.readouterr().err


def test_evaluate_bertscore_without_model_folder_is_a_clear_error(gen_files, tmp_path, capsys):
    plain, _ = gen_files
    assert main(["evaluate", str(plain), "--bertscore", str(tmp_path / "deberta-xlarge-mnli"),
                 "--out", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err
    assert "not a model folder" in err and "huggingface-cli download" in err
    assert not (tmp_path / "m.json").exists()


def test_pipeline_through_pipes(env, own_files, tmp_path):
    """cat sources | python -m dlmone generate --input - --out - | python -m dlmone evaluate - --refs refs:
    stdout of generate is clean jsonl, and the scores equal evaluating the same rows in-process."""
    cmd = (f"set -o pipefail; cat {own_files['txt']} | {sys.executable} -m dlmone --threads 1 generate "
           f"--model {env['teacher']} --method ddim --steps 3 --input - --out - 2>{tmp_path / 'gen.err'} "
           f"| tee {tmp_path / 'gen.jsonl'} | {sys.executable} -m dlmone evaluate - --refs {own_files['refs']}")
    run_env = dict(os.environ, PYTHONPATH=str(Path(dlmone.__file__).parent.parent))
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300, env=run_env)
    assert r.returncode == 0, r.stderr
    scores = json.loads(r.stdout)
    rows = _rows(tmp_path / "gen.jsonl")
    assert [row["source"] for row in rows] == own_files["txt"].read_text().splitlines()
    assert all(set(row) == {"source", "recover"} for row in rows)
    refs = own_files["refs"].read_text().splitlines()
    want = dlmone.metrics.evaluate([row["recover"] for row in rows], refs)
    assert {k: scores[k] for k in want} == pytest.approx(want)
    assert scores["n"] == 6
    assert "6 sequences in" in (tmp_path / "gen.err").read_text()


# ------------------------------------------------------------------ dlmone.load
def test_loaded_model_repr_and_precision_keyword(env, own_files):
    import numpy as np

    teacher = dlmone.load(env["teacher"])
    c = teacher.config
    text = repr(teacher)
    assert text == (f"Teacher(params={teacher.model.num_parameters():,}, layers={c.num_layers}, "
                    f"hidden={c.hidden_dim}, emb={c.emb_dim}, heads={c.num_heads}, vocab={c.vocab_size}, "
                    f"seq_len={c.seq_len}, T={c.diffusion_steps}, vocabulary='{teacher.tokenizer.vocab_size} "
                    f"WordPiece tokens, lower-cased', precision=float32)")
    sources = own_files["txt"].read_text().splitlines()
    kw = dict(method="ddim", steps=3, return_ids=True)
    _, ids32 = teacher.generate(sources, **kw)
    if not dlmone.build_info()["amx_bf16"]:
        with pytest.raises(RuntimeError, match="AMX-BF16"):
            teacher.generate(sources, precision="bf16", **kw)
        return
    _, ids16 = teacher.generate(sources, precision="bf16", **kw)
    assert teacher.model.inference_precision == "float32"  # the keyword is for that call only
    teacher.model.inference_precision = "bf16"
    assert "precision=bf16" in repr(teacher)
    _, ids_attr = teacher.generate(sources, **kw)
    assert np.array_equal(ids16, ids_attr)  # the keyword is the attribute, for one call
    _, back = teacher.generate(sources, precision="float32", **kw)
    assert np.array_equal(back, ids32) and teacher.model.inference_precision == "bf16"
    with pytest.raises(ValueError, match="inference_precision must be one of"):
        teacher.generate(sources, precision="fp16", **kw)
    assert teacher.model.inference_precision == "bf16"
