"""A whole default search of the embedded model on CUDA and on the CPU, side by side.

One GPU session (a few minutes of an H200; the embedded model is converted once, ~30 s):

    timeout 540 .venv/bin/python benchmarks/gpu_search.py --trials 60 --cpu-trials 6 --proxy-on cuda \\
        --out benchmarks/results/gpu_search_cuda_h200.txt

On a machine without CUDA the cuda column says it was not run (this project's CPU figures:
``--devices cpu --trials 4 --proxy-on cpu``, in ``benchmarks/results/gpu_search_cpu.txt``; the proxy on
this 2-core machine takes 243 s, 4.0 s per unit).

Each column runs ``turboquant search --model smollm2-135m --budget 3.0bpw`` with every other option
at the defaults of :class:`search.request.SearchRequest` when it runs (printed at the top), through
:func:`search.driver.run_search` into a fresh SQLite store, with ``--device`` set and ``--trials`` small.
Printed per device: the workers chosen; a trial's cost (the worker's quantize + forward, median) over
one forward of the float model on the same windows and batch, in this process; trials per minute over
the search's trial phase (worker start included) and in steady state (between the first and last
recorded trial); the sensitivity proxy's time on the device (:func:`search.sensitivity.proxy_table`, in
this process) and, if the default search runs sensitivity, its time in the search (from its log); the
peak GPU memory of the search (nvidia-smi, all processes, over the idle baseline) and of this
process's forward + proxy (``torch.cuda.max_memory_allocated``). Issue 16's goals on an H200: trial
<= 1.3x one forward, >= 60 trials per minute, proxy <= 10 s.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path[0] = str(Path(__file__).resolve().parents[1])  # benchmarks/kernels.py must not shadow `kernels`

import torch  # noqa: E402

from evaluators import Evaluator  # noqa: E402
from search.driver import SearchConfig, run_search  # noqa: E402
from search.placement import CPU_BATCH  # noqa: E402
from search.budget import parse_budget  # noqa: E402
from search.request import SearchRequest  # noqa: E402
from search.seeds import solved_policies  # noqa: E402
from search.sensitivity import proxy_table  # noqa: E402
from studies import Store  # noqa: E402
from studies.models import TrialRow  # noqa: E402

GIB = 2 ** 30
SHOWN = ("trials", "sampler", "bits", "groups", "formats", "granularity", "seq_len", "eval_seqs", "calib_seqs",
         "workers", "dtype", "sensitivity", "sensitivity_method", "multi_fidelity", "reference_topk")


class _Log(logging.Handler):
    """Keeps the search's log lines (the workers chosen, the sensitivity's time)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def find(self, pattern: str) -> re.Match | None:
        return next((m for m in map(re.compile(pattern).search, self.lines) if m), None)


class _GpuPeak:
    """The most GPU memory in use (MiB, summed over GPUs, all processes) while it runs, by nvidia-smi."""

    def __init__(self, enabled: bool = True) -> None:
        self.baseline = self._used() if enabled else None
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    @staticmethod
    def _used() -> int | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
            return sum(int(v) for v in out.split())
        except (OSError, subprocess.SubprocessError, ValueError):
            return None

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            used = self._used()
            if used is not None:
                self.peak = max(self.peak or 0, used)

    def __enter__(self) -> "_GpuPeak":
        if self.baseline is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()

    def gib(self) -> float | None:
        return None if self.baseline is None else (self.peak - self.baseline) / 1024


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def _forward_seconds(ev: Evaluator, batch: int, device: str, repeats: int = 3) -> float:
    """One forward of the float model over the evaluation windows (logits to float32 log-probs, as a
    trial's), at the workers' batch: the median of ``repeats`` warm runs."""
    ids = torch.from_numpy(ev.tokens.eval).to(ev.device)
    times = []
    for i in range(repeats + 1):  # the first run warms up (allocations, kernels), untimed
        _sync(device)
        t0 = time.perf_counter()
        for j in range(0, len(ids), batch):
            logits = ev.model(input_ids=ids[j:j + batch], use_cache=False).logits[:, :-1]
            torch.log_softmax(logits.float(), dim=-1)
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _trial_rows(storage: str, study: str) -> list[tuple[dict[str, Any], Any]]:
    store = Store(storage)
    row = store.get_study(study)
    with store.session() as s:
        return [(r.timings or {}, r.created_at) for r in s.query(TrialRow).filter(TrialRow.study_id == row.id)
                .order_by(TrialRow.created_at) if r.state != "failed"]


def run_device(device: str, trials: int, proxy: bool) -> dict[str, Any]:
    """The search on ``device`` and the in-process forward and proxy; the figures by row name."""
    log = _Log()
    logging.getLogger("search").addHandler(log)
    logging.getLogger("search").setLevel(logging.INFO)
    request = SearchRequest(model="smollm2-135m", budget="3.0bpw", trials=trials, device=device,
                            study=f"gpu-search-{device}")
    with tempfile.TemporaryDirectory() as tmp:
        storage = f"sqlite:///{tmp}/bench.db"
        t0 = time.perf_counter()
        with _GpuPeak(enabled=device == "cuda") as gpu:
            summary = run_search(SearchConfig(request, storage=storage, progress=False))
        wall = time.perf_counter() - t0
        rows = _trial_rows(storage, request.study_name)
    logging.getLogger("search").removeHandler(log)
    compute = [t["quantize"] + t["forward"] for t, _ in rows if "quantize" in t]
    quantize = [t["quantize"] for t, _ in rows if "quantize" in t]
    forwards = [t["forward"] for t, _ in rows if "forward" in t]
    stamps = [c for _, c in rows]
    steady = (60 * (len(stamps) - 1) / (stamps[-1] - stamps[0]).total_seconds()
              if len(stamps) > 1 and stamps[-1] > stamps[0] else None)
    plan = log.find(r"workers: (.*)")
    batch = log.find(r"(\d+) windows per forward")
    batch = int(batch.group(1)) if batch else CPU_BATCH
    threads = log.find(r"(\d+) torch threads each")
    sens = log.find(r"sensitivity[^:]*: \d+ pairs \w+ in ([0-9.]+) s")
    out: dict[str, Any] = {
        "workers (how chosen)": plan.group(1) if plan else "?",
        "trials run / complete / pruned / failed": f"{summary['ran']} / {summary['complete']} / "
                                                   f"{summary['pruned']} / {summary['failed']}",
        "search wall, s (load, reference, seeds, trials)": f"{wall:.1f}",
        "trial cost, s (quantize + forward, median)": f"{statistics.median(compute):.3f}" if compute else "-",
        "  of which quantize, s (median; cold while the packed cache fills)":
            f"{statistics.median(quantize):.3f}" if quantize else "-",
        "  of which forward, s (median)": f"{statistics.median(forwards):.3f}" if forwards else "-",
        "trials per minute (trial phase, worker start included)": f"{60 * summary['ran'] / summary['seconds']:.1f}"
        if summary["seconds"] else "-",
        "trials per minute (steady: first to last trial)": f"{steady:.1f}" if steady else "-",
        "sensitivity in the search, s": sens.group(1) if sens else f"not run (sensitivity={request.sensitivity})",
        "peak GPU memory of the search, GiB (nvidia-smi)": "-" if gpu.gib() is None else f"{gpu.gib():.2f}",
    }
    # In this process, after the search (its workers are gone): the float forward and the proxy, on a
    # CPU with a worker's torch threads (the trial's own forward ran on that many).
    if device == "cpu" and threads:
        torch.set_num_threads(int(threads.group(1)))
    data = request.data_config(device)
    loaded, tokens = data.load()
    loaded.model.to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ev = Evaluator(loaded, tokens, reference_topk=request.reference_topk, batch_size=batch)
    forward = _forward_seconds(ev, batch, device)
    where = f"{torch.get_num_threads()} threads" if device == "cpu" else "the GPU"
    out[f"one forward, s ({len(tokens.eval)} windows x {tokens.seq_len}, batch {batch}, {data.dtype}, "
        f"on {where})"] = f"{forward:.3f}"
    out["trial / forward"] = f"{statistics.median(compute) / forward:.2f}" if compute else "-"
    out["trial's forward / forward (workers side by side)"] = \
        f"{statistics.median(forwards) / forward:.2f}" if forwards else "-"
    if proxy:
        space = request.space({n: tuple(s) for n, s in ev.matrices.items()})
        _sync(device)
        table = proxy_table(ev, space)
        _sync(device)
        out["sensitivity proxy in process, s (all units x settings)"] = f"{table.seconds:.1f}"
        units = len(space.units)
        out[f"  per unit, ms ({units} units, {len(space.settings())} settings)"] = f"{1e3 * table.seconds / units:.0f}"
        t0 = time.perf_counter()
        seeds = solved_policies(table, space, parse_budget(request.budget, space.numel))
        out[f"solved seeds (DP + greedy at 8 budgets, {len(seeds)} policies), s"] = f"{time.perf_counter() - t0:.2f}"
    if device == "cuda":
        out["peak GPU memory in process (forward + proxy), GiB"] = f"{torch.cuda.max_memory_allocated() / GIB:.2f}"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="cuda,cpu", help="columns, in order (cuda is skipped without a GPU)")
    ap.add_argument("--trials", type=int, default=60, help="trials of the cuda search (and the cpu one by default)")
    ap.add_argument("--cpu-trials", type=int, default=None, help="trials of the cpu search (default: --trials)")
    ap.add_argument("--proxy-on", default="cuda,cpu", help="devices to time the sensitivity proxy on, in process "
                                                           "('' for none; on a CPU it takes minutes)")
    ap.add_argument("--out", type=Path, default=None, help="also write the report here, the command on top")
    args = ap.parse_args()
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    defaults = SearchRequest(model="smollm2-135m", budget="3.0bpw")
    lines = ["$ " + shlex.join(["python", *sys.argv]),
             "search: --model smollm2-135m --budget 3.0bpw; defaults: "
             + ", ".join(f"{k}={getattr(defaults, k)}" for k in SHOWN), ""]
    columns: dict[str, dict[str, Any]] = {}
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            lines.append("cuda: not run (no CUDA device here: torch.cuda.is_available() is False)")
            continue
        trials = args.cpu_trials if device == "cpu" and args.cpu_trials else args.trials
        print(f"running the {device} search ({trials} trials) ...", file=sys.stderr, flush=True)
        columns[f"{device} ({torch.cuda.get_device_name(0)})" if device == "cuda" else
                 f"cpu ({os.cpu_count()} cores)"] = run_device(device, trials, device in args.proxy_on.split(","))
    names = list(dict.fromkeys(k for c in columns.values() for k in c))
    width = max(map(len, names), default=10) + 2
    lines.append("".join([" " * width, *(f"{h:<44}" for h in columns)]))
    for name in names:
        lines.append("".join([f"{name:<{width}}", *(f"{str(c.get(name, '-')):<44}" for c in columns.values())]))
    report = "\n".join(lines).rstrip() + "\n"
    print(report, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
