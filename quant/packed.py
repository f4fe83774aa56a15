"""The packed tensor: real bit-packed codes plus the buffers needed to decode them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.settings import QuantSetting

__all__ = ["PackedTensor"]


@dataclass
class PackedTensor:
    """A quantized weight matrix as stored and shipped.

    Attributes:
        setting: how it was quantized.
        shape: the original ``(out_features, in_features)``.
        buffers: every tensor needed to reconstruct the weight (bit-packed codes,
            scales, zeros, codebooks, outliers...). Nothing else is stored, so
            :attr:`nbytes` is the real size.
    """

    setting: QuantSetting
    shape: tuple[int, int]
    buffers: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        """Bytes of all buffers: the size of this matrix in a checkpoint."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel

    def dequantize(self) -> torch.Tensor:
        """The float32 ``(out_features, in_features)`` weight this tensor encodes."""
        from quant.formats import get_format

        return get_format(self.setting.format).dequantize(self)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Float32 rows ``rows`` of the weight (an embedding lookup), ``(len(rows), in_features)``."""
        from quant.formats import get_format

        return get_format(self.setting.format).dequantize_rows(self, rows)
