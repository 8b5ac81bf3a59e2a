"""The C core at its limits: sizes a 32-bit BLAS cannot take are refused with
ValueError before any (blasint) cast, the forward and backward bindings of a kernel
check the same things, and an allocation that fails (address space limited with
RLIMIT_AS in a subprocess) raises MemoryError instead of crashing or returning NaN."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import dlmone
from dlmone import _core


def _sparse(tmp_path, name, shape):
    """A read-only float32 array of `shape` backed by a sparse file: no memory, no disk."""
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(int(np.prod(shape)) * 4)
    return np.memmap(path, dtype=np.float32, mode="r", shape=shape)


def test_linear_refuses_sizes_beyond_blas(tmp_path):
    x = _sparse(tmp_path, "x.bin", (2**31, 1))
    with pytest.raises(ValueError, match="rows of x.*2\\^31-1"):
        _core.linear(x, np.ones((1, 1), np.float32))
    w = _sparse(tmp_path, "w.bin", (2**31, 1))
    with pytest.raises(ValueError, match="rows of weight.*2\\^31-1"):
        _core.linear(np.ones((1, 1), np.float32), w)


def test_affine_argmax_refuses_sizes_beyond_blas(tmp_path):
    W = _sparse(tmp_path, "W.bin", (2**31, 1))
    with pytest.raises(ValueError, match="rows of W.*2\\^31-1"):
        _core.affine_argmax(np.zeros((1, 1), np.float32), W, np.zeros(1, np.float32))


BAD_ATTENTION = [
    (dict(B=0), "qkv"), (dict(L=0), "qkv"), (dict(H3=0), "qkv"), (dict(H3=7), "qkv"),
    (dict(heads=0), "qkv"), (dict(heads=-1), "qkv"), (dict(p=1.0), "dropout"), (dict(p=-0.5), "dropout"),
    (dict(p=float("nan")), "dropout"),
]


@pytest.mark.parametrize("bad, match", BAD_ATTENTION)
def test_attention_forward_and_backward_check_the_same(bad, match):
    a = dict(B=2, L=3, H3=12, heads=2, p=0.0)
    a.update(bad)
    qkv = np.zeros((a["B"], a["L"], a["H3"]), np.float32)
    H, heads = a["H3"] // 3, max(a["heads"], 1)
    grad_ctx = np.zeros((a["B"], a["L"], H), np.float32)
    att = np.zeros((a["B"], heads, a["L"], a["L"]), np.float32)
    with pytest.raises(ValueError, match=match):
        _core.attention(qkv, a["heads"], a["p"])
    with pytest.raises(ValueError, match=match):
        _core.attention_backward(grad_ctx, att, qkv, a["heads"], a["p"])


def test_attention_backward_checks_its_arrays():
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((2, 3, 12)).astype(np.float32)
    ctx, att = _core.attention(qkv, 2)
    assert _core.attention_backward(ctx, att, qkv, 2).shape == qkv.shape
    with pytest.raises(ValueError, match="grad_ctx"):
        _core.attention_backward(ctx[:, :2], att, qkv, 2)
    with pytest.raises(ValueError, match="att"):
        _core.attention_backward(ctx, att[:, :1], qkv, 2)


OOM_SCRIPT = textwrap.dedent(
    r"""
    import json, resource, sys
    import numpy as np
    from dlmone import _core

    def vm_size():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024

    def outcome(call):
        try:
            call()
        except MemoryError:
            return "MemoryError"
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return "no error"

    # everything that reserves address space once (OpenMP team, BLAS buffers) happens
    # before the limit; the big inputs are zero pages that take no memory
    m = _core.Model(50, 8, 16, 1, 2, 32, 8, 64)
    x_small = np.random.default_rng(0).standard_normal((2, 64, 8)).astype(np.float32)
    t_small = np.array([3.0, 700.0], np.float32)
    y_ref = m.forward(x_small, t_small)
    _core.linear(np.ones((512, 512), np.float32), np.ones((512, 512), np.float32))  # OpenBLAS in every thread
    _core.affine_argmax(np.ones((3, 8), np.float32), np.ones((5, 8), np.float32), np.zeros(5, np.float32))
    x_big = np.zeros((2**14, 64, 8), np.float32)
    t_big = np.zeros(2**14, np.float32)
    lin_x = np.zeros((240, 24576), np.float32)  # 58 tiles, K >= 2 max(M, N): 2 K chunks
    lin_w = np.zeros((12000, 24576), np.float32)
    W_wide = np.zeros((1, 2**20), np.float32)
    x_wide = np.ones((1, 2**20), np.float32)
    headroom = 256 << 20
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    # first, before other failures leave freed memory behind: room for the output only
    resource.setrlimit(resource.RLIMIT_AS, (vm_size() + lin_x.shape[0] * lin_w.shape[0] * 4 + (4 << 20), hard))
    split_k = outcome(lambda: _core.linear(lin_x, lin_w))
    resource.setrlimit(resource.RLIMIT_AS, (vm_size() + headroom, hard))
    out = {
        # 2 x 512 MiB of parameters and gradients
        "model": outcome(lambda: _core.Model(2**17, 2**10, 16, 1, 2, 32, 8, 64)),
        # about 1 GiB of activations
        "forward": outcome(lambda: m.forward(x_big, t_big)),
        "backward_after_failed_forward": outcome(lambda: m.backward(np.ones_like(x_small))),
        # 11 MiB output, 22 MiB of partial sums
        "linear_split_k": split_k,
        # 1 GiB of gathered rows (256 x 2^20 floats) per thread
        "affine_argmax": outcome(lambda: _core.affine_argmax(x_wide, W_wide, np.zeros(1, np.float32))),
    }
    out["forward_after"] = bool(np.array_equal(m.forward(x_small, t_small), y_ref))
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    json.dump(out, sys.stdout)
    """
)


@pytest.mark.skipif("asan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer reserves terabytes of address space: RLIMIT_AS cannot apply")
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_out_of_memory_raises_memory_error():
    root = os.path.dirname(os.path.dirname(os.path.abspath(dlmone.__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "2",
           "PYTHONPATH": os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    r = subprocess.run([sys.executable, "-c", OOM_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    for key in ("model", "forward", "linear_split_k", "affine_argmax"):
        assert out[key] == "MemoryError", (key, out[key])
    assert out["backward_after_failed_forward"].startswith("RuntimeError") and "before forward" in \
        out["backward_after_failed_forward"], out
    assert out["forward_after"], "the model must work as before once memory is back"
