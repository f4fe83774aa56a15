"""TurboQuant's searched GGUF files against llama.cpp's stock types, on llama.cpp's own ground.

One run, one table: the stock types made by the real ``llama-quantize`` from the same float model (each
with and without an importance matrix from ``llama-imatrix`` on the calibration text), and our searched
GGUF at each of their file sizes, all scored by ``llama-perplexity --kl-divergence`` against the float
GGUF on evaluation text disjoint from the calibration text::

    .venv/bin/python benchmarks/vs_llamacpp.py [--eval-seqs 16] [--trials 40]

Our files come from one study over llama.cpp's block types (``--formats gguf``, matrix granularity,
the sensitivity proxy's DP seeds, then ``evo``): at each stock size the best measured policy whose file
fits, or the DP allocation solved at that size from the same table (measured here) if it is better.
``--studies`` runs a second study without q4_1 / q5_1: the embedded model's float weights are the
dequantized Q4_1 file, which q4_1 (and q5_1 at half the step) reproduce exactly, so that row shows
what the allocation and encoders win when the source grid is out of reach.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import dataclasses
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # benchmarks/kernels.py must not shadow `kernels`

STOCK = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "IQ4_XS", "Q4_0")
GRID_TYPES = ("q4_1", "q5_1")  # the embedded model's own grid (see the module docstring)


def _text(tokenizer, windows) -> str:
    return "".join(tokenizer.decode(w) for w in windows)


def _held_out(loaded, text: str, seq_len: int, n_eval: int, n_calib: int, n_test: int):
    """Windows disjoint from the search's evaluation and calibration windows: the next ones in
    make_token_sets' own seeded order (seed 0), so the scoring text is one the search never saw."""
    import numpy as np

    ids = loaded.encode(text)
    n_windows = len(ids) // seq_len
    order = np.random.default_rng(0).permutation(n_windows)
    picked = np.sort(order[n_eval + n_calib:n_eval + n_calib + n_test])
    return ids[: n_windows * seq_len].reshape(n_windows, seq_len)[picked]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-seqs", type=int, default=8, help="windows the search measures its trials on")
    ap.add_argument("--test-seqs", type=int, default=16, help="held-out windows everything is scored on")
    ap.add_argument("--calib-seqs", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--trials", type=int, default=40, help="trials of each study (seeds included)")
    ap.add_argument("--types", default=",".join(STOCK))
    ap.add_argument("--studies", choices=("all", "nogrid", "both"), default="both",
                    help="our studies: all types, without q4_1/q5_1 (see the docstring), or both")
    ap.add_argument("--reuse", action="store_true", help="reuse the float GGUF, KL base, importance matrix and "
                    "stock scores of an earlier run with the same windows")
    ap.add_argument("--work", default=None, help="folder for the files (default: cache/bench-vs-llamacpp)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    import evaluators
    from benchmarks._gguf_search import best_gguf_at, calibration, run_gguf_study
    from evaluators.llamacpp import LlamaScore, llamacpp, save_base, score, source_gguf
    from quant.gguf_file import write_gguf
    from transformers import AutoTokenizer

    work = Path(args.work or evaluators.cache_dir() / "bench-vs-llamacpp")
    work.mkdir(parents=True, exist_ok=True)
    cpp = llamacpp()
    loaded = evaluators.load_model("smollm2-135m")
    tokens = evaluators.make_token_sets(loaded, evaluators.load_corpus(None), seq_len=args.seq_len,
                                        n_eval=args.eval_seqs, n_calib=args.calib_seqs, seed=0)
    tok = AutoTokenizer.from_pretrained(evaluators.cache_dir() / "models" / "smollm2-135m")
    eval_txt, calib_txt = work / "eval.txt", work / "calib.txt"
    test = _held_out(loaded, evaluators.load_corpus(None), args.seq_len, args.eval_seqs, args.calib_seqs,
                     args.test_seqs)
    eval_txt.write_text(_text(tok, test))
    calib_txt.write_text(_text(tok, tokens.calib))

    t0 = time.time()
    modules = dict(loaded.model.named_modules())
    import quant

    weights = {n: modules[n].weight.detach() for n in quant.weight_matrices(loaded.model)}
    # Files of an earlier run with the same windows are reused (--reuse): they depend on nothing else.
    tag = f"{args.seq_len}-{args.eval_seqs}-{args.calib_seqs}-{args.test_seqs}"
    f32, base, imatrix = work / "f32.gguf", work / f"base-{tag}.kld", work / f"imatrix-{tag}.gguf"
    if not (args.reuse and f32.exists()):
        write_gguf(f32, source_gguf("smollm2-135m"), weights)
    if not (args.reuse and base.exists()):
        save_base(cpp, f32, eval_txt, base, n_ctx=args.seq_len, chunks=args.test_seqs, threads=args.threads)
    if not (args.reuse and imatrix.exists()):
        cpp.run("llama-imatrix", "-m", f32, "-f", calib_txt, "-o", imatrix, "-c", args.seq_len, "-b", args.seq_len,
                "-t", args.threads)
    cache_file = work / f"stock-scores-{tag}.json"
    cached = json.loads(cache_file.read_text()) if args.reuse and cache_file.exists() else {}
    print(f"float GGUF, KL base and importance matrix in {time.time() - t0:.0f} s", flush=True)

    rows: list[tuple[str, int, object, str]] = []  # (method, file bytes, LlamaScore, note)
    stock_sizes: list[tuple[str, int]] = []
    for qtype in args.types.split(","):
        for im in (False, True):
            out = work / f"{qtype}{'-imatrix' if im else ''}-{tag}.gguf"
            name = f"{qtype}{' +imatrix' if im else ''}"
            if name in cached and out.exists():
                s = LlamaScore(**cached[name])
            else:
                cpp.run("llama-quantize", *(["--imatrix", imatrix] if im else []), f32, out, qtype, args.threads)
                s = score(cpp, out, base, threads=args.threads)
                cached[name] = dataclasses.asdict(s)
                cache_file.write_text(json.dumps(cached))
            rows.append((f"llama.cpp {name}", out.stat().st_size, s, ""))
            stock_sizes.append((name, out.stat().st_size))
            print(f"{name:>16}: {out.stat().st_size / 2**20:7.2f} MiB  KL {s.kl:.4f}", flush=True)

    studies = {"all": [("ours", None)], "nogrid": [("ours, no q4_1/q5_1", GRID_TYPES)]}
    studies = {"both": studies["all"] + studies["nogrid"], **studies}[args.studies]
    sizes = sorted({size for _, size in stock_sizes})
    for label, exclude in studies:
        t = time.time()
        study = run_gguf_study(loaded, tokens, f32, max(sizes), sizes, trials=args.trials, exclude=exclude,
                               name=f"vs-llamacpp-{'nogrid' if exclude else 'all'}-{args.eval_seqs}x{args.seq_len}",
                               storage=f"sqlite:///{work / 'studies.db'}", eval_seqs=args.eval_seqs,
                               seq_len=args.seq_len, calib_seqs=args.calib_seqs)
        print(f"{label}: study {study['summary']} in {time.time() - t:.0f} s", flush=True)
        calib = calibration(study)
        for size in sizes:
            names = "/".join(n for n, s in stock_sizes if s == size)
            out = work / f"ours-{'nogrid-' if exclude else ''}{size}-{tag}.gguf"
            picked = best_gguf_at(study, size, out, source_gguf("smollm2-135m"), calib)
            s = score(cpp, out, base, threads=args.threads)
            rows.append((f"{label} <= {names}", out.stat().st_size, s, picked))
            print(f"{label} <= {names}: {out.stat().st_size / 2**20:7.2f} MiB  KL {s.kl:.4f} ({picked})", flush=True)

    numel = sum(w.numel() for w in weights.values())
    print(f"\nSmolLM2-135M (Shakespeare corpus). Scored by llama-perplexity --kl-divergence on {args.test_seqs} x "
          f"{args.seq_len} held-out tokens (the second half of each chunk), which neither the search ({args.eval_seqs} "
          f"windows) nor the calibration / importance matrix ({args.calib_seqs} windows) saw; "
          f"bpw = 8 x file bytes / {numel:,} weights")
    print(f"{'method':<40} {'MiB':>8} {'bpw':>6} {'KL':>8} {'PPL':>9} {'top1':>6}  picked")
    for method, size, s, note in sorted(rows, key=lambda r: r[1]):
        print(f"{method:<40} {size / 2**20:8.2f} {8 * size / numel:6.3f} {s.kl:8.4f} {s.ppl:9.3f} {s.top1:6.3f}  {note}")


if __name__ == "__main__":
    main()
