"""Serving benchmark: a load generator for any OpenAI-compatible server.

A thin entry point to `tandem.server.bench` (also `tandem bench serve`); see its
docstring and `--help`. Example:

    python benchmarks/serve.py --base-url http://127.0.0.1:8000 --num-prompts 64 \\
        --arrival poisson:4 --goodput ttft:500 tpot:50 --result-json run.json
"""

from __future__ import annotations

import sys

from tandem.server.bench import main

if __name__ == "__main__":
    sys.exit(main())
