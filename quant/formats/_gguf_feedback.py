"""GPTQ's error feedback onto a GGUF block type's own grid: the scales fixed first, then the codes.

1. The blocks are encoded once from the weights (with the importance matrix, the Hessian's
   diagonal), which fixes every scale, minimum, sub-block scale and lattice scale.
2. :func:`~quant.formats._feedback.feed_errors` runs GPTQ's column loop: each column's weights are
   rounded to *their* grid (:func:`~quant.gguf.block_grid`), the error fed forward to the columns
   not yet quantized. A lattice type's weights take their values a group of 8 at a time (a codebook
   point of 8, or two of 4 for iq3, and the sign parity spanning 8), so there the loop steps by 8
   columns: each row's group gets its nearest point (:func:`~quant.gguf.lattice_grid`) under the
   weights ``diag(((U_gg^T U_gg))^-1)`` (what an error of each column costs with the later columns
   still free to compensate), then the group's errors are spread with its values fixed.
3. The chosen codes are written into the blocks (:func:`~quant.gguf.with_levels` /
   :func:`~quant.gguf.with_points`): the same fields, the same layout, a plain GGUF tensor.

With ``act_order`` the columns go by decreasing Hessian diagonal (a lattice type's groups of 8 by
their sum, whole), the grids being fixed anyway.
"""

from __future__ import annotations

import torch

from quant.formats._feedback import damped_hessian, feed_errors, group_order, inverse_cholesky
from quant.gguf import (block_grid, block_type, get_codec, lattice_grid, quantize_blocks, with_levels,
                        with_points)
from quant.gguf._iquants import _LatticeCodec

__all__ = ["gptq_blocks"]

GROUP = 8  # a lattice type's columns rounded together (the sign parity's span)


def gptq_blocks(name: str, weight: torch.Tensor, hessian: torch.Tensor, importance: torch.Tensor | None,
                damp: float, act_order: bool) -> torch.Tensor:
    """``(out, in)`` weights as GGML type ``name``'s blocks ``(out * in / block, block_bytes)``, codes by GPTQ.

    Args:
        name: the block type (``"q4_k"``); the rows must hold whole blocks.
        weight: float ``(out, in)``.
        hessian: ``(in, in)`` sum of ``x x^T`` over the calibration inputs.
        importance: ``(out * in / block, block)`` the plain encoder's importance (None: uniform).
        damp: fraction of the mean Hessian diagonal added to it.
        act_order: quantize columns (lattice: groups of 8) by decreasing Hessian diagonal.
    """
    bt = block_type(name)
    out_features, in_features = weight.shape
    blocks = quantize_blocks(name, weight.float().reshape(-1, bt.block), importance)  # the scales, fixed here
    h, w = damped_hessian(hessian, weight, damp)
    lattice = isinstance(get_codec(name), _LatticeCodec)
    step = GROUP if lattice else 1
    perm = group_order(h, step) if act_order else None
    if perm is not None:
        h, w = h[perm][:, perm], w[:, perm]
    u = inverse_cholesky(h)
    wt = w.T.contiguous()  # (in, out): column j of the weight is row j
    if lattice:
        return _lattice_feedback(name, blocks, wt, u, perm, out_features)
    return _scalar_feedback(name, blocks, wt, u, perm, out_features)


def _columns(v: torch.Tensor, out_features: int, perm: torch.Tensor | None) -> torch.Tensor:
    """Per-weight ``(N, block)`` -> ``(in, out)`` in quantization order (rows are whole blocks)."""
    t = v.reshape(out_features, -1).T
    return (t if perm is None else t[perm]).contiguous()


def _scalar_feedback(name: str, blocks: torch.Tensor, wt: torch.Tensor, u: torch.Tensor,
                     perm: torch.Tensor | None, out_features: int) -> torch.Tensor:
    grid = block_grid(name, blocks)
    scale = _columns(grid.scale, out_features, perm)  # (in, out)
    safe = scale.masked_fill(scale == 0, 1.0)
    offset = None if grid.offset is None else _columns(grid.offset, out_features, perm)
    levels = torch.empty_like(wt)

    def quantize(j: int, cols: torch.Tensor) -> torch.Tensor:
        y = cols[0] if offset is None else cols[0] - offset[j]
        lev = grid.nearest(torch.where(scale[j] != 0, y / safe[j], 0.0))  # as Grid.round
        levels[j] = lev
        v = scale[j] * lev
        return (v if offset is None else v + offset[j]).unsqueeze(0)

    feed_errors(wt, u, quantize)
    if perm is not None:
        levels = levels[torch.argsort(perm)]
    return with_levels(name, blocks, levels.T.reshape(blocks.shape[0], -1))


def _group_costs(u: torch.Tensor) -> torch.Tensor:
    """``(in / 8, 8)``: the diagonal of ``(U_gg^T U_gg)^-1`` per group of 8 columns: the cost of each
    column's error when the group's values are fixed together and the later columns compensate."""
    n = u.shape[0] // GROUP
    idx = torch.arange(n, device=u.device).unsqueeze(1) * GROUP + torch.arange(GROUP, device=u.device)
    ugg = u[idx.unsqueeze(-1), idx.unsqueeze(1)]  # (n, 8, 8) upper triangular blocks
    eye = torch.eye(GROUP, device=u.device).expand(n, -1, -1)
    inv = torch.linalg.solve_triangular(ugg, eye, upper=True)  # U_gg^-1
    return inv.square().sum(-1)  # diag(U_gg^-1 U_gg^-T)


def _lattice_feedback(name: str, blocks: torch.Tensor, wt: torch.Tensor, u: torch.Tensor,
                      perm: torch.Tensor | None, out_features: int) -> torch.Tensor:
    grid = lattice_grid(name, blocks)
    in_features = wt.shape[0]
    db = _columns(grid.scale, out_features, perm)  # (in, out); one value per group of 8 (sub-blocks hold 16+)
    costs = _group_costs(u)
    n = get_codec(name).group
    idx = torch.empty(in_features // n, out_features, dtype=torch.long, device=wt.device)  # quantization order
    neg = torch.empty(in_features, out_features, dtype=torch.bool, device=wt.device)

    def quantize(j: int, cols: torch.Tensor) -> torch.Tensor:
        w = costs[j // GROUP].expand(out_features, -1)  # (out, 8)
        i, s, v = grid.round(cols.T, db[j], w)  # (out, 8 / n), (out, 8), (out, 8)
        idx[j // n:(j + GROUP) // n] = i.T
        neg[j:j + GROUP] = s.T
        return v.T

    feed_errors(wt, u, quantize, step=GROUP)
    if perm is not None:  # whole groups moved: back to column order, group by group
        gperm = perm[::GROUP] // GROUP
        back = torch.argsort(gperm)
        neg = neg.view(-1, GROUP, out_features)[back].reshape(in_features, out_features)
        idx = idx.view(-1, GROUP // n, out_features)[back].reshape(-1, out_features)
    nb = blocks.shape[0]
    return with_points(name, blocks, idx.T.reshape(nb, -1), neg.T.reshape(nb, -1))
