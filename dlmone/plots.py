"""PNG plots of runs: training curves (teacher and both distillation stages with the
degeneration monitors) and BLEU against network evaluations per sequence."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Union

PathLike = Union[str, Path]


def _read_log(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: PathLike) -> Path:
    from .checkpoint import atomic_write_bytes
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def training_curves(teacher_log: PathLike, distill_dir: PathLike, out: PathLike) -> Path:
    """Teacher loss; per stage: SiD and ψ losses, discriminator accuracy, validation
    BLEU and the monitors (empty outputs, repeated tokens, self-BLEU)."""
    plt = _pyplot()
    tlog = _read_log(Path(teacher_log))
    stages = [(n, _read_log(Path(distill_dir) / f"stage{n}" / "log.jsonl")) for n in (1, 2)]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    train = [r for r in tlog if "loss" in r]
    val = [r for r in tlog if "val_loss" in r]
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    axes[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="valid loss")
    axes[0].set_yscale("log")
    axes[0].set_title("teacher")
    axes[0].set_xlabel("step")
    offset = 0
    for n, log in stages:
        steps = [r for r in log if "sid" in r]
        vals = [r for r in log if "val_bleu" in r]
        if not steps and not vals:
            continue
        x = lambda rows: [offset + r["step"] for r in rows]  # noqa: E731
        axes[1].plot(x(steps), [r["sid"] for r in steps], label=f"SiD loss (stage {n})")
        axes[1].plot(x(steps), [r["psi_dsm"] for r in steps], "--", label=f"ψ denoising (stage {n})")
        if steps and "disc_acc_real" in steps[0]:
            axes[2].plot(x(steps), [r["disc_acc_real"] for r in steps], label=f"D acc real (stage {n})")
            axes[2].plot(x(steps), [r["disc_acc_fake"] for r in steps], "--", label=f"D acc fake (stage {n})")
        axes[3].plot(x(vals), [r["val_bleu"] for r in vals], "o-", label=f"BLEU (stage {n})")
        axes[3].plot(x(vals), [r["val_empty"] for r in vals], ":", label=f"empty (stage {n})")
        axes[3].plot(x(vals), [r["val_repeat"] for r in vals], "-.", label=f"repeat (stage {n})")
        axes[3].plot(x(vals), [r["val_self_bleu"] for r in vals], "--", label=f"self-BLEU (stage {n})")
        offset += max([r["step"] for r in log if "step" in r] or [0])
    axes[1].set_title("distillation losses")
    axes[2].set_title("discriminator accuracy")
    axes[3].set_title("validation (1-step student)")
    for ax in axes[1:]:
        ax.set_xlabel("distillation step (stages in sequence)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    out_path = _save(fig, out)
    plt.close(fig)
    return out_path


def bleu_vs_nfe(rows: Sequence[Dict], out: PathLike, title: str = "") -> Path:
    """rows: dicts with ``name``, ``kind`` ("teacher"/"student"), ``nfe`` and ``bleu``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker in (("teacher", "s"), ("student", "o")):
        pts = sorted((r["nfe"], r["bleu"], r["name"]) for r in rows if r["kind"] == kind)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker + "-", label=kind)
        for nfe, b, name in pts:
            ax.annotate(name, (nfe, b), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per sequence")
    ax.set_ylabel("BLEU")
    ax.set_title(title or "BLEU against network evaluations")
    ax.legend()
    out_path = _save(fig, out)
    plt.close(fig)
    return out_path
