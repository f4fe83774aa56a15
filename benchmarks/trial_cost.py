"""Trial cost: seconds per trial (sampler ask + evaluate) over one plain reference forward on the same
tokens, and the sampler's share of the trial, measured in one run in-process.

    python benchmarks/trial_cost.py --model smollm2-135m --eval-seqs 2 --trials 10 --sampler evo
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402

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
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    loaded, tokens = DataConfig(model=args.model, dataset=args.dataset, seq_len=args.seq_len,
                                n_eval=args.eval_seqs, n_calib=0).load()
    t0 = time.perf_counter()
    reference = reference_logprobs(loaded.model, tokens)
    ref_s = time.perf_counter() - t0  # the float forward the trial cost is compared with
    ev = Evaluator(loaded, tokens, reference=reference)
    space = SearchSpace(dict(ev.matrices))
    budget = parse_budget(args.budget, space.numel)
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=make_sampler(args.sampler, 0, 2 * len(space.matrices), space=space,
                                                     budget_bytes=budget))
    for _, p in space.uniform_policies():  # parents for the evolutionary samplers
        if space.nbytes(p) <= budget:
            study.enqueue_trial(space.params(p))
    ask_s, eval_s = [], []
    for _ in range(args.trials):
        t = time.perf_counter()
        trial = study.ask()
        policy = space.suggest(trial)
        t1 = time.perf_counter()
        r = ev.evaluate(policy)
        t2 = time.perf_counter()
        study.tell(trial, [r["kl"], float(r["bytes"])])
        ask_s.append(t1 - t)
        eval_s.append(t2 - t1)
    n = len(eval_s)
    per_trial = (sum(ask_s) + sum(eval_s)) / n
    print(f"reference forward: {ref_s:.3f} s over {tokens.eval.size} tokens")
    print(f"{'sampler':<8}{'trials':>7}{'s/trial':>9}{'x ref':>8}{'sampler %':>11}{'cache hits':>12}")
    print(f"{args.sampler:<8}{n:>7}{per_trial:>9.3f}{per_trial / ref_s:>8.2f}{100 * sum(ask_s) / (n * per_trial):>10.1f}%"
          f"{ev.cache.hits:>7}/{ev.cache.hits + ev.cache.misses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
