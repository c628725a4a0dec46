"""Speculative decoding end to end (scheduler -> worker -> models) with the built-in pair.

float32, so that a verification window and plain decodes agree to the last bit on the
argmax. Each case asserts that drafts were accepted, so a controller stuck at k = 0
cannot pass.
"""

from __future__ import annotations

import pytest
from spec_helpers import chi2_critical, chi2_two_sample

from tandem.engine.builtin import BUILTIN_DRAFT, BUILTIN_TARGET
from tandem.engine.config import EngineConfig
from tandem.engine.executor import UniExecutor
from tandem.engine.plan import SamplingParams
from tandem.engine.spec_config import SpeculativeConfig
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.core import EngineCore
from tandem.scheduler.request import GenerateRequest

pytestmark = pytest.mark.skipif(
    not (BUILTIN_DRAFT / "model.safetensors").exists()
    or not (BUILTIN_TARGET / "model.safetensors").exists(),
    reason="built-in models not trained",
)

TEXTS = [
    "ROMEO:\nWhat light through yonder window breaks?",
    "First Citizen:\n",
    "KING RICHARD III:\nNow is the winter of our discontent made glorious summer",
    "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy name",
    "MENENIUS:\nI tell you, friends,",
    "HAMLET:\nTo be, or not to be",
    "DUKE VINCENTIO:\nI am a lord.\n\nDUKE VINCENTIO:\nI am",
    "CORIOLANUS:\nI'll be gone.\n\nMENENIUS:\n",
    "LADY MACBETH:\nOut, damned spot! out, I say!",
    "GLOUCESTER:\nMy lord, I'll tell you, my lord.\n\nKING EDWARD IV:\nMy lord,",
]


def _tokenize() -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(BUILTIN_TARGET / "tokenizer.json"))
    return [tok.encode(t).ids for t in TEXTS]


PROMPTS = _tokenize() if (BUILTIN_TARGET / "tokenizer.json").exists() else []


def make_core(
    spec: SpeculativeConfig | None, kv: int = 64 << 20, max_model_len: int = 256, **sched
) -> EngineCore:
    engine = EngineConfig(dtype="float32", kv_cache_memory=kv, max_model_len=max_model_len)
    return EngineCore(SchedulerConfig(**sched), UniExecutor(engine, spec), spec=spec)


def generate(core: EngineCore, params: list[SamplingParams]) -> dict[str, list[int]]:
    for i, sp in enumerate(params):
        core.add_request(GenerateRequest(f"r{i}", PROMPTS[i % len(PROMPTS)], sp))
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(params))}
    while core.has_unfinished():
        for o in core.step():
            out[o.request_id].extend(o.new_token_ids)
    core.shutdown()
    return out


GREEDY = [SamplingParams(temperature=0.0, max_tokens=20 + i, ignore_eos=True) for i in range(10)]
CHUNKED = dict(max_num_batched_tokens=48, long_prefill_token_threshold=16)


@pytest.fixture(scope="module")
def greedy_reference():
    return generate(make_core(None, **CHUNKED), GREEDY)


@pytest.mark.parametrize("method", ["draft", "ngram"])
@pytest.mark.parametrize("policy", ["fixed", "goodput", "off"])
def test_greedy_identical_with_and_without_speculation(method, policy, greedy_reference):
    spec = SpeculativeConfig(
        speculative_method=method,
        speculation_policy=policy,
        num_speculative_tokens=3,
        prompt_lookup_min=1,
    )
    core = make_core(spec, **CHUNKED)
    out = generate(core, GREEDY)
    assert out == greedy_reference
    stats = core.stats()
    if policy == "off":
        assert stats.steps.num_draft_tokens == 0 and stats.scheduler.spec is None
        return
    assert stats.steps.num_accepted_drafts > 0, "no draft was ever accepted"
    assert stats.scheduler.spec.num_accepted_tokens == stats.steps.num_accepted_drafts
    # chunked prefills shared steps with speculating decodes
    assert any(s.num_prefill_tokens and s.num_draft_tokens for s in stats.steps.recent)


SAMPLED = [
    SamplingParams(
        temperature=0.3 + 0.15 * i,
        top_p=0.95,
        seed=100 + i,
        max_tokens=16,
        ignore_eos=True,
        logprobs=2,
        repetition_penalty=1.0 + 0.1 * (i % 3),
    )
    for i in range(6)
]


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_seeded_sampling_gives_the_same_output_with_speculation_on_and_off(method):
    spec = SpeculativeConfig(
        speculative_method=method,
        speculation_policy="fixed",
        num_speculative_tokens=4,
        prompt_lookup_min=1,
    )
    off = generate(make_core(None), SAMPLED)
    core = make_core(spec)
    on = generate(core, SAMPLED)
    assert on == off
    assert core.stats().steps.num_accepted_drafts > 0


def test_verified_positions_have_the_non_speculative_distribution():
    """Many seeded draws of one prompt at T = 1. The first decode step verifies a
    window of k = 4 drafts; output tokens 2 and 3 (0-based) are window positions 2 and
    3: kept drafts, or the target's correction. Their distribution with speculation
    (seeds 0..N-1) and without (other seeds) must agree: chi-square homogeneity at
    p = 0.001, for the draft model and n-gram proposers."""
    n = 240
    prompt = PROMPTS[9]  # repetitive, so n-gram lookup finds drafts too

    def draws(spec, seed0):
        core = make_core(spec, max_num_batched_tokens=4096)
        for s in range(n):
            sp = SamplingParams(temperature=1.0, seed=seed0 + s, max_tokens=6, ignore_eos=True)
            core.add_request(GenerateRequest(f"s{s}", prompt, sp))
        toks: dict[str, list[int]] = {}
        while core.has_unfinished():
            for o in core.step():
                toks.setdefault(o.request_id, []).extend(o.new_token_ids)
        stats = core.stats().scheduler.spec
        core.shutdown()
        return [t[2:4] for t in toks.values()], stats

    without, _ = draws(None, 10_000)
    for method in ("draft", "ngram"):
        spec = SpeculativeConfig(
            speculative_method=method,
            speculation_policy="fixed",
            num_speculative_tokens=4,
            prompt_lookup_min=1,
        )
        with_spec, stats = draws(spec, 0)
        assert stats.accepted_per_pos[1] > 0, f"{method}: no window position 2 was kept"
        for pos in (0, 1):
            stat, dof = chi2_two_sample([t[pos] for t in with_spec], [t[pos] for t in without])
            assert stat < chi2_critical(dof), f"{method} output {pos + 2}: {stat} ({dof} dof)"


def test_preemption_in_the_middle_of_speculation_keeps_outputs():
    # 12 blocks of 16 tokens: 8 requests of up to ~50 tokens cannot all fit at once
    spec = SpeculativeConfig(
        speculative_method="draft", speculation_policy="fixed", num_speculative_tokens=4
    )
    params = GREEDY[:8]
    block_bytes = 10 * 2 * 2 * 64 * 4 * 16  # target layers * K,V * kv heads * dim * fp32
    ref = generate(make_core(None), params)
    core = make_core(spec, kv=12 * block_bytes, max_model_len=128)
    out = generate(core, params)
    assert out == ref
    stats = core.stats()
    assert stats.scheduler.num_preemptions > 0 and stats.steps.num_accepted_drafts > 0
