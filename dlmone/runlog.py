"""A run's log: ``log.jsonl`` written by rank 0 of a training or distillation run, and
the stand-ins (:class:`NullLog`, :func:`discard`) the other MPI ranks write to.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt


class JsonlLog:
    """Append one JSON object per line, flushed every write. Records of steps after
    ``keep_through`` (those a resumed run will write again) are dropped first."""

    def __init__(self, path: Path, keep_through: int = -1) -> None:
        self.path = path
        self.kept: list = []  # the records kept from an earlier run, oldest first
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            # only newline-terminated lines are records: a crash can cut the last one short
            lines = path.read_bytes().split(b"\n")[:-1]
            kept = [line.decode() for line in lines
                    if line.strip() and json.loads(line).get("step", 0) <= keep_through]
            ckpt.atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())
            self.kept = [json.loads(line) for line in kept]
        self._f = open(path, "a", buffering=1)

    def write(self, **record: Any) -> None:
        self._f.write(json.dumps(record, sort_keys=True) + "\n")

    def last(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` in the last kept record that has it."""
        return next((r[key] for r in reversed(self.kept) if key in r), default)

    def close(self) -> None:
        self._f.close()


class NullLog:
    """The log of the MPI ranks other than 0: rank 0 alone writes the run's log."""

    def write(self, **record: Any) -> None:
        pass

    def last(self, key: str, default: Any = None) -> Any:
        return default

    def close(self) -> None:
        pass


def discard(message: str) -> None:
    """The ``print_fn`` of the MPI ranks other than 0."""
