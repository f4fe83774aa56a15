"""SQLAlchemy tables of TurboQuant's record. They live beside Optuna's own tables in one database."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = ["Base", "StudyRow", "TrialRow", "SensitivityRow", "RescoreRow", "FRONT_INDEX", "WIDE_COLUMNS",
           "ADDED_COLUMNS"]


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class StudyRow(Base):
    """One search: the model and data it measures on, its budget and its search space."""

    __tablename__ = "tq_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True, index=True)
    model: Mapped[str] = mapped_column(String(1024))
    dataset: Mapped[str] = mapped_column(String(1024))
    # Byte and weight counts are 64-bit: a 7B model's bytes pass 2**31 (see studies.migrate).
    budget_bytes: Mapped[int] = mapped_column(BigInteger)
    numel: Mapped[int] = mapped_column(BigInteger)  # weights covered by the policy (for bits per weight)
    sampler: Mapped[str] = mapped_column(String(64))
    space: Mapped[dict[str, Any]] = mapped_column(JSON)
    provenance: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    trials: Mapped[list["TrialRow"]] = relationship(back_populates="study", cascade="all, delete-orphan")

    @property
    def budget_bpw(self) -> float:
        return 8.0 * self.budget_bytes / self.numel

    @property
    def budget_label(self) -> str:
        """The budget as a front's title says it: bits per weight, or with a KV cache its size (which then
        counts the cache too, so no number of bits per weight)."""
        if "kv" in (self.space or {}):
            return f"{self.budget_bytes / 1e6:.1f} MB with the cache"
        return f"{self.budget_bpw:.2f} bpw"


class TrialRow(Base):
    """One measured policy (or a failed attempt, with its reason)."""

    __tablename__ = "tq_trials"
    __table_args__ = (UniqueConstraint("study_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("tq_studies.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)  # Optuna's trial number
    state: Mapped[str] = mapped_column(String(16))  # complete | failed
    policy: Mapped[dict[str, Any]] = mapped_column(JSON)
    bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # weights (+ KV cache, with kv_bytes)
    bpw: Mapped[float | None] = mapped_column(Float, nullable=True)  # the weights' bits per weight
    kl: Mapped[float | None] = mapped_column(Float, nullable=True)
    ppl: Mapped[float | None] = mapped_column(Float, nullable=True)
    top1: Mapped[float | None] = mapped_column(Float, nullable=True)
    logit_err: Mapped[float | None] = mapped_column(Float, nullable=True)
    kv_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # the cache at --context (in bytes)
    feasible: Mapped[bool] = mapped_column(Boolean, default=False)
    seed: Mapped[str | None] = mapped_column(String(64), nullable=True)  # how a seeded trial was made
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    study: Mapped[StudyRow] = relationship(back_populates="trials")


# Front reads (the service's busiest query) find a study's complete trials and their bytes and KL
# in this index alone, without touching the table.
FRONT_INDEX = Index("ix_tq_trials_front", TrialRow.study_id, TrialRow.state, TrialRow.bytes, TrialRow.kl)


class SensitivityRow(Base):
    """KL to the float model when only ``matrix`` is quantized with ``setting`` (all else float).

    Keyed by what the number depends on (weights, evaluation tokens, setting, matrix), not by a
    study, so every later study on the same model and data reuses it.
    """

    __tablename__ = "tq_sensitivity"
    __table_args__ = (UniqueConstraint("model_fingerprint", "data_fingerprint", "setting", "matrix"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_fingerprint: Mapped[str] = mapped_column(String(128), index=True)
    data_fingerprint: Mapped[str] = mapped_column(String(128), index=True)
    setting: Mapped[str] = mapped_column(String(512))  # QuantSetting.key()
    matrix: Mapped[str] = mapped_column(String(512))
    kl: Mapped[float] = mapped_column(Float)
    ppl: Mapped[float | None] = mapped_column(Float, nullable=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class RescoreRow(Base):
    """A study's trial measured on another text than the study's (``turboquant front STUDY --dataset``).

    Kept beside the trial, never over it: the trial's own metrics stay those of the study's data.
    Keyed by the text's fingerprint (its contents and the windows cut from it), so a second
    re-scoring on the same text reuses the row.
    """

    __tablename__ = "tq_rescores"
    __table_args__ = (UniqueConstraint("study_id", "trial", "data_fingerprint"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("tq_studies.id", ondelete="CASCADE"), index=True)
    trial: Mapped[int] = mapped_column(Integer)  # the trial's number in its study
    data_fingerprint: Mapped[str] = mapped_column(String(128))
    dataset: Mapped[str] = mapped_column(String(1024))  # as given (a path); the fingerprint is what counts
    seq_len: Mapped[int] = mapped_column(Integer)
    windows: Mapped[int] = mapped_column(Integer)
    kl: Mapped[float] = mapped_column(Float)
    ppl: Mapped[float | None] = mapped_column(Float, nullable=True)
    top1: Mapped[float | None] = mapped_column(Float, nullable=True)
    logit_err: Mapped[float | None] = mapped_column(Float, nullable=True)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


# The columns that hold byte or weight counts; databases made before they were 64-bit are widened
# when opened (studies.migrate).
WIDE_COLUMNS = ((StudyRow.__table__, ("budget_bytes", "numel")), (TrialRow.__table__, ("bytes",)),
                (SensitivityRow.__table__, ("bytes",)))
# Columns added since the tables were first made (nullable): an older database gets them when opened.
ADDED_COLUMNS = ((TrialRow.__table__, ("kv_bytes",)),)
