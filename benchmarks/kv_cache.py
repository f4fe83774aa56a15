"""KV cache quantization alone (weights float) on the embedded SmolLM2-135M at a long context.

Every attention module gets the same (keys, values) setting; the table shows the KL to the float
model (fp32 weights, fp32 attention), perplexity and top-1 agreement on the evaluation windows, the
bits per cached element (codes plus fp16 norms / scales / offsets, from the packed bytes) and the
cache's size at 8,192 tokens (30 layers x (k, v) x 3 KV heads x 64 dims, batch 1).

Rows: ``turbo`` (rotation + Lloyd-Max, one fp16 norm per vector), ``turbo`` keys with QJL at the
same total bits (one bit of the codebook spent on the residual's sign sketch), per-token ``rtn``,
and KIVI (keys ``rtn_channel`` over groups of 128 or 32 tokens, values per-token ``rtn``), at 2, 3,
4 and 8 bits, and per-channel keys with turbo values; then keys alone (values float), with and without QJL; then mixed 4-bit keys /
3-bit values (3.5 bits on average).

    .venv/bin/python benchmarks/kv_cache.py                     # 2 x 2048 tokens, 34 rows: ~60 min here (loaded 2 cores)
    .venv/bin/python benchmarks/kv_cache.py --bits 3 --n-eval 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/kernels.py must not shadow `kernels`

from evaluators import Evaluator  # noqa: E402
from evaluators.context import DataConfig  # noqa: E402
from evaluators.kv_attention import attention_modules  # noqa: E402
from quant.kv import FLOAT_KV, KVSetting, layer_kv_bytes  # noqa: E402

Row = tuple[str, KVSetting, KVSetting]


def rows_for(bits: int) -> list[Row]:
    """(label, keys, values) of every uniform combination at ``bits``."""
    t, r = KVSetting("turbo", bits), KVSetting("rtn_token", bits)
    return [
        ("turbo k+v", t, t),
        ("turbo k+qjl, v", KVSetting("turbo", bits, qjl=True), t),
        ("rtn per-token k+v", r, r),
        ("KIVI k ch g128, v tok", KVSetting("rtn_channel", bits, group=128), r),
        ("KIVI k ch g32, v tok", KVSetting("rtn_channel", bits, group=32), r),
        ("k ch g128 + v turbo", KVSetting("rtn_channel", bits, group=128), t),
    ]


def key_rows(bits: int) -> list[Row]:
    """Keys alone (values float): does QJL pay at equal total bits?"""
    return [("turbo k only", KVSetting("turbo", bits), FLOAT_KV),
            ("turbo k+qjl only", KVSetting("turbo", bits, qjl=True), FLOAT_KV)]


MIXED: list[Row] = [
    ("turbo k4 v3 (3.5 avg)", KVSetting("turbo", 4), KVSetting("turbo", 3)),
    ("KIVI k4 ch g128 v3 tok", KVSetting("rtn_channel", 4), KVSetting("rtn_token", 3)),
    ("k4 ch g128 + v3 turbo", KVSetting("rtn_channel", 4), KVSetting("turbo", 3)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", default="2,3,4,8")
    parser.add_argument("--n-eval", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--context", type=int, default=8192, help="tokens at which the cache size is shown")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default=None, help="comma-separated row labels to keep (default all)")
    args = parser.parse_args()
    keep = None if args.rows is None else set(args.rows.split(","))
    torch.set_num_threads(args.threads)
    bits = [int(b) for b in args.bits.split(",")]

    config = DataConfig(model="smollm2-135m", seq_len=args.seq_len, n_eval=args.n_eval, n_calib=0)
    loaded, tokens = config.load()
    start = time.perf_counter()
    evaluator = Evaluator(loaded, tokens, batch_size=1)
    infos = attention_modules(loaded.model)
    shapes = {(i.kv_heads, i.head_dim, i.sliding_window) for i in infos.values()}
    fp16_mb = sum(layer_kv_bytes(i, (FLOAT_KV, FLOAT_KV), args.context) for i in infos.values()) / 1e6
    print(f"smollm2-135m, weights float, {args.n_eval} x {args.seq_len} evaluation tokens (corpus shakespeare), "
          f"{len(infos)} attention modules (kv_heads, head_dim, window) {sorted(shapes, key=str)}, "
          f"{torch.get_num_threads()} threads; reference in {time.perf_counter() - start:.0f} s; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"fp16 cache at {args.context} tokens: {fp16_mb:.1f} MB (batch 1)")
    print(f"| bits | {'keys / values':<23} | {'k setting':<16} | {'v setting':<10} | bits/elt | "
          f"MB@{args.context} | {'KL':>7} | {'ppl':>8} | top-1 | s |")
    print(f"|------|{'-' * 25}|{'-' * 18}|{'-' * 12}|----------|{'-' * (len(str(args.context)) + 5)}|"
          f"---------|----------|-------|-----|")
    base = evaluator.evaluate_partial({})
    print(f"| 16   | {'float (fp16 cache)':<23} | {'float16':<16} | {'float16':<10} | {16.0:8.3f} | "
          f"{fp16_mb:7.1f} | {base['kl']:7.4f} | {base['ppl']:8.3f} | {base['top1']:.3f} |   - |", flush=True)
    groups = [(b, rows_for(b)) for b in bits] + [(b, key_rows(b)) for b in bits if b in (2, 3, 4)]
    groups.append((3.5, MIXED))
    for b, rows in groups:
        for label, k, v in rows:
            if keep is not None and label not in keep:
                continue
            t0 = time.perf_counter()
            res = evaluator.evaluate_partial({}, kv={name: (k, v) for name in infos})
            mb = sum(layer_kv_bytes(i, (k, v), args.context) for i in infos.values()) / 1e6
            print(f"| {b:<4} | {label:<23} | {k.describe():<16} | {v.describe():<10} | {res['kv_bits']:8.3f} | "
                  f"{mb:7.1f} | {res['kl']:7.4f} | {res['ppl']:8.3f} | {res['top1']:.3f} | "
                  f"{time.perf_counter() - t0:3.0f} |", flush=True)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
