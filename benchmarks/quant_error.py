"""Relative quantization error of every format, side by side.

Prints one row per setting: the real bits per weight (from ``PackedTensor.nbytes``)
and the relative MSE, ``sum (w - w_hat)^2 / sum (w - mean w)^2``, on i.i.d.
Gaussian weights and, with ``--real``, on the linear layers of chosen blocks of the
embedded SmolLM2-135M (errors and variances summed over those matrices).

    .venv/bin/python benchmarks/quant_error.py            # Gaussian only, ~1 min
    .venv/bin/python benchmarks/quant_error.py --real     # + SmolLM2 layers 0, 15, 29
    .venv/bin/python benchmarks/quant_error.py --real --match turbo   # the turbo rows only
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/kernels.py must not shadow `kernels`

import quant  # noqa: E402

SETTINGS: list[dict] = (
    [{"format": "rtn", "bits": b, "group_size": 128} for b in (2, 3, 4)]
    + [{"format": "rtn", "bits": b, "group_size": 128, "options": {"clip": True}} for b in (2, 3, 4)]
    + [{"format": "rtn", "bits": b, "group_size": 128, "options": {"outlier_frac": 0.005}} for b in (2, 3, 4)]
    + [{"format": "turbo", "bits": b, "group_size": 128} for b in (1, 2, 3, 4)]
    + [{"format": "turbo", "bits": b, "group_size": 128, "options": {"qjl": True}} for b in (1, 2, 3)]
    + [{"format": "turbo", "bits": b, "group_size": 128, "options": {"rotation": "orthogonal"}} for b in (1, 2, 3, 4)]
    + [{"format": "turbo", "bits": b, "group_size": 128, "options": {"half_scales": True}} for b in (1, 2, 3, 4)]
    + [{"format": "lloyd", "bits": b, "group_size": 128} for b in (1, 2, 3)]
    + [{"format": "lloyd", "bits": b, "group_size": None} for b in (2, 3, 4)]
    + [{"format": "lloyd", "bits": b, "group_size": 64, "options": {"preset": "nf"}} for b in (2, 3, 4)]
    + [{"format": "ternary", "bits": 2, "group_size": 128}]
    + [{"format": "vq", "bits": b, "group_size": 128, "options": {"dim": 2}} for b in (3, 4, 5, 6, 8)]
    + [{"format": "vq", "bits": b, "group_size": 128, "options": {"dim": 4}} for b in (6, 8)]
)


def measure(weights: list[torch.Tensor], setting: dict) -> tuple[float, float, float]:
    """(bits per weight, relative MSE, seconds) over all ``weights`` together."""
    err = energy = 0.0
    nbytes = numel = 0
    start = time.perf_counter()
    for w in weights:
        packed = quant.quantize(w, setting)
        err += float((packed.dequantize() - w).double().pow(2).sum())
        energy += float((w.double() - w.double().mean()).pow(2).sum())
        nbytes += packed.nbytes
        numel += w.numel()
    return 8 * nbytes / numel, err / energy, time.perf_counter() - start


def real_weights(layers: list[int]) -> list[torch.Tensor]:
    from evaluators import load_model

    model = load_model("smollm2-135m").model
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    return [model.get_submodule(f"model.layers.{i}.{n}").weight.detach().float().clone()
            for i in layers for n in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="also measure SmolLM2-135M's linear layers")
    parser.add_argument("--layers", default="0,15,29", help="blocks of SmolLM2 to use with --real")
    parser.add_argument("--shape", default="1024,1024", help="shape of the Gaussian matrix (out,in)")
    parser.add_argument("--match", default="", help="only the settings whose label contains this text")
    args = parser.parse_args()

    out, inp = (int(v) for v in args.shape.split(","))
    gaussian = [torch.randn(out, inp, generator=torch.Generator().manual_seed(0))]
    real = real_weights([int(v) for v in args.layers.split(",")]) if args.real else None

    head = f"| {'setting':<28} | bits/w (gauss) | rel MSE gauss |"
    rule = f"|{'-' * 30}|----------------|---------------|"
    if real is not None:
        n_real = sum(w.numel() for w in real)
        print(f"real: SmolLM2-135M blocks {args.layers}, {len(real)} matrices, {n_real / 1e6:.2f}M weights")
        head += " bits/w (real) | rel MSE real | s (real) |"
        rule += "---------------|--------------|----------|"
    print(head)
    print(rule)
    for setting in SETTINGS:
        label = quant.QuantSetting.from_dict(setting).describe()
        if args.match not in label:
            continue
        bpw, mse, _ = measure(gaussian, setting)
        row = f"| {label:<28} | {bpw:14.3f} | {mse:13.5f} |"
        if real is not None:
            rbpw, rmse, secs = measure(real, setting)
            row += f" {rbpw:13.3f} | {rmse:12.5f} | {secs:8.1f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
