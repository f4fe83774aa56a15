"""Kernel factories registered per packed layout and device type, never per format name."""

from __future__ import annotations

from typing import Callable, TypeVar

from quant.packed import PackedTensor

__all__ = ["register_kernel", "kernel_factory"]

Factory = Callable[[PackedTensor], object]  # returns a Kernel, or None where it does not apply
T = TypeVar("T", bound=Factory)
_FACTORIES: dict[tuple[str, str], Factory] = {}


def register_kernel(layout: str, device_type: str) -> Callable[[T], T]:
    """Decorator: ``factory(packed) -> Kernel | None`` serves packed tensors of ``layout`` on ``device_type``.

    Every format that declares ``layout`` (``Format.layout``) gets the kernel; a factory
    answers ``None`` for a tensor it cannot take (outliers, a shape the op refuses), which
    then takes the generic path.
    """
    def deco(factory: T) -> T:
        key = (layout, device_type)
        if key in _FACTORIES:
            raise ValueError(f"a kernel for layout {layout!r} on {device_type} is already registered")
        _FACTORIES[key] = factory
        return factory
    return deco


def kernel_factory(layout: str, device_type: str) -> Factory | None:
    return _FACTORIES.get((layout, device_type))
