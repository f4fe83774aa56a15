"""One way for a benchmark to write its results file: whole, headed by the command that regenerates it."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def header() -> str:
    """The line a results file starts with: the command as run (from the repository root), its date, the
    machine's cores and load (timings in the file mean little on a busy machine)."""
    script = Path(sys.argv[0]).resolve().relative_to(RESULTS.parent.parent)
    load = os.getloadavg()[0]
    return (f"$ .venv/bin/python {script} {' '.join(sys.argv[1:])}".rstrip()
            + f"   # {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()}-core machine, "
              f"load {load:.2f} at the start")


def write_results(name: str, text: str, head: str) -> Path:
    """Writes ``results/<name>`` whole (through a temporary file: a stopped run leaves the last whole one),
    ``head`` (:func:`header`, taken when the run started) on top, and prints the text."""
    out = RESULTS / name
    tmp = out.with_name(out.name + ".part")
    tmp.write_text(head + "\n" + text.rstrip("\n") + "\n")
    tmp.replace(out)
    print(text.rstrip("\n"))
    return out
