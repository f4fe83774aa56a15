"""Batch-1 (decode) matmul from packed weights vs dense float32, side by side.

For each shape (out x in) and setting: milliseconds per ``y = x @ W.T`` with one token,
through :func:`quant.kernels.prepare` (int kernels for rtn 4-bit and 8-bit per channel,
the row-tiled generic path for the rest), against ``F.linear`` on the float32 weight,
all measured in one run with warm-up excluded. Then the time to quantize every weight
matrix of the embedded SmolLM2-135M with rtn 4-bit, group 32.

    .venv/bin/python benchmarks/kernels.py              # 2 threads, ~2-4 min
    .venv/bin/python benchmarks/kernels.py --threads 1 --no-model
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

import quant  # noqa: E402
from quant.kernels import prepare  # noqa: E402

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out, in): SmolLM2's attention, MLP, head
SETTINGS: list[dict] = (
    [{"format": "rtn", "bits": b, "group_size": 32} for b in range(2, 9)]
    + [{"format": "rtn", "bits": 4, "group_size": None}, {"format": "rtn", "bits": 8, "group_size": None}]
    + [{"format": "lloyd", "bits": 3, "group_size": 128}, {"format": "turbo", "bits": 4, "group_size": 128},
       {"format": "ternary", "bits": 2, "group_size": 128}, {"format": "vq", "bits": 4, "group_size": 128}]
)


def time_ms(fn: Callable[[], object], budget_s: float = 0.15, min_reps: int = 3) -> float:
    """Median milliseconds per call; the first call(s) are warm-up and not counted.

    A call slower than the budget is timed once after one warm-up (the generic paths on
    the 49152-row head take seconds on a loaded 2-core machine).
    """
    t = time.perf_counter()
    fn()
    slow = time.perf_counter() - t > budget_s
    if not slow:
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < (1 if slow else min_reps) or (not slow and time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def matmul_table() -> None:
    """One block per shape, printed as it is measured: dense first, then every setting."""
    names = [quant.QuantSetting.from_dict(s).describe() for s in SETTINGS]
    width = max(len(n) for n in names) + 2
    print(f"{'shape (out x in)':<18}{'setting':<{width}}{'kernel':<15}{'ms':>9}{'vs dense':>10}")
    for out_features, in_features in SHAPES:
        shape = f"{out_features}x{in_features}"
        w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))
        x = torch.randn(1, in_features)
        dense = time_ms(lambda: F.linear(x, w))
        print(f"{shape:<18}{'dense fp32':<{width}}{'F.linear':<15}{dense:9.3f}{1.0:9.2f}x", flush=True)
        for name, setting in zip(names, SETTINGS):
            kernel = prepare(quant.quantize(w, setting))
            ms = time_ms(lambda: kernel(x))
            print(f"{shape:<18}{name:<{width}}{type(kernel).__name__:<15}{ms:9.3f}{dense / ms:9.2f}x", flush=True)


def quantize_model_time() -> None:
    from evaluators import load_model

    model = load_model("smollm2-135m").model
    mats = [m.weight.detach() for n, m in model.named_modules() if n in quant.weight_matrices(model)]
    start = time.perf_counter()
    for w in mats:
        quant.quantize(w, {"format": "rtn", "bits": 4, "group_size": 32})
    elapsed = time.perf_counter() - start
    n = sum(w.numel() for w in mats)
    print(f"quantize all {len(mats)} weight matrices ({n / 1e6:.1f}M weights) of smollm2-135m, rtn 4-bit g32: "
          f"{elapsed:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-model", action="store_true", help="skip the SmolLM2 quantization timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    with torch.inference_mode():
        matmul_table()
    if not args.no_model:
        quantize_model_time()


if __name__ == "__main__":
    main()
