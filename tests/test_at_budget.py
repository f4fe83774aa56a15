"""export --budget at any budget: a stored point that uses it, else trials run at it (stored in the study)."""

import json

import pytest

from search.at_budget import FILL, point_at_budget
from app.cli import main
from search.sensitivity import PROXY_VERSION
from studies import Store


@pytest.fixture(scope="module")
def study(tmp_path_factory, corpus, local_ray):
    storage = f"sqlite:///{tmp_path_factory.mktemp('db') / 'b.db'}"
    args = ["search", "--model", "tiny-random-llama", "--dataset", corpus, "--seq-len", "64", "--eval-seqs", "2",
            "--calib-seqs", "2", "--budget", "4.5bpw", "--workers", "2", "--storage", storage, "--study", "b",
            "--bits", "2,3,4,8", "--groups", "32,64", "--sensitivity", "--sensitivity-method", "proxy",
            "--sampler", "evo", "--trials", "24"]
    assert main(args) == 0
    return storage


def _gap(store: Store) -> int:
    """A budget (bytes) inside the study's range whose best stored point uses less than FILL of it."""
    row = store.get_study("b")
    frame = store.trials_frame(row)
    sizes = sorted(int(b) for b in frame.loc[frame["state"] == "complete", "bytes"])
    gaps = [(hi - lo, lo, hi) for lo, hi in zip(sizes, sizes[1:]) if hi > lo / FILL + 2]
    _, lo, hi = max(gaps)
    return (lo + hi) // 2


def test_a_budget_without_a_point_is_filled_by_trials_at_it(study, tmp_path, capsys) -> None:
    store = Store(study)
    row = store.get_study("b")
    budget = _gap(store)
    before = store.trials_frame(row)
    proxy_rows = len(store.sensitivity(row.provenance["model_fingerprint"],
                                       f"{row.provenance['data_fingerprint']}/{PROXY_VERSION}"))
    out = tmp_path / "p.json"
    assert main(["export", "b", "--storage", study, "--budget", str(budget), "--out", str(out),
                 "--refine-trials", "4"]) == 0
    doc = json.loads(out.read_text())
    after = store.trials_frame(row)
    assert len(after) == len(before) + 4  # the trials at the budget are the study's own (no seed was left)
    assert FILL * budget <= doc["metrics"]["bytes"] <= budget
    new = after[~after["trial"].isin(before["trial"])]
    assert doc["provenance"]["trial"] in set(new["trial"])
    # The table was the stored one: no prediction was added.
    assert len(store.sensitivity(row.provenance["model_fingerprint"],
                                 f"{row.provenance['data_fingerprint']}/{PROXY_VERSION}")) == proxy_rows > 0
    # The same budget again: the point is stored now, nothing runs.
    assert point_at_budget(study, "b", budget, trials=4, progress=False) == doc["provenance"]["trial"]
    assert len(store.trials_frame(row)) == len(after)


def test_no_refine_gives_the_stored_best_and_runs_nothing(study, tmp_path) -> None:
    store = Store(study)
    row = store.get_study("b")
    budget = _gap(store)
    n = len(store.trials_frame(row))
    out = tmp_path / "p.json"
    assert main(["export", "b", "--storage", study, "--budget", str(budget), "--out", str(out),
                 "--refine-trials", "0"]) == 0
    doc = json.loads(out.read_text())
    assert doc["metrics"]["bytes"] <= budget and len(store.trials_frame(row)) == n
    best = store.front(row, budget).iloc[-1]
    assert doc["provenance"]["trial"] == int(best["trial"])
