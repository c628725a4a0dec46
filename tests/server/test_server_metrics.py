"""ServerMetrics: every family at zero from the start; engine families equal to the
engine's own totals (a real EngineCore over the scheduler tests' fake executor); step
histograms count each step once; request histograms from RequestTimes; the README's
metric table lists exactly what is exported."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scheduler"))
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from scheduler_fakes import greedy, make_core, run_to_end  # noqa: E402

from tandem.scheduler.loop import EngineLoop  # noqa: E402
from tandem.scheduler.request import GenerateRequest, RequestOutput  # noqa: E402
from tandem.scheduler.stats import SpecStats  # noqa: E402
from tandem.server.metrics import ServerMetrics  # noqa: E402
from tandem.server.metrics_engine import spec_families  # noqa: E402
from tandem.server.request_stats import RequestTimes  # noqa: E402

README = Path(__file__).resolve().parents[2] / "README.md"


def scrape(metrics: ServerMetrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def value(samples, name: str, **labels: str) -> float:
    matches = [v for lbl, v in samples[name] if all(lbl.get(k) == x for k, x in labels.items())]
    assert len(matches) == 1, (name, labels, samples[name])
    return matches[0]


def families(metrics: ServerMetrics) -> dict[str, str]:
    """Exported family name (counters with _total) -> type."""
    out = {}
    for f in text_string_to_metric_families(metrics.render().decode()):
        out[f.name + ("_total" if f.type == "counter" else "")] = f.type
    return out


def served_core(n_requests: int = 3, **config):
    core, _ = make_core(max_num_batched_tokens=16, **config)
    reqs = [GenerateRequest(f"r{i}", list(range(1, 6 + i)), greedy(6)) for i in range(n_requests)]
    run_to_end(core, reqs)
    return core


def test_every_family_is_zero_and_labelled_before_the_engine_loads():
    samples = scrape(ServerMetrics("m"))
    assert len(families(ServerMetrics("m"))) >= 40
    for name, entries in samples.items():
        assert name.startswith(("tandem:", "vllm:spec_decode_")), name
        for labels, v in entries:
            assert labels["model_name"] == "m", name
            assert v == 0.0, name
    assert value(samples, "tandem:spec_decode_num_accepted_tokens_per_pos_total", position="1") == 0
    assert value(samples, "tandem:spec_decode_chosen_k_bucket", le="0.0") == 0
    assert not any(n.endswith("_created") for n in samples)


def test_engine_families_equal_the_engine_totals():
    core = served_core()
    metrics = ServerMetrics("m")
    metrics.attach(EngineLoop(core))
    totals = core.stats().steps
    s = scrape(metrics)
    assert value(s, "tandem:engine_steps_total") == totals.num_steps > 0
    for kind, n in (("prefill", totals.num_prefill_tokens), ("decode", totals.num_decode_tokens)):
        assert value(s, "tandem:step_tokens_total", kind=kind) == n > 0
    assert value(s, "tandem:iteration_tokens_count") == totals.num_steps
    assert value(s, "tandem:iteration_tokens_sum") == sum(
        x.num_prefill_tokens + x.num_decode_tokens + x.num_draft_tokens for x in totals.recent
    )
    assert value(s, "tandem:step_generated_tokens_total") == 3 * 6
    assert value(s, "tandem:iteration_budget_usage_bucket", le="1.0") == totals.num_steps
    assert value(s, "tandem:token_budget") == 16
    assert value(s, "tandem:kv_cache_num_blocks") == core.kv.num_blocks
    assert (
        value(s, "tandem:prefix_cache_queries_total")
        == core.stats().scheduler.kv.prefix_query_tokens
    )
    assert value(s, "tandem:engine_healthy") == 0  # the loop was never started
    assert value(s, "tandem:step_stats_dropped_total") == 0
    s2 = scrape(metrics)  # a second scrape observes no step twice
    assert value(s2, "tandem:iteration_tokens_count") == totals.num_steps


def test_overlap_guesses_by_outcome():
    core = served_core()
    last = core.stats().steps.recent[-1]
    for outcome in ("taken", "taken", "dropped", None):
        core.step_stats.record(dataclasses.replace(last, overlap=outcome))
    metrics = ServerMetrics("m")
    metrics.attach(EngineLoop(core))
    s = scrape(metrics)
    assert value(s, "tandem:overlap_guesses_total", outcome="taken") == 2
    assert value(s, "tandem:overlap_guesses_total", outcome="dropped") == 1


def test_steps_that_left_the_ring_are_counted_as_dropped():
    core, _ = make_core(max_num_batched_tokens=16)
    core.step_stats = type(core.step_stats)(history=2)  # a tiny ring
    metrics = ServerMetrics("m")
    metrics.attach(EngineLoop(core))
    run_to_end(core, [GenerateRequest("a", [1, 2, 3], greedy(8))])
    s = scrape(metrics)
    steps = core.stats().steps.num_steps
    assert value(s, "tandem:iteration_tokens_count") == 2
    assert value(s, "tandem:step_stats_dropped_total") == steps - 2


def _output(tokens: list[int], finished: bool = False, scheduled: float | None = None):
    return RequestOutput(
        request_id="r",
        new_token_ids=tokens,
        new_logprobs=None,
        prompt_logprobs=None,
        finished=finished,
        finish_reason="length" if finished else None,
        stop_token_id=None,
        num_prompt_tokens=4,
        num_output_tokens=0,
        num_cached_tokens=0,
        first_scheduled_time=scheduled,
    )


def test_request_times_and_histograms():
    times = RequestTimes(arrival=100.0)
    times.record(_output([7], scheduled=100.5), now=101.0)  # queue 0.5, prefill 0.5
    times.record(_output([8, 9, 10]), now=101.3)  # 3 tokens at once: 0.1 s each
    times.record(_output([11], finished=True), now=101.5)
    assert times.ttft == pytest.approx(1.0) and times.queue_time == pytest.approx(0.5)
    assert times.prefill_time == pytest.approx(0.5) and times.e2e == pytest.approx(1.5)
    assert times.decode_time == pytest.approx(0.5)
    assert times.inter_token_latencies() == pytest.approx([0.1, 0.1, 0.1, 0.2])
    metrics = ServerMetrics("m")
    metrics.observe_request(times, 4, 5, "length")
    metrics.observe_request(RequestTimes(arrival=1.0), 4, 0, "weird")  # never got a token
    s = scrape(metrics)
    assert value(s, "tandem:time_to_first_token_seconds_count") == 1
    assert value(s, "tandem:time_to_first_token_seconds_bucket", le="1.0") == 1
    assert value(s, "tandem:inter_token_latency_seconds_count") == 4
    assert value(s, "tandem:inter_token_latency_seconds_sum") == pytest.approx(0.5)
    assert value(s, "tandem:request_queue_time_seconds_sum") == pytest.approx(0.5)
    assert value(s, "tandem:request_success_total", finished_reason="length") == 1
    assert value(s, "tandem:request_success_total", finished_reason="abort") == 1
    assert value(s, "tandem:generation_tokens_total") == 5
    assert value(s, "tandem:request_prompt_tokens_count") == 2


def test_http_counters_429_and_5xx():
    metrics = ServerMetrics("m")
    for status in (200, 429, 429, 503, 400):
        metrics.count_http("/v1/completions", status)
    metrics.count_http("/health", 503)  # loading or draining: not an error
    s = scrape(metrics)
    assert value(s, "tandem:request_rejected_total") == 2
    assert value(s, "tandem:request_errors_total") == 1
    assert value(s, "tandem:http_requests_total", route="/health", status="503") == 1
    assert value(s, "tandem:http_requests_total", route="/v1/completions", status="429") == 2


def test_speculation_families_from_spec_stats():
    spec = SpecStats(
        num_drafts=10,
        num_draft_tokens=30,
        num_accepted_tokens=12,
        accepted_per_pos=[7, 4, 1],
        k_histogram=[5, 0, 2, 10],
        predicted_step_time_s=1.5,
        measured_step_time_s=2.0,
        num_predicted_steps=9,
    )
    by_name = {f.name: f for f in spec_families("m", spec)}
    buckets = [
        s for s in by_name["tandem:spec_decode_chosen_k"].samples if s.name.endswith("_bucket")
    ]
    assert [(s.labels["le"], s.value) for s in buckets] == [
        ("0.0", 5),
        ("1.0", 5),
        ("2.0", 7),
        ("3.0", 17),
        ("+Inf", 17),
    ]
    (k_sum,) = [
        s for s in by_name["tandem:spec_decode_chosen_k"].samples if s.name.endswith("_sum")
    ]
    assert k_sum.value == 2 * 2 + 3 * 10
    per_pos = by_name["tandem:spec_decode_num_accepted_tokens_per_pos"].samples
    assert [(s.labels["position"], s.value) for s in per_pos] == [("1", 7), ("2", 4), ("3", 1)]
    assert by_name["tandem:spec_decode_num_accepted_tokens"].samples[0].value == 12


def test_readme_metrics_table_lists_exactly_the_exported_families():
    text = README.read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `((?:tandem|vllm):[a-z0-9_:]+)` \| (\w+) \|", section, flags=re.M)
    assert rows, "no metric table in README.md's Metrics section"
    exported = families(ServerMetrics("m"))
    exported["tandem:http_requests_total"] = "counter"  # samples once a request is answered
    assert dict(rows) == exported
