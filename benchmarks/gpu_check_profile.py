"""GPU check, decode-step breakdown: where a decode step's time goes.

For one batch size: the host time to build the step's inputs, the host time to launch
it, the whole step (inputs, forward, greedy pick, the one host sync), the device span of
the step between events, one bare CUDA-graph replay, and torch.profiler's device
kernels of a few steps (graph replays and eager), largest first.

Part of `python -m benchmarks.gpu_check --profile`; needs only engine/ and kernels/.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.gpu_check_model import Blocks, _prefill
from benchmarks.gpu_check_report import Section, sync
from tandem.engine.model_input import RunSeq


def decode_breakdown(section: Section, runner, batch: int, ctx: int, steps: int) -> None:
    blocks = Blocks(runner.block_size, runner.num_blocks)
    tables = [blocks.take(ctx + steps + 16) for _ in range(batch)]
    tokens = _prefill(runner, tables, ctx, 16384)
    pos = ctx
    cuda = runner.device.type == "cuda"

    def step(times: dict | None = None):
        nonlocal tokens, pos
        seqs = [RunSeq([t], pos, tb, 0) for t, tb in zip(tokens, tables, strict=True)]
        t0 = time.perf_counter()
        inp = runner.build_input(seqs)
        t1 = time.perf_counter()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        picked = runner.execute(inp).argmax(-1)
        t2 = time.perf_counter()
        if cuda:
            end.record()
        tokens = picked.tolist()
        t3 = time.perf_counter()
        pos += 1
        if times is not None:
            times["build"].append(t1 - t0)
            times["launch"].append(t2 - t1)
            times["step"].append(t3 - t0)
            if cuda:
                times["device span"].append(start.elapsed_time(end) / 1e3)
        return inp

    for _ in range(3):  # graph capture, compilation
        inp = step()
    times: dict[str, list[float]] = {"build": [], "launch": [], "step": [], "device span": []}
    for _ in range(steps):
        inp = step(times)
    mode = "graphs" if runner.graphs is not None else "eager"
    details = {
        "build": "runner.build_input (numpy + host-to-device copies)",
        "launch": "runner.execute + argmax, host time to enqueue",
        "step": "all of it, with the host sync (as in the throughput table)",
        "device span": "events around execute + argmax",
    }
    for name, values in times.items():
        if values:
            section.add(batch, f"{name} ({mode})", statistics.mean(values) * 1e3, details[name])
    key = None if runner.graphs is None else runner.graphs.key_for(inp)
    if key is not None and cuda:
        graph = runner.graphs.graphs[key].graph
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(runner.device)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        end.synchronize()
        section.add(batch, "graph replay alone", start.elapsed_time(end) / 20,
                    f"bucket {key[0]} x {key[1]} tokens, back to back")  # fmt: skip
    if cuda:
        _profile(section, runner, batch, step, "graphs" if runner.graphs else "eager")
        if runner.graphs is not None:
            graphs, runner.graphs = runner.graphs, None
            try:
                step()
                _profile(section, runner, batch, step, "eager")
            finally:
                runner.graphs = graphs


def _profile(section: Section, runner, batch: int, step, mode: str, n: int = 5) -> None:
    """torch.profiler's device kernels over n steps: their sum per step, the top ones."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        sync(runner.device)
    rows = []
    for e in prof.key_averages():
        device_us = getattr(e, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(e, "self_cuda_time_total", 0)
        if device_us > 0 and str(getattr(e, "device_type", "")).endswith("CUDA"):
            rows.append((device_us / n, e.count / n, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    section.add(batch, f"kernels ({mode}, profiler)", total / 1e3,
                f"{sum(r[1] for r in rows):.0f} kernels / step")  # fmt: skip
    for us, calls, name in rows[:10]:
        section.add(
            batch, f"  {name[:70]}", us / 1e3, f"{calls:.0f} / step, {us / calls:.1f} us each"
        )
