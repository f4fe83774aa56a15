"""Sensitivity: the KL to the float model when only one unit (a matrix, block or layer) is quantized.

The table is the input of the solved seeds (:mod:`search.seeds`): assuming the losses of
different units add up, it predicts any policy's KL without a forward pass. It costs one
forward per (unit, setting) pair, so it is stored in the database, keyed by model and data
fingerprints, and later studies on the same model and data reuse every pair already measured.
A unit is stored under its own name (a block's is its module path), so granularities never mix.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
from tqdm.auto import tqdm

import quant
from evaluators import Evaluator
from studies import Store

if TYPE_CHECKING:
    from search.request import MeasureRequest

__all__ = ["PROXY_VERSION", "SensitivityTable", "measure_on_workers", "measure_pair", "measure_sensitivity",
           "proxy_table", "run_sensitivity"]

log = logging.getLogger(__name__)
UNFIT_BYTES = 1 << 62  # the bytes of a (unit, setting) pair that cannot exist
_FLUSH_EVERY = 32  # rows per database write: an interrupted run keeps most of its work


@dataclass
class SensitivityTable:
    """KL and packed bytes of every (unit, setting); ``computed`` pairs were measured now."""

    units: dict[str, list[str]]  # unit name -> its matrices
    settings: list[quant.QuantSetting]
    kl: dict[str, dict[str, float]] = field(default_factory=dict)  # unit -> setting key -> KL
    nbytes: dict[str, dict[str, int]] = field(default_factory=dict)  # unit -> setting key -> bytes
    computed: int = 0
    reused: int = 0
    seconds: float = 0.0

    def arrays(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Unit names and ``(n_units, n_settings)`` arrays of KL and bytes, settings in order."""
        names = list(self.units)
        keys = [s.key() for s in self.settings]
        # A setting a unit cannot take (a llama.cpp type whose block its rows do not fit) has no pair:
        # infinite loss and more bytes than any budget, so no solver picks it.
        kl = np.array([[self.kl[n].get(k, np.inf) for k in keys] for n in names], dtype=np.float64)
        nb = np.array([[self.nbytes[n].get(k, UNFIT_BYTES) for k in keys] for n in names], dtype=np.int64)
        return names, kl, nb

    def most_sensitive(self, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` units with the largest KL at their cheapest setting."""
        names, kl, nb = self.arrays()
        cheapest = nb.argmin(axis=1)
        worst = [(names[i], float(kl[i, cheapest[i]])) for i in range(len(names))]
        return sorted(worst, key=lambda t: -t[1])[:k]


def _plan(shapes: dict[str, tuple[int, int]], n_eval: int, settings: list[quant.QuantSetting],
          units: dict[str, list[str]] | None, store: Store | None, model_fingerprint: str, data_fingerprint: str,
          windows: int | None) -> tuple[SensitivityTable, list[tuple[str, quant.QuantSetting]], str, int | None]:
    """The table with every pair the store holds, the pairs still to measure, and the data key and
    window count they are measured under."""
    if windows is not None and windows < n_eval:
        data_fingerprint = f"{data_fingerprint}/first{windows}"  # fewer tokens are other data
    else:
        windows = None
    table = SensitivityTable(units or {m: [m] for m in shapes}, settings)
    known = store.sensitivity(model_fingerprint, data_fingerprint) if store is not None else {}
    todo: list[tuple[str, quant.QuantSetting]] = []
    for name in table.units:
        table.kl[name], table.nbytes[name] = {}, {}
        for s in settings:
            if not all(s.fits(shapes[m]) for m in table.units[name]):
                continue
            hit = known.get((name, s.key()))
            if hit is None:
                todo.append((name, s))
            else:
                table.kl[name][s.key()], table.nbytes[name][s.key()] = hit["kl"], hit["bytes"]
    table.reused = sum(len(v) for v in table.kl.values())
    return table, todo, data_fingerprint, windows


def _add(table: SensitivityTable, rows: list[dict[str, Any]]) -> None:
    for r in rows:
        table.kl[r["matrix"]][r["setting"]], table.nbytes[r["matrix"]][r["setting"]] = r["kl"], int(r["bytes"])


def measure_pair(evaluator: Evaluator, unit: str, matrices: list[str], setting: quant.QuantSetting,
                 windows: int | None) -> dict[str, Any]:
    """The store's row for one pair: the metrics with only ``matrices`` quantized at ``setting``."""
    t = time.perf_counter()
    r = evaluator.evaluate_partial(dict.fromkeys(matrices, setting), windows=windows)
    return {"matrix": unit, "setting": setting.key(), "kl": r["kl"], "ppl": r["ppl"], "bytes": int(r["bytes"]),
            "seconds": time.perf_counter() - t}


def measure_sensitivity(evaluator: Evaluator, settings: Iterable[quant.QuantSetting], *,
                        units: dict[str, list[str]] | None = None, store: Store | None = None,
                        model_fingerprint: str = "", data_fingerprint: str = "", windows: int | None = None,
                        progress: bool = True) -> SensitivityTable:
    """Fills the table in this process, measuring only pairs the store does not hold yet (and storing them).

    Args:
        units: unit name -> matrices quantized together (default: every matrix alone).
        windows: measure on the first ``windows`` evaluation windows only (default all): the ranking of
            units needs far fewer tokens than a trial's KL, and the table costs one forward per pair.
    """
    table, todo, data_fingerprint, windows = _plan(evaluator.matrices, len(evaluator.tokens.eval), list(settings),
                                                   units, store, model_fingerprint, data_fingerprint, windows)
    t0 = time.perf_counter()
    pending: list[dict[str, Any]] = []
    for name, s in tqdm(todo, desc="sensitivity", unit="pair", disable=not progress or not todo,
                        dynamic_ncols=True):
        pending.append(measure_pair(evaluator, name, table.units[name], s, windows))
        _add(table, pending[-1:])
        if store is not None and len(pending) >= _FLUSH_EVERY:
            store.record_sensitivity(model_fingerprint, data_fingerprint, pending)
            pending = []
    if store is not None:
        store.record_sensitivity(model_fingerprint, data_fingerprint, pending)
    evaluator.restore_float()  # callers (the driver) go on using the model as the float reference
    table.computed = len(todo)
    table.seconds = time.perf_counter() - t0
    return table


def measure_on_workers(workers: Any, shapes: dict[str, tuple[int, int]], n_eval: int,
                       settings: Iterable[quant.QuantSetting], *, units: dict[str, list[str]] | None = None,
                       store: Store | None = None, model_fingerprint: str = "", data_fingerprint: str = "",
                       windows: int | None = None, progress: bool = True, chunk: int = 4) -> SensitivityTable:
    """:func:`measure_sensitivity` on a :class:`~search.dispatch.Dispatcher`'s workers: the pairs the store
    lacks go out ``chunk`` at a time to whichever worker is idle, and each chunk is stored as it comes
    back, so an interrupted table resumes where it stopped. A worker that dies is replaced and its chunk
    run again (the dispatcher's retries); a chunk that fails stops the table with the reason.
    """
    from search.dispatch import Task

    table, todo, data_fingerprint, windows = _plan(shapes, n_eval, list(settings), units, store,
                                                   model_fingerprint, data_fingerprint, windows)
    t0 = time.perf_counter()
    chunks = [[(u, table.units[u], s.to_dict()) for u, s in todo[i:i + chunk]] for i in range(0, len(todo), chunk)]
    bar = tqdm(total=len(todo), desc="sensitivity", unit="pair", disable=not progress or not todo, dynamic_ncols=True)
    try:
        while chunks or workers.busy:
            while chunks and workers.idle:
                workers.submit(Task(workers.idle.pop(), "measure_pairs", (chunks.pop(0), windows)))
            task, rows = workers.next()
            if isinstance(rows, str):
                raise RuntimeError(f"sensitivity: a worker failed measuring {task.args[0][0][0]}: {rows}")
            _add(table, rows)
            if store is not None:
                store.record_sensitivity(model_fingerprint, data_fingerprint, rows)
            bar.update(len(rows))
    finally:
        bar.close()
    table.computed = len(todo)
    table.seconds = time.perf_counter() - t0
    return table


def run_sensitivity(request: MeasureRequest, storage: str, *, progress: bool = True) -> SensitivityTable:
    """Loads the request's model and data, then measures (or reuses) the table for its space's settings.

    The request was validated when it was built, so bad options never reach the storage or the loading."""
    store = Store(storage)
    loaded, tokens = request.data_config().load()
    space = request.space(quant.weight_matrices(loaded.model))
    evaluator = Evaluator(loaded, tokens)
    return measure_sensitivity(evaluator, space.settings(), units=space.units, store=store,
                               model_fingerprint=loaded.fingerprint, data_fingerprint=tokens.fingerprint,
                               windows=request.sensitivity_seqs, progress=progress)


PROXY_VERSION = "proxy-v1"  # part of the stored rows' data key: a new formula never reuses old predictions


def proxy_table(evaluator: Evaluator, space: Any, *, store: Store | None = None, model_fingerprint: str = "",
                data_fingerprint: str = "") -> SensitivityTable:
    """The table predicted by the one-pass proxy (:func:`evaluators.proxy.proxy_sensitivity`: diagonal
    Fisher of the model's own predictions on the calibration windows), for the space's units and settings.

    Seconds instead of one forward per pair. With a ``store`` the predictions are kept beside the measured
    tables (under ``data_fingerprint/proxy-vN``), so a resumed study and ``export --budget`` solve from the
    same numbers without the Fisher pass; a table the store holds whole is read, not recomputed.
    """
    from evaluators.proxy import proxy_sensitivity

    settings = space.settings()
    stored, todo, key, _ = _plan(evaluator.matrices, len(evaluator.tokens.eval), settings, dict(space.units), store,
                                 model_fingerprint, f"{data_fingerprint}/{PROXY_VERSION}", None)
    if store is not None and not todo:
        return stored
    evaluator.restore_float()
    hessians = None
    if quant.needs_hessians(settings):
        evaluator.calibrate(settings)
        hessians = evaluator.hessians
    calib = evaluator.tokens.calib if len(evaluator.tokens.calib) else evaluator.tokens.eval
    pt = proxy_sensitivity(evaluator.model, calib, settings, units=space.units, hessians=hessians)
    table = SensitivityTable(pt.units, pt.settings, kl=pt.kl, nbytes=pt.nbytes)
    table.computed, table.seconds = sum(len(v) for v in pt.kl.values()), pt.seconds
    if store is not None:
        share = pt.seconds / max(1, table.computed)  # what a pair cost, for the record
        store.record_sensitivity(model_fingerprint, key, [
            {"matrix": u, "setting": k, "kl": kl, "ppl": None, "bytes": table.nbytes[u][k], "seconds": share}
            for u, row in table.kl.items() for k, kl in row.items()])
    return table
