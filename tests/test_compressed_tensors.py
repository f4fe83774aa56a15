"""The ``compressed-tensors`` export: a Hugging Face folder that transformers loads with exactly the weights
the search measured, or a refusal naming each matrix it cannot hold."""

from __future__ import annotations

import json

import pytest
import torch

import quant
from evaluators import UserError
from search.exporters import EXPORTERS, ExportOptions

RTN4G32 = {"format": "rtn", "bits": 4, "group_size": 32, "options": {"symmetric": True}}
GPTQ8CH = {"format": "gptq", "bits": 8, "group_size": None, "options": {"symmetric": True}}
GPTQ4G64 = {"format": "gptq", "bits": 4, "group_size": 64, "options": {"symmetric": True, "act_order": True}}
RTN4G128 = {"format": "rtn", "bits": 4, "group_size": 128, "options": {"symmetric": True}}  # 128-wide rows only


def _doc(data_config, pick) -> dict:
    """A point as studies.export_policy gives it: the tiny model's matrices set by ``pick(index, name)``,
    the provenance naming the calibration windows gptq uses."""
    from evaluators import load_model

    names = quant.weight_matrices(load_model("tiny-random-llama").model)
    return {"format_version": 1, "provenance": {**data_config.to_dict(), "trial": 7},
            "matrices": {n: pick(i, n) for i, n in enumerate(names)}, "metrics": {"kl": 0.25, "bytes": 12345}}


@pytest.fixture(scope="module")
def exported(data_config, tmp_path_factory):
    """A policy mixing rtn 4-bit g32, gptq 8-bit per channel, gptq 4-bit g64 (act_order) and rtn 4-bit g128
    (on the 128-wide down_proj rows), exported; with the packed tensors the search's quantization gives."""
    from evaluators.checkpoint import pack_policy

    torch.set_num_threads(1)
    doc = _doc(data_config, lambda i, n: RTN4G128 if "down_proj" in n else (RTN4G32, GPTQ8CH, GPTQ4G64)[i % 3])
    out = tmp_path_factory.mktemp("ct") / "out"
    result = EXPORTERS["compressed-tensors"].write(doc, out, ExportOptions())
    _, packed, _ = pack_policy(quant.Policy.from_dict(doc), "reference")
    return doc, out, result, packed


def _loaded(out, dtype):
    from transformers import AutoModelForCausalLM

    # transformers' own route (not dequantize=True, which decompresses every module with the first config
    # group's scheme and fails on a mixed policy): compressed-tensors decompresses each module with its own
    # scheme on the first forward.
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    with torch.inference_mode():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    return model


def _with_weights(packed: dict[str, quant.PackedTensor], dtype: torch.dtype, folder) -> torch.nn.Module:
    """The tiny model with every matrix set to our dequantized weight, loaded in ``dtype`` as the export is.

    Through a float folder and from_pretrained, not ``.to(dtype)``: that would cast the rotary ``inv_freq``
    buffer too, which from_pretrained keeps in float32, and the logits would differ for that reason alone."""
    from transformers import AutoModelForCausalLM

    from evaluators import load_model

    model = load_model("tiny-random-llama").model
    with torch.no_grad():
        for name, module in quant.find_matrices(model)[0].items():
            module.weight.copy_(packed[name].dequantize())
    model.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def test_config_holds_one_group_per_setting_and_the_exact_module_names(exported) -> None:
    doc, out, result, packed = exported
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    groups = {(g["weights"]["num_bits"], g["weights"]["strategy"], g["weights"]["group_size"]): sorted(g["targets"])
              for g in config["config_groups"].values()}
    assert all(g["weights"]["symmetric"] and g["weights"]["type"] == "int" for g in config["config_groups"].values())
    settings = quant.Policy.from_dict(doc).settings
    linear = [n for n in settings if n not in ("model.embed_tokens", "lm_head")]
    want: dict = {}
    for n in linear:
        s = settings[n]
        want.setdefault((s.bits, "channel" if s.group_size is None else "group", s.group_size), []).append(n)
    assert groups == {k: sorted(v) for k, v in want.items()} and len(groups) == 4
    # The embedding and the head (which vLLM and transformers do not load packed) hold their dequantized weights.
    assert config["ignore"] == ["lm_head"] and result.skipped == ["lm_head"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for n in ("model.embed_tokens", "lm_head"):
            assert torch.equal(f.get_tensor(f"{n}.weight"), packed[n].dequantize())
        for n in linear:  # our fp16 scales as they are; no zero point (symmetric)
            assert torch.equal(f.get_tensor(f"{n}.weight_scale"), packed[n].buffers["scale"])
            assert f.get_tensor(f"{n}.weight_packed").dtype == torch.int32 and f"{n}.weight_zero_point" not in f.keys()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_transformers_loads_exactly_the_measured_weights_and_logits(exported, dtype, tmp_path) -> None:
    """float32: fp16 scale x integer of at most 8 bits is exact, so the weights are our dequantize() bit for
    bit. float16: compressed-tensors multiplies in fp16, one correctly rounded product, which is our float32
    weight rounded to fp16. (bfloat16 is not exact: the fp16 scales themselves are rounded to bf16.)"""
    _, out, _, packed = exported
    model = _loaded(out, dtype)
    modules = dict(model.named_modules())
    for name, p in packed.items():
        assert modules[name].weight.dtype == dtype
        assert torch.equal(modules[name].weight, p.dequantize().to(dtype)), name
    # Our model with the same weights in the same dtype: the same operations on the same tensors, so the
    # logits are equal bit for bit.
    reference = _with_weights(packed, dtype, tmp_path / "float")
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


ASYMMETRIC = {"format": "rtn", "bits": 4, "group_size": 32}


def test_an_offset_is_refused_naming_each_matrix_and_nothing_is_written(data_config, tmp_path) -> None:
    doc = _doc(data_config, lambda i, n: ASYMMETRIC if "mlp" in n else RTN4G32)
    out = tmp_path / "out"
    with pytest.raises(UserError) as refused:
        EXPORTERS["compressed-tensors"].write(doc, out, ExportOptions())
    mlp = [n for n in doc["matrices"] if "mlp" in n]
    assert f"{len(mlp)} matrices" in str(refused.value) and "fp16 offset" in str(refused.value)
    assert all(f"{n}: rtn4g32" in str(refused.value) for n in mlp)
    assert "self_attn" not in str(refused.value)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one


def test_nearest_quantizes_again_symmetric_and_reports_each_change(data_config, tmp_path) -> None:
    doc = _doc(data_config, lambda i, n: ASYMMETRIC if "mlp" in n else RTN4G32)
    out = tmp_path / "out"
    result = EXPORTERS["compressed-tensors"].write(doc, out, ExportOptions(nearest=True))
    mlp = [n for n in doc["matrices"] if "mlp" in n]
    assert result.approximations == [f"{n}: rtn4g32 -> rtn4g32,symmetric=True" for n in mlp]
    assert any("not the policy that was measured" in line for line in result.lines)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert [sorted(g["targets"]) for g in config["config_groups"].values()] == \
        [sorted(n for n in doc["matrices"] if n not in ("model.embed_tokens", "lm_head"))]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_eval_measures_the_folder_against_the_float_model_it_came_from(exported, data_config, capsys) -> None:
    """`turboquant eval FOLDER` reads the policy the export carries and measures the folder as transformers loads
    it: the KL the search's own evaluation gives the same policy."""
    from app.cli import main
    from evaluators import Evaluator

    doc, out, _, _ = exported
    loaded, tokens = data_config.load()
    expected = Evaluator(loaded, tokens).evaluate(quant.Policy.from_dict(doc))
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["kl"] == pytest.approx(expected["kl"], rel=1e-4)
    assert measured["top1"] == pytest.approx(expected["top1"], abs=1e-9)
    assert measured["bytes"] == doc["metrics"]["bytes"]  # the measured policy's, as stored
