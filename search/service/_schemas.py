"""The API's request bodies: a search to launch (the CLI's :class:`~search.request.SearchRequest`,
with a required, URL-safe study name) and a front point to export."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from search.request import SearchRequest
from search.at_budget import REFINE_TRIALS
from studies.export import EXPORT_FORMATS

__all__ = ["StudyRequest", "ExportRequest"]

STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StudyRequest(SearchRequest):
    """A search to launch: the same options as ``turboquant search``. The name is required here
    (the CLI derives one) and is part of the study's URLs, so it is limited to a safe alphabet."""

    study: str = Field(description="study name; letters, digits, '.', '_' and '-'")

    @field_validator("study")
    @classmethod
    def _name(cls, v: str) -> str:
        if not STUDY_NAME.match(v):
            raise ValueError("study names use letters, digits, '.', '_' and '-' (at most 128, not starting with a symbol)")
        return v


class ExportRequest(BaseModel):
    """Which front point to export: a trial number or the best point within a budget."""

    model_config = ConfigDict(extra="forbid")

    trial: int | None = Field(None, ge=0, le=2**31 - 1)  # the store's trial numbers are 32-bit integers
    budget: str | None = None
    format: Literal[EXPORT_FORMATS] = "json"
    nearest: bool = False  # gguf: map formats llama.cpp cannot run to the nearest type (else refused)
    # With a budget the study has no point using 99 % of: trials run at it first (0: stored points only).
    refine_trials: int = Field(REFINE_TRIALS, ge=0, le=1000)

    @model_validator(mode="after")
    def _one_of(self) -> "ExportRequest":
        if (self.trial is None) == (self.budget is None):
            raise ValueError("give exactly one of 'trial' or 'budget'")
        return self
