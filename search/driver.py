"""The search driver: Optuna ask-and-tell over Ray workers, every result written to the study store.

Only this module writes to a study. A crash loses nothing finished: each result is
stored before it is told to Optuna, and a restarted driver reconciles the two.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import optuna
import ray
from optuna.trial import TrialState
from tqdm.auto import tqdm

import quant
from evaluators import UserError, reference_logprobs
from evaluators.context import DataConfig
from search.budget import parse_budget
from search.fidelity import FirstBatchGate
from search.samplers import SAMPLERS, make_sampler
from search.space import DEFAULT_BITS, DEFAULT_GROUPS, SearchSpace, check_granularity
from search.workers import TrialWorker, init_ray
from studies import DEFAULT_STORAGE, Store, StoreError
from studies.retry import DB_ERRORS, SCHEMA_RACE_SECONDS, with_db_retry

__all__ = ["SearchConfig", "run_search", "FULL_PRECISION_BITS"]

log = logging.getLogger(__name__)
# Optuna wraps database failures in its own error; both mean "try again shortly".
_RETRY_ON = DB_ERRORS + (optuna.exceptions.StorageInternalError,)
_OVERHEAD_WARN = 0.2  # warn when proposing takes this share of the search's wall time
FULL_PRECISION_BITS = 16  # a bf16/fp16 checkpoint: budgets at or above it need no quantization


def _db(fn, what: str):
    return with_db_retry(fn, what, retry_on=_RETRY_ON)


def optuna_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage on ``url``. Searches starting together on a new database race to create
    Optuna's schema (the loser fails with "table studies already exists" or a duplicate schema
    version); a retry finds the schema made."""
    try:
        return with_db_retry(lambda: optuna.storages.RDBStorage(url), "opening the storage",
                             retry_on=_RETRY_ON, timeout=SCHEMA_RACE_SECONDS, first_wait=0.2)
    except Exception as exc:  # Optuna wraps driver errors in several types
        raise StoreError(f"cannot open storage {url}: {str(exc).splitlines()[0]}") from None


@dataclass
class SearchConfig:
    study: str
    data: DataConfig = field(default_factory=DataConfig)
    budget: str = "4.0bpw"
    trials: int = 20
    sampler: str = "nsga2"
    workers: int = 2
    storage: str = DEFAULT_STORAGE
    bits: tuple[int, ...] = DEFAULT_BITS
    groups: tuple[int | None, ...] = DEFAULT_GROUPS
    formats: tuple[str, ...] = ("rtn",)  # format labels, e.g. "gptq+clip" (see search.space.format_setting)
    granularity: str = "matrix"  # what shares one setting: matrix, block (attention / MLP) or layer
    ray_address: str | None = None
    max_retries: int = 2
    progress: bool = True
    memory_limit: int | None = None  # bytes the search may use; default: the machine's available memory
    # Measure (or reuse) the sensitivity table and enqueue solved seeds. Off by default: it costs one
    # forward per (matrix, setting), minutes on the tiny model and hours on a 135M one on 2 cores.
    sensitivity: bool = False
    sensitivity_seqs: int | None = None  # windows the sensitivity table is measured on (default: all)
    seed_budgets: int = 8  # budgets, from the smallest policy to the study's, at which seeds are solved
    # Score children on the first batch of windows first and stop the hopeless ones there
    # (search.fidelity). Default: on for evo, whose children all sit near the budget.
    multi_fidelity: bool | None = None
    fidelity_keep: int = 12  # a child must be among this many best first-batch KLs to be measured fully


@dataclass
class _Pending:
    trial: optuna.Trial
    policy: dict[str, Any]
    worker: int
    prune_above: float | None = None  # multi-fidelity bar for the first batch (None: measure fully)
    attempts: int = 1
    started: float = field(default_factory=time.perf_counter)


def _open_study(cfg: SearchConfig, store: Store, space: SearchSpace, budget_bytes: int,
                provenance: dict[str, Any]) -> tuple[optuna.Study, Any, bool]:
    existing = store.find_study(cfg.study)
    if existing is not None:
        mismatch = [k for k in ("model", "dataset", "seq_len", "n_eval", "n_calib", "seed")
                    if existing.provenance.get(k, provenance.get(k)) != provenance.get(k)]
        wanted = space.to_dict()  # a resumed study must propose from the same space
        mismatch += [k for k in ("bits", "groups", "formats", "granularity")
                     if existing.space.get(k, "matrix" if k == "granularity" else None) != wanted[k]]
        if mismatch or existing.budget_bytes != budget_bytes:
            what = ", ".join(mismatch) or "budget"
            raise UserError(f"study {cfg.study!r} already exists with a different {what}; "
                            "resume it with the same options or choose another --study name")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna_storage(cfg.storage)
    study = optuna.create_study(study_name=cfg.study, storage=storage, directions=["minimize", "minimize"],
                                sampler=make_sampler(cfg.sampler, cfg.data.seed, space.n_params, space=space,
                                                    budget_bytes=budget_bytes), load_if_exists=True)
    row = existing or store.create_study(
        name=cfg.study, model=cfg.data.model, dataset=cfg.data.dataset, budget_bytes=budget_bytes,
        numel=space.numel, sampler=cfg.sampler, space=space.to_dict(), provenance=provenance)
    return study, row, existing is None


def _enqueue_seeds(study: optuna.Study, space: SearchSpace, budget_bytes: int) -> int:
    """Uniform settings that fit the budget, best first, as the study's first trials."""
    seeds = [(space.nbytes(p), label, p) for label, p in space.uniform_policies()]
    seeds = sorted((s for s in seeds if s[0] <= budget_bytes), key=lambda s: -s[0])
    for _, label, policy in seeds:
        study.enqueue_trial(space.params(policy), user_attrs={"seed": f"uniform:{label}"})
    return len(seeds)


def _use_sensitivity(cfg: SearchConfig, study: optuna.Study, store: Store, loaded: Any, tokens: Any,
                     space: SearchSpace, budget_bytes: int, created: bool) -> Any:
    """Sensitivity table (measured in-process, or reused from the store); a new study gets DP / greedy
    seeds at several budgets ahead of the uniform ones, and evo (new or resumed) draws its moves by
    the table. Returns the reference it computed on the way."""
    from evaluators import Evaluator
    from search.evo import EvoSampler
    from search.seeds import enqueue_solved_seeds
    from search.sensitivity import measure_sensitivity

    evaluator = Evaluator(loaded, tokens)
    table = measure_sensitivity(evaluator, space.settings(), units=space.units, store=store,
                                model_fingerprint=loaded.fingerprint, data_fingerprint=tokens.fingerprint,
                                windows=cfg.sensitivity_seqs, progress=cfg.progress)
    log.info("sensitivity: %d pairs measured in %.1f s, %d reused", table.computed, table.seconds, table.reused)
    if created:
        seeds = enqueue_solved_seeds(study, table, space, budget_bytes, cfg.seed_budgets)
        log.info("enqueued %d solved seeds", len(seeds))
    if isinstance(study.sampler, EvoSampler):
        study.sampler.guide(table)
        log.info("evo draws its moves by the sensitivity table")
    return evaluator.reference


def _reconcile(study: optuna.Study, store: Store, row: Any) -> None:
    """After a crash: trials Optuna still sees running are told from the store if they
    finished, otherwise marked failed and proposed again."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        stored = store.trial(row, t.number)
        if stored is not None and stored.state == "complete":
            optuna.Trial(study, t._trial_id).set_constraint("bytes", float(stored.bytes - row.budget_bytes))
            study.tell(t.number, [stored.kl, float(stored.bytes)])
            continue
        if stored is not None and stored.state == "pruned":
            study.tell(t.number, state=TrialState.PRUNED)
            continue
        study.tell(t.number, state=TrialState.FAIL)
        store.record_trial(row, t.number, state="failed", policy={}, error="interrupted (driver stopped)")
        study.enqueue_trial(t.params, user_attrs={**t.user_attrs, "retry_of": t.number})


def run_search(cfg: SearchConfig) -> dict[str, Any]:
    """Runs (or resumes) a search until the study has ``cfg.trials`` complete trials.

    Returns a summary: trials run now, complete and failed in total, seconds.
    """
    if cfg.trials < 1 or cfg.workers < 1:
        raise UserError("--trials and --workers must be at least 1")
    check_granularity(cfg.granularity)  # both before minutes of loading
    if cfg.sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {cfg.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    SearchSpace({}, cfg.bits, cfg.groups, cfg.formats, granularity=cfg.granularity)  # bad options: refused now
    loaded, tokens = cfg.data.load()
    space = SearchSpace(quant.weight_matrices(loaded.model), cfg.bits, cfg.groups, cfg.formats,
                        granularity=cfg.granularity)
    budget_bytes = parse_budget(cfg.budget, space.numel)
    min_bytes = space.min_bytes()
    if budget_bytes < min_bytes:
        raise UserError(f"budget {cfg.budget} ({budget_bytes:,} bytes) is below the smallest allowed policy: "
                        f"{min_bytes:,} bytes = {8 * min_bytes / space.numel:.3f} bpw")
    store = Store(cfg.storage)  # only now: bad input above leaves the storage untouched
    full = space.numel * FULL_PRECISION_BITS // 8
    if budget_bytes >= full:
        log.warning("budget %s is at or above the %d-bit model size (%s bytes); searching anyway",
                    cfg.budget, FULL_PRECISION_BITS, f"{full:,}")
    provenance = {**cfg.data.to_dict(), "model_fingerprint": loaded.fingerprint,
                  "data_fingerprint": tokens.fingerprint, "budget": cfg.budget}
    study, row, created = _open_study(cfg, store, space, budget_bytes, provenance)
    gate = None
    if cfg.multi_fidelity or (cfg.multi_fidelity is None and cfg.sampler == "evo"):
        gate = FirstBatchGate(budget_bytes, keep=cfg.fidelity_keep)
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            gate.add(t.user_attrs.get("kl_low"), t.values[1])
    reference = None
    if cfg.sensitivity:
        reference = _use_sensitivity(cfg, study, store, loaded, tokens, space, budget_bytes, created)
    if created:
        _enqueue_seeds(study, space, budget_bytes)
    _reconcile(study, store, row)

    # Finished trials: measured fully, or stopped after the first batch by multi-fidelity selection.
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if done >= cfg.trials:
        return {"ran": 0, "complete": complete, "failed": 0, "pruned": done - complete, "seconds": 0.0,
                "sampler_seconds": 0.0}
    _check_memory(cfg, loaded.model, tokens)
    if reference is None:
        reference = reference_logprobs(loaded.model, tokens)
    del loaded  # the workers load their own copies
    init_ray(cfg.ray_address, cfg.workers)
    reference_ref = ray.put(reference)
    threads = max(1, int(ray.available_resources().get("CPU", cfg.workers)) // cfg.workers)
    data = cfg.data.to_dict()

    def start_worker() -> Any:
        return TrialWorker.options(num_cpus=1).remote(data, reference_ref, threads)

    workers = [start_worker() for _ in range(cfg.workers)]
    idle = list(range(cfg.workers))
    pending: dict[Any, _Pending] = {}
    failed = ran = pruned = 0
    ask_seconds = 0.0  # the sampler's own time, reported beside the trials'
    overhead_warned = False
    best = min((t.values[0] for t in study.best_trials), default=math.inf)
    t_start = time.perf_counter()
    bar = tqdm(total=cfg.trials, initial=done, desc=f"search {cfg.study}", disable=not cfg.progress,
               unit="trial", dynamic_ncols=True)
    try:
        while done + len(pending) < cfg.trials or pending:
            while idle and done + len(pending) < cfg.trials and failed <= cfg.trials:
                t_ask = time.perf_counter()
                trial = _db(study.ask, "asking for a trial")
                policy = _db(lambda: space.suggest(trial).to_dict(), "sampling a policy")
                ask_seconds += time.perf_counter() - t_ask
                seeded = "seed" in trial.user_attrs or "retry_of" in trial.user_attrs
                job = _Pending(trial, policy, idle.pop(), prune_above=None if gate is None or seeded
                               else gate.threshold())
                pending[workers[job.worker].evaluate.remote(policy, job.prune_above)] = job
            if not pending:
                break
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.ActorDiedError as exc:
                workers[job.worker] = start_worker()  # Ray does not replace dead actors
                if job.attempts <= cfg.max_retries:
                    job.attempts += 1
                    pending[workers[job.worker].evaluate.remote(job.policy, job.prune_above)] = job
                    continue
                _fail(study, store, row, job, f"worker died {job.attempts} times: {str(exc).splitlines()[0]}")
                failed += 1
                idle.append(job.worker)
                continue
            except ray.exceptions.RayTaskError as exc:
                _fail(study, store, row, job, f"{type(exc.cause).__name__}: {exc.cause}")
                failed += 1
                idle.append(job.worker)
                continue
            idle.append(job.worker)
            done += 1
            bar.update(1)
            if result["pruned"]:
                _prune(study, store, row, job, result)
                pruned += 1
                continue
            _record(study, store, row, job, result)
            if gate is not None:
                gate.add(result["kl_low"], result["bytes"])
            complete += 1
            ran += 1
            if result["bytes"] <= row.budget_bytes:
                best = min(best, result["kl"])
            share = ask_seconds / max(time.perf_counter() - t_start, 1e-9)
            if share > _OVERHEAD_WARN and ran >= 5 and not overhead_warned:
                overhead_warned = True
                log.warning("the %s sampler takes %.0f%% of the search's time (%.2f s per proposal); "
                            "a coarser --granularity or another --sampler would cut it",
                            cfg.sampler, 100 * share, ask_seconds / (ran + pruned + failed))
            bar.set_postfix_str(f"best KL {best:.4f} | last {result['bpw']:.2f} bpw "
                                f"KL {result['kl']:.4f} | {result['seconds_forward'] + result['seconds_quantize']:.1f}s"
                                f" | sampler {100 * share:.0f}%" + (f" | pruned {pruned}" if pruned else "")
                                + (f" | failed {failed}" if failed else ""))
    finally:
        bar.close()
        for w in workers:
            ray.kill(w)
    return {"ran": ran, "complete": complete, "failed": failed, "pruned": pruned,
            "seconds": time.perf_counter() - t_start, "sampler_seconds": ask_seconds}


def _check_memory(cfg: SearchConfig, model: Any, tokens: Any) -> None:
    """Refuses up front a search whose workers cannot fit in memory, saying the estimate.

    Per worker: the float model, a float copy of its matrices, their decoded weights
    (cached for speed) and a batch of logits; once: the driver's model and the reference.
    """
    import psutil

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    vocab = int(model.config.vocab_size)
    reference = tokens.eval.shape[0] * (tokens.seq_len - 1) * vocab * 4
    batch_logits = 2 * tokens.seq_len * vocab * 4 * 3  # logits, log-probs, reference slice
    estimate = cfg.workers * (3 * params + batch_logits) + params + 2 * reference
    limit = cfg.memory_limit or psutil.virtual_memory().available
    if estimate > limit:
        raise UserError(f"this search needs about {estimate / 2**30:.2f} GiB ({cfg.workers} workers x "
                        f"{3 * params / 2**30:.2f} GiB model copies + {2 * reference / 2**30:.2f} GiB reference) "
                        f"but {limit / 2**30:.2f} GiB is available; use fewer --workers or --eval-seqs")


def _timings(job: _Pending, result: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"seconds": time.perf_counter() - job.started, "quantize": result["seconds_quantize"],
            "forward": result["seconds_forward"], "attempts": job.attempts, "kl_low": result["kl_low"], **extra}


def _record(study: optuna.Study, store: Store, row: Any, job: _Pending, result: dict[str, Any]) -> None:
    timings = _timings(job, result)
    _db(lambda: store.record_trial(row, job.trial.number, state="complete", policy=job.policy,
                                   bytes=result["bytes"], bpw=result["bpw"], kl=result["kl"], ppl=result["ppl"],
                                   top1=result["top1"], logit_err=result["logit_err"],
                                   seed=job.trial.user_attrs.get("seed"), timings=timings,
                                   worker=result.get("worker")), f"recording trial {job.trial.number}")
    _db(lambda: job.trial.set_constraint("bytes", float(result["bytes"] - row.budget_bytes)), "telling Optuna")
    _db(lambda: job.trial.set_user_attr("kl_low", result["kl_low"]), "telling Optuna")
    _db(lambda: study.tell(job.trial, [result["kl"], float(result["bytes"])]), "telling Optuna")


def _prune(study: optuna.Study, store: Store, row: Any, job: _Pending, result: dict[str, Any]) -> None:
    """A child stopped after the first batch: kept as a PRUNED trial with what was measured."""
    timings = _timings(job, result, windows=result["windows"], prune_above=job.prune_above)
    _db(lambda: store.record_trial(row, job.trial.number, state="pruned", policy=job.policy,
                                   bytes=result["bytes"], bpw=result["bpw"], timings=timings,
                                   seed=job.trial.user_attrs.get("seed"), worker=result.get("worker")),
        f"recording trial {job.trial.number}")
    _db(lambda: job.trial.set_user_attr("kl_low", result["kl_low"]), "telling Optuna")
    _db(lambda: study.tell(job.trial, state=TrialState.PRUNED), "telling Optuna")


def _fail(study: optuna.Study, store: Store, row: Any, job: _Pending, reason: str) -> None:
    log.warning("trial %d failed: %s", job.trial.number, reason)
    _db(lambda: store.record_trial(row, job.trial.number, state="failed", policy=job.policy, error=reason,
                                   seed=job.trial.user_attrs.get("seed")), f"recording trial {job.trial.number}")
    _db(lambda: study.tell(job.trial, state=TrialState.FAIL), "telling Optuna")
