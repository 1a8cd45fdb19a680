"""``plot_ranks``: the per-layer rank allocation as a PNG (needs the ``plot`` extra: matplotlib)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from ._io import atomic_path

_BLOCK = re.compile(r"^\d+$")


def _split(name: str) -> tuple[str, str]:
    """(block, projection): the last all-digit component of the name, and its last component."""
    parts = name.split(".")
    blocks = [p for p in parts[:-1] if _BLOCK.match(p)]
    return (blocks[-1] if blocks else ""), parts[-1]


def plot_ranks(ranks: Mapping[str, int], path: str | os.PathLike, *, title: str | None = None) -> str:
    """Draw ``ranks`` (module name -> rank) as bars grouped by block, one colour per projection; returns the path.

    The block is the last numeric component of a name (``model.layers.3.mlp.up_proj`` -> 3),
    the projection its last component (``up_proj``).
    """
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plot_ranks needs matplotlib: pip install 'corda_kernels[plot]'") from e
    if not ranks:
        raise ValueError("ranks is empty: nothing to plot")

    blocks: list[str] = []
    projections: list[str] = []
    cells: dict[tuple[str, str], int] = {}
    for name, r in ranks.items():
        block, proj = _split(name)
        if block not in blocks:
            blocks.append(block)
        if proj not in projections:
            projections.append(proj)
        # Two modules can share (block, projection) in odd naming schemes: show their sum, not one of them.
        cells[(block, proj)] = cells.get((block, proj), 0) + int(r)
    if all(b.isdigit() for b in blocks):
        blocks.sort(key=int)

    n_proj = len(projections)
    width = 0.8 / n_proj
    fig = Figure(figsize=(min(40.0, max(6.0, 0.9 + 0.28 * len(blocks) * n_proj)), 4.0), dpi=110)
    ax = fig.subplots()
    cmap = colormaps["tab10"]
    for j, proj in enumerate(projections):
        xs = [i + (j - (n_proj - 1) / 2) * width for i, b in enumerate(blocks) if (b, proj) in cells]
        hs = [cells[(b, proj)] for b in blocks if (b, proj) in cells]
        ax.bar(xs, hs, width=width, label=proj, color=cmap(j % 10))
    ax.set_xticks(range(len(blocks)))
    ax.set_xticklabels([b if b else "-" for b in blocks])
    ax.set_xlabel("block")
    ax.set_ylabel("rank")
    total = sum(cells.values())
    ax.set_title(title or f"CorDA++ rank allocation ({len(ranks)} layers, total rank {total})")
    ax.set_ylim(0, max(cells.values()) * 1.3)  # headroom so the legend does not cover the bars
    ax.legend(ncols=min(n_proj, 7), fontsize="small", loc="upper center")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = os.fspath(path)
    with atomic_path(path) as tmp:  # an interrupted write never leaves a truncated image over a good one
        fig.savefig(tmp, format="png")
    return path
