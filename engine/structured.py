"""Structured output with llguidance: check a constraint, compile it once, track it per
sequence, and give the sampler the allowed-token bitmask of each constrained row.

Torch-free: the server imports `check_structured` to answer a bad constraint with a 400.

A bitmask is `bytes` of W = ceil(V / 32) little-endian int32 words; bit i of word w
allows token 32 * w + i (llguidance's layout). Example: V = 64 and only token 33
allowed -> words [0, 2].

Why llguidance (not xgrammar): its core is torch-free Rust (no resolver risk for the
torch pin), it takes JSON schema, regex, Lark and GBNF, it can roll back and validate
draft tokens, and a mask costs tens of microseconds.

When the grammar is complete the matcher allows only eos, so the request ends with
finish_reason "stop". With ignore_eos the scheduler keeps going past that eos; the
mask then stays eos-only and the request runs to max_tokens emitting eos.
"""

from __future__ import annotations

import functools
import json
from collections import OrderedDict
from pathlib import Path

import llguidance
from llguidance.gbnf_to_lark import GbnfToLarkError, gbnf_to_lark

from tandem.engine.plan import StructuredOutput

__all__ = [
    "GrammarCompiler",
    "GrammarState",
    "check_structured",
    "check_structured_cached",
    "load_ll_tokenizer",
    "to_grammar",
]

# Compact JSON: no free whitespace between tokens, so a small model cannot pad its way
# to max_tokens. A schema's own "x-guidance" options override this.
JSON_DEFAULTS: dict = {"whitespace_flexible": False}


def to_grammar(so: StructuredOutput) -> str:
    """The llguidance grammar (its JSON grammar format) for `so`, unvalidated.

    Raises ValueError for a spec that is not even well-formed (bad JSON, a choice list
    that is not a non-empty list of strings, a GBNF grammar that does not parse)."""
    if so.kind == "json_object":
        return _json_grammar({"type": "object"})
    if so.kind == "json_schema":
        return _json_grammar(_load_json(so.spec, "json_schema"))
    if so.kind == "regex":
        if not so.spec:
            raise ValueError("regex must not be empty")
        return llguidance.LLMatcher.grammar_from_regex(so.spec)
    if so.kind == "choice":
        return llguidance.LLMatcher.grammar_from_lark(_choice_lark(so.spec))
    return llguidance.LLMatcher.grammar_from_lark(_lark_text(so.spec))


def check_structured(so: StructuredOutput) -> None:
    """Raise ValueError naming the problem if `so` cannot be compiled: bad JSON, an
    invalid schema or one using an unsupported feature, a bad regex, an empty choice
    list, a grammar syntax error. Needs no tokenizer."""
    grammar = to_grammar(so)
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(f"invalid {so.kind} constraint: {_first_line(error)}")


@functools.lru_cache(maxsize=256)
def check_structured_cached(so: StructuredOutput) -> None:
    """`check_structured`, remembered for constraints that passed (a schema is compiled
    once however many requests repeat it). For the engine's own admission check."""
    check_structured(so)


def _json_grammar(schema: object) -> str:
    if schema is False:
        raise ValueError("json_schema false accepts no value")
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise ValueError(
            f"json_schema must be a JSON object (or boolean), got {type(schema).__name__}"
        )
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)


def _load_json(spec: str, what: str) -> object:
    try:
        return json.loads(spec)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not valid JSON: {e}") from None


def _choice_lark(spec: str) -> str:
    """`start: "a" | "b"`: exactly one of the strings (JSON string escapes are Lark's)."""
    choices = _load_json(spec, "choice")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise ValueError("choice must be a JSON list of strings")
    if not choices:
        raise ValueError("choice must list at least one string")
    if any(c == "" for c in choices):
        raise ValueError("choice strings must not be empty")
    return "start: " + " | ".join(json.dumps(c) for c in dict.fromkeys(choices))


def _lark_text(spec: str) -> str:
    """A Lark grammar as is; a GBNF grammar (it has `::=`) converted to Lark."""
    if not spec.strip():
        raise ValueError("grammar must not be empty")
    if "::=" not in spec:
        return spec
    try:
        return gbnf_to_lark(spec)
    except (GbnfToLarkError, Exception) as e:  # the converter raises bare Exceptions too
        raise ValueError(f"invalid GBNF grammar: {_first_line(str(e))}") from None


def _first_line(msg: str) -> str:
    """llguidance's multi-line message on one line, without its caret pointer lines."""
    lines = [ln.strip() for ln in msg.strip().splitlines()]
    lines = [ln for ln in lines if ln.strip("^ ")]
    return "; ".join(lines)[:400] if lines else "unknown error"


def load_ll_tokenizer(
    model_dir: str | Path, vocab_size: int, eos_token_ids: tuple[int, ...]
) -> llguidance.LLTokenizer:
    """The llguidance tokenizer of a model directory (tokenizer.json, else the HF fast
    tokenizer), sized to the model's logits (vocab_size = V) with the model's eos ids.
    Takes tens of milliseconds for a small vocabulary: build it once per engine."""
    if not eos_token_ids:
        raise ValueError("structured output needs the model's eos token id(s)")
    path = Path(model_dir) / "tokenizer.json"
    eos = list(eos_token_ids)
    if path.is_file():
        from tokenizers import Tokenizer

        return llguidance.LLTokenizer(
            Tokenizer.from_file(str(path)).to_str(), n_vocab=vocab_size, eos_token=eos
        )
    from llguidance.hf import from_tokenizer
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(model_dir))
    return from_tokenizer(hf_tok, n_vocab=vocab_size, eos_token=eos)


class GrammarCompiler:
    """Compiles constraints for one engine, keeping the last `cache_size` compiled
    grammars (LRU keyed by (kind, spec)); each sequence gets a copy of the template."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, vocab_size: int, cache_size: int = 64):
        """tokenizer: from `load_ll_tokenizer`; vocab_size: V, the logits' last dim."""
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self.eos_mask = _eos_mask(tokenizer.eos_tokens, vocab_size)

    def compile(self, so: StructuredOutput) -> llguidance.LLMatcher:
        """The pristine (never advanced) matcher of `so`, from the cache when there.
        Raises ValueError naming the problem for a constraint that does not compile."""
        key = (so.kind, so.spec)
        matcher = self._cache.get(key)
        if matcher is not None:
            self._cache.move_to_end(key)
            return matcher
        matcher = llguidance.LLMatcher(self.tokenizer, to_grammar(so), log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid {so.kind} constraint: {_first_line(matcher.get_error())}")
        self._cache[key] = matcher
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return matcher

    def new_state(self, so: StructuredOutput) -> GrammarState:
        return GrammarState(self.compile(so).deep_copy(), self.eos_mask)


def _eos_mask(eos_token_ids: list[int], vocab_size: int) -> bytes:
    words = [0] * -(-vocab_size // 32)
    for tok in eos_token_ids:
        words[tok // 32] |= 1 << (tok % 32)
    return b"".join((w & 0xFFFFFFFF).to_bytes(4, "little") for w in words)


class GrammarState:
    """One sequence's grammar position: an `LLMatcher` that follows the sequence's
    committed outputs (the worker's mirror is the truth) and can look ahead over drafts.

    Invariant between calls: the matcher has consumed exactly `self.consumed`, a prefix
    of the outputs last synced to; `self.num_rejected` committed outputs after it were
    refused by the grammar (only possible past the grammar's eos, with ignore_eos)."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_mask: bytes) -> None:
        """matcher: a fresh copy, owned by this state; eos_mask: the eos-only bitmask."""
        self.matcher = matcher
        self.eos_mask = eos_mask
        self.consumed: list[int] = []
        self.num_rejected = 0

    def sync(self, outputs: list[int]) -> None:
        """Make the matcher's consumed tokens equal `outputs` (all committed outputs so
        far): roll back what is no longer there, consume what is new."""
        n = len(self.consumed)
        common = n if outputs[:n] == self.consumed else _common_prefix(self.consumed, outputs)
        if common < n:
            if not self.matcher.rollback(n - common):
                raise RuntimeError(f"grammar rollback failed: {self.matcher.get_error()}")
            del self.consumed[common:]
        new = outputs[common:]
        ok = self.matcher.validate_tokens(new) if new else 0
        if ok:
            self._consume(new[:ok])
            self.consumed.extend(new[:ok])
        self.num_rejected = len(new) - ok

    def bitmask(self, drafts: list[int] = ()) -> bytes:
        """Allowed next tokens after the synced outputs + `drafts` (consumed tentatively,
        rolled back before returning). Eos only once the grammar is done or refused a
        token; drafts past the first the grammar refuses are ignored."""
        if self.num_rejected or self.matcher.is_stopped():
            return self.eos_mask
        drafts = list(drafts)
        n = self.matcher.validate_tokens(drafts) if drafts else 0
        if n:
            self._consume(drafts[:n])
        try:
            if self.matcher.is_stopped():
                return self.eos_mask
            return self.matcher.compute_bitmask()[: len(self.eos_mask)]
        finally:
            if n and not self.matcher.rollback(n):
                raise RuntimeError(f"grammar rollback failed: {self.matcher.get_error()}")

    def valid_prefix(self, drafts: list[int]) -> int:
        """How many leading drafts the grammar accepts after the synced outputs."""
        if self.num_rejected or not drafts:
            return 0
        return self.matcher.validate_tokens(list(drafts))

    def _consume(self, tokens: list[int]) -> None:
        if not self.matcher.consume_tokens(tokens):
            raise RuntimeError(f"grammar refused validated tokens: {self.matcher.get_error()}")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
