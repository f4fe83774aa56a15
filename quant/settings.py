"""The setting of one weight matrix: format, bits, group size and options."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["QuantSetting"]


@dataclass(frozen=True)
class QuantSetting:
    """How one weight matrix is quantized.

    Attributes:
        format: name of a registered format (see :func:`quant.formats.get_format`).
        bits: bits per code.
        group_size: weights per group along the input dimension that share a scale;
            ``None`` means one group per output channel (the whole row).
        options: format-specific options as a plain JSON object (for ``rtn``:
            ``symmetric``); the format parses them into its typed ``Options``
            (``get_format(name).options_of(setting)``), refusing unknown keys.

    :meth:`from_dict` fills a missing ``bits`` or ``group_size`` with the format's own
    default (``Format.default_bits`` / ``default_group_size``), so a format of fixed
    geometry is named by its name alone: ``{"format": "q4_k"}``.
    """

    format: str = "rtn"
    bits: int = 4
    group_size: int | None = 128
    options: Mapping[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash(self.key())

    def key(self) -> str:
        """A canonical string, equal for equal settings (used for caching)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "bits": self.bits, "group_size": self.group_size,
                "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantSetting":
        """Builds and validates a setting from a JSON-like mapping."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a setting must be an object like {{'format': 'rtn', 'bits': 4, "
                             f"'group_size': 128}}, got {data!r}")
        unknown = set(data) - {"format", "bits", "group_size", "options"}
        if unknown:
            raise ValueError(f"unknown setting keys {sorted(unknown)}; allowed: format, bits, group_size, options")
        name = data.get("format", "rtn")
        if not isinstance(name, str):
            raise ValueError(f"format must be a format name (a string), got {name!r}")
        from quant.formats import get_format

        fmt = get_format(name)
        bits = data.get("bits", fmt.default_bits)
        group = data.get("group_size", fmt.default_group_size)
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise ValueError(f"bits must be an integer, got {bits!r}")
        if group is not None and (isinstance(group, bool) or not isinstance(group, int)):
            raise ValueError(f"group_size must be an integer or null (per channel), got {group!r}")
        options = data.get("options") or {}
        if not isinstance(options, Mapping):
            raise ValueError(f"options must be an object, got {options!r}")
        setting = cls(format=name, bits=bits, group_size=group, options=dict(options))
        setting.validate()
        return setting

    def validate(self) -> None:
        """Raises ``ValueError`` naming the problem if the format cannot honour this setting."""
        from quant.formats import get_format

        get_format(self.format).validate(self)

    def fits(self, shape: tuple[int, int]) -> bool:
        """Whether an ``(out, in)`` matrix can take this setting (the format's own shape check: a llama.cpp
        type needs rows that are whole blocks)."""
        from quant.formats import get_format

        try:
            get_format(self.format).check_shape((int(shape[0]), int(shape[1])), self)
        except ValueError:
            return False
        return True

    def describe(self) -> str:
        """Short human label such as ``rtn4g128``, ``rtn8ch``, or ``q4_k`` for a format of fixed geometry."""
        from quant.formats import get_format

        extra = "".join(f",{k}={v}" for k, v in sorted(self.options.items()))
        try:
            fixed = get_format(self.format).fixed_geometry
        except ValueError:  # an unknown format still gets a label (for the error that names it)
            fixed = False
        if fixed:
            return f"{self.format}{extra}"
        group = "ch" if self.group_size is None else f"g{self.group_size}"
        return f"{self.format}{self.bits}{group}{extra}"
