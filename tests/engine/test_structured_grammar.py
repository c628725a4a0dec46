"""Structured output, grammar side: constraint checks, grammars per kind, the compiled
grammar cache and a sequence's GrammarState (sync, rollback, draft masks, draft cut).

Uses the built-in model's tokenizer (4096 tokens, eos 1); no model weights needed."""

from __future__ import annotations

import json

import pytest

from tandem.engine.builtin import BUILTIN_TARGET
from tandem.engine.plan import StructuredOutput
from tandem.engine.structured import (
    GrammarCompiler,
    check_structured,
    load_ll_tokenizer,
    to_grammar,
)

VOCAB = 4096
EOS = 1


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    return GrammarCompiler(load_ll_tokenizer(BUILTIN_TARGET, VOCAB, (EOS,)), VOCAB, cache_size=2)


def allowed(mask: bytes) -> set[int]:
    words = [int.from_bytes(mask[i : i + 4], "little") for i in range(0, len(mask), 4)]
    return {32 * w + b for w, word in enumerate(words) for b in range(32) if word >> b & 1}


def texts(compiler: GrammarCompiler, mask: bytes) -> set[str]:
    return {compiler.tokenizer.decode_str([t]) for t in allowed(mask) if t != EOS}


def encode(compiler: GrammarCompiler, text: str) -> list[int]:
    return compiler.tokenizer.tokenize_str(text)


@pytest.mark.parametrize(
    ("kind", "spec", "message"),
    [
        ("json_schema", "{bad", "not valid JSON"),
        ("json_schema", "[1, 2]", "must be a JSON object"),
        ("json_schema", '{"type": "strin"}', "Invalid type: strin"),
        ("json_schema", '{"not": {"type": "null"}}', "Unimplemented keys"),
        ("json_schema", '{"$ref": "#/definitions/nope"}', "does not exist"),
        ("json_schema", '{"type": "string", "pattern": "(?=a)"}', "look-around"),
        ("regex", "[0-", "unclosed character class"),
        ("regex", "", "must not be empty"),
        ("choice", "[]", "at least one string"),
        ("choice", '["a", 1]', "list of strings"),
        ("choice", '{"a": 1}', "list of strings"),
        ("choice", "not json", "not valid JSON"),
        ("grammar", "start: foo", 'unknown name: "foo"'),
        ("grammar", 'root ::= "a" | b', "Rule 'b' not found"),
        ("grammar", "  ", "must not be empty"),
    ],
)
def test_check_structured_names_the_problem(kind, spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("?", r"\?")) as e:
        check_structured(StructuredOutput(kind, spec))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("kind", "spec"),
    [
        ("json_object", ""),
        ("json_schema", '{"type": "object", "properties": {"a": {"type": "integer"}}}'),
        ("json_schema", "true"),
        ("regex", "[a-z]+@[a-z]+\\.com"),
        ("choice", '["yes", "no \\"way\\"", "a|b"]'),
        ("grammar", 'start: "a" b\nb: /[0-9]+/'),
        ("grammar", 'root ::= "x" [0-9]+'),
    ],
)
def test_valid_constraints_pass_and_compile(kind, spec, compiler):
    so = StructuredOutput(kind, spec)
    check_structured(so)
    assert compiler.compile(so) is not None


def test_unknown_kind_is_refused_by_the_contract():
    with pytest.raises(ValueError, match="kind must be one of"):
        StructuredOutput("yaml", "")


def test_to_grammar_per_kind():
    assert '"type":"object"' in to_grammar(StructuredOutput("json_object", "")).replace(" ", "")
    compact = to_grammar(StructuredOutput("json_schema", '{"type": "integer"}'))
    assert '"whitespace_flexible":false' in compact.replace(" ", "")
    assert "[0-9]{2}" in to_grammar(StructuredOutput("regex", "[0-9]{2}"))
    choice = to_grammar(StructuredOutput("choice", '["a", "b\\"c", "a"]'))
    assert choice == 'start: "a" | "b\\"c"'  # duplicates dropped, JSON escapes
    assert "start:" in to_grammar(StructuredOutput("grammar", 'root ::= "x" | "y"'))
    assert to_grammar(StructuredOutput("grammar", 'start: "x"')) == 'start: "x"'


def _generate(compiler, state, text_tokens):
    """Consume text_tokens one by one through sync, checking each is allowed first."""
    for i, tok in enumerate(text_tokens):
        state.sync(text_tokens[:i])
        assert tok in allowed(state.bitmask()), (i, tok)
    state.sync(text_tokens)


def test_choice_walks_to_eos(compiler):
    state = compiler.new_state(StructuredOutput("choice", '["ROMEO", "JULIET"]'))
    first = texts(compiler, state.bitmask())
    assert first and all("ROMEO".startswith(t) or "JULIET".startswith(t) for t in first)
    ids = encode(compiler, "JULIET")
    _generate(compiler, state, ids)
    assert allowed(state.bitmask()) == {EOS}  # complete: only eos
    state.sync(ids + [EOS])
    assert allowed(state.bitmask()) == {EOS}


def test_sync_rolls_back_dropped_tokens(compiler):
    state = compiler.new_state(StructuredOutput("regex", "(ab|cd)[0-9]"))
    fresh = state.bitmask()
    a, b = encode(compiler, "a"), encode(compiler, "b")
    state.sync(a + b)
    assert state.consumed == a + b
    state.sync([])  # preempted back, or a different history
    assert state.consumed == [] and state.bitmask() == fresh
    c = encode(compiler, "c")
    state.sync(c)
    assert texts(compiler, state.bitmask()) == {"d"}


def test_draft_masks_are_tentative(compiler):
    state = compiler.new_state(StructuredOutput("regex", "[0-9]{3}x"))
    digits = encode(compiler, "1") + encode(compiler, "2") + encode(compiler, "3")
    before = state.bitmask()
    assert texts(compiler, state.bitmask(digits)) == {"x"}
    assert state.bitmask() == before and state.consumed == []
    assert state.valid_prefix(digits + encode(compiler, "4")) == 3
    assert state.valid_prefix(encode(compiler, "x") + digits) == 0
    state.sync(digits[:1])
    assert state.valid_prefix(digits[1:] + encode(compiler, "x") + [EOS, 5]) == 4


def test_committed_tokens_the_grammar_refuses_leave_eos_only(compiler):
    """Past the grammar's eos (ignore_eos) the outputs go on; the mask stays eos."""
    state = compiler.new_state(StructuredOutput("choice", '["no"]'))
    ids = encode(compiler, "no")
    state.sync(ids + [EOS, 7, 7])
    assert state.num_rejected == 2 and allowed(state.bitmask()) == {EOS}
    assert state.valid_prefix([7]) == 0
    state.sync([])  # a shorter history heals it
    assert state.num_rejected == 0 and EOS not in allowed(state.bitmask())


def test_json_schema_mask_follows_the_schema(compiler):
    schema = {"type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"]}
    state = compiler.new_state(StructuredOutput("json_schema", json.dumps(schema)))
    ids = encode(compiler, '{"n":')
    _generate(compiler, state, ids)
    assert texts(compiler, state.bitmask()) <= {"1", "2"}


def test_cache_is_bounded_lru(compiler):
    kinds = [StructuredOutput("regex", f"[0-9]{{{n}}}") for n in (1, 2, 3)]
    m1 = compiler.compile(kinds[0])
    assert compiler.compile(kinds[0]) is m1
    compiler.compile(kinds[1])
    compiler.compile(kinds[0])  # most recent again
    compiler.compile(kinds[2])  # evicts kinds[1]
    assert compiler.compile(kinds[0]) is m1
    assert len(compiler._cache) == 2 and ("regex", "[0-9]{2}") not in compiler._cache
    # states are copies: advancing one leaves the template and its siblings alone
    s1, s2 = compiler.new_state(kinds[0]), compiler.new_state(kinds[0])
    s1.sync(encode(compiler, "5"))
    assert allowed(s1.bitmask()) == {EOS} and EOS not in allowed(s2.bitmask())


def test_bad_constraint_does_not_compile(compiler):
    with pytest.raises(ValueError, match="invalid regex"):
        compiler.compile(StructuredOutput("regex", "(a"))
