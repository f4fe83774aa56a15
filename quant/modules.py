"""Modules that compute from packed weights: QuantLinear and QuantEmbedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quant.kernels import Kernel
from quant.kernels import prepare as prepare_kernel
from quant.packed import PackedTensor

__all__ = ["QuantLinear", "QuantEmbedding"]


class QuantLinear(nn.Module):
    """A linear layer whose weight lives only as a :class:`PackedTensor`.

    ``forward`` dequantizes and multiplies; with :attr:`cache_dense` set (the search
    workers do, for speed) the decoded weight is kept until the packed tensor is
    swapped. Both paths compute ``x @ dequantize(packed).T + bias``, so what the
    search measures is what an exported checkpoint computes.

    A single token (decode) without ``cache_dense`` goes through a packed kernel
    (:mod:`quant.kernels`, prepared lazily on first use and dropped with the packed
    tensor): same product, without materializing the float weight.
    """

    def __init__(self, packed: PackedTensor, bias: torch.Tensor | None = None, cache_dense: bool = False,
                 tied_to: str | None = None):
        super().__init__()
        self.tied_to = tied_to  # name of the embedding whose packed table this head shares
        self.out_features, self.in_features = packed.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.cache_dense = cache_dense
        self._dense: torch.Tensor | None = None
        self._kernel: Kernel | None = None
        self.packed = packed

    @property
    def packed(self) -> PackedTensor:
        return self._packed

    @packed.setter
    def packed(self, value: PackedTensor) -> None:
        if tuple(value.shape) != (self.out_features, self.in_features):
            raise ValueError(f"packed shape {value.shape} does not fit ({self.out_features}, {self.in_features})")
        if value is getattr(self, "_packed", None):
            return  # the same packed tensor (a search trial that kept this matrix): keep its decoded weight
        self._packed = value
        self._dense = None
        self._kernel = None

    def weight_dense(self) -> torch.Tensor:
        if not self.cache_dense:
            return self._packed.dequantize()
        if self._dense is None:
            self._dense = self._packed.dequantize()
        return self._dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if x.numel() == self.in_features and not self.cache_dense:  # one token: decode from packed data
            if self._kernel is None:
                self._kernel = prepare_kernel(self._packed)
            y = self._kernel(x.reshape(1, -1))
            if self.bias is not None:
                y = y + self.bias
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        w = self.weight_dense()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self._packed.setting.describe()}"


class QuantEmbedding(nn.Module):
    """An embedding whose table is a :class:`PackedTensor`; a lookup decodes only the rows it needs."""

    def __init__(self, packed: PackedTensor, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = packed.shape
        self.padding_idx = padding_idx
        self.packed = packed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        rows = self.packed.dequantize_rows(ids.reshape(-1))
        return rows.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.packed.setting.describe()}"
