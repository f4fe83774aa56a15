"""Multi-fidelity selection for the budget-aware ``evo`` sampler (as in EvoPress).

Every child is scored on the first batch of evaluation windows first; one whose first-batch
KL is worse than the ``keep``-th best first-batch KL among the measured trials near the budget
could not enter the parent pool, so it stops there (an Optuna PRUNED trial) and costs one batch
instead of the whole evaluation. Only trials near the budget are compared: a cheaper policy with
a higher KL may still be on the front, so it must never set the bar. Seeds are never pruned.
"""

from __future__ import annotations

import bisect

__all__ = ["FirstBatchGate"]


class FirstBatchGate:
    """Args:
        budget_bytes: the study's budget.
        keep: how many of the best first-batch KLs a child must be among to go on.
        band: trials with bytes in ``[(1 - band) * budget, budget]`` set the bar.
    """

    def __init__(self, budget_bytes: int, keep: int = 12, band: float = 0.1):
        self.budget = budget_bytes
        self.keep = keep
        self.floor = (1.0 - band) * budget_bytes
        self._lows: list[float] = []  # sorted first-batch KLs of measured trials in the band

    def add(self, kl_low: float | None, nbytes: float) -> None:
        if kl_low is not None and self.floor <= nbytes <= self.budget:
            bisect.insort(self._lows, float(kl_low))

    def threshold(self) -> float | None:
        """The first-batch KL above which a child is pruned; ``None`` until ``keep`` trials set it."""
        return self._lows[self.keep - 1] if len(self._lows) >= self.keep else None
