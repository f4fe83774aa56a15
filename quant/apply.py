"""Model surgery: quantizing a model's matrices in place by a policy, and putting them back to float."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from quant.formats import get_format
from quant.modules import PackedModule, PackedWeight, find_matrices, float_weights, matrix_shape, pack, unpack
from quant.packed import PackedTensor
from quant.policy import Policy, PolicyError
from quant.settings import QuantSetting

__all__ = ["apply_policy", "restore_float", "quantize", "Quantizer"]

Quantizer = Callable[[str, torch.Tensor, QuantSetting], PackedTensor]


def quantize(weight: torch.Tensor, setting: QuantSetting | dict, **calibration) -> PackedTensor:
    """Quantizes a float ``(out, in)`` weight with ``setting`` (a :class:`QuantSetting` or dict)."""
    if not isinstance(setting, QuantSetting):
        setting = QuantSetting.from_dict(setting)
    else:
        setting.validate()
    if weight.dim() != 2:
        raise ValueError(f"quantize expects a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    # contiguous: a transposed layer's (out, in) matrix is a view of its (in, out) parameter.
    return get_format(setting.format).quantize(weight.detach().contiguous(), setting, **calibration)


def _groups(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, list[nn.Module]]]:
    """Matrix modules by name, and every module holding each matrix (the matrix's own, then tied heads)."""
    matrices, ties = find_matrices(model)
    modules = dict(model.named_modules())
    holders = {name: [module] for name, module in matrices.items()}
    for head, name in ties.items():
        holders[name].append(modules[head])
    return matrices, holders


def _to_float(holders: list[nn.Module], weight: torch.Tensor) -> None:
    """Puts the float ``(out, in)`` ``weight`` back into packed modules, as one parameter they share."""
    transposed = {type(m).weight_transposed for m in holders}
    assert len(transposed) == 1, "modules sharing a weight store it in one layout"
    param = nn.Parameter(weight.t() if transposed.pop() else weight, requires_grad=False)
    for module in holders:
        unpack(module, param)


def _check_weights(weights: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]]) -> None:
    for name, shape in shapes.items():
        if name not in weights:
            raise PolicyError(f"no float weight for matrix {name!r}: pass every matrix of the model in weights")
        if tuple(weights[name].shape) != shape:
            raise PolicyError(f"float weight for {name!r} has shape {tuple(weights[name].shape)}, "
                              f"the model's matrix {shape}")


def apply_policy(model: nn.Module, policy: Policy, *, partial: bool = False,
                 weights: Mapping[str, torch.Tensor] | None = None, quantizer: Quantizer | None = None,
                 cache_dense: bool = False) -> dict[str, PackedTensor]:
    """Quantizes the model in place: every matrix the policy names runs from packed data.

    Each named matrix's module is kept, with its weight served from the packed tensor (see
    :mod:`quant.modules`), so the model computes what it computed before on the decoded weights;
    a tied LM head shares its embedding's packed tensor. Modules already quantized get their
    packed tensor swapped, so a worker can apply one policy after another to the same model,
    passing the float ``weights`` it kept: a matrix whose packed tensor did not change keeps
    its decoded weight.

    Args:
        model: the model, float or quantized by an earlier call.
        policy: names exactly the model's matrices, or with ``partial`` any of them.
        partial: every matrix the policy does not name runs in float (put back from ``weights``
            if an earlier call quantized it): per-matrix sensitivity.
        weights: float ``(out, in)`` weights by matrix name (:func:`quant.float_weights` before the
            first call); needed once the model has quantized modules.
        quantizer: ``(name, weight, setting) -> PackedTensor``; defaults to :func:`quantize`
            (a worker passes a caching one).
        cache_dense: keep decoded weights (faster repeated forwards, float-sized memory).

    Returns:
        The packed tensor of every named matrix, by name.

    Raises:
        PolicyError: the policy names matrices the model lacks (or misses some, without
            ``partial``), or ``weights`` is needed and missing.
    """
    quantizer = quantizer or (lambda name, w, s: quantize(w, s))
    matrices, holders = _groups(model)
    shapes = {name: matrix_shape(m) for name, m in matrices.items()}
    if partial:
        extra = sorted(set(policy.settings) - set(shapes))
        if extra:
            raise PolicyError(f"policy does not match the model: {len(extra)} names not in the model "
                              f"(e.g. {extra[0]!r})")
    else:
        policy.check_model(shapes)
    needed = {n: s for n, s in shapes.items() if n in policy.settings or isinstance(matrices[n], PackedModule)}
    if weights is None:
        packed_now = sorted(n for n in needed if isinstance(matrices[n], PackedModule))
        if packed_now:
            raise PolicyError(f"matrix {packed_now[0]!r} is already quantized: pass the float weights "
                              "kept before the first apply_policy (quant.float_weights)")
        weights = float_weights(model)
    _check_weights(weights, needed)
    packed_all: dict[str, PackedTensor] = {}
    for name, module in matrices.items():
        setting = policy.settings.get(name)
        if setting is None:
            if isinstance(module, PackedModule):  # partial: this one runs float again
                _to_float(holders[name], weights[name])
            continue
        packed = packed_all[name] = quantizer(name, weights[name], setting)
        if isinstance(module, PackedModule):
            module.packed_weight.packed = packed  # its tied head shares the PackedWeight
            module.packed_weight.cache_dense = cache_dense
        else:
            shared = PackedWeight(packed, dtype=module.weight.dtype, cache_dense=cache_dense)
            for holder in holders[name]:
                pack(holder, shared)
    return packed_all


def restore_float(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Puts every quantized matrix of the model back to float.

    Args:
        model: a model quantized by :func:`apply_policy`.
        weights: its float ``(out, in)`` weights by matrix name, as passed to :func:`apply_policy`;
            they become the model's parameters (shared, not copied; a tied head shares one).
    """
    matrices, holders = _groups(model)
    packed = {n: matrix_shape(m) for n, m in matrices.items() if isinstance(m, PackedModule)}
    _check_weights(weights, packed)
    for name in packed:
        _to_float(holders[name], weights[name])
