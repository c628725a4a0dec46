"""Speculative decoding at the server's edges: flags (and vLLM's JSON form), the
per-request `speculation` field, `usage_detail`, and the offline LLM's keywords."""

from __future__ import annotations

import pytest

from tandem.engine.builtin import BUILTIN_DRAFT, BUILTIN_TARGET
from tandem.engine.plan import SamplingParams
from tandem.engine.spec_config import SpeculativeConfig
from tandem.server.cli import main, parse_speculative_config
from tandem.server.flags import ConfigError
from tandem.server.protocol import CompletionRequest


def test_flags_and_vllm_json_reach_the_config():
    assert parse_speculative_config([]) == SpeculativeConfig()
    cfg = parse_speculative_config(
        [
            "--speculative-method",
            "ngram",
            "--num-speculative-tokens",
            "3",
            "--ngram-prompt-lookup-max",
            "5",
            "--speculation-policy",
            "fixed",
        ]
    )
    assert (cfg.speculative_method, cfg.num_speculative_tokens) == ("ngram", 3)
    assert (cfg.prompt_lookup_max, cfg.speculation_policy) == (5, "fixed")
    cfg = parse_speculative_config(
        [
            "--speculative-config",
            '{"method": "draft_model", "model": "/d", "num_speculative_tokens": 2}',
            "--num-speculative-tokens",
            "6",
        ]
    )
    assert (cfg.speculative_method, cfg.speculative_model) == ("draft", "/d")
    assert cfg.num_speculative_tokens == 6  # a flag overrides the JSON's key


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--speculative-method", "eagle"], "--speculative-method"),
        (["--num-speculative-tokens", "0"], "--num-speculative-tokens"),
        (["--speculative-config", "{nope"], "--speculative-config"),
        (["--speculative-config", '{"method": "ngram", "depth": 3}'], "--speculative-config"),
    ],
)
def test_bad_values_name_their_flag(argv, flag):
    with pytest.raises(ConfigError, match=flag):
        parse_speculative_config(argv)


def test_draft_method_with_another_model_needs_a_draft(capsys):
    assert main(["serve", "/some/model", "--speculative-method", "draft"]) == 2
    assert "--speculative-model" in capsys.readouterr().err


def test_request_speculation_field():
    base = {"prompt": "x"}
    assert CompletionRequest(**base).max_draft_tokens() is None
    assert CompletionRequest(**base, speculation={"max_k": 2}).max_draft_tokens() == 2
    assert CompletionRequest(**base, speculation={"mode": "off"}).max_draft_tokens() == 0
    with pytest.raises(ValueError):
        CompletionRequest(**base, speculation={"max_k": -1})
    with pytest.raises(ValueError):
        CompletionRequest(**base, speculation={"mode": "always"})


@pytest.mark.skipif(
    not (BUILTIN_DRAFT / "model.safetensors").exists()
    or not (BUILTIN_TARGET / "model.safetensors").exists(),
    reason="built-in models not trained",
)
def test_offline_llm_takes_speculative_keywords():
    from tandem.server.llm import LLM

    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = ["ROMEO:\nWhat light through yonder window breaks?", "First Citizen:\n"]
    outs = {}
    for name, kw in (("off", {}), ("draft", {"speculative_method": "draft"})):
        llm = LLM(
            dtype="float32",
            kv_cache_memory=32 << 20,
            max_model_len=256,
            speculation_policy="fixed",
            **kw,
        )
        try:
            outs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
            spec = llm.engine.core.stats().scheduler.spec
        finally:
            llm.shutdown()
        assert (spec is None) == (name == "off")
    assert outs["draft"] == outs["off"]
