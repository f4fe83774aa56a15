"""The same search, front and resume on a real PostgreSQL instead of SQLite."""

import json

from app.cli import main
from studies import Store


def test_search_front_and_resume_on_postgres(postgres, corpus, local_ray, capsys) -> None:
    args = ["search", "--model", "tiny-random-llama", "--dataset", corpus, "--seq-len", "64", "--eval-seqs", "4",
            "--budget", "4.5bpw", "--workers", "2", "--storage", postgres.url, "--study", "pg"]
    assert main(args + ["--trials", "8"]) == 0
    assert main(args + ["--trials", "10"]) == 0
    capsys.readouterr()
    assert main(["front", "pg", "--storage", postgres.url, "--json"]) == 0
    points = json.loads(capsys.readouterr().out)
    store = Store(postgres.url)
    frame = store.trials_frame(store.get_study("pg"))
    assert (frame["state"] == "complete").sum() == 10
    assert [p["trial"] for p in points] == list(store.front(store.get_study("pg"))["trial"])
    assert all(p["bpw"] <= 4.5 for p in points)


def test_search_survives_a_postgres_restart(postgres, corpus, local_ray, caplog) -> None:
    import threading
    import time

    from evaluators.context import DataConfig
    from search.driver import SearchConfig, run_search
    from search.request import SearchRequest

    data = DataConfig(model="tiny-random-llama", dataset=corpus, seq_len=256, n_eval=16, n_calib=2)
    cfg = SearchConfig(SearchRequest.from_data(data, study="restart", budget="4.5bpw", trials=16, workers=2),
                       storage=postgres.url, progress=False)
    store = Store(postgres.url)
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(run_search(cfg)))
    runner.start()
    deadline = time.time() + 120
    while time.time() < deadline:
        study = store.find_study("restart")
        if study is not None and (store.trials_frame(study)["state"] == "complete").sum() >= 2:
            break
        time.sleep(0.2)
    assert runner.is_alive(), "the search ended before the restart"
    postgres.stop()  # the database goes away mid-search...
    time.sleep(3)
    postgres.start()  # ...and comes back
    runner.join(timeout=300)
    assert outcome.get("complete") == 16
    assert any("database unavailable" in r.getMessage() for r in caplog.records)  # the outage was hit
    frame = store.trials_frame(store.get_study("restart"))
    assert (frame["state"] == "complete").sum() == 16 and frame["trial"].is_unique
