"""Benchmark maths: latency percentiles, TPOT, goodput and the summary of a run.

All latencies in the summary are milliseconds; throughputs per second of the run's
wall time (first send to last response).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from tandem.server.bench_client import RequestResult

PERCENTILES = (50, 95, 99)


@dataclass(slots=True, frozen=True)
class Goodput:
    """SLO targets: a request is good when both hold (DistServe's goodput)."""

    ttft_ms: float  # time to first token at most this
    tpot_ms: float  # mean time per output token after the first at most this


def parse_goodput(items: list[str]) -> Goodput:
    """`["ttft:500", "tpot:50"]` (milliseconds; both needed). Raises ValueError."""
    targets: dict[str, float] = {}
    for item in items:
        key, _, raw = item.partition(":")
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if key not in ("ttft", "tpot") or value <= 0:
            raise ValueError(f"bad goodput target {item!r}: expected ttft:MS and tpot:MS (> 0)")
        targets[key] = value
    if set(targets) != {"ttft", "tpot"}:
        raise ValueError("goodput needs both ttft:MS and tpot:MS")
    return Goodput(targets["ttft"], targets["tpot"])


def stats_ms(values_s: list[float]) -> dict[str, float | None]:
    """mean, median, p95, p99 (linear interpolation) of seconds, in ms; None if empty."""
    if not values_s:
        return {"mean": None, "median": None, "p95": None, "p99": None}
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(arr, PERCENTILES)
    return {"mean": float(arr.mean()), "median": float(p50), "p95": float(p95), "p99": float(p99)}


def tpot_s(r: RequestResult) -> float | None:
    """(e2e - ttft) / (output tokens - 1); None for fewer than 2 tokens. Output tokens
    from usage, else the streamed chunk count."""
    tokens = r.completion_tokens if r.completion_tokens is not None else r.num_chunks
    if r.ttft_s is None or r.e2e_s is None or tokens < 2:
        return None
    return (r.e2e_s - r.ttft_s) / (tokens - 1)


def is_good(r: RequestResult, target: Goodput) -> bool:
    """Succeeded, TTFT within target, and TPOT within target (vacuous for 1 token)."""
    if not r.ok or r.ttft_s is None or r.ttft_s * 1000.0 > target.ttft_ms:
        return False
    t = tpot_s(r)
    return t is None or t * 1000.0 <= target.tpot_ms


def summarize(results: list[RequestResult], duration_s: float, goodput: Goodput | None) -> dict:
    """The run's numbers as a JSON-ready dict (see README "Benchmarking")."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(_out_tokens(r) for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    dur = max(duration_s, 1e-9)
    mismatches = [
        r.index
        for r in ok
        if r.completion_tokens is not None and r.completion_tokens != r.num_chunks
    ]
    summary: dict = {
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors_by_status": _errors_by_status(results),
        "duration_s": duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / dur,
        "output_throughput": out_tokens / dur,
        "ttft_ms": stats_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": stats_ms([t for r in ok if (t := tpot_s(r)) is not None]),
        "itl_ms": stats_ms([g for r in ok for g in r.itl_s]),
        "e2e_ms": stats_ms([r.e2e_s for r in ok if r.e2e_s is not None]),
        "missing_usage": sum(1 for r in ok if r.completion_tokens is None),
        "usage_chunk_mismatches": len(mismatches),
        "usage_chunk_mismatch_indices": mismatches[:20],
        # > 1: the server sent several tokens in one chunk (ITL then spans chunks)
        "tokens_per_chunk": out_tokens / max(1, sum(r.num_chunks for r in ok)),
    }
    if goodput is not None:
        good = sum(1 for r in results if is_good(r, goodput))
        summary["goodput"] = {
            "ttft_ms": goodput.ttft_ms,
            "tpot_ms": goodput.tpot_ms,
            "fraction": good / len(results) if results else 0.0,
            "rate": good / dur,
        }
    return summary


def _out_tokens(r: RequestResult) -> int:
    return r.completion_tokens if r.completion_tokens is not None else r.num_chunks


def _errors_by_status(results: list[RequestResult]) -> dict[str, int]:
    """Failed requests by HTTP status ("0" = no response), with the first message."""
    counts = Counter(str(r.status) for r in results if not r.ok)
    return dict(sorted(counts.items()))


def first_errors(results: list[RequestResult], limit: int = 3) -> list[str]:
    """A few distinct error messages, for the report."""
    seen: list[str] = []
    for r in results:
        msg = f"{r.status}: {r.error}"
        if not r.ok and msg not in seen:
            seen.append(msg)
        if len(seen) == limit:
            break
    return seen


def format_report(summary: dict) -> str:
    """A fixed-width text table of a summary."""
    rows = [
        ("requests ok / failed", f"{summary['completed']} / {summary['failed']}"),
        ("errors by status", str(summary["errors_by_status"] or "none")),
        ("duration (s)", f"{summary['duration_s']:.2f}"),
        (
            "input / output tokens",
            f"{summary['total_input_tokens']} / {summary['total_output_tokens']}",
        ),
        ("request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
        ("output throughput (tok/s)", f"{summary['output_throughput']:.1f}"),
    ]
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = summary[name]
        if s["mean"] is None:
            rows.append((f"{name[:-3].upper()} (ms)", "n/a"))
            continue
        vals = " / ".join(f"{s[k]:.1f}" for k in ("mean", "median", "p95", "p99"))
        rows.append((f"{name[:-3].upper()} mean/med/p95/p99 (ms)", vals))
    if "goodput" in summary:
        g = summary["goodput"]
        rows.append(
            (
                f"goodput (ttft<={g['ttft_ms']:g}, tpot<={g['tpot_ms']:g} ms)",
                f"{100 * g['fraction']:.1f}% of requests, {g['rate']:.2f} req/s",
            )
        )
    rows.append(
        (
            "usage vs chunks mismatches",
            f"{summary['usage_chunk_mismatches']} requests (no usage: {summary['missing_usage']};"
            f" {summary['tokens_per_chunk']:.2f} tokens per chunk)",
        )
    )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
