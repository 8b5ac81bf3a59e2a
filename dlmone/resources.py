"""Memory planning: what a run will hold, checked before it allocates.

:func:`estimate_memory` adds up, per component, the bytes a teacher run or a
distillation keeps resident at its peak: the flat parameter, gradient and optimizer
buffers of every network, the activation workspace of the C model (computed by the C
core's own workspace layout, see :func:`workspace_bytes`) and the largest
temporary arrays of one step. :func:`check_memory` compares the total with
``max_memory`` or, without one, with the MemAvailable of /proc/meminfo, and refuses a
run that would not fit before it allocates anything large.

Gradient buffers of networks that never train (the evaluation copy, the frozen
teacher of a distillation) are allocated zeroed and never written, so they take no
resident memory and are not counted. Saving a checkpoint streams the buffers to disk
(:func:`dlmone.checkpoint.save_tensors`) and adds nothing.
"""
from __future__ import annotations

import math
import re
from typing import Dict, Mapping, Optional, Union

from . import _core
from .model import ModelConfig

FLOAT = 4  # bytes of a float32
SizeLike = Union[int, str]

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class MemoryLimitError(MemoryError, ValueError):
    """A run's memory estimate exceeds the limit. Both a MemoryError and a ValueError
    (a setting to change: the command line reports it like other configuration errors)."""


def parse_bytes(value: SizeLike, name: str = "max_memory") -> int:
    """A positive byte count from an int or a string such as ``"4GiB"``, ``"512 MB"``,
    ``"1.5G"``: KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB and the bare K/M/G/T
    powers of 1024 (case-insensitive)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{name} must be a number of bytes or a size like '4GiB', got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", value)
        unit = m.group(2).lower() if m else None
        if unit not in _UNITS:
            raise ValueError(f"{name} must be a number of bytes or a size like '4GiB', got {value!r}")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return n


def format_bytes(n: int) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _dims(config: ModelConfig) -> Dict[str, int]:
    """The sizes the C core's layout functions take."""
    return dict(vocab_size=config.vocab_size, emb_dim=config.emb_dim, hidden_dim=config.hidden_dim,
                num_layers=config.num_layers, num_heads=config.num_heads, ffn_dim=config.ffn_dim,
                time_dim=config.time_dim, max_positions=config.max_positions,
                self_conditioning=config.self_conditioning, mask_embedding=config.mask_embedding)


def workspace_bytes(config: ModelConfig, batch: int, length: Optional[int] = None,
                    backward: bool = True, threads: Optional[int] = None) -> int:
    """The activation workspace the C model allocates for a forward of [batch, length]
    (``length`` defaults to ``config.seq_len``) with ``threads`` OpenMP threads (default:
    the current setting); ``backward=False``: only its forward part, which is all that a
    model that never runs backward writes. Computed by the C core's own layout
    (``model_workspace_floats`` in csrc/core/model.c), without allocating."""
    L = config.seq_len if length is None else length
    return _core.workspace_bytes(**_dims(config), batch=batch, length=L, threads=threads or 0,
                                 backward=backward)


def estimate_memory(config: ModelConfig, batch_size: int, kind: str = "teacher",
                    eval_batch: Optional[int] = None, adversarial: bool = True,
                    g_ema: bool = False) -> Dict[str, int]:
    """Peak resident bytes of a run, by component, and their ``total``.

    ``kind="teacher"``: :func:`dlmone.teacher.train_teacher` with ``batch_size``: the
    trained network with its gradients, AdamW's two moments, the EMA weights, the
    evaluation copy (forward passes of ``eval_batch`` rows, default ``batch_size``) and
    the returned teacher; the step's temporaries include the [B·L, V] rounding logits.
    ``kind="distill"``: :func:`dlmone.distill.distill`: the frozen teacher φ, the
    generator G and ψ with gradients and Adam moments, ψ running on 2B rows when
    ``adversarial``, G generating ``eval_batch`` rows at validation, and the previous
    stage's student during stage 2. With ``g_ema`` the EMA of G and the network that
    generates from it at validation (its own gradients buffer and workspace) come on top.
    """
    if kind not in ("teacher", "distill"):
        raise ValueError(f"kind must be 'teacher' or 'distill', got {kind!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eval_batch = batch_size if eval_batch is None else eval_batch
    P = _num_parameters(config)
    B, L, E, H, V = batch_size, config.seq_len, config.emb_dim, config.hidden_dim, config.vocab_size
    if kind == "teacher":
        parts = {
            "parameters": FLOAT * P * 3,  # trained network, evaluation copy, returned teacher
            "gradients": FLOAT * P,
            "optimizer": FLOAT * P * 2,
            "ema": FLOAT * P,
            "activations": workspace_bytes(config, B) + workspace_bytes(config, eval_batch, backward=False),
            # x0, x_t, noise, prediction and the gradients of one step ([B, L, E] each)
            # and the rounding logits [B·L, V] (their gradient overwrites them)
            "step_buffers": FLOAT * B * L * (12 * E + V),
        }
    else:
        psi_batch = 2 * B if adversarial else B
        parts = {
            # φ, G, ψ; during stage 2 also stage 1's best student and its generator copy
            "parameters": FLOAT * P * 5,
            "gradients": FLOAT * P * 2,
            "optimizer": FLOAT * P * 4,
            "activations": (workspace_bytes(config, B)  # φ: backward for d/dx only
                            + max(workspace_bytes(config, B), workspace_bytes(config, eval_batch, backward=False))
                            + workspace_bytes(config, psi_batch)),
            # noised inputs, predictions and gradients ([2B, L, E]) and ψ's hidden states
            # with their gradient ([2B, L, H])
            "step_buffers": FLOAT * psi_batch * L * (8 * E + 2 * H),
        }
        if g_ema:  # G_ema, and the validation network: parameters, gradients, workspace
            parts["parameters"] += FLOAT * P * 2
            parts["gradients"] += FLOAT * P
            parts["activations"] += workspace_bytes(config, eval_batch, backward=False)
    parts["total"] = sum(parts.values())
    return parts


def _num_parameters(c: ModelConfig) -> int:
    """Length of the flat parameter buffer, from the C core's parameter table."""
    return max(off + math.prod(shape) for _, off, shape in _core.param_layout(**_dims(c)))


def available_memory() -> Optional[int]:
    """MemAvailable from /proc/meminfo in bytes; None where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(estimate: Mapping[str, int], max_memory: Optional[SizeLike] = None,
                 what: str = "this run") -> None:
    """Raise :class:`MemoryLimitError` when ``estimate["total"]`` exceeds ``max_memory``
    (bytes, or a size string) or, without one, the memory the kernel reports available.
    The message gives the estimate, its parts and the limit."""
    need = int(estimate["total"])
    if max_memory is not None:
        limit = parse_bytes(max_memory)
        against = f"max_memory is {format_bytes(limit)}"
    else:
        available = available_memory()
        if available is None:
            return
        limit = available
        against = f"only {format_bytes(limit)} is available (MemAvailable, /proc/meminfo)"
    if need > limit:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in estimate.items() if k != "total")
        raise MemoryLimitError(f"{what} needs about {format_bytes(need)} ({parts}) but {against}; "
                               f"lower batch_size or the model size, or raise max_memory")
