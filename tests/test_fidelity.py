"""Multi-fidelity: a policy is scored on the first batch first; hopeless evo children stop there,
are kept as PRUNED trials, never reach the front, and the study still gets its complete trials."""

import optuna
import pytest
from optuna.trial import TrialState

import quant
from search.driver import SearchConfig, run_search
from search.request import SearchRequest
from search.fidelity import FirstBatchGate
from studies import Store


def test_first_batch_kl_is_the_same_whether_pruned_or_not(evaluator) -> None:
    policy = quant.Policy.uniform(list(evaluator.matrices), quant.QuantSetting("rtn", 2, 32))
    full = evaluator.evaluate(policy)
    assert not full["pruned"] and full["windows"] == len(evaluator.tokens.eval) == 4
    assert full["kl_low"] > 0
    stopped = evaluator.evaluate(policy, prune_above=0.5 * full["kl_low"])
    assert stopped["pruned"] and stopped["windows"] == evaluator.batch_size < 4
    assert stopped["kl_low"] == pytest.approx(full["kl_low"], rel=1e-6)
    assert "kl" not in stopped and stopped["bytes"] == full["bytes"]
    # Under the bar: measured fully, same numbers as without a bar.
    kept = evaluator.evaluate(policy, prune_above=2 * full["kl_low"])
    assert not kept["pruned"] and kept["kl"] == pytest.approx(full["kl"], rel=1e-6)


def test_gate_bar_is_the_kth_best_near_the_budget() -> None:
    gate = FirstBatchGate(1000, keep=2, band=0.1)
    gate.add(0.5, 950)
    assert gate.threshold() is None  # fewer than keep trials: nothing is pruned yet
    gate.add(0.1, 500)  # far below the budget: a cheaper point on the front, never sets the bar
    gate.add(0.9, 1001)  # over the budget
    gate.add(None, 990)
    assert gate.threshold() is None
    gate.add(0.7, 1000)
    gate.add(0.3, 905)
    assert gate.threshold() == 0.5


def test_evo_search_prunes_children_and_keeps_its_complete_trials(data_config, tmp_path, local_ray) -> None:
    storage = f"sqlite:///{tmp_path}/f.db"
    # Without the solved seeds (the default's 16 would fill these 14 trials, and seeds are never pruned).
    request = SearchRequest.from_data(data_config, study="mf", budget="3.5bpw", trials=14, sampler="evo", workers=2,
                                      bits=[2, 3, 4, 8], groups=[32, 64], granularity="block", formats=["rtn"],
                                      sensitivity=False)
    cfg = SearchConfig(request, storage=storage, progress=False, fidelity_keep=2)
    summary = run_search(cfg)
    # --trials counts finished trials: measured fully or stopped after the first batch.
    assert summary["complete"] + summary["pruned"] == 14, summary
    assert 0 < summary["sampler_seconds"] < summary["seconds"]  # the sampler's share is measured
    store = Store(storage)
    row = store.get_study("mf")
    frame = store.trials_frame(row)
    assert (frame["state"] == "complete").sum() == summary["complete"]
    study = optuna.load_study(study_name="mf", storage=storage)
    optuna_pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert len(optuna_pruned) == summary["pruned"] == (frame["state"] == "pruned").sum()
    assert summary["pruned"] > 0, "no child was pruned: the gate never acted"
    seeds = [t for t in study.trials if "seed" in t.user_attrs]
    assert seeds and all(t.state == TrialState.COMPLETE for t in seeds)  # seeds are measured fully
    with store.session() as s:
        from studies.models import TrialRow

        rows = s.query(TrialRow).filter_by(study_id=row.id, state="pruned").all()
        for r in rows:
            # Stopped on the first batch because its first-batch KL was above the bar it was given.
            assert r.kl is None and r.timings["windows"] < data_config.n_eval
            assert r.timings["kl_low"] > r.timings["prune_above"]
            assert r.seed is None  # seeds are never pruned
    front = store.front(row)
    assert set(front["trial"]) <= set(frame.loc[frame["state"] == "complete", "trial"])
