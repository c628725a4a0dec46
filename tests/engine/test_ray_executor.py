"""Tensor parallelism over Ray (TP = 2, CPU, gloo) through the EngineCore: the same
greedy tokens as the in-process TP = 1 engine, with chunked prefill and with speculative
decoding (draft model and n-gram); a rank that raises, hangs or dies makes `execute`
raise ExecutorDeadError within a bounded time.

One Ray cluster for the module, with 6 logical CPUs: three TP = 2 executors live at
once (a Ray CPU is a placement counter here, not a core). float32, so TP's different reduction order cannot flip a greedy token
of the built-in model.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest

from tandem.engine.builtin import BUILTIN_DRAFT, BUILTIN_TARGET
from tandem.engine.config import EngineConfig
from tandem.engine.executor import UniExecutor, make_executor
from tandem.engine.plan import NewSeq, SamplingParams, SeqPlan, StepPlan
from tandem.engine.spec_config import SpeculativeConfig
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.core import EngineCore
from tandem.scheduler.request import GenerateRequest

ray = pytest.importorskip("ray")
from tandem.engine.ray_executor import ExecutorDeadError, RayExecutor  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (BUILTIN_DRAFT / "model.safetensors").exists()
    or not (BUILTIN_TARGET / "model.safetensors").exists(),
    reason="built-in models not trained",
)

TP = 2
TEXTS = [
    "ROMEO:\nWhat light through yonder window breaks?",
    "First Citizen:\n",
    "KING RICHARD III:\nNow is the winter of our discontent made glorious summer",
    "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy name",
    "DUKE VINCENTIO:\nI am a lord.\n\nDUKE VINCENTIO:\nI am",
    "GLOUCESTER:\nMy lord, I'll tell you, my lord.\n\nKING EDWARD IV:\nMy lord,",
]
GREEDY = [SamplingParams(temperature=0.0, max_tokens=12 + 2 * i, ignore_eos=True) for i in range(6)]
CHUNKED = SchedulerConfig(max_num_batched_tokens=32, long_prefill_token_threshold=12)


def _prompts() -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(BUILTIN_TARGET / "tokenizer.json"))
    return [tok.encode(t).ids for t in TEXTS]


def engine_config(tp: int, **kw) -> EngineConfig:
    return EngineConfig(
        dtype="float32",
        kv_cache_memory=16 << 20,
        max_model_len=256,
        num_threads=1,
        tensor_parallel_size=tp,
        **kw,
    )


def generate(core: EngineCore) -> dict[str, list[int]]:
    for i, (ids, sp) in enumerate(zip(_prompts(), GREEDY, strict=True)):
        core.add_request(GenerateRequest(f"r{i}", ids, sp))
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(GREEDY))}
    while core.has_unfinished():
        for o in core.step():
            out[o.request_id].extend(o.new_token_ids)
    return out


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=6, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    """TP = 1, in process, no speculation, chunked prefill."""
    executor = UniExecutor(engine_config(1))
    try:
        return generate(EngineCore(CHUNKED, executor))
    finally:
        executor.shutdown()


@pytest.fixture(scope="module")
def tp_executor(cluster):
    executor = make_executor(engine_config(TP))
    assert isinstance(executor, RayExecutor)
    yield executor
    executor.shutdown()


def test_tp2_gives_the_greedy_tokens_of_tp1_with_chunked_prefill(tp_executor, reference):
    assert tp_executor.kv_cache_info().max_model_len == 256
    core = EngineCore(CHUNKED, tp_executor)
    assert generate(core) == reference
    steps = core.stats().steps.recent
    assert any(s.num_prefill_tokens and s.num_decode_tokens for s in steps), "no mixed step"


def test_ngram_speculation_under_tp2_keeps_the_greedy_tokens(tp_executor, reference):
    spec = SpeculativeConfig(
        speculative_method="ngram", speculation_policy="fixed", prompt_lookup_min=1
    )
    core = EngineCore(CHUNKED, tp_executor, spec=spec)
    assert generate(core) == reference
    assert core.stats().steps.num_accepted_drafts > 0


def _plan(step_id: int, seq_id: int, new: bool) -> StepPlan:
    first = NewSeq(SamplingParams(temperature=0.0), num_prompt_tokens=3) if new else None
    seq = SeqPlan(seq_id, [5, 6, 7], 0, [0], sample=True, new=first)
    return StepPlan(step_id, [seq])


def test_a_rank_that_fails_a_step_kills_the_executor(tp_executor):
    assert tp_executor.execute(_plan(0, 1, new=True)).seqs[0].token_ids
    with pytest.raises(ExecutorDeadError, match="KeyError"):
        tp_executor.execute(_plan(1, 99, new=False))  # no such sequence on any rank
    with pytest.raises(ExecutorDeadError, match="KeyError"):
        tp_executor.execute(_plan(2, 1, new=False))  # dead from now on


@pytest.fixture(scope="module")
def draft_executor(cluster):
    spec = SpeculativeConfig(speculative_method="draft", speculation_policy="fixed")
    executor = RayExecutor(engine_config(TP), spec)
    yield executor, spec
    executor.shutdown()


def test_draft_model_speculation_under_tp2_keeps_the_greedy_tokens(draft_executor, reference):
    executor, spec = draft_executor
    core = EngineCore(CHUNKED, executor, spec=spec)
    assert generate(core) == reference
    assert core.stats().steps.num_accepted_drafts > 0


def test_a_killed_rank_is_reported_within_a_bounded_time(draft_executor):
    executor, _ = draft_executor
    executor.execute(_plan(0, 1, new=True))
    ray.kill(executor.actors[1])
    t0 = time.monotonic()
    with pytest.raises(ExecutorDeadError, match="died"):
        for step in range(1, 100):  # the kill lands within a few steps
            executor.execute(_plan(step, step + 1, new=True))
    assert time.monotonic() - t0 < 30


def test_a_hung_rank_times_out(cluster):
    executor = RayExecutor(engine_config(TP, step_timeout_s=3))
    try:
        os.kill(executor.rank_pids[1], signal.SIGSTOP)  # a rank that never answers
        t0 = time.monotonic()
        with pytest.raises(ExecutorDeadError, match=r"within 3 s|[Tt]ime(d )?out"):
            executor.execute(_plan(0, 1, new=True))
        assert time.monotonic() - t0 < 15
    finally:
        os.kill(executor.rank_pids[1], signal.SIGKILL)
        executor.shutdown()
