"""The search driver: Optuna ask-and-tell over Ray workers, every result written to the study store.

Only this module (through :mod:`search.record`) writes to a study. :func:`run_search` goes
through four steps: open the study, new or resumed (:mod:`search.resume`); enqueue seeds
(:mod:`search.seeds`, the sensitivity table when asked); dispatch trials to workers
(:mod:`search.dispatch`); and show progress (:mod:`search.progress`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from evaluators import UserError, reference_logprobs, reference_nbytes
from evaluators.device_map import block_bytes
from evaluators.reference import TAIL_SAMPLES, resolve_topk
from quant.kv import kv_from_dict
from search.budget import parse_budget
from search.dispatch import Dispatcher
from search.placement import CPU_BATCH, PACKED_CACHE_BYTES, WORKER_PROCESS_BYTES, WorkerSize, fit_in_host, resolve_device
from search.fidelity import FirstBatchGate
from search.memory import DRIVER_PROCESS_BYTES, DriverPlan, Phases
from search.progress import Progress
from search.record import RETRY_ON, Failed, Job, Task, reconcile, record_failure, record_result
from search.request import SearchRequest
from search.resume import open_study, optuna_storage
from search.seeds import enqueue_uniform_seeds
from search.sensitivity import proxy_on_model
from search.space import SearchSpace
from studies import DEFAULT_STORAGE, Store
from studies.locks import study_lock
from studies.retry import with_db_retry

__all__ = ["SearchConfig", "run_search", "optuna_storage", "FULL_PRECISION_BITS"]

log = logging.getLogger(__name__)
FULL_PRECISION_BITS = 16  # a bf16/fp16 checkpoint: budgets at or above it need no quantization


@dataclass
class SearchConfig:
    """A search request (validated when it was built) and how this process runs it."""

    request: SearchRequest
    storage: str = DEFAULT_STORAGE
    ray_address: str | None = None
    progress: bool = True
    max_retries: int = 2  # a trial whose worker dies is run again on a new one this many times
    seed_budgets: int = 8  # budgets, from the smallest policy to the study's, at which seeds are solved
    extra_seed_budgets: tuple[int, ...] = ()  # bytes at which seeds are solved as well
    # A budget below the study's at which this run solves its seeds and samples its children (the
    # study's own budget is unchanged): how ``export --budget`` fills a budget the study has no point at.
    target_bytes: int | None = None
    fidelity_keep: int = 12  # a child must be among this many best first-batch KLs to be measured fully
    # Where the float model's own passes run (the reference's forwards, the sensitivity proxy's backwards):
    # None = on a worker unless the workers run on the CPU here (on GPUs: the driver needs none, and a CPU
    # would take hours on a large model).
    on_workers: bool | None = None
    # Set (by the service's cancel route) to stop: no trial is asked for after it; those out finish and
    # are recorded, so a cancelled study resumes with every finished trial.
    stop: threading.Event | None = None

    @property
    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()


def _proxy_on_worker(cfg: SearchConfig, store: Store, workers: Dispatcher, fingerprints: tuple[str, str],
                     space: SearchSpace) -> Any:
    """The proxy's table, read from the store or predicted by one worker on its device."""
    from search.sensitivity import proxy_table

    def predict(kinds: list[str]) -> dict[str, Any]:
        workers.submit(Task(workers.idle.pop(), "proxy", (cfg.request.model_dump(), kinds)))
        _, out = workers.next()
        if isinstance(out, Failed):
            raise RuntimeError(f"sensitivity proxy: the worker failed: {out}")
        return out

    table = proxy_table(None, space, store=store, model_fingerprint=fingerprints[0],
                        data_fingerprint=fingerprints[1], predict=predict)
    log.info("sensitivity proxy on a worker: %d pairs predicted in %.1f s, %d reused", table.computed,
             table.seconds, table.reused)
    return table


def _measured(cfg: SearchConfig, store: Store, workers: Dispatcher, n_eval: int, fingerprints: tuple[str, str],
              space: SearchSpace) -> Any:
    """The measured table: the pairs the store lacks, spread over the workers and stored as they finish."""
    from search.sensitivity import measure_on_workers

    table = measure_on_workers(workers, space, n_eval, store=store,
                               model_fingerprint=fingerprints[0], data_fingerprint=fingerprints[1],
                               windows=cfg.request.sensitivity_seqs, progress=cfg.progress)
    log.info("sensitivity: %d pairs measured in %.1f s, %d reused", table.computed, table.seconds, table.reused)
    return table


def _seed(cfg: SearchConfig, study: optuna.Study, table: Any, space: SearchSpace, budget_bytes: int,
          created: bool) -> None:
    """A new study gets DP / greedy seeds at several budgets ahead of the uniform ones (a run with a target
    budget, at that budget), and evo (new or resumed) draws its moves by the table."""
    from search.evo import EvoSampler
    from search.seeds import enqueue_solved_seeds

    if cfg.target_bytes is not None:
        seeds = enqueue_solved_seeds(study, table, space, cfg.target_bytes, 1)
        log.info("enqueued %d solved seeds at the target budget", len(seeds))
    elif created:
        seeds = enqueue_solved_seeds(study, table, space, budget_bytes, cfg.seed_budgets, cfg.extra_seed_budgets)
        log.info("enqueued %d solved seeds", len(seeds))
    if isinstance(study.sampler, EvoSampler):
        study.sampler.guide(table)
        log.info("evo draws its moves by the sensitivity table")


def _budget(text: str, space: SearchSpace) -> int:
    budget_bytes = parse_budget(text, space.numel)
    min_bytes = space.min_bytes()
    if budget_bytes < min_bytes:
        size = (f"{8 * min_bytes / space.numel:.3f} bpw" if space.kv is None else
                f"{min_bytes / 1e6:.2f} MB with the cache of {space.kv.context} tokens x {space.kv.batch}")
        raise UserError(f"budget {text} ({budget_bytes:,} bytes) is below the smallest allowed policy: "
                        f"{min_bytes:,} bytes = {size}")
    full = space.numel * FULL_PRECISION_BITS // 8 + (space.kv.float_bytes() if space.kv else 0)
    if budget_bytes >= full:
        log.warning("budget %s is at or above the %d-bit model size (%s bytes); searching anyway",
                    text, FULL_PRECISION_BITS, f"{full:,}")
    return budget_bytes


def run_search(cfg: SearchConfig) -> dict[str, Any]:
    """Runs (or resumes) a search until the study has ``request.trials`` finished trials.

    Each phase (load, reference, sensitivity proxy, workers start, seeds, trials) is logged as it starts
    with the driver's estimated peak, and refused before it starts when that does not fit
    (:class:`search.memory.Phases`).

    Returns a summary: trials run now, complete (in total), failed and pruned now, seconds.
    """
    phases = Phases(cfg.request.memory_limit_bytes)
    try:
        return _run_search(cfg, phases)
    finally:
        phases.end()


def _run_search(cfg: SearchConfig, phases: Phases) -> dict[str, Any]:
    request = cfg.request
    device = _device(request, cfg.ray_address)
    data = request.data_config(device)  # --dtype auto is resolved for the workers' device
    phases.start("load", _load_estimate(request.model, data.dtype),
                 f"loading {request.model} in {data.dtype} (the float reference)",
                 "load it in half precision (--dtype bfloat16) or free memory")
    loaded, tokens = data.load()
    phases.end()
    space = request.space_of(loaded.model)
    budget_bytes = _budget(request.budget, space)
    if request.context is not None and request.context > request.seq_len:
        log.warning("the cache is counted at %d tokens but scored on windows of %d (--seq-len): the KL says what "
                    "a cache of %d tokens costs, which grows with the tokens read", request.context, request.seq_len,
                    request.seq_len)
    if cfg.target_bytes is not None:
        _budget(str(cfg.target_bytes), space)
    topk = resolve_topk(request.reference_topk, len(tokens.eval), tokens.seq_len - 1,
                        int(loaded.model.config.vocab_size))
    size, host_workers = _check_memory(request, loaded.model, tokens, device, topk, local=_local(cfg.ray_address))
    plan = DriverPlan.of(loaded.model, tokens, space, topk, phases,
                         proxied=request.sensitivity and request.sensitivity_method != "measured")
    if cfg.stopped:
        return Progress.nothing_to_do(0, 0)
    store = Store(cfg.storage)  # only now: bad input above leaves the storage untouched
    # One driver per study: a second would count its trials apart and fail the first one's running trials.
    with study_lock(cfg.storage, request.study_name):
        provenance = {**data.to_dict(), "model_fingerprint": loaded.fingerprint,
                      "data_fingerprint": tokens.fingerprint, "budget": request.budget, "reference_topk": topk,
                      "reference_tail": TAIL_SAMPLES if topk else 0, "sensitivity": request.sensitivity,
                      "sensitivity_method": request.sensitivity_method, "sensitivity_seqs": request.sensitivity_seqs}
        target = budget_bytes if cfg.target_bytes is None else min(cfg.target_bytes, budget_bytes)
        study, row, created = open_study(request, cfg.storage, store, space, budget_bytes, provenance,
                                         sampler_budget=target)
        gate = None
        if request.uses_multi_fidelity:
            gate = FirstBatchGate(target, keep=cfg.fidelity_keep)
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                gate.add(t.user_attrs.get("kl_low"), t.values[1])
        reconcile(study, store, row)
        # Finished trials: measured fully, or stopped after the first batch by multi-fidelity selection.
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        if done >= request.trials and not created:
            return Progress.nothing_to_do(done, complete)  # before minutes of sensitivity it would not use
        table = reference = None
        measured = request.sensitivity and request.sensitivity_method == "measured"
        proxied = request.sensitivity and not measured
        # "auto" here is a cluster's device, resolved by the dispatcher: a worker there is as near as the driver.
        on_workers = cfg.on_workers if cfg.on_workers is not None else device != "cpu"
        if not on_workers:  # else the first worker computes it (see Dispatcher)
            phases.start("reference", plan.reference, f"log-probs of the unquantized model, in {data.dtype}, on "
                         f"{len(tokens.eval)} evaluation windows ({'top-%d' % topk if topk else 'full'}): every "
                         "trial's KL is to it, whatever the trial quantizes", plan.hint)
            reference = reference_logprobs(loaded.model, tokens, topk=topk)
        if proxied and not on_workers:
            phases.start("sensitivity proxy", plan.proxy, plan.proxy_what, plan.hint)
            table = proxy_on_model(store, loaded, tokens, space, plan.hessian_bytes)
        phases.end()
        fingerprints = (loaded.fingerprint, tokens.fingerprint)
        _free(loaded)  # the workers load their own copies
        del loaded
        phases.start("workers start", plan.workers_driver, f"{plan.worker_what}; the driver's model freed",
                     plan.hint)
        workers = Dispatcher(data.to_dict(), reference, request.workers, ray_address=cfg.ray_address,
                             max_retries=cfg.max_retries, device=device, size=size, host_workers=host_workers,
                             max_workers=None if measured else max(request.trials - done, 1), split=request.split_model,
                             reference_topk=topk)
        progress = None
        try:
            if measured:  # one forward per pair, on every worker
                phases.start("sensitivity (measured)", plan.workers_driver, "one forward per (unit, setting) on the "
                             "workers")
                table = _measured(cfg, store, workers, len(tokens.eval), fingerprints, space)
            elif proxied and on_workers:
                phases.start("sensitivity proxy", plan.workers_driver, "on a worker's device", plan.hint)
                table = _proxy_on_worker(cfg, store, workers, fingerprints, space)
            if cfg.stopped:
                return Progress.nothing_to_do(done, complete)
            phases.start("seeds", plan.workers_driver, "DP / greedy allocations from the sensitivity table and "
                         "uniform settings, enqueued" if table is not None else "uniform settings, enqueued")
            if table is not None:
                _seed(cfg, study, table, space, budget_bytes, created)
            if created:
                enqueue_uniform_seeds(study, space, budget_bytes)
            phases.start("trials", plan.workers_driver, f"{request.trials - done} trial(s) on the workers "
                         f"({plan.worker_what})")
            best = min((t.values[0] for t in study.best_trials), default=math.inf)
            progress = Progress(request.trials, done, complete, best, name=request.study_name, sampler=request.sampler,
                                budget_bytes=target, show=cfg.progress)
            _trials(study, store, row, space, gate, workers, progress, cfg.stop)
        finally:
            if progress is not None:
                progress.close()
            workers.close()
        return progress.summary()


def _trials(study: optuna.Study, store: Store, row: Any, space: SearchSpace, gate: FirstBatchGate | None,
            workers: Dispatcher, progress: Progress, stop: threading.Event | None = None) -> None:
    """Asks Optuna for trials while a worker is idle, the target is not reached and ``stop`` is not set;
    records each result (those out when ``stop`` is set too)."""
    target = progress.target
    stopped = stop.is_set if stop is not None else lambda: False
    while (progress.done + workers.busy < target and not stopped()) or workers.busy:
        while (workers.idle and progress.done + workers.busy < target and progress.failed <= target
               and not stopped()):
            t_ask = time.perf_counter()
            trial = with_db_retry(study.ask, "asking for a trial", retry_on=RETRY_ON)
            policy = with_db_retry(lambda: space.suggest(trial).to_dict(), "sampling a policy", retry_on=RETRY_ON)
            progress.asked(time.perf_counter() - t_ask)
            seeded = "seed" in trial.user_attrs or "retry_of" in trial.user_attrs  # seeds are never pruned
            workers.submit(Job(trial, policy, workers.idle.pop(),
                               prune_above=None if gate is None or seeded else gate.threshold()))
        if not workers.busy:
            break
        job, outcome = workers.next()
        if isinstance(outcome, Failed):
            record_failure(study, store, row, job, outcome)
            progress.failed_one()
            continue
        if space.kv is not None:  # the budget's bytes: the packed weights' and the cache's at the context
            kv_bytes = space.kv.nbytes(kv_from_dict(job.policy.get("kv", {})))
            outcome = dataclasses.replace(outcome, bytes=outcome.bytes + kv_bytes, kv_bytes=kv_bytes)
        record_result(study, store, row, job, outcome)
        if gate is not None and not outcome.pruned:
            gate.add(outcome.kl_low, outcome.bytes)
        progress.finished(outcome)


def _local(ray_address: str | None) -> bool:
    """Whether the workers run on a local Ray (this machine), not on a cluster."""
    return not (ray_address or os.environ.get("RAY_ADDRESS"))


def _device(request: SearchRequest, ray_address: str | None) -> str:
    """The workers' device, refused up front (before loading) when ``cuda`` or ``--split-model`` is asked for
    with no GPU, or more ``--workers`` than this machine has cores: checked here for a local Ray, whose
    GPUs and cores are this machine's; a cluster's by the dispatcher."""
    if not _local(ray_address):
        return request.device
    import torch

    cores = os.cpu_count() or 1
    if request.workers is not None and request.workers > cores:
        raise UserError(f"--workers {request.workers}: this machine has {cores} cores, and each worker takes one; "
                        f"use --workers {cores} or fewer (or join a larger Ray cluster with --ray-address)")
    return resolve_device(request.device, torch.cuda.device_count(), request.split_model)


# The float32 folders the embedded aliases are converted to (evaluators.models).
_ALIAS_FLOAT_BYTES = {"smollm2-135m": 538_000_000, "qwen2.5-coder-1.5b": 7_108_000_000}


def _load_estimate(name: str, dtype: str) -> int:
    """The driver once ``name`` is loaded in ``dtype``: its files' parameters at that dtype (a local folder
    or a converted alias; 0 when they are not on disk yet) beside the process."""
    import json
    from pathlib import Path

    from evaluators import cache_dir

    folder = Path(name) if Path(name).is_dir() else cache_dir() / "models" / name
    files = list(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:  # an alias's first use converts its GGUF: two float32 copies at once
        return DRIVER_PROCESS_BYTES + 2 * _ALIAS_FLOAT_BYTES.get(name, 0)
    try:
        config = json.loads((folder / "config.json").read_text())
        saved = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    except (OSError, ValueError):
        saved = "float32"
    saved_bytes = 2 if saved in ("bfloat16", "float16") else 4
    elem = 2 if dtype in ("bfloat16", "float16") else 4
    return DRIVER_PROCESS_BYTES + sum(f.stat().st_size for f in files) * elem // saved_bytes


def _free(loaded: Any) -> None:
    """Drops the driver's model before the workers load theirs, and says so if something still holds it."""
    import gc
    import weakref

    ref = weakref.ref(loaded.model)
    loaded.model = None
    gc.collect()
    if ref() is not None:
        log.warning("the driver's model is still referenced after the proxy: its memory is not freed")


def _check_memory(request: SearchRequest, model: Any, tokens: Any, device: str,
                  topk: int | None, local: bool = True) -> tuple[WorkerSize, int]:
    """Refuses up front a search whose workers (with ``--workers`` unset: one) cannot fit in host memory,
    saying the estimate; returns what one worker holds (for its GPU share and batch) and how many
    workers host memory holds (the automatic count's bound, see :func:`search.placement.plan_workers`).

    Per worker: a Ray worker process (:data:`~search.placement.WORKER_PROCESS_BYTES`), a float copy of the
    model's matrices, their decoded weights (cached for speed; the loaded parameters they replace are
    freed), the packed-matrix cache (:data:`~search.placement.PACKED_CACHE_BYTES` at most) and a batch
    of logits, in host memory on the CPU; on a GPU only the model passes through host memory. gptq's
    Hessians beyond a quarter of the free memory go to files (:meth:`evaluators.Evaluator.calibrate`). Once: the driver (its model is freed before the workers start) and the
    reference (the driver's, and the object store's copy that the workers share).
    """
    import psutil

    from search.memory import rss as _rss

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    vocab = int(model.config.vocab_size)
    reference = reference_nbytes(tokens.eval.shape[0], tokens.seq_len - 1, vocab, topk)
    window_logits = tokens.seq_len * vocab * 4 * 3  # logits, log-probs, reference slice
    size = WorkerSize(params, reference, CPU_BATCH * window_logits, window_logits, int(tokens.eval.shape[0]),
                      block_bytes(model))
    # On the CPU a worker keeps a float copy of the matrices and their decoded weights (the model's own
    # parameters are replaced as the first policy quantizes them) and its packed-matrix cache.
    per_worker = WORKER_PROCESS_BYTES + (params if device == "cuda" else
                                         2 * params + min(params, PACKED_CACHE_BYTES) + size.batch_bytes)
    if request.memory_limit_bytes:
        limit, driver = request.memory_limit_bytes, DRIVER_PROCESS_BYTES
    else:  # what is free now and what the driver gives back (its model) when the workers start
        rss = _rss()
        limit, driver = psutil.virtual_memory().available + rss, max(DRIVER_PROCESS_BYTES, rss - params)
    fit = fit_in_host(request.workers, per_worker, driver + 2 * reference, limit,
                      "" if topk else ", or --reference-topk 512")
    # A local Ray's workers are this machine's processes: never more than its cores (each takes one).
    return size, min(fit, os.cpu_count() or 1) if local else fit
