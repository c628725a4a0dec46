"""Served vs offline throughput on the same workload (a measurement, not a test).

    .venv/bin/python tests/e2e/serving_speed.py [--requests 64] [--max-tokens 128] [-- FLAGS]

Offline: the engine core stepped directly (no threads, no HTTP). Loop: the same
requests through the EngineLoop thread, no HTTP. Served: `tandem serve` in a
subprocess and N concurrent streaming /v1/completions over raw sockets (the client
parses only the final usage chunk, so it takes little CPU from the server). Prints
tokens/s of each (median of `--runs`) and the served/offline ratio. Run it on a quiet
machine: other processes on the same cores skew the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from openai_server_harness import MODEL_NAME, TandemServer  # noqa: E402

from tandem.engine.config import EngineConfig  # noqa: E402
from tandem.engine.plan import SamplingParams  # noqa: E402
from tandem.scheduler.config import SchedulerConfig  # noqa: E402
from tandem.scheduler.loop import EngineLoop  # noqa: E402
from tandem.scheduler.request import GenerateRequest  # noqa: E402
from tandem.server.build import build_engine  # noqa: E402

PROMPT = "ROMEO:"
USAGE = re.compile(rb'"usage":\{"prompt_tokens":\d+,"completion_tokens":(\d+)')


def requests(tag: str, ids: list[int], n: int, max_tokens: int) -> list[GenerateRequest]:
    params = [SamplingParams(max_tokens=max_tokens, seed=i, ignore_eos=True) for i in range(n)]
    return [GenerateRequest(f"{tag}-{i}", ids, p) for i, p in enumerate(params)]


def offline(args: argparse.Namespace, threads: int) -> tuple[list[float], list[float]]:
    built = build_engine(
        EngineConfig(kv_cache_memory=args.kv_cache_memory, num_threads=threads), SchedulerConfig()
    )
    ids = built.tokenizer.encode(PROMPT)
    direct = []
    for run in range(args.runs):
        for r in requests(f"o{run}", ids, args.requests, args.max_tokens):
            built.core.add_request(r)
        t0, n = time.perf_counter(), 0
        while built.core.has_unfinished():
            n += sum(len(o.new_token_ids) for o in built.core.step())
        direct.append(n / (time.perf_counter() - t0))

    async def via_loop() -> list[float]:
        loop = EngineLoop(built.core)
        loop.start()

        async def one(req: GenerateRequest) -> int:
            return sum([len(o.new_token_ids) async for o in loop.generate(req)])

        out = []
        for run in range(args.runs):
            t0 = time.perf_counter()
            reqs = requests(f"l{run}", ids, args.requests, args.max_tokens)
            n = sum(await asyncio.gather(*(one(r) for r in reqs)))
            out.append(n / (time.perf_counter() - t0))
        loop.shutdown(10)
        return out

    return direct, asyncio.run(via_loop())


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


def served(args: argparse.Namespace, threads: int) -> list[float]:
    flags = ["--kv-cache-memory", args.kv_cache_memory, "--num-threads", str(threads)]
    out = []
    with TandemServer(flags + args.flags) as srv:
        for run in range(args.runs + 1):  # the first run warms up
            t0 = time.perf_counter()
            counts = asyncio.run(_gather(srv.port, args.requests, args.max_tokens))
            if run:
                out.append(sum(counts) / (time.perf_counter() - t0))
    return out


async def _gather(port: int, n: int, max_tokens: int) -> list[int]:
    return await asyncio.gather(*(_stream_one(port, i, max_tokens) for i in range(n)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads, both modes")
    p.add_argument("--kv-cache-memory", default="64MiB")
    p.add_argument("flags", nargs="*", help="extra `tandem serve` flags (after --)")
    args = p.parse_args()
    direct, loop = offline(args, args.threads)
    http = served(args, args.threads)
    med = {
        k: statistics.median(v) for k, v in (("offline", direct), ("loop", loop), ("served", http))
    }
    for name, values in (("offline", direct), ("loop", loop), ("served", http)):
        print(f"{name:8s} {med[name]:7.0f} tok/s  runs: {[round(v) for v in values]}")
    print(
        f"served/offline {med['served'] / med['offline']:.2f}   loop/offline "
        f"{med['loop'] / med['offline']:.2f}"
    )


if __name__ == "__main__":
    main()
