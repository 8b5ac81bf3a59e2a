"""The C-only test program of tests/c: csrc/core built without Python (with the flags
setup.py uses) and checked against double-precision references at 1, 2 and 3 OpenMP
threads. CI also runs it under ASan + UBSan and ThreadSanitizer (make -C tests/c
check-asan check-tsan)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

C_TESTS = Path(__file__).resolve().parent / "c"


def test_c_core_program(tmp_path):
    if shutil.which("make") is None or shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler or make")
    run = subprocess.run(["make", "-s", "-C", str(C_TESTS), "check", f"BUILD={tmp_path}",
                          f"PYTHON={sys.executable}"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    assert "all checks passed" in run.stdout
