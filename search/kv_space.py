"""The KV cache's part of a search space: per attention module, a setting for its keys and one for its values.

A deployment holds its weights *and* its cache, so with ``--context`` the budget counts both: each
attention module's keys and values are two more units of the search, beside the weight units. A
unit's choices are the candidate :class:`~quant.kv.KVSetting` of its role, ordered by the bytes they
cache at ``context`` tokens for ``batch`` sequences (a *ladder*, as llama.cpp's types are for weights):
its Optuna parameter and its row of the samplers' index form is a rung of that ladder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from evaluators.errors import UserError
from quant.kv import (FLOAT_KV, KV_BITS, KV_FORMATS, KV_ROLES, AttentionInfo, KVPair, KVSetting, check_pair,
                      kv_bytes, kv_unit)

__all__ = ["KVSpace", "DEFAULT_KV_FORMATS", "DEFAULT_KV_BITS", "kv_candidates", "parse_kv_format"]

DEFAULT_KV_FORMATS = tuple(KV_FORMATS)
DEFAULT_KV_BITS = (2, 3, 4, 8)


def parse_kv_format(label: str) -> tuple[str, bool]:
    """``turbo`` / ``turbo+qjl`` / ``rtn_token`` / ``rtn_channel`` / ``float`` -> (format, qjl)."""
    name, *flags = label.split("+")
    if name not in KV_FORMATS or any(f != "qjl" for f in flags) or (flags and not KV_FORMATS[name].qjl):
        raise UserError(f"unknown KV cache format {label!r}; choose from {', '.join(KV_FORMATS)} "
                        "(turbo+qjl: turbo keys with the 1-bit QJL residual)")
    return name, bool(flags)


def kv_candidates(formats: tuple[str, ...], bits: tuple[int, ...]) -> dict[str, list[KVSetting]]:
    """Role (``k``, ``v``) -> the settings ``formats`` x ``bits`` allow it (float once, if listed).

    Formats :attr:`~quant.kv.KVFormat.keys_only` (``rtn_channel``) and QJL are for keys only; values take
    the rest."""
    out: dict[str, list[KVSetting]] = {"k": [], "v": []}
    for label in formats:
        name, qjl = parse_kv_format(label)
        kind = KV_FORMATS[name]
        for b in ((16,) if kind.is_float else bits):
            if not kind.is_float and b not in KV_BITS[:-1]:
                raise UserError(f"KV cache bits must be among {list(KV_BITS[:-1])} (16 is the format 'float'), "
                                f"got {b}")
            s = KVSetting(name, b, qjl=qjl)
            for role in KV_ROLES:
                if role == "v" and (qjl or kind.keys_only):
                    continue
                if s not in out[role]:
                    out[role].append(s)
    for role, settings in out.items():
        if not settings:
            raise UserError(f"the KV cache formats {list(formats)} leave no setting for the "
                            f"{'keys' if role == 'k' else 'values'}: add turbo, rtn_token or float")
    return out


@dataclass
class KVSpace:
    """Attributes:
        modules: attention module name -> what it caches (:func:`evaluators.kv_attention.attention_modules`).
        formats, bits: the allowed KV formats (labels, see :func:`parse_kv_format`) and bit-widths.
        context: tokens the budget's cache holds; batch: sequences held at once.
        units: unit name (:func:`quant.kv.kv_unit`) -> (module, role) (derived).
        ladders: unit name -> its settings by increasing bytes at ``context`` (derived).
    """

    modules: dict[str, AttentionInfo]
    formats: tuple[str, ...] = DEFAULT_KV_FORMATS
    bits: tuple[int, ...] = DEFAULT_KV_BITS
    context: int = 2048
    batch: int = 1
    units: dict[str, tuple[str, str]] = field(init=False)
    ladders: dict[str, list[KVSetting]] = field(init=False)

    def __post_init__(self) -> None:
        if not self.modules:
            raise UserError("the model has no attention module whose keys and values can be quantized")
        if self.context < 1 or self.batch < 1:
            raise UserError(f"--context and --batch must be positive, got {self.context} and {self.batch}")
        candidates = kv_candidates(tuple(self.formats), tuple(self.bits))
        self.units, self.ladders = {}, {}
        for module in self.modules:
            for role in KV_ROLES:
                unit = kv_unit(module, role)
                self.units[unit] = (module, role)
                self.ladders[unit] = sorted(candidates[role], key=lambda s: (self.unit_nbytes(unit, s), s.describe()))

    def unit_nbytes(self, unit: str, setting: KVSetting) -> int:
        """Bytes the cache holds for one unit (a module's keys or values) at ``setting``."""
        info = self.modules[self.units[unit][0]]
        return kv_bytes(setting, info.kv_heads, info.head_dim, info.cached_tokens(self.context), self.batch)

    def unit_elements(self, unit: str) -> int:
        """Elements the unit caches (its size, as a matrix's is its weights)."""
        info = self.modules[self.units[unit][0]]
        return self.batch * info.kv_heads * info.head_dim * info.cached_tokens(self.context)

    def nbytes(self, kv: Mapping[str, KVPair]) -> int:
        """Cache bytes of a policy's ``kv`` section at ``context`` (a module it does not name: float)."""
        return sum(self.unit_nbytes(kv_unit(m, role), pair[i])
                   for m in self.modules for pair in (kv.get(m, (FLOAT_KV, FLOAT_KV)),)
                   for i, role in enumerate(KV_ROLES))

    def float_bytes(self) -> int:
        """Bytes of the 16-bit cache at ``context``."""
        return self.nbytes({})

    def expand(self, per_unit: Mapping[str, KVSetting]) -> dict[str, KVPair]:
        """A policy's ``kv`` section from a setting per unit (a unit not given: float)."""
        out = {}
        for module in self.modules:
            pair = tuple(per_unit.get(kv_unit(module, role), FLOAT_KV) for role in KV_ROLES)
            check_pair(*pair)
            out[module] = pair
        return out

    def per_unit(self, kv: Mapping[str, KVPair]) -> dict[str, KVSetting]:
        """The inverse of :meth:`expand`."""
        return {kv_unit(m, role): kv.get(m, (FLOAT_KV, FLOAT_KV))[i] for m in self.modules
                for i, role in enumerate(KV_ROLES)}

    def uniform(self) -> list[tuple[str, dict[str, KVPair]]]:
        """One ``kv`` section per setting both roles may take, every module alike (label, section)."""
        shared = [s for s in self.ladders[next(iter(self.ladders))] if all(s in lad for lad in self.ladders.values())]
        return [(f"kv-{s.describe()}", {m: (s, s) for m in self.modules}) for s in shared]

    def to_dict(self) -> dict[str, Any]:
        return {"formats": list(self.formats), "bits": list(self.bits), "context": self.context, "batch": self.batch}
