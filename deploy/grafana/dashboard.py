"""Generates deploy/grafana/tandem.json, the Tandem dashboard for Grafana 10+.

    python deploy/grafana/dashboard.py          # rewrites tandem.json next to this file

The JSON is the deliverable (import it, or let compose provision it); this script is
its source, and tests/deploy checks that the two agree. Every query selects
`model_name=~"$model_name"` and reads a family Tandem exports from start-up.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SEL = 'model_name=~"$model_name"'
RI = "$__rate_interval"
DS = {"type": "prometheus", "uid": "${datasource}"}
QUANTILES = (0.5, 0.95, 0.99)


def rate(metric: str, extra: str = "") -> str:
    sel = SEL + (f", {extra}" if extra else "")
    return f"rate({metric}{{{sel}}}[{RI}])"


def total(metric: str, extra: str = "", by: str = "") -> str:
    """sum [by (...)] of a counter's rate."""
    return f"sum{f' by ({by})' if by else ''} ({rate(metric, extra)})"


def quantile(q: float, hist: str) -> str:
    return f"histogram_quantile({q}, sum by (le) ({rate(hist + '_bucket')}))"


def mean(hist: str) -> str:
    return f"{total(hist + '_sum')} / {total(hist + '_count')}"


def quantile_targets(hist: str, qs: tuple[float, ...] = QUANTILES) -> list[tuple[str, str]]:
    return [(quantile(q, hist), f"p{round(q * 100)}") for q in qs]


class Layout:
    """Places panels left to right in rows of 24 columns; ids in order."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = 0
        self.y = 0
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        if self.x:
            self.x, self.y = 0, self.y + 8
        grid = {"h": 1, "w": 24, "x": 0, "y": self.y}
        self.panels.append(
            {"type": "row", "title": title, "id": self._id(), "collapsed": False}
            | {"gridPos": grid, "panels": []}
        )
        self.y += 1

    def panel(
        self,
        title: str,
        targets: list[tuple[str, str]],
        unit: str,
        description: str,
        kind: str = "timeseries",
        width: int = 8,
        thresholds: list[tuple[float | None, str]] | None = None,
    ) -> None:
        if self.x + width > 24:
            self.x, self.y = 0, self.y + 8
        steps = [{"value": v, "color": c} for v, c in (thresholds or [(None, "green")])]
        self.panels.append(
            {
                "type": kind,
                "title": title,
                "description": description,
                "id": self._id(),
                "datasource": DS,
                "gridPos": {"h": 8, "w": width, "x": self.x, "y": self.y},
                "fieldConfig": {
                    "defaults": {
                        "unit": unit,
                        "thresholds": {"mode": "absolute", "steps": steps},
                    },
                    "overrides": [],
                },
                "options": _options(kind),
                "targets": [
                    {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
                    | {"datasource": DS, "range": True}
                    for i, (expr, legend) in enumerate(targets)
                ],
            }
        )
        self.x += width


def _options(kind: str) -> dict[str, Any]:
    if kind == "stat":
        reduce = {"calcs": ["lastNotNull"], "fields": "", "values": False}
        return {"reduceOptions": reduce, "colorMode": "background", "graphMode": "area"}
    legend = {"displayMode": "list", "placement": "bottom", "showLegend": True}
    return {"legend": legend, "tooltip": {"mode": "multi", "sort": "none"}}


def latency_row(d: Layout) -> None:
    d.row("Latency")
    d.panel(
        "Time to first token",
        quantile_targets("tandem:time_to_first_token_seconds"),
        "s",
        "Arrival to the first generated token (queue + prefill), per engine request.",
    )
    d.panel(
        "Inter-token latency",
        quantile_targets("tandem:inter_token_latency_seconds"),
        "s",
        "Time per output token after the first (accepted drafts spread evenly).",
    )
    d.panel(
        "End-to-end latency",
        quantile_targets("tandem:e2e_request_latency_seconds"),
        "s",
        "Arrival to the end of the request.",
    )
    phases = ("queue", "prefill", "decode", "inference")
    d.panel(
        "Request phases (mean)",
        [(mean(f"tandem:request_{p}_time_seconds"), p) for p in phases],
        "s",
        "queue: arrival to first admission; prefill: admission to first token; decode: "
        "first to last token; inference: admission to last token.",
        width=12,
    )
    d.panel(
        "Queue time",
        quantile_targets("tandem:request_queue_time_seconds"),
        "s",
        "Arrival to the engine's first admission of the request.",
        width=12,
    )


def throughput_row(d: Layout) -> None:
    d.row("Throughput")
    d.panel(
        "Tokens per second",
        [
            (total("tandem:prompt_tokens_total"), "prompt"),
            (total("tandem:generation_tokens_total"), "generation (ended requests)"),
            (total("tandem:step_generated_tokens_total"), "sampled by steps"),
        ],
        "short",
        "Prompt tokens admitted, tokens of ended requests, and tokens sampled by engine steps.",
    )
    d.panel(
        "Engine tokens per second by kind",
        [(total("tandem:step_tokens_total", by="kind"), "{{kind}}")],
        "short",
        "Tokens computed by steps: prefill chunks, decodes, and draft tokens verified.",
    )
    d.panel(
        "Requests per second by finish reason",
        [(total("tandem:request_success_total", by="finished_reason"), "{{finished_reason}}")],
        "reqps",
        "Engine requests that ended: stop, length, abort (cancelled, disconnected, failed).",
    )
    d.panel(
        "Goodput",
        [
            (
                f"{total('tandem:step_generated_tokens_total')} / "
                f"{total('tandem:step_seconds_total')}",
                "tokens per busy second",
            ),
            (f"tandem:goodput_tokens_per_second{{{SEL}}}", "recent steps {{instance}}"),
        ],
        "short",
        "Generated tokens per second of engine step time: what speculation maximises.",
        width=12,
    )
    d.panel(
        "Request lengths (median)",
        [
            (quantile(0.5, "tandem:request_prompt_tokens"), "prompt"),
            (quantile(0.5, "tandem:request_generation_tokens"), "generation"),
        ],
        "short",
        "Median prompt and generation tokens per ended request.",
        width=12,
    )
    d.panel(
        "Overlapped decode: guesses per second",
        [(total("tandem:overlap_guesses_total", by="outcome"), "{{outcome}}")],
        "short",
        "With --overlap-decode: next steps queued ahead whose results were taken, and "
        "those dropped because the plan changed. Mostly taken, or the flag does not pay.",
        width=24,
    )


def queue_row(d: Layout) -> None:
    d.row("Queue and batch")
    d.panel(
        "Requests running and waiting",
        [
            (f"sum(tandem:num_requests_running{{{SEL}}})", "running"),
            (f"sum(tandem:num_requests_waiting{{{SEL}}})", "waiting"),
        ],
        "short",
        "Running: holding KV blocks and stepped. Waiting: queued for admission (429 when full).",
    )
    per_step = (
        f"{total('tandem:step_tokens_total', by='kind')} / ignoring(kind) group_left() "
        f"{total('tandem:engine_steps_total')}"
    )
    d.panel(
        "Tokens per step",
        [
            (per_step, "{{kind}} (mean)"),
            (quantile(0.95, "tandem:iteration_tokens"), "all kinds p95"),
            (f"max(tandem:token_budget{{{SEL}}})", "token budget"),
        ],
        "short",
        "Mean prefill-chunk, decode and draft tokens per step, against the step token budget.",
    )
    d.panel(
        "Token budget in use",
        quantile_targets("tandem:iteration_budget_usage", (0.5, 0.95)),
        "percentunit",
        "Fraction of max_num_batched_tokens each step used.",
    )
    d.panel(
        "Batch size (sequences per step)",
        [
            (mean("tandem:iteration_num_seqs"), "mean"),
            (quantile(0.95, "tandem:iteration_num_seqs"), "p95"),
        ],
        "short",
        "Sequences (prefill chunks and decodes) in one step.",
        width=12,
    )
    d.panel(
        "Step duration",
        quantile_targets("tandem:step_duration_seconds"),
        "s",
        "Wall time of one schedule + execute + update step.",
        width=12,
    )


def cache_row(d: Layout) -> None:
    d.row("KV cache and prefix cache")
    d.panel(
        "KV cache usage",
        [(f"tandem:kv_cache_usage_perc{{{SEL}}}", "{{instance}}")],
        "percentunit",
        "Fraction of KV blocks held by requests; near 1, requests wait or are preempted.",
        thresholds=[(None, "green"), (0.9, "orange"), (0.98, "red")],
    )
    d.panel(
        "Prefix cache hit rate",
        [
            (
                f"{total('tandem:prefix_cache_hits_total')} / "
                f"{total('tandem:prefix_cache_queries_total')}",
                "hit rate",
            )
        ],
        "percentunit",
        "Prompt tokens served from cached KV blocks over prompt tokens looked up.",
    )
    d.panel(
        "Preemptions and evictions",
        [
            (total("tandem:num_preemptions_total"), "preemptions/s"),
            (total("tandem:prefix_cache_evictions_total"), "evicted blocks/s"),
        ],
        "short",
        "Requests preempted for lack of KV blocks; cached blocks reused for new content.",
    )


def speculation_row(d: Layout) -> None:
    d.row("Speculation")
    accepted = total("tandem:spec_decode_num_accepted_tokens_total")
    d.panel(
        "Draft acceptance rate",
        [(f"{accepted} / {total('tandem:spec_decode_num_draft_tokens_total')}", "acceptance")],
        "percentunit",
        "Draft tokens accepted over draft tokens verified.",
    )
    d.panel(
        "Mean accepted length",
        [(f"1 + {accepted} / {total('tandem:spec_decode_num_drafts_total')}", "tokens per draft")],
        "short",
        "Tokens a speculating sequence gains per step: accepted drafts + the target's own.",
    )
    per_pos = (
        f"{total('tandem:spec_decode_num_accepted_tokens_per_pos_total', by='position')} / "
        f"ignoring(position) group_left() {total('tandem:spec_decode_num_drafts_total')}"
    )
    d.panel(
        "Acceptance by draft position",
        [(per_pos, "position {{position}}")],
        "percentunit",
        "Share of speculating sequence-steps whose draft at this position was accepted.",
    )
    k_zero = total("tandem:spec_decode_chosen_k_bucket", 'le="0.0"')
    k_count = total("tandem:spec_decode_chosen_k_count")
    d.panel(
        "Chosen k",
        [
            (mean("tandem:spec_decode_chosen_k"), "mean k"),
            (quantile(0.95, "tandem:spec_decode_chosen_k"), "p95 k"),
            (f"1 - {k_zero} / {k_count}", "share speculating"),
        ],
        "short",
        "Draft length the goodput controller chose per decoding sequence-step (0 = off).",
    )
    decodes = total("tandem:step_tokens_total", 'kind="decode"')
    speedup = (
        f"(1 + {accepted} / {decodes}) / "
        f"(1 + {total('tandem:step_draft_seconds_total')} / "
        f"{total('tandem:step_target_seconds_total')})"
    )
    d.panel(
        "Is speculation helping?",
        [(speedup, "estimated speed-up")],
        "suffix:x",
        "Tokens per decoding sequence-step over the time drafting adds to a step. Above 1: "
        "speculation pays. An upper bound: the target's extra verify work is not counted.",
        kind="stat",
        thresholds=[(None, "red"), (1.0, "orange"), (1.05, "green")],
    )
    d.panel(
        "Step-time model: predicted over measured",
        [
            (
                f"{total('tandem:spec_decode_predicted_step_seconds_total')} / "
                f"{total('tandem:spec_decode_measured_step_seconds_total')}",
                "predicted / measured",
            ),
            (total("tandem:spec_decode_predicted_steps_total"), "predicted steps/s"),
        ],
        "short",
        "The controller's step-cost model against measured steps (1 = exact).",
    )


def errors_row(d: Layout) -> None:
    d.row("Errors and 429s")
    d.panel(
        "429 rejections",
        [(total("tandem:request_rejected_total"), "429/s")],
        "reqps",
        "Requests refused because the waiting queue was full (--max-queued-requests).",
    )
    d.panel(
        "HTTP errors by status",
        [
            (total("tandem:http_requests_total", 'status!~"2.."', by="status"), "{{status}}"),
            (total("tandem:request_errors_total"), "5xx total"),
        ],
        "reqps",
        "Non-2xx responses by status code (499: client closed the connection).",
    )
    d.panel(
        "Aborted requests and engine health",
        [
            (total("tandem:request_success_total", 'finished_reason="abort"'), "aborted/s"),
            (f"min(tandem:engine_healthy{{{SEL}}})", "engine healthy (min)"),
            (total("tandem:step_stats_dropped_total"), "step stats dropped/s"),
        ],
        "short",
        "Requests cancelled, disconnected or failed; 0 health means an engine is down.",
    )


def templating() -> dict[str, Any]:
    query = "label_values(tandem:num_requests_running, model_name)"
    return {
        "list": [
            {
                "type": "datasource",
                "name": "datasource",
                "label": "Data source",
                "query": "prometheus",
                "current": {},
                "hide": 0,
                "refresh": 1,
            },
            {
                "type": "query",
                "name": "model_name",
                "label": "Model",
                "datasource": DS,
                "definition": query,
                "query": {"query": query, "refId": "model_name"},
                "refresh": 2,
                "includeAll": True,
                "multi": True,
                "allValue": ".*",
                "current": {},
                "sort": 1,
                "hide": 0,
            },
        ]
    }


def build() -> dict[str, Any]:
    d = Layout()
    for add_row in (latency_row, throughput_row, queue_row, cache_row, speculation_row):
        add_row(d)
    errors_row(d)
    return {
        "title": "Tandem",
        "uid": "tandem-overview",
        "description": "Tandem LLM serving: latency, throughput, batching, caches, speculation.",
        "tags": ["tandem", "llm", "serving"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [],
        "templating": templating(),
        "panels": d.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("tandem.json")
    out.write_text(render())
