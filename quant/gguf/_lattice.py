"""The i-quants' lattice codebooks (gguf-py's grids) and our encoder onto them.

A lattice type stores each group of ``n`` weights (8, or 4 for iq3) as one point of a fixed
codebook of positive coordinates (``grid[index]``, gguf-py's tables: iq2 grids take the values 8,
25 and 43, iq3_xxs 4 .. 62, iq3_s 1 .. 15), times a sign per weight and a 4-bit scale per sub-block.

Encoder, per super-block (all super-blocks at once), minimizing ``sum w (x - x_hat)^2``:
1. the signs are the weights' own; where the type stores only 7 of every 8 sign bits (their parity
   is the 8th: an even number of negatives), a group with an odd number of negative weights gives
   one weight the wrong sign: the one whose flip costs least at the scale being tried (its error
   at the smallest level on the wrong side, less its error at its nearest level);
2. each sub-block's float scale is searched: for 8 candidates mapping the sub-block's largest
   magnitude onto 0.7 .. 1.4 times the top coordinate, every group gets its nearest codebook point
   under the importance weights, then the least-squares scale for those points; the best wins;
3. those scales are quantized (``db = d * unit * (2 ls + 1)``, ``ls`` in 0..15, fp16 ``d``) by the
   k-quants' scale search, each sub-block weighted by ``sum w g^2`` (what a scale error costs it);
4. the points are searched again for the quantized scales, then refined, each step kept only where
   it lowers the error of the stored values: a least-squares refit of ``d`` with the points and
   the ``ls`` fixed, then each ``ls`` one step either way (a second round gained < 1 %).

The nearest point: the coordinate-wise nearest point of the full lattice (every combination of the
levels) is the exact nearest under any diagonal weights. Where the codebook lacks it, the stored
points (step 4) are found among all ``K`` points (exact); the scale search (step 2) tries only the
8 codebook points nearest to it (the exact point for 91-96 % of such groups), 4-8x cheaper.
A 1536 x 8960 matrix takes 16-21 s of CPU time on one thread here (q2_k / q3_k 5-6 s, iq4_xs 8 s).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from quant.gguf._search import fit_scale, fp16, refine_scale, table_levels

__all__ = ["Lattice", "LatticeSpec", "lattice", "ksigns", "encode_lattice", "round_groups"]

QK = 256
MAX_SHORTLIST = 64
SEARCH_SHORTLIST = 8  # while the scales are searched
FINAL_SHORTLIST: int | None = None  # for the stored scales (None: every point, exact)
BRUTE_CHUNK = 1024  # groups per (chunk, K) distance matrix
GATHER_CHUNK = 16384


@dataclass(frozen=True)
class Lattice:
    """A codebook of ``K`` points of ``n`` coordinates, each coordinate one of ``L`` integer levels.

    Attributes:
        points: ``(K, n)`` float32, gguf-py's grid (the decoder's values).
        levels: ``(L,)`` the coordinate values, ascending.
        index: ``(L ** n,)`` the codebook index of each full-lattice point (coordinate ``i`` at
            level ``l_i`` is the point ``sum l_i L^i``), -1 where the codebook lacks it.
        shortlist: ``(L ** n, P)`` the codebook points nearest to each full-lattice point
            (Euclidean), nearest first.
        lut: ``floor(2 q) - lut_from`` -> the level nearest to ``q`` (the levels are integers, so
            their midpoints are multiples of 1/2 and every half-unit bucket is on one side of each).
        lut_from: the first bucket.
    """

    points: torch.Tensor
    levels: torch.Tensor
    index: torch.Tensor
    shortlist: torch.Tensor
    lut: torch.Tensor
    lut_from: int

    @property
    def dim(self) -> int:
        return self.points.shape[1]

    def to(self, device: torch.device) -> "Lattice":
        if self.points.device == device:
            return self
        fields = ("points", "levels", "index", "shortlist", "lut")
        return replace(self, **{f: getattr(self, f).to(device) for f in fields})

    def level_index(self, q: torch.Tensor) -> torch.Tensor:
        """The index of the level nearest to each value of ``q`` (any shape), as ``long``."""
        hi = self.lut_from + len(self.lut) - 1
        return self.lut[(q * 2).floor_().clamp_(self.lut_from, hi).sub_(self.lut_from).long()]

    def cells(self, level_index: torch.Tensor) -> torch.Tensor:
        """``(M, n)`` level indices -> ``(M,)`` their full-lattice point."""
        return (level_index * (len(self.levels) ** torch.arange(self.dim, device=level_index.device))).sum(-1)

    def nearest(self, q: torch.Tensor, w: torch.Tensor | None, shortlist: int | None = None,
                cell: torch.Tensor | None = None) -> torch.Tensor:
        """``(M,)`` index of the point nearest to each ``(M, n)`` row of ``q`` under the weights ``w``.

        Where the row's full-lattice point (``cell``, from :meth:`cells` when not given) is in the
        codebook it is the answer (exact under any weights: the distance is a sum over coordinates,
        each at its minimum). Elsewhere the ``shortlist`` codebook points nearest to that
        full-lattice point are tried, or every point (exact) where ``shortlist`` is None.
        """
        cell = self.cells(self.level_index(q)) if cell is None else cell
        out = self.index[cell]
        rows = (out < 0).nonzero().squeeze(1)
        if len(rows) == 0:
            return out
        q, cell = q[rows], cell[rows]
        w = torch.ones_like(q) if w is None else w[rows]
        found = torch.empty(len(rows), dtype=torch.long, device=q.device)
        if shortlist is None or shortlist >= self.points.shape[0]:
            wt = torch.cat([self.points.square(), -2 * self.points], dim=1).T.contiguous()  # (2n, K)
            b = 32 if wt.shape[1] % 32 == 0 else 1
            for i in range(0, len(rows), BRUTE_CHUNK):
                j = slice(i, i + BRUTE_CHUNK)
                # sum w (g - q)^2 = sum w g^2 - 2 sum w q g + (a constant per row)
                dist = (torch.cat([w[j], w[j] * q[j]], dim=1) @ wt).view(-1, wt.shape[1] // b, b)
                # argmin in two steps (the block holding the minimum, then within it): the same
                # first minimum, 1.3-1.5x faster than one argmin over all K on this CPU.
                blk = dist.amin(-1).argmin(-1)
                found[j] = blk * b + dist[torch.arange(len(blk), device=q.device), blk].argmin(-1)
        else:
            gg = torch.cat([self.points.square(), self.points], dim=1)  # (K, 2n)
            short = self.shortlist[:, :shortlist].contiguous()
            for i in range(0, len(rows), GATHER_CHUNK):
                j = slice(i, i + GATHER_CHUNK)
                cand = short.index_select(0, cell[j])  # (m, P); index_select: 3x faster than cand[...]
                coef = torch.cat([w[j], -2 * w[j] * q[j]], dim=1).unsqueeze(-1)  # (m, 2n, 1)
                dist = torch.bmm(gg.index_select(0, cand.view(-1)).view(*cand.shape, -1), coef).squeeze(-1)  # (m, P)
                found[j] = cand.gather(1, dist.argmin(1, keepdim=True)).squeeze(1)
        out[rows] = found
        return out


def _gguf_py_class(name: str):
    import gguf.quants

    return getattr(gguf.quants, name)


@functools.cache
def lattice(name: str) -> Lattice:
    """The codebook of gguf-py's class ``name`` (``"IQ2_XXS"``), read from gguf-py's own tables."""
    cls = _gguf_py_class(name)
    cls.init_grid()  # gguf-py decodes its packed grid into cls.grid (1, 1, K, n)
    points = torch.from_numpy(np.ascontiguousarray(cls.grid.reshape(cls.grid_shape), dtype=np.float32))
    levels = torch.tensor(sorted(set(points.flatten().tolist())), dtype=torch.float32)
    k, n = points.shape
    nl = len(levels)
    powers = nl ** torch.arange(n)
    code = (torch.searchsorted(levels, points) * powers).sum(-1)
    index = torch.full((nl ** n,), -1, dtype=torch.long)
    index[code] = torch.arange(k)
    every = levels[(torch.arange(nl ** n).unsqueeze(-1) // powers) % nl]  # (L^n, n) full-lattice points
    dist = torch.cdist(every, points, compute_mode="donot_use_mm_for_euclid_dist")  # exact on these integers
    short = dist.sort(dim=1, stable=True).indices[:, :MAX_SHORTLIST].contiguous()  # nearest first
    lo, hi = int(levels[0]) - 1, int(levels[-1]) + 1
    centers = torch.arange(2 * lo, 2 * hi, dtype=torch.float32) / 2 + 0.25
    lut = torch.bucketize(centers, (levels[1:] + levels[:-1]) / 2)
    return Lattice(points, levels, index, short, lut, 2 * lo)


@functools.cache
def ksigns() -> torch.Tensor:
    """ggml's ``ksigns_iq2xs`` (gguf-py's bytes): 7-bit index -> 8 sign bits of even parity."""
    return torch.from_numpy(np.frombuffer(_gguf_py_class("IQ2_XXS").ksigns, dtype=np.uint8).copy())


@dataclass(frozen=True)
class LatticeSpec:
    """One lattice type's encoding parameters.

    Attributes:
        grid: gguf-py's class holding the codebook (``"IQ2_XXS"``).
        sub: weights per 4-bit scale (32 or 16).
        parity: only 7 of every 8 sign bits are stored (an even number of negatives per 8 weights).
        sub_scale: ``(d (S, 1), ls (S, n_sub)) -> db``, the decoder's own float32 arithmetic.
        unit: ``db = d * unit * (2 ls + 1)`` (the same value, for the scale search).
    """

    grid: str
    sub: int
    parity: bool
    sub_scale: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    unit: float


def _wsum(a: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    return (a if w is None else a * w).sum(-1)


ODD_LEVELS = torch.arange(1, 32, 2, dtype=torch.float32)  # 2 ls + 1
CANDIDATES = [0.7 + 0.1 * i for i in range(8)]  # the top coordinate times these is where |x|max lands
SCALE_OFFSETS = [i / 2 for i in range(-8, 9)]
ROUNDS = 1


@dataclass
class _Fit:
    """Codebook indices ``(S, 256 / n)``, sign bits ``(S, 256)``, and per sub-block ``(S, n_sub)``:
    the error of the stored values and the sums ``sum w x g`` (signed), ``sum w g^2``."""

    idx: torch.Tensor
    neg: torch.Tensor
    err: torch.Tensor
    num: torch.Tensor
    den: torch.Tensor

    def take(self, other: "_Fit", better: torch.Tensor) -> "_Fit":
        """Per sub-block (``better (S, n_sub)``) or super-block (``(S, 1)``), ``other`` where better."""
        b = better.expand_as(self.err)
        pick = lambda a, o: torch.where(b.repeat_interleave(a.shape[1] // b.shape[1], dim=1), o, a)  # noqa: E731
        return _Fit(pick(self.idx, other.idx), pick(self.neg, other.neg), torch.where(b, other.err, self.err),
                    torch.where(b, other.num, self.num), torch.where(b, other.den, self.den))


def _signed_points(lat: Lattice, parity: bool, q: torch.Tensor, dbw: torch.Tensor, a: torch.Tensor,
                   neg: torch.Tensor, odd: torch.Tensor | None, w: torch.Tensor | None, shortlist: int | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each group's codebook point and the signs, for magnitudes ``q = |x| / db`` ``(S, L)`` (``L`` a multiple
    of 8) with the scales ``dbw`` per weight: indices ``(S, L / n)``, sign bits and the signed magnitudes ``|x|``
    (negative where a weight takes the wrong sign), all ``(S, L)``. ``odd``: ``(S, L / 8)`` groups of 8 with
    an odd number of negatives (where ``parity``)."""
    s, length, n = q.shape[0], q.shape[1], lat.dim
    li = lat.level_index(q)  # (S, L)
    sa = a
    if parity:
        # Each odd group flips the weight that loses least: rounded to the smallest level on the
        # wrong side instead of its nearest level on its own side.
        lv = lat.levels
        cost = ((q + lv[0]).square_() - (q - lv[li]).square_()).mul_(dbw.square())
        if w is not None:
            cost.mul_(w)
        j = cost.view(s, -1, 8).argmin(-1, keepdim=True)  # (S, L / 8, 1)
        flip = torch.zeros(s, length // 8, 8, dtype=torch.bool, device=q.device)
        flip = flip.scatter_(-1, j, odd.unsqueeze(-1)).view(s, length)
        q, sa, neg = torch.where(flip, -q, q), torch.where(flip, -sa, sa), neg ^ flip
        li = li.masked_fill(flip, 0)  # a negative q: the lowest level
    idx = lat.nearest(q.view(-1, n), None if w is None else w.view(-1, n), shortlist,
                      cell=lat.cells(li.view(-1, n))).view(s, length // n)
    return idx, neg, sa


def round_groups(x: torch.Tensor, db: torch.Tensor, w: torch.Tensor | None, spec: LatticeSpec
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups of 8 weights rounded onto the codebook with their sub-block scales fixed (error feedback).

    The same choice as the encoder's last step (:func:`encode_lattice` with the stored scales): the
    weights' own signs, the parity fixed where it costs least, the exact nearest point under ``w``.

    Args:
        x: ``(M, 8)`` weights, one group of 8 per row (the sign parity spans 8; iq3's points take 4).
        db: ``(M,)`` each group's sub-block scale (``>= 0``; 0 gives the value 0).
        w: ``(M, 8)`` importance of each weight's error, or None (uniform).
        spec: the type's :class:`LatticeSpec`.

    Returns:
        Codebook indices ``(M, 8 / n)``, sign bits ``(M, 8)`` (True: negative) and the values ``(M, 8)``.
    """
    if x.dim() != 2 or x.shape[1] != 8 or tuple(db.shape) != (x.shape[0],):
        raise ValueError(f"round_groups takes x (M, 8) and db (M,), got {tuple(x.shape)} and {tuple(db.shape)}")
    lat = lattice(spec.grid).to(x.device)
    x, w = x.contiguous(), None if w is None else w.float().expand_as(x).contiguous()
    a, neg = x.abs(), x < 0
    dbw = db.unsqueeze(-1).expand_as(x)
    q = torch.where(dbw > 0, a / torch.where(dbw > 0, dbw, 1.0), 0.0)
    odd = (neg.sum(-1, keepdim=True) % 2) == 1 if spec.parity else None
    idx, neg, _ = _signed_points(lat, spec.parity, q, dbw, a, neg, odd, w, FINAL_SHORTLIST)
    g = lat.points.index_select(0, idx.view(-1)).view_as(x)
    return idx, neg, torch.where(neg, -g, g) * dbw


class _Assigner:
    """The nearest points and their signs for given sub-block scales."""

    def __init__(self, x: torch.Tensor, w: torch.Tensor | None, spec: LatticeSpec) -> None:
        self.lat = lattice(spec.grid).to(x.device)
        self.spec = spec
        self.s, self.sub = x.shape[0], spec.sub
        self.a = x.abs()
        self.neg = x < 0
        self.w = w
        if spec.parity:
            self.odd = (self.neg.view(self.s, -1, 8).sum(-1) % 2) == 1  # (S, 32)
        self.xx = _wsum((x * x).view(self.s, -1, self.sub), None if w is None else w.view(self.s, -1, self.sub))

    def __call__(self, db: torch.Tensor, shortlist: int | None) -> _Fit:
        """The fit for sub-block scales ``db (S, n_sub)``, points from :meth:`Lattice.nearest`."""
        s, sub, lat = self.s, self.sub, self.lat
        dbw = db.repeat_interleave(sub, dim=1)  # (S, 256)
        q = torch.where(dbw > 0, self.a / torch.where(dbw > 0, dbw, 1.0), 0.0)
        idx, neg, sa = _signed_points(lat, self.spec.parity, q, dbw, self.a, self.neg,
                                      self.odd if self.spec.parity else None, self.w, shortlist)
        g = lat.points.index_select(0, idx.view(-1)).view(s, QK)
        w3 = None if self.w is None else self.w.view(s, -1, sub)
        num = _wsum((sa * g).view(s, -1, sub), w3)  # (S, n_sub)
        den = _wsum((g * g).view(s, -1, sub), w3)
        return _Fit(idx, neg, self.xx - 2 * db * num + db * db * den, num, den)


def encode_lattice(x: torch.Tensor, w: torch.Tensor | None, spec: LatticeSpec
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(S, 256)`` -> fp16-exact ``d (S,)``, scales ``ls (S, n_sub)`` in 0..15, codebook indices
    ``(S, 256 / n)`` and sign bits ``(S, 256)`` (True: negative; even per 8 where ``spec.parity``)."""
    s, sub = x.shape[0], spec.sub
    assign = _Assigner(x, w, spec)
    top = float(assign.lat.levels[-1])
    amax = assign.a.view(s, -1, sub).amax(-1)  # (S, n_sub)
    best_gain = torch.full_like(amax, -1.0)
    best, cost = torch.zeros_like(amax), torch.zeros_like(amax)

    def consider(fit: _Fit) -> None:
        nonlocal best_gain, best, cost
        good = fit.den > 0
        gain = torch.where(good, fit.num.square() / torch.where(good, fit.den, 1.0), -1.0)  # error reduction
        better = gain > best_gain
        best_gain = torch.where(better, gain, best_gain)
        best = torch.where(better, fit.num / torch.where(good, fit.den, 1.0), best)
        cost = torch.where(better, fit.den, cost)

    for c in CANDIDATES:
        consider(assign(amax / (c * top), SEARCH_SHORTLIST))
    # The 4-bit scales: best ~ d * unit * (2 ls + 1), weighted by what a scale error costs.
    y = best.clamp(min=0) / spec.unit
    levels = table_levels(ODD_LEVELS.to(x.device))
    d, odd = refine_scale(y, cost, levels, [fit_scale(y, cost, levels, (31,), SCALE_OFFSETS), y.amax(-1) / 31])
    d, ls = d.clamp(min=0), ((odd - 1) / 2).round_().clamp_(0, 15)
    fit = assign(spec.sub_scale(d.unsqueeze(-1), ls), FINAL_SHORTLIST)
    for _ in range(ROUNDS):
        # Least-squares d with the points and ls fixed: x ~ d * (unit (2 ls + 1) g).
        f = spec.unit * (2 * ls + 1)
        sxy, syy = (f * fit.num).sum(-1), (f * f * fit.den).sum(-1)
        nd = fp16(torch.where(syy > 0, sxy / syy.clamp(min=1e-30), d)).clamp(min=0)
        other = assign(spec.sub_scale(nd.unsqueeze(-1), ls), FINAL_SHORTLIST)
        better = (other.err.sum(-1) < fit.err.sum(-1)).unsqueeze(-1)
        d, fit = torch.where(better.squeeze(-1), nd, d), fit.take(other, better)
        for step in (-1, 1):
            ls2 = (ls + step).clamp(0, 15)
            other = assign(spec.sub_scale(d.unsqueeze(-1), ls2), FINAL_SHORTLIST)
            better = other.err < fit.err
            ls, fit = torch.where(better, ls2, ls), fit.take(other, better)
    return d, ls.long(), fit.idx, fit.neg
