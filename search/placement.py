"""Where trial workers run and how many: the device a search asks for, the worker count, each
worker's torch threads and evaluation batch, and the Ray options of each worker.

Pure functions of numbers (device counts, cores, model and reference sizes, host and GPU memory), so
the placement is tested on machines without a GPU; :mod:`search.dispatch` feeds them what Ray reports.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

from evaluators import UserError

__all__ = ["CPU_BATCH", "DEVICES", "Device", "GPU_HEADROOM", "WORKERS_PER_GPU", "WorkerPlan", "WorkerSize",
           "actor_options", "fit_in_host", "plan_workers", "resolve_device"]

Device = typing.Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = typing.get_args(Device)
# Share of a GPU's memory that workers may plan to fill: CUDA's context, the caching allocator's
# fragmentation and a forward's activations (not in the estimate) take the rest.
GPU_HEADROOM = 0.85
# Evaluation windows per forward on the CPU: the evaluator's default, so CPU figures stay as they were
# (and multi-fidelity's first batch, on which children are pruned, keeps its size).
CPU_BATCH = 2
# Automatic GPU workers: a second worker on a GPU runs its forwards while the first quantizes and the
# driver records; more share the same SMs and only add memory. (Chosen, not measured: no GPU was lent.)
WORKERS_PER_GPU = 2
GIB = 2 ** 30


def resolve_device(requested: str, gpus: float) -> str:
    """``cpu`` or ``cuda`` for ``--device requested`` where the workers' machines have ``gpus`` GPUs.

    Raises:
        UserError: ``cuda`` asked for where there is no GPU (said before anything is loaded).
    """
    if requested not in DEVICES:
        raise UserError(f"unknown device {requested!r}; choose one of {', '.join(DEVICES)}")
    if requested == "auto":
        return "cuda" if gpus > 0 else "cpu"
    if requested == "cuda" and gpus <= 0:
        raise UserError("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False here, "
                        "and the Ray cluster reports no GPU); use --device cpu, or run where a GPU is")
    return requested


@dataclass(frozen=True)
class WorkerSize:
    """What one worker holds, in bytes: the model's parameters, the reference, a batch's logits.

    On its device a worker keeps the model, a float copy of its matrices and their decoded
    (quantized) weights, hence three times the parameters, plus the reference and a batch's logits.
    """

    param_bytes: int
    reference_bytes: int
    batch_bytes: int
    window_bytes: int = 0  # one evaluation window's share of ``batch_bytes`` (0: the batch is not resized)
    windows: int = 0  # evaluation windows

    @property
    def device_bytes(self) -> int:
        return 3 * self.param_bytes + self.reference_bytes + self.batch_bytes


@dataclass(frozen=True)
class WorkerPlan:
    """How a search's workers run: how many, torch threads and evaluation windows per forward each, the
    size each holds at that batch, and one line saying how it was chosen (the driver logs it)."""

    workers: int
    threads: int
    batch_size: int
    size: WorkerSize
    why: str


def fit_in_host(requested: int | None, per_worker: int, shared: int, limit: int, hint: str = "") -> int:
    """How many workers fit in ``limit`` bytes of host memory, each holding ``per_worker`` besides the
    ``shared`` bytes held once (the driver's model, the reference and its object-store copy).

    Raises:
        UserError: the ``requested`` workers (or, automatic, a single one) do not fit; says the estimate.
    """
    n = requested or 1
    estimate = n * per_worker + shared
    if estimate > limit:
        raise UserError(f"this search needs about {estimate / GIB:.2f} GiB ({n} workers x {per_worker / GIB:.2f} "
                        f"GiB model copies + {shared / GIB:.2f} GiB for the driver's model and the reference) but "
                        f"{limit / GIB:.2f} GiB is available; use fewer --workers or --eval-seqs{hint}")
    return max(1, (limit - shared) // max(per_worker, 1))


def plan_workers(device: str, size: WorkerSize, *, requested: int | None, cpus: int, host_workers: int,
                 max_workers: int | None = None, gpu_memory: int = 0, n_gpus: int = 0) -> WorkerPlan:
    """The workers of a search on ``device`` (``cpu`` or ``cuda``), ``requested`` or chosen when ``None``.

    Automatic count: on the CPU one worker per core (each runs torch on ``cpus // workers`` threads;
    separate processes keep every core busy where one process's threads would wait on each other); on
    CUDA :data:`WORKERS_PER_GPU` per GPU, fewer if their memory does not fit. Either way no more than
    ``host_workers`` (what host memory holds, from :func:`fit_in_host`), ``cpus`` or ``max_workers`` (the
    trials to run). Batch: :data:`CPU_BATCH` on the CPU; on CUDA as many windows as fit in a worker's
    share of its GPU, up to half the evaluation windows (the first half is multi-fidelity's first batch).

    Args:
        size: what one worker holds at the CPU batch (with ``window_bytes`` and ``windows`` to resize it).
        cpus: the cores Ray has for the workers.
        gpu_memory: free bytes of one GPU; ``n_gpus``: the GPUs.

    Raises:
        UserError: on CUDA, a worker (or the requested ones) does not fit on the GPUs (:func:`actor_options`).
    """
    cpus, cap = max(1, cpus), max(1, max_workers or 1 << 30)
    if device == "cpu":
        workers = requested or max(1, min(cpus, host_workers, cap))
        why = "as asked" if requested else f"one per core of {cpus}, up to {host_workers} in host memory and {cap} trials"
        return WorkerPlan(workers, max(1, cpus // workers), CPU_BATCH, size,
                          f"{workers} CPU workers ({why}), {max(1, cpus // workers)} torch threads each")
    usable = int(gpu_memory * GPU_HEADROOM)
    fit = usable // max(size.device_bytes, 1)
    if requested:
        workers, why = requested, "as asked"
    else:
        workers = max(1, min(max(n_gpus, 1) * min(WORKERS_PER_GPU, max(fit, 1)), host_workers, cpus, cap))
        why = f"{WORKERS_PER_GPU} per GPU of {n_gpus}, {fit} fit on one, up to {host_workers} in host memory"
    actor_options(device, workers, size, gpu_memory, n_gpus)  # refuses, with the estimate, what does not fit
    share = usable // math.ceil(workers / max(n_gpus, 1))
    batch = CPU_BATCH
    if size.window_bytes:
        room = (share - size.device_bytes + size.batch_bytes) // size.window_bytes
        batch = max(CPU_BATCH, min(room, math.ceil(size.windows / 2)))
        size = WorkerSize(size.param_bytes, size.reference_bytes, batch * size.window_bytes, size.window_bytes,
                          size.windows)
    return WorkerPlan(workers, max(1, cpus // workers), batch, size,
                      f"{workers} GPU workers ({why}), {batch} windows per forward")


def actor_options(device: str, n_workers: int, size: WorkerSize, gpu_memory: int = 0,
                  n_gpus: int = 0) -> dict[str, float]:
    """Ray options of each of ``n_workers`` workers on ``device``.

    On ``cuda`` each worker asks for a share of a GPU: a whole one when there are GPUs for every
    worker, else ``1 / (workers per GPU)``, as many as fit in ``gpu_memory`` (bytes of one GPU).

    Raises:
        UserError: one worker does not fit on one GPU, or the workers do not fit on ``n_gpus``
            (Ray would wait for a GPU forever).
    """
    if device == "cpu":
        return {"num_cpus": 1}
    usable = int(gpu_memory * GPU_HEADROOM)
    need = size.device_bytes
    gib = GIB
    if size.param_bytes > usable:
        raise UserError(f"the model alone is {size.param_bytes / gib:.2f} GiB but a GPU has {gpu_memory / gib:.2f} "
                        f"GiB ({GPU_HEADROOM:.0%} usable); splitting one model over several GPUs is not supported: "
                        "load it in half precision (--dtype bfloat16), or use --device cpu")
    if need > usable:
        raise UserError(f"one worker needs about {need / gib:.2f} GiB on its GPU (3 x {size.param_bytes / gib:.2f} "
                        f"GiB model copies + {size.reference_bytes / gib:.2f} GiB reference + "
                        f"{size.batch_bytes / gib:.2f} GiB logits) but a GPU has {gpu_memory / gib:.2f} GiB "
                        f"({GPU_HEADROOM:.0%} usable); use --reference-topk, fewer --eval-seqs, or --device cpu")
    fit = usable // need
    per_gpu = math.ceil(n_workers / max(n_gpus, 1))
    if per_gpu > fit:
        raise UserError(f"{n_workers} workers do not fit on {n_gpus} GPU(s): {fit} fit on one "
                        f"({need / gib:.2f} GiB each, {gpu_memory / gib:.2f} GiB per GPU); "
                        f"use --workers {fit * n_gpus} or fewer")
    # Rounded down so that per_gpu shares never add up to more than one GPU in Ray's accounting.
    return {"num_cpus": 1, "num_gpus": math.floor(10_000 / per_gpu) / 10_000}
