"""Kernel factories registered per packed layout and device type, never per format name."""

from __future__ import annotations

from typing import Callable, TypeVar

from quant.packed import PackedTensor
from quant.registry import Registry

__all__ = ["register_kernel", "kernel_factory"]

Factory = Callable[[PackedTensor], object]  # returns a Kernel, or None where it does not apply
T = TypeVar("T", bound=Factory)
_FACTORIES: Registry[Factory] = Registry("kernel")


def register_kernel(layout: str, device_type: str) -> Callable[[T], T]:
    """Decorator: ``factory(packed) -> Kernel | None`` serves packed tensors of ``layout`` on ``device_type``.

    Every format that declares ``layout`` (``Format.layout``) gets the kernel; a factory
    answers ``None`` for a tensor it cannot take (outliers, a shape the op refuses), which
    then takes the generic path.
    """
    def deco(factory: T) -> T:
        return _FACTORIES.add(f"{layout}@{device_type}", factory)
    return deco


def kernel_factory(layout: str, device_type: str) -> Factory | None:
    """The factory registered for ``layout`` on ``device_type``, or ``None`` (the generic path)."""
    return _FACTORIES.find(f"{layout}@{device_type}")
