"""Where trial workers run and how many: the device a search asks for, the worker count, each
worker's torch threads and evaluation batch, and the Ray options of each worker.

Pure functions of numbers (device counts, cores, model and reference sizes, host and GPU memory), so
the placement is tested on machines without a GPU; :mod:`search.dispatch` feeds them what Ray reports.
"""

from __future__ import annotations

import math
import typing
import dataclasses
from dataclasses import dataclass

from evaluators import UserError

__all__ = ["CPU_BATCH", "DEVICES", "PACKED_CACHE_BYTES", "WORKER_PROCESS_BYTES", "Device", "GPU_HEADROOM", "WORKERS_PER_GPU", "WorkerPlan", "WorkerSize",
           "actor_options", "fit_in_host", "plan_workers", "resolve_device", "split_memory"]

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
# A Ray worker process before it loads anything (Python, torch, Ray's core worker): measured here, about
# 200 MB resident each, and counted in every worker's host memory.
WORKER_PROCESS_BYTES = 200 * 2 ** 20
# The packed matrices a worker's evaluator keeps between trials (its ``cache_bytes`` default).
PACKED_CACHE_BYTES = 2 << 30


def resolve_device(requested: str, gpus: float, split: bool = False) -> str:
    """``cpu`` or ``cuda`` for ``--device requested`` where the workers' machines have ``gpus`` GPUs.

    Raises:
        UserError: ``cuda`` asked for where there is no GPU, or ``split`` (``--split-model``) where the
            workers run on the CPU (said before anything is loaded).
    """
    if requested not in DEVICES:
        raise UserError(f"unknown device {requested!r}; choose one of {', '.join(DEVICES)}")
    if requested == "cuda" and gpus <= 0:
        raise UserError("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False here, "
                        "and the Ray cluster reports no GPU); use --device cpu, or run where a GPU is")
    device = ("cuda" if gpus > 0 else "cpu") if requested == "auto" else requested
    if split and device == "cpu":
        raise UserError("--split-model spreads a model over several GPUs, and these workers run on the CPU: "
                        "drop --split-model, or run where GPUs are (--device cuda)")
    return device


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
    # The largest part a device map keeps on one GPU (a decoder layer, the embedding or the head): a model
    # split over GPUs may leave up to this much unused on each (see :func:`split_memory`).
    block_bytes: int = 0

    @property
    def device_bytes(self) -> int:
        return 3 * self.param_bytes + self.reference_bytes + self.batch_bytes


@dataclass(frozen=True)
class WorkerPlan:
    """How a search's workers run: how many, torch threads and evaluation windows per forward each, the
    size each holds at that batch, one line saying how it was chosen (the driver logs it) and each worker's
    Ray options (:func:`actor_options`)."""

    workers: int
    threads: int
    batch_size: int
    size: WorkerSize
    why: str
    options: dict[str, float]
    # A model split over several GPUs (``--split-model``): the parameter bytes each of a worker's GPUs
    # takes, accelerate's ``max_memory`` (:func:`split_memory`); ``None``: the model on one device.
    max_memory: dict[int, int] | None = None


def fit_in_host(requested: int | None, per_worker: int, shared: int, limit: int, hint: str = "") -> int:
    """How many workers fit in ``limit`` bytes of host memory, each holding ``per_worker`` besides the
    ``shared`` bytes held once (the driver, which has freed its model by then, the reference and its
    object-store copy).

    Raises:
        UserError: the ``requested`` workers (or, automatic, a single one) do not fit; says the estimate.
    """
    n = requested or 1
    estimate = n * per_worker + shared
    if estimate > limit:
        raise UserError(f"this search needs about {estimate / GIB:.2f} GiB ({n} workers x {per_worker / GIB:.2f} "
                        f"GiB (a process and its model copies) + {shared / GIB:.2f} GiB for the driver and the reference) but "
                        f"{limit / GIB:.2f} GiB is available; use fewer --workers or --eval-seqs{hint}")
    return max(1, (limit - shared) // max(per_worker, 1))


def plan_workers(device: str, size: WorkerSize, *, requested: int | None, cpus: int, host_workers: int,
                 max_workers: int | None = None, gpu_memory: int = 0, n_gpus: int = 0,
                 split: bool = False, node_gpus: tuple[int, ...] = ()) -> WorkerPlan:
    """The workers of a search on ``device`` (``cpu`` or ``cuda``), ``requested`` or chosen when ``None``.

    Automatic count: on the CPU one worker per core (each runs torch on ``cpus // workers`` threads;
    separate processes keep every core busy where one process's threads would wait on each other); on
    CUDA :data:`WORKERS_PER_GPU` per GPU, fewer if their memory does not fit. Either way no more than
    ``host_workers`` (what host memory holds, from :func:`fit_in_host`), ``cpus`` or ``max_workers`` (the
    trials to run). Batch: :data:`CPU_BATCH` on the CPU; on CUDA as many windows as fit in a worker's
    share of its GPU, up to half the evaluation windows (the first half is multi-fidelity's first batch).

    With ``split`` (``--split-model``), a worker that does not fit on one GPU spreads its model over as many
    as :func:`split_memory` says, at the CPU batch, and the workers are as many as the GPUs hold.

    Args:
        size: what one worker holds at the CPU batch (with ``window_bytes`` and ``windows`` to resize it).
        cpus: the cores Ray has for the workers.
        gpu_memory: free bytes of one GPU; ``n_gpus``: the GPUs; ``node_gpus``: the GPUs of each node (a
            split worker's GPUs are on one node; default: all on one).

    Raises:
        UserError: on CUDA, a worker (or the requested ones) does not fit on the GPUs (:func:`actor_options`).
    """
    cpus, cap = max(1, cpus), max(1, max_workers or 1 << 30)
    if split and device == "cuda" and size.device_bytes > gpu_memory * GPU_HEADROOM:
        return _split_plan(size, requested=requested, cpus=cpus, host_workers=host_workers, cap=cap,
                           gpu_memory=gpu_memory, node_gpus=node_gpus or (n_gpus,))
    if device == "cpu":
        workers = requested or max(1, min(cpus, host_workers, cap))
        why = "as asked" if requested else f"one per core of {cpus}, up to {host_workers} in host memory and {cap} trials"
        return WorkerPlan(workers, max(1, cpus // workers), CPU_BATCH, size,
                          f"{workers} CPU workers ({why}), {max(1, cpus // workers)} torch threads each",
                          actor_options(device, workers, size))
    usable = int(gpu_memory * GPU_HEADROOM)
    fit = usable // max(size.device_bytes, 1)
    if requested:
        workers, why = requested, "as asked"
    else:
        workers = max(1, min(max(n_gpus, 1) * min(WORKERS_PER_GPU, max(fit, 1)), host_workers, cpus, cap))
        why = f"{WORKERS_PER_GPU} per GPU of {n_gpus}, {fit} fit on one, up to {host_workers} in host memory"
    options = actor_options(device, workers, size, gpu_memory, n_gpus)  # refuses, saying the estimate, what won't fit
    share = usable // math.ceil(workers / max(n_gpus, 1))
    batch = CPU_BATCH
    if size.window_bytes:
        room = (share - size.device_bytes + size.batch_bytes) // size.window_bytes
        batch = max(CPU_BATCH, min(room, math.ceil(size.windows / 2)))
        size = dataclasses.replace(size, batch_bytes=batch * size.window_bytes)
    # The batch fills at most a worker's share of its GPU, so the options' fit still holds at it.
    return WorkerPlan(workers, max(1, cpus // workers), batch, size,
                      f"{workers} GPU workers ({why}), {batch} windows per forward", options)


def split_memory(size: WorkerSize, gpu_memory: int) -> dict[int, int]:
    """The parameter bytes each GPU of a worker whose model is split over several takes (accelerate's
    ``max_memory``, by GPU index): as many GPUs as hold the model.

    A worker keeps three times the parameters (:attr:`WorkerSize.device_bytes`), on the GPU of each
    layer, so each GPU takes a third of its usable memory in parameters; the first also holds the inputs,
    the reference and a batch's logits. The count leaves one :attr:`~WorkerSize.block_bytes` unused on
    each GPU, since a device map moves a whole layer to the next GPU when it does not fit, and one more
    on the first, where accelerate keeps room for the largest layer.

    Raises:
        UserError: the reference and the logits leave the first GPU no room for a layer.
    """
    usable = int(gpu_memory * GPU_HEADROOM)
    first = (usable - size.reference_bytes - size.batch_bytes) // 3
    rest = usable // 3
    if first <= 2 * size.block_bytes or rest <= size.block_bytes:
        raise UserError(f"a split model's first GPU holds the reference ({size.reference_bytes / GIB:.2f} GiB) and a "
                        f"batch's logits ({size.batch_bytes / GIB:.2f} GiB) beside 3 x its layers of up to "
                        f"{size.block_bytes / GIB:.2f} GiB, and a GPU has {gpu_memory / GIB:.2f} GiB "
                        f"({GPU_HEADROOM:.0%} usable); use --reference-topk or fewer --eval-seqs")
    budgets, room = [first], first - 2 * size.block_bytes
    while room < size.param_bytes:
        budgets.append(rest)
        room += rest - size.block_bytes
    return dict(enumerate(budgets))


def _split_plan(size: WorkerSize, *, requested: int | None, cpus: int, host_workers: int, cap: int,
                gpu_memory: int, node_gpus: tuple[int, ...]) -> WorkerPlan:
    """:func:`plan_workers` for a model split over several GPUs per worker: whole GPUs of one node each
    (Ray would wait forever for more GPUs than a node has)."""
    max_memory = split_memory(size, gpu_memory)
    k = len(max_memory)
    fit = sum(g // k for g in node_gpus)
    if fit < 1:
        raise UserError(f"the model split over GPUs needs {k} GPUs of {gpu_memory / GIB:.2f} GiB on one node per "
                        f"worker (3 x {size.param_bytes / GIB:.2f} GiB model copies + "
                        f"{size.reference_bytes / GIB:.2f} GiB reference) but the nodes have {max(node_gpus)} at "
                        "most; load it in half precision (--dtype bfloat16)")
    if requested and requested > fit:
        raise UserError(f"{requested} workers of {k} GPUs each do not fit on {sum(node_gpus)} GPUs "
                        f"({', '.join(map(str, node_gpus))} by node); use --workers {fit} or fewer")
    workers = requested or max(1, min(fit, host_workers, cpus, cap))
    return WorkerPlan(workers, max(1, cpus // workers), CPU_BATCH, size,
                      f"{workers} workers, each with the model split over {k} GPUs, {CPU_BATCH} windows per forward",
                      {"num_cpus": 1, "num_gpus": k}, max_memory=max_memory)


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
                        f"GiB ({GPU_HEADROOM:.0%} usable): load it in half precision (--dtype bfloat16), spread it "
                        "over several GPUs (--split-model), or use --device cpu")
    if need > usable:
        raise UserError(f"one worker needs about {need / gib:.2f} GiB on its GPU (3 x {size.param_bytes / gib:.2f} "
                        f"GiB model copies + {size.reference_bytes / gib:.2f} GiB reference + "
                        f"{size.batch_bytes / gib:.2f} GiB logits) but a GPU has {gpu_memory / gib:.2f} GiB "
                        f"({GPU_HEADROOM:.0%} usable); use --reference-topk, fewer --eval-seqs, --split-model "
                        "(several GPUs a worker), or --device cpu")
    fit = usable // need
    per_gpu = math.ceil(n_workers / max(n_gpus, 1))
    if per_gpu > fit:
        raise UserError(f"{n_workers} workers do not fit on {n_gpus} GPU(s): {fit} fit on one "
                        f"({need / gib:.2f} GiB each, {gpu_memory / gib:.2f} GiB per GPU); "
                        f"use --workers {fit * n_gpus} or fewer")
    # Rounded down so that per_gpu shares never add up to more than one GPU in Ray's accounting.
    return {"num_cpus": 1, "num_gpus": math.floor(10_000 / per_gpu) / 10_000}
