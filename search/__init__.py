"""Proposing and dispatching policies: search space, samplers, Ray workers, driver and CLI."""

from search.budget import parse_budget
from search.driver import SearchConfig, run_search
from search.space import SearchSpace

__all__ = ["SearchConfig", "SearchSpace", "parse_budget", "run_search"]
