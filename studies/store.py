"""The study store: studies and trials in SQL through SQLAlchemy (SQLite or PostgreSQL)."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import and_, bindparam, create_engine, event, func, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from studies.migrate import migrate
from studies.models import FRONT_INDEX, Base, RescoreRow, SensitivityRow, StudyRow, TrialRow
from studies.pareto import front_indices
from studies.redact import redact_url, scrub
from studies.results import SensitivityMeasure, TrialResult
from studies.retry import SCHEMA_RACE_SECONDS, with_db_retry

__all__ = ["Store", "StoreError", "NotFoundError", "DEFAULT_STORAGE", "FRONT_COLUMNS", "check_exists", "sqlite_file"]

DEFAULT_STORAGE = "sqlite:///turboquant.db"
FRONT_COLUMNS = ["trial", "bytes", "kv_bytes", "bpw", "kl", "ppl", "top1", "logit_err", "seed"]


# What a front depends on, summarised in one aggregate over the study's complete trials (answered
# from the covering index ``FRONT_INDEX``). Trials are only added or overwritten: an addition changes
# the count and the largest row id; a failed trial recorded again as complete changes the count; a
# complete one re-measured changes the sums of bytes and KL. (Rewriting only its ppl / top1 would go
# unseen until the next write; the driver never rewrites a complete trial.)
_VERSION_COLUMNS = (func.count(TrialRow.id), func.max(TrialRow.id), func.sum(TrialRow.bytes), func.sum(TrialRow.kl))
_COMPLETE = and_(TrialRow.study_id == StudyRow.id, TrialRow.state == "complete")
_FRONT_HEAD = (select(StudyRow.id, StudyRow.budget_bytes, *_VERSION_COLUMNS).select_from(StudyRow)
               .outerjoin(TrialRow, _COMPLETE).where(StudyRow.name == bindparam("name"))
               .group_by(StudyRow.id, StudyRow.budget_bytes))
_FRONT_VERSION = select(*_VERSION_COLUMNS).where(TrialRow.study_id == bindparam("study_id"),
                                                 TrialRow.state == "complete")
_FRONT_ROWS = (select(TrialRow.number, TrialRow.bytes, TrialRow.kv_bytes, TrialRow.bpw, TrialRow.kl, TrialRow.ppl,
                      TrialRow.top1,
                      TrialRow.logit_err, TrialRow.seed)
               .where(TrialRow.study_id == bindparam("study_id"), TrialRow.state == "complete",
                      TrialRow.bytes <= bindparam("limit")))


class StoreError(ValueError):
    """A storage URL that cannot be opened, or a study that does not exist."""


class NotFoundError(StoreError):
    """A study, or a trial of it, that the store does not hold (the API answers 404).

    Its message names only what was asked for; ``hint`` adds, for a person at the command line, the
    storage (password redacted) and the studies it holds. The API answers the message alone: a 404
    must not list every study or say where they are kept.
    """

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets readers (front queries, the service) proceed while the driver writes;
    # busy_timeout turns short lock waits into waits instead of "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``, with SQLite tuned for one writer and many readers."""
    try:
        # A ping per checkout notices a restarted PostgreSQL; a SQLite file cannot go away like that,
        # and the extra round trip is a fifth of a cached front read.
        engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
    except (ArgumentError, ImportError, ValueError) as exc:
        # SQLAlchemy's own message may quote the whole URL, password included.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(scrub(f"cannot use storage URL {redact_url(url)!r}: {reason}", url)) from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL names (``None`` for another database, an in-memory one or a ``file:`` URI)."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:") \
            or parsed.database.startswith("file:") or parsed.query.get("uri"):
        return None
    return Path(parsed.database)


def check_exists(url: str) -> None:
    """Refuses a SQLite URL whose file does not exist: what only reads must not create an empty database.

    Raises:
        StoreError: naming the file (a server database is found, or not, when it is opened).
    """
    path = sqlite_file(url)
    if path is not None and not path.is_file():
        what = "is a folder, not a database file" if path.is_dir() else "does not exist"
        raise StoreError(f"cannot open storage {redact_url(url)}: {path} {what}; give the --storage a search "
                         f"wrote (default {DEFAULT_STORAGE}), or run a search first")


class Store:
    """Reads and writes TurboQuant's tables. Creates them on first use.

    Args:
        url: SQLAlchemy URL, e.g. ``sqlite:///turboquant.db`` or ``postgresql+psycopg://u:p@host/db``.
        create: ``False`` for a reader: a SQLite file that does not exist is refused
            (:func:`check_exists`) instead of created empty.
    """

    def __init__(self, url: str = DEFAULT_STORAGE, *, create: bool = True):
        self.url = url
        self.shown = redact_url(url)  # what messages may say: the password masked
        if not create:
            check_exists(url)
        self.engine = make_engine(url)
        try:
            # Processes opening a new database together race to create the tables ("table
            # tq_studies already exists"): create_all checks first, so a second pass completes.
            with_db_retry(lambda: Base.metadata.create_all(self.engine), "creating the tables",
                          timeout=SCHEMA_RACE_SECONDS, first_wait=0.2)
            # Tables an older version made keep their rows and get today's column types.
            with_db_retry(lambda: migrate(self.engine), "migrating the tables", timeout=SCHEMA_RACE_SECONDS,
                          first_wait=0.2)
        except DBAPIError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
            raise StoreError(scrub(f"cannot open storage {self.shown}: {reason}", url)) from None
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        try:  # databases made before the index existed get it now (create_all skips existing tables)
            FRONT_INDEX.create(self.engine, checkfirst=True)
        except DBAPIError:  # another process created it at the same moment
            pass
        # Fronts by (study id, byte limit): (version, frame, JSON). See :meth:`_front_version`.
        self._fronts: dict[tuple[int, int], tuple[tuple, pd.DataFrame, bytes | None]] = {}
        self._fronts_lock = threading.Lock()

    def session(self) -> Session:
        return self._session()

    # Studies -----------------------------------------------------------------------------------

    def create_study(self, **fields: Any) -> StudyRow:
        with self.session() as s:
            row = StudyRow(**fields)
            s.add(row)
            try:
                s.commit()
            except IntegrityError:
                raise StoreError(f"study {fields.get('name')!r} already exists") from None
            return row

    def find_study(self, name: str) -> StudyRow | None:
        with self.session() as s:
            return s.scalar(select(StudyRow).where(StudyRow.name == name))

    def get_study(self, name: str) -> StudyRow:
        row = self.find_study(name)
        if row is None:
            known = self.study_names()
            hint = f"; known studies: {', '.join(known)}" if known else "; this storage has no studies yet"
            raise NotFoundError(f"no study named {name!r}", f" in {self.shown}{hint}")
        return row

    def study_names(self) -> list[str]:
        with self.session() as s:
            return list(s.scalars(select(StudyRow.name).order_by(StudyRow.id)))

    def studies_frame(self) -> pd.DataFrame:
        """One row per study: name, model, budget, trials done and failed, best feasible KL."""
        with self.session() as s:
            counts = dict(s.execute(select(TrialRow.study_id, func.count())
                                    .where(TrialRow.state == "complete").group_by(TrialRow.study_id)).all())
            failed = dict(s.execute(select(TrialRow.study_id, func.count())
                                    .where(TrialRow.state == "failed").group_by(TrialRow.study_id)).all())
            best = dict(s.execute(select(TrialRow.study_id, func.min(TrialRow.kl))
                                  .where(TrialRow.feasible).group_by(TrialRow.study_id)).all())
            rows = [{"study": r.name, "model": r.model, "budget_bytes": r.budget_bytes,
                     # A budget with a KV cache is no number of bits per weight.
                     "budget_bpw": None if "kv" in (r.space or {}) else round(r.budget_bpw, 3), "sampler": r.sampler,
                     "complete": counts.get(r.id, 0), "failed": failed.get(r.id, 0),
                     "best_kl": best.get(r.id), "created": r.created_at}
                    for r in s.scalars(select(StudyRow).order_by(StudyRow.id))]
        return pd.DataFrame(rows, columns=["study", "model", "budget_bytes", "budget_bpw", "sampler",
                                           "complete", "failed", "best_kl", "created"])

    # Trials ------------------------------------------------------------------------------------

    def record_trial(self, study: StudyRow, number: int, **fields: Any) -> None:
        """Writes (or overwrites) trial ``number`` of ``study``; idempotent, so a retry never duplicates."""
        with self.session() as s:
            row = s.scalar(select(TrialRow).where(TrialRow.study_id == study.id, TrialRow.number == number))
            if row is None:
                row = TrialRow(study_id=study.id, number=number)
                s.add(row)
            for key, value in fields.items():
                setattr(row, key, value)
            if fields.get("state") == "complete":
                row.feasible = row.bytes is not None and row.bytes <= study.budget_bytes
            s.commit()

    def record_result(self, study: StudyRow, number: int, result: TrialResult, *, policy: dict[str, Any],
                      seed: str | None, timings: dict[str, Any]) -> None:
        """Writes a measured trial: ``complete`` with its metrics, or ``pruned`` with bytes and timings."""
        self.record_trial(study, number, state=result.state, policy=policy, bytes=result.bytes, bpw=result.bpw,
                          kv_bytes=result.kv_bytes, kl=result.kl, ppl=result.ppl, top1=result.top1,
                          logit_err=result.logit_err, seed=seed,
                          timings=timings, worker=result.worker)

    def trial(self, study: StudyRow, number: int) -> TrialRow | None:
        with self.session() as s:
            return s.scalar(select(TrialRow).where(TrialRow.study_id == study.id, TrialRow.number == number))

    def trials_frame(self, study: StudyRow) -> pd.DataFrame:
        # Not the policies: on a real model each is tens of kB of JSON, and progress reads this often.
        with self.session() as s:
            rows = s.execute(select(TrialRow.number, TrialRow.state, TrialRow.bytes, TrialRow.kv_bytes, TrialRow.bpw,
                                    TrialRow.kl, TrialRow.ppl, TrialRow.top1, TrialRow.logit_err, TrialRow.feasible,
                                    TrialRow.seed, TrialRow.timings, TrialRow.worker, TrialRow.error)
                             .where(TrialRow.study_id == study.id).order_by(TrialRow.number))
            data = [{"trial": r.number, "state": r.state, "bytes": r.bytes, "kv_bytes": r.kv_bytes, "bpw": r.bpw,
                     "kl": r.kl, "ppl": r.ppl, "top1": r.top1, "logit_err": r.logit_err, "feasible": r.feasible,
                     "seed": r.seed, "seconds": (r.timings or {}).get("seconds"), "worker": r.worker,
                     "error": r.error} for r in rows]
        return pd.DataFrame(data, columns=["trial", "state", "bytes", "kv_bytes", "bpw", "kl", "ppl", "top1",
                                           "logit_err", "feasible", "seed", "seconds", "worker", "error"])

    def front(self, study: StudyRow, budget_bytes: int | None = None) -> pd.DataFrame:
        """The feasible non-dominated points in (bytes, KL), sorted by bytes.

        ``budget_bytes`` narrows the front to a smaller budget than the study's.
        """
        limit = study.budget_bytes if budget_bytes is None else min(budget_bytes, study.budget_bytes)
        with self.engine.connect() as conn:
            version = tuple(conn.execute(_FRONT_VERSION, {"study_id": study.id}).one())
            return self._cached_front(conn, study.id, limit, version)[0].copy()

    def front_json(self, name: str) -> bytes:
        """The study's front as a JSON array of records (``turboquant front --json``), for the API.

        One indexed query finds the study and whether its trials changed since the last call;
        if not, the encoded answer is reused, so a read costs that query and nothing else.
        """
        with self.engine.connect() as conn:
            head = conn.execute(_FRONT_HEAD, {"name": name}).first()
            if head is None:
                self.get_study(name)  # raises, naming the known studies
            return self._cached_front(conn, head[0], head[1], tuple(head[2:]), encode=True)[1]

    def _cached_front(self, conn: Any, study_id: int, limit: int, version: tuple,
                      encode: bool = False) -> tuple[pd.DataFrame, bytes | None]:
        key = (study_id, int(limit))
        hit = self._fronts.get(key)
        if hit is not None and hit[0] == version and (hit[2] is not None or not encode):
            return hit[1], hit[2]
        frame = hit[1] if hit is not None and hit[0] == version else self._compute_front(conn, study_id, limit)
        body = _front_json(frame) if encode else None
        with self._fronts_lock:
            if len(self._fronts) > 256:  # many ad-hoc budgets: start over rather than grow
                self._fronts.clear()
            self._fronts[key] = (version, frame, body)
        return frame, body

    @staticmethod
    def _compute_front(conn: Any, study_id: int, limit: int) -> pd.DataFrame:
        # Only the front's columns of the study's complete trials within the limit, in one query.
        rows = conn.execute(_FRONT_ROWS, {"study_id": study_id, "limit": limit}).all()
        frame = pd.DataFrame(rows, columns=FRONT_COLUMNS)
        if frame.empty:
            return frame
        keep = front_indices(frame["bytes"].to_numpy(dtype=np.float64), frame["kl"].to_numpy(dtype=np.float64))
        return frame.iloc[keep].reset_index(drop=True)

    # Sensitivity ------------------------------------------------------------------------------

    def sensitivity(self, model_fingerprint: str, data_fingerprint: str
                    ) -> dict[tuple[str, str], SensitivityMeasure]:
        """Stored sensitivity measurements: (unit, setting key) -> the pair's measure."""
        with self.session() as s:
            rows = s.scalars(select(SensitivityRow).where(SensitivityRow.model_fingerprint == model_fingerprint,
                                                          SensitivityRow.data_fingerprint == data_fingerprint))
            return {(r.matrix, r.setting): SensitivityMeasure(r.matrix, r.setting, r.kl, r.ppl, r.bytes, r.seconds)
                    for r in rows}

    def record_sensitivity(self, model_fingerprint: str, data_fingerprint: str,
                           rows: list[SensitivityMeasure]) -> None:
        """Adds measurements; the pairs the store holds already are kept as they are."""
        if not rows:
            return
        values = [{"model_fingerprint": model_fingerprint, "data_fingerprint": data_fingerprint, "matrix": r.unit,
                   "setting": r.setting, "kl": r.kl, "ppl": r.ppl, "bytes": r.bytes, "seconds": r.seconds}
                  for r in rows]
        dialect = self.engine.dialect.name
        if dialect in ("sqlite", "postgresql"):
            # Two searches may measure the same pairs at once: the first writer wins, the other's
            # identical numbers are dropped instead of failing on the unique key.
            if dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert
            else:
                from sqlalchemy.dialects.postgresql import insert
            with self.engine.begin() as conn:
                conn.execute(insert(SensitivityRow).on_conflict_do_nothing(), values)
            return
        for value in values:
            with self.session() as s:
                s.add(SensitivityRow(**value))
                try:
                    s.commit()
                except IntegrityError:
                    s.rollback()

    # Re-scores on other text -------------------------------------------------------------------

    def rescores(self, study: StudyRow, data_fingerprint: str) -> dict[int, dict[str, Any]]:
        """The study's trials measured on the text of ``data_fingerprint``: trial -> its metrics there."""
        with self.session() as s:
            rows = s.scalars(select(RescoreRow).where(RescoreRow.study_id == study.id,
                                                      RescoreRow.data_fingerprint == data_fingerprint))
            return {r.trial: {"kl": r.kl, "ppl": r.ppl, "top1": r.top1, "logit_err": r.logit_err,
                              "seconds": r.seconds} for r in rows}

    def record_rescore(self, study: StudyRow, trial: int, data_fingerprint: str, *, dataset: str, seq_len: int,
                       windows: int, **metrics: Any) -> None:
        """Adds one trial's metrics on another text (kl, ppl, top1, logit_err, seconds); the trial's own row
        is not touched, and a row already stored for the same key is kept (equal numbers, measured twice)."""
        with self.session() as s:
            s.add(RescoreRow(study_id=study.id, trial=trial, data_fingerprint=data_fingerprint, dataset=dataset,
                             seq_len=seq_len, windows=windows, **metrics))
            try:
                s.commit()
            except IntegrityError:
                s.rollback()


def _front_json(frame: pd.DataFrame) -> bytes:
    # JSON has no NaN: a missing metric is null, as in the API's other answers.
    records = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
               for r in frame.astype(object).to_dict(orient="records")]
    return json.dumps(records, default=_plain).encode()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")
