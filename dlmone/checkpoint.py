"""Crash-safe checkpoint folders: JSON + safetensors, never pickle.

A model folder holds ``config.json`` (what it is and its sizes), ``model.safetensors``
(float32 tensors named by DiffuSeq's keys), ``vocab.txt``, and optionally training
state. Folders are written beside the target, fsynced, and swapped in with renames,
so a crash leaves either the old or the new folder, never a torn one. Every folder
also holds ``SHA256SUMS`` (``sha256sum -c`` format) over its files; loading checks it,
so a corrupted byte anywhere raises ValueError instead of loading different weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Union

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load

from . import _core

PathLike = Union[str, "os.PathLike[str]"]
CHECKSUMS = "SHA256SUMS"
# numpy dtype -> safetensors dtype name (little-endian data)
_ST_DTYPES = {np.dtype(t): name for t, name in (
    (np.float64, "F64"), (np.float32, "F32"), (np.float16, "F16"), (np.int64, "I64"),
    (np.int32, "I32"), (np.int16, "I16"), (np.int8, "I8"), (np.uint64, "U64"), (np.uint32, "U32"),
    (np.uint16, "U16"), (np.uint8, "U8"), (np.bool_, "BOOL"))}


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


def _umask() -> int:
    """The process umask, read without changing it (Linux), else by setting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to a temp file in the same folder, fsync it, rename it over ``path``.
    An OSError while writing (a full disk) is raised with ``path`` named, after removing
    the temp file; ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from others
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}; "
                                   f"the file there (if any) is unchanged") from e
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
    :func:`write_checksums` adds ``SHA256SUMS``, and the folder then replaces ``target``
    (the old one is kept as ``target.old`` until the swap is done; :func:`resolve_dir`
    recovers it after a crash in between). An OSError while writing (a full disk) is
    raised with the target named, after removing the temp folder; ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the folder from others
    old = target.with_name(target.name + ".old")
    try:
        try:
            fill(tmp)
            write_checksums(tmp)
            for child in tmp.iterdir():
                if child.is_file():
                    with open(child, "rb") as f:
                        os.fsync(f.fileno())
            _fsync_dir(tmp)
        except OSError as e:
            raise OSError(e.errno, f"cannot write {target}: {e.strerror or e}; "
                                   f"the folder there (if any) is unchanged") from e
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(folder: PathLike) -> Path:
    """Write ``folder/SHA256SUMS`` over every other file in ``folder`` (``sha256sum -c``
    reads it)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != CHECKSUMS)
    path = folder / CHECKSUMS
    path.write_text("".join(f"{_sha256(p)}  {p.name}\n" for p in files))
    return path


def verify_checksums(folder: PathLike) -> None:
    """Check every file named in ``folder/SHA256SUMS``: a changed file raises ValueError,
    a missing one FileNotFoundError. A folder without SHA256SUMS (written before dlmone
    kept checksums) passes; its files are still checked structurally when loaded."""
    folder = Path(folder)
    path = folder / CHECKSUMS
    if not path.is_file():
        return
    try:
        lines = path.read_bytes().decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is corrupted: not a SHA256SUMS file") from None
    for n, line in enumerate(lines, 1):
        m = re.fullmatch(r"([0-9a-f]{64})  ([^/\\]+)", line)
        if not m or m.group(2) in (".", ".."):
            raise ValueError(f"{path}:{n} is corrupted: not a '<sha256>  <file name>' line")
        digest, name = m.groups()
        file = folder / name
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing (listed in {path})")
        if _sha256(file) != digest:
            raise ValueError(f"{file} is corrupted: its SHA-256 differs from the one in {path}")


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
    """Write a safetensors file straight from the arrays (views into flat buffers are
    fine): no serialised copy is built in memory, and a write error (a full disk)
    raises OSError."""
    arrays = {}
    for name, v in tensors.items():
        v = np.asarray(v)
        arrays[name] = np.asarray(v, dtype=v.dtype.newbyteorder("<"), order="C")
    header: Dict[str, Any] = {}
    offset = 0
    for name in sorted(arrays):
        a = arrays[name]
        if a.dtype not in _ST_DTYPES:
            raise TypeError(f"cannot save {name}: dtype {a.dtype} has no safetensors equivalent")
        header[name] = {"dtype": _ST_DTYPES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name in sorted(arrays):
            f.write(arrays[name].reshape(-1).view(np.uint8))


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
    """Every expected name present with dtype float32, its shape and finite values;
    nothing else."""
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
        bad = _core.count_nonfinite(np.ascontiguousarray(arr).reshape(-1))
        if bad:
            raise ValueError(f"{where}: {name} holds {bad} non-finite values")


def read_json(path: PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"missing {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_run_json(folder: PathLike, required: Mapping[str, type]) -> Dict[str, Any]:
    """``folder/run.json`` of a run checkpoint: an object whose ``required`` keys hold
    values of their types (ValueError naming the file otherwise)."""
    path = Path(folder) / "run.json"
    run = read_json(path)
    if not isinstance(run, dict):
        raise ValueError(f"{path} is not a run checkpoint: expected an object, got {type(run).__name__}")
    for key, kind in required.items():
        value = run.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{path}: {key!r} must be {kind.__name__}, got {value!r}")
    return run


def restore_rng(rng: np.random.Generator, state: Any, where: str) -> None:
    """Set ``rng`` to a saved ``bit_generator.state``; a malformed one raises ValueError."""
    try:
        rng.bit_generator.state = state
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"{where}: invalid random generator state ({e!r})") from None


def save_run_checkpoint(run_dir: PathLike, step: int, fill: Callable[[Path], None], keep: int = 1) -> Path:
    """Write ``run_dir/checkpoints/step-N`` atomically, point ``checkpoints/latest`` at it
    (an atomic rename too), then delete all but the ``keep`` newest checkpoints and the
    temp files of writes a crash cut short (the run is this folder's only writer)."""
    folder = Path(run_dir) / "checkpoints"
    name = f"step-{step:08d}"
    path = atomic_write_dir(folder / name, fill)
    atomic_write_bytes(folder / "latest", (name + "\n").encode())
    older = sorted(p for p in folder.glob("step-*") if p.is_dir() and p.name != name)
    for p in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    for p in folder.glob(".*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return path


def latest_checkpoint(out_dir: PathLike) -> Optional[Path]:
    """The checkpoint ``checkpoints/latest`` names; if that folder is gone (or the pointer
    is unreadable), the newest ``step-N`` folder left; None for a fresh run. Its files
    are checked against their checksums (a corrupted one raises ValueError)."""
    folder = Path(out_dir) / "checkpoints"
    pointer = folder / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_bytes().decode("utf-8", "replace").strip()
    path = folder / name
    if not (re.fullmatch(r"step-\d+", name) and path.is_dir()):
        left = sorted(p for p in folder.glob("step-*") if p.is_dir() and re.fullmatch(r"step-\d+", p.name))
        if not left:
            raise ValueError(f"{pointer} names {name!r}, which is not a checkpoint folder, and no "
                             f"other checkpoint is left; use another out_dir or resume=False")
        path = left[-1]
    verify_checksums(path)
    return path
