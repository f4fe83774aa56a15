"""The search space: per unit (a weight matrix, or a block or layer of them), a choice of setting.

The only place that maps Optuna params to policies: the parameter names (:func:`param_names`),
their distributions, and the index form of a unit's setting that samplers of our own work on
(:meth:`SearchSpace.indices` / :meth:`SearchSpace.from_indices`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution

import quant
from evaluators.errors import UserError
from search.kv_space import KVSpace
from search.targets import DEFAULT_TARGET

__all__ = ["SearchSpace", "DEFAULT_BITS", "DEFAULT_GROUPS", "GRANULARITIES", "check_granularity", "format_label",
           "format_setting", "param_names", "units_of"]

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
DEFAULT_GROUPS: tuple[int | None, ...] = (32, 64, 128)
GRANULARITIES = ("matrix", "fused", "block", "layer")
# The matrices a serving engine fuses into one (vLLM's packed_modules_mapping: qkv_proj, gate_up_proj): they must
# share one setting, so "fused" makes each such set one unit.
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
         "up_proj": "gate_up_proj"}
# "model.layers.12.self_attn.q_proj" -> layer "model.layers.12", block "model.layers.12.self_attn".
_LAYER = re.compile(r"^(?P<layer>.*?\.(?:layers|h|blocks|block|layer)\.\d+)\.(?P<block>[^.]+)\.")


def _group_label(group: int | None) -> str:
    return "ch" if group is None else str(group)


def param_names(unit: str) -> tuple[str, str, str]:
    """A unit's Optuna parameters: its bits (an index into the allowed bits), group and format labels."""
    return f"{unit}:bits", f"{unit}:group", f"{unit}:format"


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

    ``matrix``: every matrix alone. ``fused``: every matrix alone but those a serving engine fuses
    (:data:`FUSED`: q/k/v, gate/up), one unit per fused set. ``block``: the sub-blocks of each transformer
    layer (attention, MLP). ``layer``: each transformer layer whole. Matrices outside the layers (embedding,
    LM head) stay units of their own at every granularity.
    """
    check_granularity(granularity)
    units: dict[str, list[str]] = {}
    for name in matrices:
        m = _LAYER.match(name) if granularity != "matrix" else None
        if m is None:
            unit = name
        elif granularity == "fused":
            head, _, last = name.rpartition(".")
            unit = f"{head}.{FUSED[last]}" if last in FUSED else name
        else:
            unit = m["layer"] + ("." + m["block"] if granularity == "block" else "")
        units.setdefault(unit, []).append(name)
    return units


@dataclass
class SearchSpace:
    """Per-unit settings: bits from ``bits`` (an ordered integer index, so NSGA-II's
    mutation and crossover respect order), group size and format as categoricals. A format is
    a label: a format name, optionally with boolean options (``gptq+clip``).

    Formats of fixed geometry (llama.cpp's block types: ``q4_k`` has its own bits and block) make a
    *ladder* instead: each unit chooses among the types that fit every one of its matrices (a 576-wide
    row takes no 256-weight super-block), ordered by bytes, and its bits index is a rung of its own
    ladder. ``--bits`` and ``--groups`` do not apply there.

    With a :class:`~search.kv_space.KVSpace` (``--context``), each attention module's keys and values are
    two more units (their rung of a ladder of cache settings), after the weight units in
    :attr:`unit_names`; a policy's bytes are then its weights' and its cache's at that context.

    Attributes:
        matrices: name -> (out, in) of every weight matrix the policy covers.
        bits, groups, formats: the allowed values.
        granularity: what shares one setting (see :func:`units_of`).
        kv: the KV cache's units, or ``None``: a weight-only search (the cache is not counted).
        target: the runtime the search is for (:mod:`search.targets`), recorded with the study.
        units: unit name -> its matrices (derived).
        ladders: unit name -> its settings by increasing bytes, for fixed-geometry formats (else empty).
    """

    matrices: dict[str, tuple[int, int]]
    bits: tuple[int, ...] = DEFAULT_BITS
    groups: tuple[int | None, ...] = DEFAULT_GROUPS
    formats: tuple[str, ...] = ("rtn",)
    granularity: str = "matrix"
    kv: KVSpace | None = None
    target: str = DEFAULT_TARGET
    units: dict[str, list[str]] = field(init=False)
    ladders: dict[str, list[quant.QuantSetting]] = field(init=False)

    def __post_init__(self) -> None:
        self.bits = tuple(sorted(self.bits))
        if not self.formats or not self.bits or not self.groups:
            raise UserError("the search space needs at least one format, one bit-width and one group size")
        if len(set(self.formats)) != len(self.formats):
            raise UserError(f"formats are listed twice: {list(self.formats)}")
        self.units = units_of(self.matrices, self.granularity)
        self.ladders = {}
        fixed = [quant.get_format(f.split("+")[0]).fixed_geometry for f in self.formats]
        if any(fixed):
            if not all(fixed):
                raise UserError(f"formats {list(self.formats)} mix fixed-geometry types (llama.cpp's, with their "
                                "own bits and block) with formats that take --bits/--groups: search one kind at a time")
            self._build_ladders()
            return
        for fmt in self.formats:
            for b in self.bits:
                for g in self.groups:
                    try:
                        format_setting(fmt, b, g).validate()
                    except ValueError as exc:  # a user's --bits / --groups: say which, exit 2
                        raise UserError(f"allowed formats {list(self.formats)} / bits {list(self.bits)} / groups "
                                        f"{list(self.groups)}: {exc}") from None

    def _build_ladders(self) -> None:
        types = [format_setting(f, *_geometry(f)) for f in self.formats]
        for unit, members in self.units.items():
            fits = [s for s in types if all(s.fits(self.matrices[m]) for m in members)]
            if not fits:
                shapes = sorted({self.matrices[m] for m in members})
                raise UserError(f"no format of {list(self.formats)} fits unit {unit} (shapes {shapes}): add a type "
                                "with blocks of 32 (q4_0, q8_0...) or use --granularity matrix")
            self.ladders[unit] = sorted(fits, key=lambda s: (self.unit_nbytes(unit, s), s.describe()))

    @property
    def unit_names(self) -> list[str]:
        """Every unit: the weight units, then the KV cache's (if any)."""
        return list(self.units) + (list(self.kv.units) if self.kv else [])

    def is_kv(self, unit: str) -> bool:
        return self.kv is not None and unit in self.kv.units

    def levels(self, unit: str) -> int:
        """How many rungs the unit's bits index has (its ladder, or the allowed bits)."""
        if self.is_kv(unit):
            return len(self.kv.ladders[unit])
        return len(self.ladders[unit]) if self.ladders else len(self.bits)

    def unit_settings(self, unit: str) -> list[Any]:
        """Every setting this unit may take (a KV unit's: :class:`~quant.kv.KVSetting`)."""
        if self.is_kv(unit):
            return list(self.kv.ladders[unit])
        return list(self.ladders[unit]) if self.ladders else self.settings()

    def unit_size(self, unit: str) -> int:
        """Weights of a unit's matrices, or elements a KV unit caches."""
        if self.is_kv(unit):
            return self.kv.unit_elements(unit)
        return sum(h * w for h, w in (self.matrices[m] for m in self.units[unit]))

    def to_dict(self) -> dict[str, Any]:
        kv = {"kv": self.kv.to_dict()} if self.kv else {}
        return {"bits": list(self.bits), "groups": list(self.groups), "formats": list(self.formats),
                "granularity": self.granularity, "target": self.target, **kv}

    @property
    def n_params(self) -> int:
        """Parameters a sampler really searches (a choice of one value is fixed, not searched)."""
        kv = sum(self.levels(u) > 1 for u in self.kv.units) if self.kv else 0
        if self.ladders:
            return kv + sum(self.levels(u) > 1 for u in self.units)
        return kv + len(self.units) * (int(len(self.bits) > 1) + int(len(self.groups) > 1) + int(len(self.formats) > 1))

    @property
    def numel(self) -> int:
        return sum(h * w for h, w in self.matrices.values())

    def settings(self) -> list[quant.QuantSetting]:
        """Every setting of the space (with ladders: every type some unit may take)."""
        if self.ladders:
            return [format_setting(f, *_geometry(f)) for f in self.formats
                    if any(format_label(s) == f for ladder in self.ladders.values() for s in ladder)]
        return [format_setting(f, b, g) for f in self.formats for b in self.bits for g in self.groups]

    @property
    def group_labels(self) -> list[str]:
        """The group sizes as Optuna's categorical values ('ch' = per output channel)."""
        return [_group_label(g) for g in self.groups]

    def distributions(self) -> dict[str, BaseDistribution]:
        """Every parameter :meth:`suggest` draws, by name (a single format is fixed, not a parameter)."""
        out: dict[str, BaseDistribution] = {}
        for unit in self.units:
            bits, group, fmt = param_names(unit)
            if self.ladders:
                out[bits] = IntDistribution(0, self.levels(unit) - 1)
                continue
            out[bits] = IntDistribution(0, len(self.bits) - 1)
            out[group] = CategoricalDistribution(self.group_labels)
            if len(self.formats) > 1:
                out[fmt] = CategoricalDistribution(list(self.formats))
        for unit in self.kv.units if self.kv else ():
            out[param_names(unit)[0]] = IntDistribution(0, self.levels(unit) - 1)
        return out

    def suggest(self, trial: optuna.Trial) -> quant.Policy:
        settings = {}
        for unit, members in self.units.items():
            bits, group, fmt = param_names(unit)
            if self.ladders:
                settings.update(dict.fromkeys(members, self.ladders[unit][trial.suggest_int(bits, 0, self.levels(unit) - 1)]))
                continue
            row = (trial.suggest_int(bits, 0, len(self.bits) - 1),
                   self.group_labels.index(trial.suggest_categorical(group, self.group_labels)),
                   self.formats.index(trial.suggest_categorical(fmt, list(self.formats))) if len(self.formats) > 1
                   else 0)
            settings.update(dict.fromkeys(members, self.setting_at(row)))
        kv = {}
        if self.kv:
            kv = self.kv.expand({u: self.kv.ladders[u][trial.suggest_int(param_names(u)[0], 0, self.levels(u) - 1)]
                                 for u in self.kv.units})
        return quant.Policy(settings, shapes={m: self.matrices[m] for m in settings}, kv=kv)  # shapes: for exports

    def setting_at(self, row: Any, unit: str | None = None) -> quant.QuantSetting:
        """The setting of one index row: (bits index, group index, format index); with ladders the bits
        index is a rung of ``unit``'s ladder (a KV unit's too: its row is ``(rung, 0, 0)``)."""
        if self.is_kv(unit):
            return self.kv.ladders[unit][int(row[0])]
        if self.ladders:
            return self.ladders[unit][int(row[0])]
        return format_setting(self.formats[int(row[2])], self.bits[int(row[0])], self.groups[int(row[1])])

    def covers(self, params: dict[str, Any]) -> bool:
        """Whether ``params`` set every unit of this space (a trial of another space does not)."""
        per_unit = 1 if self.ladders else 3 if len(self.formats) > 1 else 2
        kv = len(self.kv.units) if self.kv else 0
        return (len(params) == per_unit * len(self.units) + kv
                and all(param_names(u)[0] in params for u in self.unit_names))

    def indices(self, params: dict[str, Any]) -> np.ndarray:
        """``(n_units, 3)`` rows of (bits index, group index, format index), units in the order of
        :attr:`unit_names` (a KV unit's row: its rung, 0, 0)."""
        out = np.zeros((len(self.unit_names), 3), dtype=np.int64)
        for i, unit in enumerate(self.unit_names):
            bits, group, fmt = param_names(unit)
            if self.ladders or self.is_kv(unit):
                out[i, 0] = int(params[bits])
                continue
            out[i] = (int(params[bits]), self.group_labels.index(params[group]),
                      self.formats.index(params[fmt]) if len(self.formats) > 1 else 0)
        return out

    def from_indices(self, rows: np.ndarray) -> dict[str, Any]:
        """The inverse of :meth:`indices`: the Optuna params of one index row per unit."""
        out: dict[str, Any] = {}
        for unit, row in zip(self.unit_names, rows):
            bits, group, fmt = param_names(unit)
            if self.ladders or self.is_kv(unit):
                out[bits] = int(row[0])
                continue
            out[bits], out[group] = int(row[0]), self.group_labels[int(row[1])]
            if len(self.formats) > 1:
                out[fmt] = self.formats[int(row[2])]
        return out

    def expand(self, per_unit: dict[str, Any]) -> quant.Policy:
        """The policy giving every matrix its unit's setting (and every KV unit its cache setting)."""
        settings = {m: s for unit, s in per_unit.items() if not self.is_kv(unit) for m in self.units[unit]}
        kv = self.kv.expand({u: s for u, s in per_unit.items() if self.is_kv(u)}) if self.kv else {}
        return quant.Policy(settings, shapes={m: self.matrices[m] for m in settings}, kv=kv)

    def params(self, policy: quant.Policy) -> dict[str, Any]:
        """The Optuna params that :meth:`suggest` maps to ``policy`` (for enqueueing seeds).
        A unit takes the setting of its first matrix."""
        first = [policy.settings[members[0]] for members in self.units.values()]
        if self.ladders:
            rows = [(self.ladders[u].index(s), 0, 0) for u, s in zip(self.units, first)]
        else:
            rows = [(self.bits.index(s.bits), self.groups.index(s.group_size),
                     self.formats.index(format_label(s)) if len(self.formats) > 1 else 0) for s in first]
        if self.kv:
            rows += [(self.kv.ladders[u].index(s), 0, 0) for u, s in self.kv.per_unit(policy.kv).items()]
        return self.from_indices(np.array(rows, dtype=np.int64))

    def nbytes(self, policy: quant.Policy) -> int:
        """Bytes of the packed weights, plus the cache's at the space's context when it has KV units."""
        return policy.expected_nbytes(self.matrices) + (self.kv.nbytes(policy.kv) if self.kv else 0)

    def unit_nbytes(self, unit: str, setting: Any) -> int:
        """Exact packed bytes of a unit's matrices at ``setting`` (a KV unit's cache at the context)."""
        if self.is_kv(unit):
            return self.kv.unit_nbytes(unit, setting)
        fmt = quant.get_format(setting.format)
        return sum(fmt.expected_nbytes(self.matrices[m], setting) for m in self.units[unit])

    def min_bytes(self) -> int:
        """Bytes of the smallest policy in the space (each unit at its smallest setting)."""
        return sum(min(self.unit_nbytes(u, s) for s in self.unit_settings(u)) for u in self.unit_names)

    def uniform_policies(self) -> list[tuple[str, quant.Policy]]:
        """One policy per setting that every unit may take; with KV units, each of those with each
        setting that every module's keys and values may take (labels ``<weights>+kv-<cache>``)."""
        weights = [(s.describe(), quant.Policy.uniform(list(self.matrices), s, self.matrices))
                   for s in self.settings() if all(s in self.unit_settings(u) for u in self.units)]
        if not self.kv:
            return weights
        return [(f"{label}+{kv_label}", quant.Policy(p.settings, p.meta, p.shapes, kv))
                for label, p in weights for kv_label, kv in self.kv.uniform()]


def _geometry(label: str) -> tuple[int, int | None]:
    """The one bits and block size of a fixed-geometry format."""
    fmt = quant.get_format(label.split("+")[0])
    return fmt.bits_range[0], fmt.group_sizes[0]
