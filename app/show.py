"""A policy laid out per layer: which setting each weight matrix of each transformer layer gets.

``turboquant show policy.json`` prints it as a table; ``--plot bits.png`` draws the same
grid as a heatmap of code bits (:func:`app.plots.bits_png`). Works on the policy
document alone, so it needs neither the model nor torch: each entry's code bits are its
``runtime`` object, written by ``quant.Policy``, so no format is known here by name.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

from studies.export_runtimes import code_bits

__all__ = ["BitMap", "KINDS", "base_format", "bit_map", "cell_text", "summary_text"]

# Llama-style matrices, in the order a layer runs them; other architectures' names are appended.
KINDS = ("q", "k", "v", "o", "gate", "up", "down")
_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def base_format(matrices: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The policy's most common format (the first of equals): its cells leave the format out."""
    counts = Counter(s.get("format") for s in matrices.values())
    return counts.most_common(1)[0][0] if counts else None


def cell_text(setting: Mapping[str, Any], base: str | None = None) -> str:
    """``bits/group`` (``ch``: one group per output channel), with ``:format`` unless it is ``base``."""
    group = setting.get("group_size")
    text = f"{setting.get('bits')}/{'ch' if group is None else group}"
    return text if setting.get("format") == base else f"{text}:{setting.get('format')}"


def _place(name: str) -> tuple[str, str]:
    """(row, column) of a matrix: its layer number and kind, or its own name outside the layers."""
    m = _LAYER.search(name)
    last = name.rsplit(".", 1)[-1]
    if m is None:  # embedding, LM head: a row and a column of their own
        kind = "embed" if "embed" in last or last == "wte" else last
        return kind, kind
    kind = last[:-5] if last.endswith("_proj") else last
    return m.group(1), kind


@dataclass
class BitMap:
    """The settings of a policy on a (row, column) grid.

    Attributes:
        rows: layer numbers as strings, with ``embed`` first and other non-layer matrices last.
        cols: matrix kinds (``q k v o gate up down``, then any others, then non-layer ones).
        cells: (row, column) -> (matrix name, setting) for the cells a matrix fills.
        base: the most common format, which cell texts leave out.
    """

    rows: list[str]
    cols: list[str]
    cells: dict[tuple[str, str], tuple[str, Mapping[str, Any]]]
    base: str | None = None

    def text(self, row: str, col: str) -> str:
        """The cell's text (:func:`cell_text`), ``""`` where no matrix sits."""
        return cell_text(self.cells[row, col][1], self.base) if (row, col) in self.cells else ""

    def bits(self) -> list[list[float]]:
        """Code bits per cell, NaN where no matrix sits (row-major, ``rows`` x ``cols``)."""
        return [[code_bits(self.cells[r, c][1]) if (r, c) in self.cells else math.nan for c in self.cols]
                for r in self.rows]


def bit_map(matrices: Mapping[str, Mapping[str, Any]]) -> BitMap:
    """Places every matrix of a policy's ``matrices`` on the layer x kind grid."""
    cells: dict[tuple[str, str], tuple[str, Mapping[str, Any]]] = {}
    layers: set[int] = set()
    outside: list[str] = []
    layer_kinds: list[str] = []
    for name, setting in matrices.items():
        row, col = _place(name)
        if (row, col) in cells:
            raise ValueError(f"matrices {cells[row, col][0]!r} and {name!r} fall on the same cell "
                             f"(layer {row}, {col}); this layout cannot show this model")
        cells[row, col] = (name, setting)
        if row.isdigit():
            layers.add(int(row))
            if col not in layer_kinds:
                layer_kinds.append(col)
        elif row not in outside:
            outside.append(row)
    cols = [k for k in KINDS if k in layer_kinds] + [k for k in layer_kinds if k not in KINDS]
    head = [r for r in outside if r == "embed"]
    tail = [r for r in outside if r != "embed"]
    return BitMap(head + [str(i) for i in sorted(layers)] + tail, cols + head + tail, cells, base_format(matrices))


def summary_text(doc: Mapping[str, Any], source: str = "policy") -> str:
    """The table ``turboquant show`` prints: a header with the metrics, then one line per layer."""
    matrices = doc["matrices"]
    grid = bit_map(matrices)
    m = doc.get("metrics") or {}
    model = doc.get("model") or (doc.get("provenance") or {}).get("model", "?")
    head = f"{source}: model {model}, {len(matrices)} matrices"
    if isinstance(m.get("bytes"), (int, float)):
        head += f", {int(m['bytes']):,} bytes ({m.get('bpw', float('nan')):.3f} bpw)"
    if isinstance(m.get("kl"), (int, float)):
        head += f", KL {m['kl']:.5f}"
    width = max([len(grid.text(r, c)) for r, c in grid.cells] + [len(c) for c in grid.cols]) + 2
    label = max(len("layer"), *(len(r) for r in grid.rows))
    lines = [head, f"cells: bits/group size ('ch' = per output channel), :format when not {grid.base}",
             "layer".ljust(label) + "".join(c.rjust(width) for c in grid.cols)]
    for r in grid.rows:
        lines.append(r.ljust(label) + "".join(grid.text(r, c).rjust(width) for c in grid.cols))
    counts = Counter(cell_text(s, grid.base) for s in matrices.values())
    lines.append("settings: " + ", ".join(f"{k} x{n}" for k, n in counts.most_common()))
    return "\n".join(lines)
