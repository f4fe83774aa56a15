"""The API's request bodies: a search to launch (the CLI's :class:`~search.request.SearchRequest`,
with a required, URL-safe study name) and a front point to export."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from evaluators.models import MODEL_ALIASES
from search.request import SearchRequest
from search.at_budget import REFINE_TRIALS
from search.exporters import file_formats

__all__ = ["HUB_ID", "StudyRequest", "ExportRequest"]

# A Hugging Face id: ``org/name`` (a dataset may have no org); never a path (no leading '/', '.', '~').
HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}\Z")


class StudyRequest(SearchRequest):
    """A search to launch: the same options as ``turboquant search``. The name is required here
    (the CLI derives one) and is part of the study's URLs, so it is limited to a safe alphabet."""

    study: str = Field(description="study name; letters, digits, '.', '_' and '-'")  # required: no derived name

    @classmethod
    def _model(cls, v: str) -> str:
        # Replaces the CLI's check, which looks at this machine's disk (its answers would tell a token holder
        # which files exist): over the API a model is an alias, a hub id or a name under the operator's
        # --models-dir, resolved by app.service._limits.vet; never a path.
        if v not in MODEL_ALIASES and not HUB_ID.match(v):
            raise ValueError(f"model {v!r}: over the API a model is an alias ({', '.join(MODEL_ALIASES)}), a hub id "
                             "(org/name) or a folder the service offers, not a path")
        return v


class ExportRequest(BaseModel):
    """Which front point to export: a trial number or the best point within a budget."""

    model_config = ConfigDict(extra="forbid")

    trial: int | None = Field(None, ge=0, le=2**31 - 1)  # the store's trial numbers are 32-bit integers
    budget: str | None = None
    format: Literal[file_formats()] = "json"  # a folder (a checkpoint) is the command line's
    nearest: bool = False  # gguf: map formats llama.cpp cannot run to the nearest type (else refused)
    # With a budget the study has no point using 99 % of: trials run at it first (0: stored points only).
    refine_trials: int = Field(REFINE_TRIALS, ge=0, le=1000)

    @model_validator(mode="after")
    def _one_of(self) -> "ExportRequest":
        if (self.trial is None) == (self.budget is None):
            raise ValueError("give exactly one of 'trial' or 'budget'")
        return self
