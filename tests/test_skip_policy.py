"""The skip policy of tests/conftest.py: under CI (or DLMONE_STRICT_SKIPS=1) a skip whose
reason is not in ALLOWED_SKIPS fails the session. Each case runs pytest in a subprocess
on a small test file beside a copy of the real conftest."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parent / "conftest.py"

TESTS = '''
import pytest

def test_passes():
    pass

def test_skips_unexpectedly():
    pytest.skip("the frobnicator is not installed")

def test_skips_as_allowed():
    pytest.skip("no AMX-BF16 on this CPU or build")

@pytest.mark.xfail(reason="a known failure is not a skip")
def test_xfails():
    assert False
'''


def run_pytest(tmp_path, source, strict=None, ci=None):
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "DLMONE_STRICT_SKIPS")}
    if strict is not None:
        env["DLMONE_STRICT_SKIPS"] = strict
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("strict,ci", [("1", None), (None, "true")])
def test_unexpected_skip_fails_the_session(tmp_path, strict, ci):
    run = run_pytest(tmp_path, TESTS, strict=strict, ci=ci)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "unexpected skips" in run.stdout
    assert "test_skips_unexpectedly: the frobnicator is not installed" in run.stdout
    summary = run.stdout.split("unexpected skips")[1]
    assert "test_skips_as_allowed" not in summary and "test_xfails" not in summary


def test_module_level_importorskip_counts(tmp_path):
    run = run_pytest(tmp_path, "import pytest\npytest.importorskip('no_such_module_xyz')\n\n"
                               "def test_never_runs():\n    pass\n", strict="1")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "no_such_module_xyz" in run.stdout.split("unexpected skips")[1]


def test_allowed_skips_pass(tmp_path):
    source = TESTS.replace('pytest.skip("the frobnicator is not installed")', "pass")
    run = run_pytest(tmp_path, source, strict="1")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "unexpected skips" not in run.stdout


@pytest.mark.parametrize("strict,ci", [(None, None), ("0", "true")])
def test_skips_pass_outside_ci_or_when_turned_off(tmp_path, strict, ci):
    run = run_pytest(tmp_path, TESTS, strict=strict, ci=ci)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "unexpected skips" not in run.stdout

