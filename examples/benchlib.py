"""Shared helpers for the benchmark scripts: local meshes, statistics, result files.

Every figure is written beside the baseline measured in the same run, as JSON and as a
Markdown table; ``update_benchmarks_md`` replaces one section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import json
import platform
import re
import statistics
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_MD = ROOT / "docs" / "benchmarks.md"


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


def update_benchmarks_md(section: str, body: str) -> None:
    """Replace (or append) ``## section`` in docs/benchmarks.md."""
    BENCH_MD.parent.mkdir(parents=True, exist_ok=True)
    text = BENCH_MD.read_text() if BENCH_MD.exists() else "# Benchmarks\n"
    block = f"## {section}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + block
    BENCH_MD.write_text(text)


def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
