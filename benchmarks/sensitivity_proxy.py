"""The sensitivity proxy against the measured table: time, rank correlation and the DP seeds each solves.

    python benchmarks/sensitivity_proxy.py --model smollm2-135m --eval-seqs 4 --sensitivity-seqs 1 \\
        --granularity block --bits 2,3,4 --groups 32,64,128 --threads 2

The measured table (one forward per (unit, setting), :func:`search.sensitivity.measure_sensitivity`)
takes minutes; it is cached in a JSON file keyed by model, tokens, units and settings, so reruns reuse
it (``--measured-only`` fills the cache and stops). Printed: the time of each table; Spearman's rank
correlation of proxy and measured KL per format (bits x group), within each unit and overall; the DP seed
solved from each table at each budget, with its predicted and its measured KL (one forward each).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # benchmarks/kernels.py must not shadow `kernels`

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

import quant  # noqa: E402
from evaluators import Evaluator, cache_dir, calibration_hessians  # noqa: E402
from evaluators.context import DataConfig  # noqa: E402
from evaluators.proxy import proxy_sensitivity  # noqa: E402
from search.seeds import solve_dp  # noqa: E402
from search.sensitivity import SensitivityTable, measure_sensitivity  # noqa: E402
from search.space import SearchSpace  # noqa: E402


def _measured_path(ev: Evaluator, space: SearchSpace, windows: int) -> Path:
    # Keyed by what the table measures, not by setting keys (their spelling may change between versions).
    ident = json.dumps([ev.loaded.fingerprint, ev.tokens.fingerprint, windows, space.granularity, list(space.units),
                        [s.describe() for s in space.settings()]])
    return cache_dir() / "sensitivity" / f"measured-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"


def measured_table(ev: Evaluator, space: SearchSpace, windows: int, path: Path | None = None) -> SensitivityTable:
    """The measured table, read from its JSON cache or measured now (and cached).

    The file holds ``(units, settings)`` rows in the space's order with the settings' labels, so a
    rerun finds it whatever the settings' key strings are.
    """
    path = path or _measured_path(ev, space, windows)
    settings = space.settings()
    labels, keys = [s.describe() for s in settings], [s.key() for s in settings]
    if path.exists():
        data = json.loads(path.read_text())
        if data["units"] != list(space.units) or data["settings"] != labels:
            raise SystemExit(f"{path} holds another space ({len(data['units'])} units, settings {data['settings']}); "
                             "give another --measured-cache")
        kl = {u: dict(zip(keys, row)) for u, row in zip(space.units, data["kl"])}
        nbytes = {u: dict(zip(keys, row)) for u, row in zip(space.units, data["nbytes"])}
        return SensitivityTable(dict(space.units), settings, kl, nbytes, seconds=data["seconds"])
    table = measure_sensitivity(ev, settings, units=space.units, windows=windows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"units": list(space.units), "settings": labels,
                               "kl": [[table.kl[u][k] for k in keys] for u in space.units],
                               "nbytes": [[table.nbytes[u][k] for k in keys] for u in space.units],
                               "seconds": table.seconds, "windows": windows, "threads": torch.get_num_threads()}))
    tmp.rename(path)
    return table


def _forward_seconds(ev: Evaluator, windows: int, repeats: int = 3) -> float:
    """Median wall time of one forward over ``windows`` evaluation windows: the measured table's cost per pair."""
    ids = torch.from_numpy(ev.tokens.eval[:windows])
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t = time.perf_counter()
            ev.model(input_ids=ids, use_cache=False)
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def _spearman_rows(proxy: np.ndarray, measured: np.ndarray,
                   settings: list[quant.QuantSetting]) -> list[tuple[str, int, float]]:
    rows = [(s.describe(), proxy.shape[0], float(spearmanr(proxy[:, j], measured[:, j])[0]))
            for j, s in enumerate(settings)]
    within = [spearmanr(proxy[i], measured[i])[0] for i in range(proxy.shape[0])]
    rows.append(("within a unit (mean)", proxy.shape[1], float(np.nanmean(within))))
    rows.append(("overall", proxy.size, float(spearmanr(proxy.ravel(), measured.ravel())[0])))
    return rows


def _seed(ev: Evaluator, space: SearchSpace, table: SensitivityTable, budget: int) -> dict:
    names, kl, nb = table.arrays()
    cols = solve_dp(kl, nb, budget)
    if cols is None:
        raise SystemExit(f"budget {8 * budget / space.numel:.2f} bpw is below the smallest policy of the space")
    rows = np.arange(len(names))
    policy = space.expand({n: table.settings[j] for n, j in zip(names, cols)})
    r = ev.evaluate(policy)
    return {"cols": cols.tolist(), "bpw": r["bpw"], "predicted": float(kl[rows, cols].sum()), "kl": r["kl"],
            "ppl": r["ppl"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--eval-seqs", type=int, default=4, help="windows the seeds are measured on")
    p.add_argument("--calib-seqs", type=int, default=8, help="calibration windows (the Fisher, gptq)")
    p.add_argument("--fisher-seqs", type=int, default=None, help="calibration windows of the Fisher (default all)")
    p.add_argument("--sensitivity-seqs", type=int, default=1, help="windows of the measured table")
    p.add_argument("--granularity", default="block")
    p.add_argument("--bits", default="2,3,4")
    p.add_argument("--groups", default="32,64,128")
    p.add_argument("--formats", default="rtn")
    p.add_argument("--budgets", default="3.0,4.0", help="bpw of the DP seeds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--measured-cache", type=Path, default=None, help="JSON of the measured table")
    p.add_argument("--measured-only", action="store_true", help="fill the measured table's cache and stop")
    p.add_argument("--noise-draws", type=int, default=3,
                   help="DP seeds from the measured table times lognormal noise (10 %%): how fragile a seed is")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = DataConfig(model=args.model, n_eval=args.eval_seqs, n_calib=args.calib_seqs)
    loaded, tokens = data.load()
    ev = Evaluator(loaded, tokens)
    space = SearchSpace(quant.weight_matrices(loaded.model), tuple(int(b) for b in args.bits.split(",")),
                        tuple(None if g == "ch" else int(g) for g in args.groups.split(",")),
                        tuple(args.formats.split(",")), granularity=args.granularity)
    settings = space.settings()
    measured = measured_table(ev, space, args.sensitivity_seqs, args.measured_cache)
    if args.measured_only:
        print(f"measured table: {len(measured.units)} units x {len(settings)} settings in {measured.seconds:.1f} s")
        return 0
    ev.restore_float()

    t0, cpu0 = time.perf_counter(), time.process_time()
    hessians = calibration_hessians(ev.model, tokens, ev.matrices) if quant.needs_hessians(settings) else None
    seconds_hessians = time.perf_counter() - t0
    proxy = proxy_sensitivity(ev.model, tokens.calib[:args.fisher_seqs], settings, units=space.units,
                              hessians=hessians)
    proxy_seconds = seconds_hessians + proxy.seconds
    proxy_cpu = time.process_time() - cpu0  # CPU seconds of all threads: what a loaded machine does not change
    forward = _forward_seconds(ev, args.sensitivity_seqs)  # on a shared machine the cost in forwards holds
    proxy_table = SensitivityTable(proxy.units, settings, proxy.kl, proxy.nbytes, seconds=proxy_seconds)
    names, m_kl, m_nb = measured.arrays()
    _, p_kl, p_nb = proxy_table.arrays()
    assert (m_nb == p_nb).all(), "both tables count the same packed bytes"

    pairs = m_kl.size
    fisher_windows = len(tokens.calib[:args.fisher_seqs])
    print(f"{args.model}: {len(names)} units ({args.granularity}) x {len(settings)} settings "
          f"({args.formats} bits {args.bits} groups {args.groups}) = {pairs} pairs, {args.threads} threads")
    print(f"{'table':<10}{'seconds':>10}{'s/pair':>9}  notes")
    print(f"{'measured':<10}{measured.seconds:>10.1f}{measured.seconds / pairs:>9.3f}  one forward per pair, "
          f"{args.sensitivity_seqs} x {tokens.seq_len} tokens (the run that filled the cache)")
    print(f"{'proxy':<10}{proxy_seconds:>10.1f}{proxy_seconds / pairs:>9.3f}  Fisher {proxy.seconds_fisher:.1f} s "
          f"({fisher_windows} x {tokens.seq_len} calibration tokens), quantize {proxy.seconds_quantize:.1f} s"
          + (f", Hessians {seconds_hessians:.1f} s" if hessians else ""))
    print(f"proxy CPU time {proxy_cpu:.1f} s ({args.threads} threads); wall-clock speed-up "
          f"{measured.seconds / proxy_seconds:.1f}x")
    print(f"one forward over {args.sensitivity_seqs} x {tokens.seq_len} tokens now: {forward:.3f} s (median of 3), "
          f"so the proxy costs {proxy_seconds / forward:.0f} forwards; the measured table costs {pairs} forwards "
          f"plus quantizing\n")

    spearman = _spearman_rows(p_kl, m_kl, settings)
    print(f"{'Spearman proxy vs measured':<26}{'n':>6}{'rho':>8}")
    for label, n, rho in spearman:
        print(f"{label:<26}{n:>6}{rho:>8.3f}")
    print(f"median predicted / measured KL: {float(np.median(p_kl / np.maximum(m_kl, 1e-12))):.3f}\n")

    print(f"{'DP seed':<10}{'from':<10}{'bpw':>7}{'predicted':>11}{'measured':>10}{'ppl':>10}{'units differ':>14}")
    seeds = []
    for bpw in (float(b) for b in args.budgets.split(",")):
        budget = int(bpw * space.numel / 8)
        pair = {"measured": _seed(ev, space, measured, budget), "proxy": _seed(ev, space, proxy_table, budget)}
        differ = sum(a != b for a, b in zip(pair["measured"]["cols"], pair["proxy"]["cols"]))
        for label, r in pair.items():
            print(f"{bpw:<10.2f}{label:<10}{r['bpw']:>7.3f}{r['predicted']:>11.4f}{r['kl']:>10.4f}{r['ppl']:>10.2f}"
                  + (f"{differ:>14}" if label == "proxy" else ""))
        ratio = pair["proxy"]["kl"] / pair["measured"]["kl"]
        print(f"{'':<10}proxy's seed KL / measured table's seed KL: {ratio:.3f}")
        noisy = []
        for draw in range(args.noise_draws):
            rng = np.random.default_rng(draw)
            kl = {u: {k: v * float(rng.lognormal(0.0, 0.1)) for k, v in row.items()} for u, row in measured.kl.items()}
            noisy_table = SensitivityTable(measured.units, settings, kl, measured.nbytes)
            noisy.append(_seed(ev, space, noisy_table, budget)["kl"])
        if noisy:
            print(f"{'':<10}measured table x 10 % noise, {len(noisy)} draws: seed KL "
                  + ", ".join(f"{k:.4f}" for k in noisy) + f" ({min(noisy) / pair['measured']['kl']:.3f}-"
                  f"{max(noisy) / pair['measured']['kl']:.3f} of the measured table's)")
        for r in pair.values():
            del r["cols"]
        seeds.append({"budget_bpw": bpw, **pair, "noisy_measured_kl": noisy, "units_differ": differ, "ratio": ratio})
    if args.json:
        figures = {"args": {k: str(v) for k, v in vars(args).items()}, "pairs": pairs,
                   "measured_seconds": measured.seconds, "proxy_seconds": proxy_seconds, "proxy_cpu_seconds": proxy_cpu,
                   "forward_seconds": forward, "fisher_seconds": proxy.seconds_fisher,
                   "quantize_seconds": proxy.seconds_quantize, "hessian_seconds": seconds_hessians,
                   "spearman": spearman, "seeds": seeds}
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
