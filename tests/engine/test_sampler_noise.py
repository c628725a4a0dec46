"""The counter-based noise: exact bits, independence of its inputs, uniformity."""

import math

import pytest
import torch

from tandem.engine.sampling_noise import (
    SAMPLE_STREAM,
    gumbel_noise,
    mix64,
    noise_key_halves,
    noise_keys,
    to_int64,
    uniform_noise,
)

# An independent pure-Python statement of the hash in sampling_noise's docstring.
M64, M32 = (1 << 64) - 1, (1 << 32) - 1


def ref_mix64(z: int) -> int:
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def ref_uniform(seed: int, pos: int, stream: int, j: int) -> float:
    k = ref_mix64(seed + 0x9E3779B97F4A7C15)
    k = ref_mix64(k ^ ((pos + 0xD1B54A32D192ED03) & M64))
    k = ref_mix64(k ^ ((stream + 0xAEF17502108EF2D9) & M64))
    h = ref_fmix32(ref_fmix32((k + (j + 1) * 0x9E3779B9) & M32) ^ (k >> 32))
    return (2 * (h >> 9) + 1) / 2**24


def noise(seeds: list[int], positions: list[int], stream: int, n: int) -> torch.Tensor:
    return uniform_noise(
        torch.tensor([to_int64(s) for s in seeds]), torch.tensor(positions), stream, n
    )


def test_mix64_is_splitmix64():
    # splitmix64 seeded with 0 first returns 0xE220A8397B1DCDAF (its published stream)
    z = torch.tensor([to_int64(0x9E3779B97F4A7C15)])
    assert mix64(z).item() == to_int64(0xE220A8397B1DCDAF)
    for x in (0, 1, 2**63 - 1, 2**63, M64, 0x0123456789ABCDEF):
        assert mix64(torch.tensor([to_int64(x)])).item() == to_int64(ref_mix64(x))


def test_uniform_noise_matches_python_reference_bit_for_bit():
    seeds = [0, 1, 2**63 - 1, 2**63, M64, 123456789, 2**70 + 5]
    positions = [0, 1, 7, 1000, 2**40, 3, 99]
    for stream in (SAMPLE_STREAM, 1, 5):
        got = noise(seeds, positions, stream, 40)
        want = [
            [ref_uniform(s & M64, p, stream, j) for j in range(40)]
            for s, p in zip(seeds, positions, strict=True)
        ]
        assert torch.equal(got, torch.tensor(want, dtype=torch.float32))


def test_host_keys_equal_device_keys():
    seeds = [0, 1, 2**63 - 1, 2**63, M64, -7, 2**70 + 5]
    positions = [0, 1, 7, 1000, 2**40, 3, 99]
    for stream in (SAMPLE_STREAM, 4):
        keys = noise_keys(
            torch.tensor([to_int64(s) for s in seeds]), torch.tensor(positions), stream
        ).tolist()
        for s, p, k in zip(seeds, positions, keys, strict=True):
            lo, hi = noise_key_halves(s, p, stream)
            assert (lo & M32) | ((hi & M32) << 32) == k & M64


def test_seed_uses_low_64_bits():
    a = noise([5, -1, 2**63 - 1], [3, 3, 3], 0, 16)
    b = noise([2**64 + 5, M64, -(2**63) - 1], [3, 3, 3], 0, 16)
    assert torch.equal(a, b)


def test_columns_do_not_depend_on_n_and_values_are_open_interval():
    long = noise([1, 2, 3], [0, 5, 9], 2, 5000)
    assert torch.equal(noise([1, 2, 3], [0, 5, 9], 2, 17), long[:, :17])
    assert long.min() > 0 and long.max() < 1
    assert noise([1], [0], 0, 0).shape == (1, 0)


def test_rows_do_not_depend_on_batch_composition():
    alone = noise([42], [7], 0, 300)
    batch = noise([1, 42, 3, 42], [7, 7, 2, 8], 0, 300)
    assert torch.equal(batch[1:2], alone)
    assert not torch.equal(batch[3:4], alone)  # another position


def test_seed_position_and_stream_each_change_every_column():
    base = noise([10], [4], 0, 1000)
    for other in (noise([11], [4], 0, 1000), noise([10], [5], 0, 1000), noise([10], [4], 1, 1000)):
        assert (other != base).float().mean() > 0.99


def ks_statistic(u: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance of samples from Uniform(0, 1)."""
    x = u.flatten().double().sort().values
    n = x.numel()
    i = torch.arange(n, dtype=torch.float64)
    return max(((i + 1) / n - x).max().item(), (x - i / n).max().item())


@pytest.mark.parametrize("stream", [SAMPLE_STREAM, 3])
def test_uniformity_ks(stream):
    # 512 consecutive seeds x 512 columns: consecutive seeds are the hardest case
    u = noise(list(range(512)), [0] * 512, stream, 512)
    n = u.numel()
    assert ks_statistic(u) < 1.95 / math.sqrt(n)  # KS critical value at p = 0.001
    # low bits too: the 8 lowest of the 23 random bits are uniform on 0..255
    low = (
        ((u.flatten().double() * 2**23 - 0.5).round().long() % 256).bincount(minlength=256).double()
    )
    chi2 = ((low - n / 256) ** 2 / (n / 256)).sum().item()
    assert chi2 < 340.0  # chi-square, 255 dof, p = 0.0003


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def test_no_correlation_between_neighbours():
    seeds = list(range(256))
    u = noise(seeds, [3] * 256, 1, 1024)
    bound = 5 / math.sqrt(u.numel())  # 5 standard errors of a correlation
    assert abs(corr(u[:-1], u[1:])) < bound  # consecutive seeds
    assert abs(corr(u[:, :-1], u[:, 1:])) < bound  # consecutive columns
    assert abs(corr(u, noise(seeds, [4] * 256, 1, 1024))) < bound  # next position
    assert abs(corr(u, noise(seeds, [3] * 256, 2, 1024))) < bound  # next stream


def test_gumbel_noise_is_standard_gumbel_of_the_sample_stream():
    seeds, positions = torch.arange(256), torch.zeros(256, dtype=torch.int64)
    keys = torch.tensor([noise_key_halves(s, 0, SAMPLE_STREAM) for s in range(256)])
    g = gumbel_noise(keys[:, 0].to(torch.int32), keys[:, 1].to(torch.int32), 1024)
    u = uniform_noise(seeds, positions, SAMPLE_STREAM, 1024)
    torch.testing.assert_close(g, -torch.log(-torch.log(u)))
    # Gumbel(0, 1): mean = Euler's gamma, sd = pi / sqrt(6) ~ 1.28 -> se 0.0025
    assert abs(g.double().mean().item() - 0.5772156649) < 0.01
    assert torch.isfinite(g).all()


def test_bad_inputs_raise():
    s = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="int64"):
        uniform_noise(s.to(torch.int32), s, 0, 4)
    with pytest.raises(ValueError, match="one length"):
        uniform_noise(s, torch.tensor([1]), 0, 4)
    with pytest.raises(ValueError, match="stream"):
        uniform_noise(s, s, -1, 4)
