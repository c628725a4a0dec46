"""Runs the Triton kernel tests (triton_interpreter.INTERPRETED_TEST_FILES) in a child
pytest process with TRITON_INTERPRET=1, so that the interpreter never leaks into this
process (see triton_interpreter.py). The child's report is shown on failure."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from triton_interpreter import IN_INTERPRETER, INTERPRETED_TEST_FILES

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def test_triton_kernels_in_interpreter_child():
    if IN_INTERPRETER:
        pytest.skip("TRITON_INTERPRET=1 here: the kernel test modules run in this process")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton): Triton kernels untested")
    files = [str(HERE / name) for name in INTERPRETED_TEST_FILES]
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = (proc.stdout[-8000:] + "\n" + proc.stderr[-2000:]).strip()
    assert proc.returncode == 0, f"Triton interpreter tests failed:\n{report}"
    summary = proc.stdout.strip().splitlines()[-1]
    if " passed" not in summary:
        pytest.skip(f"Triton interpreter tests did not run: {report[-1500:]}")
    print(summary)
