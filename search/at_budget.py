"""A study's point at any budget: what ``export --budget B`` and the API's export return.

A study's trials sit near the budgets its seeds were solved at and near its own budget, where the
sampler works; a user's B between them may have no point that uses it. Then the study is run a few
more trials *at B*: the allocations solved from its sensitivity table at B (DP and greedy) and evo
children kept at B, measured by the workers and stored as the study's own trials (so the next
export at B finds them). The table is the one the study was searched with, read from the store
(the proxy's predictions are stored too), so this costs those trials and no new table.
"""

from __future__ import annotations

import logging
from typing import Any

from optuna.trial import TrialState

from evaluators import UserError
from evaluators.context import DataConfig
from search.request import SearchRequest
from studies import Store

__all__ = ["FILL", "REFINE_TRIALS", "point_at_budget", "request_of"]

log = logging.getLogger(__name__)
FILL = 0.99  # a point "uses" a budget when its bytes are at least this share of it
REFINE_TRIALS = 8  # trials run at a budget the study has no point at: the 2 solved seeds, then evo


def request_of(row: Any, *, trust_remote_code: bool = False, **changes: Any) -> SearchRequest:
    """The request that resumes the stored study ``row`` (its data, space and budget), with ``changes``.

    A study stored before its sensitivity options were recorded gets the default method. A database may be
    shared, so a study on a model that runs its own code is resumed only with ``trust_remote_code`` from the
    caller (the command line's flag, the service's operator), never from the stored provenance."""
    from evaluators.checkpoint import checked_provenance

    provenance = checked_provenance({"provenance": row.provenance}, f"study {row.name}",
                                    trust_remote_code=trust_remote_code)["provenance"]
    space = row.space
    options: dict[str, Any] = {
        "study": row.name, "budget": provenance.get("budget") or str(row.budget_bytes),
        "bits": space["bits"], "groups": space["groups"], "formats": space["formats"],
        "granularity": space.get("granularity", "matrix"), "sampler": row.sampler,
        "reference_topk": provenance.get("reference_topk"), "sensitivity": provenance.get("sensitivity", True),
        "sensitivity_method": provenance.get("sensitivity_method") or "proxy",
        "sensitivity_seqs": provenance.get("sensitivity_seqs")}
    kv = space.get("kv")
    if kv is not None:  # a search of weights and KV cache at a context
        options.update(context=kv["context"], batch=kv["batch"], kv_formats=kv["formats"], kv_bits=kv["bits"])
    return SearchRequest.from_data(DataConfig.from_dict(provenance), **{**options, **changes})


def _finished_and_waiting(storage: str, name: str) -> tuple[int, int]:
    """Finished trials, and seeds enqueued but not run yet (Optuna runs those first, whatever is asked)."""
    import optuna

    from search.resume import optuna_storage

    study = optuna.load_study(study_name=name, storage=optuna_storage(storage))
    count = lambda *states: len(study.get_trials(deepcopy=False, states=states))  # noqa: E731
    return count(TrialState.COMPLETE, TrialState.PRUNED), count(TrialState.WAITING)


def _best_within(store: Store, row: Any, budget_bytes: int) -> Any | None:
    front = store.front(row, budget_bytes)
    return None if front.empty else front.iloc[-1]  # the front is sorted by bytes: the last has the least KL


def _searchable(store: Store, name: str) -> bool:
    """Whether the study has Optuna's side too (a study only recorded in the store cannot be run on),
    asked without creating Optuna's tables."""
    from sqlalchemy import inspect, text

    if not inspect(store.engine).has_table("studies"):
        return False
    with store.engine.connect() as conn:
        return conn.execute(text("SELECT 1 FROM studies WHERE study_name = :n"), {"n": name}).first() is not None


def point_at_budget(storage: str, name: str, budget_bytes: int, *, trials: int = REFINE_TRIALS,
                    workers: int | None = None, ray_address: str | None = None, progress: bool = True,
                    trust_remote_code: bool = False) -> int | None:
    """The trial number of the best point of study ``name`` within ``budget_bytes``.

    If the best stored point uses less than :data:`FILL` of the budget (and the budget is within the
    study's), ``trials`` more trials are run at the budget first (see the module's docstring), after
    any seeds the study had enqueued and not run yet. ``None`` when nothing can be run: the stored
    points are all there is (the budget is above the study's, or the study has no Optuna side).

    Raises:
        UserError: the budget is below the smallest policy of the study's space.
    """
    from search.driver import SearchConfig, run_search

    store = Store(storage)
    row = store.get_study(name)
    best = _best_within(store, row, budget_bytes)
    if best is not None and best["bytes"] >= FILL * budget_bytes:
        return int(best["trial"])
    if budget_bytes > row.budget_bytes or not _searchable(store, name):
        return None if best is None else int(best["trial"])
    if best is not None:
        log.warning("study %s: the best point within %s bytes uses %.1f %% of it; running %d trials at that budget",
                    name, f"{budget_bytes:,}", 100.0 * best["bytes"] / budget_bytes, trials)
    finished, waiting = _finished_and_waiting(storage, name)
    if waiting:  # a study stopped before its seeds ran: they run first, then the trials at the budget
        log.warning("study %s: %d seeds it had not run yet run first", name, waiting)
    changes: dict[str, Any] = {"trials": finished + waiting + trials, "sampler": "evo", "sensitivity": True}
    if workers is not None:
        changes["workers"] = workers
    run_search(SearchConfig(request_of(row, trust_remote_code=trust_remote_code, **changes), storage=storage, ray_address=ray_address, progress=progress,
                            target_bytes=budget_bytes))
    best = _best_within(store, row, budget_bytes)
    if best is None:
        raise UserError(f"study {name!r}: no policy fits in {budget_bytes:,} bytes")
    return int(best["trial"])
