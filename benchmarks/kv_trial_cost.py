"""What a quantized KV cache adds to a trial: a policy's evaluation with and without its cache settings,
beside one plain forward over the same windows, measured side by side in one run.

    python benchmarks/kv_trial_cost.py --seq-len 1024 --eval-seqs 2 --repeats 3

The weights are a uniform rtn 4-bit g64 policy (decoded once, then served from the evaluator's packed
cache, as in a long search); the cache is per-channel rtn keys and turbo values at 3 or 4 bits on every
attention module. Each timing is the best of ``--repeats`` warm runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # benchmarks/kernels.py must not shadow `kernels`

import torch  # noqa: E402

import quant  # noqa: E402
from evaluators import Evaluator  # noqa: E402
from evaluators.context import DataConfig  # noqa: E402
from evaluators.kv_attention import attention_modules  # noqa: E402
from quant.kv import KVSetting  # noqa: E402


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--eval-seqs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    loaded, tokens = DataConfig(model=args.model, seq_len=args.seq_len, n_eval=args.eval_seqs, n_calib=0).load()
    ev = Evaluator(loaded, tokens)
    matrices = quant.weight_matrices(ev.model)
    weights = quant.Policy.uniform(list(matrices), quant.QuantSetting("rtn", 4, 64), matrices)
    modules = attention_modules(ev.model)
    ids = torch.from_numpy(tokens.eval)
    with torch.inference_mode():
        forward = _best(lambda: ev.model(input_ids=ids, use_cache=False), args.repeats)
    ev.evaluate(weights)  # decodes every matrix once: later trials reuse them
    rows = [("weights only", weights)]
    for bits in (3, 4):
        kv = {m: (KVSetting("rtn_channel", bits), KVSetting("turbo", bits)) for m in modules}
        rows.append((f"weights + cache (keys rtn_channel{bits}, values turbo{bits})",
                     quant.Policy(weights.settings, kv=kv)))
    print(f"{args.model}: {args.eval_seqs} windows of {args.seq_len} tokens, {torch.get_num_threads()} threads; "
          f"one plain forward of the float model {forward:.2f} s (best of {args.repeats})")
    print(f"| trial | seconds | / one forward | KL |")
    print("|---|---|---|---|")
    for label, policy in rows:
        result = {}
        seconds = _best(lambda: result.update(ev.evaluate(policy)), args.repeats)
        print(f"| {label} | {seconds:.2f} | {seconds / forward:.2f}x | {result['kl']:.4f} |")


if __name__ == "__main__":
    main()
