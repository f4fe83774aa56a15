"""The KV cache's one-pass sensitivity proxy against measured single-unit KL, on the embedded SmolLM2-135M.

    .venv/bin/python benchmarks/kv_proxy.py                  # 1024 tokens, 2 + 2 windows, 8 modules: 12 min idle, 30 at load 4
    .venv/bin/python benchmarks/kv_proxy.py --modules 4 --seq-len 512

Times :func:`evaluators.kv_proxy.kv_proxy_sensitivity` over every attention module's keys and values
at every candidate setting (``quant.kv.kv_settings``), on the calibration windows; then measures the
true KL (weights float, one unit's keys or values quantized, one forward over the evaluation windows)
for ``--modules`` modules spread over depth at a few settings, and prints Spearman's rank correlation
(overall, per role, per setting across modules), the predicted / measured ratios and a table, for the
proxy (the error's mean over tokens counted apart) and for the plain diagonal Fisher
(``common_mode=False``). Last, additivity: uniform settings on every module measured against the sum
of the units' predictions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/kernels.py must not shadow `kernels`

from evaluators import Evaluator  # noqa: E402
from evaluators.context import DataConfig  # noqa: E402
from evaluators.kv_attention import attention_modules  # noqa: E402
from evaluators.kv_proxy import kv_proxy_sensitivity  # noqa: E402
from quant.kv import FLOAT_KV, KVSetting, kv_settings, kv_unit  # noqa: E402

MEASURED = {"k": [KVSetting("turbo", b) for b in (2, 3, 4)] + [KVSetting("rtn_token", b) for b in (2, 3)]
            + [KVSetting("rtn_channel", b) for b in (2, 3)],
            "v": [KVSetting("turbo", b) for b in (2, 3, 4)] + [KVSetting("rtn_token", b) for b in (2, 3)]}
UNIFORM = [(KVSetting("turbo", 3), KVSetting("turbo", 3)), (KVSetting("turbo", 4), KVSetting("turbo", 4)),
           (KVSetting("rtn_channel", 3), KVSetting("rtn_token", 3))]


def _spread(names: list[str], n: int) -> list[str]:
    """``n`` names evenly spaced from the first to the last (over depth)."""
    return [names[i] for i in sorted(set(np.linspace(0, len(names) - 1, n).round().astype(int)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--n-calib", type=int, default=2, help="calibration windows of the proxy")
    parser.add_argument("--n-eval", type=int, default=2, help="evaluation windows of the measured KL")
    parser.add_argument("--modules", type=int, default=8, help="attention modules measured (spread over depth)")
    parser.add_argument("--seed", type=int, default=0, help="the proxy's label draws")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    config = DataConfig(model="smollm2-135m", seq_len=args.seq_len, n_eval=args.n_eval, n_calib=args.n_calib)
    loaded, tokens = config.load()
    evaluator = Evaluator(loaded, tokens)
    infos = attention_modules(loaded.model)
    print(f"smollm2-135m, weights float, {len(infos)} attention modules; proxy on {args.n_calib} x {args.seq_len} "
          f"calibration tokens, measured KL on {args.n_eval} x {args.seq_len} evaluation tokens; "
          f"{torch.get_num_threads()} threads; load and reference {time.perf_counter() - t0:.0f} s; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    candidates = {role: kv_settings(role) for role in ("k", "v")}
    table = kv_proxy_sensitivity(loaded.model, tokens.calib, candidates, seed=args.seed)
    plain = kv_proxy_sensitivity(loaded.model, tokens.calib, candidates, seed=args.seed, common_mode=False)
    pairs = sum(len(ss) for ss in candidates.values()) * len(infos)
    print(f"proxy: {len(infos)} modules x ({len(candidates['k'])} key + {len(candidates['v'])} value settings) = "
          f"{pairs} pairs in {table.seconds:.1f} s (Fisher {table.seconds_fisher:.1f} s, "
          f"quantize {table.seconds_quantize:.1f} s); plain diagonal {plain.seconds:.1f} s", flush=True)

    modules = _spread(list(infos), args.modules)
    rows: list[tuple[str, str, KVSetting, float, float, float]] = []  # (module, role, setting, predicted, measured, plain)
    t1 = time.perf_counter()
    for m in modules:
        for role, settings in MEASURED.items():
            for s in settings:
                pair = (s, FLOAT_KV) if role == "k" else (FLOAT_KV, s)
                kl = evaluator.evaluate_partial({}, kv={m: pair})["kl"]
                unit = kv_unit(m, role)
                rows.append((m, role, s, table.kl[unit][s.key()], kl, plain.kl[unit][s.key()]))
    seconds = time.perf_counter() - t1
    each = seconds / len(rows)
    print(f"measured: {len(rows)} single-unit KLs ({len(modules)} modules) in {seconds:.0f} s, {each:.1f} s each: "
          f"the proxy costs {table.seconds / each:.0f} such forwards for {pairs} pairs\n")

    meas = np.array([r[4] for r in rows])
    for label, pred in (("proxy", np.array([r[3] for r in rows])), ("plain diagonal", np.array([r[5] for r in rows]))):
        ratio = pred / meas
        print(f"{label + ': Spearman predicted vs measured':<52}{'n':>5}{'rho':>8}{'median pred/meas':>18}")
        groups = [("overall", np.ones(len(rows), bool))] + \
            [(f"role {role}", np.array([r[1] == role for r in rows])) for role in MEASURED] + \
            [(f"bits {b}", np.array([r[2].bits == b for r in rows])) for b in (2, 3, 4)] + \
            [(f"across modules, {role} {s.describe()}", np.array([r[1] == role and r[2] == s for r in rows]))
             for role, settings in MEASURED.items() for s in settings]
        per_setting = []
        for name, sel in groups:
            rho = spearmanr(pred[sel], meas[sel])[0]
            per_setting += [rho] if name.startswith("across") else []
            print(f"{name:<52}{sel.sum():>5}{rho:>8.3f}{np.median(ratio[sel]):>18.3f}")
        print(f"{label}: per-setting Spearman across modules median {np.median(per_setting):.3f}, min "
              f"{min(per_setting):.3f}; pred/meas range {ratio.min():.2f}-{ratio.max():.2f}, "
              f"sd of log ratio {np.std(np.log(ratio)):.2f}\n")

    print("the proxy's predicted / measured KL per unit (each cell: predicted / measured)")
    for role, settings in MEASURED.items():
        print(f"| {'unit':<30} | " + " | ".join(f"{s.describe():>17}" for s in settings) + " |")
        print(f"|{'-' * 32}|" + "|".join("-" * 19 for _ in settings) + "|")
        for m in modules:
            cells = {r[2]: f"{r[3]:.4f} / {r[4]:.4f}" for r in rows if r[0] == m and r[1] == role}
            print(f"| {kv_unit(m, role):<30} | " + " | ".join(f"{cells[s]:>17}" for s in settings) + " |")
        print()

    print(f"additivity: one setting on every module, measured vs the sum of the {2 * len(infos)} units' predictions")
    for k, v in UNIFORM:
        kv = {m: (k, v) for m in infos}
        sums = [sum(t.kl[kv_unit(m, "k")][k.key()] + t.kl[kv_unit(m, "v")][v.key()] for m in infos)
                for t in (table, plain)]
        measured = evaluator.evaluate_partial({}, kv=kv)["kl"]
        print(f"keys {k.describe():<16} values {v.describe():<10} measured {measured:.4f}  proxy sum {sums[0]:.4f} "
              f"(ratio {sums[0] / measured:.3f})  plain diagonal sum {sums[1]:.4f} (ratio {sums[1] / measured:.3f})",
              flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
