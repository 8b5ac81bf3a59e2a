"""Shared helpers for dlmone's benchmarks: interleaved timing with medians, result
rows and tables, atomic JSON output, machine/library information, and control of
numpy's BLAS thread count (without threadpoolctl).

Nothing here imports dlmone or torch at module level, so a benchmark can set
thread counts and environment before either is loaded.
"""
from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Per-call seconds of one side of a comparison (``number`` calls per sample)."""

    samples: List[float]
    number: int

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        return min(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median over the samples: a rough noise indicator."""
        med = self.median
        return (max(self.samples) - min(self.samples)) / med if med > 0 else float("nan")

    def to_dict(self) -> Dict[str, Any]:
        return {"median_s": self.median, "min_s": self.best, "spread": self.spread,
                "number": self.number, "samples_s": list(self.samples)}


def _time_block(fn: Callable[[], Any], number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def interleaved(fns: Mapping[str, Callable[[], Any]], reps: int, warmup: int = 1,
                min_block_s: float = 0.1, max_number: int = 1000,
                settle_s: float = 0.0) -> Dict[str, Timing]:
    """Time several callables against each other, alternating between them.

    Each callable is first run ``warmup`` times (at least once); the warm-up also
    sizes ``number``, the calls per sample, so that one sample lasts about
    ``min_block_s``. Then ``reps`` rounds follow; every round times one sample of
    each callable, in an order that is reversed every other round (A B, B A, ...), so
    slow drifts of the machine hit every side alike. The garbage collector is off
    while timing. ``settle_s`` sleeps (untimed) before every sample: use it when the
    sides own different thread pools that spin after work (OpenBLAS's workers spin
    for ~0.1 s after a call and would steal cores from the next side). Returns
    per-call seconds for each name; use ``.median``.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    names = list(fns)
    number: Dict[str, int] = {}
    gc_was_enabled = gc.isenabled()
    try:
        for name in names:
            t = float("inf")
            for _ in range(max(1, warmup)):
                t = min(t, _time_block(fns[name], 1))
            number[name] = int(max(1, min(max_number, math.ceil(min_block_s / max(t, 1e-9)))))
        samples: Dict[str, List[float]] = {n: [] for n in names}
        gc.collect()
        gc.disable()
        for r in range(reps):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                if settle_s > 0:
                    time.sleep(settle_s)
                samples[name].append(_time_block(fns[name], number[name]))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {n: Timing(samples[n], number[n]) for n in names}


# ----------------------------------------------------------------------- results


@dataclass
class Row:
    """One line of a comparison table: ``a`` (usually dlmone) against ``b`` (the
    reference), higher is better for both; ``ratio`` = a / b. ``target`` is the
    minimum ratio required, if any."""

    section: str
    name: str
    unit: str
    a: Optional[float]
    b: Optional[float] = None
    target: Optional[float] = None
    note: str = ""
    details: Dict[str, Any] = field(default_factory=dict)
    a_label: str = "dlmone"
    b_label: str = "torch"

    @property
    def ratio(self) -> Optional[float]:
        if self.a is None or self.b is None or self.b == 0:
            return None
        return self.a / self.b

    @property
    def status(self) -> str:
        if self.target is None or self.ratio is None:
            return ""
        return "PASS" if self.ratio >= self.target else "SHORT"

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        d["status"] = self.status or None
        return d


def fmt_num(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    av = abs(v)
    if av >= 1e6:
        return f"{v / 1e6:.2f}M"
    if av >= 1e4:
        return f"{v / 1e3:.1f}k"
    if av >= 100:
        return f"{v:.0f}"
    if av >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def format_table(rows: Sequence[Row], a_label: str = "dlmone", b_label: str = "torch",
                 title: str = "", notes: bool = True) -> str:
    """Fixed-width table: name | unit | a | b | a/b | target | status."""
    header = ["name", "unit", a_label, b_label, f"{a_label}/{b_label}", "target", "status"]
    body = []
    for r in rows:
        body.append([r.name, r.unit, fmt_num(r.a), fmt_num(r.b),
                     "-" if r.ratio is None else f"{r.ratio:.2f}x",
                     "" if r.target is None else f">={r.target:g}x", r.status])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)] if body else [len(h) for h in header]
    def line(cells: Sequence[str]) -> str:
        out = [str(cells[0]).ljust(widths[0]), str(cells[1]).ljust(widths[1])]
        out += [str(c).rjust(w) for c, w in zip(cells[2:], widths[2:])]
        return "  ".join(out).rstrip()
    lines = []
    if title:
        lines.append(title)
    lines.append(line(header))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(line(b) for b in body)
    foot = [f"  * {r.name}: {r.note}" for r in rows if r.note] if notes else []
    return "\n".join(lines + foot)


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file in the same folder and os.replace,
    so readers never see a half-written file."""
    from dlmone.checkpoint import atomic_write_bytes  # imported late: see the module docstring

    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def _json_default(o: Any) -> Any:
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


# ------------------------------------------------------------- numpy's BLAS


def _loaded_libraries() -> List[str]:
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if ".so" in line and "/" in line}
    except OSError:
        return []
    return sorted(paths)


def _openblas_symbols(lib: ctypes.CDLL) -> Dict[str, Any]:
    """The (prefix, suffix)-mangled OpenBLAS entry points of a loaded library."""
    for prefix in ("scipy_openblas", "openblas"):
        for suffix in ("64_", "", "_64"):
            get_n = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            set_n = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get_n is not None and set_n is not None:
                cfg = getattr(lib, f"{prefix}_get_config{suffix}", None)
                core = getattr(lib, f"{prefix}_get_corename{suffix}", None)
                return {"get": get_n, "set": set_n, "config": cfg, "core": core}
    return {}


def numpy_blas_libraries() -> List[Dict[str, Any]]:
    """OpenBLAS libraries loaded by numpy (found in /proc/self/maps; numpy must be
    imported and a BLAS call made), with their runtime core and thread count."""
    import numpy as np

    np.ones((2, 2), np.float32) @ np.ones((2, 2), np.float32)  # make sure BLAS is loaded
    np_dir = os.path.dirname(os.path.dirname(os.path.abspath(np.__file__)))
    out = []
    for path in _loaded_libraries():
        base = os.path.basename(path).lower()
        if "blas" not in base or not path.startswith(np_dir) or "numpy" not in path:
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        sym = _openblas_symbols(lib)
        if not sym:
            out.append({"path": path})
            continue
        info: Dict[str, Any] = {"path": path, "threads": int(sym["get"]())}
        for key in ("config", "core"):
            if sym[key] is not None:
                sym[key].restype = ctypes.c_char_p
                val = sym[key]()
                info[key] = val.decode(errors="replace") if val else None
        info["_set"] = sym["set"]
        out.append(info)
    return out


def set_numpy_blas_threads(n: int) -> List[Dict[str, Any]]:
    """Set the thread count of numpy's OpenBLAS (only numpy's: dlmone's own
    scipy-openblas32 stays single-threaded as dlmone configures it). Returns the
    libraries touched, with the count read back."""
    libs = numpy_blas_libraries()
    for lib in libs:
        setter = lib.pop("_set", None)
        if setter is not None:
            setter.argtypes = [ctypes.c_int]
            setter(int(n))
    return [{k: v for k, v in lib.items() if not k.startswith("_")} for lib in numpy_blas_libraries()]


def numpy_blas_info() -> Dict[str, Any]:
    """numpy's build-time BLAS (show_config) and runtime OpenBLAS core/threads."""
    import numpy as np

    info: Dict[str, Any] = {"numpy": np.__version__}
    try:
        cfg = np.show_config(mode="dicts")  # numpy >= 1.26
        info["build_blas"] = cfg.get("Build Dependencies", {}).get("blas")
    except TypeError:
        info["build_blas"] = None
    info["runtime"] = [{k: v for k, v in lib.items() if not k.startswith("_")}
                       for lib in numpy_blas_libraries()]
    return info


# ----------------------------------------------------------------- machine info


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> List[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(fl for fl in flags if fl.startswith(("avx", "fma", "amx")))
    except OSError:
        pass
    return []


def machine_info() -> Dict[str, Any]:
    """CPU, OS, Python, environment knobs and current load (for noisy-machine flags)."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    env = {k: v for k, v in sorted(os.environ.items())
           if k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_"))}
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {"cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "logical_cpus": os.cpu_count(),
            "usable_cpus": affinity, "platform": platform.platform(),
            "python": sys.version.split()[0], "loadavg_at_start": load, "env": env,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def torch_info() -> Dict[str, Any]:
    import torch

    return {"version": torch.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "mkl": bool(torch.backends.mkl.is_available()),
            "mkldnn": bool(torch.backends.mkldnn.is_available()),
            "parallel_info": torch.__config__.parallel_info()}


def dlmone_info() -> Dict[str, Any]:
    import dlmone

    return {"version": dlmone.__version__, "threads": dlmone.get_num_threads(),
            "build_info": dlmone.build_info()}
