"""End to end through the CLI: search into SQLite with 2 Ray workers, front, resume, export, eval."""

import json
import logging

import pytest

from app.cli import main
from studies import Store


@pytest.fixture(scope="module")
def searched(tmp_path_factory, corpus, local_ray):
    db = tmp_path_factory.mktemp("db") / "t.db"
    storage = f"sqlite:///{db}"
    args = ["search", "--model", "tiny-random-llama", "--dataset", corpus, "--seq-len", "64", "--eval-seqs", "4",
            "--calib-seqs", "4", "--budget", "4.5bpw", "--workers", "2", "--storage", storage, "--study", "t"]
    assert main(args + ["--trials", "12"]) == 0
    return storage, args


def test_front_points_fit_the_budget_and_do_not_dominate_each_other(searched, capsys) -> None:
    storage, _ = searched
    capsys.readouterr()
    assert main(["front", "t", "--storage", storage, "--json"]) == 0
    points = json.loads(capsys.readouterr().out)
    assert points and all(p["bpw"] <= 4.5 + 1e-9 for p in points)
    for a in points:
        for b in points:
            assert not (b["bytes"] <= a["bytes"] and b["kl"] <= a["kl"] and b != a)
    assert {"trial", "bytes", "bpw", "kl", "ppl", "top1"} <= set(points[0])
    frame = Store(storage).trials_frame(Store(storage).get_study("t"))
    assert (frame["state"] == "complete").sum() == 12


def resume_keeps_every_trial(storage: str, study: str, args: list[str], trials: int,
                             columns: tuple[str, ...] = ("kl", "bytes")) -> None:
    """Resumes ``study`` (its search command ``args``) up to ``trials``: it gets there, and every trial it
    had keeps its ``columns``."""
    store = Store(storage)
    before = store.trials_frame(store.get_study(study))
    assert main(args + ["--trials", str(trials)]) == 0
    after = store.trials_frame(store.get_study(study))
    assert (after["state"] == "complete").sum() == trials
    kept = after.set_index("trial").loc[before["trial"]]
    for column in columns:
        assert list(kept[column]) == list(before[column]), column


def test_resume_keeps_every_finished_trial(searched) -> None:
    storage, args = searched
    resume_keeps_every_trial(storage, "t", args, 15)


def test_exported_policy_reproduces_its_kl(searched, tmp_path, capsys) -> None:
    storage, _ = searched
    out = tmp_path / "policy.json"
    assert main(["export", "t", "--storage", storage, "--budget", "4.0bpw", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["metrics"]["bpw"] <= 4.0 and doc["provenance"]["study"] == "t"
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert abs(measured["kl"] - doc["metrics"]["kl"]) < 1e-4
    assert measured["bytes"] == doc["metrics"]["bytes"]


def test_a_point_exported_as_a_checkpoint_holds_the_weights_measured(searched, tmp_path, capsys) -> None:
    import quant
    from studies import Store

    storage, _ = searched
    store = Store(storage)
    best = store.front(store.get_study("t")).iloc[-1]
    out = tmp_path / "ckpt"
    assert main(["export", "t", "--storage", storage, "--trial", str(int(best["trial"])), "--format", "checkpoint",
                 "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    packed, _, _ = quant.read_packed_tensors(out)
    assert sum(p.nbytes for p in packed.values()) == int(best["bytes"])  # the bytes the search counted
    assert main(["eval", str(out), "--json"]) == 0  # the folder, scored on the data the search measured on
    measured = json.loads(capsys.readouterr().out)
    assert abs(measured["kl"] - float(best["kl"])) < 1e-4


@pytest.mark.parametrize("argv, message", [
    (["search", "--model", "nope-model", "--budget", "3bpw"], "unknown model 'nope-model'"),
    (["search", "--model", "tiny-random-llama", "--budget", "3bitz"], "malformed budget '3bitz'"),
    (["search", "--model", "tiny-random-llama", "--budget", "1.0bpw"], "below the smallest allowed policy"),
    (["search", "--model", "tiny-random-llama", "--budget", "3bpw", "--dataset", "/no/such.txt"], "not found"),
    (["search", "--model", "tiny-random-llama", "--budget", "3bpw", "--sampler", "magic"], "unknown sampler"),
    (["front", "nope"], "does not exist"),  # a reader never creates the database it was pointed at
    (["studies", "--storage", "sqlite:////no/such/dir/x.db"], "cannot open storage"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, corpus, tmp_path, capsys) -> None:
    if "--dataset" not in argv and argv[0] == "search":
        argv = argv + ["--dataset", corpus, "--seq-len", "64", "--eval-seqs", "2"]
    if "--storage" not in argv:
        argv = argv + ["--storage", f"sqlite:///{tmp_path}/x.db"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("error: ")


def test_mismatched_or_malformed_policy_file_is_refused(searched, tmp_path, capsys) -> None:
    storage, _ = searched
    out = tmp_path / "p.json"
    main(["export", "t", "--storage", storage, "--trial", "0", "--out", str(out)])
    doc = json.loads(out.read_text())
    doc["matrices"]["model.layers.7.mlp.up_proj"] = doc["matrices"].pop("model.layers.0.mlp.up_proj")
    out.write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["eval", str(out)]) == 2
    assert "does not match the model" in capsys.readouterr().err
    out.write_text("{")
    assert main(["eval", str(out)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_search_that_cannot_fit_in_memory_is_refused_with_the_estimate(corpus, tmp_path, capsys) -> None:
    argv = ["search", "--model", "tiny-random-llama", "--dataset", corpus, "--seq-len", "64", "--budget", "4bpw",
            "--workers", "2", "--memory-limit", "1MB", "--storage", f"sqlite:///{tmp_path}/m.db"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "GiB is available" in err


def test_sensitivity_seeds_are_enqueued_when_asked(corpus, local_ray, tmp_path, caplog) -> None:
    storage = f"sqlite:///{tmp_path}/s.db"
    argv = ["search", "--model", "tiny-random-llama", "--dataset", corpus, "--seq-len", "64", "--eval-seqs", "4",
            "--budget", "3.5bpw", "--bits", "2,4", "--groups", "32", "--workers", "2", "--trials", "6",
            "--sampler", "evo", "--sensitivity", "--sensitivity-method", "measured", "--storage", storage,
            "--study", "sens"]  # measured on the workers
    with caplog.at_level(logging.INFO, logger="search.driver"):
        assert main(argv) == 0
    assert "evo draws its moves by the sensitivity table" in caplog.text
    store = Store(storage)
    frame = store.trials_frame(store.get_study("sens"))
    solved = frame[frame["seed"].fillna("").str.startswith(("dp:", "greedy:"))]
    assert len(solved) >= 1 and (solved["bpw"] <= 3.5 + 1e-9).all()
    caplog.clear()  # resumed: the table is reused, evo guided again, no seed enqueued twice
    with caplog.at_level(logging.INFO, logger="search.driver"):
        assert main([*argv[:argv.index("--trials") + 1], "9", *argv[argv.index("--trials") + 2:]]) == 0
    assert "0 pairs measured" in caplog.text and "evo draws its moves by the sensitivity table" in caplog.text
    again = store.trials_frame(store.get_study("sens"))
    assert len(again) >= 9 and not again["seed"].dropna().duplicated().any()  # queued seeds run once
