"""A checkout's kernels/ folder on sys.path never stands in for the installed `kernels`
package (transformers >= 5.25 imports Hugging Face's; see tandem.kernels.shadow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, *path: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, path)))
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("package", ["tandem.engine", "tandem.server"])
def test_the_installed_kernels_wins_over_the_checkout_folder(tmp_path, package):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHO = 'installed'\n")
    # the checkout root first on the path, as under `python -m` from it or in a Ray worker
    code = f"import {package}, kernels; print(kernels.WHO)"
    out = _run(code, ROOT, site, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "installed"


def test_nothing_is_loaded_when_no_other_kernels_exists(tmp_path):
    code = (
        "import sys, importlib.machinery as m\n"
        "real = sys.path[:]\n"
        # hide any installed kernels: only the checkout and the standard library remain
        "sys.path[:] = [p for p in real if 'site-packages' not in p]\n"
        "from tandem.kernels.shadow import load_installed_kernels\n"
        "load_installed_kernels()\n"
        "print('kernels' in sys.modules)\n"
    )
    out = _run(code, ROOT, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
