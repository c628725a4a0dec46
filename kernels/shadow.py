"""Keep this folder from standing in for Hugging Face's `kernels` package.

In a source checkout the repository root holds this folder as `kernels/`. Whenever
that root is on sys.path (`python -m ...` run from it, or a Ray worker, which gets
its driver's working directory on its path), `import kernels` finds this folder
before the installed `kernels` distribution that transformers (5.25 and later)
depends on, and transformers fails at import with "cannot import name ... from
'kernels'". `load_installed_kernels` imports the installed package under its own
name first, so every later `import kernels` gets it; tandem.engine and tandem.server
call it before anything of theirs imports transformers.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _is_checkout_root(entry: object) -> bool:
    if not isinstance(entry, str):
        return False
    try:
        return Path(entry or os.curdir).resolve() == _HERE.parent
    except OSError:
        return False


def load_installed_kernels() -> None:
    """If `import kernels` would load this folder, load the installed `kernels` instead
    (when there is one; with none, nothing needs it and nothing changes)."""
    if "kernels" in sys.modules:
        return
    found = importlib.machinery.PathFinder.find_spec("kernels")
    if found is None or found.origin is None or Path(found.origin).resolve().parent != _HERE:
        return
    path = [p for p in sys.path if not _is_checkout_root(p)]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["kernels"]
        raise
