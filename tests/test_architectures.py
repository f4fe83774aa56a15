"""Conformance of model surgery over the architectures people use: tiny random models built from
configs with a fixed seed (no download), each quantized by :func:`quant.apply_policy` in its own modules.

Gemma 3 scales its embedding (``Gemma3TextScaledWordEmbedding``: rows times sqrt(hidden)), GPT-2
stores its linear weights transposed (``Conv1D``) with biases and a learned position embedding,
Qwen 2 has attention biases, Phi-3 fused projections; Llama, Gemma 3, Qwen 2 and GPT-2 tie their head.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from torch import nn
from transformers.pytorch_utils import Conv1D

import quant
from evaluators import Evaluator, LoadedModel, TokenSets
from quant import Policy, QuantSetting

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3, bos_token_id=1,
               eos_token_id=2, pad_token_id=0)
ARCHS = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, dict(_COMMON, tie_word_embeddings=True)),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, dict(_COMMON, head_dim=16, sliding_window=8)),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(_COMMON, tie_word_embeddings=True)),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(_COMMON, head_dim=16)),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(_COMMON, sliding_window=None)),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, _COMMON),
    "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                                   initializer_range=0.3, bos_token_id=1, eos_token_id=2)),
}
TIED = {"llama", "gemma3", "qwen2", "gpt2"}


def _model(arch: str, layers: int | None = None) -> nn.Module:
    """The tiny ``arch`` built from a fixed seed; ``layers`` overrides its 2 layers."""
    config_class, model_class, kwargs = ARCHS[arch]
    if layers is not None:
        kwargs = {**kwargs, ("n_layer" if arch == "gpt2" else "num_hidden_layers"): layers}
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        return model_class(config_class(**kwargs)).float().eval()
    finally:
        torch.random.set_rng_state(state)


def _ids(n: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


def _mixed(names: list[str]) -> Policy:
    # Formats with different decoders, group sizes and a per-channel setting, in turn.
    settings = [QuantSetting("rtn", 3, 32), QuantSetting("lloyd", 3, 32), QuantSetting("rtn", 4, None),
                QuantSetting("turbo", 3, 32)]
    return Policy({n: settings[i % len(settings)] for i, n in enumerate(names)})


@pytest.mark.parametrize("arch", ARCHS)
def test_the_policy_covers_every_weight_matrix_once(arch: str) -> None:
    model = _model(arch)
    matrices, ties = quant.find_matrices(model)
    matrix_params = {id(p) for p in model.parameters() if p.dim() == 2}  # parameters() lists a tied one once
    assert {id(m.weight) for m in matrices.values()} == matrix_params
    head = "lm_head"
    assert (ties == {head: next(iter(matrices))}) == (arch in TIED)
    assert (head in matrices) == (arch not in TIED)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_logits_equal_the_float_model_on_the_dequantized_weights(arch: str) -> None:
    model = _model(arch)
    ref = copy.deepcopy(model)
    names = list(quant.weight_matrices(model))
    packed = quant.apply_policy(model, _mixed(names))
    with torch.no_grad():
        for name, p in packed.items():  # a tied head follows its embedding (one parameter)
            module = ref.get_submodule(name)  # GPT-2's Conv1D stores (in, out)
            module.weight.copy_(p.dequantize().t() if isinstance(module, Conv1D) else p.dequantize())
    ids = _ids()
    expected = _logits(ref, ids)
    assert (expected - _logits(_model(arch), ids)).abs().max() > 0.1  # the quantization shows
    torch.testing.assert_close(_logits(model, ids), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    # The model kept its own modules (Gemma's scaled embedding, GPT-2's Conv1D), now packed.
    for name in names:
        module = model.get_submodule(name)
        assert isinstance(module, quant.PackedModule) and isinstance(module, type(ref.get_submodule(name)))


@pytest.mark.parametrize("arch", ARCHS)
def test_applying_a_policy_never_changes_a_module_it_does_not_quantize(arch: str) -> None:
    model = _model(arch)
    ref = copy.deepcopy(model)
    names = list(quant.weight_matrices(model))
    weights = quant.float_weights(model)
    quant.apply_policy(model, Policy.uniform(names, QuantSetting("rtn", 8, None)))  # then half back to float
    chosen = Policy({n: QuantSetting("rtn", 2, 32) for n in names[::2]})
    quant.apply_policy(model, chosen, partial=True, weights=weights)
    _, ties = quant.find_matrices(model)
    quantized = set(chosen.settings) | {head for head, name in ties.items() if name in chosen.settings}
    # Every module left float computes what the float model's computes, on the inputs it gets here.
    twins = dict(ref.named_modules())
    checked: list[str] = []

    def compare(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            torch.testing.assert_close(output, twins[name](*args, **kwargs), rtol=0, atol=0)
            checked.append(name)
        return hook

    handles = [m.register_forward_hook(compare(n), with_kwargs=True) for n, m in model.named_modules()
               if not list(m.children()) and n not in quantized]
    try:
        _logits(model, _ids())
    finally:
        for handle in handles:
            handle.remove()
    float_matrices = set(names) - quantized
    assert float_matrices <= set(checked) and any("norm" in n or "ln_" in n for n in checked)
    # Its parameters and buffers are the float model's, bit for bit: only the quantized weights left.
    state, ref_state = model.state_dict(), ref.state_dict()
    assert set(ref_state) - set(state) == {f"{n}.weight" for n in quantized}
    assert all(torch.equal(state[k], ref_state[k]) for k in state)
    quant.restore_float(model, weights)
    assert torch.equal(_logits(model, _ids()), _logits(ref, _ids()))


@pytest.mark.parametrize("arch", ARCHS)
def test_eight_bit_settings_are_near_lossless_through_the_evaluator(arch: str) -> None:
    model = _model(arch)
    ids = _ids(4, 32, seed=2).numpy()
    evaluator = Evaluator(LoadedModel(arch, model, lambda text: None, arch),
                          TokenSets(eval=ids[:2], calib=ids[2:], fingerprint=arch))
    names = list(evaluator.matrices)
    kl8 = evaluator.evaluate(Policy.uniform(names, QuantSetting("rtn", 8, None)))["kl"]
    kl2 = evaluator.evaluate(Policy.uniform(names, QuantSetting("rtn", 2, 32)))["kl"]
    assert kl8 < 0.01 and kl2 > 10 * kl8
    assert evaluator.evaluate_partial({})["kl"] == pytest.approx(0.0, abs=1e-9)  # back to float, exactly


@pytest.mark.parametrize("arch", ["gemma3", "gpt2", "phi3"])
def test_a_checkpoint_reloads_into_the_same_computation(arch: str, tmp_path) -> None:
    model = _model(arch)
    policy = _mixed(list(quant.weight_matrices(model)))
    quant.apply_policy(model, policy)
    quant.save_checkpoint(model, policy, tmp_path)
    ckpt = quant.load_checkpoint(tmp_path)
    assert type(ckpt.model.get_input_embeddings()) is type(model.get_input_embeddings())
    ids = _ids()
    torch.testing.assert_close(_logits(ckpt.model, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


def test_a_scaled_embedding_keeps_its_scale() -> None:
    model = _model("gemma3")
    embedding = model.get_input_embeddings()
    assert type(embedding).__name__ == "Gemma3TextScaledWordEmbedding" and float(embedding.embed_scale) == 8.0
    packed = quant.apply_policy(model, Policy.uniform(list(quant.weight_matrices(model)), QuantSetting("rtn", 4, 32)))
    ids = _ids()
    rows = packed["model.embed_tokens"].dequantize()[ids]  # (B, T, C)
    torch.testing.assert_close(embedding(ids), rows * 8.0)  # sqrt(hidden), as the float model does


@pytest.mark.parametrize("arch", ["gpt2", "phi3"])
def test_every_linear_matrix_gets_the_hessian_of_its_inputs(arch: str) -> None:
    model = _model(arch)
    matrices, ties = quant.find_matrices(model)
    hessians = quant.collect_hessians(model, [_ids()])
    assert set(hessians) == {n for n, m in matrices.items() if not isinstance(m, nn.Embedding)} | set(ties)
    shapes = quant.weight_matrices(model)
    assert all(hessians[n].shape == (shapes[n][1], shapes[n][1]) for n in shapes if n in hessians)


def test_plain_linears_decode_one_token_through_the_packed_kernel() -> None:
    model = _model("qwen2")  # attention biases (initialised to zero: drawn here) the kernel path adds
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    ref = copy.deepcopy(model)
    packed = quant.apply_policy(model, Policy.uniform(list(quant.weight_matrices(model)), QuantSetting("rtn", 4, 32)))
    with torch.no_grad():
        for name, p in packed.items():
            ref.get_submodule(name).weight.copy_(p.dequantize())
    linears = [m for m in model.modules() if isinstance(m, quant.QuantLinear)]
    assert linears and all(m._kernel is None for m in linears)
    one = _logits(model, _ids(1, 1))  # decode: one token
    assert all(m._kernel is not None for m in linears)
    expected = _logits(ref, _ids(1, 1))  # the int kernels run in bfloat16
    torch.testing.assert_close(one, expected, rtol=0, atol=3e-2 * float(expected.abs().max()))
