"""Searching llama.cpp's block types: per-unit ladders of the types that fit, seeds and evo on them."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

import quant
from evaluators.errors import UserError
from search.space import SearchSpace

MATRICES = {"model.embed_tokens": (512, 576), "model.layers.0.self_attn.q_proj": (576, 576),
            "model.layers.0.mlp.down_proj": (576, 1536), "model.layers.1.mlp.down_proj": (576, 1536)}
TYPES = ("q4_0", "q8_0", "q2_k", "q4_k", "q6_k")


def test_each_unit_climbs_only_the_types_that_fit_it_ordered_by_bytes():
    space = SearchSpace(MATRICES, formats=TYPES)
    assert [s.format for s in space.ladders["model.layers.0.self_attn.q_proj"]] == ["q4_0", "q8_0"]
    down = space.ladders["model.layers.0.mlp.down_proj"]
    assert [s.format for s in down] == ["q2_k", "q4_0", "q4_k", "q6_k", "q8_0"]
    sizes = [space.unit_nbytes("model.layers.0.mlp.down_proj", s) for s in down]
    assert sizes == sorted(sizes)
    assert space.levels("model.layers.0.self_attn.q_proj") == 2 and space.levels("model.layers.0.mlp.down_proj") == 5
    # Uniform seeds are the types every matrix takes.
    assert [label for label, _ in space.uniform_policies()] == ["q4_0", "q8_0"]
    assert space.min_bytes() == sum(min(space.unit_nbytes(u, s) for s in space.ladders[u]) for u in space.units)


def test_a_sampled_policy_fits_every_matrix_and_round_trips_through_params():
    space = SearchSpace(MATRICES, formats=TYPES)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        policy = space.suggest(trial)
        for name, setting in policy.settings.items():
            quant.get_format(setting.format).check_shape(MATRICES[name], setting)  # raises if it does not fit
        assert space.covers(trial.params)
        assert space.params(policy) == trial.params
        rows = space.indices(trial.params)
        assert space.from_indices(rows) == trial.params
        study.tell(trial, 0.0)


def test_mixing_fixed_geometry_types_with_bit_width_formats_is_refused():
    with pytest.raises(UserError, match="fixed-geometry"):
        SearchSpace(MATRICES, formats=("rtn", "q4_k"))


def test_a_unit_no_type_fits_is_refused_naming_it():
    with pytest.raises(UserError, match=r"fits unit model\.embed_tokens \(shapes \[\(512, 576\)\]\)"):
        SearchSpace(MATRICES, formats=("q4_k", "q6_k"))


def test_evo_children_stay_on_each_units_own_ladder_and_within_budget():
    from search.evo import EvoSampler

    space = SearchSpace(MATRICES, formats=TYPES)
    budget = int(0.6 * sum(max(space.unit_nbytes(u, s) for s in space.ladders[u]) for u in space.units))
    sampler = EvoSampler(space, budget, seed=0)
    assert list(sampler.top) == [space.levels(u) - 1 for u in space.units]
    study = optuna.create_study(sampler=sampler, directions=["minimize", "minimize"])
    for _ in range(15):
        trial = study.ask()
        policy = space.suggest(trial)
        nbytes = space.nbytes(policy)
        assert nbytes <= budget
        for name, setting in policy.settings.items():
            quant.get_format(setting.format).check_shape(MATRICES[name], setting)
        study.tell(trial, [float(np.random.default_rng(trial.number).random()), float(nbytes)])


def test_solved_seeds_never_pick_a_type_a_unit_cannot_take():
    from search.seeds import solved_policies
    from search.sensitivity import SensitivityTable

    space = SearchSpace(MATRICES, formats=TYPES)
    table = SensitivityTable(space.units, space.settings())
    for unit in space.units:
        table.kl[unit], table.nbytes[unit] = {}, {}
        for s in space.ladders[unit]:
            nb = space.unit_nbytes(unit, s)
            table.kl[unit][s.key()], table.nbytes[unit][s.key()] = 1e6 / nb, nb  # more bytes, less loss
    budget = int(0.7 * sum(max(space.unit_nbytes(u, s) for s in space.ladders[u]) for u in space.units))
    policies = solved_policies(table, space, budget, n_budgets=4)
    assert policies
    for _, policy, predicted in policies:
        assert predicted <= budget and space.nbytes(policy) == predicted
        for name, setting in policy.settings.items():
            quant.get_format(setting.format).check_shape(MATRICES[name], setting)
