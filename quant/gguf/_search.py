"""Vectorized scale searches shared by the GGML codecs (every function works on ``(N, B)`` blocks).

Each search minimizes the weighted squared error ``sum w (x - x_hat)^2`` of a block: ``w`` is the
importance of each weight (the calibration energy of its input column, or ones). A candidate grid
is tried for every block at once; each candidate's codes get their least-squares scale (and offset)
in closed form, and its error comes from the same sums, so one candidate costs a few passes over
the blocks. The fp16 rounding of the stored scales is then handled by :func:`refine_scale` /
:func:`refine_affine`, which judge the exact stored values.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["Nearest", "uniform_levels", "table_levels", "scaled", "round_affine", "fit_scale", "fit_affine",
           "refine_scale", "refine_affine", "sq_error", "ls_scale", "ls_affine", "fp16"]


def fp16(v: torch.Tensor) -> torch.Tensor:
    """``v`` rounded to the nearest fp16 value, as float32 (saturating at +-65504: never inf)."""
    return v.clamp(-65504.0, 65504.0).to(torch.float16).float()


def _inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, 1.0 / d, torch.zeros_like(d))


def sq_error(x: torch.Tensor, x_hat: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """``(N,)`` weighted squared error of each block."""
    e = (x - x_hat).square_()
    return (e if w is None else e.mul_(w)).sum(-1)


def _wsum(a: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    return (a if w is None else a * w).sum(-1)


Nearest = Callable[[torch.Tensor], torch.Tensor]


def uniform_levels(lo: int, hi: int) -> Nearest:
    """Nearest integer level in ``[lo, hi]`` (the uniform grids: q8_0, q4_0, the k-quants...)."""
    return lambda y: y.round_().clamp_(lo, hi)


def table_levels(values: torch.Tensor) -> Nearest:
    """Nearest value of an ascending table of integers (iq4_nl's 16 levels), returned as that value.

    The midpoints between integer levels are multiples of 1/2, so every half-unit bucket
    ``[k/2, (k+1)/2)`` lies on one side of each: a lookup table on ``floor(2 y)`` finds the nearest
    level in a few passes (``torch.bucketize`` took 10x longer on 2 cores).
    """
    if not torch.equal(values, values.round()) or not bool((values[1:] > values[:-1]).all()):
        raise ValueError("table_levels needs ascending integer levels")
    lo, hi = int(values[0]) - 1, int(values[-1]) + 1
    centers = torch.arange(2 * lo, 2 * hi, dtype=torch.float32, device=values.device) / 2 + 0.25
    lut = values[torch.bucketize(centers, ((values[1:] + values[:-1]) / 2).contiguous())]

    def nearest(y: torch.Tensor) -> torch.Tensor:
        k = y.mul_(2).floor_().clamp_(2 * lo, 2 * hi - 1).sub_(2 * lo).long()
        return lut[k]
    return nearest


def scaled(x: torch.Tensor, d: torch.Tensor, nearest: Nearest) -> torch.Tensor:
    """The level values nearest to ``x / d`` for per-block scales ``d`` ``(N, ...)``; level 0 where d = 0."""
    d = d.unsqueeze(-1)
    return nearest(torch.where(d != 0, x / torch.where(d != 0, d, 1.0), 0.0))


def round_affine(x: torch.Tensor, d: torch.Tensor, m: torch.Tensor, nmax: int) -> torch.Tensor:
    """Nearest codes of ``x ~ d L + m`` in ``[0, nmax]``; 0 where ``d = 0``."""
    d = d.unsqueeze(-1)
    return torch.where(d != 0, (x - m.unsqueeze(-1)) / torch.where(d != 0, d, 1.0), 0.0).round_().clamp_(0, nmax)


def ls_scale(x: torch.Tensor, q: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Least-squares ``d`` of ``x ~ d q`` per block (0 where every ``q`` is 0)."""
    num, den = _wsum(x * q, w), _wsum(q * q, w)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def ls_affine(x: torch.Tensor, q: torch.Tensor, w: torch.Tensor | None,
              nonpositive_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares ``(d, m)`` of ``x ~ d q + m`` per block, and the fit's weighted error.

    With ``nonpositive_offset`` the offset is kept ``<= 0`` (the k-quants store ``-dmin * m``).
    A block whose codes are all equal gets ``d = 0`` and the weighted mean as offset.
    """
    sw = _wsum(torch.ones_like(x), w)
    sx, sq, sqq, sxq, sxx = _wsum(x, w), _wsum(q, w), _wsum(q * q, w), _wsum(x * q, w), _wsum(x * x, w)
    return _solve_affine(sw, sx, sxx, sq, sqq, sxq, nonpositive_offset)


def _solve_affine(sw, sx, sxx, sq, sqq, sxq, nonpositive_offset):
    det = sw * sqq - sq * sq
    ok = det > 1e-12 * sw * sqq
    safe = torch.where(ok, det, 1.0)
    d = torch.where(ok, (sw * sxq - sx * sq) / safe, 0.0)
    m = torch.where(ok, (sqq * sx - sq * sxq) / safe, sx / sw.clamp(min=1e-30))
    if nonpositive_offset:
        clip = m > 0
        d = torch.where(clip, torch.where(sqq > 0, sxq / sqq.clamp(min=1e-30), 0.0), d)
        m = torch.where(clip, 0.0, m)
    err = sxx - 2 * d * sxq - 2 * m * sx + d * d * sqq + 2 * d * m * sq + m * m * sw
    return d, m, err


def fit_scale(x: torch.Tensor, w: torch.Tensor | None, nearest: Nearest, ends: Sequence[float],
              offsets: Sequence[float]) -> torch.Tensor:
    """The best least-squares scale ``(N,)`` of ``x ~ d q`` over a candidate grid, ``q`` from ``nearest``.

    Candidates map each block's largest-magnitude value ``mx`` to a level just inside or outside an
    end of the range: ``d = mx / (e + sign(e) * t)`` for each nonzero end level ``e`` and offset
    ``t`` (``t > 0`` clips the extreme, ``t < 0`` leaves headroom). Each candidate's levels get
    their least-squares scale; the one with the lowest error wins. Scales are signed: the sign puts
    the extreme on the side of the range that fits it best.
    """
    idx = x.abs().argmax(-1, keepdim=True)
    mx = torch.gather(x, -1, idx).squeeze(-1)  # (N,) signed extreme
    best_gain = torch.full_like(mx, -1.0)  # gain = (sum w x q)^2 / sum w q^2 = error reduction
    best = torch.zeros_like(mx)
    wx = x if w is None else w * x
    for end in ends:
        if end == 0:
            continue
        for t in offsets:
            inv = _inv(mx / (end + (t if end > 0 else -t)))
            q = nearest(x * inv.unsqueeze(-1))
            sxq = (wx * q).sum(-1)
            sqq = _wsum(q.square_(), w)
            good = sqq > 0
            gain = torch.where(good, sxq * sxq / torch.where(good, sqq, 1.0), -1.0)
            better = gain > best_gain
            best_gain = torch.where(better, gain, best_gain)
            best = torch.where(better, sxq / torch.where(good, sqq, 1.0), best)
    return best


def fit_affine(x: torch.Tensor, w: torch.Tensor | None, nmax: int, offsets: Sequence[float],
               nonpositive_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The best least-squares ``(d, m)`` ``(N,)`` for ``x ~ d L + m``, ``L`` in ``[0, nmax]``.

    Candidate grids span the block's ``[min, max]`` with ``nmax + t`` steps (``t`` in ``offsets``);
    each candidate's codes get their least-squares ``(d, m)``. The min-max grid itself (``t = 0``
    without refit) is always a candidate, so the result is never worse than min-max rounding.
    """
    mn, mx = x.amin(-1), x.amax(-1)
    if nonpositive_offset:
        mn = mn.clamp(max=0)
    rng = mx - mn
    sw = _wsum(torch.ones_like(x), w)
    sx, sxx = _wsum(x, w), _wsum(x * x, w)
    xs = x - mn.unsqueeze(-1)
    wx = x if w is None else w * x
    # The min-max grid, as the start.
    d0 = rng / nmax
    q = round_affine(x, d0, mn, nmax)
    best_d, best_m = d0, mn
    best_err = sq_error(x, d0.unsqueeze(-1) * q + mn.unsqueeze(-1), w)
    for t in offsets:
        inv = _inv(rng / (nmax + t))
        q = (xs * inv.unsqueeze(-1)).round_().clamp_(0, nmax)
        sq, sxq = _wsum(q, w), (wx * q).sum(-1)
        sqq = _wsum(q.square_(), w)
        d, m, err = _solve_affine(sw, sx, sxx, sq, sqq, sxq, nonpositive_offset)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_d, best_m = torch.where(better, d, best_d), torch.where(better, m, best_m)
    return best_d, best_m


def refine_scale(x: torch.Tensor, w: torch.Tensor | None, nearest: Nearest,
                 starts: Sequence[torch.Tensor], rounds: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Chooses each block's fp16 scale among ``starts`` by its exact error, then alternates levels
    and least-squares scale ``rounds`` times, keeping a step only where it lowers the exact error.

    Returns the fp16-exact scale ``(N,)`` and the levels ``(N, B)`` (nearest for that scale).
    """
    best_d = best_q = best_err = None
    for i in range(len(starts) + rounds):
        d = fp16(starts[i] if i < len(starts) else ls_scale(x, best_q, w))
        q = scaled(x, d, nearest)
        err = sq_error(x, d.unsqueeze(-1) * q, w)
        if best_d is None:
            best_d, best_q, best_err = d, q, err
            continue
        better = err < best_err
        best_d, best_err = torch.where(better, d, best_d), torch.where(better, err, best_err)
        best_q = torch.where(better.unsqueeze(-1), q, best_q)
    return best_d, best_q


def refine_affine(x: torch.Tensor, w: torch.Tensor | None, nmax: int,
                  starts: Sequence[tuple[torch.Tensor, torch.Tensor]], rounds: int = 2
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`refine_scale` for ``x ~ d L + m`` with fp16 ``d`` and ``m``: ``(d, m, codes)``."""
    best = None
    cands = list(starts)
    for i in range(len(cands) + rounds):
        if i < len(cands):
            d, m = fp16(cands[i][0]), fp16(cands[i][1])
        else:
            d, m, _ = ls_affine(x, best[2], w)
            d, m = fp16(d), fp16(m)
        q = round_affine(x, d, m, nmax)
        err = sq_error(x, d.unsqueeze(-1) * q + m.unsqueeze(-1), w)
        if best is None:
            best = [d, m, q, err]
            continue
        better = err < best[3]
        best = [torch.where(better, d, best[0]), torch.where(better, m, best[1]),
                torch.where(better.unsqueeze(-1), q, best[2]), torch.where(better, err, best[3])]
    return best[0], best[1], best[2]
