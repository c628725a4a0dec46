"""Tensor parallelism on CPU: TP = 1 (in process) vs TP = 2 (Ray actors, gloo), and the
per-step cost of dispatching a plan to the ranks.

    python -m benchmarks.tp                          # built-in model + random ~100M Llama
    python -m benchmarks.tp --models builtin --batch 4 --dispatch-steps 1000

Dispatch: two bare rank actors (no model) answer a no-op step N times by a plain actor
call per rank per step (`ray.get([a.noop.remote(plan) ...])`) and N times through the
compiled graph Tandem uses (`StepBroadcast`), alternating in 5 blocks; the table gives
the median over blocks of the mean round trip.

Generation: B greedy requests (prompt 32 tokens, 32 outputs, ignore_eos) submitted at
once to an EngineCore and stepped to the end, after one warm-up round. TP = 1 runs the
model in this process with 1 and with 2 torch threads; TP = 2 runs one rank per Ray
actor with 1 thread each. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.offline import make_random_llama
from tandem.engine.config import EngineConfig
from tandem.engine.executor import make_executor
from tandem.engine.plan import SamplingParams, StepPlan
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.core import EngineCore
from tandem.scheduler.request import GenerateRequest

PROMPT_LEN = 32
OUTPUT_LEN = 32


def make_random_llama_100m(out: Path) -> Path:
    """A random ~100M-parameter Llama (hidden 768, 8 layers, 12 heads, 4 KV heads,
    vocab 32000, untied): 49M embedding + LM head, 50M in the layers; float32."""
    return make_random_llama(
        out,
        torch.float32,
        hidden_size=768,
        intermediate_size=2048,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )


def dispatch_overhead(num_steps: int, num_blocks: int = 5) -> dict[str, float]:
    """Median over blocks of the mean ms of a no-op step round trip to 2 ranks, plain
    actor calls vs compiled graph; the two alternate block by block, so that a shared
    machine's changing load hits both alike."""
    import ray

    from tandem.engine.ray_worker import RankWorker, StepBroadcast

    actor_cls = ray.remote(num_cpus=1)(RankWorker)
    actors = [actor_cls.remote(EngineConfig(), None, r, 2, 60.0) for r in range(2)]
    plan = StepPlan(0, [])
    per_block = max(1, num_steps // num_blocks)
    rpc_ms: list[float] = []
    graph_ms: list[float] = []
    for _ in range(num_blocks):
        ray.get([a.noop.remote(plan) for a in actors])
        t0 = time.perf_counter()
        for _ in range(per_block):
            ray.get([a.noop.remote(plan) for a in actors])
        rpc_ms.append((time.perf_counter() - t0) / per_block * 1e3)
        graph = StepBroadcast(actors, method="noop")
        graph.execute(plan, timeout_s=60)
        t0 = time.perf_counter()
        for _ in range(per_block):
            graph.execute(plan, timeout_s=60)
        graph_ms.append((time.perf_counter() - t0) / per_block * 1e3)
        graph.teardown()
    for a in actors:
        ray.kill(a)
    return {
        "plain actor RPC": statistics.median(rpc_ms),
        "compiled graph (Tandem)": statistics.median(graph_ms),
    }


def run_generation(model: str | None, tp: int, threads: int, batch: int) -> dict[str, float]:
    """`threads`: torch threads per rank."""
    config = EngineConfig(
        model=model,
        dtype="float32",
        kv_cache_memory=64 << 20,
        max_model_len=PROMPT_LEN + OUTPUT_LEN + 16,
        tensor_parallel_size=tp,
        distributed_executor_backend="ray" if tp > 1 else "uni",
        num_threads=threads,
    )
    executor = make_executor(config)
    try:
        core = EngineCore(SchedulerConfig(), executor)
        _generate(core, batch, round_id=0)  # warm-up
        return _generate(core, batch, round_id=1)
    finally:
        executor.shutdown()


def _generate(core: EngineCore, batch: int, round_id: int) -> dict[str, float]:
    sp = SamplingParams(temperature=0.0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    for i in range(batch):
        prompt = [(7 * i + j) % 200 + 3 for j in range(PROMPT_LEN)]
        core.add_request(GenerateRequest(f"w{round_id}-{i}", prompt, sp))
    first_step = core.stats().steps.num_steps
    t0 = time.perf_counter()
    num_tokens = 0
    while core.has_unfinished():
        num_tokens += sum(len(o.new_token_ids) for o in core.step())
    wall = time.perf_counter() - t0
    steps = core.stats().steps.recent[-(core.stats().steps.num_steps - first_step) :]
    decode = [s.step_time_s for s in steps if not s.num_prefill_tokens]
    return {
        "tok_s": num_tokens / wall,
        "step_ms": statistics.mean(decode) * 1e3,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["builtin", "random100m"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dispatch-steps", type=int, default=1000)
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    try:
        print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
        print("| dispatch (no-op step, 2 ranks) | ms per step |\n|---|---|")
        for name, ms in dispatch_overhead(args.dispatch_steps).items():
            print(f"| {name} | {ms:.3f} |", flush=True)
        print(
            f"\n| model | TP | threads per rank | decode step ms | output tok/s (B={args.batch}) |"
        )
        print("|---|---|---|---|---|")
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.models:
                model = None if name == "builtin" else str(make_random_llama_100m(Path(tmp)))
                for tp, threads in ((1, 1), (1, 2), (2, 1)):
                    r = run_generation(model, tp, threads, args.batch)
                    row = f"| {name} | {tp} | {threads} | {r['step_ms']:.1f} | {r['tok_s']:.0f} |"
                    print(row, flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
