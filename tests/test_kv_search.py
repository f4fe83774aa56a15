"""Searching the KV cache with the weights: the space's KV units, the budget of weights + cache, the study."""

from __future__ import annotations

import json

import pytest
import torch

import quant
from evaluators.errors import UserError
from evaluators.kv_attention import attention_modules
from quant.kv import FLOAT_KV, KVSetting, kv_unit, pack_kv
from app.cli import main
from search.kv_space import KVSpace, kv_candidates
from search.request import SearchRequest
from search.space import SearchSpace
from studies import Store
from tests.test_search import resume_keeps_every_trial

CONTEXT = 512


@pytest.fixture(scope="module")
def model(evaluator):
    evaluator.restore_float()  # the shared evaluator: a test before may have left a policy applied
    return evaluator.model


@pytest.fixture(scope="module")
def space(model) -> SearchSpace:
    kv = KVSpace(attention_modules(model), context=CONTEXT, batch=2)
    return SearchSpace(quant.weight_matrices(model), (2, 4), (32,), ("rtn",), "block", kv=kv)


def test_cache_bytes_are_the_packed_buffers_at_the_context(space: SearchSpace, model) -> None:
    kv = space.kv
    for unit, ladder in kv.ladders.items():
        info = kv.modules[kv.units[unit][0]]
        x = torch.randn(kv.batch, info.kv_heads, CONTEXT, info.head_dim, dtype=torch.float16)
        sizes = [kv.unit_nbytes(unit, s) for s in ladder]
        assert sizes == sorted(sizes)  # a ladder climbs in bytes
        for s in ladder:
            assert kv.unit_nbytes(unit, s) == pack_kv(x, s).nbytes, (unit, s.describe())
    # A policy's bytes: its packed weights plus its cache.
    policy = space.expand({u: space.unit_settings(u)[-1] for u in space.unit_names})
    weights = quant.float_weights(model)
    packed = sum(quant.get_format(s.format).quantize(weights[m], s).nbytes for m, s in policy.settings.items())
    assert space.nbytes(policy) == packed + kv.nbytes(policy.kv)
    assert kv.nbytes({}) == kv.float_bytes() == sum(kv.unit_nbytes(u, FLOAT_KV) for u in kv.units)


def test_kv_units_round_trip_through_params_and_indices(space: SearchSpace) -> None:
    assert len(space.unit_names) == len(space.units) + 2 * len(space.kv.modules)
    rungs = {u: i % space.levels(u) for i, u in enumerate(space.unit_names)}
    per_unit = {u: space.unit_settings(u)[r] for u, r in rungs.items()}
    policy = space.expand(per_unit)
    params = space.params(policy)
    assert space.covers(params)
    rows = space.indices(params)
    assert [int(r[0]) for r in rows[len(space.units):]] == [rungs[u] for u in space.kv.units]
    assert space.from_indices(rows) == params
    for module, (k, v) in policy.kv.items():
        assert (k, v) == (per_unit[kv_unit(module, "k")], per_unit[kv_unit(module, "v")])
    # The policy document keeps the cache settings, and reads back the same.
    assert quant.Policy.from_dict(json.loads(json.dumps(policy.to_dict()))).kv == policy.kv


def test_candidates_keep_keys_only_settings_off_the_values() -> None:
    c = kv_candidates(("turbo+qjl", "rtn_channel", "rtn_token", "float"), (2, 4))
    assert KVSetting("turbo", 2, qjl=True) in c["k"] and not any(s.qjl for s in c["v"])
    assert not any(s.format == "rtn_channel" for s in c["v"]) and FLOAT_KV in c["v"]
    with pytest.raises(UserError, match="no setting for the values"):
        kv_candidates(("rtn_channel",), (4,))
    with pytest.raises(UserError, match="unknown KV cache format"):
        kv_candidates(("int4",), (4,))


@pytest.mark.parametrize("options, says", [
    (dict(budget="4bpw", context=512), "give it as a size"),
    (dict(budget="100KB", context=512, kv_formats=["zip"]), "unknown KV cache format"),
    (dict(budget="100KB", context=512, kv_bits=[5]), "KV cache bits must be among"),
    (dict(budget="100KB", context=0), "greater than or equal to 1"),
])
def test_bad_cache_options_are_refused_before_loading(options: dict, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        SearchRequest(**options)


@pytest.fixture(scope="module")
def kv_study(tmp_path_factory, corpus, local_ray) -> tuple[str, list[str]]:
    storage = f"sqlite:///{tmp_path_factory.mktemp('kvdb') / 'kv.db'}"
    args = ["search", "--model", "tiny-random-llama", "--dataset", corpus, "--seq-len", "64", "--eval-seqs", "4",
            "--calib-seqs", "4", "--bits", "2,4", "--groups", "32", "--formats", "rtn", "--budget", "250KB",
            "--context", str(CONTEXT), "--batch", "2", "--kv-bits", "2,4", "--kv-formats", "turbo,rtn_token,float",
            "--sensitivity-method", "measured", "--workers", "2", "--storage", storage, "--study", "kv"]
    assert main(args + ["--trials", "10"]) == 0
    return storage, args


def test_a_kv_study_counts_weights_and_cache_and_its_front_says_so(kv_study, evaluator, capsys) -> None:
    storage, _ = kv_study
    store = Store(storage)
    row = store.get_study("kv")
    assert row.space["kv"] == {"formats": ["turbo", "rtn_token", "float"], "bits": [2, 4], "context": CONTEXT,
                               "batch": 2}
    # Plots (CLI and API) title the budget by its size: it counts the cache, so it is no bits per weight.
    assert row.budget_label == f"{row.budget_bytes / 1e6:.1f} MB with the cache"
    kv = KVSpace(attention_modules(evaluator.model), ("turbo", "rtn_token", "float"), (2, 4), CONTEXT, 2)
    capsys.readouterr()
    assert main(["front", "kv", "--storage", storage, "--json"]) == 0
    points = json.loads(capsys.readouterr().out)
    assert points and all(p["bytes"] <= row.budget_bytes for p in points)
    with store.session() as s:
        from studies.models import TrialRow

        trials = {t.number: t for t in s.query(TrialRow).filter_by(study_id=row.id, state="complete")}
    for p in points:
        trial = trials[p["trial"]]
        policy = quant.Policy.from_dict(trial.policy)
        assert set(policy.kv) == set(kv.modules)
        weights = policy.expected_nbytes(quant.weight_matrices(evaluator.model))
        assert p["kv_bytes"] == kv.nbytes(policy.kv) and p["bytes"] == weights + p["kv_bytes"]
        assert p["bpw"] == pytest.approx(8.0 * weights / row.numel)
    seeds = {t.seed for t in trials.values() if t.seed}
    assert any(s.startswith("dp:") for s in seeds) and any("+kv-" in s for s in seeds)


def test_a_float_cache_reproduces_the_weight_only_kl_exactly(kv_study, evaluator) -> None:
    """16-bit KV is today's evaluation, bit for bit: the same weights with the cache in float."""
    storage, _ = kv_study
    store = Store(storage)
    row = store.get_study("kv")
    with store.session() as s:
        from studies.models import TrialRow

        trial = s.query(TrialRow).filter_by(study_id=row.id, state="complete").first()
    policy = quant.Policy.from_dict(trial.policy)
    floated = quant.Policy(policy.settings, kv={m: (FLOAT_KV, FLOAT_KV) for m in policy.kv})
    with_float = evaluator.evaluate(floated)
    without = evaluator.evaluate(quant.Policy(policy.settings))
    assert with_float["kl"] == without["kl"] and with_float["ppl"] == without["ppl"]
    assert evaluator.evaluate(policy)["kl"] == pytest.approx(trial.kl, rel=1e-4, abs=1e-7)
    evaluator.restore_float()  # the shared model: its weights and its cache back to float


def test_a_resumed_kv_study_keeps_its_space_and_trials(kv_study) -> None:
    storage, args = kv_study
    resume_keeps_every_trial(storage, "kv", args, 12, columns=("kl", "bytes", "kv_bytes"))
    store = Store(storage)
    other = [a if a != str(CONTEXT) else "1024" for a in args]
    assert main(other + ["--trials", "13"]) == 2  # another context is another search: refused
    assert (store.trials_frame(store.get_study("kv"))["state"] == "complete").sum() == 12


def test_an_exported_kv_point_carries_its_cache_and_reproduces_its_kl(kv_study, tmp_path, capsys) -> None:
    storage, _ = kv_study
    out = tmp_path / "kv.json"
    assert main(["export", "kv", "--storage", storage, "--budget", "250KB", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["kv"] and doc["metrics"]["kv_context"] == CONTEXT and doc["metrics"]["kv_batch"] == 2
    weights = doc["metrics"]["bytes"] - doc["metrics"]["kv_bytes"]
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["bytes"] == weights  # eval counts the packed weights, and the cache over one window
    assert abs(measured["kl"] - doc["metrics"]["kl"]) < 1e-4


def test_the_default_proxy_covers_the_kv_units_and_is_stored(tmp_path, corpus, local_ray, data_config,
                                                              caplog) -> None:
    from search.driver import SearchConfig, run_search
    from search.sensitivity import KV_PROXY_VERSION

    storage = f"sqlite:///{tmp_path / 'p.db'}"
    request = SearchRequest.from_data(data_config, study="p", budget="200KB", trials=4, workers=1, bits=[2, 4],
                                      groups=[32], formats=["rtn"], context=256, kv_bits=[2, 4])
    with caplog.at_level("WARNING", logger="search.driver"):
        run_search(SearchConfig(request, storage=storage, progress=False))
    assert "counted at 256 tokens but scored on windows of 64" in caplog.text  # --seq-len shorter than --context
    store = Store(storage)
    row = store.get_study("p")
    stored = store.sensitivity(row.provenance["model_fingerprint"],
                               f"{row.provenance['data_fingerprint']}/{KV_PROXY_VERSION}")
    kv = KVSpace(attention_modules(data_config.load()[0].model), bits=(2, 4), context=256)
    # Every KV unit at every quantized setting of its ladder: keys take rtn_channel too, values do not.
    assert {(u, s.key()) for u, ladder in kv.ladders.items() for s in ladder if not s.is_float} == set(stored)
    seeds = [t.seed for t in store.trials_frame(row).itertuples() if t.seed]
    assert any(s.startswith("dp:") and s.endswith("MB") for s in seeds)


def test_the_proxy_and_reference_on_a_worker_give_the_drivers_table_and_trials(tmp_path, data_config,
                                                                              local_ray) -> None:
    """Where the workers run on GPUs the reference and the proxy are computed on one of them (forced here on
    the CPU): the same predictions, and the same trials' KL."""
    from search.driver import SearchConfig, run_search
    from search.sensitivity import KV_PROXY_VERSION, PROXY_VERSION

    tables, trials = [], []
    for on_worker in (False, True):
        storage = f"sqlite:///{tmp_path / f'w{on_worker}.db'}"
        request = SearchRequest.from_data(data_config, study="w", budget="200KB", trials=2, workers=1, bits=[2, 4],
                                          groups=[32], formats=["rtn", "gptq"], context=256, kv_bits=[2, 4])
        run_search(SearchConfig(request, storage=storage, progress=False, on_workers=on_worker))
        store = Store(storage)
        row = store.get_study("w")
        fp, dfp = row.provenance["model_fingerprint"], row.provenance["data_fingerprint"]
        tables.append({**store.sensitivity(fp, f"{dfp}/{PROXY_VERSION}"),
                       **store.sensitivity(fp, f"{dfp}/{KV_PROXY_VERSION}")})
        trials.append({t.seed: t.kl for t in store.trials_frame(row).itertuples()})
    assert trials[0].keys() == trials[1].keys() and len(trials[0]) == 2  # the same two seeds, in order
    for seed, kl in trials[0].items():
        assert trials[1][seed] == pytest.approx(kl, rel=1e-4), seed
    here, there = tables
    assert set(here) == set(there) and any(":kv_" in unit for unit, _ in here)
    for pair, row in here.items():  # the worker runs on fewer torch threads: sums in another order
        assert there[pair].kl == pytest.approx(row.kl, rel=1e-3, abs=1e-9), pair
        assert there[pair].bytes == row.bytes
