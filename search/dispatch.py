"""Keeping Ray workers busy: submit jobs, collect what each finishes, replace workers that die.

Ray's ``ActorPool`` does not replace dead actors, so this does: a job whose worker died is
run again on a new one, up to ``max_retries`` times, then reported as failed — never lost.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from evaluators import UserError
from search.placement import WorkerSize, plan_workers, resolve_device
from search.record import Failed, Job, Task
from search.workers import TrialWorker, gpu_memory, init_ray

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)


def _node_gpus() -> tuple[int, ...]:
    """The GPUs of each live node of the cluster."""
    return tuple(int(node["Resources"].get("GPU", 0)) for node in ray.nodes() if node.get("Alive"))


class Dispatcher:
    """:class:`~search.workers.TrialWorker` actors over one model, data and reference: ``n_workers``, or
    with ``None`` as many as :func:`~search.placement.plan_workers` chooses from the cores, the GPUs'
    memory and ``host_workers`` (what host memory holds), at most ``max_workers``.

    Lifecycle: :meth:`submit` a job to a slot from :attr:`idle`; :meth:`next` returns the next job
    to finish with its :class:`~studies.TrialResult` or its failure reason (the slot is idle again);
    :meth:`close` kills the workers.

    The reference is put in Ray's object store once: its numpy arrays reach every worker on the
    same node without a copy. Given as ``None``, the first worker computes it (with ``reference_topk``)
    on its device, where the float model's forwards are fast, and the others share it.
    ``device`` (``auto``, ``cpu``, ``cuda``) is resolved against the GPUs
    the cluster reports; on ``cuda`` each worker asks Ray for its share of a GPU, sized from ``size``
    (see :func:`~search.placement.actor_options`), or with ``split`` as many whole GPUs as its share of a
    model too large for one takes (:func:`~search.placement.split_memory`). :attr:`plan` says what was chosen.
    """

    def __init__(self, data: dict[str, Any], reference: Any, n_workers: int | None, *,
                 ray_address: str | None = None, max_retries: int = 2, device: str = "cpu",
                 size: WorkerSize | None = None, host_workers: int | None = None, max_workers: int | None = None,
                 split: bool = False, reference_topk: int | None = None):
        # A local Ray gets this machine's cores (each worker then runs cores / workers torch threads).
        init_ray(ray_address, os.cpu_count() or 1)
        self.max_retries = max_retries
        self._data = data
        total = ray.cluster_resources()
        if n_workers is not None and n_workers > total.get("CPU", 0):  # Ray would wait for them forever
            raise UserError(f"--workers {n_workers}: the Ray cluster has {int(total.get('CPU', 0))} CPUs and each "
                            f"worker takes one; use --workers {int(total.get('CPU', 0))} or fewer")
        n_gpus = int(total.get("GPU", 0))
        self.device = resolve_device(device, n_gpus, split)
        memory = gpu_memory() if self.device == "cuda" else 0
        cpus = int(ray.available_resources().get("CPU", n_workers or 1))
        self.plan = plan_workers(self.device, size or WorkerSize(0, 0, 0), requested=n_workers, cpus=cpus,
                                 host_workers=host_workers or cpus, max_workers=max_workers, gpu_memory=memory,
                                 n_gpus=n_gpus, split=split, node_gpus=_node_gpus())
        log.info("workers: %s", self.plan.why)
        self._threads = self.plan.threads
        self._topk = reference_topk
        self._reference = None if reference is None else ray.put(reference)
        self._workers = [self._start()]
        if reference is None:  # the first worker computed it on its device: the others share its copy
            self._reference = ray.put(ray.get(self._workers[0].reference.remote()))
        self._workers += [self._start() for _ in range(self.plan.workers - 1)]
        self.idle = list(range(self.plan.workers))
        self._pending: dict[Any, Job] = {}

    def _start(self) -> Any:
        return TrialWorker.options(**self.plan.options).remote(self._data, self._reference, self._threads, self.device,
                                                           self.plan.batch_size, self.plan.max_memory, self._topk)

    @property
    def busy(self) -> int:
        """Jobs out with a worker."""
        return len(self._pending)

    def submit(self, job: Job | Task) -> None:
        method, args = ("evaluate", (job.policy, job.prune_above)) if isinstance(job, Job) else (job.method, job.args)
        self._pending[getattr(self._workers[job.worker], method).remote(*args)] = job

    def next(self) -> tuple[Job | Task, Any]:
        """Waits for the next finished job: its result (a trial's :class:`~studies.TrialResult`, a task's
        return value), or :class:`~search.record.Failed` saying why it failed."""
        while True:
            (ref,), _ = ray.wait(list(self._pending), num_returns=1)
            job = self._pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.ActorDiedError as exc:
                self._workers[job.worker] = self._start()  # Ray does not replace dead actors
                if job.attempts <= self.max_retries:
                    job.attempts += 1
                    self.submit(job)
                    continue
                outcome: Any = Failed(f"worker died {job.attempts} times: {str(exc).splitlines()[0]}")
            except ray.exceptions.RayTaskError as exc:
                outcome = Failed(f"{type(exc.cause).__name__}: {exc.cause}")
            else:
                outcome = result
            self.idle.append(job.worker)
            return job, outcome

    def close(self) -> None:
        for w in self._workers:
            ray.kill(w)
