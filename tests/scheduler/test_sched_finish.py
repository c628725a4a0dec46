"""Finish conditions, aborts, and refusals at add_request."""

from __future__ import annotations

import pytest
from scheduler_fakes import FakeExecutor, greedy, make_core, run_to_end, tokens_of

from tandem.engine.plan import SamplingParams, StructuredOutput
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.request import GenerateRequest, RequestStatus
from tandem.scheduler.scheduler import QueueFullError

PROMPT = [11, 12, 13]
SCRIPT = [5, 6, 0, 7, 0, 8, 9, 10, 11, 12, 13, 14]  # output i is SCRIPT[i]; eos is 0


def scripted(**kw) -> FakeExecutor:
    return FakeExecutor(next_token=lambda ctx: SCRIPT[len(ctx) - len(PROMPT)], **kw)


def finish(sampling: SamplingParams, **executor_kw) -> tuple[list[int], str | None, int | None]:
    core, _ = make_core(scripted(**executor_kw))
    outs = run_to_end(core, [GenerateRequest("r", PROMPT, sampling)])["r"]
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert outs[-1].num_output_tokens == len(tokens_of(outs))
    assert core.stats().scheduler.kv.num_free_blocks == core.kv.num_blocks
    return tokens_of(outs), outs[-1].finish_reason, outs[-1].stop_token_id


def sp(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **{"max_tokens": 10, **kw})


def test_eos_stops_and_is_included():
    assert finish(sp()) == ([5, 6, 0], "stop", 0)


def test_ignore_eos_runs_to_max_tokens():
    assert finish(sp(ignore_eos=True, max_tokens=6)) == (SCRIPT[:6], "length", None)


def test_min_tokens_defers_eos():
    assert finish(sp(min_tokens=3)) == ([5, 6, 0, 7, 0], "stop", 0)


def test_stop_token_ids_stop_even_with_ignore_eos():
    assert finish(sp(ignore_eos=True, stop_token_ids=[7])) == ([5, 6, 0, 7], "stop", 7)


def test_max_tokens():
    assert finish(sp(max_tokens=2)) == ([5, 6], "length", None)


def test_max_tokens_zero_gives_no_tokens():
    assert finish(sp(max_tokens=0)) == ([], "length", None)


def test_max_model_len():
    assert finish(sp(ignore_eos=True), max_model_len=len(PROMPT) + 4) == (
        SCRIPT[:4],
        "length",
        None,
    )


def test_logprobs_ride_with_their_tokens():
    core, _ = make_core(scripted())
    outs = run_to_end(core, [GenerateRequest("r", PROMPT, sp(max_tokens=2, logprobs=2))])["r"]
    for o in outs:
        assert o.new_logprobs is not None
        assert [lp.token_id for lp in o.new_logprobs] == o.new_token_ids
        assert all(len(lp.top) == 2 for lp in o.new_logprobs)
    plain = run_to_end(core, [GenerateRequest("q", PROMPT, sp(max_tokens=2))])["q"]
    assert all(o.new_logprobs is None for o in plain)


def test_abort_frees_blocks_and_tells_the_worker():
    core, ex = make_core()
    core.add_request(GenerateRequest("a", [1, 2, 3, 4, 5, 6], greedy(max_tokens=50)))
    core.add_request(GenerateRequest("b", [7, 8, 9], greedy(max_tokens=50)))
    for _ in range(3):
        core.step()
    held = ex.info.num_blocks - core.stats().scheduler.kv.num_free_blocks
    out = core.abort_request("a")
    assert out is not None and out.finished and out.finish_reason == "abort"
    assert out.num_output_tokens == 3
    assert (
        held - (ex.info.num_blocks - core.stats().scheduler.kv.num_free_blocks) == 2
    )  # 8 positions
    assert core.abort_request("a") is None and core.abort_request("nope") is None
    outs = core.step()
    assert ex.plans[-1].finished_seq_ids == [0] and 0 not in ex.seqs
    assert [o.request_id for o in outs] == ["b"]


def test_abort_of_a_waiting_request_sends_nothing_to_the_worker():
    core, ex = make_core(max_num_seqs=1)
    core.add_request(GenerateRequest("a", [1, 2], greedy(max_tokens=4)))
    core.add_request(GenerateRequest("b", [3, 4], greedy(max_tokens=4)))
    core.step()
    assert core.num_waiting == 1
    out = core.abort_request("b")
    assert out is not None and out.finish_reason == "abort" and out.num_output_tokens == 0
    outs = run_to_end(core, [])
    assert outs["a"][-1].finish_reason == "length"
    assert all(not p.finished_seq_ids for p in ex.plans)  # "a"'s id rides a later plan


def test_refusals_at_add_request():
    core, _ = make_core(FakeExecutor(max_model_len=8), max_queued_requests=2)
    with pytest.raises(ValueError, match="at most 7"):
        core.add_request(GenerateRequest("long", list(range(1, 9)), greedy()))
    core.add_request(GenerateRequest("a", [1], greedy()))
    with pytest.raises(ValueError, match="already running"):
        core.add_request(GenerateRequest("a", [1], greedy()))
    core.add_request(GenerateRequest("b", [1], greedy()))
    assert not core.can_admit()
    with pytest.raises(QueueFullError, match="max_queued_requests=2"):
        core.add_request(GenerateRequest("c", [1], greedy()))
    core.step()
    assert core.can_admit()


def test_bad_structured_output_is_refused_at_add_request():
    core, _ = make_core(FakeExecutor())
    bad = StructuredOutput("json_schema", '{"type": "object", "properties": 3}')
    with pytest.raises(ValueError, match="json_schema"):
        core.add_request(GenerateRequest("bad", [1, 2], greedy(structured=bad)))
    assert not core.has_unfinished()  # nothing queued, nothing to fail later in a step
    ok = StructuredOutput("regex", "[ab]+")
    core.add_request(GenerateRequest("ok", [1, 2], greedy(structured=ok)))
    assert core.has_unfinished()


def test_bad_inputs_have_clear_messages():
    with pytest.raises(ValueError, match="no tokens"):
        GenerateRequest("r", [], greedy())
    with pytest.raises(ValueError, match="ints >= 0"):
        GenerateRequest("r", [1, -2], greedy())
    with pytest.raises(ValueError, match="max_num_seqs must be an integer >= 1"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        SchedulerConfig(long_prefill_token_threshold=-1)


def test_status_order_makes_finished_a_comparison():
    assert not RequestStatus.PREEMPTED.is_finished
    assert all(
        s.is_finished
        for s in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )
    )
    assert RequestStatus.FINISHED_ABORTED.finish_reason == "abort"
    assert RequestStatus.RUNNING.finish_reason is None
