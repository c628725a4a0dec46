"""Speculative decoding over HTTP: latency and throughput by policy and concurrency.

    .venv/bin/python -m benchmarks.spec_serving                   # every config, c = 1 4 16 64
    .venv/bin/python -m benchmarks.spec_serving --configs off draft-goodput --conc 1 4 --runs 3

For each configuration it starts `tandem serve` (the built-in pair) in a subprocess,
and for each concurrency c runs a closed loop: c clients, each sending its next
request as soon as the previous one completes (non-streaming /v1/completions, greedy,
`--max-tokens` tokens, ignore_eos). The first c requests warm up (the goodput
controller learns the step costs) and are not measured; then `--requests-per-client`
more per client are. Columns: mean request latency, output tokens/s over the measured
window, and speedups against "off" at the same c. Medians over `--runs` (each run a
fresh server per configuration, configurations interleaved). The client is raw
asyncio sockets, so it takes little of the CPU the server runs on.

Prints a Markdown table for benchmarks/RESULTS.md and the command line that made it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

CONFIGS: dict[str, list[str]] = {
    "off": [],
    "draft-fixed": ["--speculative-method", "draft", "--speculation-policy", "fixed"],
    "draft-goodput": ["--speculative-method", "draft", "--speculation-policy", "goodput"],
    "ngram-fixed": ["--speculative-method", "ngram", "--speculation-policy", "fixed"],
    "ngram-goodput": ["--speculative-method", "ngram", "--speculation-policy", "goodput"],
}
PROMPTS = [
    "ROMEO:\nWhat light through yonder window breaks?",
    "First Citizen:\n",
    "KING RICHARD III:\nNow is the winter of our discontent",
    "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?",
    "MENENIUS:\nI tell you, friends,",
    "HAMLET:\nTo be, or not to be",
    "LADY MACBETH:\nOut, damned spot!",
    "DUKE VINCENTIO:\n",
]


@dataclass
class Measure:
    latency_s: float  # mean over measured requests
    tokens_per_s: float  # output tokens / measured wall time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`tandem serve` in its own process group, stopped by its group id."""

    def __init__(self, flags: list[str]) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "tandem.server.cli", "serve", "--port", str(self.port)]
        cmd += ["--log-level", "warning", *flags]
        self.proc = subprocess.Popen(cmd, start_new_session=True)
        deadline = time.monotonic() + 180
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start: {' '.join(cmd)}")
            time.sleep(0.25)

    def _healthy(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return s.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


async def one_request(port: int, prompt: str, max_tokens: int) -> int:
    """POST /v1/completions; returns completion tokens."""
    body = json.dumps(
        {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    ).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + body)
    await writer.drain()
    data = await reader.read()
    writer.close()
    status = data.split(b" ", 2)[1]
    if status != b"200":
        raise RuntimeError(f"HTTP {status.decode()}: {data[-300:]!r}")
    usage = json.loads(data.split(b"\r\n\r\n", 1)[1])["usage"]
    return int(usage["completion_tokens"])


async def closed_loop(port: int, conc: int, per_client: int, max_tokens: int) -> Measure:
    latencies: list[float] = []
    tokens = 0

    async def client(i: int, n: int, measure: bool) -> None:
        nonlocal tokens
        for j in range(n):
            t0 = time.perf_counter()
            got = await one_request(port, PROMPTS[(i + j * conc) % len(PROMPTS)], max_tokens)
            if measure:
                latencies.append(time.perf_counter() - t0)
                tokens += got

    await asyncio.gather(*(client(i, 1, False) for i in range(conc)))  # warm-up
    t0 = time.perf_counter()
    await asyncio.gather(*(client(i, per_client, True) for i in range(conc)))
    return Measure(statistics.mean(latencies), tokens / (time.perf_counter() - t0))


def run(args: argparse.Namespace) -> dict[tuple[str, int], list[Measure]]:
    out: dict[tuple[str, int], list[Measure]] = {}
    for r in range(args.runs):
        for name in args.configs:
            server = Server(CONFIGS[name] + args.server_flags)
            try:
                for c in args.conc:
                    m = asyncio.run(
                        closed_loop(server.port, c, args.requests_per_client, args.max_tokens)
                    )
                    out.setdefault((name, c), []).append(m)
                    print(
                        f"run {r} {name:14s} c={c:3d} latency {m.latency_s * 1000:8.1f} ms "
                        f"{m.tokens_per_s:8.1f} tok/s",
                        file=sys.stderr,
                        flush=True,
                    )
            finally:
                server.stop()
    return out


def table(results: dict[tuple[str, int], list[Measure]], configs: list[str], conc: list[int]):
    lines = [
        "| config | c | mean latency (ms) | output tok/s | latency speedup vs off "
        "| tok/s vs off | latency spread (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in conc:
        base = results.get(("off", c))
        base_lat = statistics.median(m.latency_s for m in base) if base else None
        base_tps = statistics.median(m.tokens_per_s for m in base) if base else None
        for name in configs:
            ms = results[(name, c)]
            lat = statistics.median(m.latency_s for m in ms)
            tps = statistics.median(m.tokens_per_s for m in ms)
            spread = (max(m.latency_s for m in ms) - min(m.latency_s for m in ms)) * 1000
            lat_x = f"{base_lat / lat:.2f}x" if base_lat else "-"
            tps_x = f"{tps / base_tps:.2f}x" if base_tps else "-"
            lines.append(
                f"| {name} | {c} | {lat * 1000:.1f} | {tps:.1f} | {lat_x} | {tps_x} | "
                f"{spread:.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--conc", nargs="+", type=int, default=[1, 4, 16, 64])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument(
        "server_flags",
        nargs=argparse.REMAINDER,
        help="after --: extra `tandem serve` flags for every config",
    )
    args = p.parse_args(argv)
    args.server_flags = [f for f in args.server_flags if f != "--"]
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    results = run(args)
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[:3]
    print(f"command: python -m benchmarks.spec_serving {' '.join(argv or sys.argv[1:])}")
    print(f"load average before {' '.join(load_before)}, after {' '.join(load_after)}\n")
    print(table(results, args.configs, args.conc))


if __name__ == "__main__":
    main()
