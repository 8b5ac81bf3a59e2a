"""dlmone.checkpoint: atomic files and folders (a failure or a crash between the two
renames never leaves a torn or missing checkpoint), SHA256SUMS, safetensors reading that
turns corrupted files into ValueError, tensor checks, and clear errors from
SequenceModel.read_folder / dlmone.load / train_teacher on damaged folders: the
checksums name any changed file, and folders without them (older ones, or rewritten
consistently) still meet the structural checks."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import dlmone
from dlmone import checkpoint as ckpt
from dlmone.builtin_task import make_builtin_task
from dlmone.data import Seq2SeqData
from dlmone.generator import SequenceModel
from dlmone.teacher import Teacher, TeacherConfig, train_teacher

MODEL = {"emb_dim": 8, "hidden_dim": 16, "num_layers": 1, "num_heads": 2, "ffn_dim": 32, "time_dim": 8}
TINY_RUN = dict(preset="tiny", model=MODEL, seq_len=24, vocab_size=120, steps=6, batch_size=8,
                eval_every=3, save_every=3, eval_size=8, eval_samples=2, eval_sample_steps=2,
                log_every=2, diffusion_steps=50)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    data = Seq2SeqData.from_pairs(**make_builtin_task(n_train=200, n_valid=20, n_test=20))
    out = tmp_path_factory.mktemp("run")
    train_teacher(TeacherConfig(**TINY_RUN), data, out, progress=False, print_fn=lambda s: None)
    return out, data


@pytest.fixture
def teacher_copy(run_dir, tmp_path):
    """A fresh copy of the trained teacher folder to damage."""
    dst = tmp_path / "teacher"
    shutil.copytree(run_dir[0] / "teacher", dst)
    return dst


def _listing(path):
    return sorted(p.name for p in path.iterdir())


# ------------------------------------------------------------------ atomic files
def test_atomic_write_bytes(tmp_path):
    p = tmp_path / "sub" / "dir" / "f.bin"
    assert ckpt.atomic_write_bytes(p, b"hello") == p
    assert p.read_bytes() == b"hello"
    ckpt.atomic_write_bytes(str(p), b"x" * 10000)
    assert p.read_bytes() == b"x" * 10000
    ckpt.atomic_write_bytes(p, b"")
    assert p.read_bytes() == b""
    assert _listing(p.parent) == ["f.bin"]


def test_atomic_write_bytes_failure_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "f.txt"
    p.write_bytes(b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_write_bytes(p, b"new")
    monkeypatch.undo()
    assert p.read_bytes() == b"old"
    assert _listing(tmp_path) == ["f.txt"]  # no temp file left behind


def test_atomic_write_json_roundtrip(tmp_path):
    obj = {"b": [1, 2.5, None, True], "a": {"nested": "ü"}}
    p = ckpt.atomic_write_json(tmp_path / "x.json", obj)
    assert ckpt.read_json(p) == obj
    text = p.read_text()
    assert text.endswith("\n") and text.index('"a"') < text.index('"b"')  # sorted keys


def test_read_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        ckpt.read_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        ckpt.read_json(tmp_path / "bad.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ValueError, match="not valid JSON"):
        ckpt.read_json(tmp_path / "bin.json")


# ------------------------------------------------------------------ atomic folders
def _fill(files):
    def fill(tmp):
        for name, text in files.items():
            (tmp / name).write_text(text)
    return fill


def test_atomic_write_dir_creates_and_replaces(tmp_path):
    target = tmp_path / "deep" / "ckpt"
    assert ckpt.atomic_write_dir(target, _fill({"a.txt": "1", "b.txt": "2"})) == target
    assert _listing(target) == ["SHA256SUMS", "a.txt", "b.txt"] and (target / "a.txt").read_text() == "1"
    ckpt.verify_checksums(target)
    ckpt.atomic_write_dir(target, _fill({"c.txt": "3"}))
    assert _listing(target) == ["SHA256SUMS", "c.txt"]  # replaced, not merged
    assert _listing(target.parent) == ["ckpt"]  # no .old, no temp folder


def test_atomic_write_dir_failing_fill_keeps_previous(tmp_path):
    target = tmp_path / "ckpt"
    ckpt.atomic_write_dir(target, _fill({"a.txt": "good"}))

    def bad(tmp):
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("fill failed")

    with pytest.raises(RuntimeError, match="fill failed"):
        ckpt.atomic_write_dir(target, bad)
    assert (target / "a.txt").read_text() == "good"
    assert _listing(tmp_path) == ["ckpt"]

    # also when there was nothing before, and on KeyboardInterrupt
    def interrupted(tmp):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_write_dir(tmp_path / "new", interrupted)
    assert _listing(tmp_path) == ["ckpt"]


def test_crash_between_renames_is_recovered(tmp_path, monkeypatch, teacher_copy):
    """A crash after target -> target.old and before tmp -> target leaves only the
    .old folder; resolve_dir and dlmone.load find it; the next write cleans up."""
    target = tmp_path / "model"
    shutil.copytree(teacher_copy, target)
    params = Teacher.load(target).model.params.copy()
    real_rename = os.rename

    def crash_on_second(src, dst):
        if str(dst) == str(target):
            raise OSError("power cut")
        return real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", crash_on_second)
    with pytest.raises(OSError, match="power cut"):
        ckpt.atomic_write_dir(target, _fill({"junk": "x"}))
    monkeypatch.undo()
    assert not target.exists() and (tmp_path / "model.old").is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert ckpt.resolve_dir(target) == tmp_path / "model.old"
    assert np.array_equal(dlmone.load(target).model.params, params)
    assert np.array_equal(Teacher.load(target).model.params, params)
    # the next successful write replaces it and removes the .old twin
    ckpt.atomic_write_dir(target, _fill({"new": "y"}))
    assert _listing(tmp_path) == ["model", "teacher"]


def test_resolve_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        ckpt.resolve_dir(tmp_path / "x")
    (tmp_path / "x.old").mkdir()
    assert ckpt.resolve_dir(tmp_path / "x") == tmp_path / "x.old"
    (tmp_path / "x").mkdir()
    assert ckpt.resolve_dir(str(tmp_path / "x")) == tmp_path / "x"
    (tmp_path / "file").write_text("")
    with pytest.raises(FileNotFoundError):
        ckpt.resolve_dir(tmp_path / "file")


# ------------------------------------------------------------------ tensors
def test_save_load_tensors_roundtrip(tmp_path):
    big = np.arange(24, dtype=np.float32)
    t = {"a": big[4:16].reshape(3, 4), "b": np.ones((2, 2), np.float32).T, "i": np.arange(3, dtype=np.int64)}
    ckpt.save_tensors(tmp_path / "t.safetensors", t)
    back = ckpt.load_tensors(tmp_path / "t.safetensors")
    assert set(back) == set(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and np.array_equal(back[k], t[k])


@pytest.mark.parametrize("kind", ["truncated", "random", "empty", "header_only", "huge_header", "bad_offsets",
                                  "bad_json_header"])
def test_load_tensors_corrupted_raises_value_error(tmp_path, kind):
    good_path = tmp_path / "good.safetensors"
    ckpt.save_tensors(good_path, {"w": np.arange(100, dtype=np.float32)})
    good = good_path.read_bytes()
    rng = np.random.default_rng(0)
    if kind == "truncated":
        data = good[:-17]
    elif kind == "random":
        data = rng.integers(0, 256, 300, dtype=np.uint8).tobytes()
    elif kind == "empty":
        data = b""
    elif kind == "header_only":
        data = good[:8]
    elif kind == "huge_header":
        data = (2**62).to_bytes(8, "little") + b"{}"
    elif kind == "bad_offsets":
        hdr = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
        data = len(hdr).to_bytes(8, "little") + hdr + b"\0" * 8
    else:
        hdr = b"{not json"
        data = len(hdr).to_bytes(8, "little") + hdr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data)
    with pytest.raises(ValueError, match="bad.safetensors is not a valid safetensors file"):
        ckpt.load_tensors(bad)


def test_load_tensors_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing weights file"):
        ckpt.load_tensors(tmp_path / "nope.safetensors")


def test_check_tensors():
    expected = {"a": (2, 3), "b": (4,)}
    ok = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}
    ckpt.check_tensors(ok, expected, "where.st")
    with pytest.raises(ValueError, match=r"where\.st.*missing \['b'\]"):
        ckpt.check_tensors({"a": ok["a"]}, expected, "where.st")
    with pytest.raises(ValueError, match=r"where\.st.*unexpected \['c'\]"):
        ckpt.check_tensors(dict(ok, c=ok["b"]), expected, "where.st")
    with pytest.raises(ValueError, match=r"where\.st: a has dtype float64"):
        ckpt.check_tensors(dict(ok, a=ok["a"].astype(np.float64)), expected, "where.st")
    with pytest.raises(ValueError, match=r"where\.st: b has dtype float16"):
        ckpt.check_tensors(dict(ok, b=ok["b"].astype(np.float16)), expected, "where.st")
    with pytest.raises(ValueError, match=r"where\.st: a has shape \(3, 2\), expected \(2, 3\)"):
        ckpt.check_tensors(dict(ok, a=np.zeros((3, 2), np.float32)), expected, "where.st")
    with pytest.raises(ValueError, match=r"b has shape \(1, 4\)"):
        ckpt.check_tensors(dict(ok, b=np.zeros((1, 4), np.float32)), expected, "where.st")


# ------------------------------------------------------------------ damaged model folders
def _set_config(folder, mutate):
    """Rewrite config.json consistently (its checksum too): a well-formed but wrong folder."""
    meta = json.loads((folder / "config.json").read_text())
    meta = mutate(meta)
    (folder / "config.json").write_text(json.dumps(meta))
    ckpt.write_checksums(folder)


def test_read_folder_ok(teacher_copy):
    meta, model, tok = SequenceModel.read_folder(teacher_copy)
    assert meta["kind"] == "teacher" and tok.vocab_size == model.config.vocab_size


@pytest.mark.parametrize("damage, exc, match", [
    (lambda d: (d / "config.json").write_text("{broken"), ValueError, "config.json is not valid JSON"),
    (lambda d: (d / "config.json").write_bytes(b"\x00\xff" * 10), ValueError, "not valid JSON"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), ValueError, "not a dlmone model config"),
    (lambda d: _set_config(d, lambda m: {k: v for k, v in m.items() if k != "kind"}), ValueError,
     "not a dlmone model config"),
    (lambda d: _set_config(d, lambda m: dict(m, model=dict(m["model"], colour="red"))), ValueError,
     "unknown ModelConfig keys"),
    (lambda d: _set_config(d, lambda m: dict(m, model=dict(m["model"], num_heads=3))), ValueError,
     "divisible"),
    (lambda d: _set_config(d, lambda m: dict(m, model=dict(m["model"], ffn_dim=40))), ValueError,
     "intermediate.dense.weight has shape"),
    (lambda d: _set_config(d, lambda m: dict(m, model=dict(m["model"], num_layers=2))), ValueError,
     "missing"),
    (lambda d: (d / "config.json").unlink(), FileNotFoundError, "config.json"),
    (lambda d: (d / "model.safetensors").unlink(), FileNotFoundError, "model.safetensors"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
     ValueError, "not a valid safetensors file"),
    (lambda d: (d / "vocab.txt").unlink(), FileNotFoundError, "vocab.txt"),
    (lambda d: (d / "vocab.txt").write_text("\n".join((d / "vocab.txt").read_text().split("\n")[:-4]) + "\n"),
     ValueError, "vocab.txt has .* tokens but the model expects"),
    (lambda d: (d / "vocab.txt").write_text("[PAD]\n[UNK]\n"), ValueError, "special tokens"),
])
def test_read_folder_damaged(teacher_copy, damage, exc, match):
    # a folder without SHA256SUMS (written before dlmone kept checksums): structural checks
    legacy = teacher_copy.parent / "legacy"
    shutil.copytree(teacher_copy, legacy)
    (legacy / "SHA256SUMS").unlink()
    damage(legacy)
    with pytest.raises(exc, match=match):
        SequenceModel.read_folder(legacy)
    with pytest.raises(exc, match=match):
        Teacher.load(legacy)
    # with its checksums the damaged file is named (unless the damage rewrote them too)
    damage(teacher_copy)
    with pytest.raises(exc, match=f"corrupted|missing|{match}") as info:
        Teacher.load(teacher_copy)
    assert str(teacher_copy) in str(info.value)


def test_read_folder_wrong_tensor_shape_and_dtype(teacher_copy):
    path = teacher_copy / "model.safetensors"
    good = ckpt.load_tensors(path)
    bad = dict(good)
    bad["LayerNorm.weight"] = np.zeros(5, np.float32)
    ckpt.save_tensors(path, bad)
    with pytest.raises(ValueError, match="model.safetensors is corrupted"):
        dlmone.load(teacher_copy)
    ckpt.write_checksums(teacher_copy)  # a consistent but wrong folder: the tensor checks catch it
    with pytest.raises(ValueError, match=r"LayerNorm.weight has shape \(5,\)"):
        dlmone.load(teacher_copy)
    bad = dict(good)
    bad["position_embeddings.weight"] = good["position_embeddings.weight"].astype(np.float16)
    ckpt.save_tensors(path, bad)
    ckpt.write_checksums(teacher_copy)
    with pytest.raises(ValueError, match="position_embeddings.weight has dtype float16"):
        dlmone.load(teacher_copy)
    bad = dict(good)
    del bad["time_embed.0.bias"]
    ckpt.save_tensors(path, bad)
    ckpt.write_checksums(teacher_copy)
    with pytest.raises(ValueError, match="time_embed.0.bias"):
        dlmone.load(teacher_copy)


def test_load_dispatches_on_kind(teacher_copy):
    _set_config(teacher_copy, lambda m: dict(m, kind="student"))
    with pytest.raises(ValueError, match="not a teacher"):
        Teacher.load(teacher_copy)
    _set_config(teacher_copy, lambda m: dict(m, kind="banana"))
    with pytest.raises(ValueError, match="neither a teacher nor a student"):
        dlmone.load(teacher_copy)
    with pytest.raises(FileNotFoundError):
        dlmone.load(teacher_copy.parent / "does-not-exist")


def test_load_config_not_an_object(teacher_copy):
    (teacher_copy / "config.json").write_text("[1, 2]")
    ckpt.write_checksums(teacher_copy)
    with pytest.raises(ValueError):
        dlmone.load(teacher_copy)


def test_read_folder_model_entry_not_an_object(teacher_copy):
    _set_config(teacher_copy, lambda m: dict(m, model=None))
    with pytest.raises(ValueError):
        SequenceModel.read_folder(teacher_copy)


# ------------------------------------------------------------------ damaged training checkpoints
def test_resume_from_corrupted_checkpoint_raises(run_dir, tmp_path):
    src, data = run_dir
    out = tmp_path / "run"
    shutil.copytree(src, out)
    folder = out / "checkpoints" / "step-00000006"
    state = folder / "state.safetensors"
    state.write_bytes(state.read_bytes()[: len(state.read_bytes()) // 2])
    with pytest.raises(ValueError, match="state.safetensors is corrupted"):
        train_teacher(TeacherConfig(**TINY_RUN), data, out, progress=False, print_fn=lambda s: None)
    ckpt.write_checksums(folder)  # without the checksums' help, the structural checks
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        train_teacher(TeacherConfig(**TINY_RUN), data, out, progress=False, print_fn=lambda s: None)
    # a state whose parameter vector has the wrong length
    tensors = ckpt.load_tensors(src / "checkpoints" / "step-00000006" / "state.safetensors")
    tensors["adam_m"] = tensors["adam_m"][:-1]
    ckpt.save_tensors(state, tensors)
    ckpt.write_checksums(folder)
    with pytest.raises(ValueError, match="adam_m has shape"):
        train_teacher(TeacherConfig(**TINY_RUN), data, out, progress=False, print_fn=lambda s: None)
    # a broken run.json
    (folder / "run.json").write_text("{")
    ckpt.write_checksums(folder)
    with pytest.raises(ValueError, match="run.json is not valid JSON"):
        train_teacher(TeacherConfig(**TINY_RUN), data, out, progress=False, print_fn=lambda s: None)


def test_saved_checkpoint_folder_layout(run_dir):
    out, _ = run_dir
    ck = out / "checkpoints" / "step-00000006"
    assert _listing(ck) == ["SHA256SUMS", "run.json", "state.safetensors", "vocab.txt"]
    run = ckpt.read_json(ck / "run.json")
    assert set(run) == {"config", "step", "opt_step", "rng", "guard"} and run["opt_step"] == 6
    for p in ck.iterdir():  # every file fsynced and fully written: loadable
        assert p.stat().st_size > 0


def test_written_files_and_folders_follow_the_umask(tmp_path):
    """Results are for others to read too: not mkstemp's 0600 / mkdtemp's 0700."""
    import os

    from dlmone.checkpoint import atomic_write_bytes, atomic_write_dir

    old = os.umask(0o022)
    try:
        f = atomic_write_bytes(tmp_path / "a.json", b"{}")
        d = atomic_write_dir(tmp_path / "folder", lambda tmp: (tmp / "x.txt").write_text("x"))
    finally:
        os.umask(old)
    assert f.stat().st_mode & 0o777 == 0o644
    assert d.stat().st_mode & 0o777 == 0o755
