"""Served vs offline throughput on the same workload (a measurement, not a test).

    .venv/bin/python tests/e2e/serving_speed.py [--requests 64] [--max-tokens 128] [-- FLAGS]

Modes, each N concurrent requests of `--max-tokens` tokens:
  offline         the engine core stepped directly (no threads, no HTTP)
  loop thread     through EngineLoop (the core in a thread of this process), no HTTP
  loop process    through ProcessEngineLoop (the core in a child process), no HTTP
  served thread   `tandem serve --no-engine-process`, streaming /v1/completions over raw
  served process  `tandem serve --engine-process`     sockets (the client parses only
                                                      the final usage chunk)

Every engine and server is started first; then the modes take turns, one run each
per round, so that a change in machine load hits all of them alike. Prints tokens/s
per mode (median over rounds), its ratio to offline (the median of the per-round
ratios), and the load average. Other processes on the same cores still skew it.
"""

from __future__ import annotations

import os

# As `tandem serve` does, before torch loads: idle OpenMP workers sleep, not spin.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from openai_server_harness import MODEL_NAME, TandemServer  # noqa: E402

from tandem.engine.config import EngineConfig  # noqa: E402
from tandem.engine.plan import SamplingParams  # noqa: E402
from tandem.scheduler.config import SchedulerConfig  # noqa: E402
from tandem.scheduler.core import EngineCore  # noqa: E402
from tandem.scheduler.loop import EngineLoop, ServingLoop  # noqa: E402
from tandem.scheduler.request import GenerateRequest  # noqa: E402
from tandem.server.build import build_engine, launch_engine_process  # noqa: E402

PROMPT = "ROMEO:"
USAGE = re.compile(rb'"usage":\{"prompt_tokens":\d+,"completion_tokens":(\d+)')
MODES = ("offline", "loop thread", "loop process", "served thread", "served process")
Run = Callable[[str], Awaitable[int]]  # run tag -> tokens generated


def requests(tag: str, ids: list[int], n: int, max_tokens: int) -> list[GenerateRequest]:
    params = [SamplingParams(max_tokens=max_tokens, seed=i, ignore_eos=True) for i in range(n)]
    return [GenerateRequest(f"{tag}-{i}", ids, p) for i, p in enumerate(params)]


def offline_run(core: EngineCore, ids: list[int], args: argparse.Namespace) -> Run:
    async def run(tag: str) -> int:  # blocks the event loop: nothing else runs meanwhile
        for r in requests(tag, ids, args.requests, args.max_tokens):
            core.add_request(r)
        n = 0
        while core.has_unfinished():
            n += sum(len(o.new_token_ids) for o in core.step())
        return n

    return run


def loop_run(loop: ServingLoop, ids: list[int], args: argparse.Namespace) -> Run:
    async def one(req: GenerateRequest) -> int:
        return sum([len(o.new_token_ids) async for o in loop.generate(req)])

    async def run(tag: str) -> int:
        reqs = requests(tag, ids, args.requests, args.max_tokens)
        return sum(await asyncio.gather(*(one(r) for r in reqs)))

    return run


def served_run(port: int, args: argparse.Namespace) -> Run:
    async def run(tag: str) -> int:
        n, max_tokens = args.requests, args.max_tokens
        return sum(await asyncio.gather(*(_stream_one(port, i, max_tokens) for i in range(n))))

    return run


async def _stream_one(port: int, seed: int, max_tokens: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps(
        {
            "model": MODEL_NAME,
            "prompt": PROMPT,
            "max_tokens": max_tokens,
            "seed": seed,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    data = bytearray()
    while chunk := await reader.read(1 << 16):
        data += chunk
    writer.close()
    m = USAGE.search(data)
    return int(m.group(1)) if m else 0


async def rounds(runs: dict[str, Run], num_rounds: int) -> dict[str, list[float]]:
    """tok/s per mode and round; one warm-up round first, not counted."""
    out: dict[str, list[float]] = {mode: [] for mode in runs}
    for rnd in range(num_rounds + 1):
        for mode, run in runs.items():
            t0 = time.perf_counter()
            n = await run(f"{mode.replace(' ', '-')}-{rnd}")
            if rnd:
                out[mode].append(n / (time.perf_counter() - t0))
    return out


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5, help="rounds (each mode runs once a round)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, every mode")
    p.add_argument("--kv-cache-memory", default="64MiB")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, from MODES")
    p.add_argument("flags", nargs="*", help="extra `tandem serve` flags (after --)")
    args = p.parse_args()
    modes = [m.strip() for m in args.modes.split(",")]
    engine_cfg = EngineConfig(kv_cache_memory=args.kv_cache_memory, num_threads=args.threads)
    flags = ["--kv-cache-memory", args.kv_cache_memory, "--num-threads", str(args.threads)]
    with ExitStack() as stack:
        offline = build_engine(engine_cfg, SchedulerConfig())
        ids = offline.tokenizer.encode(PROMPT)
        loops: dict[str, ServingLoop] = {}
        runs: dict[str, Run] = {"offline": offline_run(offline.core, ids, args)}
        if "loop thread" in modes:
            loops["loop thread"] = EngineLoop(build_engine(engine_cfg, SchedulerConfig()).core)
        if "loop process" in modes:
            loops["loop process"] = launch_engine_process(engine_cfg, SchedulerConfig()).loop
        for name in ("served thread", "served process"):
            if name in modes:
                mode_flag = (
                    "--engine-process" if name.endswith("process") else "--no-engine-process"
                )
                srv = stack.enter_context(TandemServer([*flags, mode_flag, *args.flags]))
                runs[name] = served_run(srv.port, args)

        async def measure() -> dict[str, list[float]]:
            for name, loop in loops.items():
                loop.start()
                stack.callback(loop.shutdown, 10)
                runs[name] = loop_run(loop, ids, args)
            return await rounds({m: runs[m] for m in MODES if m in runs}, args.runs)

        print(f"before: {load()}")
        results = asyncio.run(measure())
        print(f"after:  {load()}")
    report(results)


def report(results: dict[str, list[float]]) -> None:
    base = results["offline"]
    for name, values in results.items():
        ratio = statistics.median(v / b for v, b in zip(values, base, strict=True))
        med = statistics.median(values)
        runs = [round(v) for v in values]
        print(f"{name:15s} {med:7.0f} tok/s  {ratio:4.2f}x offline  runs: {runs}")


if __name__ == "__main__":
    main()
