"""EngineConfig validation, byte parsing, platform detection and KV-cache sizing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tandem.engine.config import EngineConfig, parse_bytes
from tandem.engine.kv_cache import KVCacheSpec, allocate_kv_caches, num_blocks_for
from tandem.engine.platform import cpu_has_native_bf16, detect_platform, resolve_dtype
from tandem.kernels.torch_ref import TorchAttentionBackend


@pytest.mark.parametrize(
    "text,expected",
    [(1024, 1024), ("4GiB", 4 << 30), ("512 MiB", 512 << 20), ("2GB", 2 * 10**9), ("1.5k", 1500)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "4 GiBs", "", "-1GiB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="cannot parse"):
        parse_bytes(text)


def test_every_field_has_a_default_and_help():
    for f in dataclasses.fields(EngineConfig):
        assert f.metadata.get("help"), f.name
    cfg = EngineConfig()
    assert cfg.kv_cache_bytes == 1 << 30 and cfg.block_size == 16 and cfg.model is None
    assert EngineConfig(kv_cache_memory="2GiB").kv_cache_bytes == 2 << 30
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block_size = 8


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dtype": "fp8"}, "dtype must be one of"),
        ({"device": "tpu"}, "device must be auto, cpu"),
        ({"block_size": 0}, "block_size must be > 0"),
        ({"kv_cache_memory": 0}, "kv_cache_memory must be > 0"),
        ({"kv_cache_memory": "much"}, "cannot parse 'much'"),
        ({"max_model_len": 0}, "max_model_len must be > 0"),
        ({"num_threads": 0}, "num_threads must be > 0"),
        ({"model": " "}, "model must be a directory"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)


def test_platform_and_dtype():
    cpu = detect_platform("cpu")
    assert (cpu.kind, cpu.device, cpu.dist_backend) == ("cpu", torch.device("cpu"), "gloo")
    assert resolve_dtype("float16", cpu, None) == torch.float16
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert resolve_dtype("auto", cpu, torch.float16) == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no cuda device is available"):
            detect_platform("cuda:0")


def test_cpu_bf16_flag_detection(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_has_native_bf16(str(info))
    info.write_text("flags\t: fpu avx2 avx512f\n")
    assert not cpu_has_native_bf16(str(info))
    assert not cpu_has_native_bf16(str(tmp_path / "missing"))


def test_kv_cache_sizing_and_allocation():
    spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16, block_size=4)
    assert spec.bytes_per_block == 2 * 3 * 2 * 8 * 2 * 4
    assert num_blocks_for(10 * spec.bytes_per_block + 5, spec, max_model_len=40) == 10
    with pytest.raises(ValueError, match="fewer than the 11 one sequence of max_model_len=41"):
        num_blocks_for(10 * spec.bytes_per_block, spec, max_model_len=41)
    caches = allocate_kv_caches(spec, 10, TorchAttentionBackend, "cpu")
    assert len(caches) == 3
    assert caches[0].shape == (2, 10, 2, 4, 8) and caches[0].dtype == torch.bfloat16
    assert not caches[2].any()
