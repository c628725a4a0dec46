"""Latency vs request rate from `tandem bench serve --result-json` files (matplotlib).

Each file is one point: x = its Poisson request rate (or, for burst and concurrency
runs, the measured request throughput); files with the same server and model form one
line. Three panels: TTFT median, TTFT p99, e2e median.
"""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (
    ("ttft_ms", "median", "TTFT p50"),
    ("ttft_ms", "p99", "TTFT p99"),
    ("e2e_ms", "median", "e2e p50"),
)


def load_points(paths: list[str]) -> dict[str, list[tuple[float, dict]]]:
    """{series label: [(rate, summary), ...] sorted by rate}. Raises ValueError."""
    series: dict[str, list[tuple[float, dict]]] = {}
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
            cfg, summary = result["config"], result["summary"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a bench result file ({exc})") from None
        rate = cfg.get("request_rate") or summary["request_throughput"]
        label = cfg.get("label") or f"{cfg['model']} @ {cfg['base_url']}"
        series.setdefault(label, []).append((float(rate), summary))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in series.items()}


def plot_latency_vs_rate(paths: list[str], out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = load_points(paths)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    for ax, (metric, stat, title) in zip(axes, PANELS, strict=True):
        for label, points in series.items():
            xs = [rate for rate, s in points if s[metric][stat] is not None]
            ys = [s[metric][stat] for _, s in points if s[metric][stat] is not None]
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
