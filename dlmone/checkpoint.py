"""Crash-safe checkpoint folders: JSON + safetensors, never pickle.

A model folder holds ``config.json`` (what it is and its sizes), ``model.safetensors``
(float32 tensors named by DiffuSeq's keys), ``vocab.txt``, and optionally training
state. Folders are written beside the target, fsynced, and swapped in with renames,
so a crash leaves either the old or the new folder, never a torn one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Union

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

PathLike = Union[str, "os.PathLike[str]"]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to a temp file in the same folder, fsync it, rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_json(path: PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_dir(target: PathLike, fill: Callable[[Path], None]) -> Path:
    """Create folder ``target`` atomically: ``fill(tmp)`` writes into a fresh temp folder,
    which then replaces ``target`` (the old one is kept as ``target.old`` until the
    swap is done; :func:`resolve_dir` recovers it after a crash in between)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old = target.with_name(target.name + ".old")
    try:
        fill(tmp)
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        if old.exists():
            if target.exists():
                shutil.rmtree(old)  # a finished swap's leftover
            else:
                os.rename(old, target)  # a crash between the renames: restore first
        if target.exists():
            os.rename(target, old)
        os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target


def resolve_dir(path: PathLike) -> Path:
    """``path``, or its ``.old`` twin if a crash happened between the two renames."""
    path = Path(path)
    if path.is_dir():
        return path
    old = path.with_name(path.name + ".old")
    if old.is_dir():
        return old
    raise FileNotFoundError(f"no checkpoint folder at {path}")


def save_tensors(path: PathLike, tensors: Mapping[str, np.ndarray]) -> None:
    """safetensors file of C-contiguous copies (views into flat buffers are fine)."""
    data = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    with open(path, "wb") as f:
        f.write(st_save(data))


def load_tensors(path: PathLike) -> Dict[str, np.ndarray]:
    """Read a safetensors file; a truncated or corrupted file raises ValueError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"missing weights file {path}") from None
    try:
        return dict(st_load(raw))
    except (SafetensorError, ValueError, OverflowError, MemoryError) as e:
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from None


def check_tensors(tensors: Mapping[str, np.ndarray], expected: Mapping[str, tuple], where: str) -> None:
    """Every expected name present with dtype float32 and its shape; nothing else."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{where}: tensors do not match the config: missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        arr = tensors[name]
        if arr.dtype != np.float32:
            raise ValueError(f"{where}: {name} has dtype {arr.dtype}, expected float32")
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"{where}: {name} has shape {tuple(arr.shape)}, expected {tuple(shape)}")


def read_json(path: PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"missing {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def save_run_checkpoint(run_dir: PathLike, step: int, fill: Callable[[Path], None], keep: int = 1) -> Path:
    """Write ``run_dir/checkpoints/step-N`` atomically, point ``checkpoints/latest`` at it
    (an atomic rename too), then delete all but the ``keep`` newest checkpoints."""
    folder = Path(run_dir) / "checkpoints"
    name = f"step-{step:08d}"
    path = atomic_write_dir(folder / name, fill)
    atomic_write_bytes(folder / "latest", (name + "\n").encode())
    older = sorted(p for p in folder.glob("step-*") if p.is_dir() and p.name != name)
    for p in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return path
