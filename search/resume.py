"""Opening a study, new or resumed: the Optuna study and the store's row, checked to be the same search."""

from __future__ import annotations

from typing import Any

import optuna

from evaluators import UserError
from search.record import RETRY_ON
from search.request import SearchRequest
from search.samplers import make_sampler
from search.space import SearchSpace
from studies import Store, StoreError, redact_url, scrub
from studies.retry import SCHEMA_RACE_SECONDS, with_db_retry

__all__ = ["optuna_storage", "open_study"]

# What a resumed study must share with the one stored (a different value is another search).
_SAME_DATA = ("model", "dataset", "seq_len", "n_eval", "n_calib", "seed", "reference_topk", "reference_tail", "dtype")
# What a study recorded before a key existed was measured with: float32; a top-k reference's tail as one bucket.
_BEFORE = {"dtype": "float32", "reference_tail": 0}
_SAME_SPACE = ("bits", "groups", "formats", "granularity", "kv")


def optuna_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage on ``url``. Searches starting together on a new database race to create
    Optuna's schema (the loser fails with "table studies already exists" or a duplicate schema
    version); a retry finds the schema made."""
    try:
        return with_db_retry(lambda: optuna.storages.RDBStorage(url), "opening the storage",
                             retry_on=RETRY_ON, timeout=SCHEMA_RACE_SECONDS, first_wait=0.2)
    except Exception as exc:  # Optuna wraps driver errors in several types
        raise StoreError(scrub(f"cannot open storage {redact_url(url)}: {str(exc).splitlines()[0]}", url)) from None


def open_study(request: SearchRequest, storage: str, store: Store, space: SearchSpace, budget_bytes: int,
               provenance: dict[str, Any], sampler_budget: int | None = None) -> tuple[optuna.Study, Any, bool]:
    """The Optuna study and the store's row of ``request``'s study, and whether it is new.

    ``sampler_budget``: where a budget-aware sampler keeps its children (default: the study's budget).

    Raises:
        UserError: the study exists with other data, another space or another budget.
    """
    name = request.study_name
    existing = store.find_study(name)
    if existing is not None:
        mismatch = [k for k in _SAME_DATA if existing.provenance.get(k, _BEFORE.get(k, provenance.get(k)))
                    != provenance.get(k)]
        wanted = space.to_dict()  # a resumed study must propose from the same space
        mismatch += [k for k in _SAME_SPACE
                     if existing.space.get(k, "matrix" if k == "granularity" else None) != wanted.get(k)]
        if mismatch or existing.budget_bytes != budget_bytes:
            what = ", ".join("KV cache (--context, --batch, --kv-formats, --kv-bits)" if k == "kv" else k
                             for k in mismatch) or "budget"
            raise UserError(f"study {name!r} already exists with a different {what}; "
                            "resume it with the same options or choose another --study name")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = make_sampler(request.sampler, request.seed, space.n_params, space=space,
                           budget_bytes=budget_bytes if sampler_budget is None else sampler_budget)
    study = optuna.create_study(study_name=name, storage=optuna_storage(storage), directions=["minimize", "minimize"],
                                sampler=sampler, load_if_exists=True)
    row = existing or store.create_study(
        name=name, model=request.model, dataset=request.dataset, budget_bytes=budget_bytes, numel=space.numel,
        sampler=request.sampler, space=space.to_dict(), provenance=provenance)
    return study, row, existing is None
