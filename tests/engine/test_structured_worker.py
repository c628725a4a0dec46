"""The worker's grammar states, driven by hand-written plans: n-gram drafts cut to their
grammar-valid prefix, outputs re-sent after a preemption consumed by the new state,
states freed with their sequences."""

from __future__ import annotations

import json

import pytest

from tandem.engine.builtin import BUILTIN_TARGET
from tandem.engine.config import EngineConfig
from tandem.engine.executor import UniExecutor
from tandem.engine.plan import NewSeq, SamplingParams, SeqPlan, StepPlan, StructuredOutput

pytestmark = pytest.mark.skipif(
    not (BUILTIN_TARGET / "model.safetensors").exists(), reason="built-in model not trained"
)

BS = 16
EOS = 1
CHOICES = ["Friar Laurence", "ROMEO"]
CHOICE = SamplingParams(
    temperature=0.0, max_tokens=20, structured=StructuredOutput("choice", json.dumps(CHOICES))
)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(BUILTIN_TARGET / "tokenizer.json"))


@pytest.fixture(scope="module")
def ex():
    ex = UniExecutor(EngineConfig(dtype="float32", kv_cache_memory=8 << 20, max_model_len=128))
    yield ex
    ex.shutdown()


def run(ex, seq_id: int, prompt: list[int], outputs: list[int], drafts=(), steps=20):
    """Plays the scheduler for one new sequence whose first plan carries prompt +
    outputs (as after a preemption); returns (all outputs, the first step's result)."""
    tokens = prompt + outputs
    first, computed = None, 0
    for step in range(steps):
        chunk = tokens[computed:]
        d = list(drafts) if step == 0 else []
        plan = SeqPlan(
            seq_id,
            chunk,
            computed,
            list(range(-(-computed // BS), -(-(len(tokens) + len(d)) // BS))),
            True,
            NewSeq(CHOICE, len(prompt)) if step == 0 else None,
            num_draft=len(d),
            draft_token_ids=d,
        )
        done = list(ex.worker.seqs) if step == 0 else []  # earlier tests' sequences
        res = ex.execute(StepPlan(step, [plan], finished_seq_ids=done)).seqs[0]
        assert list(ex.worker.seqs) == [seq_id]  # their grammar states went with them
        first = first or (res, list(ex.worker.seqs[seq_id].token_ids))
        computed = len(tokens) + res.num_accepted_drafts
        tokens += res.token_ids
        if res.token_ids[-1] == EOS:
            break
    assert ex.worker.seqs[seq_id].grammar is not None
    return tokens[len(prompt) :], first


def test_outputs_resent_after_a_preemption_are_consumed(ex, tokenizer):
    prompt = tokenizer.encode("ROMEO:\nWho comes?\n").ids
    friar = tokenizer.encode("Friar", add_special_tokens=False).ids
    outputs, _ = run(ex, 1, prompt, friar)
    assert outputs[-1] == EOS
    assert tokenizer.decode(outputs[:-1]) == "Friar Laurence"


def test_ngram_drafts_are_cut_to_the_grammar_valid_prefix(ex, tokenizer):
    prompt = tokenizer.encode("ROMEO:\nWho comes?\n").ids
    r_tok = tokenizer.encode("R", add_special_tokens=False).ids
    bad = tokenizer.encode(" night", add_special_tokens=False).ids[:1]
    outputs, (res, mirror) = run(ex, 2, prompt, [], drafts=r_tok + bad + bad)
    # the forward ran over the valid draft only: the two breaking ones were cut
    assert mirror == prompt + r_tok
    assert res.num_accepted_drafts <= 1
    assert tokenizer.decode(outputs[:-1]) in CHOICES and outputs[-1] == EOS


def test_a_bad_constraint_is_refused_with_its_reason(ex):
    bad = SamplingParams(structured=StructuredOutput("regex", "(a"))
    plan = SeqPlan(3, [5, 6], 0, [0], True, NewSeq(bad, 2))
    with pytest.raises(ValueError, match="invalid regex"):
        ex.execute(StepPlan(0, [plan]))
    assert 3 not in ex.worker.seqs


def test_draft_model_drafts_are_sampled_under_the_grammar(tokenizer):
    """The draft model's drafts for a constrained sequence are all grammar-valid (the
    mask reaches its sampling rows through SeqState.sample_row), so none is cut."""
    from tandem.engine.builtin import BUILTIN_DRAFT
    from tandem.engine.spec_config import SpeculativeConfig
    from tandem.engine.structured import GrammarCompiler, load_ll_tokenizer

    if not (BUILTIN_DRAFT / "model.safetensors").exists():
        pytest.skip("built-in draft model not trained")
    spec = SpeculativeConfig(speculative_method="draft")
    config = EngineConfig(dtype="float32", kv_cache_memory=8 << 20, max_model_len=128)
    ex = UniExecutor(config, spec)
    so = StructuredOutput("regex", "[a-z]{4}[0-9]{4}")
    sampling = SamplingParams(temperature=0.9, seed=3, max_tokens=20, structured=so)
    prompt = tokenizer.encode("ROMEO:\nWhat light through yonder window breaks?\n").ids
    plan = SeqPlan(7, prompt, 0, [0, 1, 2, 3], True, NewSeq(sampling, len(prompt)), 4)
    try:
        ex.execute(StepPlan(0, [plan]))
        drafts = ex.worker.seqs[7].token_ids[len(prompt) :]
    finally:
        ex.shutdown()
    assert len(drafts) == 4  # none cut
    compiler = GrammarCompiler(load_ll_tokenizer(BUILTIN_TARGET, 4096, (EOS,)), 4096)
    assert compiler.new_state(so).valid_prefix(drafts) == 4
