"""The format registry: one small base class per quantizer, found by name."""

from __future__ import annotations

import abc
from typing import Any, Callable, TypeVar

import torch

from quant.packed import PackedTensor
from quant.settings import QuantSetting

__all__ = ["Format", "register_format", "get_format", "format_names"]

_REGISTRY: dict[str, "Format"] = {}
F = TypeVar("F", bound=type)

class Format(abc.ABC):
    """A quantizer.

    Lifecycle: :meth:`validate` checks a setting at the boundary (policy files,
    CLI, search space); :meth:`quantize` turns a float ``(out, in)`` weight into a
    :class:`PackedTensor`; :meth:`decode` is its inverse up to the quantization
    error, for the whole matrix or for selected rows (an embedding lookup, a kernel
    tile); :meth:`expected_nbytes` predicts ``PackedTensor.nbytes`` from the shape
    alone (the search uses it to check budgets before quantizing; the conformance
    tests prove it equals the real buffers).

    A new format implements ``quantize``, ``decode`` and ``expected_nbytes``;
    :meth:`dequantize` and :meth:`dequantize_rows` are written here once.
    """

    name: str = ""
    bits_range: tuple[int, int] = (2, 8)
    group_sizes: tuple[int | None, ...] = (32, 64, 128, 256, None)
    options: dict[str, type] = {}
    # Calibration keywords :meth:`quantize` takes (gptq: "hessian"); without them it runs data-free.
    calibration: tuple[str, ...] = ()

    def uses_calibration(self, setting: QuantSetting) -> bool:
        """Whether quantizing ``setting`` reads the calibration data (so it must be collected)."""
        return bool(self.calibration)

    def validate(self, setting: QuantSetting) -> None:
        lo, hi = self.bits_range
        if not lo <= setting.bits <= hi:
            raise ValueError(f"format {self.name!r} supports bits {lo}..{hi}, got {setting.bits}")
        if setting.group_size not in self.group_sizes:
            allowed = ", ".join("null (per channel)" if g is None else str(g) for g in self.group_sizes)
            raise ValueError(f"format {self.name!r} supports group_size {allowed}; got {setting.group_size}")
        for key, value in setting.options.items():
            if key not in self.options:
                raise ValueError(f"format {self.name!r} has no option {key!r}; options: {sorted(self.options)}")
            if not isinstance(value, self.options[key]):
                raise ValueError(f"option {key!r} of format {self.name!r} must be "
                                 f"{self.options[key].__name__}, got {value!r}")

    @abc.abstractmethod
    def quantize(self, weight: torch.Tensor, setting: QuantSetting, **calibration: Any) -> PackedTensor:
        """Quantizes a float ``(out, in)`` weight."""

    @abc.abstractmethod
    def decode(self, packed: PackedTensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 weight encoded by ``packed``: ``(out, in)``, or ``(len(rows), in)`` for ``rows``.

        With ``rows`` (a 1-D index tensor, any order, repeats allowed) only those rows
        should be decoded, never the whole matrix.
        """

    def dequantize(self, packed: PackedTensor) -> torch.Tensor:
        """Returns the float32 ``(out, in)`` weight encoded by ``packed``."""
        return self.decode(packed, None)

    def dequantize_rows(self, packed: PackedTensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` of the weight, ``(len(rows), in)``, decoded without the rest."""
        return self.decode(packed, rows.reshape(-1))

    @abc.abstractmethod
    def expected_nbytes(self, shape: tuple[int, int], setting: QuantSetting) -> int:
        """Bytes :meth:`quantize` will produce for a weight of ``shape``."""

def register_format(cls: F) -> F:
    """Class decorator: registers a :class:`Format` subclass under its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a non-empty name")
    if cls.name in _REGISTRY:
        raise ValueError(f"format {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls()
    return cls

def get_format(name: str) -> Format:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; known formats: {', '.join(format_names())}") from None

def format_names() -> list[str]:
    return sorted(_REGISTRY)

Factory = Callable[[], Format]
