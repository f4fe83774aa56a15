"""End to end: the embedded SmolLM2-135M quantized uniformly with each format at 2, 3 and 4 bits.

Every weight matrix (the tied embedding / LM head included) gets the same setting,
group 64; the table shows KL to the float model, perplexity and top-1 agreement on
the evaluation windows, and the real bits per weight from the packed bytes
(``PackedTensor.nbytes`` over all matrices, scales / codebooks / padding included).

``gptq`` uses input Hessians collected on the calibration windows of the float model
(:func:`evaluators.calibration_hessians`, layers treated independently, as in a search);
the tied table uses the LM head's inputs. ``vq`` (dim 2) uses index widths 4, 6 and 8, i.e. 2, 3 and 4
bits per weight of codes. ``ternary`` has one rate (1.6-bit codes) and is listed with 2.

    .venv/bin/python benchmarks/format_kl.py                  # 4 x 256 tokens, ~25 min on 1 thread
    .venv/bin/python benchmarks/format_kl.py --bits 3 --formats rtn,turbo
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/kernels.py must not shadow `kernels`

import quant  # noqa: E402
from evaluators import Evaluator  # noqa: E402
from evaluators.context import DataConfig  # noqa: E402
from evaluators.evaluator import PackedCache  # noqa: E402

GROUP = 64  # the default of --group


def settings_for(bits: int, group: int | None = GROUP) -> list[tuple[str, dict[str, Any]]]:
    """(row label, setting) of every format at ``bits``."""
    rows = [
        ("rtn (min-max)", {"format": "rtn", "bits": bits}),
        ("rtn clip", {"format": "rtn", "bits": bits, "options": {"clip": True}}),
        ("gptq (calib)", {"format": "gptq", "bits": bits}),
        ("gptq clip", {"format": "gptq", "bits": bits, "options": {"clip": True}}),
        ("gptq clip+act", {"format": "gptq", "bits": bits, "options": {"clip": True, "act_order": True}}),
        ("turbo", {"format": "turbo", "bits": bits}),
        ("lloyd (k-means)", {"format": "lloyd", "bits": bits}),
        ("lloyd weighted", {"format": "lloyd", "bits": bits, "options": {"weighted": True}}),
        ("nf (lloyd preset)", {"format": "lloyd", "bits": bits, "options": {"preset": "nf"}}),
        (f"vq dim2 idx{2 * bits}", {"format": "vq", "bits": 2 * bits, "options": {"dim": 2}}),
    ]
    if bits == 2:
        rows.append(("ternary", {"format": "ternary", "bits": 2}))
    return [(label, {**s, "group_size": group}) for label, s in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--group", default=str(GROUP), help="group size of every setting; 'ch' = per output channel")
    parser.add_argument("--formats", default=None, help="comma-separated format names to keep (default all)")
    parser.add_argument("--n-eval", type=int, default=4)
    parser.add_argument("--n-calib", type=int, default=32, help="calibration windows for gptq (4 gave 2-bit KL 24.1)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep = None if args.formats is None else set(args.formats.split(","))
    group = None if args.group == "ch" else int(args.group)

    config = DataConfig(model="smollm2-135m", seq_len=args.seq_len, n_eval=args.n_eval, n_calib=args.n_calib)
    loaded, tokens = config.load()
    start = time.perf_counter()
    evaluator = Evaluator(loaded, tokens)
    # Every row quantizes afresh (nothing reused across rows); the evaluator collects the Hessians
    # (the tied table gets the head's) when the first gptq row needs them.
    evaluator.cache = PackedCache(max_bytes=0)
    print(f"smollm2-135m, {args.n_eval} x {args.seq_len} evaluation tokens, {args.n_calib} x {args.seq_len} "
          f"calibration tokens (gptq), group {args.group}, {torch.get_num_threads()} threads; reference "
          f"in {time.perf_counter() - start:.0f} s; load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"| bits | {'format':<18} | {'setting':<24} | bits/w | {'KL':>7} | {'ppl':>9} | top-1 | s quant |")
    print(f"|------|{'-' * 20}|{'-' * 26}|--------|---------|-----------|-------|---------|", flush=True)
    for bits in (int(b) for b in args.bits.split(",")):
        for label, raw in settings_for(bits, group):
            if keep is not None and raw["format"] not in keep and label.split()[0] not in keep:
                continue
            setting = quant.QuantSetting.from_dict(raw)
            policy = quant.Policy.uniform(list(evaluator.matrices), setting)
            r = evaluator.evaluate(policy)
            print(f"| {bits:>4} | {label:<18} | {setting.describe():<24} | {r['bpw']:6.3f} | {r['kl']:7.4f} | "
                  f"{r['ppl']:9.2f} | {r['top1']:.3f} | {r['seconds_quantize']:7.1f} |", flush=True)
    evaluator.restore_float()


if __name__ == "__main__":
    main()
