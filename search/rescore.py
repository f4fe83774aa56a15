"""Re-scoring a study's front on another text (``turboquant front STUDY --dataset FILE``).

Each front point is measured on windows of that text against the float model's outputs on the
same windows, quantized exactly as the search quantized it (calibrated formats on the study's own
calibration windows). The results are stored beside the trials (``studies.models.RescoreRow``),
keyed by the text's fingerprint, so a second call on the same text measures nothing; the trials'
own metrics are never touched. The question it answers: does the front's order by KL hold on text
the search never saw?
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import pandas as pd
from tqdm.auto import tqdm

import quant
from evaluators import Evaluator, UserError
from evaluators.checkpoint import checked_provenance
from evaluators.context import DataConfig, OtherText, measured_on
from studies import Store

__all__ = ["Rescored", "order_agreement", "rescore_front"]

log = logging.getLogger(__name__)
OTHER_COLUMNS = {"kl": "kl_other", "ppl": "ppl_other", "top1": "top1_other"}  # stored metric -> front column


@dataclass
class Rescored:
    """A front with its metrics on another text.

    Attributes:
        frame: the front (``studies.FRONT_COLUMNS``) plus ``kl_other``, ``ppl_other``, ``top1_other``.
        other: the text and its windows.
        measured, reused: front points measured now, and found already stored.
        seconds: time spent measuring now (model load included).
        spearman: rank correlation of ``kl`` and ``kl_other`` over the front (NaN below 2 points).
        swaps: pairs of trial numbers whose KL order on the other text is the reverse of the study's.
    """

    frame: pd.DataFrame
    other: OtherText
    measured: int
    reused: int
    seconds: float
    spearman: float
    swaps: list[tuple[int, int]] = field(default_factory=list)


def order_agreement(frame: pd.DataFrame) -> tuple[float, list[tuple[int, int]]]:
    """Spearman of ``kl`` vs ``kl_other`` and the (trial, trial) pairs the two order differently."""
    if len(frame) < 2:
        return float("nan"), []
    rho = float(frame[["kl", "kl_other"]].corr(method="spearman").iloc[0, 1])
    rows = list(frame[["trial", "kl", "kl_other"]].itertuples(index=False))
    swaps = [(int(a.trial), int(b.trial)) for i, a in enumerate(rows) for b in rows[i + 1:]
             if (a.kl - b.kl) * (a.kl_other - b.kl_other) < 0]
    return rho, swaps


def rescore_front(storage: str, study: str, dataset: str, *, seq_len: int | None = None,
                  n_eval: int | None = None, progress: bool = True, trust_remote_code: bool = False) -> Rescored:
    """Measures the front points of ``study`` on ``dataset`` that are not stored yet; returns them all.

    Args:
        seq_len, n_eval: the windows cut from ``dataset`` (default: the study's).
        progress: show a progress bar (stderr) while measuring.

    Raises:
        UserError: the study has no front yet, or the text is too short for the windows.
    """
    store = Store(storage)
    row = store.get_study(study)
    front = store.front(row)
    if front.empty:
        raise UserError(f"study {study} has no feasible trial yet: nothing to re-score")
    # The study's model runs its own code only when the command line allows it, whatever the database says.
    provenance = checked_provenance({"provenance": row.provenance}, f"study {study}",
                                    trust_remote_code=trust_remote_code)["provenance"]
    other = OtherText.of(dataset, DataConfig.from_dict(provenance), seq_len=seq_len, n_eval=n_eval)
    stored = store.rescores(row, other.fingerprint)
    todo = [int(t) for t in front["trial"] if int(t) not in stored]
    start = time.perf_counter()
    if todo:  # only now the model: a second call on the same text loads nothing
        loaded, tokens = measured_on({"provenance": provenance}, "study", study)
        evaluator = Evaluator(loaded, other.tokens(loaded, tokens))  # the reference: float model on this text
        for number in tqdm(todo, desc=f"re-score {study} on {dataset}", unit="point", disable=not progress,
                           dynamic_ncols=True):
            trial = store.trial(row, number)
            t0 = time.perf_counter()
            measured = evaluator.evaluate(quant.Policy.from_dict(trial.policy))
            if measured["bytes"] != trial.bytes:  # the policy did not pack as the search packed it
                log.warning("trial %d packs to %d bytes now, %d in the study", number, measured["bytes"], trial.bytes)
            metrics = {k: measured[k] for k in ("kl", "ppl", "top1", "logit_err")}
            metrics["seconds"] = time.perf_counter() - t0
            store.record_rescore(row, number, other.fingerprint, dataset=dataset, seq_len=other.seq_len,
                                 windows=int(measured["windows"]), **metrics)
            stored[number] = metrics
    frame = front.copy()
    for key, column in OTHER_COLUMNS.items():
        frame[column] = [stored[int(t)][key] for t in frame["trial"]]
    rho, swaps = order_agreement(frame)
    return Rescored(frame, other, len(todo), len(front) - len(todo), time.perf_counter() - start, rho, swaps)
