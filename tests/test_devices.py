"""Worker placement (pure functions, so tested without a GPU) and ``--device`` at the boundary."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evaluators import UserError
from search.placement import (CPU_BATCH, GPU_HEADROOM, WORKERS_PER_GPU, WorkerSize, actor_options, fit_in_host,
                              plan_workers, resolve_device)
from search.request import SearchRequest

GIB = 2 ** 30
# SmolLM2-135M in float32 with a top-512 reference: 0.5 GiB of parameters, 8 MB of reference.
SMOLLM2 = WorkerSize(param_bytes=538_000_000, reference_bytes=8_364_000, batch_bytes=301_989_888)


@pytest.mark.parametrize(("requested", "gpus", "expected"), [
    ("auto", 0, "cpu"), ("auto", 2, "cuda"), ("cpu", 4, "cpu"), ("cuda", 1, "cuda")])
def test_device_resolves_against_the_gpus_seen(requested: str, gpus: int, expected: str) -> None:
    assert resolve_device(requested, gpus) == expected


def test_cuda_without_a_gpu_is_refused_saying_what_to_do() -> None:
    with pytest.raises(UserError, match=r"--device cuda: no CUDA GPU.*use --device cpu"):
        resolve_device("cuda", 0)


def test_cpu_workers_ask_for_one_cpu_and_no_gpu() -> None:
    assert actor_options("cpu", 8, SMOLLM2) == {"num_cpus": 1}


@pytest.mark.parametrize(("workers", "gpus", "share"), [(1, 1, 1.0), (2, 2, 1.0), (4, 2, 0.5), (3, 1, 0.3333),
                                                       (8, 1, 0.125)])
def test_gpu_workers_share_gpus_evenly(workers: int, gpus: int, share: float) -> None:
    options = actor_options("cuda", workers, SMOLLM2, gpu_memory=141 * GIB, n_gpus=gpus)
    assert options == {"num_cpus": 1, "num_gpus": share}
    per_gpu = -(-workers // gpus)
    assert per_gpu * options["num_gpus"] <= 1.0  # Ray can place them all at once


def test_how_many_fit_on_a_gpu_follows_the_measured_size() -> None:
    size = WorkerSize(param_bytes=4 * GIB, reference_bytes=GIB, batch_bytes=GIB)  # 14 GiB a worker
    fit = int(40 * GIB * GPU_HEADROOM) // size.device_bytes  # an A100-40GB: 2 of them
    assert size.device_bytes == 14 * GIB and fit == 2
    assert actor_options("cuda", 2, size, gpu_memory=40 * GIB, n_gpus=1)["num_gpus"] == 0.5
    with pytest.raises(UserError, match=r"3 workers do not fit on 1 GPU\(s\): 2 fit on one.*--workers 2"):
        actor_options("cuda", 3, size, gpu_memory=40 * GIB, n_gpus=1)


def test_a_model_larger_than_one_gpu_is_refused_with_the_estimate() -> None:
    size = WorkerSize(param_bytes=28 * GIB, reference_bytes=8 * GIB, batch_bytes=GIB)  # a 7B model, full reference
    with pytest.raises(UserError, match=r"needs about 93\.00 GiB.*80\.00 GiB.*--reference-topk"):
        actor_options("cuda", 1, size, gpu_memory=80 * GIB, n_gpus=8)


def test_request_takes_device_and_reference_topk() -> None:
    request = SearchRequest(budget="3bpw")
    assert request.device == "auto" and request.reference_topk is None
    assert SearchRequest(budget="3bpw", device="cuda", reference_topk=512).reference_topk == 512
    with pytest.raises(ValueError, match="device"):
        SearchRequest(budget="3bpw", device="gpu")
    assert SearchRequest(budget="3bpw", reference_topk=0).reference_topk == 0  # the full log-probs
    with pytest.raises(ValueError, match="reference_topk"):
        SearchRequest(budget="3bpw", reference_topk=-1)


def test_search_on_cuda_without_a_gpu_is_refused_before_loading(tmp_path: Path, monkeypatch) -> None:
    from evaluators.context import DataConfig
    from search.driver import SearchConfig, run_search

    def no_loading(self: DataConfig) -> None:
        raise AssertionError("the model was loaded before the device was checked")

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # as on a machine without CUDA
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(DataConfig, "load", no_loading)
    storage = tmp_path / "s.db"
    cfg = SearchConfig(SearchRequest(model="tiny-random-llama", budget="4bpw", device="cuda", trials=1),
                       storage=f"sqlite:///{storage}", progress=False)
    with pytest.raises(UserError, match="--device cuda: no CUDA GPU"):
        run_search(cfg)
    assert not storage.exists()


# SmolLM2 as _check_memory sizes it: 8 windows of 256 tokens, 49,152 words, logits + log-probs + reference slice.
WINDOW = 256 * 49_152 * 4 * 3
SMOLLM2_8 = WorkerSize(538_000_000, 8_364_000, CPU_BATCH * WINDOW, WINDOW, 8)


@pytest.mark.parametrize(("cpus", "host", "trials", "workers", "threads"), [
    (16, 100, None, 16, 1), (16, 3, None, 3, 5), (16, 100, 4, 4, 4), (2, 100, 20, 2, 1), (1, 0, None, 1, 1)])
def test_automatic_cpu_workers_are_one_per_core_within_memory_and_trials(cpus, host, trials, workers, threads) -> None:
    plan = plan_workers("cpu", SMOLLM2_8, requested=None, cpus=cpus, host_workers=host, max_workers=trials)
    assert (plan.workers, plan.threads, plan.batch_size) == (workers, threads, CPU_BATCH)
    assert plan.size == SMOLLM2_8  # the CPU batch is the evaluator's default: figures unchanged
    assert plan.options == {"num_cpus": 1}


def test_asked_workers_are_kept_and_share_the_cores() -> None:
    plan = plan_workers("cpu", SMOLLM2_8, requested=3, cpus=16, host_workers=100)
    assert (plan.workers, plan.threads) == (3, 5) and "as asked" in plan.why
    gpu = plan_workers("cuda", SMOLLM2_8, requested=5, cpus=16, host_workers=100, gpu_memory=141 * GIB, n_gpus=1)
    assert gpu.workers == 5


def test_automatic_gpu_workers_and_batch_follow_the_gpu_memory() -> None:
    h200 = dict(cpus=16, host_workers=100, gpu_memory=141 * GIB)
    plan = plan_workers("cuda", SMOLLM2_8, requested=None, n_gpus=1, **h200)
    assert plan.workers == WORKERS_PER_GPU and plan.threads == 16 // WORKERS_PER_GPU
    assert plan.batch_size == 4 and plan.size.batch_bytes == 4 * WINDOW  # half the windows: a first batch remains
    # The workers' Ray options, as actor_options gives them at the plan's batch.
    assert plan.options == actor_options("cuda", plan.workers, plan.size, 141 * GIB, 1) == {"num_cpus": 1,
                                                                                            "num_gpus": 0.5}
    assert plan_workers("cuda", SMOLLM2_8, requested=None, n_gpus=8, **h200).workers == 16  # 2 x 8 GPUs, 16 cores
    assert plan_workers("cuda", SMOLLM2_8, requested=None, n_gpus=8, **dict(h200, host_workers=5)).workers == 5
    # A 7B model in bf16 with a top-k reference over 512 windows: one fits on an 80 GB GPU, and its batch
    # fills what is left (less than the 256 windows of half the evaluation).
    big = WorkerSize(14 * GIB, GIB // 8, CPU_BATCH * WINDOW, WINDOW, 512)
    tight = plan_workers("cuda", big, requested=None, n_gpus=2, cpus=16, host_workers=100, gpu_memory=80 * GIB)
    room = (int(80 * GIB * GPU_HEADROOM) - 3 * 14 * GIB - GIB // 8) // WINDOW
    assert tight.workers == 2 and tight.batch_size == room and 2 < room < 256
    assert tight.size.device_bytes <= 80 * GIB * GPU_HEADROOM


def test_a_model_larger_than_one_gpu_alone_is_refused_naming_its_size() -> None:
    size = WorkerSize(param_bytes=140 * GIB, reference_bytes=GIB, batch_bytes=GIB)  # a 70B model in bf16
    with pytest.raises(UserError, match=r"the model alone is 140\.00 GiB.*141\.00 GiB.*--dtype bfloat16"):
        plan_workers("cuda", size, requested=None, cpus=16, host_workers=4, gpu_memory=141 * GIB, n_gpus=8)


def test_host_memory_bounds_the_workers_and_refuses_with_the_estimate() -> None:
    assert fit_in_host(None, 2 * GIB, GIB, 10 * GIB) == 4
    assert fit_in_host(3, 2 * GIB, GIB, 10 * GIB) == 4
    with pytest.raises(UserError, match=r"needs about 11\.00 GiB \(5 workers x 2\.00 GiB.*10\.00 GiB is available"):
        fit_in_host(5, 2 * GIB, GIB, 10 * GIB)
    with pytest.raises(UserError, match=r"needs about 3\.00 GiB \(1 workers.*--reference-topk"):
        fit_in_host(None, 2 * GIB, GIB, 2 * GIB, ", or --reference-topk 512")


def test_request_workers_default_to_automatic() -> None:
    assert SearchRequest(budget="3bpw").workers is None
    assert SearchRequest(budget="3bpw", workers=3).workers == 3
    with pytest.raises(ValueError, match="workers"):
        SearchRequest(budget="3bpw", workers=0)


def test_a_search_without_workers_runs_one_per_core(corpus, local_ray, tmp_path: Path) -> None:
    from search.driver import SearchConfig, run_search
    from studies import Store

    storage = f"sqlite:///{tmp_path / 'w.db'}"
    request = SearchRequest(model="tiny-random-llama", dataset=corpus, seq_len=64, eval_seqs=4, calib_seqs=0,
                            budget="4.5bpw", trials=6, study="auto", device="cpu")
    run_search(SearchConfig(request, storage=storage, progress=False))
    frame = Store(storage).trials_frame(Store(storage).get_study("auto"))
    cores = int(local_ray.cluster_resources()["CPU"])  # the test cluster's 2
    assert (frame["state"] == "complete").sum() == 6 and frame["worker"].nunique() == min(cores, 6)
