"""Property tests (hypothesis) on the built-in model's tokenizer, the incremental
detokenizer and stop strings: round trips, and streaming == decoding all at once for
arbitrary token ids and arbitrary splits into steps."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.engine.builtin import BUILTIN_TARGET
from tandem.server.stops import StopMatcher
from tandem.server.tokenizer import Tokenizer

PROPS = settings(
    max_examples=150,
    derandomize=True,  # the same cases on every run
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    if not (BUILTIN_TARGET / "tokenizer.json").exists():
        pytest.skip(f"the built-in tokenizer is missing ({BUILTIN_TARGET})")
    return Tokenizer.from_dir(BUILTIN_TARGET)


def token_ids(max_size: int = 40) -> st.SearchStrategy[list[int]]:
    # The built-in vocabulary: 4096 ids, the first 6 of them special tokens.
    return st.lists(st.integers(0, 4095), max_size=max_size)


def split(ids: list[int], cuts: list[int]) -> list[list[int]]:
    """`ids` cut at the given positions (sorted, clipped): the steps of a stream."""
    points = sorted({min(c, len(ids)) for c in cuts})
    bounds = [0, *points, len(ids)]
    return [ids[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def stream_text(tok: Tokenizer, prompt: list[int], steps: list[list[int]], skip: bool) -> str:
    detok = tok.detokenizer(prompt, skip_special_tokens=skip)
    return "".join(detok.push(step) for step in steps) + detok.flush()


@PROPS
@given(text=st.text(max_size=200))
def test_encode_decode_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids, skip_special_tokens=False) == text


@PROPS
@given(
    prompt=st.text(max_size=40),
    ids=token_ids(),
    cuts=st.lists(st.integers(0, 40), max_size=12),
    skip=st.booleans(),
)
def test_streamed_text_equals_full_decode(tok, prompt, ids, cuts, skip):
    """Arbitrary output ids (partial UTF-8 characters and special tokens included) after
    a real prompt: the streamed deltas join to exactly the text of decoding them all."""
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    streamed = stream_text(tok, prompt_ids, split(ids, cuts), skip)
    assert streamed == tok.decode(ids, skip_special_tokens=skip)


@PROPS
@given(prompt=token_ids(8), ids=token_ids(), cuts=st.lists(st.integers(0, 40), max_size=12))
def test_streaming_does_not_depend_on_step_boundaries(tok, prompt, ids, cuts):
    """Even after an arbitrary (invalid) prompt, how the outputs are split into steps
    does not change the text."""
    whole = stream_text(tok, prompt, [ids], True)
    one_by_one = stream_text(tok, prompt, [[i] for i in ids], True)
    assert stream_text(tok, prompt, split(ids, cuts), True) == whole == one_by_one


@PROPS
@given(text=st.text(max_size=40))
def test_streamed_round_trip_of_text(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert stream_text(tok, [], [[i] for i in ids], False) == text


def reference_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut before the stop string completed first (the earliest end; the longer one on a
    tie), as a stream that sees the text grow character by character would."""
    hits = [(p + len(s), -len(s), p) for s in stops if (p := text.find(s)) >= 0]
    if not hits:
        return text, False
    return text[: min(hits)[2]], True


def stop_stream(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out, hit = [], False
    for piece in pieces:
        released, hit = matcher.push(piece)
        out.append(released)
        if hit:
            break
    if not hit:
        out.append(matcher.flush())
    return "".join(out), hit


@settings(PROPS, max_examples=600)  # pure Python: cheap, and overlaps are rare
@given(
    text=st.text(alphabet="ab\n", max_size=30),
    stops=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_stop_strings_do_not_depend_on_step_boundaries(text, stops, cuts):
    points = sorted({min(c, len(text)) for c in cuts})
    bounds = [0, *points, len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert stop_stream(stops, pieces) == reference_stop(text, stops)
