"""Sensitivity: the KL to the float model when only one unit (a matrix, block or layer) is quantized.

The table is the input of the solved seeds (:mod:`search.seeds`): assuming the losses of
different units add up, it predicts any policy's KL without a forward pass. It costs one
forward per (unit, setting) pair, so it is stored in the database, keyed by model and data
fingerprints, and later studies on the same model and data reuse every pair already measured.
A unit is stored under its own name (a block's is its module path), so granularities never mix.

A KV cache unit (an attention module's keys or values, :func:`quant.kv.kv_unit`) is a unit too: its
pair is the KL with only that tensor quantized. Its bytes depend on the context the search budgets
for, so they come from the space, never from the store.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
from tqdm.auto import tqdm

import quant
from evaluators import Evaluator
from evaluators.kv_attention import attention_modules
from quant.kv import FLOAT_KV, KVSetting, kv_bytes, split_kv_unit
from studies import SensitivityMeasure, Store

if TYPE_CHECKING:
    from search.dispatch import Dispatcher
    from search.request import MeasureRequest
    from search.space import SearchSpace

__all__ = ["KV_PROXY_VERSION", "PROXY_VERSION", "SensitivityTable", "measure_on_workers", "measure_pair",
           "measure_sensitivity", "predict_on_model", "predict_proxy", "proxy_on_model", "proxy_table",
           "run_sensitivity"]

log = logging.getLogger(__name__)
UNFIT_BYTES = 1 << 62  # the bytes of a (unit, setting) pair that cannot exist
_FLUSH_EVERY = 32  # rows per database write: an interrupted run keeps most of its work


@dataclass
class SensitivityTable:
    """KL and packed bytes of every (unit, setting); ``computed`` pairs were measured now."""

    units: dict[str, list[str]]  # unit name -> its matrices (none for a KV unit)
    settings: list[Any]  # QuantSettings, then the KV units' KVSettings
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

    def merged(self, other: "SensitivityTable") -> "SensitivityTable":
        """This table and ``other`` (other units, e.g. the KV cache's) as one."""
        return SensitivityTable({**self.units, **other.units},
                                self.settings + [s for s in other.settings if s not in self.settings],
                                {**self.kl, **other.kl}, {**self.nbytes, **other.nbytes},
                                self.computed + other.computed, self.reused + other.reused,
                                self.seconds + other.seconds)

    def most_sensitive(self, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` units with the largest KL at their cheapest setting."""
        names, kl, nb = self.arrays()
        cheapest = nb.argmin(axis=1)
        worst = [(names[i], float(kl[i, cheapest[i]])) for i in range(len(names))]
        return sorted(worst, key=lambda t: -t[1])[:k]


def _per_unit(shapes: dict[str, tuple[int, int]], settings: list[quant.QuantSetting],
              units: dict[str, list[str]] | None) -> dict[str, list[quant.QuantSetting]]:
    """Each unit's settings: those all of its matrices' rows fit (a llama.cpp type's block may not)."""
    units = units or {m: [m] for m in shapes}
    return {u: [s for s in settings if all(s.fits(shapes[m]) for m in ms)] for u, ms in units.items()}


def _kv_per_unit(space: SearchSpace) -> dict[str, list[KVSetting]]:
    """A KV space's units and their settings (float, which costs no KL, left out)."""
    return {u: [s for s in space.kv.ladders[u] if not s.is_float] for u in space.kv.units}


def _plan(per_unit: dict[str, list[Any]], n_eval: int, units: dict[str, list[str]], store: Store | None,
          model_fingerprint: str, data_fingerprint: str, windows: int | None,
          nbytes: Any = None) -> tuple[SensitivityTable, list[tuple[str, Any]], str, int | None]:
    """The table with every pair the store holds, the pairs still to measure, and the data key and
    window count they are measured under. ``nbytes(unit, setting)``: the bytes of a KV unit's pair (they
    depend on the context the search budgets for, so the stored ones are not used)."""
    if windows is not None and windows < n_eval:
        data_fingerprint = f"{data_fingerprint}/first{windows}"  # fewer tokens are other data
    else:
        windows = None
    settings = list(dict.fromkeys(s for ss in per_unit.values() for s in ss))
    table = SensitivityTable(dict(units), settings)
    known = store.sensitivity(model_fingerprint, data_fingerprint) if store is not None else {}
    todo: list[tuple[str, Any]] = []
    for name, unit_settings in per_unit.items():
        table.kl[name], table.nbytes[name] = {}, {}
        for s in unit_settings:
            hit = known.get((name, s.key()))
            if hit is None:
                todo.append((name, s))
            else:
                table.kl[name][s.key()] = hit.kl
                table.nbytes[name][s.key()] = nbytes(name, s) if split_kv_unit(name) else hit.bytes
    table.reused = sum(len(v) for v in table.kl.values())
    return table, todo, data_fingerprint, windows


def _with_float(table: SensitivityTable, space: SearchSpace) -> SensitivityTable:
    """A KV table with each unit's float setting (KL 0: nothing quantized) at its bytes."""
    if FLOAT_KV not in table.settings:
        table.settings.append(FLOAT_KV)
    for u in space.kv.units:
        if FLOAT_KV in space.kv.ladders[u]:
            table.kl[u][FLOAT_KV.key()], table.nbytes[u][FLOAT_KV.key()] = 0.0, space.kv.unit_nbytes(u, FLOAT_KV)
    return table


def _add(table: SensitivityTable, rows: list[SensitivityMeasure]) -> None:
    for r in rows:
        table.kl[r.unit][r.setting], table.nbytes[r.unit][r.setting] = r.kl, r.bytes


def measure_pair(evaluator: Evaluator, unit: str, matrices: list[str], setting: Any,
                 windows: int | None) -> SensitivityMeasure:
    """The store's row for one pair: the metrics with only ``matrices`` quantized at ``setting``, or
    for a KV unit only its module's keys or values cached at that :class:`~quant.kv.KVSetting`."""
    t = time.perf_counter()
    kv = split_kv_unit(unit)
    if kv is None:
        r = evaluator.evaluate_partial(dict.fromkeys(matrices, setting), windows=windows)
    else:
        module, role = kv
        pair = (setting, FLOAT_KV) if role == "k" else (FLOAT_KV, setting)
        r = evaluator.evaluate_partial({}, windows=windows, kv={module: pair})
        # For the record, this tensor's bytes over one window; a search counts them at its context (the space's).
        info = attention_modules(evaluator.model)[module]
        r["bytes"] = kv_bytes(setting, info.kv_heads, info.head_dim, info.cached_tokens(evaluator.tokens.seq_len))
    return SensitivityMeasure(unit, setting.key(), r["kl"], r["ppl"], int(r["bytes"]), time.perf_counter() - t)


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
    per_unit = _per_unit(evaluator.matrices, list(settings), units)
    table, todo, data_fingerprint, windows = _plan(per_unit, len(evaluator.tokens.eval),
                                                   units or {m: [m] for m in evaluator.matrices}, store,
                                                   model_fingerprint, data_fingerprint, windows)
    t0 = time.perf_counter()
    pending: list[SensitivityMeasure] = []
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


def measure_on_workers(workers: Dispatcher, space: SearchSpace, n_eval: int, *, store: Store | None = None,
                       model_fingerprint: str = "", data_fingerprint: str = "", windows: int | None = None,
                       progress: bool = True, chunk: int = 4) -> SensitivityTable:
    """:func:`measure_sensitivity` of a search space's units (its KV units too) on a
    :class:`~search.dispatch.Dispatcher`'s workers: the pairs the store lacks go out ``chunk`` at a
    time to whichever worker is idle, and each chunk is stored as it comes back, so an interrupted
    table resumes where it stopped. A worker that dies is replaced and its chunk run again (the
    dispatcher's retries); a chunk that fails stops the table with the reason.
    """
    from search.record import Failed, Task

    per_unit: dict[str, list[Any]] = {}
    units: dict[str, list[str]] = {}
    for part_settings, part_units, _, _ in _parts(space).values():  # the weights' units, then the cache's
        per_unit.update(part_settings)
        units.update(part_units)
    table, todo, data_fingerprint, windows = _plan(per_unit, n_eval, units, store, model_fingerprint,
                                                   data_fingerprint, windows, nbytes=space.unit_nbytes)
    by_key = {s.key(): s for s in table.settings}
    t0 = time.perf_counter()
    chunks = [[(u, table.units[u], s.to_dict()) for u, s in todo[i:i + chunk]] for i in range(0, len(todo), chunk)]
    bar = tqdm(total=len(todo), desc="sensitivity", unit="pair", disable=not progress or not todo, dynamic_ncols=True)
    try:
        while chunks or workers.busy:
            while chunks and workers.idle:
                workers.submit(Task(workers.idle.pop(), "measure_pairs", (chunks.pop(0), windows)))
            task, rows = workers.next()
            if isinstance(rows, Failed):
                raise RuntimeError(f"sensitivity: a worker failed measuring {task.args[0][0][0]}: {rows}")
            if store is not None:
                store.record_sensitivity(model_fingerprint, data_fingerprint, rows)
            # A KV unit's bytes depend on the context the search budgets for, not the window it was measured on.
            _add(table, [replace(r, bytes=space.unit_nbytes(r.unit, by_key[r.setting])) if space.is_kv(r.unit) else r
                         for r in rows])
            bar.update(len(rows))
    finally:
        bar.close()
    table.computed = len(todo)
    table.seconds = time.perf_counter() - t0
    return _with_float(table, space) if space.kv else table


def run_sensitivity(request: MeasureRequest, storage: str, *, progress: bool = True) -> SensitivityTable:
    """What ``turboquant sensitivity`` runs: the table a search with the same options starts from, by the
    request's method (the proxy's prediction by default, or one forward per pair), reused from the store
    where it holds it and stored.

    The proxy runs in this process, its memory planned and a phase that cannot fit refused up front, as
    a search's driver does (:class:`search.memory.DriverPlan`). The request was validated when it was
    built, so bad options never reach the storage or the loading."""
    from search.memory import DriverPlan, Phases

    store = Store(storage)
    loaded, tokens = request.data_config().load()
    space = request.space(quant.weight_matrices(loaded.model))
    if request.sensitivity_method == "measured":
        return measure_sensitivity(Evaluator(loaded, tokens), space.settings(), units=space.units, store=store,
                                   model_fingerprint=loaded.fingerprint, data_fingerprint=tokens.fingerprint,
                                   windows=request.sensitivity_seqs, progress=progress)
    phases = Phases()
    try:
        plan = DriverPlan.of(loaded.model, tokens, space, None, phases, proxied=True, reference=False)
        phases.start("sensitivity proxy", plan.proxy, plan.proxy_what, plan.hint)
        return proxy_on_model(store, loaded, tokens, space, plan.hessian_bytes)
    finally:
        phases.end()


def proxy_on_model(store: Store | None, loaded: Any, tokens: Any, space: SearchSpace, hessian_bytes: int | None
                   ) -> SensitivityTable:
    """The proxy's table, predicted in this process on the float model (no evaluator: it would keep a float
    copy of every matrix), gptq's Hessians ``hessian_bytes`` at a time, or read from the store."""
    def predict(kinds: list[str]) -> dict[str, Any]:
        return predict_on_model(loaded.model, tokens, space, kinds, hessian_bytes=hessian_bytes)

    table = proxy_table(None, space, store=store, model_fingerprint=loaded.fingerprint,
                        data_fingerprint=tokens.fingerprint, predict=predict)
    logging.getLogger("search.driver").info("sensitivity proxy: %d pairs predicted in %.1f s, %d reused",
                                            table.computed, table.seconds, table.reused)
    return table


PROXY_VERSION = "proxy-v2"  # in the stored rows' data key: new predictions (v2: GGUF gptq damp 0.3) never reuse old
KV_PROXY_VERSION = "kv-proxy-v1"


def proxy_table(evaluator: Evaluator | None, space: SearchSpace, *, store: Store | None = None,
                model_fingerprint: str = "", data_fingerprint: str = "", predict: Any = None) -> SensitivityTable:
    """The table predicted by the one-pass proxy (:func:`evaluators.proxy.proxy_sensitivity`: diagonal
    Fisher of the model's own predictions on the calibration windows), for the space's units and settings;
    a space's KV units by :func:`evaluators.kv_proxy.kv_proxy_sensitivity` (the same Fisher, of the cached
    keys and values).

    Seconds instead of one forward per pair. With a ``store`` the predictions are kept beside the measured
    tables (under ``data_fingerprint/proxy-vN``, the cache's under ``.../kv-proxy-vN``), so a resumed study
    and ``export --budget`` solve from the same numbers without the Fisher pass; a part (weights, cache) the
    store holds whole is read, not recomputed.

    Args:
        predict: ``predict(kinds)`` -> ``{kind: (kl, bytes, seconds)}`` for the missing kinds (``"weights"``,
            ``"kv"``), computed elsewhere (a GPU worker: :meth:`search.workers.TrialWorker.proxy`); default
            :func:`predict_proxy` on ``evaluator``.
    """
    parts = _parts(space)
    tables: dict[str, SensitivityTable] = {}
    missing = []
    for kind, (per_unit, units, version, nbytes) in parts.items():
        tables[kind], todo, _, _ = _plan(per_unit, 0, units, store, model_fingerprint,
                                         f"{data_fingerprint}/{version}", None, nbytes=nbytes)
        if store is None or todo:
            missing.append(kind)
    if missing:
        predicted = (predict or (lambda kinds: predict_proxy(evaluator, space, kinds)))(missing)
        for kind in missing:
            kl, nb, seconds = predicted[kind]
            table = SensitivityTable(tables[kind].units, tables[kind].settings, kl=kl, nbytes=nb)
            table.computed, table.seconds = sum(len(v) for v in kl.values()), seconds
            if store is not None:
                share = seconds / max(1, table.computed)  # what a pair cost, for the record
                store.record_sensitivity(model_fingerprint, f"{data_fingerprint}/{parts[kind][2]}", [
                    SensitivityMeasure(u, k, v, None, nb[u][k], share)
                    for u, row in kl.items() for k, v in row.items()])
            tables[kind] = table
    return tables["weights"].merged(_with_float(tables["kv"], space)) if space.kv else tables["weights"]


def _parts(space: SearchSpace) -> dict[str, tuple[dict[str, list[Any]], dict[str, list[str]], str, Any]]:
    """The proxy's two kinds of units: per kind, each unit's settings, the units, the stored version and
    the bytes of a pair where the store's are not used (the cache's, see :func:`_plan`)."""
    parts = {"weights": (_per_unit(space.matrices, space.settings(), space.units), dict(space.units),
                         PROXY_VERSION, None)}
    if space.kv:
        parts["kv"] = (_kv_per_unit(space), dict.fromkeys(space.kv.units, []), KV_PROXY_VERSION, space.unit_nbytes)
    return parts


def predict_proxy(evaluator: Evaluator, space: SearchSpace, kinds: Iterable[str] = ("weights", "kv"), *,
                  hessian_bytes: int | None = None) -> dict[str, tuple]:
    """The proxy's predictions of ``kinds`` on ``evaluator``'s model and calibration windows (the
    evaluation windows when there are none): ``{kind: (kl, bytes, seconds)}``, tables keyed by unit and
    setting key. The evaluator's Hessians are used when it holds them (a worker that ran gptq trials);
    else they are collected for the proxy alone, ``hessian_bytes`` at a time (:func:`predict_on_model`)."""
    evaluator.restore_float()
    return predict_on_model(evaluator.model, evaluator.tokens, space, kinds, hessians=evaluator.hessians,
                            hessian_bytes=hessian_bytes, batch_size=evaluator.batch_size)


def predict_on_model(model: Any, tokens: Any, space: SearchSpace, kinds: Iterable[str] = ("weights", "kv"), *,
                     hessians: Any = None, hessian_bytes: int | None = None, batch_size: int = 2) -> dict[str, tuple]:
    """:func:`predict_proxy` on a float ``model`` and its :class:`~evaluators.TokenSets`, with no
    :class:`~evaluators.Evaluator` (which keeps a float copy of every matrix: the driver needs none).

    Without ``hessians``, those gptq needs are collected group by group, at most ``hessian_bytes`` held
    at once (one calibration pass per group; the 28 ``down_proj`` Hessians of a 1.5B model alone are
    9 GB), with the same numbers as all at once.
    """
    from evaluators import calibration_hessians
    from evaluators.proxy import proxy_sensitivity

    calib = tokens.calib if len(tokens.calib) else tokens.eval
    out = {}
    if "weights" in kinds:
        settings = space.settings()
        source = hessians
        if source is None and quant.needs_hessians(settings):
            if len(tokens.calib):
                def source(names: Any) -> Any:
                    return calibration_hessians(model, tokens, names, batch_size)
            else:
                source = calibration_hessians(model, tokens, [], batch_size)  # {} (it says why): gptq as rtn
        pt = proxy_sensitivity(model, calib, settings, units=space.units, hessians=source,
                               hessian_bytes=hessian_bytes)
        out["weights"] = pt.kl, pt.nbytes, pt.seconds
    if "kv" in kinds and space.kv:
        out["kv"] = _kv_proxy(model, calib, space)
    return out


def _kv_proxy(model: Any, calib: Any, space: SearchSpace) -> tuple[dict, dict, float]:
    from evaluators.kv_proxy import kv_proxy_sensitivity

    roles = {role: list(dict.fromkeys(s for u, (_, r) in space.kv.units.items() if r == role
                                      for s in space.kv.ladders[u] if not s.is_float)) for role in ("k", "v")}
    pt = kv_proxy_sensitivity(model, calib, roles)
    keys = {s.key(): s for ss in roles.values() for s in ss}
    nbytes = {u: {k: space.unit_nbytes(u, keys[k]) for k in row} for u, row in pt.kl.items()}
    return pt.kl, nbytes, pt.seconds
