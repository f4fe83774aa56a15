"""What each ``--target`` can reach on a model: the smallest policy its space holds, per granularity, beside
a budget (the demo's 3.0 bpw by default). Nothing is quantized: the bytes come from the formats' exact
predictions from the shapes (``expected_nbytes``, equal to the packed buffers by the tests).

    .venv/bin/python benchmarks/targets.py [--model smollm2-135m] [--budget 3.0]

Writes the table to ``benchmarks/results/targets_<model>.txt`` as well (the command on top).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # benchmarks/kernels.py must not shadow `kernels`

from benchmarks._results import header, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=float, default=3.0, help="bits per weight to compare with")
    args = ap.parse_args()
    head = header()

    from pydantic import ValidationError

    import evaluators
    import quant
    from search.request import SearchRequest
    from search.space import GRANULARITIES
    from search.targets import TARGETS

    loaded = evaluators.load_model(args.model)
    matrices = quant.weight_matrices(loaded.model)
    numel = sum(h * w for h, w in matrices.values())
    widths = sorted({w for _, w in matrices.values()})
    lines = [f"{args.model}: {len(matrices)} weight matrices, {numel:,} weights, row widths {widths}",
             f"{'target':<11} {'granularity':<11} {'smallest bpw':>12}  reaches {args.budget} bpw"]
    for name in TARGETS:
        for granularity in GRANULARITIES:
            try:
                space = SearchRequest(target=name, budget=f"{args.budget}bpw", granularity=granularity).space(matrices)
            except ValidationError as exc:  # refused: the message says why (a granularity the runtime cannot tie)
                lines.append(f"{name:<11} {granularity:<11} {'-':>12}  refused: {exc.errors()[0]['msg'][13:]}")
                continue
            bpw = 8 * space.min_bytes() / numel
            lines.append(f"{name:<11} {granularity:<11} {bpw:>12.3f}  {'yes' if bpw <= args.budget else 'no'}")
    write_results(f"targets_{Path(args.model).name}.txt", "\n".join(lines), head)


if __name__ == "__main__":
    main()
