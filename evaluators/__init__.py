"""Measured quality: models, corpora, reference outputs and metrics."""

from evaluators.data import DEFAULT_CORPUS, TokenSets, load_corpus, make_token_sets
from evaluators.errors import UserError
from evaluators.evaluator import Evaluator, calibration_hessians, reference_logprobs
from evaluators.metrics import METRIC_NAMES, MetricSums
from evaluators.models import MODEL_ALIASES, LoadedModel, cache_dir, load_model
from evaluators.reference import Reference, TopKReference, reference_nbytes

__all__ = [
    "DEFAULT_CORPUS", "Evaluator", "LoadedModel", "METRIC_NAMES", "MODEL_ALIASES", "MetricSums", "TokenSets",
    "UserError", "cache_dir", "calibration_hessians", "load_corpus", "load_model", "make_token_sets",
    "Reference", "TopKReference", "reference_logprobs", "reference_nbytes",
]
