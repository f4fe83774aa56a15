import json

import pytest
import torch
from torch import nn

import quant
from evaluators import load_model
from quant import Policy, PolicyError, QuantSetting


def test_policy_json_round_trip(tmp_path) -> None:
    policy = Policy({"a": QuantSetting("rtn", 3, 64), "b": QuantSetting("rtn", 8, None, {"symmetric": True})},
                    meta={"model": "m"})
    path = tmp_path / "p.json"
    policy.save(path)
    loaded = Policy.load(path)
    assert loaded.settings == policy.settings and loaded.meta == {"model": "m"}
    assert json.loads(path.read_text())["format_version"] == quant.POLICY_VERSION


@pytest.mark.parametrize("doc, message", [
    ("[1, 2]", "JSON object"),
    ('{"format_version": 9, "matrices": {"a": {}}}', "format_version 9"),
    ('{"format_version": 1}', "no 'matrices'"),
    ('{"format_version": 1, "matrices": {"a": {"bits": 11}}}', "matrix 'a': format 'rtn' supports bits"),
    ("{not json", "not valid JSON"),
])
def test_malformed_policies_are_refused_with_reason(tmp_path, doc: str, message: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(doc)
    with pytest.raises(PolicyError, match=message):
        Policy.load(path)


def test_policy_for_another_model_is_refused() -> None:
    model = load_model("tiny-random-llama").model
    policy = Policy({"model.layers.99.mlp.up_proj": QuantSetting()})
    with pytest.raises(PolicyError, match="does not match the model"):
        quant.apply_policy(model, policy)


def test_apply_replaces_every_matrix_and_counts_its_bytes() -> None:
    model = load_model("tiny-random-llama").model
    names = list(quant.weight_matrices(model))
    packed = quant.apply_policy(model, Policy.uniform(names, QuantSetting("rtn", 4, 32)))
    assert set(packed) == set(names)
    assert not any(type(m) in (nn.Linear, nn.Embedding) for m in model.modules())
    numel = sum(p.numel for p in packed.values())
    assert sum(p.nbytes for p in packed.values()) == numel * 5 // 8  # 4 bits + 32 bits per 32 weights


def test_quantized_model_computes_from_the_packed_weights() -> None:
    loaded = load_model("tiny-random-llama")
    model = loaded.model
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    names = list(quant.weight_matrices(model))
    packed = quant.apply_policy(model, Policy.uniform(names, QuantSetting("rtn", 3, 32)))
    out = model(input_ids=ids).logits
    # Same computation done by hand with dequantized weights in a fresh float model.
    ref = load_model("tiny-random-llama").model
    with torch.no_grad():
        for name, p in packed.items():
            ref.get_submodule(name).weight.copy_(p.dequantize())
    assert torch.allclose(out, ref(input_ids=ids).logits, atol=1e-5)


def test_tied_head_shares_the_embedding_tensor() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    names = list(quant.weight_matrices(model))
    assert "lm_head" not in names and "model.embed_tokens" in names
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    quant.apply_policy(model, Policy.uniform(names, QuantSetting("rtn", 4, 32)))
    assert model.lm_head.packed is model.model.embed_tokens.packed
    # Swapping policies keeps the tie.
    quant.apply_policy(model, Policy.uniform(names, QuantSetting("rtn", 2, 32)), weights=weights)
    assert model.lm_head.packed is model.model.embed_tokens.packed
    assert model.lm_head.packed.setting.bits == 2


def test_document_entries_carry_shape_and_runtime_and_old_documents_still_load() -> None:
    old = {"format_version": 1, "matrices": {"a": {"format": "vq", "bits": 6, "group_size": 64,
                                                   "options": {"dim": 2}},
                                             "b": {"format": "rtn", "bits": 3, "group_size": None,
                                                   "options": {"symmetric": True}}}}
    policy = Policy.from_dict(old)  # written before entries had shape and runtime
    assert policy.shapes == {}
    policy.shapes = {"a": (8, 128)}
    doc = policy.to_dict()
    assert doc["matrices"]["a"]["shape"] == [8, 128] and "shape" not in doc["matrices"]["b"]
    assert doc["matrices"]["a"]["runtime"]["code_bits"] == 3.0  # 6 bits per 2-weight vector
    assert doc["matrices"]["b"]["runtime"] == {"code_bits": 3.0, "symmetric": True, "outliers": False,
                                               "native": ["gptqmodel", "llamacpp", "torchao"], "types": {}}
    again = Policy.from_dict(json.loads(json.dumps(doc)))
    assert again.settings == policy.settings and again.shapes == {"a": (8, 128)}
    # The runtime mapping is derived: a stale one in the file is rewritten from the format.
    doc["matrices"]["b"]["runtime"] = {"code_bits": 99}
    assert Policy.from_dict(doc).to_dict()["matrices"]["b"]["runtime"]["code_bits"] == 3.0


@pytest.mark.parametrize("entry, message", [
    ({"format": "rtn", "bits": 4, "shape": [8]}, "shape must be"),
    ({"format": "rtn", "bits": 4, "shape": [8, True]}, "shape must be"),
    ({"format": "rtn", "bits": 4, "shapes": [8, 8]}, "unknown setting keys"),
])
def test_bad_entry_extras_are_refused(entry: dict, message: str) -> None:
    with pytest.raises(PolicyError, match=f"matrix 'a': {message}"):
        Policy.from_dict({"format_version": 1, "matrices": {"a": entry}})


def test_shapes_are_checked_against_the_format_and_the_model(monkeypatch) -> None:
    fmt = quant.get_format("rtn")

    def refuse(shape, setting) -> None:
        if shape[1] % 256:
            raise ValueError(f"row length {shape[1]} is not a multiple of 256")

    monkeypatch.setattr(fmt, "check_shape", refuse)  # as a block format of fixed rows would
    with pytest.raises(PolicyError, match="matrix 'a': row length 576 is not a multiple of 256"):
        Policy.from_dict({"format_version": 1, "matrices": {"a": {"format": "rtn", "shape": [8, 576]}}})
    monkeypatch.undo()
    policy = Policy({"a": QuantSetting()}, shapes={"a": (8, 576)})
    policy.check_model({"a": (8, 576)})
    with pytest.raises(PolicyError, match=r"'a' is \(8, 512\) in the model but \(8, 576\) in the policy"):
        policy.check_model({"a": (8, 512)})
