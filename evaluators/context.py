"""What a measurement is made on: model, corpus and token windows — rebuilt identically from provenance."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from evaluators.data import DEFAULT_CORPUS, TokenSets, load_corpus, make_token_sets
from evaluators.errors import UserError
from evaluators.models import LoadedModel, load_model

__all__ = ["DataConfig", "measured_on"]


@dataclass(frozen=True)
class DataConfig:
    """Model and data of a study. Stored as its provenance; ``turboquant eval`` rebuilds from it."""

    model: str = "smollm2-135m"
    dataset: str = DEFAULT_CORPUS
    seq_len: int = 256
    n_eval: int = 8
    n_calib: int = 8
    seed: int = 0
    trust_remote_code: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DataConfig":
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except TypeError as exc:
            raise UserError(f"bad provenance: {exc}") from None

    def load(self) -> tuple[LoadedModel, TokenSets]:
        loaded = load_model(self.model, trust_remote_code=self.trust_remote_code)
        text = load_corpus(self.dataset)
        tokens = make_token_sets(loaded, text, seq_len=self.seq_len, n_eval=self.n_eval,
                                 n_calib=self.n_calib, seed=self.seed)
        return loaded, tokens


def measured_on(meta: dict[str, Any], what: str, source: str, hint: str = "") -> tuple[LoadedModel, TokenSets]:
    """The model and tokens a policy or checkpoint (``what`` at ``source``) was measured on, rebuilt from
    the provenance in its ``meta``; refused when there is none or the tokens came out different."""
    provenance = meta.get("provenance")
    if not isinstance(provenance, dict) or "model" not in provenance:
        raise UserError(f"{what} {source} has no provenance (model and data){hint}")
    loaded, tokens = DataConfig.from_dict(provenance).load()
    if provenance.get("data_fingerprint") not in (None, tokens.fingerprint):
        raise UserError(f"the evaluation tokens differ from those the {what} was measured on (corpus changed?)")
    return loaded, tokens
