"""Granularity: units group the right matrices, share one setting, and flow through sensitivity,
solved seeds and the evo sampler at block and layer level."""

import numpy as np
import optuna
import pytest

import quant
from evaluators import UserError
from search.evo import EvoSampler
from search.seeds import solved_policies
from search.sensitivity import measure_sensitivity
from search.space import SearchSpace, units_of

SMOL = {f"model.layers.{i}.{blk}.{m}": (64, 64) for i in range(3)
        for blk, ms in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for m in ms}
SMOL = {"model.embed_tokens": (100, 64), **SMOL, "lm_head": (100, 64)}


def test_units_group_matrices_by_block_and_layer() -> None:
    assert units_of(SMOL, "matrix") == {m: [m] for m in SMOL}
    block = units_of(SMOL, "block")
    assert len(block) == 3 * 2 + 2
    assert block["model.layers.1.self_attn"] == [f"model.layers.1.self_attn.{m}" for m in "qkvo"]
    assert block["model.layers.2.mlp"] == [f"model.layers.2.mlp.{m}" for m in ("gate", "up", "down")]
    layer = units_of(SMOL, "layer")
    assert list(layer) == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "lm_head"]
    assert len(layer["model.layers.0"]) == 7
    # Every matrix is in exactly one unit at every granularity.
    for g in ("matrix", "block", "layer"):
        members = [m for ms in units_of(SMOL, g).values() for m in ms]
        assert sorted(members) == sorted(SMOL)
    with pytest.raises(UserError, match="granularity 'row'"):
        units_of(SMOL, "row")


def test_a_unit_shares_one_setting_and_params_round_trip() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SearchSpace(SMOL, bits=(2, 4, 8), groups=(32, 64), granularity="block")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    policy = space.suggest(trial)
    assert len(trial.params) == 2 * len(space.units)
    for members in space.units.values():
        assert len({policy.settings[m] for m in members}) == 1
    assert space.params(policy) == trial.params
    # Bytes of the policy are the sum of its units' bytes.
    per_unit = {u: policy.settings[ms[0]] for u, ms in space.units.items()}
    assert space.nbytes(policy) == sum(space.unit_nbytes(u, s) for u, s in per_unit.items())
    assert space.expand(per_unit).settings == policy.settings


def test_evo_children_fit_at_layer_granularity() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SearchSpace(SMOL, bits=(2, 3, 4, 8), groups=(32, 64), granularity="layer")
    budget = int(space.numel * 3.3 / 8)
    sampler = EvoSampler(space, budget, seed=0)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    sizes = []
    for _ in range(30):
        trial = study.ask()
        policy = space.suggest(trial)
        nbytes = space.nbytes(policy)
        sizes.append(nbytes)
        study.tell(trial, [sum(2.0 ** -s.bits for s in policy.settings.values()), float(nbytes)])
    assert max(sizes) <= budget
    # 5 units and a coarse step: every child still lands within 10 % below the budget.
    assert min(sizes) >= 0.9 * budget, min(sizes) / budget


def test_block_sensitivity_and_seeds_on_the_tiny_model(evaluator) -> None:
    space = SearchSpace(dict(evaluator.matrices), bits=(2, 8), groups=(32,), granularity="block")
    table = measure_sensitivity(evaluator, space.settings(), units=space.units, progress=False)
    names, kl, nb = table.arrays()
    assert names == list(space.units) and kl.shape == (len(space.units), 2)
    assert (kl[:, 0] > kl[:, 1]).all()  # 2 bits hurts more than 8 on every block
    # A block's bytes are its matrices' packed bytes.
    s2 = quant.QuantSetting("rtn", 2, 32)
    assert nb[:, 0].tolist() == [space.unit_nbytes(u, s2) for u in names]
    budget = int(space.numel * 4.0 / 8)
    for label, policy, predicted in solved_policies(table, space, budget, n_budgets=3):
        assert space.nbytes(policy) == predicted <= budget
        for members in space.units.values():
            assert len({policy.settings[m] for m in members}) == 1
    # A block quantized whole costs at least as much KL as its most sensitive matrix alone (tiny model,
    # 2 bits): the unit really quantizes all its members.
    attn = "model.layers.0.self_attn"
    alone = max(evaluator.evaluate_partial({m: s2})["kl"] for m in space.units[attn])
    assert table.kl[attn][s2.key()] >= alone * 0.99
    assert np.isfinite(kl).all()


def test_sensitivity_on_fewer_windows_is_stored_apart(evaluator, tmp_path) -> None:
    from studies import Store

    store = Store(f"sqlite:///{tmp_path}/w.db")
    s2 = quant.QuantSetting("rtn", 2, 32)
    units = {"model.layers.0.mlp": [m for m in evaluator.matrices if m.startswith("model.layers.0.mlp.")]}
    for windows in (1, 2, 3):  # an odd count ends in a partial batch: nothing quantized is still KL 0
        assert evaluator.evaluate_partial({}, windows=windows)["kl"] == pytest.approx(0.0, abs=1e-9)
    few = measure_sensitivity(evaluator, [s2], units=units, store=store, model_fingerprint="m",
                              data_fingerprint="d", windows=3, progress=False)
    full = measure_sensitivity(evaluator, [s2], units=units, store=store, model_fingerprint="m",
                               data_fingerprint="d", progress=False)
    assert few.computed == full.computed == 1  # other tokens: not reused for the full table
    members = dict.fromkeys(units["model.layers.0.mlp"], s2)
    assert few.kl["model.layers.0.mlp"][s2.key()] == evaluator.evaluate_partial(members, windows=3)["kl"]
    assert full.kl["model.layers.0.mlp"][s2.key()] == evaluator.evaluate_partial(members)["kl"]
    assert few.kl != full.kl


def test_gp_copes_with_a_coarse_space_and_refuses_a_fine_one() -> None:
    from search.samplers import make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    coarse = SearchSpace(SMOL, bits=(2, 3, 4, 8), groups=(64,), granularity="layer")
    assert coarse.n_params == 5  # one group size: only bits are searched
    fine = SearchSpace({f"model.layers.{i}.mlp.up": (64, 64) for i in range(40)}, bits=(2, 4), groups=(32, 64))
    assert fine.n_params == 80
    with pytest.raises(UserError, match="gp sampler copes with up to ~60 parameters; this space has 80"):
        make_sampler("gp", 0, fine.n_params, space=fine, budget_bytes=1)
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=make_sampler("gp", 0, coarse.n_params, space=coarse, budget_bytes=1))
    for _ in range(14):  # past GP's random start-up trials
        trial = study.ask()
        policy = coarse.suggest(trial)
        study.tell(trial, [sum(2.0 ** -s.bits for s in policy.settings.values()), float(coarse.nbytes(policy))])
    assert len(study.best_trials) >= 1
