"""What is out with a worker (a trial's :class:`Job`, another :class:`Task`), and a trial's outcome
written twice, store first: the study store (the record) and Optuna (the sampler).

A crash between the two loses nothing: each result is stored before it is told to Optuna, and
:func:`reconcile` at the next start tells Optuna what the store already holds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from studies import Store, TrialResult
from studies.retry import DB_ERRORS, with_db_retry

__all__ = ["Failed", "Job", "RETRY_ON", "Task", "record_result", "record_failure", "reconcile"]

log = logging.getLogger(__name__)
# Optuna wraps database failures in its own error; both mean "try again shortly".
RETRY_ON = DB_ERRORS + (optuna.exceptions.StorageInternalError,)


def _db(fn, what: str):
    return with_db_retry(fn, what, retry_on=RETRY_ON)


@dataclass
class Job:
    """A trial out with a worker."""

    trial: optuna.Trial
    policy: dict[str, Any]
    worker: int  # index of the worker slot measuring it
    prune_above: float | None = None  # multi-fidelity bar for the first batch (None: measure fully)
    attempts: int = 1
    started: float = field(default_factory=time.perf_counter)

    @property
    def seed(self) -> str | None:
        """How an enqueued trial was made (e.g. ``uniform:rtn:4:32``, ``dp:3.00bpw``); None if sampled."""
        return self.trial.user_attrs.get("seed")


@dataclass
class Task:
    """Work for a worker slot other than a trial: the worker's ``method`` called with ``args``
    (e.g. ``measure_pairs`` for the sensitivity table); retried on a new worker as a trial is."""

    worker: int
    method: str
    args: tuple[Any, ...]
    attempts: int = 1


@dataclass(frozen=True)
class Failed:
    """What a job that failed on a worker comes back as: the error's type and first line, or how many
    times its worker died."""

    reason: str

    def __str__(self) -> str:
        return self.reason


def record_result(study: optuna.Study, store: Store, row: Any, job: Job, result: TrialResult) -> None:
    """A complete trial (objectives and byte constraint told to Optuna), or a pruned one (PRUNED)."""
    timings = {"seconds": time.perf_counter() - job.started, "quantize": result.seconds_quantize,
               "forward": result.seconds_forward, "attempts": job.attempts, "kl_low": result.kl_low}
    if result.pruned:
        timings.update(windows=result.windows, prune_above=job.prune_above)
    _db(lambda: store.record_result(row, job.trial.number, result, policy=job.policy, seed=job.seed,
                                    timings=timings), f"recording trial {job.trial.number}")
    if not result.pruned:
        _db(lambda: job.trial.set_constraint("bytes", float(result.bytes - row.budget_bytes)), "telling Optuna")
    _db(lambda: job.trial.set_user_attr("kl_low", result.kl_low), "telling Optuna")
    if result.pruned:
        _db(lambda: study.tell(job.trial, state=TrialState.PRUNED), "telling Optuna")
    else:
        _db(lambda: study.tell(job.trial, [result.kl, float(result.bytes)]), "telling Optuna")


def record_failure(study: optuna.Study, store: Store, row: Any, job: Job, failed: Failed) -> None:
    log.warning("trial %d failed: %s", job.trial.number, failed.reason)
    _db(lambda: store.record_trial(row, job.trial.number, state="failed", policy=job.policy, error=failed.reason,
                                   seed=job.seed), f"recording trial {job.trial.number}")
    _db(lambda: study.tell(job.trial, state=TrialState.FAIL), "telling Optuna")


def reconcile(study: optuna.Study, store: Store, row: Any) -> None:
    """After a crash: trials Optuna still sees running are told from the store if they
    finished, otherwise marked failed and proposed again."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        stored = store.trial(row, t.number)
        if stored is not None and stored.state == "complete":
            optuna.Trial(study, t._trial_id).set_constraint("bytes", float(stored.bytes - row.budget_bytes))
            study.tell(t.number, [stored.kl, float(stored.bytes)])
            continue
        if stored is not None and stored.state == "pruned":
            study.tell(t.number, state=TrialState.PRUNED)
            continue
        study.tell(t.number, state=TrialState.FAIL)
        store.record_trial(row, t.number, state="failed", policy={}, error="interrupted (driver stopped)")
        study.enqueue_trial(t.params, user_attrs={**t.user_attrs, "retry_of": t.number})
