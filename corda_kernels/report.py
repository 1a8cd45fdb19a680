"""``--report``: per-layer singular spectra of W·C with the adapter's components, and the rank allocation.

matplotlib is imported only when a report is drawn (the ``plot`` extra), and
through ``matplotlib.figure.Figure`` rather than pyplot, so no GUI backend or
global figure state is involved.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch

from ._io import atomic_path, figure_format
from .decompose import select


def _pick(names: list[str], k: int) -> list[str]:
    """At most ``k`` names, evenly spread over the model (first and last included)."""
    if len(names) <= k:
        return names
    idx = sorted({round(i * (len(names) - 1) / (k - 1)) for i in range(k)})
    return [names[i] for i in idx]


def _short(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-3:]) if len(parts) > 3 else name


def plot_report(
    singular_values: Mapping[str, torch.Tensor],
    ranks: Mapping[str, int],
    mode: str,
    path: str | os.PathLike,
    *,
    max_panels: int = 24,
    title: str | None = None,
) -> str:
    """Draw the report to ``path`` (format from its extension, PNG by default); returns the path.

    ``singular_values``: module -> all singular values of W·C_d, descending.
    The components that became the adapter (the last r for KPM, the first r
    for IPM) are drawn in red. With more than ``max_panels`` layers an evenly
    spread subset of spectra is drawn; the allocation panel always shows all.
    """
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("--report needs matplotlib: pip install 'corda_kernels[plot]'") from e
    names = [n for n in ranks if n in singular_values]
    if not names:
        raise ValueError("nothing to report: no layer has both a rank and a spectrum")
    if max_panels < 2:
        raise ValueError(f"max_panels must be >= 2, got {max_panels}")
    shown = _pick(names, max_panels)
    cols = min(6, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(3.0 * cols, 2.3 * rows + 3.2), dpi=100)
    grid = fig.add_gridspec(rows + 1, cols, height_ratios=[1.0] * rows + [1.3])

    for k, name in enumerate(shown):
        ax = fig.add_subplot(grid[k // cols, k % cols])
        sv = singular_values[name].detach().double().cpu().clamp_min(1e-30)
        x = torch.arange(1, sv.numel() + 1)
        idx = select(sv.numel(), ranks[name], mode)
        ax.semilogy(x, sv, color="0.55", lw=1.0)
        ax.semilogy(x[idx], sv[idx], ".", color="tab:red", ms=3, label=f"adapter (r={ranks[name]})")
        ax.set_title(_short(name), fontsize=8)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6, loc="lower left" if mode == "ipm" else "upper right", handlelength=1)

    ax = fig.add_subplot(grid[rows, :])
    projections = sorted({n.rsplit(".", 1)[-1] for n in names})
    cmap = colormaps["tab10"]
    colours = {p: cmap(i % 10) for i, p in enumerate(projections)}
    for i, name in enumerate(names):
        ax.bar(i, ranks[name], color=colours[name.rsplit(".", 1)[-1]], width=0.85)
    for p, c in colours.items():
        ax.bar(0, 0, color=c, label=p)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylim(0, 1.3 * max(ranks[n] for n in names))  # headroom for the legend
    ax.set_xticks([])
    ax.set_xlabel(f"layer ({len(names)}, in model order)")
    ax.set_ylabel("rank")
    ax.set_title(f"rank allocation: total {sum(ranks[n] for n in names)}", fontsize=9)
    ax.legend(fontsize=7, ncols=min(len(projections), 7), loc="upper right")
    ax.grid(axis="y", alpha=0.3)

    more = f", {len(shown)} of {len(names)} layers shown" if len(shown) < len(names) else ""
    fig.suptitle(title or f"CorDA {mode.upper()}: singular values of W·C (adapter in red){more}", fontsize=10)
    fig.tight_layout()
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=figure_format(path))
    return path
