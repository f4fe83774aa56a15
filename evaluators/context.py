"""What a measurement is made on: model, corpus and token windows — rebuilt identically from provenance."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from evaluators.data import DEFAULT_CORPUS, TokenSets, load_corpus, make_token_sets
from evaluators.errors import UserError
from evaluators.models import LoadedModel, load_model, max_positions

__all__ = ["DataConfig", "NEEDS_DATASET", "OtherText", "measured_on"]

NEEDS_DATASET = "--seq-len and --eval-seqs cut windows from another text: give it with --dataset FILE"


@dataclass(frozen=True)
class DataConfig:
    """Model and data of a study. Stored as its provenance; ``turboquant eval`` rebuilds from it.

    ``dtype`` is what the float model was loaded in (``float32``, ``bfloat16``, ``float16``; never
    ``auto``, which a request resolves first), so a study's policies are re-measured on the same
    model; provenance written before it existed was measured in float32, its default.
    """

    model: str = "smollm2-135m"
    dataset: str = DEFAULT_CORPUS
    seq_len: int = 256
    n_eval: int = 8
    n_calib: int = 8
    seed: int = 0
    trust_remote_code: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        # Provenance comes from files a user may have edited or been sent: a wrong type is a clear error here,
        # not a traceback deep in tokenization.
        ints = {"seq_len": (2, 1 << 20), "n_eval": (1, 1 << 20), "n_calib": (0, 1 << 20), "seed": (0, 2 ** 32 - 1)}
        for name, (low, high) in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise UserError(f"bad provenance: {name} must be an integer in [{low}, {high}], got {value!r}")
        for name in ("model", "dataset", "dtype"):
            if not isinstance(getattr(self, name), str):
                raise UserError(f"bad provenance: {name} must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.trust_remote_code, bool):
            raise UserError(f"bad provenance: trust_remote_code must be true or false, got {self.trust_remote_code!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DataConfig":
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except TypeError as exc:
            raise UserError(f"bad provenance: {exc}") from None

    def load(self) -> tuple[LoadedModel, TokenSets]:
        loaded = load_model(self.model, trust_remote_code=self.trust_remote_code, dtype=self.dtype)
        limit = max_positions(loaded.model)
        if limit is not None and self.seq_len > limit:  # refused before any text is read or anything stored
            raise UserError(f"--seq-len {self.seq_len} is longer than {self.model} reads ({limit} positions): "
                            f"use --seq-len {limit} or less")
        text = load_corpus(self.dataset)
        tokens = make_token_sets(loaded, text, seq_len=self.seq_len, n_eval=self.n_eval,
                                 n_calib=self.n_calib, seed=self.seed)
        return loaded, tokens


def measured_on(meta: dict[str, Any], what: str, source: str, hint: str = "", *, dataset: str | None = None,
                seq_len: int | None = None, n_eval: int | None = None) -> tuple[LoadedModel, TokenSets]:
    """The model and tokens a policy or checkpoint (``what`` at ``source``) was measured on, rebuilt from
    the provenance in its ``meta``; refused when there is none or the tokens came out different.

    With ``dataset``, the evaluation windows are cut from that text instead (:class:`OtherText`; ``seq_len``
    and ``n_eval`` override the provenance's); the calibration windows stay the provenance's.
    """
    provenance = meta.get("provenance")
    if not isinstance(provenance, dict) or "model" not in provenance:
        raise UserError(f"{what} {source} has no provenance (model and data){hint}")
    if dataset is None and (seq_len is not None or n_eval is not None):
        raise UserError(NEEDS_DATASET)
    config = DataConfig.from_dict(provenance)
    other = None if dataset is None else OtherText.of(dataset, config, seq_len=seq_len, n_eval=n_eval)
    loaded, tokens = config.load()
    if provenance.get("data_fingerprint") not in (None, tokens.fingerprint):
        raise UserError(f"the evaluation tokens differ from those the {what} was measured on (corpus changed?)")
    return loaded, tokens if other is None else other.tokens(loaded, tokens)


@dataclass(frozen=True)
class OtherText:
    """Evaluation windows cut from another text than the one a policy was searched on.

    The windows are cut as the study's were (its ``seq_len``, number of evaluation windows and seed,
    unless given); the reference is the float model's outputs on these windows, and calibrated formats
    keep the study's own calibration windows, so the policy is quantized exactly as it was measured.

    Attributes:
        dataset: the text as given (a path, ``shakespeare`` or ``hf:NAME``).
        seq_len, n_eval, seed: how its windows are cut.
        text: its contents.
    """

    dataset: str
    seq_len: int
    n_eval: int
    seed: int
    text: str = field(repr=False)

    @classmethod
    def of(cls, dataset: str, study: DataConfig, *, seq_len: int | None = None,
           n_eval: int | None = None) -> "OtherText":
        """Reads ``dataset``; windows as the ``study``'s unless ``seq_len`` / ``n_eval`` are given."""
        return cls(dataset, study.seq_len if seq_len is None else seq_len,
                   study.n_eval if n_eval is None else n_eval, study.seed, load_corpus(dataset))

    @property
    def fingerprint(self) -> str:
        """What a measurement on this text depends on besides the model: the contents and the windows.
        Known without loading the model, so stored results are found before any model is loaded."""
        head = f"{self.seq_len}|{self.n_eval}|{self.seed}|".encode()
        return hashlib.sha256(head + self.text.encode()).hexdigest()[:16]

    def tokens(self, loaded: LoadedModel, study_tokens: TokenSets) -> TokenSets:
        """This text's evaluation windows with the study's calibration windows."""
        mine = make_token_sets(loaded, self.text, seq_len=self.seq_len, n_eval=self.n_eval, n_calib=0,
                               seed=self.seed)
        return replace(study_tokens, eval=mine.eval, fingerprint=self.fingerprint)
