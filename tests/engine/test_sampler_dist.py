"""What the sampler draws: greedy, temperature, top-k / top-p / min-p, seeded noise.

Distribution tests draw N tokens from one big batch of identical rows with seeds
0..N-1; the noise is deterministic, so so are these tests. Tolerances: with N = 40000
a frequency's standard error is at most 0.0025, and we allow 0.012 (~5 se).
"""

import math

import torch

from tandem.engine.plan import SamplingParams
from tandem.engine.sampler import Sampler, SampleRow, SamplingMetadata
from tandem.engine.sampling_noise import SAMPLE_STREAM, to_int64, uniform_noise

N = 40000
TOL = 0.012


def row(params: SamplingParams, seed: int = 0, pos: int = 0, out: list[int] | None = None):
    return SampleRow(params, seed, pos, prompt_token_ids=[1, 2], output_token_ids=out or [])


def run(logits: torch.Tensor, rows: list[SampleRow], eos=(0,)) -> torch.Tensor:
    meta = SamplingMetadata.build(rows, eos, logits.shape[-1], "cpu")
    return Sampler()(logits, meta).token_ids


def draw(probs: list[float], params: SamplingParams, n: int = N) -> torch.Tensor:
    """Frequencies (V,) of n seeded draws from logits log(probs)."""
    logits = torch.tensor(probs).log().expand(n, -1).contiguous()
    tokens = run(logits, [row(params, seed=s) for s in range(n)], eos=(len(probs) - 1,))
    return tokens.bincount(minlength=len(probs)).double() / n


def chi2_ok(freq: torch.Tensor, want: torch.Tensor, n: int = N) -> bool:
    """Chi-square over the categories with want > 0, at p = 0.001 (Wilson-Hilferty)."""
    keep = want > 0
    obs, exp = freq[keep] * n, want[keep].double() * n
    stat = ((obs - exp) ** 2 / exp).sum().item()
    k = int(keep.sum()) - 1
    if k == 0:
        return stat == 0
    crit = k * (1 - 2 / (9 * k) + 3.09 * math.sqrt(2 / (9 * k))) ** 3
    return stat < crit


def assert_matches(freq: torch.Tensor, want: torch.Tensor) -> None:
    want = want.double() / want.sum()
    assert torch.all(freq[want == 0] == 0), f"dropped tokens drawn: {freq}"
    assert (freq - want).abs().max() < TOL, f"{freq} vs {want}"
    assert chi2_ok(freq, want), f"{freq} vs {want}"


def test_greedy_is_argmax_also_beside_sampling_rows():
    logits = torch.randn(12, 300, generator=torch.Generator().manual_seed(0))
    rows = [row(SamplingParams(temperature=0.0 if i % 2 else 0.7, seed=i)) for i in range(12)]
    tokens = run(logits, rows)
    assert torch.equal(tokens[1::2], logits[1::2].argmax(-1))
    all_greedy = run(logits, [row(SamplingParams(temperature=0.0)) for _ in range(12)])
    assert torch.equal(all_greedy, logits.argmax(-1))


def test_temperature_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 0.3])
    for t in (0.5, 1.0, 1.7):
        freq = draw(logits.softmax(-1).tolist(), SamplingParams(temperature=t))
        assert_matches(freq, (logits / t).softmax(-1))


def test_top_k_keeps_the_k_most_likely():
    probs = torch.tensor([0.05, 0.3, 0.1, 0.2, 0.15, 0.02, 0.08, 0.1])
    freq = draw(probs.tolist(), SamplingParams(top_k=3))
    assert_matches(freq, torch.tensor([0, 0.3, 0, 0.2, 0.15, 0, 0, 0]))


def test_top_p_keeps_the_smallest_set_with_enough_mass():
    probs = [0.1, 0.4, 0.05, 0.3, 0.15]
    # mass before each, most likely first: 0, .4, .7, .85 -> keep .4, .3, .15
    assert_matches(draw(probs, SamplingParams(top_p=0.8)), torch.tensor([0, 0.4, 0, 0.3, 0.15]))
    # the top token is kept even when it alone exceeds top_p
    assert_matches(draw(probs, SamplingParams(top_p=0.1)), torch.tensor([0, 1.0, 0, 0, 0]))


def test_top_p_applies_to_the_renormalised_top_k():
    probs = [0.1, 0.4, 0.05, 0.3, 0.15]
    # top-2 renormalised: .571, .429 -> top_p 0.5 keeps only the first. (On the
    # original distribution the second would survive: mass before it is 0.4 < 0.5.)
    freq = draw(probs, SamplingParams(top_k=2, top_p=0.5))
    assert_matches(freq, torch.tensor([0, 1.0, 0, 0, 0]))
    freq = draw(probs, SamplingParams(top_k=2, top_p=0.6, temperature=1.0))
    assert_matches(freq, torch.tensor([0, 0.4, 0, 0.3, 0]))


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    probs = [0.06, 0.5, 0.15, 0.25, 0.04]
    # min_p 0.2: drop p < 0.1
    assert_matches(draw(probs, SamplingParams(min_p=0.2)), torch.tensor([0, 0.5, 0.15, 0.25, 0]))


def test_filters_and_temperature_in_one_mixed_batch():
    """Rows with different settings in one batch each get their own distribution."""
    probs = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    settings = [
        SamplingParams(top_k=2),
        SamplingParams(top_p=0.7, temperature=2.0),
        SamplingParams(min_p=0.3),
        SamplingParams(temperature=0.0),
    ]
    n = N // 2
    rows = [row(settings[i % 4], seed=i) for i in range(4 * n)]
    tokens = run(probs.log().expand(4 * n, -1).contiguous(), rows, eos=(4,))
    hot = (probs.log() / 2).softmax(-1)
    wants = [
        torch.tensor([0, 0.4, 0, 0.3, 0]),
        # T=2: p ~ sqrt(probs) = .300, .260, .184, .150, .106 (tokens 1, 3, 4, 0, 2);
        # mass before each: 0, .300, .560, .744 -> top_p .7 keeps tokens 1, 3, 4
        torch.tensor([0, hot[1], 0, hot[3], hot[4]]),
        torch.tensor([0, 0.4, 0, 0.3, 0.15]),  # drop p < 0.12
        torch.tensor([0, 1.0, 0, 0, 0]),
    ]
    for i, want in enumerate(wants):
        freq = tokens[i::4].bincount(minlength=5).double() / n
        want = want.double() / want.sum()
        assert torch.all(freq[want == 0] == 0)
        assert (freq - want).abs().max() < 2 * TOL and chi2_ok(freq, want, n)


def test_seeded_token_ignores_batch_composition_and_order():
    g = torch.Generator().manual_seed(1)
    target = torch.randn(1, 2000, generator=g) * 3
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=200, seed=1234)
    for pos in range(30):
        mine = row(params, seed=1234, pos=pos, out=[5] * pos)
        alone = run(target, [mine]).item()
        others = [
            row(SamplingParams(temperature=0.0)),
            row(SamplingParams(repetition_penalty=1.3, frequency_penalty=0.2), seed=7, out=[4]),
            row(SamplingParams(temperature=1.2, min_p=0.1), seed=1234, pos=pos + 1),
            row(SamplingParams(top_k=5, logit_bias={3: 2.0}), seed=99, pos=pos),
            row(SamplingParams(logprobs=3), seed=1235, pos=pos),
        ]
        batch_logits = torch.randn(5, 2000, generator=g)
        for at in (0, 3, 5):
            rows = others[:at] + [mine] + others[at:]
            logits = torch.cat([batch_logits[:at], target, batch_logits[at:]])
            assert run(logits, rows)[at].item() == alone, (pos, at)


def test_seeded_draws_change_with_position_and_seed_not_with_repeats():
    logits = torch.zeros(1, 1000)  # uniform: the noise alone picks the token
    by_pos = [run(logits, [row(SamplingParams(), seed=5, pos=p)]).item() for p in range(40)]
    assert len(set(by_pos)) > 30
    by_seed = [run(logits, [row(SamplingParams(), seed=s, pos=3)]).item() for s in range(40)]
    assert len(set(by_seed)) > 30
    again = [run(logits, [row(SamplingParams(), seed=5, pos=p)]).item() for p in range(40)]
    assert again == by_pos


def test_rows_of_one_request_at_successive_positions_match_separate_steps():
    """Speculative verification samples positions p..p+k in one step: same tokens."""
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=0.8, seed=77)
    together = run(logits, [row(params, seed=77, pos=10 + j) for j in range(4)])
    apart = [run(logits[j : j + 1], [row(params, seed=77, pos=10 + j)]).item() for j in range(4)]
    assert together.tolist() == apart


def test_low_precision_logits_are_accepted():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(3))
    rows = [row(SamplingParams(temperature=0.0)) for _ in range(3)]
    assert torch.equal(run(logits.bfloat16(), rows), logits.bfloat16().float().argmax(-1))


def test_draw_is_gumbel_max_over_the_public_uniform_noise():
    """The documented contract speculative verification builds on: the token of a
    (seed, pos) row is argmax(logits / T - log(-log(u))), u = uniform_noise(stream 0)."""
    logits = torch.randn(6, 700, generator=torch.Generator().manual_seed(4))
    seeds, positions = [3, 2**63 + 9, 17, 17, 5, 0], [0, 4, 4, 5, 100, 2]
    rows = [
        row(SamplingParams(temperature=0.6), s, p) for s, p in zip(seeds, positions, strict=True)
    ]
    u = uniform_noise(
        torch.tensor([to_int64(s) for s in seeds]), torch.tensor(positions), SAMPLE_STREAM, 700
    )
    want = (logits / 0.6 - (-u.log()).log()).argmax(-1)
    assert torch.equal(run(logits, rows), want)
