"""Render docs/architecture.png: the rooms of edgemesh and the imports between them.

Run from the project root: ``.venv/bin/python docs/architecture_graph.py``. The graph is read
from the code (every import, as tests/test_house.py reads it), drawn in layers: a room sits
above every room it imports, so all arrows point down.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_house import _graph, _room  # noqa: E402

SKIP = {"mesh", "mesh.__main__", "mesh.errors"}  # the façade, the entry and the error root


def rooms() -> dict[str, set[str]]:
    edges, _ = _graph()
    out: dict[str, set[str]] = {}
    for module, targets in edges.items():
        here = _room(module)
        if here in SKIP:
            continue
        out.setdefault(here, set()).update(
            r for t in targets if (r := _room(t)) != here and r not in SKIP
        )
    return out


def reduced(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The transitive reduction: an arrow a -> c is left out when a -> b -> ... -> c exists,
    so the picture shows the layering rather than every import."""

    def reach(r: str, seen: set[str]) -> set[str]:
        for t in graph.get(r, ()):
            if t not in seen:
                seen.add(t)
                reach(t, seen)
        return seen

    out = {}
    for r, targets in graph.items():
        via = set().union(*(reach(t, set()) for t in targets)) if targets else set()
        out[r] = {t for t in targets if t not in via}
    return out


def layers(graph: dict[str, set[str]]) -> dict[str, int]:
    level: dict[str, int] = {}

    def depth(r: str) -> int:
        if r not in level:
            level[r] = 1 + max((depth(t) for t in graph.get(r, ())), default=-1)
        return level[r]

    for r in graph:
        depth(r)
    return level


def main() -> None:
    graph = rooms()
    level = layers(graph)
    graph = reduced(graph)
    by_level: dict[int, list[str]] = {}
    for r, lv in sorted(level.items()):
        by_level.setdefault(lv, []).append(r)
    pos: dict[str, tuple[float, float]] = {}
    for lv, names in by_level.items():
        for i, r in enumerate(sorted(names)):
            pos[r] = ((i + 1) / (len(names) + 1), lv)
    fig, ax = plt.subplots(figsize=(11, 8))
    for r, targets in graph.items():
        for t in targets:
            (x0, y0), (x1, y1) = pos[r], pos[t]
            ax.annotate(
                "",
                xy=(x1, y1 + 0.18),
                xytext=(x0, y0 - 0.18),
                arrowprops={
                    "arrowstyle": "->",
                    "color": "#8899aa",
                    "lw": 0.9,
                    "connectionstyle": "arc3,rad=0.08",
                },
            )
    for r, (x, y) in pos.items():
        colour = "#dce8f5" if r.startswith("mesh.") else "#f3e6cf"
        ax.text(
            x,
            y,
            r.removeprefix("mesh.") + ("/" if (ROOT / r.replace(".", "/")).is_dir() else ""),
            ha="center",
            va="center",
            fontsize=11,
            bbox={"boxstyle": "round,pad=0.4", "fc": colour, "ec": "#556677"},
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.6, max(level.values()) + 0.6)
    ax.axis("off")
    ax.set_title(
        "edgemesh rooms: each imports only rooms below it\n"
        "(mesh/ blue, lower packages tan; arrows implied by others left out)"
    )
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "architecture.png", dpi=110)


if __name__ == "__main__":
    main()
