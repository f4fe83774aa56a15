"""Samplers by name. Each maps to an Optuna sampler; new ones register here."""

from __future__ import annotations

from typing import Any, Callable

import optuna

from evaluators.errors import UserError

__all__ = ["make_sampler", "SAMPLERS"]


def _nsga2(seed: int, n_params: int, **_: Any) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=16)


def _tpe(seed: int, n_params: int, **_: Any) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
)


def _random(seed: int, n_params: int, **_: Any) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


def _gp(seed: int, n_params: int, **_: Any) -> optuna.samplers.BaseSampler:
    if n_params > 60:
        raise UserError(f"the gp sampler copes with up to ~60 parameters; this space has {n_params} "
                        "(use nsga2, tpe or evo, or a coarser space: --granularity layer, one --groups value)")
    return optuna.samplers.GPSampler(seed=seed)


def _evo(seed: int, n_params: int, space: Any = None, budget_bytes: int | None = None,
         **_: Any) -> optuna.samplers.BaseSampler:
    from search.evo import EvoSampler

    if space is None or budget_bytes is None:
        raise UserError("the evo sampler needs the search space and the budget")
    return EvoSampler(space, budget_bytes, seed=seed)


SAMPLERS: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {
    "nsga2": _nsga2, "tpe": _tpe, "random": _random, "gp": _gp, "evo": _evo}


def make_sampler(name: str, seed: int, n_params: int, **context: Any) -> optuna.samplers.BaseSampler:
    """``context`` carries what budget-aware samplers need (``space``, ``budget_bytes``); others ignore it."""
    try:
        factory = SAMPLERS[name]
    except KeyError:
        raise UserError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None
    return factory(seed, n_params, **context)
