"""The search engine: search space, samplers, Ray workers, driver, sensitivity, seeds and exporters."""

from search.quiet import quiet_dependencies

# First: the imports below reach transformers, which imports torchao and its start-up noise (see
# search.quiet); every process (the command line, the service, a Ray worker) imports this package first.
quiet_dependencies()

from search.budget import parse_budget  # noqa: E402
from search.driver import SearchConfig, run_search  # noqa: E402
from search.request import MeasureRequest, SearchRequest  # noqa: E402
from search.space import SearchSpace  # noqa: E402

__all__ = ["MeasureRequest", "SearchConfig", "SearchRequest", "SearchSpace", "parse_budget", "run_search"]
