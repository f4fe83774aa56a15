"""A model split over several GPUs (``--split-model``): the placement's budgets, the device map they give,
and quantized evaluation through accelerate's hooks.

No GPU is needed: the device map is arithmetic on sizes, and the hooks are the ones a multi-GPU
dispatch attaches (one per block, moving inputs and outputs), here with every block on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model

import quant
from evaluators import Evaluator, LoadedModel, TokenSets, UserError
from evaluators.device_map import block_bytes, device_map
from evaluators.proxy import fisher_diagonal
from search.placement import GPU_HEADROOM, WorkerSize, plan_workers, split_memory
from search.request import SearchRequest
from tests.test_architectures import _ids, _mixed
from tests.test_architectures import _model as tiny_model

GIB = 2 ** 30


def _model(arch: str) -> torch.nn.Module:
    # 8 layers: a layer is a small part of the model, as in one worth splitting.
    return tiny_model(arch, layers=8)


def _size(model: torch.nn.Module, reference: int = 0, batch: int = 0) -> WorkerSize:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return WorkerSize(params, reference, batch, block_bytes=block_bytes(model))


def _param_bytes_by_device(model: torch.nn.Module, dmap: dict[str, int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for name, device in dmap.items():
        out[device] = out.get(device, 0) + sum(p.numel() * p.element_size()
                                               for p in model.get_submodule(name).parameters())
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("gpus_worth", [1.5, 2.5, 3.2])
def test_the_planned_gpus_hold_the_whole_model_within_their_budgets(arch: str, gpus_worth: float) -> None:
    model = _model(arch)
    size = _size(model, reference=4096, batch=8192)
    # A GPU whose usable third holds 1 / gpus_worth of the parameters.
    gpu_memory = int(3 * size.param_bytes / gpus_worth / GPU_HEADROOM)
    budgets = split_memory(size, gpu_memory)
    assert len(budgets) >= 2 and list(budgets) == list(range(len(budgets)))
    dmap = device_map(model, budgets)  # refuses a module left over
    used = _param_bytes_by_device(model, dmap)
    assert set(used) <= set(budgets) and all(used[d] <= budgets[d] for d in used)
    assert sum(used.values()) >= size.param_bytes  # every parameter placed (a tied one counted where it is)
    assert budgets[0] < budgets[1]  # the first GPU holds the reference and the logits besides


def test_a_model_that_does_not_fit_its_budgets_is_refused_naming_what_is_left() -> None:
    model = _model("llama")
    size = _size(model)
    with pytest.raises(UserError, match=r"does not fit on 2 GPUs.*modules left over"):
        device_map(model, {0: size.param_bytes // 4, 1: size.param_bytes // 4})


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_a_split_model_measures_what_the_whole_one_does(arch: str) -> None:
    ids = _ids(4, 32, seed=2).numpy()
    tokens = TokenSets(eval=ids[:2], calib=ids[2:], fingerprint=arch)
    whole = Evaluator(LoadedModel(arch, _model(arch), lambda text: None, arch), tokens)
    model = _model(arch)
    size = _size(model)
    dmap = device_map(model, split_memory(size, int(3 * size.param_bytes / 2.5 / GPU_HEADROOM)))
    assert len(set(dmap.values())) >= 2
    # The hooks of a multi-GPU dispatch, with each block executing on the CPU.
    dispatch_model(model, {name: "cpu" for name in dmap}, force_hooks=True)
    assert all(hasattr(model.get_submodule(name), "_hf_hook") for name in dmap)
    split = Evaluator(LoadedModel(arch, model, lambda text: None, arch), tokens, reference=whole.reference)
    policy = _mixed(list(whole.matrices))  # the embedding and a hooked head quantized too
    for evaluator in (whole, split):
        evaluator.calibrate([quant.QuantSetting("gptq", 3, 32)])
    assert split.hessians.keys() == whole.hessians.keys()
    assert all(torch.equal(split.hessians[n], whole.hessians[n]) for n in whole.hessians)
    expected, measured = whole.evaluate(policy), split.evaluate(policy)
    assert expected["kl"] > 0.01
    for key in ("kl", "ppl", "top1", "bytes"):
        assert measured[key] == expected[key], key
    assert split.evaluate_partial({})["kl"] == 0.0  # back to float, exactly
    whole.restore_float()
    fisher_whole = fisher_diagonal(whole.model, tokens.calib)
    fisher_split = fisher_diagonal(split.model, tokens.calib)
    assert all(torch.equal(fisher_split[n], fisher_whole[n]) for n in fisher_whole)


SEVENTY_B = WorkerSize(param_bytes=140 * GIB, reference_bytes=GIB // 8, batch_bytes=GIB, block_bytes=2 * GIB)


def test_a_model_larger_than_one_gpu_is_split_over_whole_gpus_when_allowed() -> None:
    h200 = dict(cpus=16, host_workers=8, gpu_memory=141 * GIB, n_gpus=8)
    with pytest.raises(UserError, match=r"the model alone is 140\.00 GiB.*--split-model"):
        plan_workers("cuda", SEVENTY_B, requested=None, **h200)
    plan = plan_workers("cuda", SEVENTY_B, requested=None, split=True, **h200)
    usable = int(141 * GIB * GPU_HEADROOM)
    assert plan.max_memory == split_memory(SEVENTY_B, 141 * GIB) and len(plan.max_memory) == 4  # 4 x 40 GiB of layers
    assert plan.options == {"num_cpus": 1, "num_gpus": 4}  # whole GPUs, on one node
    assert plan.max_memory[1] == usable // 3 and plan.max_memory[0] == (usable - GIB // 8 - GIB) // 3
    assert plan.workers == 2 and plan.threads == 8  # 8 GPUs hold two such workers
    with pytest.raises(UserError, match=r"3 workers of 4 GPUs each do not fit on 8 GPUs.*use --workers 2"):
        plan_workers("cuda", SEVENTY_B, requested=3, split=True, **h200)
    with pytest.raises(UserError, match=r"needs 4 GPUs of 141\.00 GiB on one node.*the nodes have 2 at most"):
        plan_workers("cuda", SEVENTY_B, requested=None, split=True, **dict(h200, n_gpus=2))
    # A worker's GPUs are on one node: four nodes of 2 GPUs hold none, nodes of 4 + 6 GPUs hold two.
    with pytest.raises(UserError, match=r"the nodes have 2 at most"):
        plan_workers("cuda", SEVENTY_B, requested=None, split=True, **h200, node_gpus=(2, 2, 2, 2))
    assert plan_workers("cuda", SEVENTY_B, requested=None, split=True, **dict(h200, n_gpus=10),
                        node_gpus=(4, 6)).workers == 2
    # A model one GPU holds is not split, --split-model or not.
    small = WorkerSize(param_bytes=GIB, reference_bytes=GIB // 8, batch_bytes=GIB)
    assert plan_workers("cuda", small, requested=None, split=True, **h200).max_memory is None


def test_split_model_is_refused_on_the_cpu_before_loading_and_parsed_from_the_command_line(tmp_path,
                                                                                         monkeypatch) -> None:
    from evaluators.context import DataConfig
    from search.driver import SearchConfig, run_search
    from search.placement import resolve_device

    for device, gpus in (("cpu", 8), ("auto", 0)):
        with pytest.raises(UserError, match="--split-model spreads a model over several GPUs"):
            resolve_device(device, gpus, split=True)
    assert resolve_device("auto", 8, split=True) == "cuda"

    def no_loading(self: DataConfig) -> None:
        raise AssertionError("the model was loaded before --split-model was checked")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(DataConfig, "load", no_loading)
    request = SearchRequest(model="tiny-random-llama", budget="4bpw", trials=1, split_model=True)
    with pytest.raises(UserError, match="--split-model"):
        run_search(SearchConfig(request, storage=f"sqlite:///{tmp_path}/s.db", progress=False))
    assert SearchRequest(budget="3bpw").split_model is False
    from app.cli import _parser
    from app.cli_args import request_from_args

    args = _parser().parse_args(["search", "--budget", "3bpw", "--split-model"])
    assert request_from_args(SearchRequest, args).split_model is True
