"""Pictures: a front as a PNG (matplotlib) or interactive HTML (plotly), and a policy's per-layer bit map."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from app.show import BitMap

__all__ = ["bits_png", "front_png", "front_html", "write_bits_plot", "write_front_plot"]


def front_png(points: pd.DataFrame, title: str) -> bytes:
    """KL against bits per weight, each point labelled with its trial number."""
    import matplotlib

    matplotlib.use("Agg")  # servers and CI have no display
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    if not points.empty:
        ax.plot(points["bpw"], points["kl"], "o-", color="tab:blue")
        for _, p in points.iterrows():
            ax.annotate(str(int(p["trial"])), (p["bpw"], p["kl"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    else:
        ax.text(0.5, 0.5, "no feasible trial yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("bits per weight (packed bytes)")
    ax.set_ylabel("KL to the float model (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def front_html(points: pd.DataFrame, title: str) -> str:
    """A self-contained page (plotly.js inlined, so it opens offline); hover shows each point's metrics."""
    import plotly.graph_objects as go

    text = [f"trial {int(p.trial)}<br>{int(p.bytes):,} bytes<br>ppl {p.ppl:.3f}, top1 {p.top1:.3f}"
            for p in points.itertuples()]
    fig = go.Figure(go.Scatter(x=list(points["bpw"]), y=list(points["kl"]), mode="lines+markers", text=text,
                               customdata=list(points["trial"]),
                               hovertemplate="%{text}<br>KL %{y:.5f} at %{x:.3f} bpw<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="bits per weight (packed bytes)",
                      yaxis_title="KL to the float model (nats)")
    return fig.to_html(include_plotlyjs=True, full_html=True)


def write_front_plot(points: pd.DataFrame, title: str, path: str | Path) -> Path:
    """Writes ``path`` as PNG or HTML, chosen by its suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        path.write_bytes(front_png(points, title))
    elif suffix in (".html", ".htm"):
        path.write_text(front_html(points, title))
    else:
        raise ValueError(f"--plot {path}: use a .png or .html file name")
    return path


def bits_png(grid: BitMap, title: str) -> bytes:
    """A heatmap of code bits: rows are layers, columns matrix kinds; each cell labelled bits/group."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib.figure import Figure

    bits = np.ma.masked_invalid(np.array(grid.bits(), dtype=float))  # (rows, cols); empty cells masked
    fig = Figure(figsize=(1.5 + 0.9 * len(grid.cols), 1.4 + 0.3 * len(grid.rows)), dpi=100)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")
    lo, hi = (float(bits.min()), float(bits.max())) if bits.count() else (0.0, 1.0)
    image = ax.imshow(bits, cmap=cmap, vmin=lo, vmax=max(hi, lo + 1), aspect="auto", interpolation="nearest")
    for i, r in enumerate(grid.rows):
        for j, c in enumerate(grid.cols):
            if (r, c) in grid.cells:
                value = bits[i, j]
                colour = "black" if (value - lo) / max(hi - lo, 1) > 0.6 else "white"
                ax.text(j, i, grid.text(r, c), ha="center", va="center", fontsize=6, color=colour)
    ax.set_xticks(range(len(grid.cols)), grid.cols)
    ax.set_yticks(range(len(grid.rows)), grid.rows)
    ax.set_xlabel("matrix")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="code bits per weight")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def write_bits_plot(grid: BitMap, title: str, path: str | Path) -> Path:
    """Writes the bit map of ``grid`` to ``path`` (a .png file)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--plot {path}: the bit map is written as PNG; use a .png file name")
    path.write_bytes(bits_png(grid, title))
    return path
