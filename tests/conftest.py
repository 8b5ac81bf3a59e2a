"""Shared fixtures.  Nothing here imports torch (torch is an optional,
test-only reference; tests that need it call pytest.importorskip("torch")).
dlmone is imported lazily so that collection errors point at the test that
needs the extension."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# The project's shared data folder sits beside the checkout (../shared/data), in CI too;
# DLMONE_SHARED_DATA overrides. Tests that need it skip when it is absent.
SHARED_DATA = Path(os.environ.get("DLMONE_SHARED_DATA",
                                  Path(__file__).resolve().parent.parent.parent / "shared" / "data"))

# E != H (input_up_proj / output_down_proj present), 3 heads of 8
TINY = dict(
    vocab_size=50, seq_len=12, emb_dim=16, hidden_dim=24, num_layers=2, num_heads=3,
    ffn_dim=40, time_dim=16, dropout=0.0, diffusion_steps=2000,
)
# E == H (no projections), odd time_dim (zero-padded sinusoid), max_positions > seq_len
TINY_SAME = dict(
    vocab_size=37, seq_len=10, emb_dim=20, hidden_dim=20, num_layers=2, num_heads=4,
    ffn_dim=36, time_dim=15, dropout=0.0, diffusion_steps=1000, max_positions=16,
)


# Skips that depend on the machine rather than on a missing install or missing data;
# any other skip fails the session when DLMONE_STRICT_SKIPS=1, or CI=true and
# DLMONE_STRICT_SKIPS unset. A skip matches when one of these is part of its reason.
ALLOWED_SKIPS = (
    "no AMX-BF16 on this CPU or build",  # bf16 on AMX (test_model, test_recipe, test_bf16_training)
    "AddressSanitizer reserves terabytes",  # tests/test_core_safety.py: no RLIMIT_AS under ASan
)


def _strict_skips() -> bool:
    flag = os.environ.get("DLMONE_STRICT_SKIPS")
    if flag is None:
        flag = os.environ.get("CI", "")
    return flag.strip().lower() in ("1", "true", "yes")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason


_unexpected_skips = []


def _note_skip(report) -> None:
    # an xfail is reported as skipped too; it is not a skip
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if not any(allowed in reason for allowed in ALLOWED_SKIPS):
            _unexpected_skips.append((report.nodeid, reason))


def pytest_collectreport(report):
    _note_skip(report)  # a module-level importorskip skips at collection


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_sessionfinish(session, exitstatus):
    # OK, or NO_TESTS_COLLECTED when every test was skipped; a failure keeps its status
    if _strict_skips() and _unexpected_skips and exitstatus in (pytest.ExitCode.OK,
                                                                 pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _strict_skips() and _unexpected_skips:
        terminalreporter.section("unexpected skips (not in tests/conftest.py ALLOWED_SKIPS)", red=True)
        for nodeid, reason in _unexpected_skips:
            terminalreporter.line(f"{nodeid}: {reason}", red=True)


def make_config(**overrides):
    import dlmone

    kw = dict(TINY)
    kw.update(overrides)
    return dlmone.ModelConfig(**kw)


def random_state(model, rng, scale=0.3):
    """A random but well-conditioned state dict for ``model`` (float32 copies).

    LayerNorm weights are 1 + noise and biases are non-zero so that every
    parameter matters; ``lm_head.weight`` equals ``word_embedding.weight``.
    """
    out = {}
    for k, v in model.state_dict().items():
        shape = np.shape(v)
        if k == "lm_head.weight":
            continue
        if k.endswith("LayerNorm.weight"):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif k.endswith("LayerNorm.bias") or k.endswith(".bias"):
            a = 0.1 * rng.standard_normal(shape)
        elif k in ("word_embedding.weight", "position_embeddings.weight"):
            a = 0.5 * rng.standard_normal(shape)
        else:
            fan_in = shape[-1]
            a = scale * rng.standard_normal(shape) * np.sqrt(3.0 / fan_in)
        out[k] = a.astype(np.float32)
    if "lm_head.weight" in model.state_dict():
        out["lm_head.weight"] = out["word_embedding.weight"].copy()
    return out


def make_model(cfg, rng, seed=0):
    """A dlmone model with random (non-default) weights loaded."""
    import dlmone

    m = dlmone.DiffusionTransformer(cfg, seed=seed)
    m.load_state_dict(random_state(m, rng), strict=True)
    return m


@pytest.fixture
def rng():
    return np.random.default_rng(20240611)


@pytest.fixture
def tiny_cfg():
    return make_config()


@pytest.fixture
def tiny_same_cfg():
    return make_config(**TINY_SAME)


@pytest.fixture(params=["proj", "same"])
def any_cfg(request):
    """Both layouts: E != H (with projections) and E == H (without)."""
    return make_config() if request.param == "proj" else make_config(**TINY_SAME)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny kernels run single-threaded: on a shared 2-core machine OpenMP barriers
    dominate them. The thread count is restored afterwards; independence of results
    from the thread count is tested separately (test_model, test_diffusion)."""
    import dlmone

    before = dlmone.get_num_threads()
    dlmone.set_num_threads(1)
    try:
        yield
    finally:
        dlmone.set_num_threads(before)


def assert_close(actual, expected, name, rtol=1e-4, atol=1e-5):
    """Elementwise |actual - expected| <= atol + rtol |expected| (in float64), with a
    message naming the worst entry."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    diff = np.abs(actual - expected)
    ok = diff <= atol + rtol * np.abs(expected)
    if not ok.all():
        i = np.unravel_index(np.argmax(diff - rtol * np.abs(expected)), diff.shape)
        raise AssertionError(
            f"{name}: {np.count_nonzero(~ok)}/{ok.size} entries off; max abs diff {diff.max():.3e} "
            f"(at {i}: got {actual[i]:.8g}, want {expected[i]:.8g}); rtol={rtol} atol={atol}")
