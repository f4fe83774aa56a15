"""One study, every budget: ``export --budget B`` from a study run at a larger budget, against a study run at B.

    python benchmarks/export_budget.py --parent 4.0bpw --budgets 3.0bpw,3.5bpw --trials 40

Runs the default search (``turboquant search``'s defaults, fewer evaluation windows) at ``--parent``, then
for each B: the point ``export --budget B`` returns (the stored best if it uses 99 % of B, else
``--refine-trials`` trials run at B in the parent study) and a dedicated study at B with the same trials.
Prints bytes, fill and KL of each, and the ratio of the exported KL to the dedicated study's best.
Everything runs in one SQLite file in a temporary folder (``--storage`` to keep it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # benchmarks/kernels.py must not shadow `kernels`

from search.at_budget import FILL, REFINE_TRIALS, point_at_budget  # noqa: E402
from search.budget import parse_budget  # noqa: E402
from search.driver import SearchConfig, run_search  # noqa: E402
from search.request import SearchRequest  # noqa: E402
from studies import Store  # noqa: E402


def _study(storage: str, name: str, budget: str, args: argparse.Namespace) -> float:
    t = time.perf_counter()
    run_search(SearchConfig(SearchRequest(model=args.model, budget=budget, trials=args.trials, eval_seqs=args.eval_seqs,
                                          study=name), storage=storage, progress=False))
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--parent", default="4.0bpw")
    p.add_argument("--budgets", default="3.0bpw,3.5bpw")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--eval-seqs", type=int, default=4)
    p.add_argument("--refine-trials", type=int, default=REFINE_TRIALS)
    p.add_argument("--storage", default=None)
    args = p.parse_args()
    storage = args.storage or f"sqlite:///{tempfile.mkdtemp()}/export_budget.db"
    store = Store(storage)
    seconds = _study(storage, "parent", args.parent, args)
    row = store.get_study("parent")
    print(f"{args.model}: parent study at {args.parent} ({row.budget_bytes:,} bytes), {args.trials} trials, "
          f"default recipe, {args.eval_seqs} evaluation windows: {seconds:.0f} s")
    print(f"{'budget':>8} {'what':<34} {'bytes':>12} {'fill':>6} {'kl':>9} {'seconds':>8}")
    for text in args.budgets.split(","):
        budget = parse_budget(text, row.numel)
        stored = store.front(row, budget)
        before = None if stored.empty else stored.iloc[-1]
        t = time.perf_counter()
        trial = point_at_budget(storage, "parent", budget, trials=args.refine_trials, progress=False)
        export_seconds = time.perf_counter() - t
        point = store.trial(row, trial)
        dedicated_seconds = _study(storage, f"at-{text}", text, args)
        own = store.get_study(f"at-{text}")
        best = store.front(own, budget).iloc[-1]
        if before is not None:
            print(f"{text:>8} {'parent, stored best before':<34} {int(before['bytes']):>12,} "
                  f"{before['bytes'] / budget:>6.3f} {before['kl']:>9.4f}")
        print(f"{text:>8} {'export --budget (parent)':<34} {point.bytes:>12,} {point.bytes / budget:>6.3f} "
              f"{point.kl:>9.4f} {export_seconds:>8.0f}")
        print(f"{text:>8} {'study at this budget':<34} {int(best['bytes']):>12,} {best['bytes'] / budget:>6.3f} "
              f"{best['kl']:>9.4f} {dedicated_seconds:>8.0f}")
        print(f"{'':>8} exported / dedicated KL: {point.kl / best['kl']:.3f} (goal <= 1.05); fill >= {FILL}: "
              f"{point.bytes >= FILL * budget}")


if __name__ == "__main__":
    main()
