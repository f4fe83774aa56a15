"""Trial cost: seconds per trial (sampler ask + evaluate) over one plain reference forward on the same
tokens, and the sampler's share of the trial, measured in one run in-process.

    python benchmarks/trial_cost.py --model smollm2-135m --eval-seqs 4 --trials 20 --sampler evo

Printed for all trials and for the warm ones (every matrix already in the worker's packed cache,
as in a long search): a trial re-decodes only the matrices that changed, then runs one forward.
evo runs without multi-fidelity here, so every trial is a full evaluation.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # benchmarks/kernels.py must not shadow `kernels`

import optuna  # noqa: E402
import torch  # noqa: E402

from evaluators import Evaluator, reference_logprobs  # noqa: E402
from evaluators.context import DataConfig  # noqa: E402
from search.budget import parse_budget  # noqa: E402
from search.samplers import make_sampler  # noqa: E402
from search.space import SearchSpace  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="shakespeare")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-seqs", type=int, default=2)
    ap.add_argument("--budget", default="3.0bpw")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--sampler", default="evo")
    ap.add_argument("--granularity", default="matrix")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    loaded, tokens = DataConfig(model=args.model, dataset=args.dataset, seq_len=args.seq_len,
                                n_eval=args.eval_seqs, n_calib=0).load()
    reference = reference_logprobs(loaded.model, tokens)  # cold: first-call allocations, not timed
    ref_times = []
    for _ in range(3):  # the float forward the trial cost is compared with: median of three warm runs
        t0 = time.perf_counter()
        reference_logprobs(loaded.model, tokens)
        ref_times.append(time.perf_counter() - t0)
    ref_s = sorted(ref_times)[1]
    ev = Evaluator(loaded, tokens, reference=reference)
    space = SearchSpace(dict(ev.matrices), granularity=args.granularity)
    budget = parse_budget(args.budget, space.numel)
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=make_sampler(args.sampler, 0, space.n_params, space=space,
                                                     budget_bytes=budget))
    for _, p in space.uniform_policies():  # parents for the evolutionary samplers
        if space.nbytes(p) <= budget:
            study.enqueue_trial(space.params(p))
    ask_s, eval_s, warm = [], [], []
    for _ in range(args.trials):
        t = time.perf_counter()
        trial = study.ask()
        policy = space.suggest(trial)
        t1 = time.perf_counter()
        misses = ev.cache.misses
        r = ev.evaluate(policy)
        t2 = time.perf_counter()
        trial.set_constraint("bytes", float(r["bytes"] - budget))
        study.tell(trial, [r["kl"], float(r["bytes"])])
        ask_s.append(t1 - t)
        eval_s.append(t2 - t1)
        warm.append(ev.cache.misses == misses)
    print(f"reference forward: {ref_s:.3f} s over {tokens.eval.size} tokens (median of "
          f"{', '.join(f'{t:.3f}' for t in ref_times)})")
    print(f"{'sampler':<8}{'trials':<8}{'n':>4}{'s/trial':>9}{'x ref':>8}{'sampler %':>11}")
    for label, keep in (("all", [True] * len(warm)), ("warm", warm)):
        idx = [i for i, k in enumerate(keep) if k]
        if not idx:
            continue
        ask, ev_s = sum(ask_s[i] for i in idx), sum(eval_s[i] for i in idx)
        per_trial = (ask + ev_s) / len(idx)
        print(f"{args.sampler:<8}{label:<8}{len(idx):>4}{per_trial:>9.3f}{per_trial / ref_s:>8.2f}"
              f"{100 * ask / (ask + ev_s):>10.1f}%")
    print(f"packed-matrix cache: {ev.cache.hits} hits of {ev.cache.hits + ev.cache.misses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
