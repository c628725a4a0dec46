"""Find a model directory, read its config, and load its safetensors into a Tandem model.

transformers is used for configs only (AutoConfig), never for model code. Every failure
a user can cause (missing directory, file, tensor; unsupported config) raises
ModelLoadError with a one-line message.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tandem.engine.models.registry import ModelLoadError

logger = logging.getLogger(__name__)
INDEX_FILE = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def resolve_model_dir(model: str | None) -> Path:
    """The local directory for a model: None -> the built-in target, an existing
    directory as is, anything else a Hugging Face hub id (downloaded when reachable)."""
    if model is None:
        from tandem.engine.builtin import BUILTIN_TARGET

        if not (BUILTIN_TARGET / "config.json").is_file():
            raise ModelLoadError(
                f"the built-in model is missing at {BUILTIN_TARGET}; "
                "train it with `python -m tandem.engine.builtin.train` or pass --model"
            )
        return BUILTIN_TARGET
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"model directory {model!r} does not exist or is not a directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # any hub failure (offline, 404, auth) is one user-facing line
        raise ModelLoadError(
            f"model {model!r} is not a local directory and the hub download failed ({_one_line(e)})"
        ) from None


def load_hf_config(model_dir: Path) -> Any:
    """The transformers config of a model directory (config.json)."""
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"no config.json in {model_dir}")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises many types for a bad config
        raise ModelLoadError(f"cannot read {model_dir / 'config.json'} ({_one_line(e)})") from None


def checkpoint_dtype(hf_config: Any) -> torch.dtype | None:
    """The dtype the checkpoint was saved in (config `dtype` / `torch_dtype`), if named."""
    value = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def eos_token_ids(model_dir: Path, hf_config: Any) -> tuple[int, ...]:
    """eos ids from generation_config.json, else config.json (int or list; may be empty)."""
    value = None
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
    if value is None:
        value = getattr(hf_config, "eos_token_id", None)
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, list) else [value]))


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's files: those named by model.safetensors.index.json, else every
    *.safetensors in the directory."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"weight file {f.name} listed in {index} is missing")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"no *.safetensors weights in {model_dir} (only safetensors checkpoints are supported)"
        )
    return files


class LazyTensor:
    """One tensor of an open safetensors file that reads only the slices asked for.

    shape: the full tensor's shape; narrow(dim, start, length) -> that slice as a CPU
    tensor in the checkpoint's dtype (so a tensor-parallel rank never holds a whole
    sharded weight). Valid only while its file is open (inside iterate_weights)."""

    __slots__ = ("_slice", "name", "shape")

    def __init__(self, name: str, tensor_slice: Any) -> None:
        self.name = name  # the checkpoint tensor name
        self._slice = tensor_slice  # safetensors PySafeSlice
        self.shape = torch.Size(tensor_slice.get_shape())  # the full tensor's shape

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if not (0 <= dim < len(self.shape) and 0 <= start <= start + length <= self.shape[dim]):
            raise ValueError(
                f"slice [{start}, {start + length}) of dim {dim} is outside {tuple(self.shape)}"
            )
        index = (slice(None),) * dim + (slice(start, start + length),)
        return self._slice[index]


def iterate_weights(files: list[Path]) -> Iterator[tuple[str, LazyTensor]]:
    """(name, lazy tensor) for every tensor of every file, with a progress bar. Each
    tensor must be consumed before the next one is requested (its file closes after)."""
    from safetensors import safe_open

    for f in tqdm(files, desc="Loading safetensors", unit="file", disable=len(files) < 2):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, LazyTensor(name, st.get_slice(name))
        except (OSError, RuntimeError, ValueError) as e:
            if isinstance(e, ModelLoadError):
                raise
            raise ModelLoadError(f"cannot read {f} ({_one_line(e)})") from None


def load_weights(model: Any, model_dir: Path) -> None:
    """Load every checkpoint tensor into `model` (its load_weights/checkpoint_names) and
    check that none it needs is missing."""
    loaded = model.load_weights(iterate_weights(safetensors_files(model_dir)))
    missing = sorted(model.checkpoint_names() - loaded)
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise ModelLoadError(f"checkpoint {model_dir} lacks tensor(s): {shown}")
