"""The measured sensitivity table on the Ray workers: pairs per second with 1, 2, ... workers, side by side.

    python benchmarks/sensitivity_workers.py --model smollm2-135m --workers 1,2 --bits 2,3 --groups 64

Each run starts its own workers (each with cores / workers torch threads, as a search does), measures
every (block, setting) pair of the space on ``--sensitivity-seqs`` windows with
:func:`search.sensitivity.measure_on_workers` (nothing stored, so each run measures all of them) and
prints pairs per second; the tables of the runs must agree (printed: the largest relative difference).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # benchmarks/kernels.py must not shadow `kernels`

import quant  # noqa: E402
from evaluators import reference_logprobs  # noqa: E402
from evaluators.context import DataConfig  # noqa: E402
from search.dispatch import Dispatcher  # noqa: E402
from search.sensitivity import measure_on_workers  # noqa: E402
from search.space import SearchSpace  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--bits", default="2,3")
    p.add_argument("--groups", default="64")
    p.add_argument("--formats", default="rtn")
    p.add_argument("--granularity", default="block")
    p.add_argument("--eval-seqs", type=int, default=4)
    p.add_argument("--sensitivity-seqs", type=int, default=1)
    args = p.parse_args()
    data = DataConfig(model=args.model, n_eval=args.eval_seqs)
    loaded, tokens = data.load()
    space = SearchSpace(quant.weight_matrices(loaded.model), tuple(int(b) for b in args.bits.split(",")),
                        tuple(int(g) for g in args.groups.split(",")), tuple(args.formats.split(",")),
                        granularity=args.granularity)
    reference = reference_logprobs(loaded.model, tokens)
    n_eval = len(tokens.eval)
    del loaded
    print(f"{args.model}: {len(space.units)} units ({args.granularity}) x {len(space.settings())} settings, "
          f"{args.sensitivity_seqs} window(s) of {tokens.seq_len} tokens per pair")
    print(f"{'workers':>7} {'pairs':>6} {'seconds':>8} {'pairs/s':>8}  (including the workers' start: each loads the model)")
    tables = []
    for n in (int(w) for w in args.workers.split(",")):
        workers = Dispatcher(data.to_dict(), reference, n)
        try:
            t = time.perf_counter()
            table = measure_on_workers(workers, space, n_eval, windows=args.sensitivity_seqs, progress=False)
            seconds = time.perf_counter() - t
        finally:
            workers.close()
        tables.append(table)
        print(f"{n:>7} {table.computed:>6} {seconds:>8.1f} {table.computed / seconds:>8.3f}")
    first = tables[0]
    worst = max(abs(t.kl[u][k] - first.kl[u][k]) / max(abs(first.kl[u][k]), 1e-12)
                for t in tables[1:] for u in first.kl for k in first.kl[u]) if len(tables) > 1 else 0.0
    print(f"largest relative difference between the runs' tables: {worst:.2e}")


if __name__ == "__main__":
    main()
