"""Run-time instruction-set dispatch of the C core (csrc/core/isa.h, setup.py).

A default build holds csrc/core once per x86-64 level and picks the best one the CPU
supports when it loads; DLMONE_ISA=baseline|avx2 caps the level. These tests check the
level in use, that a capped level computes what the best one does (in a subprocess,
since the level is fixed when the extension loads), and that each level's machine code
really is of its level."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dlmone

LEVELS = ("baseline", "avx2", "avx512")
INFO = dlmone.build_info()
dispatching = pytest.mark.skipif(not INFO.get("isa_levels"),
                                 reason=f"this build has one build of its core ({INFO.get('isa')})")


def _env(**over):
    """The environment of a subprocess that imports this dlmone, DLMONE_ISA as given."""
    env = {k: v for k, v in os.environ.items() if k != "DLMONE_ISA"}
    package_parent = str(Path(dlmone.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_parent, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(over)
    return env


def workload():
    """Forward (train mode: dropout) and backward of a small model, then the diffusion loss
    with its gradient and an AdamW step: every kind of kernel the levels differ in."""
    from dlmone.diffusion import Diffusion, training_loss

    cfg = dlmone.ModelConfig(vocab_size=50, seq_len=12, emb_dim=16, hidden_dim=24, num_layers=2,
                             num_heads=3, ffn_dim=40, time_dim=16, dropout=0.1, diffusion_steps=200)
    model = dlmone.DiffusionTransformer(cfg, seed=3)
    rng = np.random.default_rng(7)
    B, L = 4, cfg.seq_len
    x = rng.standard_normal((B, L, cfg.emb_dim)).astype(np.float32)
    t = rng.integers(0, cfg.diffusion_steps, size=B)
    out = {"y": np.array(model.forward(x, t, train=True, seed=11))}
    out["gx"] = np.array(model.backward(rng.standard_normal(out["y"].shape).astype(np.float32)))
    out.update({"grad " + k: v.copy() for k, v in model.grads().items()})
    model.zero_grad()
    tokens = rng.integers(0, cfg.vocab_size, size=(B, L))
    mask = np.zeros((B, L), np.float32)
    mask[:, L // 2:] = 1.0
    terms = training_loss(model, Diffusion(cfg.diffusion_steps), tokens, mask, t, seed=5)
    out["loss terms"] = np.array([terms.loss, terms.mse, terms.nll, terms.prior], np.float64)
    out.update({"grad loss " + k: v.copy() for k, v in model.grads().items()})
    # the optimiser on set gradients: Adam's first steps divide by |g|, which would blow up
    # the rounding differences of near-zero gradients (the key biases' are exactly zero)
    opt = dlmone.AdamW(model, lr=1e-2, weight_decay=0.01, clip_norm=1.0)
    for _ in range(2):
        model.grad_buffer[...] = rng.standard_normal(model.grad_buffer.shape).astype(np.float32)
        opt.step()
    out["params"] = model.params.copy()
    return out


def _workload_at(level, tmp_path):
    """workload() in a subprocess capped at `level`, and that subprocess's build_info."""
    out = tmp_path / f"{level}.npz"
    code = ("import sys, json, numpy as np, dlmone; sys.path.insert(0, sys.argv[1]); "
            "import test_isa_dispatch as t; np.savez(sys.argv[2], **t.workload()); "
            "info = dlmone.build_info(); print(json.dumps([info['isa'], info['amx_bf16']]))")
    run = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(out)],
                         env=_env(DLMONE_ISA=level), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    with np.load(out) as saved:
        return dict(saved), run.stdout.strip().splitlines()[-1]


def test_build_info_reports_the_level():
    assert isinstance(INFO["isa"], str) and INFO["isa"]
    assert set(INFO["cpu_isa"]) <= set(LEVELS)
    if not INFO["isa_levels"]:
        assert INFO["isa"] in ("native", "generic")
        return
    assert INFO["isa_levels"] == list(LEVELS)
    # the best level the CPU supports, capped by DLMONE_ISA when it is set
    supported = [lv for lv in LEVELS if lv in INFO["cpu_isa"]]
    cap = os.environ.get("DLMONE_ISA") or LEVELS[-1]
    expected = [lv for lv in supported if LEVELS.index(lv) <= LEVELS.index(cap)][-1]
    assert INFO["isa"] == expected
    if "avx512" in INFO["cpu_isa"] and not os.environ.get("DLMONE_ISA"):
        assert INFO["isa"] == "avx512"


@dispatching
@pytest.mark.parametrize("level", ["baseline", "avx2"])
def test_capped_level_matches_the_default(level, tmp_path):
    if level not in INFO["cpu_isa"]:
        pytest.skip(f"the CPU lacks {level}")
    got, info = _workload_at(level, tmp_path)
    assert info == f'["{level}", false]'  # AMX (bf16) belongs to the avx512 level
    want = workload()
    assert set(got) == set(want)
    for k, w in want.items():
        g = got[k]
        assert g.shape == w.shape and np.isfinite(g).all(), k
        # summation order (vector width) and FMA contraction differ between levels
        err = float(np.max(np.abs(g - w))) if w.size else 0.0
        assert err <= 5e-6 * max(1.0, float(np.max(np.abs(w)))), (k, err)


@dispatching
def test_unknown_level_fails_import():
    run = subprocess.run([sys.executable, "-c", "import dlmone"], env=_env(DLMONE_ISA="avx9000"),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "DLMONE_ISA=avx9000" in run.stderr and "baseline, avx2, avx512" in run.stderr


def _functions_by_level(disassembly):
    """{level: {function: its instructions}} for the functions of the .so that lie between
    the first and the last entry point of each level's build (the builds are linked one
    after the other, so this includes their OpenMP-outlined regions)."""
    blocks = []  # (function, [instruction lines])
    for line in disassembly.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if head:
            blocks.append((head.group(1), []))
        elif blocks and line.strip():
            blocks[-1][1].append(line)
    out = {}
    for level in LEVELS:
        at = [i for i, (name, _) in enumerate(blocks) if name.endswith("__" + level)]
        out[level] = {} if not at else dict(blocks[at[0]:at[-1] + 1])
    return out


def _vector_registers(lines):
    """The kinds of wide vector register ("ymm", "zmm") that instructions use."""
    return {kind for line in lines for kind in re.findall(r"%([yz]mm)\d", line)}


@dispatching
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
def test_each_level_has_its_own_machine_code():
    so = dlmone._core.__file__
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", so], capture_output=True, text=True,
                          check=True).stdout
    by_level = _functions_by_level(text)
    used = {level: set().union(*map(_vector_registers, fns.values())) for level, fns in by_level.items()}
    assert used["baseline"] == set() and "zmm" not in used["avx2"], used
    if "-O3" not in INFO["cflags"]:
        return  # the sanitizer build's -O1 does not vectorise
    # AVX-512 reaches the parallel regions and the inlined exp/erf of mathfun.h
    for fn in ("apply_epilogue__avx512", "gelu_forward._omp_fn.0", "layernorm_forward._omp_fn.0"):
        assert "zmm" in _vector_registers(by_level["avx512"].get(fn, ())), fn
        assert _vector_registers(by_level["baseline"].get(fn.replace("avx512", "baseline"), ())) == set(), fn
    # ... and the GELU epilogue's erf itself, not only its bias loop: its division runs on
    # whole vectors. (Under GCC's default -ftrapping-math it stayed scalar, vdivss: every
    # loop calling mathfun.h's exp/erf/tanh did, at 1.67x the cost of a small step.)
    for level, reg in (("avx2", "ymm"), ("avx512", "zmm")):
        lines = by_level[level].get("apply_epilogue__" + level, ())
        assert any(re.search(r"\bvdivps\b.*%" + reg, line) for line in lines), level
