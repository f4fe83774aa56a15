"""Packed weights inside the model's own modules.

A quantized matrix stays in the module that held it: the module keeps its class
behaviour (a scaled embedding's ``embed_scale``, a bias, GPT-2's transposed ``Conv1D``, a
custom ``forward``), and only its ``weight`` is served from a :class:`PackedWeight`. The
module's class is swapped for a subclass (the same mechanism as ``torch.nn.utils.parametrize``)
whose ``weight`` is a property decoding the packed tensor, and the float parameter is
dropped; :func:`unpack` puts a float weight back.

Two subclasses replace a base ``forward`` where doing so is exact:

- :class:`QuantLinear` (any ``nn.Linear``): ``F.linear`` with the decoded weight; a single
  token (decode) goes through a packed kernel (:mod:`quant.kernels`) without materializing
  the float weight.
- :class:`QuantEmbedding` (any ``nn.Embedding``): decodes only the rows it looks up.

A subclass of ``nn.Linear`` / ``nn.Embedding`` that defines its own ``forward`` keeps it;
its ``super().forward`` lands on these (``Gemma3TextScaledWordEmbedding`` looks its rows up
through :class:`QuantEmbedding`, then scales them).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from quant.kernels import Kernel
from quant.kernels import prepare as prepare_kernel
from quant.packed import PackedTensor

__all__ = ["PackedWeight", "PackedModule", "QuantLinear", "QuantEmbedding", "pack", "unpack",
           "find_matrices", "matrix_shape", "as_matrix", "float_weights", "weight_matrices"]


class PackedWeight:
    """One packed matrix served as a float ``(out, in)`` weight, shared by every module holding it
    (a tied LM head shares its embedding's).

    Args:
        packed: the packed tensor.
        dtype: the dtype of the float weight it replaces (decoded weights are cast to it).
        cache_dense: keep the decoded weight until the packed tensor is swapped (the search
            workers do: a trial re-decodes only the matrices it changed).
    """

    def __init__(self, packed: PackedTensor, *, dtype: torch.dtype = torch.float32, cache_dense: bool = False):
        self.dtype = dtype
        self.cache_dense = cache_dense
        self._packed: PackedTensor | None = None
        self._dense: torch.Tensor | None = None
        self._kernel: Kernel | None = None
        self.packed = packed

    @property
    def packed(self) -> PackedTensor:
        return self._packed

    @packed.setter
    def packed(self, value: PackedTensor) -> None:
        if value is self._packed:
            return  # the same packed tensor (a search trial that kept this matrix): keep what was decoded
        if self._packed is not None and tuple(value.shape) != tuple(self._packed.shape):
            raise ValueError(f"packed shape {tuple(value.shape)} does not fit {tuple(self._packed.shape)}")
        self._packed = value
        self._dense = None
        self._kernel = None

    def dense(self) -> torch.Tensor:
        """The decoded ``(out, in)`` weight."""
        if not self.cache_dense:
            self._dense = None  # caching was turned off: free what it kept
        elif self._dense is not None:
            return self._dense
        w = self._packed.dequantize().to(self.dtype)
        if self.cache_dense:
            self._dense = w
        return w

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the decoded weight, ``(len(ids), in)``, without decoding the others."""
        return self._packed.dequantize_rows(ids).to(self.dtype)

    def kernel(self) -> Kernel:
        """The batch-1 packed kernel, prepared on first use and dropped with the packed tensor."""
        if self._kernel is None:
            self._kernel = prepare_kernel(self._packed)
        return self._kernel


class PackedModule(nn.Module):
    """Base of every packed module class: ``weight`` is decoded from :attr:`packed_weight`.

    Subclasses made by :func:`pack` record the class they came from (``float_class``) and
    whether that class stores its weight as ``(in, out)`` (``weight_transposed``).
    """

    float_class: type[nn.Module] = nn.Module
    weight_transposed: bool = False
    packed_weight: PackedWeight

    @property
    def weight(self) -> torch.Tensor:  # the module's own layout
        w = self.packed_weight.dense()
        return w.t() if self.weight_transposed else w

    @property
    def packed(self) -> PackedTensor:
        return self.packed_weight.packed

    @packed.setter
    def packed(self, value: PackedTensor) -> None:
        self.packed_weight.packed = value


class QuantLinear(PackedModule, nn.Linear):
    """An ``nn.Linear`` computing ``x @ dequantize(packed).T + bias``; batch-1 inputs through a packed
    kernel unless the weight is cached dense. Built by :func:`pack`, or directly from a packed tensor."""

    float_class = nn.Linear

    def __init__(self, packed: PackedTensor, bias: torch.Tensor | None = None, cache_dense: bool = False):
        nn.Module.__init__(self)
        self.out_features, self.in_features = packed.shape
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach().clone(),
                                                                               requires_grad=False))
        self.packed_weight = PackedWeight(packed, cache_dense=cache_dense)

    @property
    def _kernel(self) -> Kernel | None:  # the prepared kernel, if any (tests watch when it is built)
        return self.packed_weight._kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        pw = self.packed_weight
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if x.numel() == self.in_features and not pw.cache_dense:  # one token: decode from packed data
            y = pw.kernel()(x.reshape(1, -1))
            if bias is not None:
                y = y + bias
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.packed.setting.describe()}"


class QuantEmbedding(PackedModule, nn.Embedding):
    """An ``nn.Embedding`` whose lookup decodes only the rows it needs."""

    float_class = nn.Embedding

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        if self.max_norm is not None:  # renormalizes looked-up rows of the table: take the whole one
            return nn.Embedding.forward(self, ids)
        return self.packed_weight.rows(ids.reshape(-1)).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.packed.setting.describe()}"


def _conv1d() -> type | None:
    # transformers' Conv1D (GPT-2): a linear layer storing its weight as (in, out). Only a model
    # built by transformers can hold one, so it is looked up, never imported here.
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def _is_transposed(cls: type) -> bool:
    conv1d = _conv1d()
    return conv1d is not None and issubclass(cls, conv1d)


def _is_matrix(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding, PackedModule)) or _is_transposed(type(module))


_PACKED_CLASSES: dict[type, type] = {nn.Linear: QuantLinear, nn.Embedding: QuantEmbedding}


def _packed_class(cls: type) -> type:
    """The packed subclass of ``cls``: ``cls`` first in the MRO, so its own behaviour is kept."""
    if cls not in _PACKED_CLASSES:
        base = QuantLinear if issubclass(cls, nn.Linear) else QuantEmbedding if issubclass(cls, nn.Embedding) \
            else PackedModule
        _PACKED_CLASSES[cls] = type(f"Packed{cls.__name__}", (cls, base), {
            "float_class": cls, "weight_transposed": _is_transposed(cls), "__module__": __name__,
            "__doc__": f"{cls.__name__} with its weight decoded from a packed tensor."})
    return _PACKED_CLASSES[cls]


def matrix_shape(module: nn.Module) -> tuple[int, int]:
    """The ``(out, in)`` shape of a module's weight matrix, float or packed."""
    if isinstance(module, PackedModule):
        return tuple(module.packed.shape)
    shape = tuple(module.weight.shape)
    return shape[::-1] if _is_transposed(type(module)) else shape


def pack(module: nn.Module, weight: PackedWeight) -> None:
    """Serves ``module``'s weight from ``weight``: its float parameter is dropped and its class
    becomes the packed subclass; a module already packed just takes the new ``weight``."""
    if not isinstance(module, PackedModule):
        if not _is_matrix(module):
            raise TypeError(f"{type(module).__name__} holds no weight matrix (expected a linear, embedding "
                            "or Conv1D layer)")
        if matrix_shape(module) != tuple(weight.packed.shape):
            raise ValueError(f"packed shape {tuple(weight.packed.shape)} does not fit the module's "
                             f"{matrix_shape(module)}")
        del module.weight
        module.__class__ = _packed_class(type(module))
    module.packed_weight = weight


def unpack(module: PackedModule, weight: nn.Parameter) -> None:
    """Puts float ``weight`` (in the module's own layout) back into a packed ``module``."""
    float_class = type(module).float_class
    del module.packed_weight
    module.__class__ = float_class
    module.weight = weight


def find_matrices(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The weight matrices a policy covers, and the modules that share one.

    Linear layers (``Conv1D`` included), embeddings and the LM head, float or packed; norms
    stay float. A weight held by several modules (a tied LM head) is covered once, under the
    first module holding it.

    Returns:
        ``(matrices, ties)``: module by matrix name, and for every other module holding the
        same weight (a tied head) the name of the matrix it shares.
    """
    matrices: dict[str, nn.Module] = {}
    ties: dict[str, str] = {}
    owner: dict[int, str] = {}
    for name, module in model.named_modules():
        if not _is_matrix(module):
            continue
        key = id(module.packed_weight if isinstance(module, PackedModule) else module.weight)
        if key in owner:
            ties[name] = owner[key]
        else:
            owner[key] = name
            matrices[name] = module
    return matrices, ties


def weight_matrices(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Names and ``(out, in)`` shapes of the matrices a policy covers (see :func:`find_matrices`)."""
    return {name: matrix_shape(module) for name, module in find_matrices(model)[0].items()}


def as_matrix(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, laid out as ``module``'s own weight (``Conv1D``: ``(in, out)``), as an ``(out, in)`` view:
    the weight itself, or anything shaped like it (its gradient)."""
    return tensor.t() if _is_transposed(type(module)) else tensor


def float_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight matrix as a float ``(out, in)`` tensor, by name: views of the model's
    parameters, not copies (clone them to keep them apart from the model)."""
    out: dict[str, torch.Tensor] = {}
    for name, module in find_matrices(model)[0].items():
        if isinstance(module, PackedModule):
            raise ValueError(f"matrix {name!r} is already quantized: its float weight is gone; keep "
                             "quant.float_weights(model) from before the first apply_policy")
        out[name] = as_matrix(module, module.weight.detach())
    return out
