"""Measuring policies on other text: `turboquant eval --dataset` and `turboquant front --dataset`."""

from __future__ import annotations

import json
import math
import random

import pandas as pd
import pytest

import search.rescore
from evaluators.context import DataConfig, OtherText
from app.cli import main
from search.rescore import order_agreement
from studies import Store, export_policy

OTHER_WORDS = "river stone market engine copper winter silver paper window garden bridge circuit number".split()


@pytest.fixture(scope="module")
def other_text(tmp_path_factory) -> str:
    """A seeded text with none of the corpus's words."""
    rng = random.Random(7)
    lines = [" ".join(rng.choice(OTHER_WORDS) for _ in range(rng.randint(3, 15))) + "?" for _ in range(3000)]
    path = tmp_path_factory.mktemp("other") / "other.txt"
    path.write_text("\n".join(lines))
    return str(path)


@pytest.fixture(scope="module")
def study(gptq_study) -> tuple[str, str]:
    # gptq in the space: on other text it must still be quantized with the study's calibration windows.
    return gptq_study


@pytest.fixture(scope="module")
def policy_file(study, tmp_path_factory) -> tuple[dict, str]:
    storage, name = study
    store = Store(storage)
    doc = export_policy(store, name, trial=int(store.front(store.get_study(name))["trial"].iloc[0]))
    path = tmp_path_factory.mktemp("pol") / "policy.json"
    path.write_text(json.dumps(doc))
    return doc, str(path)


def _eval_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_on_another_text_differs_and_prints_the_stored_figures_beside(policy_file, other_text, corpus,
                                                                         capsys) -> None:
    doc, path = policy_file
    stored = doc["metrics"]
    other = _eval_json(capsys, path, "--dataset", other_text)
    assert all(math.isfinite(other[k]) for k in ("kl", "ppl", "top1", "logit_err"))
    assert other["kl"] > 0 and abs(other["kl"] - stored["kl"]) > 1e-4
    assert other["bytes"] == stored["bytes"]
    # The study's own text through the same path: its windows, hence its figures, exactly.
    same = _eval_json(capsys, path, "--dataset", corpus)
    assert abs(same["kl"] - stored["kl"]) < 1e-5
    assert main(["eval", path, "--dataset", other_text]) == 0
    lines = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:]}
    assert lines["kl"] == [f"{other['kl']:.6g}", f"{stored['kl']:.6g}"]
    assert lines["ppl"] == [f"{other['ppl']:.6g}", f"{stored['ppl']:.6g}"]


def test_eval_windows_flags_cut_other_windows_and_need_dataset(policy_file, other_text, capsys) -> None:
    _, path = policy_file
    default = _eval_json(capsys, path, "--dataset", other_text)
    fewer = _eval_json(capsys, path, "--dataset", other_text, "--eval-seqs", "2", "--seq-len", "32")
    assert fewer["kl"] != default["kl"]
    assert main(["eval", path, "--eval-seqs", "2"]) == 2
    assert "--dataset" in capsys.readouterr().err


def test_eval_of_a_checkpoint_on_another_text_matches_the_policy(policy_file, other_text, tmp_path, capsys) -> None:
    _, path = policy_file
    assert main(["apply", path, "--out", str(tmp_path / "ckpt")]) == 0
    from_policy = _eval_json(capsys, path, "--dataset", other_text)
    from_checkpoint = _eval_json(capsys, str(tmp_path / "ckpt"), "--dataset", other_text)
    assert abs(from_checkpoint["kl"] - from_policy["kl"]) < 1e-4
    assert from_checkpoint["bytes"] == from_policy["bytes"]


def test_front_on_another_text_is_stored_beside_the_trials_and_reused(study, other_text, capsys,
                                                                       monkeypatch) -> None:
    storage, name = study
    store = Store(storage)
    row = store.get_study(name)
    before = store.trials_frame(row)
    capsys.readouterr()
    assert main(["front", name, "--storage", storage, "--dataset", other_text, "--json"]) == 0
    first = pd.DataFrame(json.loads(capsys.readouterr().out))
    front = store.front(row)
    assert list(first["trial"]) == list(front["trial"]) and len(front) >= 2
    assert all(math.isfinite(v) and v > 0 for v in first["kl_other"])
    assert (first["kl_other"] - first["kl"]).abs().max() > 1e-4
    fingerprint = OtherText.of(other_text, DataConfig.from_dict(row.provenance)).fingerprint
    rows = store.rescores(row, fingerprint)
    assert sorted(rows) == sorted(int(t) for t in front["trial"])  # one row per front point
    assert [rows[int(t)]["kl"] for t in first["trial"]] == list(first["kl_other"])
    pd.testing.assert_frame_equal(store.trials_frame(row), before)  # the trials' own metrics are untouched

    def no_measuring(*_args, **_kwargs):
        raise AssertionError("a second call on the same text measured again")

    monkeypatch.setattr(search.rescore, "Evaluator", no_measuring)
    assert main(["front", name, "--storage", storage, "--dataset", other_text]) == 0
    out = capsys.readouterr().out
    assert "0 point(s) measured now" in out and f"{len(front)} reused" in out
    assert "order by KL:" in out and "Spearman" in out


def test_order_agreement_names_the_pairs_that_swap() -> None:
    frame = pd.DataFrame({"trial": [4, 7, 9], "kl": [0.9, 0.5, 0.1], "kl_other": [1.0, 1.2, 0.2]})
    rho, swaps = order_agreement(frame)
    assert swaps == [(4, 7)]
    assert rho == pytest.approx(0.5)
    same = frame.assign(kl_other=[3.0, 2.0, 1.0])
    assert order_agreement(same) == (pytest.approx(1.0), [])


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 's.db'}"
    server = request.getfixturevalue("postgres")
    with Store(server.url).engine.begin() as conn:  # a clean slate: other tests leave studies behind
        conn.exec_driver_sql("DELETE FROM tq_studies WHERE name = 'rows'")
    return server.url


def test_rescore_rows_are_keyed_by_study_trial_and_text(storage_url) -> None:
    store = Store(storage_url)  # the table is created with the others on a new database
    row = store.create_study(name="rows", model="m", dataset="d", budget_bytes=5 << 31, numel=1 << 33, sampler="s",
                             space={}, provenance={})
    common = dict(dataset="other.txt", seq_len=64, windows=4, ppl=9.0, top1=0.5, logit_err=0.1, seconds=1.0)
    store.record_rescore(row, 3, "fp-a", kl=0.25, **common)
    store.record_rescore(row, 3, "fp-a", kl=0.75, **common)  # the same key again: the first row stays
    store.record_rescore(row, 3, "fp-b", kl=0.5, **common)
    store.record_rescore(row, 4, "fp-a", kl=0.125, **common)
    assert {t: r["kl"] for t, r in store.rescores(row, "fp-a").items()} == {3: 0.25, 4: 0.125}
    assert {t: r["kl"] for t, r in store.rescores(row, "fp-b").items()} == {3: 0.5}
    assert store.rescores(row, "fp-c") == {}
