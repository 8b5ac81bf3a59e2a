"""Data-parallel training over MPI (dlmone.distributed).

Without MPI: the row sharding, the launcher detection, and that the shares of a batch
that ``training_loss`` computes for disjoint rows add up to the whole batch's loss and
gradient. With Open MPI's ``mpirun`` and mpi4py (CI installs both), in subprocesses:
2 ranks train a teacher and distil a student to the weights one process reaches, up to
floating-point summation order; 1 rank gives exactly the same weights; sharded
generation writes the same file; an exception on one rank and a SIGKILLed rank both
stop the whole job within a timeout, naming the rank, and the last checkpoint resumes.

Tolerance (measured: at most 2.4e-7 on weights of magnitude up to 3.6, Adam's second
moments within 1e-4 relative): weights within 2e-6, except the attention key biases:
their exact gradient is 0 (softmax ignores a shift shared by all logits of a row), so
the gradient there is rounding noise that Adam normalises into steps of up to ~lr;
they only have to stay within lr x steps. Adam's second moments, which scale with the
gradient squared, must agree within 1e-3 relative: they would be off by K² if a rank's
share of the gradient were not its sum divided by the global batch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_close, make_config, make_model

ROOT = Path(__file__).resolve().parent.parent
MPIRUN = shutil.which("mpirun")
HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None
needs_mpi = pytest.mark.skipif(
    MPIRUN is None or not HAVE_MPI4PY,
    reason="needs Open MPI's mpirun and mpi4py (apt-get install openmpi-bin libopenmpi-dev && "
           "pip install mpi4py; CI installs both)")

MODEL = {"emb_dim": 8, "hidden_dim": 16, "num_layers": 1, "num_heads": 2, "ffn_dim": 32, "time_dim": 8}
LR = 3e-3
STEPS = 6
TEACHER_RUN = dict(preset="tiny", model=MODEL, seq_len=24, vocab_size=120, steps=STEPS, batch_size=8,
                   grad_accum=2, lr=LR, warmup=0, eval_every=3, save_every=3, eval_size=12,
                   eval_samples=3, eval_sample_steps=2, log_every=2, diffusion_steps=50)
DISTILL_STEPS = 4
DISTILL_LR = 1e-3
DISTILL_FLAGS = ["--stage", "1", "--steps", str(DISTILL_STEPS), "--set", "batch_size=8",
                 "--set", "eval_every=2", "--set", "save_every=2", "--set", "eval_size=10", "--set", "log_every=2",
                 "--set", "disc_head=linear", "--set", "t_init=40", "--set", "t_max=45",
                 "--set", f"lr_g={DISTILL_LR}", "--set", f"lr_psi={DISTILL_LR}"]
KEY_BIAS = "attention.self.key.bias"

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ without MPI
def test_shard_rows_cut_a_batch_into_equal_runs():
    from dlmone.distributed import shard_rows

    assert [shard_rows(12, r, 3) for r in range(3)] == [slice(0, 4), slice(4, 8), slice(8, 12)]
    assert shard_rows(5, 0, 1) == slice(0, 5)
    with pytest.raises(ValueError, match=r"batch_size=10 is not divisible by the 4 MPI ranks"):
        shard_rows(10, 1, 4)


def test_world_is_one_process_without_a_launcher(monkeypatch):
    from dlmone import distributed

    for var in distributed.LAUNCHER_SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(distributed, "_world", None)
    comm = distributed.world()
    assert type(comm) is distributed.LocalComm and comm.size == 1 and comm.is_root
    assert distributed.world() is comm
    monkeypatch.setattr(distributed, "_world", None)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")  # mpirun -n 1: no MPI needed
    assert type(distributed.world()) is distributed.LocalComm


def test_world_without_mpi4py_under_a_launcher_says_what_to_install(monkeypatch):
    from dlmone import distributed

    monkeypatch.setattr(distributed, "_world", None)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "3")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py raises ImportError
    with pytest.raises(RuntimeError, match=r"one of 3 MPI ranks, but mpi4py is not installed: "
                                           r"pip install 'dlmone\[mpi\]'"):
        distributed.world()


@pytest.mark.parametrize("dropout,recipe", [(0.0, False), (0.3, False), (0.3, True)],
                         ids=["plain", "dropout", "self_cond+soft_absorb"])
def test_training_loss_shares_of_disjoint_rows_add_up_to_the_batch(rng, dropout, recipe):
    """With dropout too: a shard's rows get the whole batch's masks (row_offset); and with
    the recipe options, the whole batch's self-conditioning rows and absorbed positions."""
    from dlmone.diffusion import Diffusion, training_loss

    cfg = make_config(dropout=dropout, self_conditioning=recipe, mask_embedding=recipe)
    model = make_model(cfg, rng)
    diffusion = Diffusion(cfg.diffusion_steps)
    B, L = 6, cfg.seq_len
    tokens = rng.integers(0, cfg.vocab_size, (B, L))
    mask = (rng.random((B, L)) < 0.6).astype(np.float32)
    t = rng.integers(0, diffusion.T, B)
    t[1] = 0  # the x0_mean target
    w = rng.uniform(0.5, 2.0, B).astype(np.float32)

    def run(rows):
        model.zero_grad()
        terms = training_loss(model, diffusion, tokens, mask, t, w, seed=5, rows=rows,
                              soft_absorb=0.7 if recipe else 0.0)
        return terms, model.grad_buffer.copy()

    full, g_full = run(None)
    whole, g_whole = run(slice(0, B))  # one rank holding the whole batch: exactly the batch
    assert np.array_equal(g_whole, g_full) and np.array_equal(whole.per_example, full.per_example)
    assert [whole.loss, whole.mse, whole.nll, whole.prior] == [full.loss, full.mse, full.nll, full.prior]
    # unequal shares too: each is its rows' sum divided by the whole batch size
    shares = [run(rows) for rows in (slice(0, 2), slice(2, 6))]
    assert_close(sum(g for _, g in shares), g_full, "summed gradient", rtol=1e-4, atol=1e-7)
    for name in ("loss", "mse", "nll", "prior"):
        assert_close(sum(getattr(s, name) for s, _ in shares), getattr(full, name), name, rtol=1e-5)
    # each row got the same noise as in the whole batch
    assert_close(np.concatenate([s.per_example for s, _ in shares]), full.per_example, "per-example loss",
                 rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ with MPI
def _env():
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_btl_vader_single_copy_mechanism="none")  # no CMA: containers forbid ptrace
    return env


def _dlmone(*args):
    return [sys.executable, "-m", "dlmone", "--quiet", "--threads", "1", *args]


def _mpirun(n, args, timeout=60, mpmd=None):
    """``mpirun -n N python -m dlmone ARGS`` (plus ``: -n 1 ... MPMD`` for a second program);
    the whole process group is killed if it outlives ``timeout`` (a hang fails the test)."""
    cmd = [MPIRUN, "--oversubscribe", "-n", str(n), *_dlmone(*args)]
    if mpmd is not None:
        cmd += [":", "-n", "1", *_dlmone(*mpmd)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"mpirun -n {n} dlmone {' '.join(args)} hung for {timeout}s")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _state(run_dir, step):
    from dlmone import checkpoint as ckpt

    return ckpt.load_tensors(Path(run_dir) / "checkpoints" / f"step-{step:08d}" / "state.safetensors")


def _key_biases(run_dir):
    """Mask over the flat parameter buffer of the attention key biases."""
    from dlmone import load

    layout = load(Path(run_dir) / "teacher").model.layout
    size = max(off + int(np.prod(shape)) for off, shape in layout.values())
    out = np.zeros(size, bool)
    for name, (off, shape) in layout.items():
        if name.endswith(KEY_BIAS):
            out[off:off + int(np.prod(shape))] = True
    return out


def assert_weights_match(got, want, key_bias, lr, steps, name):
    d = np.abs(got.astype(np.float64) - want)
    assert d[~key_bias].max() <= 2e-6, f"{name}: max difference {d[~key_bias].max():.3g} off the key biases"
    assert d[key_bias].max() <= lr * steps, f"{name}: key biases differ by {d[key_bias].max():.3g}"


def assert_moments_match(got, want, name):
    assert_close(got, want, name, rtol=1e-3, atol=1e-6 * float(np.abs(want).max()))


def _records(run_dir, key):
    return [r for r in map(json.loads, open(Path(run_dir) / "log.jsonl")) if key in r]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Data, and a teacher trained and distilled in this (single) process."""
    from dlmone.builtin_task import write_builtin_task
    from dlmone.cli import main

    root = tmp_path_factory.mktemp("mpi")
    data = write_builtin_task(root / "data", n_train=200, n_valid=20, n_test=20)
    cfg = root / "cfg.json"
    cfg.write_text(json.dumps(TEACHER_RUN))
    teacher = root / "teacher1"
    assert main(["--quiet", "--threads", "1", "train-teacher", "--data", str(data), "--config", str(cfg),
                 "--out", str(teacher)]) == 0
    student = root / "student1"
    assert main(["--quiet", "--threads", "1", "distill", "--teacher", str(teacher / "teacher"), "--data",
                 str(data), *DISTILL_FLAGS, "--out", str(student)]) == 0
    return {"root": root, "data": str(data), "cfg": str(cfg), "teacher": teacher, "student": student}


@needs_mpi
def test_two_ranks_train_the_teacher_one_process_trains(one_process):
    run = one_process["root"] / "teacher2"
    r = _mpirun(2, ["train-teacher", "--data", one_process["data"], "--config", one_process["cfg"],
                    "--out", str(run)])
    assert r.returncode == 0, r.stderr
    one = one_process["teacher"]
    key_bias = _key_biases(one)
    for step in (3, STEPS):
        got, want = _state(run, step), _state(one, step)
        for name in ("params", "ema"):
            assert_weights_match(got[name], want[name], key_bias, LR, step, f"{name} at step {step}")
        assert_moments_match(got["adam_v"], want["adam_v"], f"adam_v at step {step}")
        # the loss-aware sampler saw the global batch's losses on every rank
        assert np.array_equal(got["sampler.counts"], want["sampler.counts"])
        assert_close(got["sampler.losses"], want["sampler.losses"], "sampler losses", rtol=1e-5, atol=1e-6)
    # rank 0 alone wrote the log: the same records, the losses summed over the ranks
    got_log, want_log = _records(run, "loss"), _records(one, "loss")
    assert [r["step"] for r in got_log] == [r["step"] for r in want_log]
    for g, w in zip(got_log, want_log):
        for key in ("loss", "mse", "nll"):
            assert g[key] == pytest.approx(w[key], rel=1e-5)
        assert g["comm_s_per_step"] > 0 and "comm_s_per_step" not in w
    got_val, want_val = _records(run, "val_loss"), _records(one, "val_loss")  # sharded validation
    assert [g["val_loss"] for g in got_val] == pytest.approx([w["val_loss"] for w in want_val], rel=1e-5)
    assert (run / "teacher" / "model.safetensors").is_file()


@needs_mpi
def test_two_ranks_train_a_recipe_teacher_one_process_trains(one_process):
    """Self-conditioning, the soft absorbing state and dropout on (EMA warm-up is the default)."""
    from dlmone.cli import main

    root = one_process["root"]
    recipe = ["--set", "model.self_conditioning=true", "--set", "model.dropout=0.1", "--set", "soft_absorb=0.5"]
    one, run = root / "recipe1", root / "recipe2"
    base = ["train-teacher", "--data", one_process["data"], "--config", one_process["cfg"], *recipe]
    assert main(["--quiet", "--threads", "1", *base, "--out", str(one)]) == 0
    r = _mpirun(2, [*base, "--out", str(run)])
    assert r.returncode == 0, r.stderr
    key_bias = _key_biases(one)
    got, want = _state(run, STEPS), _state(one, STEPS)
    for name in ("params", "ema"):
        assert_weights_match(got[name], want[name], key_bias, LR, STEPS, name)
    assert_moments_match(got["adam_v"], want["adam_v"], "adam_v")


@needs_mpi
def test_one_rank_is_exactly_one_process(one_process):
    run = one_process["root"] / "teacher-k1"
    r = _mpirun(1, ["train-teacher", "--data", one_process["data"], "--config", one_process["cfg"],
                    "--out", str(run)])
    assert r.returncode == 0, r.stderr
    got, want = _state(run, STEPS), _state(one_process["teacher"], STEPS)
    assert set(got) == set(want)
    for name in want:
        assert np.array_equal(got[name], want[name]), name


@needs_mpi
def test_two_ranks_distill_the_student_one_process_distils(one_process):
    run = one_process["root"] / "student2"
    r = _mpirun(2, ["distill", "--teacher", str(one_process["teacher"] / "teacher"), "--data",
                    one_process["data"], *DISTILL_FLAGS, "--out", str(run)])
    assert r.returncode == 0, r.stderr
    key_bias = _key_biases(one_process["teacher"])
    got = _state(run / "stage1", DISTILL_STEPS)
    want = _state(one_process["student"] / "stage1", DISTILL_STEPS)
    for name in ("G", "psi"):
        assert_weights_match(got[name], want[name], key_bias, DISTILL_LR, DISTILL_STEPS, name)
    for name in ("g_v", "psi_v"):
        assert_moments_match(got[name], want[name], name)
    # The Linear head starts at 0, so every logit is 0 and the bias's first gradient is
    # exactly 0 (as many real rows as fake ones): its sign is rounding noise, which Adam's
    # first step turns into a bias of up to ±lr; that shifts every later logit a little.
    # Measured: head weights within 1.5e-5 (their Adam steps are 1e-3), their second moments
    # within 0.6% (the bias's own, which starts from that noise, within 20%).
    for name in ("head_w", "head_b"):
        assert_close(got[name], want[name], name, rtol=0, atol=1e-4)
    assert_close(got["head_v"][:-1], want["head_v"][:-1], "head_v of the weights", rtol=5e-2,
                 atol=1e-6 * float(want["head_v"].max()))
    got_log = _records(run / "stage1", "sid")
    want_log = _records(one_process["student"] / "stage1", "sid")
    for g, w in zip(got_log, want_log):
        for key in ("sid", "psi_dsm", "psi_bce", "g_bce", "omega"):
            assert g[key] == pytest.approx(w[key], rel=1e-4), key
    assert (run / "student" / "model.safetensors").is_file()


@needs_mpi
def test_two_ranks_generate_the_same_file(one_process):
    root = one_process["root"]
    base = ["generate", "--model", str(one_process["teacher"] / "teacher"), "--data", one_process["data"],
            "--split", "test", "--method", "ddim", "--steps", "3", "--limit", "10", "--batch-size", "4",
            "--candidates", "2"]
    one, two = root / "gen1.jsonl", root / "gen2.jsonl"
    r = subprocess.run(_dlmone(*base, "--out", str(one)), env=_env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    r = _mpirun(2, [*base, "--out", str(two)])  # 3 batches x 2 candidates, dealt to 2 ranks
    assert r.returncode == 0, r.stderr
    assert two.read_text() == one.read_text()


@needs_mpi
def test_bad_launches_stop_with_a_clear_error(one_process):
    t0 = time.perf_counter()
    r = _mpirun(2, ["train-teacher", "--data", one_process["data"], "--config", one_process["cfg"],
                    "--set", "batch_size=7", "--out", str(one_process["root"] / "odd")])
    assert r.returncode != 0
    assert "batch_size=7 is not divisible by the 2 MPI ranks" in r.stderr
    assert "failed: ValueError" in r.stderr
    r = _mpirun(2, ["info"])
    assert r.returncode != 0 and "info runs in one process" in r.stderr
    assert time.perf_counter() - t0 < 60


@needs_mpi
def test_an_exception_on_one_rank_stops_every_rank(one_process):
    """Rank 1 gets other flags than rank 0 (MPMD launch): it raises while rank 0 waits in a
    collective call; the job must end, naming rank 1, instead of hanging."""
    common = ["train-teacher", "--data", one_process["data"], "--config", one_process["cfg"],
              "--out", str(one_process["root"] / "mismatch")]
    t0 = time.perf_counter()
    r = _mpirun(1, [*common, "--steps", "4"], mpmd=[*common, "--steps", "5"])
    assert r.returncode != 0
    assert "rank 1 failed: ValueError: rank 1 was started with other settings than rank 0: " \
           "steps=5 (rank 0: 4)" in r.stderr, r.stderr
    assert time.perf_counter() - t0 < 60


@needs_mpi
def test_a_killed_rank_stops_the_job_and_the_last_checkpoint_resumes(one_process):
    from dlmone import checkpoint as ckpt
    from dlmone.cli import main

    run = one_process["root"] / "killed"
    steps = 300
    args = ["train-teacher", "--data", one_process["data"], "--config", one_process["cfg"], "--steps",
            str(steps), "--set", "save_every=5", "--set", "eval_every=1000", "--out", str(run)]
    proc = subprocess.Popen([MPIRUN, "--oversubscribe", "-n", "2", *_dlmone(*args)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (run / "checkpoints" / "latest").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.02)
        rank1 = _rank_pid(proc.pid, 1)
        os.kill(rank1, signal.SIGKILL)
        t_kill = time.perf_counter()
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the job hung after rank 1 was killed")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert time.perf_counter() - t_kill < 30
    assert proc.returncode != 0
    assert "rank 1" in err and "signal 9" in err, err
    last = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    step = ckpt.read_json(last / "run.json")["step"]
    assert 0 < step < steps, "the job ended before rank 1 was killed"
    ckpt.load_tensors(last / "state.safetensors")
    # one process resumes the 2-rank run from its last checkpoint and finishes it
    assert main(["--quiet", "--threads", "1", *args]) == 0
    assert ckpt.read_json(run / "checkpoints" / "step-00000300" / "run.json")["step"] == steps


def _rank_pid(mpirun_pid, rank, timeout=10.0):
    """The pid of MPI rank ``rank``: a child of mpirun whose environment names that rank."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in Path("/proc").iterdir():
            try:
                if not child.name.isdigit() or _ppid(child) != mpirun_pid:
                    continue
                env = (child / "environ").read_bytes().split(b"\0")
            except OSError:  # the process ended meanwhile
                continue
            if f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
                return int(child.name)
        time.sleep(0.05)
    raise AssertionError(f"no process of rank {rank} under mpirun (pid {mpirun_pid})")


def _ppid(proc_dir):
    return int(next(line for line in (proc_dir / "status").read_text().splitlines()
                    if line.startswith("PPid:")).split()[1])
