"""The policy: every weight matrix of a model mapped to its setting, as versioned JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from quant.settings import QuantSetting

__all__ = ["Policy", "PolicyError", "weight_matrices", "POLICY_VERSION"]

POLICY_VERSION = 1


class PolicyError(ValueError):
    """A policy file that is malformed or does not fit the model."""


def weight_matrices(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Names and ``(out, in)`` shapes of the matrices a policy covers.

    Linear layers, embeddings and the LM head; norms stay float. A tied LM head
    shares the embedding's weight and is covered by the embedding's entry.
    """
    seen: set[int] = set()
    out: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            weight = module.weight
            if id(weight) in seen:
                continue
            seen.add(id(weight))
            out[name] = tuple(weight.shape)
    return out


@dataclass
class Policy:
    """Settings per weight-matrix name, plus free metadata (metrics, provenance).

    Attributes:
        settings: matrix name -> :class:`QuantSetting`.
        meta: anything recorded with the policy (model, metrics, provenance); not
            interpreted by ``quant``.
    """

    settings: dict[str, QuantSetting]
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def uniform(cls, names: list[str], setting: QuantSetting) -> "Policy":
        return cls({name: setting for name in names})

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": POLICY_VERSION, **self.meta,
                "matrices": {name: s.to_dict() for name, s in self.settings.items()}}

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
        settings = {}
        for name, raw in matrices.items():
            try:
                settings[str(name)] = QuantSetting.from_dict(raw)
            except ValueError as exc:
                raise PolicyError(f"matrix {name!r}: {exc}") from None
        meta = {k: v for k, v in data.items() if k not in ("format_version", "matrices")}
        return cls(settings, meta)

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
        """Raises :class:`PolicyError` unless the policy names exactly the model's matrices."""
        missing = sorted(set(matrices) - set(self.settings))
        extra = sorted(set(self.settings) - set(matrices))
        if missing or extra:
            parts = []
            if extra:
                parts.append(f"{len(extra)} names not in the model (e.g. {extra[0]!r})")
            if missing:
                parts.append(f"{len(missing)} model matrices missing (e.g. {missing[0]!r})")
            raise PolicyError("policy does not match the model: " + "; ".join(parts))

    def expected_nbytes(self, matrices: Mapping[str, tuple[int, int]]) -> int:
        """Total packed bytes of the matrices under this policy."""
        from quant.formats import get_format

        return sum(get_format(s.format).expected_nbytes(matrices[n], s) for n, s in self.settings.items())
