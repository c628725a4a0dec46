"""The table the GPU check prints, timing helpers, and the card's measured limits.

Part of `python -m benchmarks.gpu_check`; needs only torch.
"""

from __future__ import annotations

import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

# dense bf16 tensor-core peak by card name (first match wins), FLOP/s
NOMINAL_BF16_PEAK = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10", 125e12),
    ("L4", 121e12),
)


@dataclass
class Section:
    """One table of the report."""

    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells) -> None:
        row = [c if isinstance(c, str) else fmt(c) for c in cells]
        self.rows.append(row)
        print("  | " + " | ".join(row) + " |", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    def render(self) -> str:
        lines = [f"### {self.title}", ""]
        if self.rows:
            lines += ["| " + " | ".join(self.header) + " |"]
            lines += ["|" + "|".join("---" for _ in self.header) + "|"]
            lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


class Report:
    """Sections in order; written to `out` after every section, so a run cut short by a
    timeout still leaves what it measured."""

    def __init__(self, title: str, out: Path | None, budget_s: float) -> None:
        self.title = title
        self.out = out
        self.sections: list[Section] = []
        self.deadline = time.monotonic() + budget_s

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, title: str, header: list[str], fn: Callable[[Section], None], need_s=0.0):
        """Run fn(section); an exception or a spent budget becomes a note, not a crash."""
        section = Section(title, header)
        self.sections.append(section)
        print(f"\n== {title}", flush=True)
        t0 = time.monotonic()
        if self.time_left() < need_s:
            section.note(f"skipped: {self.time_left():.0f}s of budget left, needs ~{need_s:.0f}s")
        else:
            try:
                fn(section)
            except Exception as e:  # noqa: BLE001 - report and go on to the next section
                traceback.print_exc()
                section.note(f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        section.note(f"section time {time.monotonic() - t0:.1f}s")
        self.write()

    def render(self) -> str:
        return f"## {self.title}\n\n" + "\n".join(s.render() for s in self.sections)

    def write(self) -> None:
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(self.render())


def fmt(x) -> str:
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(fn: Callable[[], object], device: torch.device, reps: int = 20, warmup: int = 3):
    """Median wall time of fn() in ms, synchronising around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_graph_ms(fn: Callable[[], object], device: torch.device, inner: int = 10,
                   reps: int = 15) -> float:  # fmt: skip
    """Median device time of fn() in ms, from a CUDA graph of `inner` calls replayed
    `reps` times between events: launch overhead left out, as in the engine's graph
    replays. Falls back to bench_ms off CUDA."""
    if device.type != "cuda":
        return bench_ms(fn, device, reps=3, warmup=1)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm-up (compiles) outside the capture
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    del graph
    return statistics.median(times)


def copy_bandwidth(device: torch.device, mib: int = 1024) -> float:
    """Measured device copy bandwidth in bytes/s: (read + write) of a `mib` MiB buffer."""
    src = torch.empty(mib << 18, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device, reps=10)
    return 2 * src.numel() * 4 / (ms / 1e3)


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    """Measured FLOP/s of an n x n x n matmul in dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = bench_ms(lambda: a @ b, device, reps=10)
    return 2 * n**3 / (ms / 1e3)


def nominal_bf16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in NOMINAL_BF16_PEAK if key in name), None)
