"""Sparse outliers (SpQR-style): the worst-served weights kept in fp16 with their positions.

A format opts in with the :func:`supports_outliers` class decorator, whose ``Options``
derive from :class:`OutlierOptions` (option ``outlier_frac``, a float in ``[0, 0.1]``);
the decorator wraps the format's methods:

1. the ``k = floor(outlier_frac * numel)`` weights farthest from their row's median
   (in units of the row's RMS) are set aside and replaced by that median, so they
   no longer stretch their group's range or scale;
2. the format quantizes the rest;
3. the ``k`` weights with the largest error against the original weight (mostly the
   ones set aside) are stored exactly: ``outlier_idx`` (int32 flat positions,
   ascending) and ``outlier_val`` (fp16); decoding writes them over the format's output.

Both buffers are in :attr:`PackedTensor.buffers`, so their 6 bytes per outlier count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch

from quant.formats._options import FormatOptions
from quant.packed import PackedTensor
from quant.settings import QuantSetting

__all__ = ["OutlierOptions", "supports_outliers", "outlier_count", "select_outliers", "apply_outliers",
           "MAX_OUTLIER_FRAC"]

MAX_OUTLIER_FRAC = 0.1  # beyond this a sparse fp16 list costs more than a denser format
BYTES_PER_OUTLIER = 6  # int32 position + fp16 value
C = TypeVar("C", bound=type)


@dataclass(frozen=True)
class OutlierOptions(FormatOptions):
    """The option of every format that supports outliers.

    Attributes:
        outlier_frac: fraction of the weights kept in fp16 with their positions, in ``[0, 0.1]``.
    """

    outlier_frac: float = 0.0

    def check(self) -> None:
        super().check()
        if not 0.0 <= self.outlier_frac <= MAX_OUTLIER_FRAC:
            raise ValueError(f"option 'outlier_frac' must be in [0, {MAX_OUTLIER_FRAC}], got "
                             f"{self.outlier_frac!r} (e.g. 0.005 keeps 0.5% of weights)")


def outlier_count(shape: tuple[int, int], frac: float) -> int:
    """Outliers kept for a matrix of ``shape``: ``floor(frac * numel)``."""
    return int(math.floor(frac * shape[0] * shape[1]))


def select_outliers(weight: torch.Tensor, decoded: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest-error positions (int32, ascending) and their fp16 weights."""
    err = (weight.float() - decoded).abs().reshape(-1)
    idx = err.topk(k).indices.sort().values
    return idx.to(torch.int32), weight.reshape(-1)[idx].half()


def apply_outliers(decoded: torch.Tensor, idx: torch.Tensor, val: torch.Tensor,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """Writes the outliers into ``decoded`` (the whole matrix, or rows ``rows`` of it)."""
    in_features = decoded.shape[1]
    decoded = decoded.contiguous()  # ungroup() returns a strided slice when a group was padded
    if rows is None:
        decoded.view(-1)[idx.long()] = val.float()
        return decoded
    # Rows of each outlier, ascending because positions are; for each requested row
    # find its slice of outliers with two binary searches, so a lookup of B*T tokens
    # never builds a (B*T, k) table.
    rows = rows.reshape(-1)
    idx = idx.long()
    out_row = idx // in_features
    start = torch.searchsorted(out_row, rows)
    count = torch.searchsorted(out_row, rows, right=True) - start
    which = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), count)  # output row
    first = torch.repeat_interleave(start - torch.cumsum(count, 0) + count, count)
    pos = first + torch.arange(which.numel(), device=rows.device)  # index into idx / val
    decoded[which, idx[pos] % in_features] = val[pos].float()
    return decoded


def _replace_extremes(weight: torch.Tensor, k: int) -> torch.Tensor:
    w = weight.float()
    med = w.median(dim=1, keepdim=True).values  # (out, 1)
    rms = (w - med).pow(2).mean(1, keepdim=True).sqrt().clamp(min=1e-12)
    score = ((w - med) / rms).abs().reshape(-1)
    idx = score.topk(k).indices
    cleaned = w.clone()
    cleaned.view(-1)[idx] = med.expand_as(w).reshape(-1)[idx]
    return cleaned


def supports_outliers(cls: C) -> C:
    """Class decorator for a :class:`quant.formats.Format` whose ``Options`` derive from :class:`OutlierOptions`.

    It wraps ``quantize``, ``decode`` (so ``dequantize`` and ``dequantize_rows`` see the
    outliers too), ``expected_nbytes`` and ``runtime`` (which then says the outliers are kept).
    """
    if not issubclass(cls.Options, OutlierOptions):
        raise TypeError(f"{cls.__name__}.Options must derive from quant.outliers.OutlierOptions "
                        f"to support outliers (it adds the option outlier_frac)")
    quantize, decode, expected_nbytes, runtime = cls.quantize, cls.decode, cls.expected_nbytes, cls.runtime

    def _quantize(self: Any, weight: torch.Tensor, setting: QuantSetting, **calibration: Any) -> PackedTensor:
        k = outlier_count(tuple(weight.shape), self.options_of(setting).outlier_frac)
        if k == 0:
            return quantize(self, weight, setting, **calibration)
        packed = quantize(self, _replace_extremes(weight, k), setting, **calibration)
        idx, val = select_outliers(weight, decode(self, packed, None), k)
        packed.buffers.update(outlier_idx=idx, outlier_val=val)
        return packed

    def _decode(self: Any, packed: PackedTensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        w = decode(self, packed, rows)
        if "outlier_idx" not in packed.buffers:
            return w
        return apply_outliers(w, packed.buffers["outlier_idx"], packed.buffers["outlier_val"], rows)

    def _expected_nbytes(self: Any, shape: tuple[int, int], setting: QuantSetting) -> int:
        k = outlier_count(shape, self.options_of(setting).outlier_frac)
        return expected_nbytes(self, shape, setting) + BYTES_PER_OUTLIER * k

    def _runtime(self: Any, setting: QuantSetting) -> Any:
        return replace(runtime(self, setting), outliers=self.options_of(setting).outlier_frac > 0)

    cls.quantize, cls.decode, cls.expected_nbytes, cls.runtime = _quantize, _decode, _expected_nbytes, _runtime
    return cls
