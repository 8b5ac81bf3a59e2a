"""Shared helpers for dlmone's benchmarks: interleaved timing with medians, result
rows and tables, atomic JSON output, machine/library information, control of
numpy's BLAS thread count (threadpoolctl), resident-memory readings (psutil), and
the dlmone/PyTorch model pairs (same weights) with their training-step callables.

Nothing here imports dlmone or torch at module level, so a benchmark can set
thread counts and environment before either is loaded. Importing this module puts
the repository root (the dlmone package being measured) and tests/ (reference.py,
the PyTorch reference) at the front of sys.path.
"""
from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import psutil
from threadpoolctl import ThreadpoolController

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (os.path.join(ROOT, "tests"), ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def log(msg: str) -> None:
    """A time-stamped progress line on stderr (stdout is kept for the result tables)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

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
    reference); ``ratio`` = a / b. ``target`` is the minimum ratio required (or, with
    ``higher_is_better=False``, e.g. memory, the maximum ratio allowed), if any."""

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
    higher_is_better: bool = True

    @property
    def ratio(self) -> Optional[float]:
        if self.a is None or self.b is None or self.b == 0:
            return None
        return self.a / self.b

    @property
    def status(self) -> str:
        if self.target is None or self.ratio is None:
            return ""
        ok = self.ratio >= self.target if self.higher_is_better else self.ratio <= self.target
        return "PASS" if ok else "SHORT"

    @property
    def goal(self) -> str:
        """The target as text: ">=1.5x" or "<=1.2x"; "" without one."""
        if self.target is None:
            return ""
        return f"{'>=' if self.higher_is_better else '<='}{self.target:g}x"

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        d["status"] = self.status or None
        d["goal"] = self.goal or None
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
                     r.goal, r.status])
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
    """Write ``obj`` as JSON to ``path`` with dlmone.checkpoint.atomic_write_json (a
    temporary file in the same folder, fsync, os.replace: readers never see a
    half-written file). The object is made strictly JSON-valid first (see jsonable)."""
    from dlmone.checkpoint import atomic_write_json  # imported late: see the module docstring

    atomic_write_json(path, jsonable(obj))


def jsonable(o: Any) -> Any:
    """``o`` with numpy scalars/arrays turned into Python values, tuples into lists,
    non-finite floats into None (strict JSON has no NaN/Infinity), dict keys into
    strings and anything else unknown into its str()."""
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, bool) or o is None or isinstance(o, (int, str)):
        return o
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    try:
        import numpy as np
        if isinstance(o, np.ndarray):
            return jsonable(o.tolist())
        if isinstance(o, np.generic):
            return jsonable(o.item())
    except ImportError:
        pass
    return str(o)


# ------------------------------------------------------------- numpy's BLAS


def _numpy_blas_controllers() -> List[Any]:
    """threadpoolctl's controllers of the BLAS libraries numpy loaded (those under
    site-packages with "numpy" in their path): dlmone's own scipy-openblas32 is left
    alone, single-threaded as dlmone configures it."""
    import numpy as np

    np_dir = os.path.dirname(os.path.dirname(os.path.abspath(np.__file__)))
    return [c for c in ThreadpoolController().select(user_api="blas").lib_controllers
            if c.filepath.startswith(np_dir) and "numpy" in c.filepath]


def numpy_blas_libraries() -> List[Dict[str, Any]]:
    """The BLAS libraries numpy loaded, with their runtime core and thread count."""
    return [{"path": c.filepath, "threads": c.num_threads, "core": getattr(c, "architecture", None),
             "version": c.version, "threading_layer": getattr(c, "threading_layer", None)}
            for c in _numpy_blas_controllers()]


def set_numpy_blas_threads(n: int) -> List[Dict[str, Any]]:
    """Set the thread count of numpy's BLAS (only numpy's, see _numpy_blas_controllers).
    Returns the libraries touched, with the count read back."""
    for c in _numpy_blas_controllers():
        c.set_num_threads(int(n))
    return numpy_blas_libraries()


def numpy_blas_info() -> Dict[str, Any]:
    """numpy's build-time BLAS (show_config) and runtime BLAS core/threads."""
    import numpy as np

    info: Dict[str, Any] = {"numpy": np.__version__}
    try:
        cfg = np.show_config(mode="dicts")  # numpy >= 1.26
        info["build_blas"] = cfg.get("Build Dependencies", {}).get("blas")
    except TypeError:
        info["build_blas"] = None
    info["runtime"] = numpy_blas_libraries()
    return info


# ----------------------------------------------------------------- machine info


def _cpuinfo(key: str) -> Optional[str]:
    """The first ``key`` line of /proc/cpuinfo (Linux): neither psutil nor platform
    reports the CPU's model name or its instruction-set flags."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == key:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> List[str]:
    """The vector/matrix extensions among the CPU's flags (AVX*, FMA, AMX*)."""
    flags = (_cpuinfo("flags") or "").split()
    return sorted(fl for fl in flags if fl.startswith(("avx", "fma", "amx")))


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


# ------------------------------------------------------------------ memory


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> Optional[int]:
    """High-water mark of the resident set of this process's address space (VmHWM of
    /proc/self/status, Linux; psutil does not report it).

    This is the figure getrusage's ru_maxrss reports for a process that was started
    by exec, minus one trap: the kernel folds the RSS peak of the address space that
    exec replaced (the parent's, when the child was made by vfork/posix_spawn as
    subprocess does) into ru_maxrss, so a child of a big parent starts with a big
    ru_maxrss. VmHWM belongs to the new address space only, and reset_peak_rss()
    can move it to the current RSS."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def ru_maxrss_bytes() -> int:
    import resource  # Unix only

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Set VmHWM to the current RSS (Linux >= 4.0, writing 5 to /proc/self/clear_refs;
    psutil cannot), so a measurement's peak excludes what came before it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------- the model on both sides


def model_pair(preset: str, seq_len: int, seed: int = 0, dropout: float = 0.0, **overrides: Any):
    """(config, dlmone model, torch reference) of a preset with the same weights (copied
    through the state dict). Dropout defaults to 0 so train-mode work is identical."""
    import dlmone
    from reference import TorchDiffuSeq, load_numpy_state

    cfg = dlmone.ModelConfig.preset(preset, seq_len=seq_len, dropout=dropout, **overrides)
    model = dlmone.DiffusionTransformer(cfg, seed=seed)
    ref = TorchDiffuSeq(cfg)
    load_numpy_state(ref, model.state_dict())
    for p in ref.parameters():
        p.requires_grad_(True)
    return cfg, model, ref


def torch_reference_from(model) -> Any:
    """A TorchDiffuSeq with a dlmone model's config and (a copy of) its weights."""
    from reference import TorchDiffuSeq, load_numpy_state

    ref = TorchDiffuSeq(model.config)
    load_numpy_state(ref, model.state_dict())
    return ref


def torch_adamw(ref: Any, kind: str = "default", lr: float = 1e-4):
    """torch.optim.AdamW over the reference's parameters, weight decay 0; ``kind``:
    "default" (torch's own choice: the per-tensor loop on CPU), "foreach" or "fused"."""
    import torch

    kw: Dict[str, Any] = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    if kind == "foreach":
        kw["foreach"] = True
    elif kind == "fused":
        kw["fused"] = True
    elif kind != "default":
        raise ValueError(f"torch AdamW kind must be default, foreach or fused, got {kind!r}")
    return torch.optim.AdamW(ref.parameters(), **kw)


@dataclass
class TrainStep:
    """One training step on each side: ``dlmone()`` = zero_grad + forward(train) +
    backward(gy) + AdamW; ``torch()`` = zero_grad + forward + (y*gy).sum().backward()
    + AdamW (None without a reference); both on the same batch x, t, gy."""

    dlmone: Callable[[], None]
    torch: Optional[Callable[[], None]]
    tokens: int
    info: Dict[str, Any]


def train_step(cfg, model, ref, batch: int, seed: int = 0, torch_adamw_kind: str = "default",
               lr: float = 1e-4) -> TrainStep:
    """The training-step callables of a model pair (see TrainStep) on a random batch;
    ``ref=None`` builds the dlmone side only. With a reference, the eval-mode outputs
    of both sides on that batch are compared first (info["forward_max_abs_diff"]), as
    a check that they hold the same weights and compute the same function."""
    import numpy as np

    import dlmone

    B, L, E, T = batch, cfg.seq_len, cfg.emb_dim, cfg.diffusion_steps
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((B, L, E)).astype(np.float32)
    t = rng.integers(0, T, size=B).astype(np.int64)
    gy = (rng.standard_normal((B, L, E)) * 1e-3).astype(np.float32)
    opt = dlmone.AdamW(model, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    info: Dict[str, Any] = {"batch": B, "seq_len": L, "tokens": B * L}

    def dl_step() -> None:
        model.zero_grad()
        model.forward(x, t, train=True)
        model.backward(gy)
        opt.step()

    if ref is None:
        return TrainStep(dl_step, None, B * L, info)

    import torch

    xt, tt, gyt = torch.from_numpy(x), torch.from_numpy(model.scale_timesteps(t, B)), torch.from_numpy(gy)
    ref.eval()
    with torch.no_grad():
        y_ref = ref(xt, tt).numpy()
    info["forward_max_abs_diff"] = float(np.max(np.abs(model.forward(x, t) - y_ref)))
    info["forward_max_abs_ref"] = float(np.max(np.abs(y_ref)))
    ref.train()
    topt = torch_adamw(ref, torch_adamw_kind, lr)

    def th_step() -> None:
        topt.zero_grad()
        loss = (ref(xt, tt) * gyt).sum()
        loss.backward()
        topt.step()

    info["torch_adamw"] = torch_adamw_kind
    info["torch_adamw_defaults"] = {k: v for k, v in topt.defaults.items()
                                    if isinstance(v, (bool, int, float, str, type(None)))}
    return TrainStep(dl_step, th_step, B * L, info)


def matmul_params(cfg) -> int:
    """Weights that multiply every token in the network's forward (biases and
    per-example time-embedding layers excluded): per layer Q, K, V, attention output
    (4H²) and the feed-forward pair (2HF); plus the E→H→H input and H→H→E output
    projections when E != H."""
    E, H, F, N = cfg.emb_dim, cfg.hidden_dim, cfg.ffn_dim, cfg.num_layers
    per_layer = 4 * H * H + 2 * H * F
    proj = 2 * E * H + 2 * H * H if E != H else 0
    return N * per_layer + proj


def train_step_flops(cfg, batch: int, seq_len: int) -> Dict[str, float]:
    """Model FLOPs of one training step (forward + backward) on batch x seq_len tokens:
    6 x matmul_params x tokens (2 per multiply-add forward, 4 backward: input and
    weight gradients) + attention 12 x N x B x L² x H (QKᵀ and PV: 4BL²H forward per
    layer, twice that backward). Element-wise work (LayerNorm, GELU, softmax) is not
    counted."""
    tokens = batch * seq_len
    dense = 6.0 * matmul_params(cfg) * tokens
    attention = 12.0 * cfg.num_layers * batch * seq_len * seq_len * cfg.hidden_dim
    return {"dense": dense, "attention": attention, "total": dense + attention}


# ----------------------------------------------------------- run_all's plumbing

# The batch each preset is benchmarked at (tokens per step = batch x seq_len); the same
# as bench_core.py's plans.
BENCH_BATCH: Dict[str, Dict[str, int]] = {
    "tiny": {"batch": 64, "seq_len": 32},
    "small": {"batch": 64, "seq_len": 32},
    "diffuseq_base": {"batch": 8, "seq_len": 128},
}


@dataclass
class Context:
    """What every section of run_all.py gets: the run's options and a cache shared
    between sections (e.g. the sgemm peak, measured once)."""

    quick: bool = False
    threads: int = 2
    seed: int = 0
    torch_adamw: str = "default"
    reps: Optional[int] = None  # overrides every plan's repetitions when set
    cache: Dict[str, Any] = field(default_factory=dict)
    info: Dict[str, Any] = field(default_factory=dict)  # per-section facts for the JSON

    def plan(self, full: Mapping[str, Any], quick: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """``full`` (or, with --quick, ``full`` updated by ``quick``), with --reps applied."""
        p = dict(full)
        if self.quick and quick:
            p.update(quick)
        if self.reps is not None:
            p["reps"] = self.reps
        return p

    def pick(self, by_mode: Mapping[str, Any]) -> Any:
        """``by_mode["quick"]`` with --quick, else ``by_mode["full"]``."""
        return by_mode["quick" if self.quick else "full"]

    def rows_for(self, by_mode: Mapping[str, Sequence[Any]],
                 bench: Callable[["Context", Any], List[Row]]) -> List[Row]:
        """The rows of ``bench(self, item)`` for every item of ``self.pick(by_mode)``,
        collecting garbage after each so that its models are freed before the next
        item is measured."""
        rows: List[Row] = []
        for item in self.pick(by_mode):
            rows.extend(bench(self, item))
            gc.collect()
        return rows
