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
