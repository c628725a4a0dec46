"""Peer comparison: the same workloads against Tandem and another OpenAI-compatible
server (e.g. vLLM's CPU build), one after the other on this machine, and the ratios.

    python -m benchmarks.compare --model DIR --peer-name vllm \\
        --peer-cmd "/tmp/vllm-venv/bin/python -m vllm.entrypoints.openai.api_server \\
                    --model {model} --port {port} --max-model-len {max_model_len}" \\
        --peer-env VLLM_CPU_KVCACHE_SPACE=1 --result-json cmp.json

For each server and round (servers interleaved: T, P, T, P, ...):
  1. start-up: launch the command (its own process group), poll GET /health every
     0.1 s; seconds to the first 200.
  2. warm-up: a few short requests, not measured; then --single-requests one at a
     time (64 in, 64 out): TPOT with nothing else running.
  3. saturation: a burst of --sat-requests at once (fixed lengths, ignore_eos): output
     tokens/s and requests/s.
  4. mixed: Poisson at --mixed-rate, prompts long or short (mixed:SHORT:LONG:P): TTFT p99.
  5. stop: SIGTERM to the process group, SIGKILL after 30 s.
Commands are templates: {model}, {port}, {max_model_len}, {dtype}, {kv_gib}, {python}.
The targets printed are issue #8's: throughput ratio >= 1, TTFT p99 ratio <= 1,
start-up ratio <= 1/3 (Tandem / peer).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tandem.server.bench import BenchConfig, run_benchmark
from tandem.server.bench_metrics import parse_goodput
from tandem.server.bench_workload import WorkloadSpec, parse_arrival, parse_length

TANDEM_CMD = (
    "{python} -m tandem.server.cli serve {model} --port {port} --max-model-len {max_model_len}"
    " --dtype {dtype} --kv-cache-memory {kv_gib}GiB --log-level warning"
)
HEALTH_POLL_S = 0.1


@dataclass(slots=True)
class ServerSpec:
    """A server to measure."""

    name: str  # label in the tables
    cmd: list[str]  # argv, placeholders filled
    env: dict[str, str]  # added to this process's environment


class ServerProcess:
    """A server command in its own process group, stopped by that group's id."""

    def __init__(self, spec: ServerSpec, port: int, log_path: Path) -> None:
        self.spec, self.port, self.log_path = spec, port, log_path
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start_and_wait(self, timeout_s: float) -> float:
        """Seconds from launch to the first 200 from /health. Raises RuntimeError."""
        import httpx

        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.spec.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=os.environ | self.spec.env,
                start_new_session=True,
            )
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{self.spec.name} exited {self.proc.returncode}:\n{tail}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(HEALTH_POLL_S)
        raise RuntimeError(f"{self.spec.name} not healthy within {timeout_s:g} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        with contextlib.suppress(ProcessLookupError):  # children left in the group
            os.killpg(self.proc.pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workload_configs(args: argparse.Namespace, base_url: str) -> dict[str, BenchConfig]:
    """The three phases' configs (same seeds for every server)."""

    def cfg(n: int, inp: str, out: str, arrival: str, goodput: bool = False) -> BenchConfig:
        spec = WorkloadSpec(n, parse_length(inp), parse_length(out), seed=args.seed)
        return BenchConfig(
            base_url=base_url,
            workload=spec,
            arrival=parse_arrival(arrival),
            tokenizer=args.model,
            goodput=parse_goodput(args.goodput) if goodput else None,
            progress=False,
            timeout_s=args.request_timeout,
        )

    return {
        "warmup": cfg(4, "constant:16", "constant:8", "concurrency:2"),
        "single": cfg(args.single_requests, "constant:64", "constant:64", "concurrency:1"),
        "saturation": cfg(args.sat_requests, args.sat_input, args.sat_output, "burst"),
        "mixed": cfg(
            args.mixed_requests,
            args.mixed_input,
            args.mixed_output,
            f"poisson:{args.mixed_rate}",
            goodput=True,
        ),
    }


def measure(spec: ServerSpec, args: argparse.Namespace, log_dir: Path) -> dict:
    """Start, warm up, run saturation and mixed, stop. Failures are recorded, not raised."""
    port = free_port()
    spec = ServerSpec(spec.name, [a.replace("{port}", str(port)) for a in spec.cmd], spec.env)
    server = ServerProcess(spec, port, log_dir / f"{spec.name}-{port}.log")
    out: dict = {"server": spec.name, "cmd": shlex.join(spec.cmd), "env": spec.env}
    try:
        out["startup_s"] = server.start_and_wait(args.start_timeout)
        for phase, cfg in workload_configs(args, server.base_url).items():
            print(f"  {spec.name}: {phase} ...", file=sys.stderr, flush=True)
            res = run_benchmark(cfg)
            if phase != "warmup":
                out[phase] = res["summary"]
    except RuntimeError as exc:
        out["error"] = str(exc)
    finally:
        server.stop()
    return out


def headline(run: dict) -> dict[str, float | None]:
    """The three target numbers of one run (None where the phase failed)."""
    sat, mixed, single = run.get("saturation"), run.get("mixed"), run.get("single")
    return {
        "startup_s": run.get("startup_s"),
        "sat_tok_s": sat["output_throughput"] if sat and sat["completed"] else None,
        "sat_req_s": sat["request_throughput"] if sat and sat["completed"] else None,
        "mixed_ttft_p50_ms": mixed["ttft_ms"]["median"] if mixed else None,
        "mixed_ttft_p99_ms": mixed["ttft_ms"]["p99"] if mixed else None,
        "single_tpot_ms": single["tpot_ms"]["median"] if single else None,
        "failed": sum(run[p]["failed"] for p in ("single", "saturation", "mixed") if p in run),
    }


def medians(runs: list[dict]) -> dict[str, float | None]:
    heads = [headline(r) for r in runs]
    keys = heads[0].keys()
    return {
        k: statistics.median(v) if (v := [h[k] for h in heads if h[k] is not None]) else None
        for k in keys
    }


def ratios(t: dict, p: dict) -> dict[str, dict]:
    """Tandem / peer for each target, with the target and whether it is met."""

    def r(key: str, target: float, higher_better: bool) -> dict:
        if t[key] is None or not p[key]:
            return {"ratio": None, "target": target, "met": None}
        ratio = t[key] / p[key]
        return {
            "ratio": ratio,
            "target": target,
            "met": ratio >= target if higher_better else ratio <= target,
        }

    return {
        "saturation_throughput": r("sat_tok_s", 1.0, True),
        "mixed_ttft_p99": r("mixed_ttft_p99_ms", 1.0, False),
        "startup": r("startup_s", 1 / 3, False),
    }


def format_tables(summary: dict[str, dict], rat: dict[str, dict]) -> str:
    def f(x: float | None, fmt: str) -> str:
        return "n/a" if x is None else format(x, fmt)

    lines = [
        "| server | start-up s | sat tok/s | sat req/s | mixed TTFT p50 ms "
        "| mixed TTFT p99 ms | c=1 TPOT ms | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in summary.items():
        lines.append(
            f"| {name} | {f(m['startup_s'], '.1f')} | {f(m['sat_tok_s'], '.1f')} | "
            f"{f(m['sat_req_s'], '.2f')} | {f(m['mixed_ttft_p50_ms'], '.0f')} | "
            f"{f(m['mixed_ttft_p99_ms'], '.0f')} | {f(m['single_tpot_ms'], '.1f')} | "
            f"{f(m['failed'], '.0f')} |"
        )
    lines += ["", "| target (Tandem / peer) | ratio | target | met |", "|---|---:|---:|---|"]
    for name, v in rat.items():
        op = ">=" if name == "saturation_throughput" else "<="
        lines.append(f"| {name} | {f(v['ratio'], '.2f')} | {op} {v['target']:.2f} | {v['met']} |")
    return "\n".join(lines)


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"compare: error: --peer-env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model dir served by both")
    p.add_argument("--tandem-cmd", default=TANDEM_CMD)
    p.add_argument("--tandem-env", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--peer-name", default="peer")
    p.add_argument("--peer-cmd", required=True, help="command template (see above)")
    p.add_argument("--peer-env", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kv-gib", type=float, default=1.0, help="KV cache space for both (GiB)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--single-requests", type=int, default=4, help="one at a time, 64/64")
    p.add_argument("--sat-requests", type=int, default=64)
    p.add_argument("--sat-input", default="constant:128")
    p.add_argument("--sat-output", default="constant:128")
    p.add_argument("--mixed-requests", type=int, default=40)
    p.add_argument("--mixed-input", default="mixed:32:512:0.2")
    p.add_argument("--mixed-output", default="constant:32")
    p.add_argument("--mixed-rate", type=float, default=1.0, help="Poisson requests/s")
    p.add_argument("--goodput", nargs=2, default=["ttft:1000", "tpot:100"])
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--result-json", default=None)
    return p


def fill(template: str, args: argparse.Namespace) -> list[str]:
    """argv from a template; {port} is left for `measure` to fill."""
    kv = f"{args.kv_gib:g}"
    values = {
        "model": args.model,
        "max_model_len": str(args.max_model_len),
        "dtype": args.dtype,
        "kv_gib": kv,
        "python": sys.executable,
        "port": "{port}",
    }
    return [a.format(**values) for a in shlex.split(template)]


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    specs = [
        ServerSpec("tandem", fill(args.tandem_cmd, args), parse_env(args.tandem_env)),
        ServerSpec(args.peer_name, fill(args.peer_cmd, args), parse_env(args.peer_env)),
    ]
    runs: dict[str, list[dict]] = {s.name: [] for s in specs}
    log_dir = Path(tempfile.mkdtemp(prefix="tandem-compare-"))
    for rnd in range(args.rounds):
        for spec in specs:
            print(f"round {rnd + 1}/{args.rounds}: {spec.name}", file=sys.stderr, flush=True)
            runs[spec.name].append(measure(spec, args, log_dir))
            if "error" in runs[spec.name][-1]:
                print(f"  {spec.name} failed: {runs[spec.name][-1]['error']}", file=sys.stderr)
    summary = {name: medians(rs) for name, rs in runs.items()}
    rat = ratios(summary["tandem"], summary[args.peer_name])
    print(format_tables(summary, rat))
    print(f"server logs: {log_dir}")
    if args.result_json:
        doc = {"args": vars(args), "runs": runs, "medians": summary, "ratios": rat}
        Path(args.result_json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
