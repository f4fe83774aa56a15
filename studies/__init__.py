"""The record of searches: studies, trials, Pareto fronts and policy export (no torch here)."""

from studies.export import export_policy
from studies.pareto import hypervolume, non_dominated
from studies.results import TrialResult
from studies.store import DEFAULT_STORAGE, FRONT_COLUMNS, NotFoundError, Store, StoreError

__all__ = ["DEFAULT_STORAGE", "FRONT_COLUMNS", "NotFoundError", "Store", "StoreError", "TrialResult", "export_policy",
           "hypervolume", "non_dominated"]
