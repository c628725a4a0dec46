"""`tandem bench serve` (and `benchmarks/serve.py`): a load generator for any
OpenAI-compatible server.

One asyncio event loop sends a seeded workload (see `bench_workload`) as streaming
requests to /v1/completions or /v1/chat/completions, times each one (TTFT, ITL, TPOT,
e2e), counts output tokens from the server's `usage` and cross-checks them against the
streamed chunks, and prints a report (`bench_metrics`). Its own CPU time is reported
too: on a small machine the client competes with the server it measures.

    tandem bench serve --base-url http://127.0.0.1:8000 --num-prompts 64 \\
        --input-len uniform:32:256 --output-len constant:64 --arrival poisson:4 \\
        --ignore-eos --goodput ttft:500 tpot:50 --result-json run.json
    tandem bench serve --plot latency.png run1.json run2.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tandem.server.bench_client import RequestResult, http_request, request_body, send_request
from tandem.server.bench_metrics import (
    Goodput,
    first_errors,
    format_report,
    parse_goodput,
    summarize,
)
from tandem.server.bench_workload import (
    Arrival,
    BenchRequest,
    PromptSource,
    TokenizerPrompts,
    WordPrompts,
    WorkloadSpec,
    build_workload,
    parse_arrival,
    parse_length,
)


@dataclass(slots=True, frozen=True)
class BenchConfig:
    """One benchmark run."""

    base_url: str  # server root, e.g. http://127.0.0.1:8000 (no /v1)
    workload: WorkloadSpec  # what to send
    arrival: Arrival  # when to send it
    endpoint: str = "completions"  # "completions" or "chat"
    model: str | None = None  # the `model` field; None = the first of GET /v1/models
    tokenizer: str | None = None  # model dir whose tokenizer.json sizes prompts; None = words
    ignore_eos: bool = True  # ask for exactly max_tokens (an extra body field)
    goodput: Goodput | None = None  # SLO targets for goodput; None = not reported
    api_key: str | None = None  # sent as a Bearer token
    timeout_s: float = 600.0  # per request, send to end of stream
    progress: bool = True  # a tqdm bar on stderr
    label: str | None = None  # names the run's line in --plot; None = model @ base_url

    def __post_init__(self) -> None:
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be completions or chat, got {self.endpoint!r}")
        if self.workload.num_requests < 1:
            raise ValueError("the workload needs at least one request")


def run_benchmark(cfg: BenchConfig) -> dict:
    """Run the workload; returns the result dict (summary + config + per-request)."""
    prompts: PromptSource = TokenizerPrompts(cfg.tokenizer) if cfg.tokenizer else WordPrompts()
    requests = build_workload(cfg.workload, prompts, cfg.arrival)
    cpu0 = time.process_time()
    results, duration, model = asyncio.run(_run(cfg, requests))
    cpu = time.process_time() - cpu0
    summary = summarize(results, duration, cfg.goodput)
    summary["client_cpu_s"] = cpu
    summary["client_cpu_fraction"] = cpu / max(duration, 1e-9)
    summary["first_errors"] = first_errors(results)
    return {
        "config": _config_json(cfg, model),
        "summary": summary,
        "requests": [asdict(r) for r in results],
    }


async def _run(cfg: BenchConfig, requests: list[BenchRequest]) -> tuple[list, float, str]:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    model = cfg.model or await fetch_model(cfg.base_url, headers)
    path = "/v1/chat/completions" if cfg.endpoint == "chat" else "/v1/completions"
    bar = _progress(len(requests), cfg.progress)
    limit = int(cfg.arrival.value) if cfg.arrival.kind == "concurrency" else len(requests)
    gate = asyncio.Semaphore(limit)
    t0 = time.perf_counter()

    async def one(req: BenchRequest) -> RequestResult:
        delay = req.arrival_s - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        async with gate:
            body = request_body(req, model, cfg.endpoint == "chat", cfg.ignore_eos)
            try:
                async with asyncio.timeout(cfg.timeout_s):
                    res = await send_request(cfg.base_url, path, body, headers, t0, req.index)
            except TimeoutError:
                res = RequestResult(req.index, 0, error=f"timed out after {cfg.timeout_s:g} s")
        if bar is not None:
            bar.update(1)
        return res

    try:
        results = await asyncio.gather(*(one(r) for r in requests))
    finally:
        if bar is not None:
            bar.close()
    return list(results), time.perf_counter() - t0, model


async def fetch_model(base_url: str, headers: dict[str, str]) -> str:
    """The first model id of GET /v1/models. Raises RuntimeError if there is none."""
    resp = await http_request(base_url, "GET", "/v1/models", None, headers)
    try:
        raw = await resp.read()
    finally:
        resp.close()
    try:
        return str(json.loads(raw)["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise RuntimeError(
            f"GET {base_url}/v1/models gave {resp.status}, no model id: {raw[:200]!r}"
        ) from None


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req", file=sys.stderr)


def _config_json(cfg: BenchConfig, model: str) -> dict:
    out = asdict(cfg)
    out["model"] = model
    out["arrival"] = cfg.arrival.label()
    out["request_rate"] = cfg.arrival.value if cfg.arrival.kind == "poisson" else None
    return out


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tandem bench serve",
        description="Load-test an OpenAI-compatible server (streaming; TTFT/TPOT/ITL/e2e).",
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, no /v1")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--model", default=None, help="model field (default: from /v1/models)")
    p.add_argument("--num-prompts", type=int, default=100, help="requests to send")
    p.add_argument(
        "--input-len",
        default="constant:128",
        help="constant:N | uniform:LO:HI | normal:MEAN:STD | mixed:SHORT:LONG:P (prompt tokens)",
    )
    p.add_argument("--output-len", default="constant:128", help="same forms (max_tokens)")
    p.add_argument("--dataset", default=None, help='JSONL of {"prompt": ..., "output_len"?: N}')
    p.add_argument("--tokenizer", default=None, help="model dir: size prompts in its tokens")
    p.add_argument("--arrival", default="burst", help="burst | concurrency:N | poisson:RATE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="let requests stop at EOS (default: ignore_eos=true, fixed lengths)",
    )
    p.add_argument("--goodput", nargs=2, metavar=("ttft:MS", "tpot:MS"), default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--result-json", default=None, help="write the results here")
    p.add_argument("--label", default=None, help="series name for --plot")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument(
        "--plot",
        nargs="+",
        metavar=("OUT.png", "RESULT.json"),
        default=None,
        help="no run: plot latency vs request rate from result files into OUT.png",
    )
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Raises ValueError with a one-line message on a bad value."""
    spec = WorkloadSpec(
        num_requests=args.num_prompts,
        input_len=parse_length(args.input_len),
        output_len=parse_length(args.output_len),
        seed=args.seed,
        dataset=args.dataset,
    )
    return BenchConfig(
        base_url=args.base_url.rstrip("/"),
        workload=spec,
        arrival=parse_arrival(args.arrival),
        endpoint=args.endpoint,
        model=args.model,
        tokenizer=args.tokenizer,
        ignore_eos=args.ignore_eos,
        goodput=parse_goodput(args.goodput) if args.goodput else None,
        api_key=args.api_key,
        timeout_s=args.timeout,
        progress=args.progress,
        label=args.label,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        if args.plot is not None:
            return _plot(args.plot)
        cfg = config_from_args(args)
        result = run_benchmark(cfg)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"tandem bench serve: error: {exc}", file=sys.stderr)
        return 2
    s = result["summary"]
    print(format_report(s))
    print(
        f"client CPU: {s['client_cpu_s']:.2f} s ({100 * s['client_cpu_fraction']:.0f}% "
        "of one core over the run)"
    )
    for msg in s["first_errors"]:
        print(f"error: {msg}")
    if args.result_json:
        Path(args.result_json).write_text(json.dumps(result, indent=1))
    return 0 if s["completed"] else 1


def _plot(paths: list[str]) -> int:
    from tandem.server.bench_plot import plot_latency_vs_rate

    if len(paths) < 2:
        raise ValueError("--plot needs OUT.png and at least one RESULT.json")
    plot_latency_vs_rate(paths[1:], paths[0])
    print(f"wrote {paths[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
