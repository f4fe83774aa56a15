"""Solved seeds: the DP is optimal (against brute force) and respects its budget; greedy never beats it;
the sensitivity table is stored and reused rather than recomputed."""

import itertools
import json

import numpy as np
import pytest

import quant
from search.seeds import solve_dp, solve_greedy, solved_policies
from search.sensitivity import measure_sensitivity
from search.space import SearchSpace
from studies import Store


def _brute(kl: np.ndarray, nb: np.ndarray, budget: int) -> float:
    best = np.inf
    for cols in itertools.product(range(kl.shape[1]), repeat=kl.shape[0]):
        idx = (np.arange(kl.shape[0]), np.array(cols))
        if nb[idx].sum() <= budget:
            best = min(best, kl[idx].sum())
    return best


@pytest.mark.parametrize("seed", range(6))
def test_dp_is_optimal_and_fits_on_small_instances(seed: int) -> None:
    rng = np.random.default_rng(seed)
    kl = rng.uniform(0, 1, (6, 4))
    nb = rng.integers(10, 60, (6, 4))
    for budget in (int(nb.min(axis=1).sum()), 150, 200, 260):
        cols = solve_dp(kl, nb, budget, unit=1)
        expected = _brute(kl, nb, budget)
        if not np.isfinite(expected):
            assert cols is None
            continue
        idx = (np.arange(6), cols)
        assert nb[idx].sum() <= budget
        assert kl[idx].sum() == pytest.approx(expected, abs=1e-12)
        greedy = solve_greedy(kl, nb, budget)
        assert nb[(np.arange(6), greedy)].sum() <= budget
        assert kl[(np.arange(6), greedy)].sum() >= expected - 1e-12


def test_coarse_units_still_fit_the_budget() -> None:
    rng = np.random.default_rng(7)
    kl = rng.uniform(0, 1, (40, 6))
    nb = rng.integers(1000, 90_000, (40, 6))
    for budget in (1_500_000, 2_000_000, 3_000_000):
        cols = solve_dp(kl, nb, budget, unit=997)
        assert nb[(np.arange(40), cols)].sum() <= budget
        # Coarse units lose at most one unit per row against the exact byte-level optimum's budget.
        loose = solve_dp(kl, nb, budget - 40 * 997, unit=1)
        assert kl[(np.arange(40), cols)].sum() <= kl[(np.arange(40), loose)].sum() + 1e-9


def test_dp_below_the_smallest_policy_is_none() -> None:
    assert solve_dp(np.zeros((2, 2)), np.array([[5, 9], [5, 9]]), 9, unit=1) is None


def test_sensitivity_is_stored_and_reused_not_recomputed(evaluator, tmp_path, monkeypatch) -> None:
    store = Store(f"sqlite:///{tmp_path}/s.db")
    settings = [quant.QuantSetting("rtn", 2, 32), quant.QuantSetting("rtn", 4, 32)]
    first = measure_sensitivity(evaluator, settings, store=store, model_fingerprint="m", data_fingerprint="d",
                                progress=False)
    n = len(evaluator.matrices) * 2
    assert first.computed == n and first.reused == 0
    for name in evaluator.matrices:  # fewer bits never helps
        assert first.kl[name][settings[0].key()] >= first.kl[name][settings[1].key()] >= 0

    def boom(*_a, **_k):
        raise AssertionError("recomputed a stored pair")

    monkeypatch.setattr(type(evaluator), "evaluate_partial", boom)
    second = measure_sensitivity(evaluator, settings, store=store, model_fingerprint="m", data_fingerprint="d",
                                 progress=False)
    assert second.computed == 0 and second.reused == n and second.kl == first.kl
    # Other data is another key: nothing to reuse.
    with pytest.raises(AssertionError, match="recomputed"):
        measure_sensitivity(evaluator, settings, store=store, model_fingerprint="m", data_fingerprint="other",
                            progress=False)


def test_partial_policy_keeps_the_rest_float(evaluator) -> None:
    s = quant.QuantSetting("rtn", 2, 32)
    assert evaluator.evaluate_partial({})["kl"] == pytest.approx(0.0, abs=1e-9)
    full = evaluator.evaluate(quant.Policy.uniform(list(evaluator.matrices), s))["kl"]
    assert evaluator.evaluate_partial({n: s for n in evaluator.matrices})["kl"] == pytest.approx(full, rel=1e-6)
    assert evaluator.evaluate_partial({})["kl"] == pytest.approx(0.0, abs=1e-9)


def test_solved_policies_fit_their_budgets(evaluator) -> None:
    space = SearchSpace(dict(evaluator.matrices), bits=(2, 4, 8), groups=(32,))
    table = measure_sensitivity(evaluator, space.settings(), progress=False)
    budget = int(space.numel * 4.0 / 8)
    seeds = solved_policies(table, space, budget, n_budgets=4)
    methods = {label.split(":")[0] for label, _, _ in seeds}
    # Greedy's allocation is kept only where it differs from DP's (on this tiny model they may all agree).
    assert "dp" in methods and methods <= {"dp", "greedy"}
    assert len({json.dumps(p.to_dict()["matrices"], sort_keys=True) for _, p, _ in seeds}) == len(seeds)
    for label, policy, predicted in seeds:
        bpw = float(label.split(":")[1].removesuffix("bpw"))
        assert space.nbytes(policy) == predicted <= bpw * space.numel / 8 + 1


def test_the_first_worker_computes_the_reference_the_others_share(evaluator, data_config, local_ray) -> None:
    import ray

    from search.dispatch import Dispatcher

    workers = Dispatcher(data_config.to_dict(), None, 2)
    try:
        first, second = (ray.get(w.reference.remote()) for w in workers._workers)
        pids = {ray.get(w.pid.remote()) for w in workers._workers}
    finally:
        workers.close()
    assert len(pids) == 2 and np.array_equal(first, second)  # one reference, shared
    # The worker's own forwards (one torch thread) sum in another order than the driver's.
    np.testing.assert_allclose(first, evaluator.reference, rtol=0, atol=1e-4)


def test_measured_table_on_workers_matches_the_driver_and_resumes(evaluator, data_config, local_ray,
                                                                  tmp_path) -> None:
    from search.dispatch import Dispatcher
    from search.sensitivity import measure_on_workers

    store = Store(f"sqlite:///{tmp_path}/w.db")
    space = SearchSpace(evaluator.matrices, bits=(2, 3), groups=(32,), granularity="block")
    units = space.units
    here = measure_sensitivity(evaluator, space.settings(), units=units, progress=False)
    workers = Dispatcher(data_config.to_dict(), evaluator.reference, 2)
    try:
        # Half the pairs are stored already, as an interrupted table leaves them.
        first = measure_on_workers(workers, SearchSpace(evaluator.matrices, bits=(2,), groups=(32,),
                                                        granularity="block"), len(evaluator.tokens.eval),
                                   store=store, model_fingerprint="m", data_fingerprint="d", progress=False, chunk=3)
        table = measure_on_workers(workers, space, len(evaluator.tokens.eval), store=store, model_fingerprint="m",
                                   data_fingerprint="d", progress=False, chunk=3)
    finally:
        workers.close()
    assert first.computed == len(units) and table.reused == len(units) and table.computed == len(units)
    assert table.nbytes == here.nbytes
    settings = space.settings()
    for unit in units:
        for s in settings:
            # The workers run one torch thread each: sums in another order than the driver's.
            assert table.kl[unit][s.key()] == pytest.approx(here.kl[unit][s.key()], rel=1e-4, abs=1e-7)
    stored = store.sensitivity("m", "d")
    attn0 = next(u for u in units if u.endswith("layers.0.self_attn"))
    assert len(stored) == 2 * len(units) and stored[(attn0, settings[1].key())].kl == table.kl[attn0][
        settings[1].key()]
