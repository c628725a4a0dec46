"""Counter-based sampling noise: uniforms that are a pure function of their coordinates.

A seeded request's random draws must not depend on what else is in the batch, on a
preemption (recompute) or on how much it speculated. So there is no stateful generator:
the uniform for (seed, output position, stream, column j) is a hash of those four
integers, computed with vectorised integer torch ops, and is the same on every device.

Per row, a 64-bit key from splitmix64's finaliser `mix64` (Steele, Lea & Flood 2014):

    key(seed, pos, stream) = mix64(mix64(mix64(seed + G) ^ (pos + G2)) ^ (stream + G3))

then per column, in 32-bit lanes with MurmurHash3's finaliser `fmix32` (the per-column
work is most of the cost, and int32 shifts vectorise where int64 ones do not):

    bits(key, j) = fmix32(fmix32(lo32(key) + (j + 1) * G32) ^ hi32(key))
    u            = (2 * (bits >> 9) + 1) / 2**24      # top 23 bits, in (0, 1)

Both halves of the key enter every column, so two rows' columns never line up unless
their 64-bit keys do. Torch has no usable unsigned arithmetic, so words live in int64
and int32: `+` and `*` wrap in two's complement on every torch backend (the same bits
as unsigned arithmetic) and `>>` sign-extends, so every right shift is masked to make
it a logical one. The tests check these bits against a pure-Python reference.

Streams: `SAMPLE_STREAM` (0) is the one-per-vocab-entry noise of token sampling;
other streams are independent uniforms for the same (seed, position), e.g. the
acceptance draws of speculative rejection sampling.
"""

from __future__ import annotations

import torch

SAMPLE_STREAM = 0  # stream of the per-token noise used to sample the next token

_MASK64 = (1 << 64) - 1
_G = 0x9E3779B97F4A7C15  # splitmix64's increment (golden ratio)
_G2 = 0xD1B54A32D192ED03  # odd constants that separate the key's three inputs
_G3 = 0xAEF17502108EF2D9
_M1 = 0xBF58476D1CE4E5B9  # splitmix64's finaliser multipliers
_M2 = 0x94D049BB133111EB
_G32 = 0x9E3779B9  # 32-bit golden-ratio increment between columns
_F1 = 0x85EBCA6B  # MurmurHash3 fmix32 multipliers
_F2 = 0xC2B2AE35


def to_int64(x: int) -> int:
    """The int64 with the same low 64 bits as the Python int x (any size or sign)."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def _to_int32(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 or int32 words (torch's >> sign-extends)."""
    bits = 64 if z.dtype == torch.int64 else 32
    return (z >> s) & ((1 << (bits - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, elementwise on int64 words; returns a new tensor."""
    z = z ^ _shr(z, 30)
    z *= to_int64(_M1)
    z ^= _shr(z, 27)
    z *= to_int64(_M2)
    z ^= _shr(z, 31)
    return z


def fmix32(z: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finaliser, elementwise on int32 words; modifies z and returns it."""
    z ^= _shr(z, 16)
    z *= _to_int32(_F1)
    z ^= _shr(z, 13)
    z *= _to_int32(_F2)
    z ^= _shr(z, 16)
    return z


def _int32_halves(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) 32-bit halves of int64 words, as int32 with the same bits."""

    def signed32(w: torch.Tensor) -> torch.Tensor:
        return (w - ((w >> 31) & 1) * (1 << 32)).to(torch.int32)  # exact, no wrap

    return signed32(z & 0xFFFFFFFF), signed32(_shr(z, 32))


def noise_keys(seeds: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """One 64-bit key per row from (seed, output position, stream): (B,) int64."""
    k = mix64(seeds + to_int64(_G))
    k = mix64(k ^ (positions + to_int64(_G2)))
    return mix64(k ^ to_int64(stream + _G3))


def _py_mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def noise_key_halves(seed: int, position: int, stream: int) -> tuple[int, int]:
    """`noise_keys` for one row in plain Python, as (low, high) signed 32-bit ints.

    For building a step's keys on the host: a few microseconds per row instead of
    ~35 tiny device kernels per step."""
    k = _py_mix64((seed + _G) & _MASK64)
    k = _py_mix64(k ^ ((position + _G2) & _MASK64))
    k = _py_mix64(k ^ ((stream + _G3) & _MASK64))
    return _to_int32(k), _to_int32(k >> 32)


def uniform_noise(
    seeds: torch.Tensor, positions: torch.Tensor, stream: int, n: int
) -> torch.Tensor:
    """Uniforms in (0, 1), a pure function of (seed, position, stream, column).

    seeds: (B,) int64 (see `to_int64` for Python ints of any size); positions: (B,)
    int64 output positions; stream: >= 0; n: columns wanted. Returns (B, n) float32 on
    seeds' device, values (2m + 1) / 2**24 for integer m in [0, 2**23), so never 0 or 1.
    Column j does not depend on n: a call with a larger n extends, never changes, it.
    """
    if seeds.dtype != torch.int64 or positions.dtype != torch.int64:
        raise ValueError(f"seeds and positions must be int64, got {seeds.dtype}, {positions.dtype}")
    if seeds.dim() != 1 or seeds.shape != positions.shape:
        raise ValueError(
            f"seeds and positions must be 1-D of one length, got {tuple(seeds.shape)} "
            f"and {tuple(positions.shape)}"
        )
    if stream < 0 or n < 0:
        raise ValueError(f"stream and n must be >= 0, got stream={stream}, n={n}")
    lo, hi = _int32_halves(noise_keys(seeds, positions, stream))
    return uniform_noise_from_keys(lo, hi, n)


def uniform_noise_from_keys(key_lo: torch.Tensor, key_hi: torch.Tensor, n: int) -> torch.Tensor:
    """`uniform_noise` from precomputed key halves: key_lo, key_hi (B,) int32 -> (B, n)."""
    counters = torch.arange(1, n + 1, dtype=torch.int32, device=key_lo.device)
    counters *= _to_int32(_G32)  # (j + 1) * G32 mod 2**32
    bits = fmix32(fmix32(key_lo[:, None] + counters[None, :]) ^ key_hi[:, None])  # (B, n)
    u = _shr(bits, 9).to(torch.float32)  # top 23 bits, exact in float32
    return u.mul_(2.0**-23).add_(2.0**-24)


def gumbel_noise(key_lo: torch.Tensor, key_hi: torch.Tensor, n: int) -> torch.Tensor:
    """Gumbel(0, 1) noise -log(E), E = -log(u) ~ Exp(1): (B, n) from key halves (B,) int32
    of the sampling stream (`noise_key_halves(seed, position, SAMPLE_STREAM)`).

    argmax(logits + gumbel) is a draw from softmax(logits): the exponential race
    argmax(p / E) in log space, which also keeps tokens whose p underflows float32.
    """
    u = uniform_noise_from_keys(key_lo, key_hi, n)
    return u.log_().neg_().log_().neg_()
