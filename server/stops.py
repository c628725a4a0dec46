"""Stop strings, matched on the detokenized text across token boundaries."""

from __future__ import annotations


class StopMatcher:
    """Holds back text that could be the start of a stop string; cuts at the first match.

    Released text never ends with a proper prefix of a stop string, so any match lies
    entirely in the held-back buffer plus the new text. Per call the work is bounded by
    the longest stop string, not by the length of the output.

    Example (stop=["\\n\\n"]):
        push("Hello\\n") -> ("Hello", False)     # "\\n" could start "\\n\\n": held back
        push("\\nWorld") -> ("", True)           # match: the output ends before it
    """

    def __init__(self, stops: list[str], include_stop: bool = False) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = list(stops)
        self.include_stop = include_stop  # keep the matched stop string in the output
        self.matched: str | None = None  # the stop string that ended the text
        self._held = ""  # text not yet released: a possible start of a stop string
        self._max_hold = max((len(s) for s in stops), default=1) - 1

    def push(self, text: str) -> tuple[str, bool]:
        """Feed new text; return (text safe to release, whether a stop string matched)."""
        if self.matched is not None:
            return "", True
        if not self.stops:
            return text, False
        buf = self._held + text
        hit = self._first_match(buf)
        if hit is not None:
            pos, stop = hit
            self.matched = stop
            self._held = ""
            return buf[: pos + len(stop)] if self.include_stop else buf[:pos], True
        keep = self._hold_length(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Release the held-back text (the request ended without a match)."""
        out, self._held = self._held, ""
        return out

    def _first_match(self, buf: str) -> tuple[int, str] | None:
        """The match that completes first (earliest end; the longer one on a tie), so
        the cut does not depend on how the text was split into pushes: with stops
        ["abc", "b"], "abc" pushed whole or as "ab" + "c" both stop at "a"."""
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self.stops:
            pos = buf.find(stop)
            if pos >= 0 and (best is None or (pos + len(stop), pos) < best[:2]):
                best = (pos + len(stop), pos, stop)
        return None if best is None else (best[1], best[2])

    def _hold_length(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
        for n in range(min(self._max_hold, len(buf)), 0, -1):
            tail = buf[len(buf) - n :]
            if any(stop.startswith(tail) for stop in self.stops):
                return n
        return 0
