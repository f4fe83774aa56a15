"""Allocations solved from the sensitivity table, enqueued as a study's first trials.

Assuming the KL of a policy is the sum of the single-matrix KLs (HIGGS's linearity result),
choosing a setting per matrix under a byte budget is a multiple-choice knapsack. It is solved
exactly by dynamic programming over bytes counted in coarse units (costs rounded *up*, so a
solution that fits in units fits in bytes), and approximately by a greedy loss-per-byte ascent.
One study gets solutions at several budgets, so its first trials already span the front.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import optuna

import quant
from search.sensitivity import SensitivityTable
from search.space import SearchSpace

__all__ = ["solve_dp", "solve_greedy", "solved_policies", "enqueue_solved_seeds", "enqueue_uniform_seeds"]

_MAX_UNITS = 1 << 15  # DP cells; rounding each cost up loses at most one cell per unit (211 units: 0.6 %)


def solve_dp(kl: np.ndarray, nbytes: np.ndarray, budget: int, unit: int | None = None) -> np.ndarray | None:
    """Exact minimum of ``sum kl[i, c_i]`` subject to ``sum ceil(nbytes[i, c_i] / unit) <= budget // unit``.

    Args:
        kl, nbytes: ``(n_items, n_choices)`` losses and costs.
        budget: bytes allowed.
        unit: bytes per DP cell; default: the smallest unit giving at most ``_MAX_UNITS`` cells.
            With ``unit=1`` the answer is the exact optimum.

    Returns:
        The chosen column per row, or ``None`` if even the cheapest choices do not fit.
    """
    n, m = kl.shape
    if unit is None:
        unit = max(1, math.ceil(budget / _MAX_UNITS))
    cap = budget // unit
    cost = -(-nbytes // unit)  # ceil: rounding up keeps every DP-feasible answer feasible in bytes
    if cost.min(axis=1).sum() > cap:
        return None
    best = np.zeros(cap + 1)  # best[c]: least loss of the rows so far using at most c units
    choice = np.zeros((n, cap + 1), dtype=np.int32)
    for i in range(n):
        new = np.full(cap + 1, np.inf)
        for j in range(m):
            c = int(cost[i, j])
            if c > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[c:] = best[:cap + 1 - c] + kl[i, j]
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = j
        best = new
    # "At most c units" is monotone, so the full capacity holds the optimum; walk back from it.
    out = np.zeros(n, dtype=np.int64)
    c = cap
    for i in range(n - 1, -1, -1):
        j = int(choice[i, c])
        out[i] = j
        c -= int(cost[i, j])
    return out


def solve_greedy(kl: np.ndarray, nbytes: np.ndarray, budget: int) -> np.ndarray | None:
    """Start every row at its cheapest choice, then repeatedly take the upgrade with the largest
    KL decrease per extra byte that still fits. Fast and close to the DP, never better."""
    n = kl.shape[0]
    rows = np.arange(n)
    cur = np.array([min(range(kl.shape[1]), key=lambda j: (nbytes[i, j], kl[i, j])) for i in range(n)])
    used = int(nbytes[rows, cur].sum())
    if used > budget:
        return None
    while True:
        gain = kl[rows, cur][:, None] - kl  # KL removed by switching row i to choice j
        extra = nbytes - nbytes[rows, cur][:, None]
        ok = (gain > 0) & (extra <= budget - used)
        if not ok.any():
            return cur
        # A free or cheaper improvement is always taken first (infinite ratio).
        ratio = np.where(ok, gain / np.maximum(extra, 0).clip(min=1e-9), -np.inf)
        i, j = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        used += int(extra[i, j])
        cur[i] = j


def solved_policies(table: SensitivityTable, space: SearchSpace, budget_bytes: int, n_budgets: int = 8,
                    methods: tuple[str, ...] = ("dp", "greedy"),
                    extra_budgets: tuple[int, ...] = ()) -> list[tuple[str, quant.Policy, int]]:
    """(label, policy, predicted bytes) at ``n_budgets`` budgets evenly from the smallest policy to
    ``budget_bytes``, distinct policies only, largest budget first."""
    names, kl, nb = table.arrays()
    settings = table.settings
    lo = int(nb.min(axis=1).sum())
    budgets = [int(b) for b in np.linspace(lo, budget_bytes, n_budgets)] if n_budgets > 1 else [budget_bytes]
    # Budgets a user asked for (e.g. the sizes of files to compare with) join the even ones.
    budgets = sorted({*budgets, *(int(b) for b in extra_budgets if lo <= b <= budget_bytes)}, reverse=True)
    seen: set[tuple[int, ...]] = set()
    out: list[tuple[str, quant.Policy, int]] = []
    for b in budgets:
        for method in methods:
            cols = solve_dp(kl, nb, b) if method == "dp" else solve_greedy(kl, nb, b)
            if cols is None or tuple(cols) in seen:
                continue
            seen.add(tuple(cols))
            policy = space.expand({n: settings[j] for n, j in zip(names, cols)})
            size = f"{8.0 * b / space.numel:.2f}bpw" if space.kv is None else f"{b / 1e6:.2f}MB"  # + the cache
            out.append((f"{method}:{size}", policy,
                        int(nb[np.arange(len(names)), cols].sum())))
    return out


def enqueue_solved_seeds(study: optuna.Study, table: SensitivityTable, space: SearchSpace, budget_bytes: int,
                         n_budgets: int = 8, extra_budgets: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    """Enqueues the solved allocations (user attr ``seed`` = e.g. ``dp:3.00bpw``); returns what it enqueued."""
    done = []
    for label, policy, predicted in solved_policies(table, space, budget_bytes, n_budgets,
                                                    extra_budgets=extra_budgets):
        study.enqueue_trial(space.params(policy), user_attrs={"seed": label})
        done.append({"seed": label, "bytes": predicted})
    return done


def enqueue_uniform_seeds(study: optuna.Study, space: SearchSpace, budget_bytes: int) -> int:
    """Uniform settings that fit the budget, largest first, as the study's first trials (user attr
    ``seed`` = ``uniform:<setting>``); returns how many. With KV units, each uniform weight setting
    once, with the largest uniform cache setting that fits beside it."""
    seeds = [(space.nbytes(p), label, p) for label, p in space.uniform_policies()]
    seeds = sorted((s for s in seeds if s[0] <= budget_bytes), key=lambda s: -s[0])
    weights_seen: set[str] = set()
    for _, label, policy in seeds:
        weights = label.split("+kv-")[0]
        if weights in weights_seen:
            continue
        weights_seen.add(weights)
        study.enqueue_trial(space.params(policy), user_attrs={"seed": f"uniform:{label}"})
    return len(weights_seen)
