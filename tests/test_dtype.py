"""Loading the float model in half precision (``--dtype``): what ``auto`` means on each device, the
dtype in the provenance that ``apply`` / ``eval`` reload from, and a trial in bf16 against float32."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import quant
from evaluators import Evaluator, UserError, load_model
from evaluators.context import DataConfig
from evaluators.models import resolve_dtype
from search.request import MeasureRequest
from tests.test_evaluator import _word_level_model


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory: pytest.TempPathFactory):
    """A local model folder whose checkpoint is saved in bfloat16 (its config says so)."""
    from transformers import LlamaForCausalLM

    folder = _word_level_model(tmp_path_factory.mktemp("bf16"), adds_bos=False)
    LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(folder)
    return folder


def test_auto_is_the_saved_dtype_on_a_gpu_and_float32_on_the_cpu(bf16_folder) -> None:
    name = str(bf16_folder)
    assert resolve_dtype("auto", "cuda", name) == "bfloat16"
    assert resolve_dtype("auto", "cpu", name) == "float32"
    assert resolve_dtype("auto", "cuda", "smollm2-135m") == "float32"  # converted to float32 safetensors
    assert resolve_dtype("float16", "cpu", name) == "float16"  # asked for: taken as given
    with pytest.raises(UserError, match="unknown --dtype 'half'"):
        resolve_dtype("half", "cpu", name)
    assert load_model(name).model.dtype == torch.float32  # float32 unless asked, whatever was saved
    assert load_model(name, dtype="bfloat16").model.dtype == torch.bfloat16


def test_the_dtype_is_part_of_the_fingerprint_outside_float32(bf16_folder) -> None:
    # The fingerprint's cache is keyed by the folder's files: without the dtype in it, whichever load came
    # first would lend its fingerprint (and so its cached sensitivity rows) to the other.
    fp32 = load_model(str(bf16_folder)).fingerprint
    bf16 = load_model(str(bf16_folder), dtype="bfloat16").fingerprint
    assert fp32 != bf16
    assert load_model(str(bf16_folder)).fingerprint == fp32


def test_provenance_records_the_resolved_dtype_and_old_provenance_loads_float32(data_config) -> None:
    old = {k: v for k, v in data_config.to_dict().items() if k != "dtype"}  # written before --dtype
    assert DataConfig.from_dict(old).dtype == "float32"
    request = MeasureRequest.from_data(replace(data_config, dtype="bfloat16"))
    assert request.dtype == "bfloat16" and request.data_config().to_dict()["dtype"] == "bfloat16"
    auto = MeasureRequest(model="tiny-random-llama", dataset=data_config.dataset)
    assert auto.dtype == "auto" and auto.data_config("cpu").dtype == "float32"
    with pytest.raises(ValueError, match="dtype"):
        MeasureRequest(dtype="float8")
    with pytest.raises(UserError, match="unknown model dtype 'auto'"):
        replace(data_config, dtype="auto").load()  # a DataConfig always holds what was loaded


def test_a_bfloat16_trial_runs_in_bf16_and_gives_about_the_float32_kl(data_config) -> None:
    names = list(quant.weight_matrices(load_model(data_config.model).model))
    policies = [quant.Policy.uniform(names, quant.QuantSetting("rtn", bits, 32)) for bits in (3, 4)]
    results = {}
    for dtype in ("float32", "bfloat16"):
        loaded, tokens = replace(data_config, dtype=dtype).load()
        ev = Evaluator(loaded, tokens)
        assert ev.reference.dtype == "float32"  # float32 log-probs from the bf16 model's logits
        seen: list[torch.dtype] = []
        hook = torch.nn.modules.module.register_module_forward_hook(
            lambda m, args, out: seen.append(out.dtype) if isinstance(m, quant.PackedModule) else None)
        try:
            results[dtype] = [ev.evaluate(p)["kl"] for p in policies]
        finally:
            hook.remove()
        assert seen and set(seen) == {getattr(torch, dtype)}  # packed modules answer in the model's dtype
        assert ev.weights["model.layers.0.mlp.up_proj"].dtype == getattr(torch, dtype)
    for kl32, kl16 in zip(results["float32"], results["bfloat16"]):
        # At most 4.8 % apart on the tiny model (its weights drawn from their own generator since issue 22; 0.7 %
        # on the earlier draw): bf16's rounding of the float weights moves the KL of 3-4 bit rounding a little.
        assert kl16 == pytest.approx(kl32, rel=0.08)
    assert results["bfloat16"][0] > results["bfloat16"][1]  # 3 bits still cost more than 4


def test_a_bfloat16_search_is_reloaded_in_bfloat16_by_eval_and_resumed_only_so(corpus, local_ray, tmp_path,
                                                                                capsys) -> None:
    import json

    from app.cli import main
    from studies import Store

    storage = f"sqlite:///{tmp_path / 'd.db'}"
    args = ["search", "--model", "tiny-random-llama", "--dataset", corpus, "--seq-len", "64", "--eval-seqs", "4",
            "--calib-seqs", "4", "--budget", "4.5bpw", "--workers", "1", "--storage", storage, "--study", "h",
            "--trials", "3"]
    assert main(args + ["--dtype", "bfloat16"]) == 0
    assert Store(storage).get_study("h").provenance["dtype"] == "bfloat16"
    out = tmp_path / "policy.json"
    assert main(["export", "h", "--storage", storage, "--budget", "4.5bpw", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    # The workers' bf16 KL again: a float32 reload would be ~1 % off (see the test above).
    assert json.loads(capsys.readouterr().out)["kl"] == pytest.approx(doc["metrics"]["kl"], abs=1e-5)
    assert main(args + ["--dtype", "float32", "--trials", "4"]) == 2
    assert "different dtype" in capsys.readouterr().err
