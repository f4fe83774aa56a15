"""``evo``: a budget-aware evolutionary sampler behind Optuna's ``BaseSampler``.

Generic samplers treat the byte budget as a constraint they learn about after the fact, so many
of their proposals are infeasible or waste bytes. Here a child is a parent's policy with bits
*moved* between matrices: one matrix is raised a step and another of similar size lowered a step,
so the bytes barely change; a repair step then brings any child back under the budget and tops
it up towards it. Parents are the best feasible trials (tournament), optionally crossed over.

Given the sensitivity table (:meth:`EvoSampler.guide`), the matrices a move or a repair raises and
lowers are drawn by rank of their predicted loss change (the KL of that unit alone at the new
setting), not uniformly: near a solved seed most random moves lower a sensitive unit and are
wasted. Under the table's additive model every such move looks slightly worse than the seed; what
the search measures is where the model is wrong. A fraction of choices stays uniform to keep the
population diverse.

Lifecycle (Optuna): ``infer_relative_search_space`` names every parameter of the space,
``sample_relative`` returns a whole child at once, ``sample_independent`` is only reached for a
parameter outside the space (it falls back to random).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from search.space import SearchSpace

__all__ = ["EvoSampler"]


class EvoSampler(optuna.samplers.BaseSampler):
    """Args:
        space: the search space (matrix shapes and allowed settings).
        budget_bytes: children are kept at or below it.
        seed: random seed.
        population: how many of the best feasible trials can be parents.
        tolerance: children are topped up until within this fraction below the budget (when they can be).
        crossover: probability of crossing two parents before mutating.
        explore: with a sensitivity table, the probability that a choice is uniform anyway.
    """

    def __init__(self, space: SearchSpace, budget_bytes: int, seed: int | None = None, population: int = 12,
                 tolerance: float = 0.03, crossover: float = 0.3, explore: float = 0.3):
        self.space = space
        self.budget = int(budget_bytes)
        self.population = population
        self.tolerance = tolerance
        self.crossover = crossover
        self.explore = explore
        self.loss: np.ndarray | None = None  # predicted KL per (unit, bits, group, format), from guide()
        self._rng = np.random.default_rng(seed)
        self._fallback = optuna.samplers.RandomSampler(seed=seed)
        self.names = space.unit_names  # a genome row per unit (a matrix, block or layer; then the KV cache's)
        self.n_weights = len(space.units)  # rows below it have group and format columns; KV rows are rungs
        # With ladders a unit's whole setting is its rung: the group and format columns stay 0.
        self.labels = space.group_labels[:1] if space.ladders else space.group_labels
        self.formats = list(space.formats)[:1] if space.ladders else list(space.formats)
        # The top bits index of each unit: with ladders (llama.cpp types) every unit has its own.
        self.top = np.array([space.levels(u) - 1 for u in self.names], dtype=np.int64)
        n_b = int(self.top.max()) + 1 if len(self.top) else len(space.bits)
        n_g, n_f = (1, 1) if space.ladders else (len(space.groups), len(space.formats))
        # cost[i, b, g, f]: exact bytes of unit i at that setting, so a child's size needs no policy
        # (rungs above a unit's own top cost more than any budget: never chosen).
        self.cost = np.full((len(self.names), n_b, n_g, n_f), np.iinfo(np.int64).max // 4, dtype=np.int64)
        for i, name in enumerate(self.names):
            for b, g, f in np.ndindex(int(self.top[i]) + 1, n_g, n_f):
                self.cost[i, b, g, f] = space.unit_nbytes(name, space.setting_at((b, g, f), name))
        numel = np.array([space.unit_size(u) for u in self.names], dtype=np.float64)
        # Partners for a move: units within a factor 2 in size, so one step up and one down cancel
        # (a layer's cached keys trade bits with weight units of their size, so cache and weights share).
        ratio = numel[:, None] / numel[None, :]
        self.partners = [np.flatnonzero((ratio[i] <= 2.0) & (ratio[i] >= 0.5) & (np.arange(len(numel)) != i))
                         for i in range(len(numel))]
        self._seen: set[bytes] = set()

    def guide(self, table: Any) -> None:
        """Draw moves by the predicted loss of a :class:`~search.sensitivity.SensitivityTable` measured
        over this space's units and settings."""
        loss = np.full(self.cost.shape, np.inf)
        for i, name in enumerate(self.names):
            for b, g, f in np.ndindex(int(self.top[i]) + 1, *loss.shape[2:]):
                loss[i, b, g, f] = table.kl[name][self.space.setting_at((b, g, f), name).key()]
        self.loss = loss

    # Optuna's interface --------------------------------------------------------------------------

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.space.distributions()

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space or "fixed_params" in trial.system_attrs:
            return {}  # an enqueued seed: its params are fixed already
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
            if self.space.covers(t.params):
                self._seen.add(self.space.indices(t.params).tobytes())
        parents = self._parents(trials)
        for _ in range(20):  # a few tries for a child not measured yet
            child = self._child(parents)
            if child.tobytes() not in self._seen:
                break
        self._seen.add(child.tobytes())
        return self.space.from_indices(child)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def reseed_rng(self) -> None:
        self._rng = np.random.default_rng()
        self._fallback.reseed_rng()

    # The evolution -------------------------------------------------------------------------------

    def nbytes(self, genome: np.ndarray) -> int:
        """Bytes of a genome: ``(n_matrices, 3)`` rows of (bits index, group index, format index)."""
        return int(self.cost[np.arange(len(self.names)), genome[:, 0], genome[:, 1], genome[:, 2]].sum())

    def _parents(self, trials: list[FrozenTrial]) -> list[np.ndarray]:
        feasible = [t for t in trials if t.values is not None and t.values[1] <= self.budget
                    and self.space.covers(t.params)]
        feasible.sort(key=lambda t: t.values[0])
        return [self.space.indices(t.params) for t in feasible[:self.population]]

    def _child(self, parents: list[np.ndarray]) -> np.ndarray:
        rng = self._rng
        if not parents:
            child = np.stack([rng.integers(0, self.top + 1),
                              rng.integers(0, len(self.labels), len(self.names)),
                              rng.integers(0, len(self.formats), len(self.names))], axis=1)
            child[self.n_weights:, 1:] = 0  # a KV unit's row is its rung alone
            return self.repair(child)
        # Binary tournament on rank (parents are sorted best first).
        pick = lambda: parents[min(rng.integers(0, len(parents), 2))]  # noqa: E731
        child = pick().copy()
        if len(parents) > 1 and rng.random() < self.crossover:
            other = pick()
            mask = rng.random(len(self.names)) < 0.5
            child[mask] = other[mask]
        for _ in range(int(rng.integers(1, 4))):
            self._move(child)
        if rng.random() < 0.2 and len(self.labels) > 1:
            i = int(rng.integers(self.n_weights))
            child[i, 1] = int(np.clip(child[i, 1] + rng.choice([-1, 1]), 0, len(self.labels) - 1))
        if rng.random() < 0.1 and len(self.formats) > 1:
            i = int(rng.integers(self.n_weights))
            child[i, 2] = int(rng.integers(len(self.formats)))
        return self.repair(child)

    def _pick(self, candidates: np.ndarray, score: Any) -> int:
        """One of ``candidates``: uniformly without a sensitivity table (or with probability
        ``explore``), else by rank of ``score(candidates)``, higher first (the best taken 30 % of the
        time, the next 21 %, ...): scale-free, so KLs of any magnitude work alike."""
        rng = self._rng
        if self.loss is None or rng.random() < self.explore:
            return int(rng.choice(candidates))
        order = candidates[np.argsort(-score(candidates), kind="stable")]
        return int(order[min(int(rng.geometric(0.3)) - 1, len(order) - 1)])

    def _loss_step(self, g: np.ndarray, rows: np.ndarray, step: int) -> np.ndarray:
        """Predicted loss change of moving each of ``rows`` ``step`` bit steps (sensitivity table)."""
        b, grp, f = g[rows, 0], g[rows, 1], g[rows, 2]
        return self.loss[rows, b + step, grp, f] - self.loss[rows, b, grp, f]

    def _bytes_down(self, g: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Bytes that one bit step down saves for each of ``rows`` (all above the lowest step)."""
        b, grp, f = g[rows, 0], g[rows, 1], g[rows, 2]
        return self.cost[rows, b, grp, f] - self.cost[rows, b - 1, grp, f]

    def _move(self, g: np.ndarray) -> None:
        """Raise one matrix a bit step and lower a similar-sized one a step (bytes roughly unchanged)."""
        up = np.flatnonzero(g[:, 0] < self.top)
        if not len(up):
            return
        i = self._pick(up, lambda r: -self._loss_step(g, r, +1))  # the largest predicted gain first
        partners = self.partners[i][g[self.partners[i], 0] > 0]
        g[i, 0] += 1
        if len(partners):
            g[self._pick(partners, lambda r: -self._loss_step(g, r, -1)), 0] -= 1  # the cheapest loss first

    def repair(self, g: np.ndarray) -> np.ndarray:
        """Lowers matrices until the genome fits the budget, then raises others while they fit and the
        genome is more than ``tolerance`` below it (random ones; with a sensitivity table, by rank of
        predicted loss per byte)."""
        rng = self._rng
        rows = np.arange(len(g))
        while self.nbytes(g) > self.budget:
            down = np.flatnonzero(g[:, 0] > 0)
            if len(down):
                # The smallest predicted loss per byte saved first.
                i = self._pick(down, lambda r: -self._loss_step(g, r, -1) / np.maximum(self._bytes_down(g, r), 1))
                g[i, 0] -= 1
                continue
            coarse = np.flatnonzero(self.cost[rows, 0, g[:, 1], g[:, 2]] > self.cost[rows, 0].min(axis=(1, 2)))
            if not len(coarse):
                break  # the smallest policy itself is over the budget: nothing fits
            i = int(rng.choice(coarse))
            grp, f = np.unravel_index(int(self.cost[i, 0].argmin()), self.cost[i, 0].shape)
            g[i, 1], g[i, 2] = grp, f
        floor = (1.0 - self.tolerance) * self.budget
        top = self.top
        used = self.nbytes(g)
        while used < floor:
            # One step up for a matrix whose next step still fits: spreads the spare bytes.
            step = np.where(g[:, 0] < top,
                            self.cost[rows, np.minimum(g[:, 0] + 1, top), g[:, 1], g[:, 2]]
                            - self.cost[rows, g[:, 0], g[:, 1], g[:, 2]], np.iinfo(np.int64).max)
            fits = np.flatnonzero(step <= self.budget - used)
            if not len(fits):
                break
            i = self._pick(fits, lambda r: -self._loss_step(g, r, +1) / np.maximum(step[r], 1))
            g[i, 0] += 1
            used += int(step[i])
        return g
