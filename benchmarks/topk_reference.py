"""The compact reference against the full one: KL of the same policies measured against SmolLM2's full
log-probs, against its top-K with the rest as one bucket, and against its top-K with words drawn from the
rest (the default of ``--reference-topk``), side by side in one run; and the references' bytes.

    .venv/bin/python benchmarks/topk_reference.py                # 8 x 256 tokens, K = 512, ~10 min
    .venv/bin/python benchmarks/topk_reference.py --k 128 --tail 16,64,256
    .venv/bin/python benchmarks/topk_reference.py --storage sqlite:///s.db --study NAME   # a study's front

The policies: uniform rtn 2/3/4-bit g64 and 8-bit per channel, and mixed ones (each matrix's bits drawn
from 2/3/4, g64, seeded), on the search's text and on another (Python's ``pydoc_data/topics.py``); or,
with ``--study``, the points of a stored study's front, on its own windows.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # benchmarks/kernels.py must not shadow `kernels`

import pydoc_data  # noqa: E402
import torch  # noqa: E402

import quant  # noqa: E402
from evaluators import Evaluator, TopKReference, reference_nbytes  # noqa: E402
from evaluators.context import DataConfig  # noqa: E402

OTHER_TEXT = str(Path(pydoc_data.__file__).parent / "topics.py")


def _policies(names: list[str], mixed: int) -> list[tuple[str, quant.Policy]]:
    rows = [(s.describe(), quant.Policy.uniform(names, s)) for s in
            (quant.QuantSetting("rtn", b, 64) for b in (2, 3, 4))]
    rows.append(("rtn8ch", quant.Policy.uniform(names, quant.QuantSetting("rtn", 8, None))))
    for seed in range(mixed):
        rng = random.Random(seed)
        low = rng.choice((2, 3))
        settings = {n: quant.QuantSetting("rtn", rng.choice((low, low + 1, 4)), 64) for n in names}
        rows.append((f"mixed{seed} (rtn {low}-4 bits g64)", quant.Policy(settings)))
    return rows


def _front(storage: str, name: str) -> tuple[DataConfig, list[tuple[str, quant.Policy]]]:
    """A stored study's data and the policies of its front's points, smallest first."""
    from studies import Store

    store = Store(storage)
    row = store.get_study(name)
    points = []
    for t in store.front(row).itertuples():
        trial = store.trial(row, int(t.trial))
        points.append((f"trial {trial.number} ({8 * trial.bytes / row.numel:.2f} bpw)",
                       quant.Policy.from_dict(trial.policy)))
    return DataConfig.from_dict(row.provenance), points


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--tail", default="0,16,64", help="words drawn from the rest per position (0: one bucket)")
    p.add_argument("--mixed", type=int, default=4)
    p.add_argument("--eval-seqs", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--storage", default=None, help="with --study: the study's storage URL")
    p.add_argument("--study", default=None, help="measure this stored study's front instead")
    args = p.parse_args()
    tails = [int(t) for t in args.tail.split(",")]
    if args.study:
        data, points = _front(args.storage, args.study)
        runs = [(data, points, f"study {args.study}'s front, on its own windows")]
    else:
        runs = []
        for dataset in ("shakespeare", OTHER_TEXT):
            data = DataConfig(model="smollm2-135m", dataset=dataset, seq_len=args.seq_len, n_eval=args.eval_seqs,
                              n_calib=0)
            runs.append((data, None, "Shakespeare (the search's text)" if dataset == "shakespeare"
                         else "pydoc_data/topics.py"))
    for data, points, name in runs:
        loaded, tokens = data.load()
        full = Evaluator(loaded, tokens)
        logprobs = torch.from_numpy(full.reference)
        vocab = logprobs.shape[-1]
        rest = 1 - torch.topk(logprobs, args.k, -1).values.exp().sum(-1)
        print(f"\n{name}: {tokens.eval.shape[0]} x {tokens.seq_len} tokens, vocabulary {vocab}; mass outside the top "
              f"{args.k}: {float(rest.mean()):.3f} on average")
        # One evaluator per reference over the same model: each applies the policy before it measures.
        compact = {t: Evaluator(loaded, tokens, reference=TopKReference.from_logprobs(logprobs, args.k, tail=t))
                   for t in tails}
        print(f"reference bytes: full {full.reference.nbytes / 1e6:.1f} MB; " + ", ".join(
            f"top-{args.k} {'bucket' if t == 0 else f'+{t} drawn'} {ev.reference.nbytes / 1e6:.2f} MB"
            for t, ev in compact.items()))
        header = f"{'policy':34} {'full KL':>9} " + " ".join(
            f"{'bucket' if t == 0 else f'drawn {t}':>17}" for t in tails)
        print(header)
        names = list(full.matrices)
        for label, policy in points or _policies(names, args.mixed):
            kl = full.evaluate(policy)["kl"]
            cells = []
            for ev in compact.values():
                # The same packed matrices: quantized (gptq: calibrated) once, by the first evaluator.
                ev.cache, ev.hessians = full.cache, full.hessians
                part = ev.evaluate(policy)["kl"]
                cells.append(f"{part:9.5f} ({part / kl:.4f})")
            print(f"{label:34} {kl:9.5f} " + " ".join(f"{c:>17}" for c in cells), flush=True)
        full.restore_float()
    print("\nby formula, 8 x 1,023 positions: " + "; ".join(
        f"vocabulary {v:,}: full {reference_nbytes(8, 1023, v, None) / 1e9:.2f} GB, top-{args.k} + 64 drawn "
        f"{reference_nbytes(8, 1023, v, args.k) / 1e6:.1f} MB" for v in (49_152, 128_256, 262_144)))


if __name__ == "__main__":
    main()
