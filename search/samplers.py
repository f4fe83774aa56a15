"""Samplers by name. Each maps to an Optuna sampler; new ones register here."""

from __future__ import annotations

from typing import Callable

import optuna

from evaluators.errors import UserError

__all__ = ["make_sampler", "SAMPLERS"]


def _nsga2(seed: int, n_params: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=16)


def _tpe(seed: int, n_params: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                      warn_independent_sampling=False)


def _random(seed: int, n_params: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


def _gp(seed: int, n_params: int) -> optuna.samplers.BaseSampler:
    if n_params > 60:
        raise UserError(f"the gp sampler copes with up to ~60 parameters; this space has {n_params} "
                        "(use nsga2 or tpe, or a coarser space)")
    return optuna.samplers.GPSampler(seed=seed)


SAMPLERS: dict[str, Callable[[int, int], optuna.samplers.BaseSampler]] = {
    "nsga2": _nsga2, "tpe": _tpe, "random": _random, "gp": _gp}


def make_sampler(name: str, seed: int, n_params: int) -> optuna.samplers.BaseSampler:
    try:
        factory = SAMPLERS[name]
    except KeyError:
        raise UserError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None
    return factory(seed, n_params)
