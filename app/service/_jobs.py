"""Searches launched by the service: each runs in a background thread of the service process and
drives its own Ray workers (:func:`search.driver.run_search`); a failed one is recorded with its
error and never takes the service down. At most ``max_running`` run at once; the others wait in a
queue, and any can be cancelled."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from evaluators.errors import UserError
from app.service._schemas import StudyRequest
from studies import Store, StoreError

__all__ = ["Job", "Jobs", "AlreadyRunning", "NotRunning", "progress"]

log = logging.getLogger("app.service")


class AlreadyRunning(Exception):
    """A study this service is running already (the API answers 409)."""


class NotRunning(Exception):
    """A cancel for a study this service is not running or queueing (the API answers 409)."""


@dataclass
class Job:
    """A search launched by this service."""

    request: StudyRequest
    status: str = "queued"  # queued | running | done | failed | cancelled
    started: float = field(default_factory=time.time)
    finished: float | None = None
    error: str | None = None
    summary: dict[str, Any] | None = None
    stop: threading.Event = field(default_factory=threading.Event)  # set by a cancel

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")

    def elapsed(self) -> float:
        return (self.finished or time.time()) - self.started


class Jobs:
    """The service's searches by study name, run against ``storage`` on ``ray_address``, at most
    ``max_running`` at once (the others wait, ``queued``, in the order they came)."""

    def __init__(self, storage: str, ray_address: str | None, max_running: int = 2):
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        self.storage = storage
        self.ray_address = ray_address
        self.max_running = max_running
        # transformers resolves names lazily and that is not thread-safe: two searches starting at once
        # got "cannot import name 'AutoConfig'". Resolve them once here, before any search thread runs.
        import transformers

        for name in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "LlamaConfig", "LlamaForCausalLM"):
            getattr(transformers, name)
        import search.driver  # noqa: F401  (same reason: import once, not from racing threads)
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Condition()  # guards jobs, the queue and the running count; notified on each change
        self._queue: list[Job] = []  # waiting for a slot, first come first served
        self._running = 0

    def get(self, name: str) -> Job | None:
        return self.jobs.get(name)

    def items(self) -> list[tuple[str, Job]]:
        return list(self.jobs.items())

    def launch(self, req: StudyRequest) -> Job:
        with self._lock:
            job = self.jobs.get(req.study)
            if job is not None and job.active:
                raise AlreadyRunning(f"study {req.study!r} is already {job.status} in this service")
            job = self.jobs[req.study] = Job(req)
            self._queue.append(job)
        threading.Thread(target=self._run, args=(job,), name=f"search-{req.study}", daemon=True).start()
        return job

    def cancel(self, name: str) -> Job:
        """Stops ``name``'s search: a queued one never starts; a running one asks for no more trials (those
        out finish and are recorded, so the study resumes with all it has)."""
        with self._lock:
            job = self.jobs.get(name)
            if job is None or not job.active:
                raise NotRunning(f"study {name!r} is not running in this service"
                                 + ("" if job is None else f" (it is {job.status})"))
            job.stop.set()
            if job.status == "queued":
                job.status = "cancelled"
            self._lock.notify_all()
        return job

    def _take_slot(self, job: Job) -> bool:
        """Waits for ``job``'s turn and a free slot; False if it was cancelled while it waited."""
        with self._lock:
            while not job.stop.is_set() and (self._queue[0] is not job or self._running >= self.max_running):
                self._lock.wait()
            self._queue.remove(job)
            self._lock.notify_all()  # the next in the queue may now be first
            if job.stop.is_set():
                return False
            self._running += 1
            job.status, job.started = "running", time.time()  # its elapsed time and rate count from here
            return True

    def _run(self, job: Job) -> None:
        from search.driver import SearchConfig, run_search
        from search.workers import init_ray

        if not self._take_slot(job):
            job.finished = time.time()
            return
        status = "failed"
        try:
            init_ray(self.ray_address, os.cpu_count() or 2)
            job.summary = run_search(SearchConfig(job.request, storage=self.storage, ray_address=self.ray_address,
                                                  progress=False, stop=job.stop))
            status = "cancelled" if job.stop.is_set() else "done"
        except Exception as exc:  # a failed search is reported, never fatal to the service
            expected = isinstance(exc, (UserError, StoreError))  # bad input: its message says it all
            log.warning("search %s failed: %s", job.request.study, exc, exc_info=not expected)
            job.error = str(exc) if expected else f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:  # with cancel's check of job.active
                job.status, job.finished = status, time.time()
                self._running -= 1
                self._lock.notify_all()


def progress(store: Store, name: str, job: Job | None) -> dict[str, Any]:
    """A study's progress: counts, best feasible KL, rate; from the store, and from ``job`` if launched here."""
    row = store.find_study(name)
    if row is None:
        if job is None:
            store.get_study(name)  # raises NotFoundError, naming the known studies
        # Launched but not yet created (loading the model), or failed before creating it.
        return {"study": name, "status": job.status, "error": job.error, "complete": 0, "failed": 0,
                "running": 0, "target_trials": job.request.trials, "best_kl": None,
                "elapsed_s": job.elapsed(), "trials_per_min": None}
    trials = store.trials_frame(row)
    complete = int((trials["state"] == "complete").sum())
    failed = int((trials["state"] == "failed").sum())
    feasible = trials[(trials["state"] == "complete") & trials["feasible"].fillna(False).astype(bool)]
    best = None if feasible.empty else float(feasible["kl"].min())
    if job is not None:
        elapsed = job.elapsed()
        # Workers chosen by the search (no --workers) are never more than the trials left to run.
        workers = job.request.workers or job.request.trials
        running = min(workers, max(job.request.trials - complete, 0)) if job.status == "running" else 0
    else:
        # Not launched here (CLI or another service): the trials' own compute time is what is known.
        elapsed = float(trials["seconds"].fillna(0).sum())
        running = 0
    return {"study": name, "status": job.status if job else "stored", "error": job.error if job else None,
            "model": row.model, "sampler": row.sampler, "budget_bytes": row.budget_bytes,
            "budget_bpw": row.budget_bpw, "complete": complete, "failed": failed, "running": running,
            "target_trials": job.request.trials if job else None, "best_kl": best, "elapsed_s": elapsed,
            "trials_per_min": (60.0 * complete / elapsed) if elapsed else None}
