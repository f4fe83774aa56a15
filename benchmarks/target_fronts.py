"""Each ``--target``'s best point at a few budgets, re-measured from the file that target exports.

For each target, one search at the largest budget (the target's own space, ``--granularity fused``, which
every target takes), then at each budget the best point within it is exported as the target's file and that
file is scored against the float model on held-out text (Python's ``pydoc_data/topics.py``, PSF licence; the
search measured on the embedded Shakespeare), on the same tokens for every target:

- ``turboquant``: the packed checkpoint, reloaded by ``quant.load_checkpoint``;
- ``vllm``: the compressed-tensors folder, loaded by transformers (float32, compressed-tensors decompressing);
- ``llamacpp``: the GGUF, scored by the real ``llama-perplexity --kl-divergence`` against the model's float
  GGUF (the two torch rows use :func:`evaluators.llamacpp.score_like_llamacpp`, the same positions and sums).

Beside each: the search's KL of that point and of the best uniform setting of the target's space within the
budget (both on the search's evaluation windows), and the bits per weight of the file itself (its bytes on
disk over the weight matrices' weights: headers, norms, and for vLLM the embedding and head it keeps in
float, which the search counts at the setting it gave them). A budget a target cannot reach shows ``-``.

    .venv/bin/python benchmarks/target_fronts.py [--model smollm2-135m] [--budgets 3.0,3.5,4.0,4.5]

On SmolLM2 the llamacpp space leaves out q4_1 and q5_1 (the embedded float weights are the dequantized Q4_1
file, which they re-find) and the 256-weight types reach only ``down_proj`` (576-wide rows): that row says little
about llama.cpp. Writes ``benchmarks/results/target_fronts_<model>.txt`` (the command on top).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # benchmarks/kernels.py must not shadow `kernels`

import pydoc_data  # noqa: E402

from benchmarks._results import header, write_results  # noqa: E402

OTHER_TEXT = Path(pydoc_data.__file__).parent / "topics.py"
# llama.cpp's types minus the embedded model's own grid (q4_1, q5_1) and the GPTQ variants (each costs the proxy a
# quantization pass of every matrix at every type: hours here).
LLAMACPP_FORMATS = "q4_0,q5_0,q8_0,iq4_nl,q2_k,q3_k,q4_k,q5_k,q6_k,iq4_xs,iq3_s,iq3_xxs,iq2_s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", default="3.0,3.5,4.0,4.5", help="bits per weight")
    ap.add_argument("--targets", default="turboquant,vllm,llamacpp")
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--eval-seqs", type=int, default=4)
    ap.add_argument("--test-seqs", type=int, default=8, help="held-out windows of --seq-len the files are scored on")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    budgets = sorted(float(b) for b in args.budgets.split(","))
    head = header()

    import quant
    from evaluators import load_model
    from evaluators.llamacpp import llamacpp, read_base_tokens, save_base, score, score_like_llamacpp, source_gguf
    from search.driver import SearchConfig, run_search
    from search.exporters import export_point
    from search.request import SearchRequest
    from search.targets import get_target
    from studies import Store

    work = Path(tempfile.mkdtemp(prefix="target-fronts-"))
    storage = f"sqlite:///{work / 'fronts.db'}"
    cpp = llamacpp()
    base = work / "base.kld"
    save_base(cpp, source_gguf(args.model, cpp), OTHER_TEXT, base, n_ctx=args.seq_len, chunks=args.test_seqs)
    tokens = read_base_tokens(base)
    reference = load_model(args.model).model

    def from_file(target: str, path: Path) -> float:
        if target == "llamacpp":
            return score(cpp, path, base).kl
        if target == "turboquant":
            model = quant.load_checkpoint(path).model
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
        return score_like_llamacpp(reference, model.eval(), tokens).kl

    def file_bytes(path: Path) -> int:
        return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    rows, t0 = [], time.time()
    for name in args.targets.split(","):
        target = get_target(name)
        extra = {"formats": LLAMACPP_FORMATS.split(",")} if name == "llamacpp" and args.model == "smollm2-135m" else {}
        request = SearchRequest(target=name, model=args.model, budget=f"{budgets[-1]}bpw", trials=args.trials,
                                eval_seqs=args.eval_seqs, seq_len=args.seq_len, granularity="fused", study=name,
                                workers=args.workers, **extra)
        run_search(SearchConfig(request, storage=storage, progress=False))
        store = Store(storage)
        row = store.get_study(name)
        frame = store.trials_frame(row)
        done = frame[frame["state"] == "complete"]
        for budget in budgets:
            fits = done[done["bpw"] <= budget + 1e-9]
            if fits.empty:
                rows.append((name, budget, None, None, None, None, None, None))
                continue
            best = fits.loc[fits["kl"].idxmin()]
            uniform = fits[fits["seed"].fillna("").str.startswith("uniform:")]
            flat = uniform.loc[uniform["kl"].idxmin()] if not uniform.empty else None
            out = work / (f"{name}-{budget}" + (".gguf" if name == "llamacpp" else ""))
            export_point(storage, name, target.export, out, trial=int(best["trial"]), progress=False)
            rows.append((name, budget, best["bpw"], best["kl"], from_file(name, out),
                         8 * file_bytes(out) / row.numel,
                         None if flat is None else flat["seed"][len("uniform:"):],
                         None if flat is None else flat["kl"]))
        print(f"{name}: done in {time.time() - t0:.0f} s", flush=True)

    lines = [f"{args.model}; searches: {args.trials} trials, {args.eval_seqs} x {args.seq_len} Shakespeare windows, "
             f"granularity fused; files scored on {args.test_seqs} x {args.seq_len} tokens of pydoc_data/topics.py; "
             f"{time.time() - t0:.0f} s",
             f"{'target':<11} {'budget':>6} {'bpw':>6} {'KL search':>10} {'KL file':>9} {'file bpw':>9}  "
             "best uniform within the budget"]
    for name, budget, bpw, kl, kl_file, file_bpw, flat, flat_kl in rows:
        if bpw is None:
            lines.append(f"{name:<11} {budget:>6.2f} {'-':>6} {'-':>10} {'-':>9} {'-':>9}  -")
            continue
        uniform = "-" if flat is None else f"{flat}: KL {flat_kl:.4f}"
        lines.append(f"{name:<11} {budget:>6.2f} {bpw:>6.3f} {kl:>10.4f} {kl_file:>9.4f} {file_bpw:>9.3f}  {uniform}")
    write_results(f"target_fronts_{Path(args.model).name}.txt", "\n".join(lines), head)


if __name__ == "__main__":
    main()
