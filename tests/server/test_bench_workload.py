"""The benchmark's workloads: parsing, seeded determinism, lengths, arrivals, datasets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tandem.engine.builtin import BUILTIN_TARGET
from tandem.server.bench_workload import (
    TokenizerPrompts,
    WordPrompts,
    WorkloadSpec,
    build_workload,
    parse_arrival,
    parse_length,
)


def spec(**kw) -> WorkloadSpec:
    base = dict(
        num_requests=50,
        input_len=parse_length("uniform:4:40"),
        output_len=parse_length("normal:20:5"),
        seed=3,
    )
    return WorkloadSpec(**(base | kw))


def test_same_seed_same_workload_other_seed_differs():
    a = build_workload(spec(), WordPrompts(), parse_arrival("poisson:5"))
    b = build_workload(spec(), WordPrompts(), parse_arrival("poisson:5"))
    c = build_workload(spec(seed=4), WordPrompts(), parse_arrival("poisson:5"))
    assert a == b
    assert [r.prompt for r in a] != [r.prompt for r in c]


def test_lengths_follow_their_distributions():
    reqs = build_workload(spec(), WordPrompts(), parse_arrival("burst"))
    assert all(4 <= r.input_len <= 40 for r in reqs)
    assert all(len(r.prompt.split()) == r.input_len for r in reqs)
    assert all(1 <= r.max_tokens <= 40 for r in reqs)
    assert len({r.input_len for r in reqs}) > 5  # not constant
    assert [r.index for r in reqs] == list(range(50))


def test_mixed_and_constant_lengths():
    rng = np.random.default_rng(0)
    draws = parse_length("mixed:8:300:0.25").sample(rng, 2000)
    assert set(draws) == {8, 300}
    assert 0.2 < draws.count(300) / 2000 < 0.3
    assert parse_length("7").sample(rng, 3) == [7, 7, 7]
    normal = parse_length("normal:10:30").sample(rng, 500)
    assert min(normal) >= 1 and max(normal) <= 20  # clipped to [1, 2*mean]


@pytest.mark.parametrize(
    "text", ["", "uniform:5", "uniform:9:3", "normal:x:1", "mixed:1:2:1.5", "zipf:3", "constant:0"]
)
def test_bad_length_is_a_clear_error(text):
    with pytest.raises(ValueError, match="length distribution"):
        parse_length(text)


def test_arrivals():
    burst = build_workload(spec(), WordPrompts(), parse_arrival("burst"))
    assert all(r.arrival_s == 0 for r in burst)
    pois = build_workload(spec(num_requests=2000), WordPrompts(), parse_arrival("poisson:10"))
    times = [r.arrival_s for r in pois]
    assert times[0] == 0 and times == sorted(times)
    assert 9.0 < len(times) / times[-1] < 11.0  # mean rate 10/s
    assert parse_arrival("concurrency:4").value == 4
    for bad in ("poisson:0", "concurrency:1.5", "steady", "burst:3", "poisson:"):
        with pytest.raises(ValueError, match="bad arrival"):
            parse_arrival(bad)


def test_dataset_prompts_cycle_and_override_output_len(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "hello there", "output_len": 5}, {"prompt": "second"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    reqs = build_workload(
        spec(num_requests=5, dataset=str(path), output_len=parse_length("9")),
        WordPrompts(),
        parse_arrival("burst"),
    )
    assert [r.prompt for r in reqs] == ["hello there", "second"] * 2 + ["hello there"]
    assert [r.max_tokens for r in reqs] == [5, 9, 5, 9, 5]


def test_bad_dataset_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object"):
        build_workload(spec(dataset=str(path)), WordPrompts(), parse_arrival("burst"))


def test_tokenizer_prompts_have_the_requested_token_count():
    if not (BUILTIN_TARGET / "tokenizer.json").exists():
        pytest.skip("the built-in tokenizer is missing")
    src = TokenizerPrompts(BUILTIN_TARGET)
    rng = np.random.default_rng(1)
    counts = [src.count(src.make(n, rng)) for n in (1, 16, 100, 300)]
    # Re-encoding random ids may merge a token at a boundary; allow a token of slack.
    assert all(abs(c - n) <= 1 for c, n in zip(counts, (1, 16, 100, 300), strict=True))
    assert src.make(50, np.random.default_rng(5)) == src.make(50, np.random.default_rng(5))


def test_tokenizer_dir_without_tokenizer_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        TokenizerPrompts(tmp_path)
