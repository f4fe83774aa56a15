"""Worker placement (pure functions, so tested without a GPU) and ``--device`` at the boundary."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evaluators import UserError
from search.placement import GPU_HEADROOM, WorkerSize, actor_options, resolve_device
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
    with pytest.raises(ValueError, match="reference_topk"):
        SearchRequest(budget="3bpw", reference_topk=0)


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
