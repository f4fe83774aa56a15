"""Ray actors that hold the model, data, reference and quantized-matrix cache, and measure policies
(plain data in, a :class:`~studies.results.TrialResult` out)."""

from __future__ import annotations

import os
import socket
import threading
from typing import TYPE_CHECKING, Any

import ray

from studies.results import SensitivityMeasure, TrialResult

if TYPE_CHECKING:
    from evaluators.reference import Reference

__all__ = ["TrialWorker", "gpu_memory", "init_ray"]


_init_lock = threading.Lock()
_started: list[threading.Thread] = []  # the thread that owns this process's local Ray, kept alive


def init_ray(address: str | None, num_cpus: int) -> None:
    """Joins ``address`` (or ``$RAY_ADDRESS``), else starts a local Ray without dashboard, once per process.

    A local Ray's GCS and raylet die with the *thread* that started them (Linux's parent-death signal
    is per thread), so a search's background thread in the service must not start it: the next search
    would find Ray gone a minute later, and Ray then aborts the whole process. A local Ray asked for
    from another thread than the main one is therefore started from a daemon thread that lives as
    long as the process.
    """
    with _init_lock:  # one ray.init, however many searches start at once
        if ray.is_initialized():
            return
        address = address or os.environ.get("RAY_ADDRESS")
        if address:  # joining a cluster starts no processes of ours
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
            return
        # A private local instance: token auth is pointless on loopback and needs a file in ~/.ray.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")

        def start() -> None:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING",
                     log_to_driver=False)

        if threading.current_thread() is threading.main_thread():  # the CLI: lives as long as the process
            start()
            return
        started, failed = threading.Event(), []

        def own() -> None:
            try:
                start()
            except BaseException as exc:  # handed to the caller below
                failed.append(exc)
            started.set()
            if not failed:
                threading.Event().wait()  # never returns: Ray's processes live until the process ends

        owner = threading.Thread(target=own, name="ray-owner", daemon=True)
        owner.start()
        started.wait()
        if failed:
            raise failed[0]
        _started.append(owner)


@ray.remote(num_gpus=1)
def _gpu_memory() -> int:
    import torch

    return int(torch.cuda.mem_get_info()[0])  # free, not total: another process's share is not ours


def gpu_memory() -> int:
    """Free bytes of memory of one of the cluster's GPUs, asked on a GPU node (the driver needs none)."""
    return int(ray.get(_gpu_memory.remote()))


@ray.remote(max_restarts=0)
class TrialWorker:
    """Measures policies on one model. Created once per search; receives and returns plain data.

    The model, its float weights, the reference and the packed cache live on ``device``; each forward
    runs ``batch_size`` evaluation windows. Without a ``reference`` it computes its own (with
    ``reference_topk``). With ``max_memory`` (GPU index -> parameter bytes) the model is spread over this
    worker's GPUs instead (:func:`evaluators.device_map.spread`).
    """

    def __init__(self, data: dict[str, Any], reference: Reference | None, threads: int, device: str = "cpu",
                 batch_size: int = 2, max_memory: dict[int, int] | None = None, reference_topk: int | None = None):
        import torch

        from evaluators import Evaluator
        from evaluators.context import DataConfig

        torch.set_num_threads(max(1, threads))
        loaded, tokens = DataConfig.from_dict(data).load()
        if max_memory:
            from evaluators.device_map import spread

            spread(loaded.model, max_memory)
        else:
            loaded.model.to(device)
        self.evaluator = Evaluator(loaded, tokens, reference=reference, batch_size=batch_size,
                                   reference_topk=reference_topk)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def evaluate(self, policy: dict[str, Any], prune_above: float | None = None) -> TrialResult:
        import quant
        from evaluators import METRIC_NAMES

        measured = self.evaluator.evaluate(quant.Policy.from_dict(policy), prune_above=prune_above)
        metrics = {} if measured["pruned"] else {k: measured[k] for k in METRIC_NAMES}
        return TrialResult(bytes=int(measured["bytes"]), bpw=measured["bpw"],
                           kl_low=measured["kl_low"], windows=measured["windows"],
                           seconds_quantize=measured["seconds_quantize"], seconds_forward=measured["seconds_forward"],
                           worker=self.name, **metrics)

    def measure_pairs(self, pairs: list[tuple[str, list[str], dict[str, Any]]],
                      windows: int | None = None) -> list[SensitivityMeasure]:
        """Single-unit sensitivity: for each ``(unit, its matrices, setting)``, the metrics with only those
        matrices (or a KV unit's cache) quantized (over the first ``windows`` evaluation windows), as rows
        for the store."""
        import quant
        from quant.kv import KVSetting, split_kv_unit
        from search.sensitivity import measure_pair

        parse = lambda unit, s: (KVSetting if split_kv_unit(unit) else quant.QuantSetting).from_dict(s)  # noqa: E731
        return [measure_pair(self.evaluator, unit, matrices, parse(unit, setting), windows)
                for unit, matrices, setting in pairs]

    def proxy(self, request: dict[str, Any], kinds: list[str]) -> dict[str, Any]:
        """The sensitivity proxy's predictions (:func:`search.sensitivity.predict_proxy`) of ``kinds`` over the
        space of ``request`` (a ``SearchRequest``'s fields), on this worker's device: where a search on GPUs
        runs it, the driver having none."""
        from search.request import SearchRequest
        from search.sensitivity import predict_proxy

        self.evaluator.restore_float()  # the space's shapes and attention modules are the float model's
        space = SearchRequest.model_validate(request).space_of(self.evaluator.model)
        return predict_proxy(self.evaluator, space, kinds)

    def reference(self) -> Reference:
        """The reference this worker compares with: the one it was given, or computed on its device when
        it was given ``None`` (``reference_topk`` words per position, or all)."""
        return self.evaluator.reference

    def pid(self) -> int:
        return os.getpid()
