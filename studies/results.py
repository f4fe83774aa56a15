"""What one trial measured: plain data from a worker to the driver to the store."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SensitivityMeasure", "TrialResult"]


@dataclass(frozen=True)
class TrialResult:
    """A measured policy. A trial stopped after the first batch (multi-fidelity) is ``pruned``: it
    has its bytes, first-batch KL and timings, and no full metrics (``kl`` ... ``logit_err`` None).

    Attributes:
        bytes: exact packed bytes of the policy: its weights', plus with ``kv_bytes`` its KV cache's at the
            search's context. ``bpw``: the weights' bytes per weight, in bits.
        kv_bytes: the KV cache's bytes at the search's context (``--context``); ``None`` in a weight-only search.
        kl_low: KL over the first batch of evaluation windows (what multi-fidelity compares).
        windows: evaluation windows measured (all of them unless pruned).
        seconds_quantize, seconds_forward: the worker's time quantizing and running forwards.
        worker: ``host:pid`` of the worker that measured it.
        kl, ppl, top1, logit_err: the full metrics (``evaluators.METRIC_NAMES``).
    """

    bytes: int
    bpw: float
    kl_low: float | None
    windows: int
    seconds_quantize: float
    seconds_forward: float
    worker: str | None = None
    kl: float | None = None
    ppl: float | None = None
    top1: float | None = None
    logit_err: float | None = None
    kv_bytes: int | None = None

    @property
    def pruned(self) -> bool:
        return self.kl is None

    @property
    def state(self) -> str:
        """The trial's state in the store: ``complete`` or ``pruned``."""
        return "pruned" if self.pruned else "complete"

    @property
    def seconds(self) -> float:
        """The worker's own time on it."""
        return self.seconds_quantize + self.seconds_forward


@dataclass(frozen=True)
class SensitivityMeasure:
    """One pair of a sensitivity table: the metrics with only ``unit`` quantized at ``setting`` (all else float),
    measured or predicted by the proxy (then ``ppl`` is ``None``).

    Attributes:
        unit: the unit (a weight matrix, a group of them, or a KV unit) as the search names it.
        setting: its setting's key (``QuantSetting.key()`` / ``KVSetting.key()``).
        kl, ppl: KL to the float model and perplexity.
        bytes: the unit's packed bytes at that setting.
        seconds: what measuring (or predicting) the pair cost.
    """

    unit: str
    setting: str
    kl: float
    ppl: float | None
    bytes: int
    seconds: float
