"""Runtime exports: structure of GPTQModel `dynamic`, llama.cpp tensor-type files and torchao FQN configs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import quant
from studies.export_runtimes import export_runtime, llamacpp_name

LAYERS = 2
MODULES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def _raw_doc() -> dict:
    """A policy document as written before quant recorded each entry's runtime mapping."""
    matrices = {"model.embed_tokens": {"format": "rtn", "bits": 8, "group_size": None, "options": {}},
                "lm_head": {"format": "rtn", "bits": 6, "group_size": 64, "options": {}}}
    for i in range(LAYERS):
        for m in MODULES:
            matrices[f"model.layers.{i}.{m}"] = {"format": "rtn", "bits": 4, "group_size": 32, "options": {}}
    matrices["model.layers.1.self_attn.v_proj"] = {"format": "rtn", "bits": 3, "group_size": 128,
                                                   "options": {"symmetric": True}}
    matrices["model.layers.0.mlp.down_proj"] = {"format": "turbo", "bits": 5, "group_size": 256, "options": {}}
    return {"format_version": 1, "matrices": matrices, "model": "tiny-random-llama",
            "metrics": {"kl": 0.1, "bytes": 1000, "bpw": 4.1, "ppl": 3.0, "top1": 0.9, "logit_err": 0.1},
            "provenance": {"study": "s", "trial": 3, "model": "tiny-random-llama"}}


def _doc(shapes: dict | None = None) -> dict:
    """The document as quant writes it: each entry with its runtime mapping (and shape, if given)."""
    policy = quant.Policy.from_dict(_raw_doc())
    policy.shapes = dict(shapes or {})
    return policy.to_dict()


def test_gptqmodel_dynamic_overrides_resolve_every_linear_to_its_setting() -> None:
    out = export_runtime(_doc(), "gptqmodel")
    cfg = json.loads(out.text)
    assert {"bits", "group_size", "dynamic"} <= set(cfg)
    assert all(k[:2] in ("+:", "-:") for k in cfg["dynamic"])

    def resolve(name: str) -> dict | None:  # GPTQModel: re.match, first match wins; '-:' skips
        for key, override in cfg["dynamic"].items():
            if re.match(key[2:], name):
                return None if key.startswith("-:") else {**cfg, **override}
        return cfg

    assert resolve("model.embed_tokens") is None and "model.embed_tokens" in out.skipped
    assert resolve("model.layers.0.self_attn.q_proj")["bits"] == 4
    v = resolve("model.layers.1.self_attn.v_proj")
    assert (v["bits"], v["group_size"], v["sym"]) == (3, 128, True)
    assert resolve("model.layers.0.self_attn.v_proj")["group_size"] == 32  # the exact regex does not leak
    head = resolve("lm_head")
    assert head["bits"] in (4, 8) and head["group_size"] == 64 and cfg["lm_head"] is True
    down = resolve("model.layers.0.mlp.down_proj")
    assert down["bits"] == 4 and down["group_size"] == 128  # 5-bit turbo, group 256: both approximated
    assert ("model.layers.0.mlp.down_proj: format turbo -> GPTQ integer, 5 bits -> 4, group 256 -> 128"
            in out.approximations)
    assert any("6 bits" in line and "lm_head" in line for line in out.approximations)


def test_llamacpp_tensor_type_file_names_and_types() -> None:
    out = export_runtime(_doc(), "llamacpp")
    lines = out.text.split()
    pairs = dict(line.split("=") for line in lines)
    assert len(pairs) == 2 + LAYERS * len(MODULES)
    assert pairs["token_embd.weight"] == "q8_0" and pairs["output.weight"] == "q6_k"
    assert pairs["blk.1.attn_v.weight"] == "q3_k" and pairs["blk.0.attn_q.weight"] == "q4_k"
    assert pairs["blk.0.ffn_down.weight"] == "q5_k" and pairs["blk.1.attn_output.weight"] == "q4_k"
    valid = {"q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0", "tq1_0"}
    assert set(pairs.values()) <= valid
    assert all(re.fullmatch(r"(token_embd|output|blk\.\d+\.(attn_[qkv]|attn_output|ffn_(gate|up|down)))\.weight", k)
               for k in pairs)
    assert any("blk.0.ffn_down" in line and "turbo" in line for line in out.approximations)


def test_llamacpp_names() -> None:
    assert llamacpp_name("model.layers.12.self_attn.v_proj") == "blk.12.attn_v.weight"
    assert llamacpp_name("model.layers.3.mlp.gate_proj") == "blk.3.ffn_gate.weight"
    assert llamacpp_name("model.embed_tokens") == "token_embd.weight" and llamacpp_name("lm_head") == "output.weight"
    assert llamacpp_name("model.something.else") is None


def test_torchao_fqn_config_covers_every_matrix() -> None:
    doc = _doc()
    cfg = json.loads(export_runtime(doc, "torchao").text)
    fqn = cfg["_data"]["fqn_to_config"]
    assert cfg["_type"] == "FqnToConfig" and set(fqn) == set(doc["matrices"])
    q = fqn["model.layers.0.self_attn.q_proj"]["_data"]
    assert fqn["model.layers.0.self_attn.q_proj"]["_type"] == "IntxWeightOnlyConfig"
    assert q["weight_dtype"]["_data"] == "int4" and q["granularity"]["_data"] == {"group_size": 32}
    assert fqn["model.embed_tokens"]["_data"]["granularity"]["_type"] == "PerAxis"
    assert fqn["model.layers.1.self_attn.v_proj"]["_data"]["mapping_type"]["_data"] == "SYMMETRIC"


def test_torchao_reads_the_export_and_quantizes_a_model_with_it() -> None:
    pytest.importorskip("torchao")
    import torch
    from torchao.core.config import config_from_dict
    from torchao.quantization import FqnToConfig, quantize_

    from evaluators import load_model

    config = config_from_dict(json.loads(export_runtime(_doc(), "torchao").text))
    assert isinstance(config, FqnToConfig)
    v = config.fqn_to_config["model.layers.1.self_attn.v_proj"]
    assert v.weight_dtype == torch.int3 and v.granularity.group_size == 128
    model = load_model("tiny-random-llama").model
    # The tiny model's rows (64 and 128 wide) are shorter than some groups: with the shapes the policy
    # document carries, the export fits them.
    out = export_runtime(_doc(quant.weight_matrices(model)), "torchao")
    config = config_from_dict(json.loads(out.text))
    assert config.fqn_to_config["model.layers.1.self_attn.v_proj"].granularity.group_size == 64
    assert any("v_proj" in line and "group 128 -> 64" in line for line in out.approximations)
    linear_only = FqnToConfig({k: c for k, c in config.fqn_to_config.items() if "embed" not in k})
    quantize_(model, linear_only, filter_fn=None)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_llamacpp_types_are_real_ggml_types() -> None:
    gguf = pytest.importorskip("gguf")
    pairs = dict(line.split("=") for line in export_runtime(_doc(), "llamacpp").text.split())
    for ggml in pairs.values():
        assert gguf.GGMLQuantizationType[ggml.upper()]


def test_unknown_format_and_empty_policy_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown export format"):
        export_runtime(_doc(), "onnx")
    with pytest.raises(ValueError, match="no 'matrices'"):
        export_runtime({"format_version": 1}, "llamacpp")


def test_a_document_without_runtime_entries_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="has no 'runtime' entry.*quant.Policy.from_dict"):
        export_runtime(_raw_doc(), "llamacpp")
    assert json.loads(export_runtime(_raw_doc(), "json").text) == _raw_doc()  # json passes the document on


def test_ternary_and_vq_map_through_their_runtime_entries() -> None:
    doc = _doc()
    doc["matrices"] = quant.Policy.from_dict({"format_version": 1, "matrices": {
        "model.layers.0.mlp.up_proj": {"format": "ternary", "bits": 2, "group_size": 256},
        "model.layers.0.mlp.gate_proj": {"format": "vq", "bits": 6, "group_size": 64, "options": {"dim": 2}},
        "model.layers.0.mlp.down_proj": {"format": "gptq", "bits": 4, "group_size": 32},
        "model.layers.0.self_attn.q_proj": {"format": "rtn", "bits": 4, "group_size": 32,
                                            "options": {"outlier_frac": 0.01}}}}).to_dict()["matrices"]
    out = export_runtime(doc, "llamacpp")
    pairs = dict(line.split("=") for line in out.text.split())
    assert pairs == {"blk.0.ffn_up.weight": "tq1_0", "blk.0.ffn_gate.weight": "q3_k", "blk.0.ffn_down.weight": "q4_k",
                     "blk.0.attn_q.weight": "q4_k"}
    assert "model.layers.0.self_attn.q_proj (blk.0.attn_q.weight): sparse fp16 outliers dropped" in out.approximations
    assert not any("ffn_up" in line for line in out.approximations)  # llama.cpp's own ternary type, its block
    assert any("ffn_gate" in line and "format vq -> q3_k" in line for line in out.approximations)
    gptq = json.loads(export_runtime(doc, "gptqmodel").text)
    assert gptq["dynamic"]["+:^model\\.layers\\.0\\.mlp\\.gate_proj$"]["bits"] == 3  # 6 bits per 2 weights


class _Toy(quant.Format):
    """A format registered by a test alone: its runtime mapping reaches every exporter and show."""

    name, layout = "toy", "toy-layout"  # as a llama.cpp type would be: its geometry is the type's
    bits_range, group_sizes, default_bits, default_group_size = (4, 4), (256,), 4, 256
    runtime_types, native_runtimes = {"llamacpp": "q4_k"}, ("llamacpp",)

    def code_bits(self, setting: quant.QuantSetting) -> float:
        return 4.5

    def quantize(self, weight, setting, **calibration):  # pragma: no cover - never quantized here
        raise NotImplementedError

    def decode(self, packed, rows=None):  # pragma: no cover
        raise NotImplementedError

    def expected_nbytes(self, shape, setting) -> int:
        return shape[0] * shape[1] * 11 // 16


def test_a_new_format_needs_no_edit_outside_its_file(monkeypatch) -> None:
    from quant.formats import _base
    from app.show import bit_map, summary_text

    monkeypatch.setitem(_base._REGISTRY._items, "toy", _Toy())  # registered for this test only
    doc = quant.Policy.from_dict({"format_version": 1, "matrices": {
        "model.layers.0.self_attn.q_proj": {"format": "toy"},  # bits and group from the format
        "model.layers.0.self_attn.k_proj": {"format": "rtn", "bits": 4, "group_size": 32},
        "model.layers.0.self_attn.v_proj": {"format": "rtn", "bits": 4, "group_size": 32},
        "model.layers.0.self_attn.o_proj": {"format": "rtn", "bits": 4, "group_size": 256}}}).to_dict()
    assert quant.QuantSetting.from_dict({"format": "toy"}).describe() == "toy"
    llama = export_runtime(doc, "llamacpp")
    assert "blk.0.attn_q.weight=q4_k" in llama.text.split()
    assert not any("attn_q" in line for line in llama.approximations)  # its own type, its own super-block
    assert not any("attn_k" in line for line in llama.approximations)  # rtn4g32: q4_k's own scale blocks
    # rtn does not fix the type: one scale per 256 weights is not q4_k's one per 32, and the note says so.
    assert "model.layers.0.self_attn.o_proj (blk.0.attn_output.weight): group 256 -> q4_k's blocks of 32" \
        in llama.approximations
    gptq = export_runtime(doc, "gptqmodel")
    assert ("model.layers.0.self_attn.q_proj: format toy -> GPTQ integer, 4.5 bits -> 4, group 256 -> 128"
            in gptq.approximations)
    assert bit_map(doc["matrices"]).bits() == [[4.5, 4.0, 4.0, 4.0]]
    assert "4/256:toy" in summary_text(doc)


def test_studies_never_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, studies.export_runtimes, studies; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_cli_export_format_writes_file_and_reports_approximations(tmp_path, capsys, monkeypatch) -> None:
    import app.cli as cli

    # A trial stored before entries carried their runtime mapping: the CLI passes it through quant.
    monkeypatch.setattr("studies.export_policy", lambda store, name, trial=None, budget_bytes=None: _raw_doc())
    storage = f"sqlite:///{tmp_path}/e.db"
    from studies import Store

    Store(storage)  # export reads a database a search wrote; it never creates one
    out = tmp_path / "types.txt"
    assert cli.main(["export", "s", "--storage", storage, "--trial", "3", "--format", "llamacpp",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "approximation" in printed and "~ model.layers.0.mlp.down_proj" in printed
    assert "blk.1.attn_v.weight=q3_k" in out.read_text()


# GPTQModel declares torch>=2.14.1, so `pip install gptqmodel` would replace this project's CPU torch 2.13
# with a CUDA build. Its configuration code runs on CPU torch 2.13 all the same, so the test installs the
# pinned release and its small pure-Python dependencies without dependencies into a folder of its own
# (never into the venv) and runs GPTQModel there in a subprocess.
GPTQMODEL = ["gptqmodel==7.7.0", "pypcre==0.6.4", "logbar==0.4.15", "tokenicer==0.0.14", "device-smi==0.5.7",
             "defuser==0.0.28", "threadpoolctl==3.8.0"]


def _gptqmodel_site() -> Path:
    from evaluators.models import cache_dir

    site = cache_dir() / "gptqmodel-7.7.0-site"
    if not (site / ".complete").exists():
        partial = Path(tempfile.mkdtemp(prefix="gptqmodel-", dir=cache_dir()))
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                                 "--no-build-isolation", "--target", str(partial), *GPTQMODEL],
                                capture_output=True, text=True)
        if result.returncode:
            shutil.rmtree(partial, ignore_errors=True)
            pytest.fail(f"pip could not install {' '.join(GPTQMODEL)}: {result.stderr[-2000:]}")
        (partial / ".complete").touch()
        shutil.rmtree(site, ignore_errors=True)
        partial.rename(site)
    return site


def test_gptqmodel_reads_the_dynamic_export_and_resolves_every_module(tmp_path) -> None:
    doc = _doc()
    out = export_runtime(doc, "gptqmodel")
    (tmp_path / "quantize_config.json").write_text(out.text)
    names = list(doc["matrices"])
    # GPTQModel's own loader and the lookup its quantization loop calls for every module.
    code = ("import json, sys\nfrom gptqmodel import QuantizeConfig\n"
            f"cfg = QuantizeConfig.from_pretrained({str(tmp_path)!r})\n"
            "res = {}\n"
            f"for name in {names!r}:\n"
            "    o = cfg.dynamic_get(name)\n"
            "    res[name] = None if o is False else [int(cfg.dynamic_get(name, 'bits', cfg.bits)),\n"
            "        int(cfg.dynamic_get(name, 'group_size', cfg.group_size)),\n"
            "        bool(cfg.dynamic_get(name, 'sym', cfg.sym))]\n"
            "print('RESULT' + json.dumps(res))\n")
    env = {**os.environ, "PYTHONPATH": str(_gptqmodel_site()), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = json.loads(result.stdout.split("RESULT", 1)[1])
    assert resolved["model.embed_tokens"] is None  # skipped: GPTQModel quantizes linear layers only
    for name, s in doc["matrices"].items():
        if name == "model.embed_tokens":
            continue
        sym = s["runtime"]["symmetric"]
        if "gptqmodel" in s["runtime"]["native"] and s["bits"] in (2, 3, 4, 8) and s["group_size"] in (32, 64, 128):
            assert resolved[name] == [s["bits"], s["group_size"], sym], name  # representable: exact
    assert resolved["model.layers.0.mlp.down_proj"] == [4, 128, False]  # 5-bit turbo, group 256: nearest
    assert resolved["lm_head"] == [8, 64, False]  # 6 bits: the tie goes to the wider 8


def test_search_policies_carry_their_shapes_into_the_torchao_export() -> None:
    from evaluators import load_model
    from search.space import SearchSpace

    matrices = quant.weight_matrices(load_model("tiny-random-llama").model)
    _, policy = SearchSpace(matrices, (4,), (128,), ("rtn",)).uniform_policies()[0]
    doc = json.loads(json.dumps(policy.to_dict()))  # as the study stores it
    assert {m: tuple(e["shape"]) for m, e in doc["matrices"].items()} == matrices
    out = export_runtime(doc, "torchao")
    fqn = json.loads(out.text)["_data"]["fqn_to_config"]
    for name, (_, in_features) in matrices.items():  # rows of 64 and 128: group 128 fits only the latter
        granularity = fqn[name]["_data"]["granularity"]
        assert in_features % granularity["_data"]["group_size"] == 0
    assert not any("shape(s) unknown" in line for line in out.approximations)
    # llama.cpp: the tiny model's rows (64, 128 wide) are not whole k-quant super-blocks, each is named.
    llama = export_runtime(doc, "llamacpp").approximations
    assert sum("not whole 256-weight blocks of q4_k" in line for line in llama) == len(matrices)
    assert not any("unknown" in line for line in llama)
