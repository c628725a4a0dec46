"""The GPU check script (benchmarks/gpu_check.py) runs end to end on the CPU with a tiny
model and the torch backend (Triton kernels interpreted), so that it has not rotted when a GPU is lent: every
section completes without an ERROR note, and the overlapped-decode section shows
taken guesses and the same tokens as the plain path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_on_the_cpu(tmp_path):
    out = tmp_path / "check.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--model-size",
         "tiny", "--backend", "torch", "--quick", "--profile", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TRITON_INTERPRET": "1"},  # the kernel sections run Triton
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert "ERROR" not in report, report
    for title in ("Greedy tokens vs transformers", "Decode throughput", "Prefill throughput",
                  "Decode through the worker", "Decode step breakdown"):  # fmt: skip
        assert f"### {title}" in report, title
    rows = [r for r in report.splitlines() if ", overlap on |" in r]
    assert len(rows) == 3 and all(r.endswith("| 0 | yes |") for r in rows), rows
    taken = [int(r.split("|")[6].split("/")[0]) for r in rows]
    assert all(t > 0 for t in taken), rows


def test_the_untuned_attention_plan_takes_plan_attentions_arguments():
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import gpu_check_model as check
        from tandem.kernels import triton_attn as ta
    finally:
        sys.path.remove(str(ROOT))
    check._TUNED[0] = ta.plan_attention
    args = (1, 1, 4096, 8, 4, 128, 132, 2)  # as attention's launcher passes them
    first, tuned = check._first_plan(*args), ta.plan_attention(*args)
    assert first.num_splits == tuned.num_splits and first.num_stages == 3
