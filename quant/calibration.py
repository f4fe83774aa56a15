"""Calibration statistics for the formats that use data (``gptq``): per-layer input Hessians."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["collect_hessians"]


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
        names: the linear modules to collect (default: every ``nn.Linear``, a tied LM
            head included).

    Returns:
        Hessian by module name.
    """
    modules = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
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
