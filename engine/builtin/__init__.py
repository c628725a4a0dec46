"""The built-in Shakespeare model pair, trained by `train.py` and shipped as package data."""

from pathlib import Path

BUILTIN_DIR = Path(__file__).resolve().parent
BUILTIN_TARGET = BUILTIN_DIR / "shakespeare-target"
BUILTIN_DRAFT = BUILTIN_DIR / "shakespeare-draft"
BUILTIN_NAME = "tandem-shakespeare"
