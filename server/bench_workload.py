"""Seeded workloads for the serving benchmark: prompts, output lengths and arrival times.

The same (spec, seed) always gives the same requests, so two servers are measured on
identical work. Example:

    spec = WorkloadSpec(num_requests=3, input_len=parse_length("mixed:16:256:0.25"),
                        output_len=parse_length("constant:32"), seed=0)
    reqs = build_workload(spec, WordPrompts(), parse_arrival("poisson:2"))
    # -> 3 BenchRequest, prompts of ~16 or ~256 words, max_tokens 32, arrival times
    #    from exponential gaps of mean 0.5 s
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

LENGTH_KINDS = ("constant", "uniform", "normal", "mixed")
ARRIVAL_KINDS = ("burst", "concurrency", "poisson")


@dataclass(slots=True, frozen=True)
class LengthDist:
    """A distribution of token counts, written `KIND:ARGS`:

    constant:N          always N
    uniform:LO:HI       integers in [LO, HI]
    normal:MEAN:STD     rounded normal, clipped to [1, 2*MEAN]
    mixed:SHORT:LONG:P  LONG with probability P, else SHORT (long and short prompts)
    """

    kind: str  # one of LENGTH_KINDS
    args: tuple[float, ...]  # the numbers after the kind, in the order above

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        """n draws, each an int >= 1."""
        a = self.args
        if self.kind == "constant":
            out = np.full(n, a[0])
        elif self.kind == "uniform":
            out = rng.integers(int(a[0]), int(a[1]) + 1, size=n)
        elif self.kind == "normal":
            out = np.clip(np.rint(rng.normal(a[0], a[1], size=n)), 1, 2 * a[0])
        else:
            out = np.where(rng.random(n) < a[2], a[1], a[0])
        return [max(1, int(x)) for x in out]


_ARITY = {"constant": 1, "uniform": 2, "normal": 2, "mixed": 3}


def parse_length(text: str) -> LengthDist:
    """`constant:128`, `uniform:32:256`, `normal:128:32`, `mixed:32:512:0.2`; a bare
    integer means constant. Raises ValueError with the accepted forms."""
    parts = text.strip().split(":")
    if len(parts) == 1:
        parts = ["constant", parts[0]]
    kind, raw = parts[0], parts[1:]
    if kind not in _ARITY or len(raw) != _ARITY[kind]:
        raise ValueError(
            f"bad length distribution {text!r}: expected constant:N, uniform:LO:HI, "
            "normal:MEAN:STD or mixed:SHORT:LONG:P"
        )
    try:
        args = tuple(float(x) for x in raw)
    except ValueError:
        raise ValueError(f"bad length distribution {text!r}: arguments must be numbers") from None
    counts = args[:2] if kind in ("uniform", "mixed") else args[:1]
    if any(c < 1 for c in counts) or (kind == "uniform" and args[0] > args[1]):
        raise ValueError(f"bad length distribution {text!r}: lengths must be >= 1, LO <= HI")
    if kind == "mixed" and not 0.0 <= args[2] <= 1.0:
        raise ValueError(f"bad length distribution {text!r}: P must be in [0, 1]")
    return LengthDist(kind, args)


@dataclass(slots=True, frozen=True)
class Arrival:
    """When requests are sent: `burst` (all at once), `concurrency:N` (at most N in
    flight, the next sent when one ends) or `poisson:RATE` (requests per second)."""

    kind: str  # one of ARRIVAL_KINDS
    value: float  # N for concurrency, RATE for poisson, 0 for burst

    def label(self) -> str:
        return self.kind if self.kind == "burst" else f"{self.kind}:{self.value:g}"


def parse_arrival(text: str) -> Arrival:
    kind, _, raw = text.strip().partition(":")
    if kind == "burst" and not raw:
        return Arrival("burst", 0.0)
    if kind in ("concurrency", "poisson") and raw:
        try:
            value = float(raw)
        except ValueError:
            value = 0.0
        if value > 0 and (kind == "poisson" or value == int(value)):
            return Arrival(kind, value)
    raise ValueError(
        f"bad arrival {text!r}: expected burst, concurrency:N (N >= 1) or poisson:RATE (> 0)"
    )


class PromptSource(Protocol):
    """Makes a prompt text of about `num_tokens` tokens from the given random stream."""

    def make(self, num_tokens: int, rng: np.random.Generator) -> str: ...


# A small fixed vocabulary: words that most BPE tokenizers keep as one token each.
_WORD_TEXT = (
    "the of and to in is was for that on with as by at from his her which were this "
    "are had not but be have one all they their we an or has been more who will "
    "would there so if what up out about into than them time can only other new some "
    "could these two may first then do any like my now over such our man me even "
    "most made after also did many before must through back years where much your "
    "way well down should because each just those people how too little state good "
    "very make world"
)
WORDS = tuple(_WORD_TEXT.split())


class WordPrompts:
    """Prompts of random common words, one word per requested token (approximate)."""

    def make(self, num_tokens: int, rng: np.random.Generator) -> str:
        picks = rng.integers(0, len(WORDS), size=num_tokens)
        return " ".join(WORDS[i] for i in picks)


class TokenizerPrompts:
    """Prompts of exactly `num_tokens` tokens (where the tokenizer allows) for the
    served model: random non-special token ids, decoded, re-encoded and trimmed until
    the text encodes to the requested count."""

    def __init__(self, model_dir: str | Path) -> None:
        from tokenizers import Tokenizer

        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"--tokenizer: no tokenizer.json in {model_dir}")
        self.tok = Tokenizer.from_file(str(path))
        special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        self.ids = np.array([i for i in range(self.tok.get_vocab_size()) if i not in special])

    def count(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False).ids)

    def make(self, num_tokens: int, rng: np.random.Generator) -> str:
        ids = [int(i) for i in rng.choice(self.ids, size=num_tokens)]
        text = self.tok.decode(ids)
        for _ in range(4):  # re-encoding can merge or split tokens: converge on the count
            ids = self.tok.encode(text, add_special_tokens=False).ids
            if len(ids) == num_tokens:
                break
            if len(ids) < num_tokens:
                ids = ids + [int(i) for i in rng.choice(self.ids, size=num_tokens - len(ids))]
            text = self.tok.decode(ids[:num_tokens])
        return text


@dataclass(slots=True, frozen=True)
class WorkloadSpec:
    """What to send: how many requests, their lengths, the seed, an optional file."""

    num_requests: int  # requests in the run
    input_len: LengthDist  # prompt tokens per request (ignored for a dataset's prompts)
    output_len: LengthDist  # max_tokens per request (a dataset line's "output_len" wins)
    seed: int = 0  # one seed for lengths, prompt contents and Poisson gaps
    dataset: str | None = None  # JSONL: {"prompt": str, "output_len"?: int} per line


@dataclass(slots=True, frozen=True)
class BenchRequest:
    """One request of a workload."""

    index: int  # position in the workload, 0-based
    prompt: str  # prompt text (completions) or the user message (chat)
    input_len: int  # intended prompt tokens (the server's usage is what gets reported)
    max_tokens: int  # output tokens asked for (exact when ignore_eos is honoured)
    arrival_s: float  # send time after the start, for poisson; 0 otherwise


def read_dataset(path: str) -> list[dict[str, object]]:
    """Lines of a JSONL prompt file. Raises ValueError naming the bad line."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f'{path}:{n}: expected an object with a "prompt" string')
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def build_workload(
    spec: WorkloadSpec, prompts: PromptSource, arrival: Arrival
) -> list[BenchRequest]:
    """The requests of `spec` in send order. A dataset is cycled to num_requests."""
    rng = np.random.default_rng(spec.seed)
    n = spec.num_requests
    in_lens = spec.input_len.sample(rng, n)
    out_lens = spec.output_len.sample(rng, n)
    rows = read_dataset(spec.dataset) if spec.dataset else None
    times = arrival_times(arrival, n, rng)
    reqs = []
    for i in range(n):
        if rows is None:
            prompt, in_len = prompts.make(in_lens[i], rng), in_lens[i]
        else:
            row = rows[i % len(rows)]
            prompt, in_len = str(row["prompt"]), 0
            out_lens[i] = int(row.get("output_len", out_lens[i]))  # type: ignore[call-overload]
        reqs.append(BenchRequest(i, prompt, in_len, out_lens[i], times[i]))
    return reqs


def arrival_times(arrival: Arrival, n: int, rng: np.random.Generator) -> list[float]:
    """Send offsets in seconds: exponential gaps for poisson (the first at 0), else 0."""
    if arrival.kind != "poisson" or n == 0:
        return [0.0] * n
    gaps = rng.exponential(1.0 / arrival.value, size=n)
    gaps[0] = 0.0
    return [float(t) for t in np.cumsum(gaps)]
