"""The search space: per unit (a weight matrix, or a block or layer of them), a choice of setting.

The only place that maps Optuna params to policies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import optuna

import quant
from evaluators.errors import UserError

__all__ = ["SearchSpace", "DEFAULT_BITS", "DEFAULT_GROUPS", "GRANULARITIES", "check_granularity", "format_label",
           "format_setting", "units_of"]

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
DEFAULT_GROUPS: tuple[int | None, ...] = (32, 64, 128)
GRANULARITIES = ("matrix", "block", "layer")
# "model.layers.12.self_attn.q_proj" -> layer "model.layers.12", block "model.layers.12.self_attn".
_LAYER = re.compile(r"^(?P<layer>.*?\.(?:layers|h|blocks|block|layer)\.\d+)\.(?P<block>[^.]+)\.")


def _group_label(group: int | None) -> str:
    return "ch" if group is None else str(group)


def format_setting(label: str, bits: int, group: int | None) -> quant.QuantSetting:
    """The setting a format label names: ``gptq`` or, with boolean options, ``gptq+clip``."""
    name, *flags = label.split("+")
    return quant.QuantSetting(name, bits, group, dict.fromkeys(flags, True))


def format_label(setting: quant.QuantSetting) -> str:
    """The inverse of :func:`format_setting`."""
    return "+".join([setting.format, *sorted(k for k, v in setting.options.items() if v is True)])


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise UserError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    return granularity


def units_of(matrices: dict[str, tuple[int, int]], granularity: str = "matrix") -> dict[str, list[str]]:
    """Unit name -> the matrices that share one setting.

    ``matrix``: every matrix alone. ``block``: the sub-blocks of each transformer layer (attention,
    MLP). ``layer``: each transformer layer whole. Matrices outside the layers (embedding, LM head)
    stay units of their own at every granularity.
    """
    check_granularity(granularity)
    units: dict[str, list[str]] = {}
    for name in matrices:
        m = _LAYER.match(name) if granularity != "matrix" else None
        unit = name if m is None else m["layer"] + ("." + m["block"] if granularity == "block" else "")
        units.setdefault(unit, []).append(name)
    return units


@dataclass
class SearchSpace:
    """Per-unit settings: bits from ``bits`` (an ordered integer index, so NSGA-II's
    mutation and crossover respect order), group size and format as categoricals. A format is
    a label: a format name, optionally with boolean options (``gptq+clip``).

    Attributes:
        matrices: name -> (out, in) of every weight matrix the policy covers.
        bits, groups, formats: the allowed values.
        granularity: what shares one setting (see :func:`units_of`).
        units: unit name -> its matrices (derived).
    """

    matrices: dict[str, tuple[int, int]]
    bits: tuple[int, ...] = DEFAULT_BITS
    groups: tuple[int | None, ...] = DEFAULT_GROUPS
    formats: tuple[str, ...] = ("rtn",)
    granularity: str = "matrix"
    units: dict[str, list[str]] = field(init=False)

    def __post_init__(self) -> None:
        self.bits = tuple(sorted(self.bits))
        if not self.formats or not self.bits or not self.groups:
            raise UserError("the search space needs at least one format, one bit-width and one group size")
        if len(set(self.formats)) != len(self.formats):
            raise UserError(f"formats are listed twice: {list(self.formats)}")
        for fmt in self.formats:
            for b in self.bits:
                for g in self.groups:
                    try:
                        format_setting(fmt, b, g).validate()
                    except ValueError as exc:  # a user's --bits / --groups: say which, exit 2
                        raise UserError(f"allowed formats {list(self.formats)} / bits {list(self.bits)} / groups "
                                        f"{list(self.groups)}: {exc}") from None
        self.units = units_of(self.matrices, self.granularity)

    def to_dict(self) -> dict[str, Any]:
        return {"bits": list(self.bits), "groups": list(self.groups), "formats": list(self.formats),
                "granularity": self.granularity}

    @property
    def n_params(self) -> int:
        """Parameters a sampler really searches (a choice of one value is fixed, not searched)."""
        return len(self.units) * (int(len(self.bits) > 1) + int(len(self.groups) > 1) + int(len(self.formats) > 1))

    @property
    def numel(self) -> int:
        return sum(h * w for h, w in self.matrices.values())

    def settings(self) -> list[quant.QuantSetting]:
        return [format_setting(f, b, g) for f in self.formats for b in self.bits for g in self.groups]

    def suggest(self, trial: optuna.Trial) -> quant.Policy:
        labels = [_group_label(g) for g in self.groups]
        settings = {}
        for unit, members in self.units.items():
            bits = self.bits[trial.suggest_int(f"{unit}:bits", 0, len(self.bits) - 1)]
            group = self.groups[labels.index(trial.suggest_categorical(f"{unit}:group", labels))]
            fmt = trial.suggest_categorical(f"{unit}:format", list(self.formats)) if len(self.formats) > 1 \
                else self.formats[0]
            settings.update(dict.fromkeys(members, format_setting(fmt, bits, group)))
        return quant.Policy(settings)

    def expand(self, per_unit: dict[str, quant.QuantSetting]) -> quant.Policy:
        """The policy giving every matrix its unit's setting."""
        return quant.Policy({m: s for unit, s in per_unit.items() for m in self.units[unit]})

    def params(self, policy: quant.Policy) -> dict[str, Any]:
        """The Optuna params that :meth:`suggest` maps to ``policy`` (for enqueueing seeds).
        A unit takes the setting of its first matrix."""
        out: dict[str, Any] = {}
        for name, members in self.units.items():
            s = policy.settings[members[0]]
            out[f"{name}:bits"] = self.bits.index(s.bits)
            out[f"{name}:group"] = _group_label(s.group_size)
            if len(self.formats) > 1:
                out[f"{name}:format"] = format_label(s)
        return out

    def nbytes(self, policy: quant.Policy) -> int:
        return policy.expected_nbytes(self.matrices)

    def unit_nbytes(self, unit: str, setting: quant.QuantSetting) -> int:
        """Exact packed bytes of a unit's matrices at ``setting``."""
        fmt = quant.get_format(setting.format)
        return sum(fmt.expected_nbytes(self.matrices[m], setting) for m in self.units[unit])

    def min_bytes(self) -> int:
        """Bytes of the smallest policy in the space (each unit at its smallest setting)."""
        return sum(min(self.unit_nbytes(u, s) for s in self.settings()) for u in self.units)

    def uniform_policies(self) -> list[tuple[str, quant.Policy]]:
        return [(s.describe(), quant.Policy.uniform(list(self.matrices), s)) for s in self.settings()]
