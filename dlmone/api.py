"""``dlmone.load``: open a teacher or student folder by what it holds."""
from __future__ import annotations

from pathlib import Path
from typing import Union

from .checkpoint import read_json, resolve_dir, verify_checksums


def load(path: Union[str, Path]):
    """Return a :class:`Teacher` or :class:`Student` from a folder written by ``save``."""
    folder = resolve_dir(path)
    verify_checksums(folder)  # before config.json says what the folder holds
    meta = read_json(folder / "config.json")
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind == "teacher":
        from .teacher import Teacher
        return Teacher.load(folder)
    if kind == "student":
        from .distill import Student
        return Student.load(folder)
    raise ValueError(f"{folder} holds neither a teacher nor a student (kind={kind!r})")
