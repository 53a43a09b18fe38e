"""Shared helpers for the benchmark scripts: local meshes, statistics, result files, plots.

Every figure is written beside the baseline measured in the same run, as JSON, as a Markdown
table and (``save_plot``) as a PNG; ``update_benchmarks_md`` replaces one section of
``docs/benchmarks.md``. ``EDGEMESH_BENCH_DOCS=DIR`` sends the Markdown, and the files the
scripts place with ``docs_dir()``, to ``DIR`` instead of ``docs/`` (tests use it).
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_MD = ROOT / "docs" / "benchmarks.md"


def docs_dir() -> Path:
    """Where results go: ``docs/``, or ``$EDGEMESH_BENCH_DOCS`` when set."""
    env = os.environ.get("EDGEMESH_BENCH_DOCS")
    return Path(env) if env else ROOT / "docs"


def bench_md() -> Path:
    return BENCH_MD if not os.environ.get("EDGEMESH_BENCH_DOCS") else docs_dir() / "benchmarks.md"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summarize(samples: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(samples),
        "p99": percentile(samples, 99),
        "min": min(samples),
        "n": len(samples),
    }


def machine() -> str:
    return f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}"


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def update_benchmarks_md(section: str, body: str, md: Path | None = None) -> None:
    """Replace (or append) ``## section`` in docs/benchmarks.md (or ``md``)."""
    md = md or bench_md()
    md.parent.mkdir(parents=True, exist_ok=True)
    text = md.read_text() if md.exists() else "# Benchmarks\n"
    block = f"## {section}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + block
    md.write_text(text)


def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def save_plot(
    path: Path,
    x: Sequence[float],
    panels: Sequence[tuple[str, dict[str, Sequence[float | None]]]],
    *,
    xlabel: str,
    title: str = "",
) -> Path:
    """One PNG with a panel per ``(ylabel, {series label: y values})``, lines over ``x``.

    matplotlib's Agg backend (no display needed); ``None`` values are left out of a series.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels, strict=True):
        for label, ys in series.items():
            pts = [(xi, yi) for xi, yi in zip(x, ys, strict=True) if yi is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xticks(list(x))
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
