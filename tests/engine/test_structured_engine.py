"""Structured output end to end (scheduler -> worker -> sampler) with the built-in model.

One batch mixes JSON-schema, regex and choice requests (greedy and seeded sampling)
with free ones. Every constrained output must parse and validate, fullmatch or equal a
choice, and end with eos ("stop"). With speculation (draft model, n-gram) the outputs
must equal those without (coupled verification is lossless, so any draft the grammar
state mishandled would show), with drafts accepted; likewise across preemptions. ~2 min on a loaded 2-core CPU.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tandem.engine.builtin import BUILTIN_DRAFT, BUILTIN_TARGET
from tandem.engine.config import EngineConfig
from tandem.engine.executor import UniExecutor
from tandem.engine.plan import SamplingParams, StructuredOutput
from tandem.engine.spec_config import SpeculativeConfig
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.core import EngineCore
from tandem.scheduler.request import GenerateRequest

pytestmark = pytest.mark.skipif(
    not (BUILTIN_DRAFT / "model.safetensors").exists()
    or not (BUILTIN_TARGET / "model.safetensors").exists(),
    reason="built-in models not trained",
)

SCHEMAS = [
    {  # required fields, bounded string and integer, no extra keys
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {  # nested arrays
        "type": "object",
        "properties": {
            "grid": {
                "type": "array",
                "items": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 9},
                    "maxItems": 3,
                },
                "minItems": 1,
                "maxItems": 2,
            }
        },
        "required": ["grid"],
        "additionalProperties": False,
    },
    {  # enums, a bounded number, an optional boolean
        "type": "object",
        "properties": {
            "mood": {"enum": ["happy", "sad", "angry"]},
            "score": {"type": "number", "minimum": -1, "maximum": 1},
            "loud": {"type": "boolean"},
        },
        "required": ["mood", "score"],
        "additionalProperties": False,
    },
    {  # nested objects in an array, a pattern
        "type": "object",
        "properties": {
            "cast": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"who": {"type": "string", "pattern": "^[A-Z][a-z]{1,5}$"}},
                    "required": ["who"],
                    "additionalProperties": False,
                },
                "maxItems": 2,
            }
        },
        "required": ["cast"],
        "additionalProperties": False,
    },
]
REGEX = r"[A-Z][a-z]{1,6}, [0-9]{2}"
CHOICES = ["ROMEO", "JULIET", "Friar Laurence"]
PROMPTS = ["ROMEO:\nWhat light", "JULIET:\nO Romeo, Romeo", '{"name": "Romeo", "age": 16}\n']

GREEDY = dict(temperature=0.0)
SAMPLED = dict(temperature=0.8, top_p=0.95)


def cases() -> list[tuple[SamplingParams, StructuredOutput | None]]:
    out = []
    for i, sampling in enumerate([GREEDY, SAMPLED]):
        kw = dict(sampling, seed=10 + i, max_tokens=80)
        out += [
            SamplingParams(**kw, structured=StructuredOutput("json_schema", json.dumps(s)))
            for s in SCHEMAS
        ]
        out.append(SamplingParams(**kw, structured=StructuredOutput("regex", REGEX)))
        out.append(SamplingParams(**kw, structured=StructuredOutput("choice", json.dumps(CHOICES))))
        out.append(SamplingParams(**dict(sampling, seed=20 + i), max_tokens=24, ignore_eos=True))
    return out


CASES = cases()


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(BUILTIN_TARGET / "tokenizer.json"))


def make_core(spec: SpeculativeConfig | None, kv: int = 64 << 20) -> EngineCore:
    engine = EngineConfig(dtype="float32", kv_cache_memory=kv, max_model_len=160)
    return EngineCore(SchedulerConfig(), UniExecutor(engine, spec), spec=spec)


def generate(core: EngineCore, tokenizer) -> dict[str, tuple[list[int], str]]:
    """{request id: (output tokens, finish reason)} for every case; shuts the core down."""
    for i, sp in enumerate(CASES):
        ids = tokenizer.encode(PROMPTS[i % len(PROMPTS)]).ids
        core.add_request(GenerateRequest(f"r{i}", ids, sp))
    out: dict[str, tuple[list[int], str]] = {f"r{i}": ([], "") for i in range(len(CASES))}
    try:
        while core.has_unfinished():
            for o in core.step():
                out[o.request_id][0].extend(o.new_token_ids)
                if o.finished:
                    out[o.request_id] = (out[o.request_id][0], o.finish_reason)
    finally:
        core.shutdown()
    return out


def check(out: dict[str, tuple[list[int], str]], tokenizer) -> None:
    for i, sp in enumerate(CASES):
        tokens, reason = out[f"r{i}"]
        so = sp.structured
        if so is None:
            assert reason == "length" and len(tokens) == 24
            continue
        text = tokenizer.decode(tokens)
        assert reason == "stop", (i, so.kind, text)
        if so.kind == "json_schema":
            jsonschema.validate(json.loads(text), json.loads(so.spec))
        elif so.kind == "regex":
            assert re.fullmatch(REGEX, text), text
        else:
            assert text in CHOICES


@pytest.fixture(scope="module")
def reference(tokenizer):
    out = generate(make_core(None), tokenizer)
    check(out, tokenizer)
    return out


def test_constrained_outputs_validate_without_speculation(reference, tokenizer):
    texts = {tokenizer.decode(t) for t, _ in reference.values()}
    assert len(texts) > len(CASES) // 2  # not one degenerate output for everything


BLOCK_BYTES = 10 * 2 * 2 * 64 * 4 * 16  # target layers * K,V * kv heads * dim * fp32


@pytest.mark.parametrize(("method", "num_blocks"), [("draft", None), ("ngram", 14)])
def test_speculation_keeps_constrained_outputs(method, num_blocks, reference, tokenizer):
    """With num_blocks set, a tiny KV pool also preempts sequences mid-output: the new
    mirror's grammar state must consume the re-sent outputs, or the masks would differ."""
    spec = SpeculativeConfig(
        speculative_method=method,
        speculation_policy="fixed",
        num_speculative_tokens=3,
        prompt_lookup_min=1,
    )
    core = make_core(spec, kv=64 << 20 if num_blocks is None else num_blocks * BLOCK_BYTES)
    out = generate(core, tokenizer)
    check(out, tokenizer)
    assert out == reference
    stats = core.stats()
    assert stats.steps.num_accepted_drafts > 0
    assert (stats.scheduler.num_preemptions > 0) == (num_blocks is not None)
