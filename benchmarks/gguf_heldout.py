"""Our GGUF encoder's choices, judged on other text: the importance's form and GPTQ's damping, per matrix.

The importance matrix and GPTQ's error feedback are fitted to the calibration inputs. With fewer calibration
tokens than a matrix has input columns (Qwen2.5-Coder-1.5B's down_proj: 8960 columns), or other text than the
calibration's, the fit does not carry: this measures how much, and which damping (a fraction of the mean Hessian
diagonal added to it) keeps the gain. For each weight matrix of one layer, the relative output error
``tr(dW H dW^T) / tr(W H W^T)`` under the Hessian of the calibration windows (embedded Shakespeare, as
``benchmarks/gguf_encoders.py`` calibrates) and under the Hessian of held-out text (Python's
``pydoc_data/topics.py``), for the plain encoding with the Hessian's diagonal as importance, the plain
encoding as the format does it (the diagonal in llama.cpp's form, times sqrt(sigma^2 + w^2)), and
``+act_order+gptq`` at each damping::

    .venv/bin/python benchmarks/gguf_heldout.py [--type q2_k] [--damps 0.01,0.1,0.3,1.0] [--layer 0]

Writes ``benchmarks/results/gguf_heldout_<type>.txt`` (the command on top).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # benchmarks/kernels.py must not shadow `kernels`

import pydoc_data  # noqa: E402

from benchmarks._results import header, write_results  # noqa: E402

OTHER_TEXT = Path(pydoc_data.__file__).parent / "topics.py"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--type", default="q2_k", help="a GGUF block type")
    ap.add_argument("--damps", default="0.01,0.1,0.3,1.0")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--calib-seqs", type=int, default=32)
    ap.add_argument("--test-seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    t0 = time.time()
    head = header()

    import torch

    import evaluators
    import quant
    from quant.gguf import dequantize_blocks, quantize_blocks

    loaded = evaluators.load_model(args.model)
    tokens = evaluators.make_token_sets(loaded, evaluators.load_corpus(None), seq_len=args.seq_len, n_eval=1,
                                        n_calib=args.calib_seqs, seed=0)
    ids = loaded.encode(OTHER_TEXT.read_text())
    test = torch.as_tensor(ids[: args.test_seqs * args.seq_len]).reshape(args.test_seqs, args.seq_len)
    prefix = f".layers.{args.layer}."
    linears = {n: m for n, m in loaded.model.named_modules() if isinstance(m, torch.nn.Linear) and prefix in n}
    layers = loaded.model.model.layers
    del layers[args.layer + 1:]  # nothing after the layer measured is needed

    @torch.inference_mode()
    def hessians(windows) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}

        def hook(name):
            def add(_module, inputs):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                out[name] = out.get(name, 0) + x.T @ x
            return add

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
        for w in windows:
            loaded.model.model(torch.as_tensor(w).reshape(1, -1))
        for h in handles:
            h.remove()
        return out

    h_calib, h_test = hessians(tokens.calib), hessians(test)
    fmt = quant.get_format(args.type)
    bits, group = fmt.bits_range[0], fmt.group_sizes[0]
    variants = [("plain, diagonal", None), ("plain", {})] + [
        (f"gptq damp {d}", {"gptq": True, "act_order": True, "damp": float(d)}) for d in args.damps.split(",")]
    lines = [f"{args.model} layer {args.layer}, {args.type}: relative output error on the calibration windows "
             f"({args.calib_seqs} x {args.seq_len} Shakespeare tokens) / on held-out text ({args.test_seqs} x "
             f"{args.seq_len} tokens of pydoc_data/topics.py)",
             f"{'matrix':<24} {'inputs':>6}  " + "  ".join(f"{label:>19}" for label, _ in variants)]
    totals = {label: [0.0, 0.0, 0.0, 0.0] for label, _ in variants}
    for name, module in linears.items():
        w = module.weight.detach().float()
        cells = []
        for label, opts in variants:
            if opts is None:  # the Hessian's diagonal alone as the importance, through the codec
                blocks = w.reshape(-1, fmt.block_type.block)
                energy = torch.diagonal(h_calib[name]).clamp(min=0).expand(w.shape[0], -1).reshape(blocks.shape)
                q = dequantize_blocks(args.type, quantize_blocks(args.type, blocks, energy)).reshape(w.shape)
            else:
                q = quant.quantize(w, quant.QuantSetting(args.type, bits, group, opts),
                                   hessian=h_calib[name]).dequantize()
            d, relative = w - q, []
            for i, h in enumerate((h_calib[name], h_test[name])):
                err, ref = (float(((a @ h) * a).sum(dtype=torch.float64)) for a in (d, w))
                totals[label][2 * i] += err
                totals[label][2 * i + 1] += ref
                relative.append(err / ref)
            cells.append(f"{relative[0]:.4f}/{relative[1]:.4f}")
        lines.append(f"{name.split(prefix)[-1]:<24} {w.shape[1]:>6}  " + "  ".join(f"{c:>19}" for c in cells))
        print(lines[-1], flush=True)
    lines.append(f"{'all, weighted':<24} {'':>6}  " + "  ".join(
        f"{t[0] / t[1]:.4f}/{t[2] / t[3]:.4f}".rjust(19) for t in totals.values()))
    lines.append(f"{time.time() - t0:.0f} s")
    write_results(f"gguf_heldout_{args.type}.txt", "\n".join(lines), head)


if __name__ == "__main__":
    main()
