"""StopMatcher: stop strings across pieces, held-back text released as soon as safe."""

from __future__ import annotations

import random

import pytest

from tandem.server.stops import StopMatcher


def feed(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = []
    for p in pieces:
        text, matched = matcher.push(p)
        out.append(text)
        if matched:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def test_match_across_pieces_is_cut():
    m = StopMatcher(["\n\n"])
    assert m.push("Hello\n") == ("Hello", False)  # "\n" may start the stop: held back
    assert m.push("\nWorld") == ("", True)
    assert m.matched == "\n\n"
    assert m.push("more") == ("", True)


def test_held_text_is_released_when_it_cannot_match():
    m = StopMatcher(["STOP"])
    assert m.push("a ST") == ("a ", False)
    assert m.push("x") == ("STx", False)
    assert m.push("S") == ("", False)
    assert m.flush() == "S"


def test_include_stop_and_first_completed_match_wins():
    # "cd" completes before "bcde", however the text is split into pushes.
    m = StopMatcher(["cd", "bcde"], include_stop=True)
    assert feed(m, ["ab", "c", "def"]) == ("abcd", True)
    m = StopMatcher(["cd", "bcde"], include_stop=True)
    assert feed(m, ["abcdef"]) == ("abcd", True)
    m = StopMatcher(["de", "bc"])
    assert feed(m, ["abcde"]) == ("a", True)


def test_no_stops_passes_text_through():
    m = StopMatcher([])
    assert m.push("anything") == ("anything", False)


def test_empty_stop_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher([""])


@pytest.mark.parametrize("seed", range(20))
def test_random_splits_equal_whole_text_search(seed):
    rng = random.Random(seed)
    text = "".join(rng.choice("ab\n") for _ in range(40))
    stops = ["".join(rng.choice("ab\n") for _ in range(rng.randint(1, 4))) for _ in range(2)]
    cuts = sorted(rng.sample(range(1, len(text)), 8))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    got, matched = feed(StopMatcher(stops), pieces)
    hits = [text.find(s) for s in stops if s in text]
    if hits:
        assert matched and got == text[: min(hits)]
    else:
        assert not matched and got == text
