"""Batch-1 (decode) matmul from packed weights vs dense float32, side by side; rtn quantization time.

Three tables, all measured in one run:

1. torch's own kernels on the embedded model's shapes (out x in: 576x576, 1536x576,
   576x1536, 49152x576) at each thread count: dense ``F.linear`` in float32 and bfloat16,
   ``_weight_int4pack_mm_for_cpu`` (4-bit, group 32) and ``_weight_int8pack_mm`` (8-bit per
   channel) with bfloat16 and with float32 activations, and fbgemm's dynamic int8 linear
   (which also quantizes the activations to 8 bits, so it is not weight-only).
2. our kernels (:func:`quant.kernels.prepare`) for each setting against dense float32.
3. quantizing every weight matrix of SmolLM2-135M with rtn (weights already in memory).
4. with ``--cuda`` (a GPU machine): the Triton rtn kernel at batch 1, 16 and 256 against dense
   fp16 and fp32 ``F.linear`` and against dequantize-then-matmul, timed with CUDA events
   (``triton.testing.do_bench``), for several tile shapes; only this table runs then.

Timing: the fastest of repeated calls after warm-up, every variant of a shape measured in
interleaved rounds. On this shared 2-core machine (load 4-8 while it was written) a median
measures the scheduler: an op split over 2 threads waits a whole time slice (4 ms) whenever
one thread is descheduled. The fastest call is what the kernel does when it runs; dense and
packed are treated alike. The load average is printed with each table.

    .venv/bin/python benchmarks/kernels.py                     # threads 2 and 1, ~5 min
    .venv/bin/python benchmarks/kernels.py --threads 2 --no-model --no-ours
    python3 benchmarks/kernels.py --cuda                       # on a GPU machine
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/kernels.py must not shadow `kernels`

import quant  # noqa: E402
from quant.kernels import Int4Kernel, Int8Kernel, prepare  # noqa: E402

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out, in): SmolLM2's attention, MLP, head
SETTINGS: list[dict] = (
    [{"format": "rtn", "bits": b, "group_size": 32} for b in range(2, 9)]
    + [{"format": "rtn", "bits": 4, "group_size": 128}, {"format": "rtn", "bits": 4, "group_size": None},
       {"format": "rtn", "bits": 8, "group_size": None}]
    + [{"format": "lloyd", "bits": 3, "group_size": 128}, {"format": "turbo", "bits": 4, "group_size": 128},
       {"format": "ternary", "bits": 2, "group_size": 128}, {"format": "vq", "bits": 4, "group_size": 128}]
)
ROUNDS = 3


def time_ms(fn: Callable[[], object], budget_s: float = 0.1, min_reps: int = 5) -> float:
    """Fastest call in milliseconds; two warm-up calls are not counted.

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
    return 1e3 * min(times)


def best_of_rounds(fns: dict[str, Callable[[], object]], rounds: int = ROUNDS) -> dict[str, float]:
    """Fastest call per variant over interleaved rounds (a, b, c, a, b, c, ...)."""
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            best[k] = min(best[k], time_ms(fn))
    return best


def load() -> str:
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def torch_ops(out_features: int, in_features: int) -> dict[str, Callable[[], object]]:
    """The candidate kernels of torch itself, on one random weight."""
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, in_features)
    xb, wb = x.bfloat16(), w.bfloat16()
    k4 = prepare(quant.quantize(w, {"format": "rtn", "bits": 4, "group_size": 32}))
    k8 = prepare(quant.quantize(w, {"format": "rtn", "bits": 8, "group_size": None}))
    assert isinstance(k4, Int4Kernel) and isinstance(k8, Int8Kernel)
    w8, s8b = k8.weight[0], k8.scale[0]  # per channel: the kernel's one group
    sz32, s8 = k4.scale_zero.float(), s8b.float()
    int4 = torch.ops.aten._weight_int4pack_mm_for_cpu
    int8 = torch.ops.aten._weight_int8pack_mm
    scale = (w.abs().amax(1) / 127).clamp(min=1e-8)
    qw = torch.quantize_per_channel(w, scale, torch.zeros(out_features, dtype=torch.long), 0, torch.qint8)
    fb = torch.ops.quantized.linear_prepack(qw, None)
    return {
        "dense fp32": lambda: F.linear(x, w),
        "dense bf16": lambda: F.linear(xb, wb),
        "int4 bf16-x": lambda: int4(xb, k4.weight, k4.kernel_group, k4.scale_zero),
        "int4 fp32-x": lambda: int4(x, k4.weight, k4.kernel_group, sz32),
        "int8 bf16-x": lambda: int8(xb, w8, s8b),
        "int8 fp32-x": lambda: int8(x, w8, s8),
        "fbgemm dyn-int8": lambda: torch.ops.quantized.linear_dynamic(x, fb),
    }


def torch_ops_table(threads: list[int]) -> None:
    print(f"\n1. torch's kernels, batch 1 (ms of the fastest call; x = speed-up over dense fp32 at the same "
          f"thread count); {load()}")
    names = list(torch_ops(16, 64))
    print(f"| threads | shape       | " + " | ".join(f"{n:>17}" for n in names) + " |")
    print("|---------|-------------|" + "|".join("-" * 19 for _ in names) + "|")
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for out_features, in_features in SHAPES:
            best = best_of_rounds(torch_ops(out_features, in_features))
            dense = best["dense fp32"]
            cells = " | ".join(f"{best[n]:8.3f} {dense / best[n]:6.2f}x" for n in names)
            print(f"| {n_threads:>7} | {out_features:>5}x{in_features:<5} | {cells} |", flush=True)
    print(f"({load()})")


def ours_table(n_threads: int) -> None:
    torch.set_num_threads(n_threads)
    print(f"\n2. quant.kernels.prepare(packed) vs dense fp32, batch 1, {n_threads} threads, ms of the fastest "
          f"call; {load()}")
    labels = [quant.QuantSetting.from_dict(s).describe() for s in SETTINGS]
    width = max(len(n) for n in labels) + 2
    print(f"{'shape (out x in)':<18}{'setting':<{width}}{'kernel':<16}{'ms':>9}{'dense ms':>10}{'vs dense':>10}")
    for out_features, in_features in SHAPES:
        shape = f"{out_features}x{in_features}"
        w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))
        x = torch.randn(1, in_features)
        for label, setting in zip(labels, SETTINGS):
            kernel = prepare(quant.quantize(w, setting))
            best = best_of_rounds({"dense": lambda: F.linear(x, w), "kernel": lambda: kernel(x)},
                                  rounds=ROUNDS if out_features * in_features < 1 << 24 or
                                  isinstance(kernel, (Int4Kernel, Int8Kernel)) else 1)
            print(f"{shape:<18}{label:<{width}}{type(kernel).__name__:<16}{best['kernel']:9.3f}"
                  f"{best['dense']:10.3f}{best['dense'] / best['kernel']:9.2f}x", flush=True)
    print(f"({load()})")


def quantize_model_time(threads: list[int]) -> None:
    from evaluators import load_model

    model = load_model("smollm2-135m").model
    mats = [m.weight.detach() for n, m in model.named_modules() if n in quant.weight_matrices(model)]
    touched = sum(float(w.sum()) for w in mats)  # page the weights in: loading is not quantizing
    assert touched == touched
    n = sum(w.numel() for w in mats)
    print(f"\n3. quantize all {len(mats)} weight matrices ({n / 1e6:.1f}M weights) of smollm2-135m "
          f"(wall-clock of the whole loop); {load()}")
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for setting in ([{"format": "rtn", "bits": 4, "group_size": 32}] * 2
                        + [{"format": "rtn", "bits": 3, "group_size": 64},
                           {"format": "rtn", "bits": 4, "group_size": 32, "options": {"clip": True}}]):
            start = time.perf_counter()
            for w in mats:
                quant.quantize(w, setting)
            label = quant.QuantSetting.from_dict(setting).describe()
            print(f"  {n_threads} threads  {label:<22} {time.perf_counter() - start:6.2f} s   ({load()})", flush=True)


CUDA_TILES = [(64, 64), (32, 128), (128, 64), (64, 128)]  # (BLOCK_N, BLOCK_K) of the Triton kernel


def cuda_table() -> None:
    from triton.testing import do_bench

    from quant.kernels.triton import TritonRTNKernel

    print(f"\n4. Triton rtn kernel on {torch.cuda.get_device_name()} (us per call, CUDA events); "
          f"x = dense fp16 us / kernel us")
    print(f"{'shape':<12}{'setting':<10}{'M':>3}{'fp16':>8}{'fp32':>8}{'deq+mm':>8}  "
          + "".join(f"{f'{n}x{k}':>9}" for n, k in CUDA_TILES) + f"{'best x':>8}{'max err':>9}")
    for out_features, in_features in SHAPES:
        w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))
        w16 = w.half().cuda()
        w32 = w.cuda()
        for bits, group in ((4, 32), (4, 128), (3, 64), (2, 64), (8, None)):
            setting = {"format": "rtn", "bits": bits, "group_size": group}
            packed = quant.quantize(w, setting)
            gpu = quant.PackedTensor(packed.setting, packed.shape, {k: v.cuda() for k, v in packed.buffers.items()})
            assert isinstance(prepare(gpu), TritonRTNKernel)
            deq = packed.dequantize().cuda()
            for m in (1, 16, 256):
                x = torch.randn(m, in_features, device="cuda")
                x16 = x.half()
                ref = x @ deq.t()
                dense16 = do_bench(lambda: F.linear(x16, w16))
                dense32 = do_bench(lambda: F.linear(x, w32))
                try:
                    deq_mm = do_bench(lambda: F.linear(x16, gpu.dequantize().half()))
                except Exception as exc:  # unpacking may need the CPU
                    print(f"  dequantize on CUDA failed: {type(exc).__name__}: {exc}")
                    deq_mm = float("nan")
                tiles, err = [], 0.0
                for bn, bk in CUDA_TILES:
                    kernel = TritonRTNKernel(gpu, block_n=bn, block_k=bk)
                    err = max(err, float((kernel(x) - ref).abs().max() / ref.abs().max()))
                    tiles.append(do_bench(lambda: kernel(x)))
                label = quant.QuantSetting.from_dict(setting).describe()
                print(f"{f'{out_features}x{in_features}':<12}{label:<10}{m:>3}{1e3 * dense16:>8.1f}"
                      f"{1e3 * dense32:>8.1f}{1e3 * deq_mm:>8.1f}  " + "".join(f"{1e3 * t:>9.1f}" for t in tiles)
                      + f"{dense16 / min(tiles):>7.2f}x{err:>9.1e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="2,1", help="thread counts for table 1; the first one is used after")
    parser.add_argument("--no-model", action="store_true", help="skip the SmolLM2 quantization timing")
    parser.add_argument("--no-ours", action="store_true", help="skip table 2")
    parser.add_argument("--cuda", action="store_true", help="only table 4, the Triton kernel on a GPU")
    args = parser.parse_args()
    if args.cuda:
        with torch.inference_mode():
            cuda_table()
        return
    threads = [int(t) for t in args.threads.split(",")]
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs")
    with torch.inference_mode():
        torch_ops_table(threads)
        if not args.no_ours:
            ours_table(threads[0])
    if not args.no_model:
        quantize_model_time(threads)


if __name__ == "__main__":
    main()
