"""Exporting a chosen point of a study as a policy document."""

from __future__ import annotations

from typing import Any

from studies.store import NotFoundError, Store, StoreError

__all__ = ["export_policy"]



def export_policy(store: Store, study_name: str, *, trial: int | None = None,
                  budget_bytes: int | None = None) -> dict[str, Any]:
    """The policy of trial ``trial``, or of the best (lowest KL) front point within ``budget_bytes``.

    The document is the stored policy plus its measured metrics and the study's
    provenance, so ``turboquant eval`` can re-measure it on the same data. A point of a KV study
    (``--context``) has its cache settings in the policy's ``kv`` section, and its metrics say the
    cache's bytes (``kv_bytes``, included in ``bytes``) at ``kv_context`` tokens x ``kv_batch``.
    """
    study = store.get_study(study_name)
    if (trial is None) == (budget_bytes is None):
        raise StoreError("give exactly one of a trial number or a budget")
    if trial is None:
        front = store.front(study, budget_bytes)
        if front.empty:
            raise NotFoundError(f"study {study_name!r} has no finished trial within {budget_bytes} bytes")
        trial = int(front.iloc[-1]["trial"])
    row = store.trial(study, trial)
    if row is None or row.state != "complete":
        raise NotFoundError(f"study {study_name!r} has no complete trial {trial}")
    return {**row.policy,
            "model": study.model,
            "metrics": {"kl": row.kl, "ppl": row.ppl, "top1": row.top1, "logit_err": row.logit_err,
                        "bytes": row.bytes, "bpw": row.bpw, **_cache(study, row)},
            "provenance": {**study.provenance, "study": study.name, "trial": row.number, "dataset": study.dataset}}


def _cache(study: Any, row: Any) -> dict[str, Any]:
    """A KV study's point: ``bytes`` are weights + cache; say the cache's share and what it was counted at."""
    kv = study.space.get("kv")
    if kv is None:
        return {}
    return {"kv_bytes": row.kv_bytes, "kv_context": kv["context"], "kv_batch": kv["batch"]}
