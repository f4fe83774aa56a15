"""Ray actors that hold the model, data, reference and quantized-matrix cache, and measure policies."""

from __future__ import annotations

import os
import socket
from typing import Any

import numpy as np
import ray

__all__ = ["TrialWorker", "init_ray"]


def init_ray(address: str | None, num_cpus: int) -> None:
    """Joins ``address`` (or ``$RAY_ADDRESS``), else starts a local Ray without dashboard."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    else:
        # A private local instance: token auth is pointless on loopback and needs a file in ~/.ray.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False)


@ray.remote(max_restarts=0)
class TrialWorker:
    """Measures policies on one model. Created once per search; receives and returns plain data."""

    def __init__(self, data: dict[str, Any], reference: np.ndarray, threads: int):
        import torch

        from evaluators import Evaluator
        from evaluators.context import DataConfig

        torch.set_num_threads(max(1, threads))
        loaded, tokens = DataConfig.from_dict(data).load()
        self.evaluator = Evaluator(loaded, tokens, reference=reference)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def evaluate(self, policy: dict[str, Any], prune_above: float | None = None) -> dict[str, Any]:
        import quant

        result = self.evaluator.evaluate(quant.Policy.from_dict(policy), prune_above=prune_above)
        result["worker"] = self.name
        return result

    def pid(self) -> int:
        return os.getpid()
