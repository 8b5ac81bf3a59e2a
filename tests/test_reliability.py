"""Reliability and safety (issue 6), each against the real thing:

* SIGKILL at random moments (and on purpose during checkpoint writes) of the
  ``dlmone train-teacher`` and ``dlmone distill`` processes: after every kill the latest
  checkpoint loads, and resuming to the end gives bitwise the files and log of an
  uninterrupted run. ``DLMONE_KILL_TESTS=N`` sets the number of kills per command (4 by
  default; the full check is ``DLMONE_KILL_TESTS=20 python -m pytest tests/test_reliability.py -k kill``);
  and, deterministically, the resume cases a kill rarely hits: a torn last log line, the
  count of skipped non-finite steps, a log record that averages steps on both sides of
  the checkpoint;
* corrupted model folders and run checkpoints (hypothesis): Teacher.load, Student.load,
  dlmone.load and the resume of train_teacher raise ValueError or FileNotFoundError
  naming the folder, or load exactly what was saved; never another error, never
  different weights;
* the memory estimate: the workspace formula equals the C model's allocation, the total
  is within 25% of the measured peak RSS growth of a training run, and a run over
  ``max_memory`` (or over what is available) is refused before it allocates;
* a full disk while saving (RLIMIT_FSIZE): a clear OSError, the previous checkpoint
  intact, no temp files, and the resumed run equals the uninterrupted one;
* 10,000 training steps on a tiny model keep RSS flat;
* the same seed gives the same checkpoints, generations and student with 1 or 2 threads.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import dlmone
from dlmone import checkpoint as ckpt
from dlmone.builtin_task import write_builtin_task
from dlmone.cli import main
from dlmone.data import Seq2SeqData
from dlmone.distill import DistillConfig, Student, distill
from dlmone.model import DiffusionTransformer, ModelConfig
from dlmone.resources import (MemoryLimitError, available_memory, check_memory, estimate_memory,
                              parse_bytes, workspace_bytes)
from dlmone.teacher import Teacher, TeacherConfig, train_teacher
from dlmone.tokenizer import Tokenizer

from conftest import SHARED_DATA

REPO = Path(__file__).resolve().parent.parent
KILLS = int(os.environ.get("DLMONE_KILL_TESTS", "4"))
QUIET = dict(progress=False, print_fn=lambda s: None)
MODEL = {"emb_dim": 8, "hidden_dim": 16, "num_layers": 1, "num_heads": 2, "ffn_dim": 32, "time_dim": 8}
# dropout and the lossaware sampler (full history at T = 20) must resume exactly too
TEACHER_RUN = dict(preset="tiny", model=dict(MODEL, dropout=0.1), seq_len=24, vocab_size=120, steps=40,
                   batch_size=8, warmup=5, eval_every=20, save_every=1, keep_checkpoints=2, eval_size=8,
                   eval_samples=2, eval_sample_steps=2, log_every=3, diffusion_steps=20)
DISTILL_RUN = dict(steps=12, batch_size=8, eval_every=6, eval_size=8, log_every=2, save_every=1, t_init=15,
                   t_max=19, lr_g=1e-3, lr_psi=1e-3)

pytestmark = pytest.mark.usefixtures("one_thread")


def _dlmone(*args, threads=1):
    """The ``dlmone`` command line, run from this checkout."""
    return [sys.executable, "-m", "dlmone", "--quiet", "--threads", str(threads), *map(str, args)]


ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))


def _run(cmd, **kw):
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}:\n{r.stderr[-3000:]}"
    return r


def _log(path, drop=("tokens_per_s", "steps_per_s", "train_cpu_s", "threads")):
    """The records of a log.jsonl without their timings."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_builtin_task(tmp_path_factory.mktemp("data"), n_train=200, n_valid=20, n_test=20)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, data_dir):
    """An uninterrupted ``dlmone train-teacher`` run: (config file, run folder, seconds)."""
    root = tmp_path_factory.mktemp("teacher")
    cfg = root / "teacher.json"
    cfg.write_text(json.dumps(TEACHER_RUN))
    t0 = time.perf_counter()
    _run(_dlmone("train-teacher", "--data", data_dir, "--config", cfg, "--out", root / "run"))
    return cfg, root / "run", time.perf_counter() - t0


# ============================================================================ SIGKILL
def _writes_in_progress(out):
    """Temp files and folders of unfinished atomic writes, and .old twins of swaps."""
    return {p for p in out.rglob("*") if (p.name.startswith(".") and p.name.endswith(".tmp"))
            or p.name.endswith(".old")}


def _run_and_kill(cmd, out, rng, seconds, targeted):
    """Start ``cmd`` and SIGKILL it after a random part of ``seconds`` (``targeted``: at the
    first write in progress after a random delay). Returns None when the command finished
    first, else whether the kill cut a write short."""
    left_before = _writes_in_progress(out) if out.exists() else set()  # by earlier kills
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(rng.uniform(0.0, 0.6 if targeted else 1.0) * seconds)
        if targeted:
            while proc.poll() is None and not _writes_in_progress(out) - left_before:
                time.sleep(0.0002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        err = proc.communicate(timeout=600)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode == 0:
        return None
    assert proc.returncode == -signal.SIGKILL, err.decode()[-3000:]
    return bool(_writes_in_progress(out) - left_before)


def _kill_until_done(cmd, out, seconds, n_kills, seed, check_loads, check_same):
    """Kill ``cmd`` n_kills times, re-running it to resume each time; every run that gets to
    its end must equal the uninterrupted one (``check_same``), and then starts over in a
    fresh folder. Every other kill is aimed at a checkpoint write."""
    rng = np.random.default_rng(seed)
    kills = cut_writes = finished = 0
    for _ in range(10 * n_kills + 10):
        if kills == n_kills:
            break
        outcome = _run_and_kill(cmd, out, rng, seconds, targeted=kills % 2 == 1)
        if outcome is None:
            check_same(out)
            shutil.rmtree(out)
            finished += 1
        else:
            kills += 1
            cut_writes += outcome
            check_loads(out)
    assert kills == n_kills, f"only {kills} of {n_kills} kills landed before the run finished"
    _run(cmd)
    check_same(out)
    print(f"\n{cmd[6]}: {kills} SIGKILLs ({cut_writes} during a write), {finished + 1} runs resumed to the end")
    return cut_writes


def _check_teacher_run_loads(out):
    start = ckpt.latest_checkpoint(out)  # verifies the checksums
    if start is not None:
        run = ckpt.read_run_json(start, {"config": dict, "step": int, "opt_step": int, "rng": dict})
        assert run["step"] == int(start.name[len("step-"):])
        state = ckpt.load_tensors(start / "state.safetensors")
        n = (state["params"].size,)
        ckpt.check_tensors({k: state[k] for k in ("params", "ema", "adam_m", "adam_v")},
                           {k: n for k in ("params", "ema", "adam_m", "adam_v")}, str(start))
        Tokenizer.load(start)
    if (out / "teacher").exists() or (out / "teacher.old").exists():
        assert isinstance(dlmone.load(out / "teacher"), Teacher)


def _assert_same_run_folder(out, ref, model_dir):
    """Bitwise the same model folder, checkpoints and log (timings aside); only temp files of
    writes a kill cut short may be left beside the model folder and the log."""
    for name in ("config.json", "model.safetensors", "vocab.txt", "SHA256SUMS"):
        assert (out / model_dir / name).read_bytes() == (ref / model_dir / name).read_bytes(), name
    ck, ck_ref = out / "checkpoints", ref / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == sorted(p.name for p in ck_ref.iterdir())
    for p in ck_ref.glob("step-*"):
        for f in p.iterdir():
            assert (ck / p.name / f.name).read_bytes() == f.read_bytes(), f"{p.name}/{f.name}"
    assert _log(out / "log.jsonl") == _log(ref / "log.jsonl")
    left = {p.name for p in out.iterdir()} - {p.name for p in ref.iterdir()}
    assert all(re.fullmatch(rf"\.({model_dir}|log\.jsonl)\..+\.tmp", n) for n in left), left


def test_teacher_kill_and_resume_is_exact(teacher_run, data_dir, tmp_path):
    cfg, ref, seconds = teacher_run
    out = tmp_path / "run"
    cmd = _dlmone("train-teacher", "--data", data_dir, "--config", cfg, "--out", out)
    cut = _kill_until_done(cmd, out, seconds, KILLS, 1, _check_teacher_run_loads,
                           lambda o: _assert_same_run_folder(o, ref, "teacher"))
    if KILLS >= 10:  # half the kills wait for a write; nearly all of those cut one short
        assert cut > 0, "no kill landed during a checkpoint write"


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory, teacher_run, data_dir):
    """An uninterrupted two-stage ``dlmone distill`` of the teacher: (command, run folder, seconds)."""
    root = tmp_path_factory.mktemp("distill")
    cfg = root / "distill.json"
    cfg.write_text(json.dumps(DISTILL_RUN))

    def cmd(out):
        return _dlmone("distill", "--teacher", teacher_run[1] / "teacher", "--data", data_dir,
                       "--config", cfg, "--out", out)

    t0 = time.perf_counter()
    _run(cmd(root / "run"))
    return cmd, root / "run", time.perf_counter() - t0


def _check_distill_run_loads(out):
    for stage in ("stage1", "stage2"):
        start = ckpt.latest_checkpoint(out / stage) if (out / stage).exists() else None
        if start is not None:
            run = ckpt.read_run_json(start, {"config": dict, "step": int, "rng": dict, "best": dict})
            assert run["step"] == int(start.name[len("step-"):])
            state = ckpt.load_tensors(start / "state.safetensors")
            assert {"G", "psi", "g_m", "g_v", "psi_m", "psi_v"} <= set(state)
        if (out / stage / "best").exists() or (out / stage / "best.old").exists():
            assert isinstance(dlmone.load(out / stage / "best"), Student)
    if (out / "student").exists() or (out / "student.old").exists():
        assert isinstance(dlmone.load(out / "student"), Student)


def _assert_same_distillation(out, ref):
    for name in ("config.json", "model.safetensors", "vocab.txt", "SHA256SUMS"):
        assert (out / "student" / name).read_bytes() == (ref / "student" / name).read_bytes(), name
    assert json.loads((out / "summary.json").read_text()) == json.loads((ref / "summary.json").read_text())
    for stage in ("stage1", "stage2"):
        _assert_same_run_folder(out / stage, ref / stage, "best")


def test_distill_kill_and_resume_is_exact(distill_run, tmp_path):
    cmd, ref, seconds = distill_run
    out = tmp_path / "run"
    cut = _kill_until_done(cmd(out), out, seconds, KILLS, 2, _check_distill_run_loads,
                           lambda o: _assert_same_distillation(o, ref))
    if KILLS >= 10:
        assert cut > 0, "no kill landed during a checkpoint write"


def test_torn_last_log_line_is_dropped_on_resume(teacher_run, data_dir, tmp_path):
    """A kill in the middle of a log write leaves half a line; the resumed run drops it."""
    cfg, ref, _ = teacher_run
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    shutil.rmtree(out / "teacher")
    (out / "checkpoints" / "latest").write_text("step-00000039\n")
    with open(out / "log.jsonl", "a") as f:
        f.write('{"loss": 0.5, "st')
    train_teacher(TeacherConfig(**TEACHER_RUN), data_dir, out, **QUIET)
    _assert_same_run_folder(out, ref, "teacher")


def test_distill_resumed_between_log_records_logs_the_same(distill_run, teacher_run, data_dir, tmp_path,
                                                           monkeypatch):
    """A record averages the last log_every (2) steps; a resume from the step-3 checkpoint
    must still average steps 3 and 4 in the step-4 record."""
    _, ref, _ = distill_run
    real_save = ckpt.save_run_checkpoint

    def interrupt_after_step_3(run_dir, step, *args, **kwargs):
        path = real_save(run_dir, step, *args, **kwargs)
        if step == 3:
            raise KeyboardInterrupt
        return path

    out = tmp_path / "run"
    monkeypatch.setattr(ckpt, "save_run_checkpoint", interrupt_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        distill(teacher_run[1] / "teacher", data_dir, DistillConfig(**DISTILL_RUN), out, **QUIET)
    monkeypatch.setattr(ckpt, "save_run_checkpoint", real_save)
    distill(teacher_run[1] / "teacher", data_dir, DistillConfig(**DISTILL_RUN), out, **QUIET)
    _assert_same_distillation(out, ref)


def test_resume_keeps_the_count_of_skipped_steps(data_dir, tmp_path, monkeypatch):
    """Steps 2, 4, 5 and 6 get a NaN gradient and max_bad_steps is 3: the run stops at step
    6. Interrupted after the step-5 checkpoint (two bad steps in a row so far), the
    resumed run must stop at step 6 too, with the same log."""
    import dlmone.teacher as teacher_module
    from dlmone.diffusion import derive_seed

    real_loss, real_save = teacher_module.training_loss, ckpt.save_run_checkpoint
    poisoned = {derive_seed(0, step - 1, 0) for step in (2, 4, 5, 6)}

    def poisoning_loss(model, *args, **kwargs):
        terms = real_loss(model, *args, **kwargs)
        if kwargs["seed"] in poisoned:
            model.grad_buffer[3] = np.nan
        return terms

    def interrupt_after_step_5(run_dir, step, *args, **kwargs):
        path = real_save(run_dir, step, *args, **kwargs)
        if step == 5:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(teacher_module, "training_loss", poisoning_loss)
    config = TeacherConfig(**dict(TEACHER_RUN, steps=8, log_every=1, max_bad_steps=3))
    with pytest.raises(FloatingPointError, match="teacher step 6: 3 consecutive"):
        train_teacher(config, data_dir, tmp_path / "straight", **QUIET)
    monkeypatch.setattr(ckpt, "save_run_checkpoint", interrupt_after_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(config, data_dir, tmp_path / "resumed", **QUIET)
    monkeypatch.setattr(ckpt, "save_run_checkpoint", real_save)
    with pytest.raises(FloatingPointError, match="teacher step 6: 3 consecutive"):
        train_teacher(config, data_dir, tmp_path / "resumed", **QUIET)
    log = _log(tmp_path / "resumed" / "log.jsonl")
    assert log == _log(tmp_path / "straight" / "log.jsonl")
    assert [r["skipped_steps"] for r in log if "skipped_steps" in r] == [0, 1, 1, 2, 3]


# ============================================================================ corrupted checkpoints
@pytest.fixture(scope="module")
def folders(tmp_path_factory, teacher_run):
    """Pristine copies of a teacher folder, a student folder and a run checkpoint, with
    what loading them gives."""
    root = tmp_path_factory.mktemp("pristine")
    teacher = Teacher.load(teacher_run[1] / "teacher")
    Student(teacher.model, teacher.tokenizer, {"t_init": 15}).save(root / "student")
    shutil.copytree(teacher_run[1] / "teacher", root / "teacher")
    return root, teacher


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


corruptions = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(1, 255)), min_size=1, max_size=4)),
    st.tuples(st.just("random"), st.binary(max_size=300)),
    st.tuples(st.just("delete"), st.none()),
    st.tuples(st.just("json"), st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                                            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                                            max_leaves=6)),
)


def _corrupt(path, how, arg):
    raw = path.read_bytes()
    if how == "truncate":
        path.write_bytes(raw[:int(arg * len(raw))])
    elif how == "flip":
        b = bytearray(raw)
        for where, mask in arg:
            if b:
                b[min(int(where * len(b)), len(b) - 1)] ^= mask
        path.write_bytes(bytes(b))
    elif how == "random":
        path.write_bytes(arg)
    elif how == "delete":
        path.unlink()
    else:
        path.write_text(json.dumps(arg))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["teacher", "student", "checkpoint"]), file_index=st.integers(0, 2),
       flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(1, 255)), min_size=1, max_size=3))
def test_any_changed_byte_is_caught_by_the_checksums(folders, teacher_run, data_dir, tmp_path_factory, which,
                                                     file_index, flips):
    """Bit rot anywhere in a model folder, or in the checkpoint a run resumes from (tensor
    values included, which no structural check can see): ValueError naming the file."""
    root, _ = folders
    if which == "checkpoint":
        out = tmp_path_factory.mktemp("resume") / "run"
        shutil.copytree(teacher_run[1] / "checkpoints", out / "checkpoints")
        folder = out / "checkpoints" / "step-00000040"
    else:
        folder = tmp_path_factory.mktemp("damaged") / which
        shutil.copytree(root / which, folder)
    target = folder / [n for n in _files(folder) if n != "SHA256SUMS"][file_index]
    before = target.read_bytes()
    _corrupt(target, "flip", flips)
    assume(target.read_bytes() != before)  # flips at one place can cancel out
    with pytest.raises(ValueError, match=re.escape(f"{target} is corrupted")):
        if which == "checkpoint":
            train_teacher(TeacherConfig(**TEACHER_RUN), data_dir, out, **QUIET)
        else:
            dlmone.load(folder)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["teacher", "student"]), file_index=st.integers(0, 3), corruption=corruptions,
       drop_checksums=st.booleans())
def test_corrupted_model_folder_is_refused(folders, tmp_path_factory, which, file_index, corruption,
                                           drop_checksums):
    """Byte-level damage to any file: the checksums catch it. With SHA256SUMS removed as
    well (a folder from before checksums) the structural checks catch what they can see,
    and only a change of tensor values may go unnoticed; such a folder must still load
    as a model or raise a clear error, never crash."""
    root, teacher = folders
    folder = tmp_path_factory.mktemp("damaged") / which
    shutil.copytree(root / which, folder)
    names = _files(folder)
    target = folder / names[file_index % len(names)]
    _corrupt(target, *corruption)
    if drop_checksums and (folder / "SHA256SUMS").exists():
        (folder / "SHA256SUMS").unlink()
    changed = not target.exists() or target.read_bytes() != (root / which / target.name).read_bytes()
    checksummed = (folder / "SHA256SUMS").exists() and target.name != "SHA256SUMS"
    cls = Teacher if which == "teacher" else Student
    for load in (cls.load, dlmone.load):
        try:
            loaded = load(folder)
        except (ValueError, FileNotFoundError) as e:
            assert str(folder) in str(e), f"the message does not name {folder}: {e}"
            continue
        assert not (changed and checksummed), f"{corruption[0]} of {target.name} went unnoticed"
        assert isinstance(loaded, cls)
        if checksummed or target.name != "model.safetensors":
            assert np.array_equal(loaded.model.params, teacher.model.params)
    other = Student if which == "teacher" else Teacher
    with pytest.raises((ValueError, FileNotFoundError)):
        other.load(folder)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(file_index=st.integers(0, 4), corruption=corruptions)
def test_corrupted_run_checkpoint_is_refused_on_resume(teacher_run, data_dir, tmp_path_factory, file_index,
                                                       corruption):
    """Damage to the latest run checkpoint (or its pointer): resuming raises a clear error
    naming the checkpoint, or (when the damage hit nothing that is read) ends exactly as
    the uninterrupted run did."""
    _, ref, _ = teacher_run
    out = tmp_path_factory.mktemp("resume") / "run"
    shutil.copytree(ref / "checkpoints", out / "checkpoints")
    shutil.copy(ref / "log.jsonl", out / "log.jsonl")
    latest = out / "checkpoints" / "step-00000040"
    targets = [out / "checkpoints" / "latest"] + [latest / n for n in _files(latest)]
    target = targets[file_index]
    _corrupt(target, *corruption)
    try:
        train_teacher(TeacherConfig(**TEACHER_RUN), data_dir, out, **QUIET)
    except (ValueError, FileNotFoundError) as e:
        assert "checkpoints" in str(e) and str(out) in str(e), e
        return
    assert (out / "teacher" / "model.safetensors").read_bytes() == (ref / "teacher" / "model.safetensors").read_bytes()


# ============================================================================ memory
@pytest.mark.parametrize("overrides", [{}, dict(emb_dim=16, hidden_dim=16, num_heads=4, time_dim=5),
                                       dict(num_layers=3, ffn_dim=7, max_positions=20)])
@pytest.mark.parametrize("batch, length", [(1, 1), (3, 12), (5, 7)])
def test_workspace_and_parameter_sizes_are_the_core_allocations(overrides, batch, length):
    cfg = ModelConfig(**dict(dict(vocab_size=31, seq_len=12, emb_dim=8, hidden_dim=12, num_layers=2, num_heads=3,
                                  ffn_dim=20, time_dim=8, dropout=0.0), **overrides))
    model = DiffusionTransformer(cfg)
    model.forward(np.zeros((batch, length, cfg.emb_dim), np.float32), np.zeros(batch, np.int64))
    assert workspace_bytes(cfg, batch, length) == model._core.workspace_bytes
    assert workspace_bytes(cfg, batch, length, backward=False) < model._core.workspace_bytes
    assert estimate_memory(cfg, 4)["gradients"] == model.params.nbytes


def test_parse_bytes():
    assert parse_bytes(123) == 123
    assert parse_bytes("4GiB") == parse_bytes("4g") == parse_bytes(" 4 G ") == 4 * 2**30
    assert parse_bytes("1.5MB") == 1_500_000 and parse_bytes("2 kib") == 2048 and parse_bytes("7b") == 7
    for bad in (0, -5, "", "4 parsecs", "GiB", "1e9", True, 1.5, None):
        with pytest.raises(ValueError, match="max_memory"):
            parse_bytes(bad)


PEAK_SCRIPT = r"""
import gc, json, sys, warnings
import dlmone
from dlmone.builtin_task import make_builtin_task
from dlmone.data import Seq2SeqData
from dlmone.distill import DistillConfig, distill
from dlmone.resources import estimate_memory
from dlmone.teacher import Teacher, TeacherConfig, train_teacher
from dlmone.tokenizer import Tokenizer

def rss(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

kind, spec, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
teacher_config = TeacherConfig(**spec["teacher"])
data = Seq2SeqData.from_pairs(**make_builtin_task(n_train=200, n_valid=64, n_test=0))
dlmone.set_num_threads(1)
if kind == "distill":  # a teacher to distil, written before the measurement starts
    tokenizer = Tokenizer.from_vocab_file(teacher_config.vocab_file)
    model = dlmone.DiffusionTransformer(teacher_config.model_config(tokenizer.vocab_size), seed=1)
    Teacher(model, tokenizer, {}).save(out + "/teacher")
    del tokenizer, model
    gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # restart the peak (VmHWM) here
base = rss("VmRSS:")
if kind == "teacher":
    teacher = train_teacher(teacher_config, data, out + "/run", progress=False, print_fn=lambda s: None)
    estimate = estimate_memory(teacher.config, teacher_config.batch_size, "teacher")
else:
    config = DistillConfig(**spec["distill"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the degeneration monitors of a 2-step student
        student = distill(out + "/teacher", data, config, out + "/run", progress=False, print_fn=lambda s: None)
    estimate = estimate_memory(student.config, config.batch_size, "distill", eval_batch=config.eval_size,
                               g_ema=config.g_ema > 0)
print(json.dumps({"peak_growth": rss("VmHWM:") - base, "estimate": estimate}))
"""


@pytest.mark.parametrize("kind", ["teacher", "distill"])
def test_memory_estimate_matches_peak_rss(tmp_path, kind):
    """A 5.6M-parameter model with BERT's 30,522-token vocabulary: a teacher run of two
    steps, a validation and a checkpoint, or a two-stage distillation of two steps each.
    The estimate is within 25% of the peak RSS growth measured in a fresh process."""
    vocab = SHARED_DATA / "vocab" / "bert-base-uncased-vocab.txt"
    if not vocab.is_file():
        pytest.skip("needs the shared BERT vocabulary")
    teacher = dict(preset="small", model=dict(emb_dim=128, hidden_dim=256, num_layers=2, num_heads=4, ffn_dim=1024),
                   vocab_file=str(vocab), seq_len=32, batch_size=16, steps=2, eval_every=2, save_every=2,
                   eval_size=32, eval_samples=2, eval_sample_steps=2, diffusion_steps=100)
    distillation = dict(steps=2, batch_size=16, eval_every=2, eval_size=32, save_every=2, t_init=50, t_max=99)
    spec = json.dumps({"teacher": teacher, "distill": distillation})
    r = _run([sys.executable, "-c", PEAK_SCRIPT, kind, spec, tmp_path])
    out = json.loads(r.stdout.splitlines()[-1])
    total, peak = out["estimate"]["total"], out["peak_growth"]
    assert total > 200 * 2**20, "the model is too small for the comparison to mean much"
    assert abs(total - peak) <= 0.25 * peak, f"estimate {total / 2**20:.1f} MiB, measured peak growth " \
                                             f"{peak / 2**20:.1f} MiB ({out['estimate']})"


def test_over_max_memory_is_refused_before_allocating(tmp_path, data_dir, teacher_run):
    cfg = TeacherConfig(**dict(TEACHER_RUN, max_memory="4KiB"))
    with pytest.raises(MemoryLimitError, match=r"train_teacher needs about [\d.]+ KiB \(parameters .*\) but "
                                               r"max_memory is 4\.0 KiB") as info:
        train_teacher(cfg, data_dir, tmp_path / "t", **QUIET)
    assert isinstance(info.value, MemoryError) and isinstance(info.value, ValueError)
    assert not (tmp_path / "t").exists()
    dcfg = DistillConfig(**dict(DISTILL_RUN, max_memory=10_000))
    with pytest.raises(MemoryLimitError, match=r"distill needs about .* but max_memory is 9\.8 KiB"):
        distill(teacher_run[1] / "teacher", data_dir, dcfg, tmp_path / "d", **QUIET)
    assert not (tmp_path / "d").exists()
    # a generous limit runs; max_memory is no part of the run's identity: resuming with
    # another limit continues the run
    out = tmp_path / "ok"
    small = dict(TEACHER_RUN, steps=4, save_every=2, eval_every=4)
    train_teacher(TeacherConfig(**dict(small, max_memory="1GiB")), data_dir, out, **QUIET)
    train_teacher(TeacherConfig(**dict(small, max_memory=None)), data_dir, out, **QUIET)
    with pytest.raises(ValueError, match="max_memory"):
        TeacherConfig(max_memory="lots")


def test_run_larger_than_available_memory_is_refused(tmp_path, data_dir, capsys):
    available = available_memory()
    if available is None:
        pytest.skip("no /proc/meminfo")
    cfg = dict(preset="diffuseq_base", seq_len=128, batch_size=1024, vocab_size=200)
    while estimate_memory(TeacherConfig(**cfg).model_config(200), cfg["batch_size"])["total"] <= available:
        cfg["batch_size"] *= 4  # the 91M-parameter model with a batch whose activations do not fit
    with pytest.raises(MemoryLimitError, match=r"only .* is available \(MemAvailable"):
        train_teacher(TeacherConfig(**cfg), data_dir, tmp_path / "big", **QUIET)
    with pytest.raises(MemoryLimitError, match="MemAvailable"):
        check_memory({"parameters": 2 * available, "total": 2 * available})
    # the command line reports it as a configuration error
    sets = [a for k, v in cfg.items() for a in ("--set", f"{k}={v}")]
    assert main(["--quiet", "train-teacher", "--data", str(data_dir), *sets, "--out", str(tmp_path / "c")]) == 2
    assert "needs about" in capsys.readouterr().err


# ============================================================================ full disk
DISK_FULL_SCRIPT = r"""
import json, resource, signal, sys
from dlmone import checkpoint as ckpt
from dlmone.teacher import TeacherConfig, train_teacher

config, data_dir, out, limit = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit, write() fails with EFBIG
save = ckpt.save_run_checkpoint

def save_then_fill_the_disk(*args, **kwargs):
    path = save(*args, **kwargs)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return path

ckpt.save_run_checkpoint = save_then_fill_the_disk
try:
    train_teacher(TeacherConfig(**config), data_dir, out, progress=False, print_fn=lambda s: None)
except OSError as e:
    print(json.dumps({"type": type(e).__name__, "errno": e.errno, "message": str(e)}))
    sys.exit(3)
"""


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, data_dir):
    """After the step-3 checkpoint no file may grow past 16 KiB: the step-6 state
    (~90 KB) cannot be written."""
    config = dict(TEACHER_RUN, steps=6, save_every=3, eval_every=6)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", DISK_FULL_SCRIPT, json.dumps(config), str(data_dir), str(out),
                        str(16 * 1024)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 3, r.stderr[-3000:]
    err = json.loads(r.stdout.splitlines()[-1])
    assert err["errno"] == errno.EFBIG
    assert re.search(r"cannot write .*step-00000006: File too large; the folder there \(if any\) is unchanged",
                     err["message"]), err["message"]
    # the step-3 checkpoint is intact and the only one; nothing half-written is left
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000003"]
    assert ckpt.latest_checkpoint(out) == out / "checkpoints" / "step-00000003"
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert not (out / "teacher").exists()
    # with space again, resuming ends where an uninterrupted run ends
    resumed = train_teacher(TeacherConfig(**config), data_dir, out, **QUIET)
    straight = train_teacher(TeacherConfig(**config), data_dir, tmp_path / "straight", **QUIET)
    assert np.array_equal(resumed.model.params, straight.model.params)
    assert _log(out / "log.jsonl") == _log(tmp_path / "straight" / "log.jsonl")


# ============================================================================ flat RSS
RSS_SCRIPT = r"""
import json, os
import numpy as np
import dlmone
from dlmone.diffusion import Diffusion, make_timestep_sampler, training_loss

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

dlmone.set_num_threads(1)
cfg = dlmone.ModelConfig(vocab_size=50, seq_len=12, emb_dim=16, hidden_dim=24, num_layers=2, num_heads=3,
                         ffn_dim=40, time_dim=16, dropout=0.1, diffusion_steps=100)
model = dlmone.DiffusionTransformer(cfg, seed=1)
opt = dlmone.AdamW(model, lr=1e-3, clip_norm=1.0)
ema = dlmone.EMA(model, 0.99)
diffusion = Diffusion(cfg.diffusion_steps)
sampler = make_timestep_sampler("lossaware", diffusion.T)
rng = np.random.default_rng(0)
tokens = rng.integers(0, cfg.vocab_size, size=(2, cfg.seq_len))
mask = (rng.random((2, cfg.seq_len)) < 0.5).astype(np.float32)
sizes = {}
for i in range(1, 10_001):
    model.zero_grad()
    t, w = sampler.sample(2, rng)
    terms = training_loss(model, diffusion, tokens, mask, t, w, seed=i)  # forward and backward
    sampler.update(t, terms.per_example)
    opt.step()
    ema.update()
    if i in (1_000, 10_000):
        sizes[i] = rss()
print(json.dumps(sizes))
"""


def test_rss_is_flat_over_10000_training_steps():
    """Forward, backward, losses, AdamW and EMA 10,000 times on a tiny model: RSS after
    10,000 steps is within 256 KiB of RSS after 1,000 (a leak of 32 bytes a step would
    show)."""
    r = _run([sys.executable, "-c", RSS_SCRIPT])
    sizes = json.loads(r.stdout.splitlines()[-1])
    growth = sizes["10000"] - sizes["1000"]
    assert growth <= 256 * 1024, f"RSS grew by {growth / 1024:.0f} KiB between step 1,000 and 10,000"


# ============================================================================ determinism
def test_same_seed_same_results_with_one_or_two_threads(tmp_path, data_dir):
    """The pipeline twice with the same seed, on 1 and on 2 threads: bitwise the same
    checkpoints, teacher, generations (DDIM with candidates, ancestral) and student."""
    sources = [s for s, _ in Seq2SeqData.from_dir(data_dir).test]
    for threads in (1, 2):
        dlmone.set_num_threads(threads)
        run = tmp_path / f"threads{threads}"
        config = TeacherConfig(**dict(TEACHER_RUN, steps=8, save_every=4, eval_every=8))
        teacher = train_teacher(config, data_dir, run / "teacher-run", **QUIET)
        student = distill(run / "teacher-run" / "teacher", data_dir,
                          DistillConfig(**dict(DISTILL_RUN, steps=3, eval_every=3, save_every=3)), run / "distill",
                          **QUIET)
        generations = {
            "ddim": teacher.generate(sources, steps=5, method="ddim", num_candidates=2, return_candidates=True),
            "ancestral": teacher.generate(sources[:4], seed=3),
            "student": student.generate(sources, steps=2, return_ids=True)[1].tolist()}
        (run / "generations.json").write_text(json.dumps(generations))
    one, two = tmp_path / "threads1", tmp_path / "threads2"
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file() and p.name != "log.jsonl")
    assert len(files) > 20 and files == sorted(p.relative_to(two) for p in two.rglob("*")
                                               if p.is_file() and p.name != "log.jsonl")
    for rel in files:
        assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel
    for log in one.rglob("log.jsonl"):
        assert _log(log) == _log(two / log.relative_to(one)), log
