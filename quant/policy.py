"""The policy: every weight matrix of a model mapped to its setting, as versioned JSON.

Each entry of ``matrices`` is a setting (``format``, ``bits``, ``group_size``, ``options``)
plus what quant knows about it for readers without torch (``studies``, ``app.show``):
``shape`` (``[out, in]``, when the policy knows it) and ``runtime`` (the format's
:class:`~quant.formats.RuntimeMapping`: code bits, symmetry, runtime types). Both are
optional on reading, so documents written before them load; ``runtime`` is derived and
rewritten on every save, never trusted from the file.

An optional ``kv`` section gives attention modules their KV cache settings
(``{"model.layers.0.self_attn": {"k": {...}, "v": {...}}}``, see :mod:`quant.kv`); a module
it does not name caches in float. A policy without one writes none, as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from quant.kv import KVPair, kv_from_dict, kv_to_dict
from quant.modules import weight_matrices  # noqa: F401  (re-exported: policies cover these)
from quant.settings import QuantSetting

__all__ = ["Policy", "PolicyError", "weight_matrices", "POLICY_VERSION"]

POLICY_VERSION = 1
_SETTING_KEYS = ("format", "bits", "group_size", "options")
_DERIVED_KEYS = ("runtime",)  # written from the format on save, ignored on load


class PolicyError(ValueError):
    """A policy file that is malformed or does not fit the model."""


@dataclass
class Policy:
    """Settings per weight-matrix name, plus free metadata (metrics, provenance).

    Attributes:
        settings: matrix name -> :class:`QuantSetting`.
        meta: anything recorded with the policy (model, metrics, provenance); not
            interpreted by ``quant``.
        shapes: matrix name -> ``(out, in)``, for the matrices whose shape is known
            (written into the document, so exports need no model).
        kv: attention module name -> ``(keys, values)`` :class:`~quant.kv.KVSetting` of its
            cache; empty (every cache in float) by default.
    """

    settings: dict[str, QuantSetting]
    meta: dict[str, Any] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    kv: dict[str, KVPair] = field(default_factory=dict)

    @classmethod
    def uniform(cls, names: list[str], setting: QuantSetting,
                shapes: Mapping[str, tuple[int, int]] | None = None) -> "Policy":
        return cls({name: setting for name in names}, shapes=dict(shapes or {}))

    def entry(self, name: str) -> dict[str, Any]:
        """Matrix ``name``'s entry in the document: its setting, shape (if known) and runtime mapping."""
        from quant.formats import get_format

        s = self.settings[name]
        out = s.to_dict()
        if name in self.shapes:
            out["shape"] = list(self.shapes[name])
        out["runtime"] = get_format(s.format).runtime(s).to_dict()
        return out

    def to_dict(self) -> dict[str, Any]:
        kv = {"kv": kv_to_dict(self.kv)} if self.kv else {}
        return {"format_version": POLICY_VERSION, **self.meta,
                "matrices": {name: self.entry(name) for name in self.settings}, **kv}

    @classmethod
    def from_dict(cls, data: Any) -> "Policy":
        if not isinstance(data, Mapping):
            raise PolicyError("a policy must be a JSON object with 'format_version' and 'matrices'")
        version = data.get("format_version")
        if version != POLICY_VERSION:
            raise PolicyError(f"unsupported policy format_version {version!r}; this TurboQuant reads {POLICY_VERSION}")
        matrices = data.get("matrices")
        if not isinstance(matrices, Mapping) or not matrices:
            raise PolicyError("policy has no 'matrices' object mapping weight names to settings")
        settings, shapes = {}, {}
        for name, raw in matrices.items():
            try:
                settings[str(name)], shape = _read_entry(raw)
            except ValueError as exc:
                raise PolicyError(f"matrix {name!r}: {exc}") from None
            if shape is not None:
                shapes[str(name)] = shape
        try:
            kv = kv_from_dict(data.get("kv", {}))
        except ValueError as exc:
            raise PolicyError(str(exc)) from None
        meta = {k: v for k, v in data.items() if k not in ("format_version", "matrices", "kv")}
        return cls(settings, meta, shapes, kv)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise PolicyError(f"cannot read policy {path}: {exc.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyError(f"policy {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def check_model(self, matrices: Mapping[str, tuple[int, int]]) -> None:
        """Raises :class:`PolicyError` unless the policy names exactly the model's matrices (and shapes)."""
        missing = sorted(set(matrices) - set(self.settings))
        extra = sorted(set(self.settings) - set(matrices))
        if missing or extra:
            parts = []
            if extra:
                parts.append(f"{len(extra)} names not in the model (e.g. {extra[0]!r})")
            if missing:
                parts.append(f"{len(missing)} model matrices missing (e.g. {missing[0]!r})")
            raise PolicyError("policy does not match the model: " + "; ".join(parts))
        for name, shape in self.shapes.items():
            if tuple(matrices[name]) != shape:
                raise PolicyError(f"policy does not match the model: matrix {name!r} is {tuple(matrices[name])} "
                                  f"in the model but {shape} in the policy")

    def expected_nbytes(self, matrices: Mapping[str, tuple[int, int]]) -> int:
        """Total packed bytes of the matrices under this policy."""
        from quant.formats import get_format

        return sum(get_format(s.format).expected_nbytes(matrices[n], s) for n, s in self.settings.items())


def _read_entry(raw: Any) -> tuple[QuantSetting, tuple[int, int] | None]:
    """One ``matrices`` entry: its validated setting and its shape (``None`` when the entry has none)."""
    if not isinstance(raw, Mapping):
        return QuantSetting.from_dict(raw), None  # which raises, saying what a setting looks like
    extra = set(raw) - set(_SETTING_KEYS) - set(_DERIVED_KEYS) - {"shape"}
    if extra:
        raise ValueError(f"unknown setting keys {sorted(extra)}; allowed: {', '.join(_SETTING_KEYS)} "
                         f"(and shape, runtime, which quant writes)")
    setting = QuantSetting.from_dict({k: v for k, v in raw.items() if k in _SETTING_KEYS})
    shape = raw.get("shape")
    if shape is None:
        return setting, None
    if (not isinstance(shape, (list, tuple)) or len(shape) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        raise ValueError(f"shape must be [out_features, in_features], two positive integers, got {shape!r}")
    from quant.formats import get_format

    get_format(setting.format).check_shape((shape[0], shape[1]), setting)
    return setting, (shape[0], shape[1])
