"""A search's counts, its progress line, and the summary ``run_search`` returns."""

from __future__ import annotations

import logging
import time
from typing import Any

from tqdm.auto import tqdm

from studies import TrialResult

__all__ = ["Progress"]

log = logging.getLogger("search.driver")  # the driver's voice: users filter on it
_OVERHEAD_WARN = 0.2  # warn when proposing takes this share of the search's wall time


class Progress:
    """Counts finished trials (``done``: complete or pruned) towards ``target`` and shows them.

    Args:
        done, complete: trials the study had finished (in total, complete) when this run started.
        best: the lowest feasible KL so far.
    """

    def __init__(self, target: int, done: int, complete: int, best: float, *, name: str, sampler: str,
                 budget_bytes: int, show: bool = True):
        self.target, self.done, self.complete, self.best = target, done, complete, best
        self.ran = self.failed = self.pruned = 0
        self.ask_seconds = 0.0  # the sampler's own time, reported beside the trials'
        self.sampler, self.budget_bytes = sampler, budget_bytes
        self._warned = False
        self._start = time.perf_counter()
        self._bar = tqdm(total=target, initial=done, desc=f"search {name}", disable=not show, unit="trial",
                         dynamic_ncols=True)

    def asked(self, seconds: float) -> None:
        self.ask_seconds += seconds

    def failed_one(self) -> None:
        self.failed += 1

    def finished(self, result: TrialResult) -> None:
        """A trial measured fully, or pruned after the first batch."""
        self.done += 1
        self._bar.update(1)
        if result.pruned:
            self.pruned += 1
            return
        self.complete += 1
        self.ran += 1
        if result.bytes <= self.budget_bytes:
            self.best = min(self.best, result.kl)
        share = self.ask_seconds / max(time.perf_counter() - self._start, 1e-9)
        if share > _OVERHEAD_WARN and self.ran >= 5 and not self._warned:
            self._warned = True
            log.warning("the %s sampler takes %.0f%% of the search's time (%.2f s per proposal); "
                        "a coarser --granularity or another --sampler would cut it",
                        self.sampler, 100 * share, self.ask_seconds / (self.ran + self.pruned + self.failed))
        size = f"{result.bpw:.2f} bpw" if result.kv_bytes is None else f"{result.bytes / 1e6:.2f} MB with the cache"
        self._bar.set_postfix_str(f"best KL {self.best:.4f} | last {size} KL {result.kl:.4f} | "
                                  f"{result.seconds:.1f}s | sampler {100 * share:.0f}%"
                                  + (f" | pruned {self.pruned}" if self.pruned else "")
                                  + (f" | failed {self.failed}" if self.failed else ""))

    def close(self) -> None:
        self._bar.close()

    def summary(self) -> dict[str, Any]:
        """Trials run now, complete and pruned in total, failed now, seconds (and the sampler's share)."""
        return {"ran": self.ran, "complete": self.complete, "failed": self.failed, "pruned": self.pruned,
                "seconds": time.perf_counter() - self._start, "sampler_seconds": self.ask_seconds}

    @staticmethod
    def nothing_to_do(done: int, complete: int) -> dict[str, Any]:
        """The summary of a study that already has its trials."""
        return {"ran": 0, "complete": complete, "failed": 0, "pruned": done - complete, "seconds": 0.0,
                "sampler_seconds": 0.0}

