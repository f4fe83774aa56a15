"""Pareto fronts over (bytes, KL)."""

from __future__ import annotations

from typing import Iterable, Sequence

__all__ = ["non_dominated", "hypervolume"]


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


def hypervolume(front: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by a 2-D minimization front and bounded by ``reference``."""
    area, prev_kl = 0.0, reference[1]
    for x, y in sorted(front):
        if x >= reference[0] or y >= prev_kl:
            continue
        area += (reference[0] - x) * (prev_kl - y)
        prev_kl = y
    return area
