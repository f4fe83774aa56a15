"""The same search, front and resume on a real PostgreSQL instead of SQLite."""

import json

from search.cli import main
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
