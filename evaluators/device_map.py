"""A model spread over several GPUs by accelerate's device map, for a model one GPU cannot hold
(``--split-model``).

Each layer stays on its GPU, where its matrices are quantized and decoded (the packed modules keep
the module, so accelerate's hooks on it still move its inputs); the hooks carry the activations
from GPU to GPU and the logits back to the first, where the reference is.
"""

from __future__ import annotations

import logging
from typing import Mapping

from torch import nn

from evaluators.errors import UserError

__all__ = ["block_bytes", "device_map", "spread"]


def _no_split(model: nn.Module) -> list[str]:
    # The classes the model says must stay on one device (its decoder layer: the residual stream).
    return sorted(getattr(model, "_no_split_modules", None) or [])


def block_bytes(model: nn.Module) -> int:
    """The largest part :func:`device_map` keeps on one device: a module of a class the model names
    unsplittable (its decoder layer), or a single parameter (the embedding, the LM head)."""
    no_split = set(_no_split(model))
    blocks = [sum(p.numel() * p.element_size() for p in m.parameters())
              for m in model.modules() if type(m).__name__ in no_split]
    params = [p.numel() * p.element_size() for p in model.parameters()]
    return max(blocks + params, default=0)


def device_map(model: nn.Module, max_memory: Mapping[int, int]) -> dict[str, int]:
    """Module name -> GPU index, filling GPU 0, then 1, ... with at most ``max_memory[i]`` parameter bytes
    each (:func:`search.placement.split_memory`). Computed without the GPUs (on the driver, or in tests).

    Raises:
        UserError: the model does not fit in ``max_memory`` (a module would go to the CPU or the disk).
    """
    from accelerate import infer_auto_device_map

    # accelerate warns per GPU index it cannot see here; the map is only arithmetic on sizes.
    quiet = logging.getLogger("accelerate.utils.modeling")
    level, _ = quiet.level, quiet.setLevel(logging.ERROR)
    try:
        dmap = dict(infer_auto_device_map(model, max_memory=dict(max_memory), no_split_module_classes=_no_split(model)))
    finally:
        quiet.setLevel(level)
    spilled = sorted(name for name, device in dmap.items() if device not in max_memory)
    if spilled:
        gib = 2 ** 30
        raise UserError(f"the model does not fit on {len(max_memory)} GPUs taking "
                        f"{', '.join(f'{b / gib:.2f}' for b in max_memory.values())} GiB of parameters each: "
                        f"{len(spilled)} modules left over (e.g. {spilled[0]})")
    return dmap


def spread(model: nn.Module, max_memory: Mapping[int, int]) -> dict[str, int]:
    """Moves ``model`` onto the GPUs by :func:`device_map` and attaches accelerate's hooks; returns the map."""
    from accelerate import dispatch_model

    dmap = device_map(model, max_memory)
    dispatch_model(model, dmap)
    return dmap
