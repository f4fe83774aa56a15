"""The format registry: one small base class per quantizer, found by name."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Mapping, TypeVar

import torch

from quant.formats._options import FormatOptions, NoOptions, parse_options
from quant.packed import PackedTensor
from quant.registry import Registry
from quant.settings import QuantSetting

__all__ = ["Format", "RuntimeMapping", "RUNTIMES", "register_format", "get_format", "format_names"]

_REGISTRY: Registry["Format"] = Registry("format")
F = TypeVar("F", bound=type)
RUNTIMES = ("gptqmodel", "llamacpp", "torchao")  # the runtimes studies/export_runtimes.py writes for


@dataclass(frozen=True)
class RuntimeMapping:
    """What the runtime exporters need to know about one setting (written into the policy document).

    Attributes:
        code_bits: bits per weight the codes cost (``vq``: ``bits / dim``; ``ternary``: log2 3).
        symmetric: whether the grid is symmetric (the runtimes' ``sym`` flag).
        native: runtimes (of :data:`RUNTIMES`) whose own kind of quantizer this is, so exporting
            to them changes no format (no "format X -> Y" note).
        types: runtime -> the runtime type the format itself fixes (``ternary``: llama.cpp
            ``tq1_0``); for the other runtimes the exporter picks the type nearest ``code_bits``.
        outliers: the setting keeps sparse fp16 outliers, which no runtime stores.
    """

    code_bits: float
    symmetric: bool = False
    native: tuple[str, ...] = ()
    types: Mapping[str, str] = field(default_factory=dict)
    outliers: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"code_bits": self.code_bits, "symmetric": self.symmetric, "native": sorted(self.native),
                "types": dict(self.types), "outliers": self.outliers}


class Format(abc.ABC):
    """A quantizer, registered by :attr:`name`.

    Declared by the subclass (class attributes):
        ``name``; ``layout``, the packed layout it writes (kernels register per layout, so
        formats that share one, like ``rtn`` and ``gptq``'s ``affine-int``, share kernels);
        ``Options``, its :class:`~quant.formats._options.FormatOptions` dataclass; the
        allowed ``bits_range`` and ``group_sizes`` with the ``default_bits`` and
        ``default_group_size`` that a setting without them gets (a format of fixed geometry,
        such as a llama.cpp type, allows one of each); ``calibration``, the keywords
        :meth:`quantize` takes (gptq: ``"hessian"``); ``native_runtimes`` and
        ``runtime_types`` (see :class:`RuntimeMapping`).

    Lifecycle of a setting:
        1. :meth:`validate` at the boundary (policy files, CLI, search space): bits and
           group in range, options parsed into ``Options`` (:meth:`parse_options`; unknown
           keys and wrong types refused), then :meth:`check_setting` for what depends on
           both (lloyd: ``2**bits`` centroids need a group that large).
        2. :meth:`check_shape` once the matrix is known (search space, policy with shapes):
           refuses a shape the format cannot store; the default accepts every shape.
        3. :meth:`expected_nbytes` predicts ``PackedTensor.nbytes`` from the shape alone
           (the search checks budgets before quantizing; conformance tests prove it exact).
        4. :meth:`quantize` turns a float ``(out, in)`` weight into a :class:`PackedTensor`,
           reading typed options through :meth:`options_of`.
        5. :meth:`decode` inverts it up to the quantization error, for the whole matrix
           or selected rows (an embedding lookup, a kernel tile).
        6. :meth:`code_bits` and :meth:`runtime` answer what exports and displays need;
           ``quant.Policy`` writes them into the policy document, so code without torch
           never asks a format name.

    A new format is one file: a subclass implementing ``quantize``, ``decode`` and
    ``expected_nbytes``, decorated with :func:`register_format`, plus its import in
    ``quant/formats/__init__.py``.
    """

    name: str = ""
    layout: str = ""
    Options: type[FormatOptions] = NoOptions
    bits_range: tuple[int, int] = (2, 8)
    group_sizes: tuple[int | None, ...] = (32, 64, 128, 256, None)
    default_bits: int = 4
    default_group_size: int | None = 128
    calibration: tuple[str, ...] = ()
    # Its rounding errors are shaped by the input Hessian's correlations (gptq's error feedback pushes
    # each column's error onto the correlated ones), so a loss estimate must use the full Hessian form.
    error_feedback: bool = False
    native_runtimes: tuple[str, ...] = ()
    runtime_types: Mapping[str, str] = {}

    def __init__(self) -> None:
        self._parsed: dict[tuple, FormatOptions] = {}

    # --- options and settings ------------------------------------------------------------

    def parse_options(self, options: Mapping[str, Any]) -> FormatOptions:
        """``options`` (a JSON object) as this format's ``Options``; ``ValueError`` if invalid."""
        return parse_options(self.Options, options, self.name)

    def options_of(self, setting: QuantSetting) -> FormatOptions:
        """The typed options of ``setting``, parsed once per distinct options object."""
        try:
            # The type is part of the key: 1 == True and 1 == 1.0 in Python, but not as options.
            key = tuple(sorted((k, type(v).__name__, v) for k, v in setting.options.items()))
            opts = self._parsed.get(key)
        except TypeError:  # an unhashable value (a list): never valid, let parsing say why
            return self.parse_options(setting.options)
        if opts is None:
            opts = self._parsed[key] = self.parse_options(setting.options)
        return opts

    @property
    def fixed_geometry(self) -> bool:
        """One allowed bit width and one group size: the setting is named by the format alone."""
        return self.bits_range[0] == self.bits_range[1] and len(self.group_sizes) == 1

    def allows(self, bits: int, group_size: int | None, options: Mapping[str, Any] | None = None) -> bool:
        """Whether this format can store ``bits`` and ``group_size`` (with ``options``, default none).

        The question a search space asks of each candidate; :meth:`validate` says why not.
        """
        try:
            self.validate(QuantSetting(self.name, bits, group_size, dict(options or {})))
        except ValueError:
            return False
        return True

    def uses_calibration(self, setting: QuantSetting) -> bool:
        """Whether quantizing ``setting`` reads the calibration data (so it must be collected)."""
        return bool(self.calibration)

    def feeds_errors(self, setting: QuantSetting) -> bool:
        """Whether ``setting``'s rounding errors follow the input Hessian's correlations (error feedback:
        ``gptq``, a GGUF type with option ``gptq``), so a loss estimate must use the full Hessian form."""
        return self.error_feedback

    def validate(self, setting: QuantSetting) -> None:
        """Raises ``ValueError`` naming the problem if this format cannot honour ``setting``."""
        lo, hi = self.bits_range
        if not lo <= setting.bits <= hi:
            raise ValueError(f"format {self.name!r} supports bits {lo}..{hi}, got {setting.bits}")
        if setting.group_size not in self.group_sizes:
            allowed = ", ".join("null (per channel)" if g is None else str(g) for g in self.group_sizes)
            raise ValueError(f"format {self.name!r} supports group_size {allowed}; got {setting.group_size}")
        self.check_setting(setting, self.options_of(setting))

    def check_setting(self, setting: QuantSetting, opts: Any) -> None:
        """Checks that need the bits, the group and the options together; default: none."""

    def check_shape(self, shape: tuple[int, int], setting: QuantSetting) -> None:
        """Raises ``ValueError`` if a ``(out, in)`` matrix cannot be stored at ``setting``.

        The default accepts every shape (a short last group is padded). A block format
        whose rows must be whole blocks overrides it, e.g. ``"row length 576 is not a
        multiple of q4_k's 256"``.
        """

    # --- what exports and displays need ----------------------------------------------------

    def code_bits(self, setting: QuantSetting) -> float:
        """Bits per weight that the codes alone cost (no scales): ``setting.bits`` by default."""
        return float(setting.bits)

    def symmetric(self, setting: QuantSetting) -> bool:
        """Whether the grid is symmetric around zero (an affine format's option); default False."""
        return False

    def runtime(self, setting: QuantSetting) -> RuntimeMapping:
        """The :class:`RuntimeMapping` of ``setting``, built from the declarations above."""
        return RuntimeMapping(self.code_bits(setting), self.symmetric(setting), tuple(self.native_runtimes),
                              dict(self.runtime_types))

    # --- the quantizer ---------------------------------------------------------------------

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
    if not cls.layout:
        raise TypeError(f"format {cls.name!r} needs a layout (the packed layout kernels register for)")
    lo, hi = cls.bits_range
    if not lo <= cls.default_bits <= hi or cls.default_group_size not in cls.group_sizes:
        raise TypeError(f"format {cls.name!r}: default bits {cls.default_bits} / group {cls.default_group_size} "
                        f"outside its bits_range {cls.bits_range} / group_sizes {cls.group_sizes}")
    unknown = (set(cls.native_runtimes) | set(cls.runtime_types)) - set(RUNTIMES)
    if unknown:
        raise TypeError(f"format {cls.name!r} names unknown runtimes {sorted(unknown)}; known: {RUNTIMES}")
    _REGISTRY.add(cls.name, cls())
    return cls


def get_format(name: str) -> Format:
    """The registered format ``name``; ``ValueError`` listing the known ones otherwise."""
    return _REGISTRY.get(name)


def format_names() -> list[str]:
    """Names of the registered formats, sorted (what a policy or the CLI may name)."""
    return _REGISTRY.names()
