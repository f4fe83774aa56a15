"""Search quality per budget: best uniform setting, DP seed alone, and NSGA-II / TPE / evo after the
same number of trials, all measured in-process on one Evaluator (no Ray, so only the methods differ).

    python benchmarks/search_quality.py --model smollm2-135m --eval-seqs 4 \\
        --granularity block --bits 2,3,4,5 --groups 64,128 --trials 24 --json out.json

The sensitivity table is the search's default, the one-pass proxy (``--sensitivity-method measured``: one
forward per pair on ``--sensitivity-seqs`` windows).

Every sampler starts from the same seeds (DP and greedy at its budget, the best uniform setting that
fits) and then proposes ``--trials`` minus those. evo runs with multi-fidelity selection as the
driver does (a pruned child counts as a trial, at the cost of one batch). Printed: one table of the
best feasible point per method and budget; the front's hypervolume against trials per sampler; how
many trials evo needed to reach NSGA-II's final KL; and the front of the largest budget's evo study
read at every smaller budget (one study answers many budgets).

Rows (``--json``): {"method", "budget_bpw", "bpw", "kl", "ppl", "trials", "seconds"} plus, for samplers,
"hypervolume" (after each trial) and "pruned".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # benchmarks/kernels.py must not shadow `kernels`

import numpy as np  # noqa: E402
import optuna  # noqa: E402
import torch  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from evaluators import Evaluator  # noqa: E402
from evaluators.context import DataConfig  # noqa: E402
from search.fidelity import FirstBatchGate  # noqa: E402
from search.samplers import make_sampler  # noqa: E402
from search.seeds import solved_policies  # noqa: E402
from search.sensitivity import measure_sensitivity, proxy_table  # noqa: E402
from search.space import SearchSpace  # noqa: E402
from studies import Store  # noqa: E402
from studies.pareto import front_indices, hypervolume  # noqa: E402


def _row(method: str, budget_bpw: float, r: dict, trials: int, seconds: float, **extra) -> dict:
    return {"method": method, "budget_bpw": budget_bpw, "bpw": r["bpw"], "kl": r["kl"], "ppl": r["ppl"],
            "trials": trials, "seconds": round(seconds, 2), **extra}


def _hv(points: list[tuple[float, float]], budget: int, kl_ref: float) -> float:
    """Hypervolume of the feasible front in (bpw-like bytes fraction, KL) below (budget, kl_ref)."""
    if not points:
        return 0.0
    nb, kl = np.array(points).T
    idx = front_indices(nb, kl)
    return hypervolume([(nb[i] / budget, kl[i]) for i in idx], (1.0, kl_ref))


def _run_sampler(name: str, ev: Evaluator, space: SearchSpace, budget: int, seeds: list, trials: int,
                 kl_ref: float, measured: dict, keep: int,
                 table: object) -> tuple[list[dict], list[float], int, optuna.Study]:
    """One study: seeds, then sampler proposals up to ``trials``. Returns the full results of each
    trial (pruned ones: None), the hypervolume after each trial, pruned count and the study.
    ``evo`` draws its moves by the sensitivity table as the driver's does; ``evo-unguided`` without."""
    sampler = make_sampler(name.removesuffix("-unguided"), 0, space.n_params, space=space, budget_bytes=budget)
    if name == "evo":
        sampler.guide(table)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    for label, policy in seeds:
        study.enqueue_trial(space.params(policy), user_attrs={"seed": label})
    gate = FirstBatchGate(budget, keep=keep) if name.startswith("evo") else None
    results, hv, points, pruned = [], [], [], 0
    for _ in range(trials):
        trial = study.ask()
        policy = space.suggest(trial)
        key = json.dumps(policy.to_dict(), sort_keys=True)
        bar = None if gate is None or "seed" in trial.user_attrs else gate.threshold()
        r = measured.get(key) or ev.evaluate(policy, prune_above=bar)
        if r["pruned"]:
            pruned += 1
            study.tell(trial, state=TrialState.PRUNED)
            results.append(None)
        else:
            measured[key] = r
            if gate is not None:
                gate.add(r["kl_low"], r["bytes"])
            trial.set_constraint("bytes", float(r["bytes"] - budget))
            study.tell(trial, [r["kl"], float(r["bytes"])])
            results.append(r)
            if r["bytes"] <= budget:
                points.append((r["bytes"], r["kl"]))
        hv.append(_hv(points, budget, kl_ref))
    return results, hv, pruned, study


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="shakespeare")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-seqs", type=int, default=4)
    ap.add_argument("--sensitivity-method", choices=("proxy", "measured"), default="proxy",
                    help="the search's default: the one-pass proxy (on --calib-seqs windows); or one forward per pair")
    ap.add_argument("--sensitivity-seqs", type=int, default=1, help="windows a measured table is measured on")
    ap.add_argument("--calib-seqs", type=int, default=8, help="calibration windows of the proxy (the search's default)")
    ap.add_argument("--granularity", default="block")
    ap.add_argument("--budgets", default="2.5,3.0,3.5,4.0")
    ap.add_argument("--bits", default="2,3,4,5")
    ap.add_argument("--groups", default="64,128")
    ap.add_argument("--trials", type=int, default=24, help="trials per sampler and budget (seeds included)")
    ap.add_argument("--samplers", default="nsga2,tpe,evo", help="also evo-unguided: evo without the table")
    ap.add_argument("--keep", type=int, default=6, help="evo multi-fidelity: children must beat the k-th best")
    ap.add_argument("--storage", default="sqlite:///turboquant.db", help="where the sensitivity table is kept")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = DataConfig(model=args.model, dataset=args.dataset, seq_len=args.seq_len, n_eval=args.eval_seqs,
                      n_calib=args.calib_seqs if args.sensitivity_method == "proxy" else 0)
    loaded, tokens = data.load()
    ev = Evaluator(loaded, tokens)
    space = SearchSpace(dict(ev.matrices), tuple(int(b) for b in args.bits.split(",")),
                        tuple(None if g == "ch" else int(g) for g in args.groups.split(",")),
                        granularity=args.granularity)
    store = Store(args.storage)
    if args.sensitivity_method == "proxy":
        table = proxy_table(ev, space, store=store, model_fingerprint=loaded.fingerprint,
                            data_fingerprint=tokens.fingerprint)
        how = f"predicted by the proxy on {args.calib_seqs} calibration window(s)"
    else:
        table = measure_sensitivity(ev, space.settings(), units=space.units, store=store,
                                    model_fingerprint=loaded.fingerprint, data_fingerprint=tokens.fingerprint,
                                    windows=args.sensitivity_seqs)
        how = f"measured on {args.sensitivity_seqs} window(s)"
    print(f"sensitivity: {len(space.units)} units ({args.granularity}) x {len(space.settings())} settings; "
          f"{table.computed} pairs {how} in {table.seconds:.1f} s, {table.reused} reused")
    measured: dict[str, dict] = {}  # policy -> result: a policy met twice is measured once
    t0 = time.perf_counter()
    uniform = []
    for label, p in space.uniform_policies():
        r = ev.evaluate(p)
        measured[json.dumps(p.to_dict(), sort_keys=True)] = r
        uniform.append((label, p, r))
    uniform_s = time.perf_counter() - t0
    rows: list[dict] = []
    studies: dict[tuple[str, float], optuna.Study] = {}
    budgets = sorted(float(b) for b in args.budgets.split(","))
    earlier: list[tuple[str, object]] = []  # solved seeds of the smaller budgets (measured already)
    for bpw in budgets:
        budget = int(bpw * space.numel / 8)
        fits = [u for u in uniform if u[2]["bytes"] <= budget]
        if not fits:
            print(f"{bpw} bpw: no uniform setting fits; skipped")
            continue
        label, best_policy, best = min(fits, key=lambda u: u[2]["kl"])
        rows.append(_row(f"uniform:{label}", bpw, best, len(uniform), uniform_s))
        solved = solved_policies(table, space, budget, n_budgets=1)
        t0 = time.perf_counter()
        dp = next(p for label, p, _ in solved if label.startswith("dp:"))
        r = ev.evaluate(dp)
        measured[json.dumps(dp.to_dict(), sort_keys=True)] = r
        rows.append(_row("dp", bpw, r, 1, time.perf_counter() - t0))
        seeds = [(lbl, p) for lbl, p, _ in solved] + [(f"uniform:{label}", best_policy)]
        if bpw == budgets[-1]:  # like the driver: the largest budget's study also gets the smaller budgets' seeds
            seeds += earlier
        earlier += [(lbl, p) for lbl, p, _ in solved]
        kl_ref = 1.5 * best["kl"]
        seed_results = [measured.get(json.dumps(p.to_dict(), sort_keys=True)) or ev.evaluate(p) for _, p in seeds]
        for (_, p), r in zip(seeds, seed_results):
            measured[json.dumps(p.to_dict(), sort_keys=True)] = r
        top_seed = min((r for r in seed_results if r["bytes"] <= budget), key=lambda r: r["kl"])
        # The samplers' studies start with these same seeds: what a sampler adds is what beats this row.
        rows.append(_row("best seed", bpw, top_seed, len(seeds), 0.0))
        for name in args.samplers.split(","):
            t0 = time.perf_counter()
            results, hv, pruned, study = _run_sampler(name, ev, space, budget, seeds, args.trials, kl_ref,
                                                      measured, args.keep, table)
            studies[(name, bpw)] = study
            feasible = [r for r in results if r is not None and r["bytes"] <= budget]
            top = min(feasible, key=lambda r: r["kl"])
            curve = [min((r["kl"] for r in results[:i + 1] if r is not None and r["bytes"] <= budget),
                         default=float("inf")) for i in range(len(results))]
            rows.append(_row(name, bpw, top, args.trials, time.perf_counter() - t0, pruned=pruned,
                             hypervolume=[round(h, 5) for h in hv], best_kl=curve))
    print(f"\n{'method':<18}{'budget':>7}{'bpw':>7}{'kl':>10}{'ppl':>11}{'trials':>7}{'pruned':>7}{'seconds':>9}")
    for r in rows:
        print(f"{r['method']:<18}{r['budget_bpw']:>7.2f}{r['bpw']:>7.3f}{r['kl']:>10.4f}{r['ppl']:>11.4g}"
              f"{r['trials']:>7}{r.get('pruned', ''):>7}{r['seconds']:>9.1f}")
    marks = sorted({max(1, args.trials * k // 4) for k in range(1, 5)})
    print(f"\nhypervolume of the feasible front (bytes / budget x KL, reference (1, 1.5 x best uniform KL)) "
          f"after {', '.join(map(str, marks))} trials")
    for r in rows:
        if "hypervolume" in r:
            print(f"{r['method']:<8}{r['budget_bpw']:>5.2f}  " + "  ".join(f"{r['hypervolume'][m - 1]:.4f}" for m in marks))
    for bpw in sorted({r["budget_bpw"] for r in rows}):
        by = {r["method"]: r for r in rows if r["budget_bpw"] == bpw and "best_kl" in r}
        seed_kl = next(r["kl"] for r in rows if r["budget_bpw"] == bpw and r["method"] == "best seed")
        gains = ", ".join(f"{m} {seed_kl - r['kl']:.4f}" for m, r in by.items())
        print(f"{bpw:.2f} bpw: KL gained over the best seed ({seed_kl:.4f}) after {args.trials} trials: {gains}")
        if "evo" in by and "nsga2" in by and by["nsga2"]["kl"] < seed_kl:
            target = by["nsga2"]["kl"]
            reach = next((i + 1 for i, k in enumerate(by["evo"]["best_kl"]) if k <= target), None)
            print(f"  NSGA-II's final KL {target:.4f}; evo reached it " + (f"after {reach} trials" if reach else "not at all"))
    top_bpw = max(b for _, b in studies)
    if ("evo", top_bpw) in studies:
        done = [t for t in studies[("evo", top_bpw)].trials if t.state == TrialState.COMPLETE]
        print(f"\none study (evo at {top_bpw} bpw), its front read at each budget:")
        for bpw in sorted({r["budget_bpw"] for r in rows}):
            cap = bpw * space.numel / 8
            kls = [t.values[0] for t in done if t.values[1] <= cap]
            print(f"  <= {bpw:.2f} bpw: " + (f"KL {min(kls):.4f}" if kls else "no point"))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
