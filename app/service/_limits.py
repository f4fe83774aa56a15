"""What a request through the API may ask of the server: which models and texts it may read, whether a
model may run its own code, how many searches run at once. The operator sets these when starting the
service; a token holder is not the machine's user, so nothing a request names reaches a file the
operator did not offer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from evaluators import UserError
from evaluators.data import DEFAULT_CORPUS
from evaluators.models import MODEL_ALIASES, check_model_name
from app.service._schemas import HUB_ID, StudyRequest

__all__ = ["ServiceLimits", "vet"]


@dataclass(frozen=True)
class ServiceLimits:
    """The operator's limits on what requests may ask.

    Attributes:
        data_dir: folder whose text files requests may name as a dataset (by a name relative to it);
            ``None``: only the embedded corpus and hub datasets.
        models_dir: folder whose model folders requests may name (relative to it); ``None``: only the
            aliases and hub ids.
        allow_remote_code: whether a request may ask ``trust_remote_code`` (a model's own Python code,
            run on this server).
        max_running: searches running at once; more wait in a queue.
    """

    data_dir: Path | None = None
    models_dir: Path | None = None
    allow_remote_code: bool = False
    max_running: int = 2


def _inside(folder: Path | None, name: str, what: str, option: str, offered: str) -> Path | None:
    """``folder / name`` if it stays inside ``folder`` once links are followed; ``None`` without a folder."""
    if folder is None:
        return None
    root = folder.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise UserError(f"{what} {name!r} is outside the service's {option} folder; {offered}")
    return path if path.exists() else None


def vet(req: StudyRequest, limits: ServiceLimits, *, local: bool = True) -> StudyRequest:
    """``req`` with its model and dataset resolved to what the server offers; refused otherwise. ``local``:
    the searches run on this machine's Ray (a cluster's CPUs are counted when its search starts).

    Raises:
        UserError: remote code not allowed, a dataset or model that is a path the operator did not offer,
            more workers than this machine has cores.
    """
    cores = os.cpu_count() or 1
    if local and req.workers is not None and req.workers > cores:
        raise UserError(f"workers {req.workers}: this server has {cores} cores and each worker takes one; "
                        f"ask for {cores} or fewer")
    if req.trust_remote_code and not limits.allow_remote_code:
        raise UserError("this service does not run a model's own code: trust_remote_code is refused (the "
                        "operator may allow it with `turboquant serve --allow-remote-code`)")
    update = {}
    dataset = req.dataset
    if dataset != DEFAULT_CORPUS:
        offered = (f"datasets here are {DEFAULT_CORPUS!r}, hf:NAME[:CONFIG]"
                   + (" or a file under the data folder" if limits.data_dir else
                      " (files only under a folder the operator offers with --data-dir)"))
        if dataset.startswith("hf:"):
            name, _, config = dataset[3:].partition(":")
            if not HUB_ID.match(name) or (config and not HUB_ID.match(config)):
                raise UserError(f"dataset {dataset!r} is not a hub dataset name; {offered}")
        else:
            path = _inside(limits.data_dir, dataset, "dataset", "--data-dir", offered)
            if path is None or not path.is_file():
                raise UserError(f"dataset {dataset!r} is not offered by this service; {offered}")
            update["dataset"] = str(path)
    model = req.model
    if model not in MODEL_ALIASES:
        offered = (f"models here are {', '.join(MODEL_ALIASES)}, hub ids (org/name)"
                   + (" or folders under the models folder" if limits.models_dir else
                      " (folders only under a folder the operator offers with --models-dir)"))
        path = _inside(limits.models_dir, model, "model", "--models-dir", offered)
        if path is not None and path.is_dir():
            check_model_name(str(path))
            update["model"] = str(path)
        elif not HUB_ID.match(model) or "/" not in model or Path(model).exists():
            raise UserError(f"model {model!r} is not offered by this service; {offered}")
    return req.model_copy(update=update) if update else req
