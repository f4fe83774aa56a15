"""Search quality per budget: best uniform setting, DP seed alone, and NSGA-II / TPE / evo after the
same number of trials, all measured in-process on one Evaluator (no Ray, so only the methods differ).

    python benchmarks/search_quality.py --model smollm2-135m --eval-seqs 2 --budgets 2.5,3.0 --trials 20 --json out.json

Rows: {"method", "budget_bpw", "bpw", "kl", "ppl", "trials", "seconds"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402

import quant  # noqa: E402
from evaluators import Evaluator  # noqa: E402
from evaluators.context import DataConfig  # noqa: E402
from search.samplers import make_sampler  # noqa: E402
from search.seeds import solved_policies  # noqa: E402
from search.sensitivity import measure_sensitivity  # noqa: E402
from search.space import SearchSpace  # noqa: E402
from studies import Store  # noqa: E402


def _row(method: str, budget_bpw: float, r: dict, trials: int, seconds: float) -> dict:
    return {"method": method, "budget_bpw": budget_bpw, "bpw": r["bpw"], "kl": r["kl"], "ppl": r["ppl"],
            "trials": trials, "seconds": round(seconds, 2)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="shakespeare")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-seqs", type=int, default=2)
    ap.add_argument("--budgets", default="2.5,3.0,3.5,4.0")
    ap.add_argument("--bits", default="2,3,4,5,6,8")
    ap.add_argument("--groups", default="32,64,128")
    ap.add_argument("--trials", type=int, default=20, help="trials per sampler (seeds included)")
    ap.add_argument("--samplers", default="nsga2,tpe,evo")
    ap.add_argument("--storage", default="sqlite:///turboquant.db", help="where the sensitivity table is kept")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = DataConfig(model=args.model, dataset=args.dataset, seq_len=args.seq_len, n_eval=args.eval_seqs, n_calib=0)
    loaded, tokens = data.load()
    fp = loaded.fingerprint
    ev = Evaluator(loaded, tokens)
    space = SearchSpace(dict(ev.matrices), tuple(int(b) for b in args.bits.split(",")),
                        tuple(None if g == "ch" else int(g) for g in args.groups.split(",")))
    table = measure_sensitivity(ev, space.settings(), store=Store(args.storage), model_fingerprint=fp,
                                data_fingerprint=tokens.fingerprint)
    print(f"sensitivity: {table.computed} pairs measured in {table.seconds:.1f} s, {table.reused} reused")
    rows: list[dict] = []
    for bpw in (float(b) for b in args.budgets.split(",")):
        budget = int(bpw * space.numel / 8)
        t0 = time.perf_counter()
        fits = [(label, p) for label, p in space.uniform_policies() if space.nbytes(p) <= budget]
        uni = [(label, ev.evaluate(p)) for label, p in fits]
        if uni:
            label, best = min(uni, key=lambda t: t[1]["kl"])
            rows.append(_row(f"uniform:{label}", bpw, best, len(uni), time.perf_counter() - t0))
        seeds = solved_policies(table, space, budget, n_budgets=4)
        t0 = time.perf_counter()
        dp = next((p for label, p, _ in seeds if label.startswith("dp:")), None)
        if dp is not None:
            rows.append(_row("dp", bpw, ev.evaluate(dp), 1, time.perf_counter() - t0))
        for name in args.samplers.split(","):
            t0 = time.perf_counter()
            study = optuna.create_study(directions=["minimize", "minimize"],
                                        sampler=make_sampler(name, 0, 2 * len(space.matrices), space=space,
                                                             budget_bytes=budget))
            for label, p, _ in seeds:  # every sampler starts from the same solved seeds
                study.enqueue_trial(space.params(p), user_attrs={"seed": label})
            best = None
            for _ in range(args.trials):
                trial = study.ask()
                policy = space.suggest(trial)
                r = ev.evaluate(policy)
                trial.set_constraint("bytes", float(r["bytes"] - budget))
                study.tell(trial, [r["kl"], float(r["bytes"])])
                if r["bytes"] <= budget and (best is None or r["kl"] < best["kl"]):
                    best = r
            if best is not None:
                rows.append(_row(name, bpw, best, args.trials, time.perf_counter() - t0))
    print(f"{'method':<16}{'budget':>7}{'bpw':>7}{'kl':>10}{'ppl':>10}{'trials':>7}{'seconds':>9}")
    for r in rows:
        print(f"{r['method']:<16}{r['budget_bpw']:>7.2f}{r['bpw']:>7.3f}{r['kl']:>10.4f}{r['ppl']:>10.2f}"
              f"{r['trials']:>7}{r['seconds']:>9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
