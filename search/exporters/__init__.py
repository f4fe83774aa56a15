"""Exporting a study's point: one registry of exporters, and the one function both front ends call.

:func:`export_point` picks the point (a trial, or the best one within a budget: where the study has no
point using most of that budget, trials are run at it first, :mod:`search.at_budget`), then hands its
policy document (:func:`studies.export_policy`) to the exporter its format names. Each exporter writes its
file (or folder) whole or not at all and returns an :class:`Exported`: what was written and what the user
should know. The command line prints its ``lines``; the API returns its fields or the file.

A new export is one module here holding an :class:`Exporter` and its :func:`register_exporter` call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluators import UserError

__all__ = ["EXPORTERS", "ExportOptions", "Exported", "Exporter", "export_point", "file_formats", "register_exporter"]


@dataclass(frozen=True)
class ExportOptions:
    """What the person exporting decides, never the study.

    Attributes:
        nearest: a format the target runtime cannot run becomes its nearest type (each change reported);
            without it such a point is refused.
        trust_remote_code: the model may run its own code (the command line's flag; the service's
            ``--allow-remote-code``).
    """

    nearest: bool = False
    trust_remote_code: bool = False


@dataclass
class Exported:
    """What an exporter wrote.

    Attributes:
        format: the exporter's name.
        path: the file (or folder) written.
        trial: the study's trial whose policy it holds.
        metrics: what the search measured for that trial.
        lines: the report, one line each, as the command line prints it.
        approximations: each setting the target runtime could not hold as measured, and what it became.
        skipped: matrices the runtime keeps unquantized (or cannot name).
        flags: command-line arguments to run the file with (llama.cpp's KV cache types).
    """

    format: str
    path: Path
    trial: int
    metrics: dict[str, Any]
    lines: list[str]
    approximations: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)


class Exporter:
    """One export format. Subclasses set the class attributes and implement :meth:`write`."""

    name: str
    help: str  # one phrase for the command line's --format help
    media_type: str = "application/octet-stream"  # what the API answers with the file
    folder: bool = False  # writes a folder (the API, which returns one file, does not offer it)

    def write(self, doc: dict[str, Any], out: Path, options: ExportOptions) -> Exported:
        """Writes ``doc`` (a point from :func:`studies.export_policy`) to ``out``, whole or not at all."""
        raise NotImplementedError


EXPORTERS: dict[str, Exporter] = {}


def register_exporter(exporter: Exporter) -> Exporter:
    if exporter.name in EXPORTERS:
        raise ValueError(f"exporter {exporter.name!r} is registered twice")
    EXPORTERS[exporter.name] = exporter
    return exporter


def file_formats() -> tuple[str, ...]:
    """The formats whose export is one file (what the API offers)."""
    return tuple(name for name, e in EXPORTERS.items() if not e.folder)


def export_point(storage: str, study: str, fmt: str, out: Path, *, trial: int | None = None,
                 budget: str | None = None, refine_trials: int = 0, workers: int | None = None,
                 ray_address: str | None = None, options: ExportOptions = ExportOptions(),
                 progress: bool = True, store: Any = None) -> Exported:
    """Exports trial ``trial`` of ``study``, or its best point within ``budget`` (e.g. ``3.0bpw``), as ``fmt``
    into ``out``.

    Args:
        refine_trials: with ``budget``: trials run at it first where the study has no point using 99 % of
            it (0: stored points only).
        workers, ray_address: for those trials.
        store: an open :class:`studies.Store` of ``storage`` to read through (a service's; default: opened here).

    Raises:
        UserError: an unknown format, a bad budget, an ``out`` of the wrong kind, a point the format cannot
            hold; the store's errors (no such study or trial) as they are.
    """
    import studies
    from search.at_budget import point_at_budget
    from search.budget import parse_budget

    exporter = EXPORTERS.get(fmt)
    if exporter is None:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORTERS)}")
    if (trial is None) == (budget is None):
        raise UserError("give exactly one of a trial number or a budget")
    if exporter.folder and out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; {fmt} writes a folder (give a new or existing folder)")
    if not exporter.folder and out.is_dir():
        raise UserError(f"--out {out} is a folder; give the file to write")
    if refine_trials < 0:
        raise UserError(f"--refine-trials must be 0 or more, got {refine_trials}")
    if store is None:
        store = studies.Store(storage, create=False)  # a missing SQLite file is refused, not created empty
    budget_bytes = None
    if budget is not None:
        budget_bytes = parse_budget(budget, store.get_study(study).numel)
        if refine_trials:
            trial = point_at_budget(storage, study, budget_bytes, trials=refine_trials, workers=workers,
                                    ray_address=ray_address, trust_remote_code=options.trust_remote_code,
                                    progress=progress)
            budget_bytes = budget_bytes if trial is None else None
    doc = studies.export_policy(store, study, trial=trial, budget_bytes=budget_bytes)
    return exporter.write(doc, out, options)


# The exporters: each module registers its own.
from search.exporters import checkpoint, compressed_tensors, gguf, policy_json, runtime_configs  # noqa: E402,F401
