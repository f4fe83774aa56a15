"""Replacing a model's float modules by packed ones according to a policy."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from quant.formats import get_format
from quant.modules import QuantEmbedding, QuantLinear
from quant.packed import PackedTensor
from quant.policy import Policy, weight_matrices
from quant.settings import QuantSetting

__all__ = ["apply_policy", "quantize", "Quantizer"]

Quantizer = Callable[[str, torch.Tensor, QuantSetting], PackedTensor]


def quantize(weight: torch.Tensor, setting: QuantSetting | dict, **calibration) -> PackedTensor:
    """Quantizes a float ``(out, in)`` weight with ``setting`` (a :class:`QuantSetting` or dict)."""
    if not isinstance(setting, QuantSetting):
        setting = QuantSetting.from_dict(setting)
    else:
        setting.validate()
    if weight.dim() != 2:
        raise ValueError(f"quantize expects a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    return get_format(setting.format).quantize(weight.detach(), setting, **calibration)


def _install(model: nn.Module, name: str, module: nn.Module, packed: PackedTensor,
             cache_dense: bool, tied_to: str | None = None) -> None:
    if isinstance(module, (QuantLinear, QuantEmbedding)):
        module.packed = packed
        return
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(module, nn.Linear):
        new: nn.Module = QuantLinear(packed, module.bias, cache_dense=cache_dense, tied_to=tied_to)
    elif isinstance(module, nn.Embedding):
        new = QuantEmbedding(packed, module.padding_idx)
    else:
        raise TypeError(f"{name} is a {type(module).__name__}, not a linear or embedding layer")
    setattr(parent, child, new)


def apply_policy(model: nn.Module, policy: Policy, *,
                 weights: dict[str, torch.Tensor] | None = None,
                 quantizer: Quantizer | None = None,
                 cache_dense: bool = False) -> dict[str, PackedTensor]:
    """Quantizes the model in place: every matrix the policy names runs from packed data.

    Modules already quantized get their packed tensor swapped, so a worker can apply
    one policy after another to the same model, passing the float ``weights`` it kept.

    Args:
        model: the model; its float ``nn.Linear`` / ``nn.Embedding`` modules are replaced.
        policy: must name exactly the model's weight matrices.
        weights: float weights by matrix name (needed once modules are quantized).
        quantizer: ``(name, weight, setting) -> PackedTensor``; defaults to
            :func:`quantize` (a worker passes a caching one).
        cache_dense: keep decoded weights in ``QuantLinear`` (faster repeated forwards).

    Returns:
        The packed tensor of every matrix, by name.
    """
    quantizer = quantizer or (lambda name, w, s: quantize(w, s))
    modules = dict(model.named_modules())
    if weights is None:
        matrices = weight_matrices(model)
        policy.check_model(matrices)
        weights = {name: modules[name].weight.detach() for name in matrices}
    else:
        policy.check_model({n: tuple(w.shape) for n, w in weights.items()})
    # A tied LM head (not in the policy) shares the embedding's packed tensor.
    ties: dict[str, str] = {}
    for name, module in modules.items():
        if name in policy.settings:
            continue
        if isinstance(module, QuantLinear) and module.tied_to in policy.settings:
            ties[name] = module.tied_to
        elif isinstance(module, nn.Linear):
            ties.update({name: emb for emb in policy.settings
                         if getattr(modules[emb], "weight", None) is module.weight})
    packed_all: dict[str, PackedTensor] = {}
    for name, setting in policy.settings.items():
        packed = quantizer(name, weights[name], setting)
        packed_all[name] = packed
        _install(model, name, modules[name], packed, cache_dense)
    for name, emb in ties.items():
        _install(model, name, modules[name], packed_all[emb], cache_dense, tied_to=emb)
    return packed_all
