"""Proposing and dispatching policies: search space, samplers, Ray workers, driver and CLI."""

from search.budget import parse_budget
from search.driver import SearchConfig, run_search
from search.request import MeasureRequest, SearchRequest
from search.space import SearchSpace

__all__ = ["MeasureRequest", "SearchConfig", "SearchRequest", "SearchSpace", "parse_budget", "run_search"]
