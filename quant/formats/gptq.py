"""``gptq``: RTN's grid, with each column's rounding error pushed onto the columns not yet quantized.

The layout is exactly ``rtn``'s (codes, fp16 scale and, unless symmetric, offset
per group), so decoding is RTN's; only the choice of codes differs. Columns are
quantized left to right; after each one, its error, weighted by the inverse
Hessian of the layer's calibration inputs ``H = X^T X``, is subtracted from the
remaining columns, so the layer's *output* error on those inputs shrinks (GPTQ,
Frantar et al. 2022, written here from the paper's equations).

Calibration: ``quant.quantize(w, setting, hessian=H)`` with ``H`` the
``(in, in)`` sum of ``x x^T`` over calibration inputs. Without it the Hessian is
the identity: nothing is propagated and the result equals ``rtn`` bit for bit.

Option ``act_order``: columns in decreasing order of their Hessian diagonal (largest inputs
first), each group's grid fixed up front from the original weights since the stored groups
stay in column order; with ``clip`` as well, the range search picks those grids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from quant.formats._affine import AffineFormat, AffineOptions
from quant.formats._base import register_format
from quant.formats._feedback import BLOCK, damped_hessian, feed_errors, group_order, inverse_cholesky
from quant.packed import PackedTensor
from quant.packing import pack_bits
from quant.primitives import affine_grid, one_thread, padded_in_features
from quant.settings import QuantSetting

__all__ = ["GPTQ", "GptqOptions"]

@dataclass(frozen=True)
class GptqOptions(AffineOptions):
    """``symmetric`` and ``clip`` (see :class:`AffineOptions`), and:

    Attributes:
        damp: fraction of the mean Hessian diagonal added to it for stability, in (0, 1].
        act_order: quantize columns by decreasing Hessian diagonal (static group grids).

    No ``outlier_frac``: outliers would need to be chosen inside the error feedback.
    """

    damp: float = 0.01
    act_order: bool = False

    def check(self) -> None:
        super().check()
        if not 0.0 < self.damp <= 1.0:
            raise ValueError(f"option 'damp' must be in (0, 1] (a fraction of the mean Hessian diagonal "
                             f"added for stability), got {self.damp!r}")


@register_format
class GPTQ(AffineFormat):
    """GPTQ's codes in rtn's ``affine-int`` layout: rtn's decoding, bytes and kernels."""

    name = "gptq"
    Options = GptqOptions
    calibration = ("hessian",)
    error_feedback = True

    def quantize(self, weight: torch.Tensor, setting: QuantSetting, **calibration: Any) -> PackedTensor:
        with one_thread():  # the same codes whatever the caller's thread count (see one_thread)
            return self._quantize(weight, [setting], **calibration)[0]

    def quantize_many(self, weight: torch.Tensor, settings: list[QuantSetting],
                      **calibration: Any) -> list[PackedTensor]:
        """:meth:`quantize` at several bit-widths in one pass: the settings must differ in bits only.

        The column loop is bound by Python's per-operation cost, not by arithmetic, so the settings'
        rows are stacked and go through it together (the sensitivity proxy quantizes every matrix at
        every setting of a space). Row by row the arithmetic is that of :meth:`quantize`.
        """
        if len({(s.group_size, self.options_of(s)) for s in settings}) > 1:
            raise ValueError("quantize_many takes settings that differ in bits only; got "
                             f"{sorted({s.describe() for s in settings})}")
        with one_thread():
            return self._quantize(weight, list(settings), **calibration)

    def _quantize(self, weight: torch.Tensor, settings: list[QuantSetting], **calibration: Any) -> list[PackedTensor]:
        unknown = set(calibration) - set(self.calibration)
        if unknown:
            raise ValueError(f"gptq takes calibration 'hessian' ((in, in) sum of x x^T), got {sorted(unknown)}")
        out_features, in_features = weight.shape
        h = calibration.get("hessian")
        if h is not None and tuple(h.shape) != (in_features, in_features):
            raise ValueError(f"hessian must be ({in_features}, {in_features}) for a weight of shape "
                             f"{tuple(weight.shape)}, got {tuple(h.shape)}")
        setting = settings[0]  # the settings share everything but bits
        opts = self.options_of(setting)
        h, w = damped_hessian(h, weight, opts.damp)

        g = setting.group_size
        symmetric, clip, act_order = opts.symmetric, opts.clip, opts.act_order
        bits = [s.bits for s in settings]
        n = len(settings)
        # Per stacked row (setting k's rows are k * out ... (k + 1) * out - 1): its grid's top code and centre.
        levels = torch.tensor([2**b - 1 for b in bits], dtype=torch.float32, device=w.device).repeat_interleave(
            out_features)
        half = torch.tensor([2 ** (b - 1) for b in bits], dtype=torch.float32, device=w.device).repeat_interleave(
            out_features)
        zero = torch.zeros_like(levels)

        def grid(span: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            """Each setting's grids of ``span`` (``(S * out, groups, width)``, its own rows), stacked."""
            parts = [self._group_grid(span[k * out_features:(k + 1) * out_features], b, symmetric, clip)
                     for k, b in enumerate(bits)]
            return torch.cat([p[0] for p in parts]), None if symmetric else torch.cat([p[1] for p in parts])

        # Activation order: the columns with the largest inputs (Hessian diagonal) first, while the
        # most error can still be pushed onto the rest. The stored groups stay in column order, so
        # their grids are fixed up front from the original weights ("static groups").
        w = w.repeat(n, 1)  # (S * out, in): every setting's copy of the weights
        perm, static = None, None
        scales, offsets = [], []
        if act_order:
            perm = group_order(h, 1)
            width = g or in_features
            whole = in_features // width  # the whole groups' grids in one search, a last partial one alone
            spans = ([w[:, :whole * width].reshape(-1, whole, width)] if whole else []) + \
                ([w[:, whole * width:].unsqueeze(1)] if whole * width < in_features else [])
            for span in spans:
                scale, offset = grid(span)  # (S * out * groups,), row-major
                scales += list(scale.view(n * out_features, -1).unbind(1))
                if offset is not None:
                    offsets += list(offset.view(n * out_features, -1).unbind(1))
            static = [(sc.float().masked_fill(sc == 0, 1.0), sc.float(), None if symmetric else offsets[i].float())
                      for i, sc in enumerate(scales)]
            group_of = (perm // width).tolist()  # the stored group of each column, in quantization order
            h, w = h[perm][:, perm], w[:, perm]
        u = inverse_cholesky(h)
        wt = w.T.contiguous()  # (in, S * out)
        codes_t = torch.empty(in_features, n * out_features, dtype=torch.uint8, device=w.device)
        current: list = [None, None, None]  # the block's grid: scale (no zeros), scale, offset

        def start_block(b0: int, b1: int) -> None:
            if static is None and (g is not None or b0 == 0):
                # Blocks are whole groups, so a group's grid sees every error pushed onto it.
                span = (wt[b0:b1] if g is not None else wt).T.unsqueeze(1)  # (S * out, 1, B or in)
                scale, offset = grid(span)
                if offset is not None:
                    offsets.append(offset)
                scales.append(scale)
                current[:] = scale.float().masked_fill(scale == 0, 1.0), scale.float(), \
                    None if offset is None else offset.float()

        def quantize(j: int, cols: torch.Tensor) -> torch.Tensor:
            col = cols[0]
            sc, sf, of = current if static is None else static[group_of[j]]  # this column's own group's grid
            if of is None:
                q = torch.div(col, sc).round_().add_(half).clamp_(min=zero, max=levels)
                deq = (q - half).mul_(sf)
            else:
                q = torch.sub(col, of).div_(sc).round_().clamp_(min=zero, max=levels)
                deq = torch.addcmul(of, q, sf)
            codes_t[j] = q
            return deq.unsqueeze(0)

        feed_errors(wt, u, quantize, block=g or BLOCK, start_block=start_block)
        if perm is not None:  # back to column order
            codes_t = codes_t[torch.argsort(perm)]
        pad = padded_in_features(in_features, g) - in_features
        out = []
        for k, s in enumerate(settings):
            rows = slice(k * out_features, (k + 1) * out_features)
            codes = codes_t[:, rows].T  # (out, in)
            # Pad like group_view (repeat the last column) so an identity Hessian gives rtn's bytes.
            codes = torch.cat([codes, codes[:, -1:].expand(-1, pad)], dim=1)
            buffers = {"scale": torch.stack([sc[rows] for sc in scales], dim=1), "codes": pack_bits(codes, s.bits)}
            if not symmetric:
                buffers["offset"] = torch.stack([of[rows] for of in offsets], dim=1)
            out.append(PackedTensor(setting=s, shape=tuple(weight.shape), buffers=buffers))
        return out

    @staticmethod
    def _group_grid(span: torch.Tensor, bits: int, symmetric: bool, clip: bool
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One group's fp16 scale and offset ``(out,)`` from its weights as updated so far: the affine grid,
        and with ``clip`` its range search. The error feedback keeps moving the weights, so at 2 bits
        a min-max grid is dominated by a few pushed-out weights (KL 18.2 on SmolLM2 at 2 bits)."""
        scale, offset = affine_grid(span, bits, symmetric, clip)
        return scale.view(-1), None if offset is None else offset.view(-1)
