"""Where trial workers run: the device a search asks for, and the Ray options of each worker.

Pure functions of numbers (device counts, model and reference sizes, GPU memory), so the placement
is tested on machines without a GPU; :mod:`search.dispatch` feeds them what Ray reports.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

from evaluators import UserError

__all__ = ["DEVICES", "Device", "GPU_HEADROOM", "WorkerSize", "actor_options", "resolve_device"]

Device = typing.Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = typing.get_args(Device)
# Share of a GPU's memory that workers may plan to fill: CUDA's context, the caching allocator's
# fragmentation and a forward's activations (not in the estimate) take the rest.
GPU_HEADROOM = 0.85


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

    @property
    def device_bytes(self) -> int:
        return 3 * self.param_bytes + self.reference_bytes + self.batch_bytes


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
    gib = 2 ** 30
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
