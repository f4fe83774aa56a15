"""Numeric primitives shared by the scalar formats: grouping, padding, affine grids and their clip search.

The affine grid (``rtn``'s and ``gptq``'s): asymmetric ``w = q * scale + offset`` with ``q`` in
``[0, 2**b - 1]``, or symmetric ``w = (q - 2**(b-1)) * scale``; fp16 ``scale`` and ``offset``
per group. :func:`affine_grid` finds one per group, searching the range with ``clip``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

__all__ = ["group_view", "ungroup", "padded_in_features", "one_thread", "CLIP_GRID", "affine_range",
           "grid_of_range", "affine_codes", "grid_sq_error", "affine_grid"]

CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(10))  # range shrink factors the clip search tries: 1.0 .. 0.55


def padded_in_features(in_features: int, group_size: int | None) -> int:
    """``in_features`` rounded up to a whole number of groups.

    A group size that does not divide the row (576 by 128 in SmolLM2) is handled
    by padding the last group; the padding's codes are stored and counted in bytes.
    """
    if group_size is None:
        return in_features
    return -(-in_features // group_size) * group_size


def group_view(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``(out, in)`` float weight -> ``(out, n_groups, group)``, padding the last group.

    The pad repeats the row's last value, so it never widens a group's range.
    """
    out_features, in_features = weight.shape
    group = in_features if group_size is None else group_size
    pad = padded_in_features(in_features, group_size) - in_features
    w = weight.float()
    if pad:
        w = F.pad(w.unsqueeze(0), (0, pad), mode="replicate").squeeze(0)  # (out, in_p)
    return w.reshape(out_features, -1, group)


def ungroup(grouped: torch.Tensor, in_features: int) -> torch.Tensor:
    """``(out, n_groups, group)`` -> ``(out, in)``, dropping the padding."""
    return grouped.reshape(grouped.shape[0], -1)[:, :in_features]


@contextmanager
def one_thread() -> Iterator[None]:
    """Runs the block on one torch thread, so float products sum in one fixed order.

    GPTQ rounds weights that error feedback has updated: on 2 threads its column loop's products
    split differently, last bits differ, some roundings flip and the feedback carries each flip
    on. 6 of 7 SmolLM2 matrices tried came out different at 1 and 2 threads, and a checkpoint
    applied at 2 threads missed the KL a 1-thread search worker had measured (3.9696 vs 3.9706).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def affine_range(w: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per group of ``w`` ``(R, G, g)``, ``(R, G, 1)``: ``(absmax, None)`` when symmetric, else ``(min, max)``."""
    if symmetric:
        return w.abs().amax(-1, keepdim=True), None
    return w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)


def grid_of_range(rng: tuple[torch.Tensor, torch.Tensor | None], bits: int, shrink: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp16 ``(R, G, 1)`` scale and offset (``None`` when symmetric) of the range shrunk toward zero."""
    a, b = rng
    if b is None:
        half = 2 ** (bits - 1)
        scale = a / (half - 1 if half > 1 else 1)
        return (scale if shrink == 1.0 else scale * shrink).half(), None
    lo, hi = (a, b) if shrink == 1.0 else (a * shrink, b * shrink)
    return ((hi - lo) / (2**bits - 1)).half(), lo.half()


def affine_codes(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int,
                 out: torch.Tensor) -> torch.Tensor:
    """Float codes of ``w`` ``(R, G, g)`` on the fp16 grid, written into ``out`` (same shape)."""
    s = scale.float().masked_fill(scale == 0, 1.0)
    if offset is None:
        torch.div(w, s, out=out).round_().add_(2 ** (bits - 1))
    else:
        torch.sub(w, offset.float(), out=out).div_(s).round_()
    return out.clamp_(0, 2**bits - 1)


def grid_sq_error(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int,
                  t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Each group's squared error ``(R, G)`` on a grid, for the clip search (``t``, ``q``: scratch like ``w``).

    In grid units: ``t = (w - offset) / scale``, error ``scale^2 * sum (t - clamp(round(t)))^2``,
    five passes over the block. It multiplies by ``1 / scale`` where :func:`affine_codes` divides,
    which can move a rare tie but only ranks grids; the stored codes come from :func:`affine_codes`.
    """
    s = scale.float().masked_fill(scale == 0, 1.0)
    inv = 1.0 / s
    shift = torch.full_like(s, 2.0 ** (bits - 1)) if offset is None else -offset.float() * inv
    torch.addcmul(shift, w, inv, out=t)  # t = (w - offset) / s, or w / s + 2**(b-1)
    torch.round(t, out=q).clamp_(0, 2**bits - 1)
    torch.sub(t, q, out=q)
    return torch.linalg.vector_norm(q, dim=-1).square_() * s.squeeze(-1).square()


def affine_grid(w: torch.Tensor, bits: int, symmetric: bool, clip: bool,
                scratch: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fp16 ``(R, G, 1)`` scale and offset (``None`` when symmetric) for each group of ``w`` ``(R, G, g)``.

    Without ``clip`` the grid spans the group's min..max (absmax when symmetric). With
    ``clip`` the range is also shrunk toward zero by each factor of :data:`CLIP_GRID` and
    each group keeps the grid with the smallest squared error; 1.0 (min-max) is tried
    first and wins ties, so clipping never does worse on a group's own weights. The
    search is vectorised over all groups, looping only over the factors. ``scratch``:
    two float buffers shaped like ``w`` (allocated when not given).
    """
    rng = affine_range(w, symmetric)
    scale, offset = grid_of_range(rng, bits)
    if not clip:
        return scale, offset
    t, q = scratch if scratch is not None else (torch.empty_like(w), torch.empty_like(w))
    best = grid_sq_error(w, scale, offset, bits, t, q)  # (R, G)
    for shrink in CLIP_GRID[1:]:
        sc2, off2 = grid_of_range(rng, bits, shrink)
        err = grid_sq_error(w, sc2, off2, bits, t, q)
        better = err < best  # strict: on a tie the wider grid stays
        best = torch.where(better, err, best)
        scale = torch.where(better.unsqueeze(-1), sc2, scale)
        offset = None if offset is None else torch.where(better.unsqueeze(-1), off2, offset)
    return scale, offset
