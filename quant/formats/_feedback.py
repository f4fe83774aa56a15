"""GPTQ's error feedback, written once: every format that feeds rounding errors forward runs this loop.

Columns are quantized in order; after each one its error, weighted by the inverse Hessian of the
layer's calibration inputs ``H = X^T X``, is subtracted from the columns not yet quantized, so the
layer's *output* error on those inputs shrinks (GPTQ, Frantar et al. 2022, from the paper's
equations). What "quantize these columns" means is the caller's: ``gptq``'s affine grid, a GGUF
block's fixed grid (:mod:`quant.formats.gguf`), or a lattice codebook that takes 8 columns at once.

With ``step`` > 1 the caller rounds ``step`` columns jointly (a codebook point spans them); the
loop then spreads their errors one column after another with those values fixed, which is the
exact block update ``E = (W_g - Q_g) (H^-1_gg)^-1 H^-1_g,rest`` of the Optimal Brain Surgeon
with several weights fixed at once (the sequential form of one fixed block is that block form).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["damped_hessian", "inverse_cholesky", "feed_errors", "group_order"]

BLOCK = 128  # columns per lazy update


def damped_hessian(h: torch.Tensor | None, weight: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``H`` ready for the loop, and the weight with its dead inputs' columns zeroed.

    ``H`` defaults to the identity (nothing is propagated). An input never active (``H_jj = 0``)
    cannot matter: its diagonal becomes 1 and its weights 0. Then ``damp`` times the mean diagonal is
    added to the diagonal for stability.

    Args:
        h: ``(in, in)`` sum of ``x x^T``, or None.
        weight: ``(rows, in)`` float32 (copied, not modified).
        damp: fraction of the mean diagonal, in (0, 1].
    """
    w = weight.float().clone()
    n = w.shape[1]
    h = torch.eye(n, device=w.device) if h is None else h.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(n, device=w.device)
    return h, w


def inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``): row ``i`` spreads column ``i``'s error."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def group_order(h: torch.Tensor, step: int) -> torch.Tensor:
    """Activation order: columns by decreasing Hessian diagonal (largest inputs first, while the most
    error can still be pushed onto the rest), whole runs of ``step`` columns kept together (by their sum)."""
    d = torch.diag(h)
    if step == 1:
        return torch.argsort(d, descending=True, stable=True)
    groups = torch.argsort(d.view(-1, step).sum(1), descending=True, stable=True)
    return (groups.unsqueeze(1) * step + torch.arange(step, device=h.device)).reshape(-1)


def feed_errors(wt: torch.Tensor, u: torch.Tensor,
                quantize: Callable[[int, torch.Tensor], torch.Tensor], *, step: int = 1, block: int = BLOCK,
                start_block: Callable[[int, int], None] | None = None) -> None:
    """GPTQ's column loop over the transposed weight ``wt`` ``(in, rows)``, in place.

    Args:
        wt: the weight transposed, so each column is a contiguous row (the loop is bound by Python's
            per-operation cost, and contiguous rows keep each short op cheap); its columns are
            updated with the errors of those before them, and end as scaled errors (scratch).
        u: :func:`inverse_cholesky` of the (permuted) Hessian, ``(in, in)``.
        quantize: ``quantize(j, cols)``: the values (``(step, rows)``, dequantized) chosen for the
            columns ``j .. j + step - 1`` from their current weights ``cols`` (``(step, rows)``, read
            only); the caller records its codes.
        step: columns rounded together (``block`` and ``in`` must be multiples of it).
        block: columns per lazy update: a block's errors reach the later columns in one product.
        start_block: ``start_block(b0, b1)`` before block ``[b0, b1)`` is quantized, when every earlier
            error has reached it (``gptq`` fixes a group's grid there).
    """
    n = wt.shape[0]
    if n % step or block % step:
        raise ValueError(f"columns ({n}) and block ({block}) must be multiples of the step ({step})")
    diag = torch.diagonal(u).tolist()
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        if start_block is not None:
            start_block(b0, b1)
        wb = wt[b0:b1].clone()  # (B, rows), updated row by row; row j ends as column j's scaled error
        for j0 in range(0, b1 - b0, step):
            deq = quantize(b0 + j0, wb[j0:j0 + step])
            for j in range(j0, j0 + step):
                e = wb[j].sub_(deq[j - j0]).div_(diag[b0 + j])  # in place: wb[j] is not needed any more
                if j + 1 < b1 - b0:
                    wb[j + 1:].addr_(u[b0 + j, b0 + j + 1:b1], e, alpha=-1)
        if b1 < n:  # the block's errors reach the later columns at once
            wt[b1:].addmm_(u[b0:b1, b1:].T, wb, alpha=-1)
