"""Speculation policies side by side, offline: the engine core in a closed loop.

    .venv/bin/python -m benchmarks.spec_closed_loop --configs off ngram-fixed ngram-goodput --conc 64
    .venv/bin/python -m benchmarks.spec_closed_loop --configs draft-fixed draft-goodput --conc 1 --runs 3

The same workload as `benchmarks.spec_serving` (the built-in pair, its 8 prompts,
64 greedy tokens, ignore_eos; c clients each sending its next request when the last
finished, one warm-up request per client then `--requests-per-client` measured), but
with no HTTP server: a fresh, warmed-up `EngineCore` per configuration and run, stepped
in this process (1 torch thread), configurations interleaved. Without the server's
processes and sockets sharing the 2 cores, policy differences of a few percent show
above the noise. Prints per run the mean latency, the chosen-k histogram, the
acceptance rate and P(first j drafts accepted); then the medians.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections import defaultdict

import torch
from transformers import PreTrainedTokenizerFast

from benchmarks.spec_serving import PROMPTS
from tandem.engine.builtin import BUILTIN_TARGET
from tandem.engine.config import EngineConfig
from tandem.engine.executor import UniExecutor
from tandem.engine.plan import SamplingParams
from tandem.engine.spec_config import SpeculativeConfig
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.core import EngineCore
from tandem.scheduler.request import GenerateRequest
from tandem.server.build import freeze_heap

CONFIGS = ["off", "draft-fixed", "draft-goodput", "ngram-fixed", "ngram-goodput"]


def make_core(config: str) -> EngineCore:
    method, _, policy = config.partition("-")
    spec = None
    if method != "off":
        spec = SpeculativeConfig(
            speculative_method=method, speculation_policy=policy, num_speculative_tokens=4
        )
    core = EngineCore(SchedulerConfig(), UniExecutor(EngineConfig(num_threads=1), spec), spec=spec)
    core.warm_up()  # as the server does,
    freeze_heap()  # both (main unfreezes after each run)
    return core


def closed_loop(
    core: EngineCore, prompts: list[list[int]], conc: int, per_client: int, max_tokens: int
) -> float:
    """Mean latency (s) of the measured requests."""
    started: dict[str, tuple[float, int, int]] = {}
    latencies: list[float] = []
    count = 0

    def send(client: int, j: int) -> None:
        nonlocal count
        rid = str(count)
        count += 1
        sampling = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        prompt = prompts[(client + j * conc) % len(prompts)]
        core.add_request(
            GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling)
        )
        started[rid] = (time.perf_counter(), client, j)

    for client in range(conc):
        send(client, 0)
    while core.has_unfinished():
        for out in core.step():
            if out.finished:
                t0, client, j = started.pop(out.request_id)
                if j >= 1:  # request 0 of each client warms up
                    latencies.append(time.perf_counter() - t0)
                if j < per_client:
                    send(client, j + 1)
    return statistics.mean(latencies)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    p.add_argument("--conc", nargs="+", type=int, default=[1, 4, 16, 64])
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tok = PreTrainedTokenizerFast.from_pretrained(BUILTIN_TARGET)
    prompts = [tok.encode(t) for t in PROMPTS]
    results: dict[tuple[str, int], list[float]] = defaultdict(list)
    for c in args.conc:
        for r in range(args.runs):
            for config in args.configs:
                core = make_core(config)
                try:
                    lat = closed_loop(core, prompts, c, args.requests_per_client, args.max_tokens)
                    st = core.stats().scheduler.spec
                finally:
                    core.shutdown()
                    gc.unfreeze()  # the next configuration's core freezes its own heap
                results[(config, c)].append(lat)
                line = f"run {r} {config:14s} c={c:3d} latency {lat * 1e3:7.1f} ms"
                if st is not None:
                    rate = st.num_accepted_tokens / max(st.num_draft_tokens, 1)
                    first = [round(a / max(st.num_drafts, 1), 2) for a in st.accepted_per_pos]
                    line += f"  k histogram {st.k_histogram}  acceptance {rate:.2f}"
                    line += f"  P(first j kept) {first}"
                print(line, flush=True)
    print(
        f"\ncommand: python -m benchmarks.spec_closed_loop {' '.join(argv or sys.argv[1:])}".rstrip()
    )
    print("| config | c | mean latency (ms) | vs off | spread (ms) |\n|---|---:|---:|---:|---:|")
    for c in args.conc:
        off = results.get(("off", c))
        for config in args.configs:
            lats = results[(config, c)]
            med = statistics.median(lats)
            ratio = f"{statistics.median(off) / med:.2f}x" if off else "-"
            spread = (max(lats) - min(lats)) * 1e3
            print(f"| {config} | {c} | {med * 1e3:.1f} | {ratio} | {spread:.1f} |")


if __name__ == "__main__":
    main()
