"""Running Tandem's Triton kernels in Triton's interpreter, on CPU.

Not a test module: imported by tests/kernels/test_triton_*.py.

TRITON_INTERPRET=1 must be set before triton is first imported in a process: `@triton.jit`
picks the interpreter when a function is defined, triton's own library functions
(tl.sum, tl.cdiv, ...) included, and an interpreted kernel cannot call a compiled one.
So the kernel test modules (INTERPRETED_TEST_FILES) run only where the variable is set,
and test_triton_interpreter.py runs them in a child process that sets it: the
interpreter never leaks into this process or other tests. Run them directly with
`TRITON_INTERPRET=1 pytest tests/kernels/test_triton_attn.py`.
"""

from __future__ import annotations

import os

import pytest
import torch

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
INTERPRETED_TEST_FILES = (
    "test_triton_attn.py",
    "test_triton_ops.py",
    "test_triton_model.py",
    "test_triton_rope_kv.py",
)
requires_interpreter = pytest.mark.skipif(
    not IN_INTERPRETER,
    reason="Triton interpreter tests run in test_triton_interpreter.py's child process "
    "(TRITON_INTERPRET=1 must be set before triton is first imported)",
)


def probe_interpreter() -> None:
    """Skip unless the interpreter runs a one-line kernel on a CPU tensor."""
    triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    import triton.language as tl

    @triton.jit
    def _iota(out_ptr, N: tl.constexpr):
        tl.store(out_ptr + tl.arange(0, N), tl.arange(0, N).to(tl.float32))

    out = torch.zeros(4)
    try:
        _iota[(1,)](out, N=4)
    except Exception as e:  # noqa: BLE001 - any failure means the interpreter cannot run
        pytest.skip(f"Triton's interpreter cannot run on this machine: {e!r}")
    if out.tolist() != [0.0, 1.0, 2.0, 3.0]:
        pytest.skip(f"Triton's interpreter computed {out.tolist()} for iota(4) here")
