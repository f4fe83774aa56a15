"""Calibration statistics for the formats that use data (``gptq``): per-layer input Hessians."""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from quant.apply import quantize
from quant.formats import get_format
from quant.modules import find_matrices
from quant.packed import PackedTensor
from quant.settings import QuantSetting

__all__ = ["collect_hessians", "needs_hessians", "quantize_calibrated", "quantize_calibrated_many"]


@torch.inference_mode()
def collect_hessians(model: nn.Module, batches: Iterable[torch.Tensor],
                     names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """``H = sum x x^T`` over the inputs ``x`` that each linear layer sees, ``(in, in)`` float32.

    One forward pass of the (float) model per batch, with hooks on the linear layers;
    every layer sees the float model's activations (GPTQ applied layer by layer on
    these is the "independent" variant: later layers do not see earlier layers'
    quantization error).

    Args:
        model: a model called as ``model(input_ids=batch)``.
        batches: ``(B, T)`` token id tensors.
        names: the linear modules to collect (default: every linear matrix, GPT-2's
            ``Conv1D`` and a tied LM head included).

    Returns:
        Hessian by module name.
    """
    matrices, ties = find_matrices(model)
    modules = {n: m for n, m in model.named_modules()
               if (n in matrices or n in ties) and not isinstance(m, nn.Embedding)}  # lookups take no inputs
    wanted = set(modules) if names is None else set(names) & set(modules)
    hessians: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
            h = hessians.get(name)
            hessians[name] = x.T @ x if h is None else h.addmm_(x.T, x)
        return fn

    try:
        for name in sorted(wanted):
            handles.append(modules[name].register_forward_hook(hook(name)))
        for batch in batches:
            model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def _takes_hessian(setting: QuantSetting) -> bool:
    fmt = get_format(setting.format)
    return "hessian" in fmt.calibration and fmt.uses_calibration(setting)


def needs_hessians(settings: Iterable[QuantSetting]) -> bool:
    """Whether any of ``settings`` quantizes with input Hessians (gptq; lloyd with ``weighted``)."""
    return any(_takes_hessian(s) for s in settings)


def quantize_calibrated(name: str, weight: torch.Tensor, setting: QuantSetting,
                        hessians: Mapping[str, torch.Tensor]) -> PackedTensor:
    """:func:`quant.quantize` with matrix ``name``'s Hessian for the formats that take one.

    A matrix without a Hessian (an embedding, whose input is token ids) is quantized data-free.
    """
    h = hessians.get(name) if _takes_hessian(setting) else None
    return quantize(weight, setting) if h is None else quantize(weight, setting, hessian=h)


def quantize_calibrated_many(name: str, weight: torch.Tensor, settings: Iterable[QuantSetting],
                             hessians: Mapping[str, torch.Tensor]) -> list[PackedTensor]:
    """:func:`quantize_calibrated` of one matrix at each of ``settings``, in their order.

    Settings of a format with ``quantize_many`` (gptq) that differ only in bits go through it together
    (one error-feedback pass for all of them); the others one by one.
    """
    settings = list(settings)
    out: list[PackedTensor | None] = [None] * len(settings)
    together: dict[tuple, list[int]] = {}
    for i, s in enumerate(settings):
        fmt = get_format(s.format)
        h = hessians.get(name) if _takes_hessian(s) else None
        if h is None or not hasattr(fmt, "quantize_many"):
            out[i] = quantize_calibrated(name, weight, s, hessians)
        else:
            together.setdefault((s.format, s.group_size, fmt.options_of(s)), []).append(i)
    for (fmt_name, _, _), idx in together.items():
        for i in idx:
            settings[i].validate()
        packed = get_format(fmt_name).quantize_many(weight.detach().contiguous(), [settings[i] for i in idx],
                                                    hessian=hessians[name])
        for i, p in zip(idx, packed):
            out[i] = p
    return out  # type: ignore[return-value]
