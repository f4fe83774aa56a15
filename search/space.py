"""The search space: per weight matrix, a choice of setting. The only place that maps Optuna params to policies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

import quant

__all__ = ["SearchSpace", "DEFAULT_BITS", "DEFAULT_GROUPS"]

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
DEFAULT_GROUPS: tuple[int | None, ...] = (32, 64, 128)


def _group_label(group: int | None) -> str:
    return "ch" if group is None else str(group)


@dataclass
class SearchSpace:
    """Per-matrix settings: bits from ``bits`` (an ordered integer index, so NSGA-II's
    mutation and crossover respect order), group size and format as categoricals.

    Attributes:
        matrices: name -> (out, in) of every weight matrix the policy covers.
        bits, groups, formats: the allowed values.
    """

    matrices: dict[str, tuple[int, int]]
    bits: tuple[int, ...] = DEFAULT_BITS
    groups: tuple[int | None, ...] = DEFAULT_GROUPS
    formats: tuple[str, ...] = ("rtn",)

    def __post_init__(self) -> None:
        self.bits = tuple(sorted(self.bits))
        for fmt in self.formats:
            for b in self.bits:
                for g in self.groups:
                    quant.QuantSetting(fmt, b, g).validate()

    def to_dict(self) -> dict[str, Any]:
        return {"bits": list(self.bits), "groups": list(self.groups), "formats": list(self.formats)}

    @property
    def numel(self) -> int:
        return sum(h * w for h, w in self.matrices.values())

    def settings(self) -> list[quant.QuantSetting]:
        return [quant.QuantSetting(f, b, g) for f in self.formats for b in self.bits for g in self.groups]

    def suggest(self, trial: optuna.Trial) -> quant.Policy:
        labels = [_group_label(g) for g in self.groups]
        settings = {}
        for name in self.matrices:
            bits = self.bits[trial.suggest_int(f"{name}:bits", 0, len(self.bits) - 1)]
            group = self.groups[labels.index(trial.suggest_categorical(f"{name}:group", labels))]
            fmt = trial.suggest_categorical(f"{name}:format", list(self.formats)) if len(self.formats) > 1 \
                else self.formats[0]
            settings[name] = quant.QuantSetting(fmt, bits, group)
        return quant.Policy(settings)

    def params(self, policy: quant.Policy) -> dict[str, Any]:
        """The Optuna params that :meth:`suggest` maps to ``policy`` (for enqueueing seeds)."""
        out: dict[str, Any] = {}
        for name, s in policy.settings.items():
            out[f"{name}:bits"] = self.bits.index(s.bits)
            out[f"{name}:group"] = _group_label(s.group_size)
            if len(self.formats) > 1:
                out[f"{name}:format"] = s.format
        return out

    def nbytes(self, policy: quant.Policy) -> int:
        return policy.expected_nbytes(self.matrices)

    def min_bytes(self) -> int:
        """Bytes of the smallest policy in the space (each matrix at its smallest setting)."""
        return sum(min(quant.get_format(s.format).expected_nbytes(shape, s) for s in self.settings())
                   for shape in self.matrices.values())

    def uniform_policies(self) -> list[tuple[str, quant.Policy]]:
        return [(s.describe(), quant.Policy.uniform(list(self.matrices), s)) for s in self.settings()]
