"""Weights and KV cache in one budget: the joint search against weight-only searches beside a uniform cache.

    python benchmarks/kv_joint.py --context 1024 --batch 2 --shares 0.75,0.6 --trials 30

A deployment holding ``--batch`` sequences of ``--context`` tokens: the budget counts the packed weights
and the cache. For each budget at which the fp16 cache would be ``share`` of the memory, three studies
(default recipe for the weights, the proxy's seeds, evo), all scored on the same windows of ``--seq-len``
(= the context) tokens:

- ``joint``: every attention module's keys and values searched with the weights (``--context``'s default
  KV formats: turbo, rtn_token, rtn_channel for keys, float; 2/3/4/8 bits);
- ``cache8``: the weights searched beside a uniform 8-bit cache (turbo8 keys and values);
- ``cache4``: beside a 4-bit cache (values turbo4, keys turbo4 or per-channel rtn4 per layer: the better
  4-bit key format of ``benchmarks/results/kv_cache.txt``).

Each study runs ``--trials`` at the largest budget, its DP and greedy seeds solved at every budget compared;
at a smaller budget it runs ``--refine-trials`` more trials kept there (as ``export --budget`` does), and its
point is the best within that budget. Then the KV cache alone: the weights fixed at rtn 8-bit g128 and
the cache searched at 3.5 bits per element on average, against the same weights with the fp16 cache.
Every chosen point is re-measured on another text (Python's ``pydoc_data/topics.py``) the search never saw.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # benchmarks/kernels.py must not shadow `kernels`

import pydoc_data  # noqa: E402

import quant  # noqa: E402
from evaluators import Evaluator, UserError  # noqa: E402
from evaluators.context import DataConfig  # noqa: E402
from evaluators.kv_attention import attention_modules  # noqa: E402
from search.at_budget import REFINE_TRIALS, request_of  # noqa: E402
from search.driver import SearchConfig, run_search  # noqa: E402
from search.kv_space import KVSpace  # noqa: E402
from search.request import SearchRequest  # noqa: E402
from studies import Store  # noqa: E402

OTHER_TEXT = str(Path(pydoc_data.__file__).parent / "topics.py")
Q4_1_BPW = 5.0  # SmolLM2's float weights are its Q4_1 file's: at this size a grid reproduces them exactly
CACHES = {"joint": {}, "cache8": {"kv_formats": ["turbo"], "kv_bits": [8]},
          "cache4": {"kv_formats": ["turbo", "rtn_channel"], "kv_bits": [4]}}


def _request(args: argparse.Namespace, name: str, budget: int, **options) -> SearchRequest:
    options.setdefault("trials", args.trials)
    return SearchRequest(model=args.model, seq_len=args.context, eval_seqs=args.eval_seqs,
                         calib_seqs=args.calib_seqs, budget=str(budget), study=name, workers=args.workers,
                         context=args.context, batch=args.batch, **options)


def _at_budget(storage: str, store: Store, name: str, budget: int, refine: int) -> int:
    """The study's best trial within ``budget``, after ``refine`` evo trials kept at it (below the study's
    own budget), as ``export --budget`` runs them, but always: every study gets the same trials there."""
    row = store.get_study(name)
    if budget < row.budget_bytes and refine:
        frame = store.trials_frame(row)
        done = int(frame["state"].isin(["complete", "pruned"]).sum())
        run_search(SearchConfig(request_of(row, trials=done + refine, sampler="evo"), storage=storage,
                                progress=False, target_bytes=budget))
    return int(store.front(row, budget).iloc[-1]["trial"])


def _point(store: Store, name: str, trial: int) -> dict:
    row = store.get_study(name)
    t = store.trial(row, trial)
    policy = quant.Policy.from_dict(t.policy)
    return {"trial": trial, "kl": t.kl, "bytes": t.bytes, "kv_bytes": t.kv_bytes, "bpw": t.bpw, "policy": policy,
            "seed": t.seed}


def _kv_bits(kv: KVSpace, kv_bytes: int) -> float:
    return 8.0 * kv_bytes / (kv.float_bytes() / 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context", type=int, default=1024, help="tokens per sequence (and per evaluation window)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--shares", default="0.75,0.6", help="the fp16 cache's share of each budget")
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--refine-trials", type=int, default=REFINE_TRIALS)
    p.add_argument("--eval-seqs", type=int, default=2)
    p.add_argument("--calib-seqs", type=int, default=2)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--kv-trials", type=int, default=20, help="trials of the cache-alone search at 3.5 bits")
    p.add_argument("--storage", default=None)
    args = p.parse_args()
    storage = args.storage or f"sqlite:///{tempfile.mkdtemp()}/kv_joint.db"
    store = Store(storage)
    t_all = time.perf_counter()
    data = DataConfig(model=args.model, seq_len=args.context, n_eval=args.eval_seqs, n_calib=args.calib_seqs)
    loaded, tokens = data.load()
    kv = KVSpace(attention_modules(loaded.model), context=args.context, batch=args.batch)
    numel = sum(h * w for h, w in quant.weight_matrices(loaded.model).values())
    fp16 = kv.float_bytes()
    shares = [float(s) for s in args.shares.split(",")]
    budgets = sorted({int(fp16 / s) for s in shares}, reverse=True)
    print(f"{args.model}: {numel:,} weights; cache of {args.batch} x {args.context} tokens, fp16 {fp16 / 1e6:.1f} MB; "
          f"{args.eval_seqs} evaluation windows of {args.context} tokens (shakespeare), {args.trials} trials per study "
          f"at {budgets[0] / 1e6:.1f} MB, {args.refine_trials} more at each smaller budget")
    chosen: dict[tuple[str, int], dict] = {}
    for name, options in CACHES.items():
        t = time.perf_counter()
        # Seeds solved at the budgets compared (not at 8 from the smallest policy up): the trials go to evo.
        run_search(SearchConfig(_request(args, name, budgets[0], **options), storage=storage, progress=False,
                                seed_budgets=1, extra_seed_budgets=tuple(budgets[1:])))
        for b in budgets:
            try:
                trial = _at_budget(storage, store, name, b, args.refine_trials)
            except UserError as exc:  # e.g. an 8-bit cache and the smallest weights are over the budget
                print(f"  {name} at {b / 1e6:.1f} MB: {exc}")
                continue
            chosen[name, b] = _point(store, name, trial)
        print(f"  {name}: {time.perf_counter() - t:.0f} s", flush=True)
    # The cache alone: fixed weights (rtn 8-bit g128: one setting per unit), the cache at 3.5 bits on average.
    matrices = quant.weight_matrices(loaded.model)
    w8 = quant.Policy.uniform(list(matrices), quant.QuantSetting("rtn", 8, 128), matrices)
    kv35 = w8.expected_nbytes(matrices) + int(3.5 / 16 * fp16)
    if args.kv_trials:
        t = time.perf_counter()
        run_search(SearchConfig(_request(args, "kv35", kv35, formats=["rtn"], bits=[8], groups=[128],
                                         trials=args.kv_trials), storage=storage, progress=False))
        front = store.front(store.get_study("kv35"))
        chosen["kv35", kv35] = _point(store, "kv35", int(front.iloc[-1]["trial"]))
        print(f"  kv35: {time.perf_counter() - t:.0f} s", flush=True)
    del loaded
    # Every chosen point on the study's text (as stored) and on another text, with the same weights and fp16 cache.
    other_loaded, other_tokens = DataConfig(model=args.model, dataset=OTHER_TEXT, seq_len=args.context,
                                            n_eval=args.eval_seqs, n_calib=0).load()
    other = Evaluator(other_loaded, other_tokens)
    base_loaded, base_tokens = data.load()
    base = Evaluator(base_loaded, base_tokens)
    for point in chosen.values():
        point["kl_fp16_cache"] = base.evaluate(quant.Policy(point["policy"].settings))["kl"]
        other.hessians = base.hessians  # gptq is calibrated on the study's windows, then measured elsewhere
        point["kl_other"] = other.evaluate(point["policy"])["kl"]
    print()
    print("| budget MB | fp16 cache share | study | KL | KL other text | bytes | weights bpw | cache bits/elt | "
          "KL with fp16 cache |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b in budgets:
        for name in (n for n in CACHES if (n, b) in chosen):
            c = chosen[name, b]
            exact = args.model == "smollm2-135m" and c["bpw"] >= Q4_1_BPW
            flag = " (weights at or above Q4_1's size: not counted)" if exact else ""
            print(f"| {b / 1e6:.1f} | {fp16 / b:.2f} | {name} | {c['kl']:.4f} | {c['kl_other']:.4f} | {c['bytes']:,} | "
                  f"{c['bpw']:.3f}{flag} | {_kv_bits(kv, c['kv_bytes']):.3f} | {c['kl_fp16_cache']:.4f} |")
    print()
    for b in budgets:
        j = chosen["joint", b]
        fits = [n for n in ("cache8", "cache4") if (n, b) in chosen]
        best = min(fits, key=lambda n: chosen[n, b]["kl"])
        other_best = min(chosen[n, b]["kl_other"] for n in fits)
        print(f"{b / 1e6:.1f} MB: joint / best weight-only ({best}) = {j['kl'] / chosen[best, b]['kl']:.2f}x "
              f"(goal <= 0.5x); on the other text {j['kl_other'] / other_best:.2f}x")
    if args.kv_trials:
        k = chosen["kv35", kv35]
        print(f"cache alone at 3.5 bits/elt (weights rtn8g128): {_kv_bits(kv, k['kv_bytes']):.3f} bits/elt, "
              f"KL {k['kl']:.4f} vs {k['kl_fp16_cache']:.4f} with the fp16 cache: "
              f"+{k['kl'] - k['kl_fp16_cache']:.4f} (goal <= +0.02); other text KL {k['kl_other']:.4f}")
    print(f"total {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
