"""Pareto fronts over (bytes, KL)."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

__all__ = ["non_dominated", "front_indices", "hypervolume"]


def non_dominated(points: Iterable[tuple[float, float, object]]) -> list[tuple[float, float, object]]:
    """Points not dominated in (bytes, kl), both minimized, sorted by bytes.

    Each point is ``(bytes, kl, payload)``. Of points with equal bytes only the lowest
    KL survives; ties in both keep the first.
    """
    front: list[tuple[float, float, object]] = []
    best_kl = float("inf")
    for point in sorted(points, key=lambda p: (p[0], p[1])):
        if point[1] < best_kl:
            front.append(point)
            best_kl = point[1]
    return front


def front_indices(nbytes: np.ndarray, kl: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated points in (bytes, kl), both minimized, sorted by bytes.

    The vectorized form of :func:`non_dominated` (same answer, ties included): a point survives
    when its KL is below that of every point sorted before it.
    """
    nbytes, kl = np.asarray(nbytes, dtype=np.float64), np.asarray(kl, dtype=np.float64)
    if nbytes.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((kl, nbytes))  # by bytes, then KL; stable, so ties keep their first
    sorted_kl = kl[order]
    best_before = np.minimum.accumulate(np.concatenate(([np.inf], sorted_kl[:-1])))
    return order[sorted_kl < best_before]


def hypervolume(front: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by a 2-D minimization front and bounded by ``reference``."""
    area, prev_kl = 0.0, reference[1]
    for x, y in sorted(front):
        if x >= reference[0] or y >= prev_kl:
            continue
        area += (reference[0] - x) * (prev_kl - y)
        prev_kl = y
    return area
