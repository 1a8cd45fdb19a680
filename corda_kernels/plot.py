"""``plot_ranks``: the per-layer rank allocation as a PNG (needs the ``plot`` extra: matplotlib)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from ._io import atomic_path, figure_format

_BLOCK = re.compile(r"^\d+$")


def _split(name: str) -> tuple[str, str, str]:
    """(stem, block, projection) of a module name.

    The block is the *first* all-digit component (``model.layers.3.mlp.up_proj`` -> 3) and the stem
    the path before it, so a vision tower's layer 0 and a language model's layer 0 stay apart. The
    projection is the last component, with any later indices (an MoE expert, a T5 sub-layer) appended:
    ``layers.0.mlp.experts.5.w1`` -> ``w1[5]``, never added to expert 5 of another block.
    """
    parts = name.split(".")
    i = next((k for k, p in enumerate(parts[:-1]) if _BLOCK.match(p)), None)
    if i is None:
        return "", "", parts[-1]
    inner = [p for p in parts[i + 1 : -1] if _BLOCK.match(p)]
    return ".".join(parts[:i]), parts[i], parts[-1] + (f"[{'.'.join(inner)}]" if inner else "")


def _block_labels(keys: list[tuple[str, str]]) -> list[str]:
    """The block index alone when every block has the same stem; else the stem, less the shared prefix."""
    stems = {s for s, _ in keys}
    if len(stems) <= 1:
        return [b or "-" for _, b in keys]
    split = [s.split(".") for s in stems if s]
    common = 0
    while all(len(p) > common for p in split) and len({p[common] for p in split}) == 1:
        common += 1
    return [".".join(s.split(".")[common:] + [b]) if b else "-" for s, b in keys]


def plot_ranks(ranks: Mapping[str, int], path: str | os.PathLike, *, title: str | None = None) -> str:
    """Draw ``ranks`` (module name -> rank) as bars grouped by block, one colour per projection; returns the path.

    The block is the first numeric component of a name (``model.layers.3.mlp.up_proj`` -> 3),
    the projection its last component (``up_proj``; an expert's ``w1[5]``). ``title``: the figure's
    title (default: none). The format follows ``path``'s extension (PNG without one). Needs matplotlib
    (the ``plot`` extra).
    """
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plot_ranks needs matplotlib: pip install 'corda_kernels[plot]'") from e
    if not ranks:
        raise ValueError("ranks is empty: nothing to plot")

    blocks: list[tuple[str, str]] = []
    projections: list[str] = []
    cells: dict[tuple[tuple[str, str], str], int] = {}
    for name, r in ranks.items():
        stem, index, proj = _split(name)
        block = (stem, index)
        if block not in blocks:
            blocks.append(block)
        if proj not in projections:
            projections.append(proj)
        # Two modules can still share (block, projection) in odd naming schemes: show their sum, not one of them.
        cells[(block, proj)] = cells.get((block, proj), 0) + int(r)
    stems = list(dict.fromkeys(s for s, _ in blocks))  # first-seen order of the stems, blocks by index within
    blocks.sort(key=lambda b: (stems.index(b[0]), int(b[1]) if b[1] else -1))

    n_proj = len(projections)
    width = 0.8 / n_proj
    fig = Figure(figsize=(min(40.0, max(6.0, 0.9 + 0.28 * len(blocks) * n_proj)), 4.0), dpi=110)
    ax = fig.subplots()
    cmap = colormaps["tab10"]
    for j, proj in enumerate(projections):
        xs = [i + (j - (n_proj - 1) / 2) * width for i, b in enumerate(blocks) if (b, proj) in cells]
        hs = [cells[(b, proj)] for b in blocks if (b, proj) in cells]
        ax.bar(xs, hs, width=width, label=proj, color=cmap(j % 10))
    labels = _block_labels(blocks)
    ax.set_xticks(range(len(blocks)))
    ax.set_xticklabels(labels, rotation=90 if max(map(len, labels)) > 3 else 0, fontsize="small")
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
        fig.savefig(tmp, format=figure_format(path))
    return path
