import json
import shutil
import sqlite3
import uuid
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from studies import SensitivityMeasure, Store, StoreError, export_policy, hypervolume, non_dominated
from studies.pareto import front_indices


def _study(store: Store, name: str = "s", budget: int = 1000):
    return store.create_study(name=name, model="m", dataset="d", budget_bytes=budget, numel=2000,
                              sampler="nsga2", space={}, provenance={"model": "m"})


def test_front_is_feasible_non_dominated_and_sorted(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path}/s.db")
    study = _study(store)
    points = [(0, 900, 0.5), (1, 800, 0.7), (2, 900, 0.4), (3, 1200, 0.01), (4, 700, 0.9), (5, 850, 0.8)]
    for number, nbytes, kl in points:
        store.record_trial(study, number, state="complete", policy={"matrices": {}}, bytes=nbytes,
                           bpw=8 * nbytes / 2000, kl=kl)
    store.record_trial(study, 6, state="failed", policy={}, error="boom")
    front = store.front(study)
    assert list(front["trial"]) == [4, 1, 2]  # 3 is over budget; 0 and 5 are dominated
    assert list(front["bytes"]) == sorted(front["bytes"])
    assert list(store.front(study, budget_bytes=850)["trial"]) == [4, 1]
    frame = store.studies_frame()
    assert frame.loc[0, "complete"] == 6 and frame.loc[0, "failed"] == 1 and frame.loc[0, "best_kl"] == 0.4


def test_recording_a_trial_twice_overwrites(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path}/s.db")
    study = _study(store)
    store.record_trial(study, 0, state="failed", policy={}, error="x")
    store.record_trial(study, 0, state="complete", policy={}, bytes=10, bpw=0.04, kl=0.1)
    assert len(store.trials_frame(study)) == 1 and store.trial(study, 0).feasible


def test_export_picks_the_best_point_within_budget(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path}/s.db")
    study = _study(store)
    for number, nbytes, kl in [(0, 500, 0.5), (1, 900, 0.2)]:
        store.record_trial(study, number, state="complete", policy={"format_version": 1, "matrices": {"a": {}}},
                           bytes=nbytes, bpw=8 * nbytes / 2000, kl=kl, ppl=2.0, top1=0.9, logit_err=0.1)
    doc = export_policy(store, "s", budget_bytes=600)
    assert doc["provenance"]["trial"] == 0 and doc["metrics"]["kl"] == 0.5 and doc["model"] == "m"
    assert export_policy(store, "s", trial=1)["metrics"]["bytes"] == 900
    with pytest.raises(StoreError, match="no finished trial within 100 bytes"):
        export_policy(store, "s", budget_bytes=100)
    with pytest.raises(StoreError, match="no complete trial 7"):
        export_policy(store, "s", trial=7)


def test_unknown_study_and_bad_url_are_named(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path}/s.db")
    _study(store, "known")
    with pytest.raises(StoreError, match="no study named 'nope'") as refused:
        store.get_study("nope")
    # The message (what the API answers) names neither the storage nor the other studies; the CLI's hint does.
    assert str(refused.value) == "no study named 'nope'"
    assert refused.value.hint == f" in sqlite:///{tmp_path}/s.db; known studies: known"
    with pytest.raises(StoreError, match="cannot"):
        Store("notadb://x")
    with pytest.raises(StoreError, match="cannot open storage"):
        Store(f"sqlite:///{tmp_path}/missing/dir/s.db")


def test_non_dominated_and_hypervolume_known_answers() -> None:
    front = non_dominated([(1, 3, "a"), (2, 2, "b"), (2, 1, "c"), (3, 2, "d"), (4, 0.5, "e")])
    assert [p[2] for p in front] == ["a", "c", "e"]
    # Rectangles: (5-1)*(4-3) + (5-2)*(3-1) + (5-4)*(1-0.5) = 4 + 6 + 0.5
    assert hypervolume([(p[0], p[1]) for p in front], (5, 4)) == pytest.approx(10.5)


@settings(max_examples=200, deadline=None)
@given(points=st.lists(st.tuples(st.integers(0, 20), st.sampled_from([0.0, 0.5, 1.0, 2.0]) | st.floats(0, 5)),
                       max_size=40))
def test_vectorized_front_matches_the_reference(points) -> None:
    reference = [p[2] for p in non_dominated((b, k, i) for i, (b, k) in enumerate(points))]
    indices = front_indices(np.array([p[0] for p in points]), np.array([p[1] for p in points]))
    assert list(indices) == reference


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/s.db"
    return request.getfixturevalue("postgres").url  # a real server on loopback (tests/pg.py)


def test_cached_front_follows_every_write(storage_url) -> None:
    reader, writer = Store(storage_url), Store(storage_url)  # as the service and a driver in another process
    name = f"cache-{uuid.uuid4().hex[:8]}"  # the PostgreSQL database is shared with other tests
    study = _study(writer, name)
    writer.record_trial(study, 0, state="complete", policy={}, bytes=900, bpw=3.6, kl=0.5, ppl=2.0)
    assert [p["trial"] for p in json.loads(reader.front_json(name))] == [0]
    assert reader.front_json(name) is reader.front_json(name)  # nothing changed: the cached bytes themselves
    writer.record_trial(study, 1, state="complete", policy={}, bytes=800, bpw=3.2, kl=0.4)  # dominates 0
    points = json.loads(reader.front_json(name))
    assert [p["trial"] for p in points] == [1] and points[0]["ppl"] is None
    writer.record_trial(study, 1, state="complete", policy={}, bytes=950, bpw=3.8, kl=0.1)  # overwritten
    assert [p["trial"] for p in json.loads(reader.front_json(name))] == [0, 1]
    writer.record_trial(study, 2, state="failed", policy={}, error="boom")
    assert json.loads(reader.front_json(name)) == reader.front(reader.get_study(name)).replace(
        {np.nan: None}).to_dict(orient="records")
    with pytest.raises(StoreError, match="no study named 'nope'"):
        reader.front_json("nope")


# A database written before the byte columns were 64-bit (tests/data, made by commit 65c2f6d's code).
V1 = Path(__file__).parent / "data"
BIG = 7_000_000_000  # a 7B model's bytes at 8 bits: past 2**32


def test_old_sqlite_database_opens_keeps_its_trials_and_holds_64_bit_counts(tmp_path) -> None:
    path = tmp_path / "v1.db"
    shutil.copy(V1 / "studies_v1.db", path)
    with sqlite3.connect(path) as con:  # the file really has the old 32-bit-era column types
        ddl = con.execute("SELECT sql FROM sqlite_master WHERE name = 'tq_trials'").fetchone()[0]
    assert "bytes INTEGER" in ddl and "kv_bytes" not in ddl
    store = Store(f"sqlite:///{path}")
    from studies.migrate import missing_columns

    assert missing_columns(store.engine) == []  # the KV cache's column, added to the old table
    old = store.get_study("old")
    frame = store.trials_frame(old)
    assert frame["kv_bytes"].isna().all()  # trials of a weight-only search count no cache
    assert list(frame["trial"]) == [0, 1, 2, 3] and list(frame["bytes"].iloc[:3]) == [40_000, 45_000, 50_000]
    assert list(store.front(old)["trial"]) == [0, 1, 2]  # budget 60 000: every complete trial fits
    assert store.sensitivity("m", "d")[("a", "rtn:4:32")].bytes == 1234
    # SQLite's INTEGER is 64-bit already: counts past 2**32 round-trip exactly in the old file.
    big = store.create_study(name="big", model="m", dataset="d", budget_bytes=2 * BIG, numel=BIG, sampler="nsga2",
                             space={}, provenance={})
    store.record_trial(big, 0, state="complete", policy={}, bytes=BIG + 1, bpw=8.0, kl=0.1)
    store.record_sensitivity("m", "d", [SensitivityMeasure("b", "rtn:4:32", kl=0.1, ppl=2.0, bytes=BIG + 3,
                                                           seconds=0.1)])
    again = Store(f"sqlite:///{path}")
    row = again.get_study("big")
    assert (row.budget_bytes, row.numel) == (2 * BIG, BIG)
    assert again.trial(row, 0).bytes == BIG + 1 and again.trial(row, 0).feasible
    assert list(again.front(row)["bytes"]) == [BIG + 1]
    assert again.sensitivity("m", "d")[("b", "rtn:4:32")].bytes == BIG + 3


def test_old_postgres_database_is_widened_and_keeps_its_rows(postgres) -> None:
    from sqlalchemy import create_engine, text

    from studies.migrate import narrow_columns

    name = f"v1_{uuid.uuid4().hex[:8]}"
    admin = create_engine(postgres.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    url = postgres.url.rsplit("/", 1)[0] + "/" + name
    engine = create_engine(url)
    with engine.begin() as conn:  # today's tables as the old code wrote them, with one study and trial
        for statement in (V1 / "schema_v1_postgresql.sql").read_text().split(";"):
            if statement.strip():
                conn.execute(text(statement))
        conn.execute(text("INSERT INTO tq_studies (name, model, dataset, budget_bytes, numel, sampler, space, "
                          "provenance, created_at) VALUES ('old', 'm', 'd', 60000, 100000, 'nsga2', '{}', '{}', now())"))
        conn.execute(text("INSERT INTO tq_trials (study_id, number, state, policy, bytes, bpw, kl, feasible, "
                          "timings, created_at) VALUES (1, 0, 'complete', '{}', 50000, 4.0, 0.2, true, '{}', now())"))
    assert len(narrow_columns(engine)) == 4
    with pytest.raises(Exception, match="out of range"):  # what the old schema did with a 7B model
        with engine.begin() as conn:
            conn.execute(text(f"UPDATE tq_trials SET bytes = {BIG}"))
    store = Store(url)
    from studies.migrate import missing_columns

    assert narrow_columns(engine) == [] and missing_columns(engine) == []
    old = store.get_study("old")
    assert list(store.front(old)["trial"]) == [0] and store.trial(old, 0).bytes == 50_000
    store.record_trial(old, 1, state="complete", policy={}, bytes=BIG, bpw=8.0, kl=0.1)
    assert Store(url).trial(old, 1).bytes == BIG
    engine.dispose()


def test_storage_urls_are_shown_without_their_password() -> None:
    from studies import redact_url, scrub

    assert redact_url("postgresql+psycopg://user:secret@host/db") == "postgresql+psycopg://user:***@host/db"
    assert redact_url("postgresql://u:p%40ss@h:5432/d") == "postgresql://u:***@h:5432/d"
    assert redact_url("sqlite:///x.db") == "sqlite:///x.db"
    assert redact_url("nodb://admin:hunter2@h/db") == "nodb://admin:***@h/db"  # not a dialect SQLAlchemy has
    assert redact_url("postgresql+psycopg://u:hunter2@:::/db") == "postgresql+psycopg://u:***@:::/db"  # unparsable
    url = "postgresql+psycopg://u:hunter2@h/db"
    assert scrub(f"failed on {url}: password hunter2 rejected", url) == \
        "failed on postgresql+psycopg://u:***@h/db: password *** rejected"


def test_a_store_url_with_a_password_is_never_in_its_errors(tmp_path) -> None:
    for url in ["nodb://admin:hunter2@h/db", "postgresql+psycopg://u:hunter2@:::/db",
                "postgresql+psycopg://u:hunter2@127.0.0.1:1/db"]:
        with pytest.raises(StoreError) as refused:
            Store(url)
        assert "hunter2" not in str(refused.value) and "***" in str(refused.value)
    with pytest.raises(StoreError) as refused:  # SQLite takes no password; its message quotes the URL
        Store(f"sqlite+pysqlite://u:hunter2@/{tmp_path}/s.db")
    assert "hunter2" not in str(refused.value) and len(str(refused.value).splitlines()) == 1


def test_a_reader_never_creates_a_database(tmp_path) -> None:
    from studies import check_exists

    url = f"sqlite:///{tmp_path}/none.db"
    with pytest.raises(StoreError, match="none.db does not exist"):
        Store(url, create=False)
    with pytest.raises(StoreError, match="is a folder"):
        check_exists(f"sqlite:///{tmp_path}")
    assert list(tmp_path.iterdir()) == []
    check_exists("sqlite://")  # in memory: nothing to find
    check_exists("postgresql+psycopg://u:p@h/db")  # a server says itself whether it has the database
    Store(url)  # a writer creates it
    assert Store(url, create=False).study_names() == []
