"""The record of searches: studies, trials, Pareto fronts and policy export (no torch here)."""

from studies.export import export_policy
from studies.pareto import hypervolume, non_dominated
from studies.redact import redact_url, scrub
from studies.results import SensitivityMeasure, TrialResult
from studies.store import DEFAULT_STORAGE, FRONT_COLUMNS, NotFoundError, Store, StoreError, check_exists

__all__ = ["DEFAULT_STORAGE", "FRONT_COLUMNS", "NotFoundError", "Store", "StoreError", "SensitivityMeasure",
           "TrialResult", "check_exists", "export_policy", "hypervolume", "non_dominated", "redact_url", "scrub"]
