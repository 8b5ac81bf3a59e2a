"""Run configs: their base class (of TeacherConfig and DistillConfig), reading them
from JSON/TOML files and ``--set key=value`` overrides."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Type, TypeVar

C = TypeVar("C", bound="RunConfig")


class RunConfig:
    """The base of a run's config dataclass: its dict form, the fields a resumed run
    must share with the saved one, and loading from a dict with known keys only."""

    def check_positive_ints(self, names: Iterable[str]) -> None:
        for name in names:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    # fields that never change what a run computes: a resumed run may set them anew
    NOT_RUN_FIELDS = ("max_memory", "adaptive_threads")

    def run_fields(self) -> Dict[str, Any]:
        """What a resumed run must share with the saved one: every field but NOT_RUN_FIELDS."""
        return {k: v for k, v in self.to_dict().items() if k not in self.NOT_RUN_FIELDS}

    @classmethod
    def from_dict(cls: Type[C], d: Mapping[str, Any]) -> C:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {unknown}")
        try:
            return cls(**dict(d))
        except TypeError as e:  # a value of the wrong type (a comparison failed), or a nested config's unknown keys
            raise ValueError(f"invalid {cls.__name__}: {e}") from None


def read_config_file(path: str) -> Dict[str, Any]:
    """A JSON (``.json``) or TOML (``.toml``) file holding one table."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = p.read_text()
    if p.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python < 3.11
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a table/object, got {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """JSON if it parses (numbers, true/false, null, lists), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config: Dict[str, Any], overrides: Iterable[str], prefix: str = "") -> Dict[str, Any]:
    """Apply ``a.b=value`` strings to a nested dict (a copy). With ``prefix`` (e.g.
    ``distill.``) keys may be given with or without it."""
    out = json.loads(json.dumps(config))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        if prefix and key.startswith(prefix):
            key = key[len(prefix):]
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = parse_value(value)
    return out
