"""The Fisher sensitivity proxy: zero where quantization is lossless, growing as settings coarsen,
ranking matrices as the measured single-matrix KL does, and counting both uses of a tied embedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import quant
from evaluators.kv_attention import attention_modules
from evaluators.proxy import fisher_diagonal, proxy_sensitivity
from quant.kv import KVSetting

SETTINGS = [quant.QuantSetting("rtn", b, g) for b in (2, 3, 4) for g in (32, 64)]


@pytest.fixture
def float_evaluator(evaluator):
    evaluator.restore_float()  # other tests leave the shared model quantized
    yield evaluator
    evaluator.restore_float()


def test_table_has_every_pair_with_the_exact_packed_bytes(float_evaluator) -> None:
    ev = float_evaluator
    units = {"attn0": [m for m in ev.matrices if "layers.0.self_attn" in m], "embed": ["model.embed_tokens"]}
    table = proxy_sensitivity(ev.model, ev.tokens.calib, SETTINGS, units=units)
    assert set(table.kl) == set(table.nbytes) == set(units)
    for unit, members in units.items():
        assert set(table.kl[unit]) == {s.key() for s in SETTINGS}
        for s in SETTINGS:
            fmt = quant.get_format(s.format)
            assert table.nbytes[unit][s.key()] == sum(fmt.expected_nbytes(ev.matrices[m], s) for m in members)
    assert table.seconds >= table.seconds_fisher + table.seconds_quantize - 1e-6


def test_zero_for_weights_the_setting_reproduces(float_evaluator) -> None:
    # Weights already on rtn 4-bit g32's grid (as SmolLM2's dequantized Q4_1 weights are on Q4_1's)
    # come back unchanged from that setting: no error, no predicted loss. A coarser grid still costs.
    ev = float_evaluator
    name = "model.layers.1.mlp.down_proj"
    weight = ev.model.get_submodule(name).weight
    saved = weight.detach().clone()
    on_grid = quant.QuantSetting("rtn", 4, 32)
    try:
        with torch.no_grad():
            weight.copy_(quant.quantize(saved, on_grid).dequantize())
        table = proxy_sensitivity(ev.model, ev.tokens.calib, [on_grid, quant.QuantSetting("rtn", 2, 32)],
                                  units={name: [name]})
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    lossy = table.kl[name][quant.QuantSetting("rtn", 2, 32).key()]
    assert lossy > 0
    assert table.kl[name][on_grid.key()] <= 1e-9 * lossy


def test_coarser_settings_predict_more_loss_for_every_matrix(float_evaluator) -> None:
    ev = float_evaluator
    ladder = [quant.QuantSetting("rtn", b, 32) for b in (2, 4, 8)]
    table = proxy_sensitivity(ev.model, ev.tokens.calib, ladder)
    for unit in table.units:
        kl2, kl4, kl8 = (table.kl[unit][s.key()] for s in ladder)
        assert kl2 > kl4 > kl8 > 0, unit


def test_ranking_follows_measured_single_matrix_kl(float_evaluator) -> None:
    ev = float_evaluator
    names = list(ev.matrices)
    measured = np.array([[ev.evaluate_partial({m: s})["kl"] for s in SETTINGS] for m in names])
    ev.restore_float()
    table = proxy_sensitivity(ev.model, ev.tokens.calib, SETTINGS)
    predicted = np.array([[table.kl[m][s.key()] for s in SETTINGS] for m in names])
    # Measured on this model over Fisher seeds 0-5: overall 0.992-0.995, per-format minimum 0.932-0.944.
    assert spearmanr(predicted.ravel(), measured.ravel())[0] >= 0.95
    per_format = [spearmanr(predicted[:, j], measured[:, j])[0] for j in range(len(SETTINGS))]
    assert min(per_format) >= 0.85
    # A second-order prediction: the right magnitude, not just the right order (median ratio 1.1-1.8 here).
    assert 0.5 <= float(np.median(predicted / measured)) <= 3.0


def _tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, initializer_range=0.3,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float().eval()


def test_tied_embedding_counts_the_lookup_and_the_head() -> None:
    model = _tied_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert list(quant.weight_matrices(model))[0] == "model.embed_tokens"
    ids = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(1))  # rows 40-63 never looked up
    fisher = fisher_diagonal(model, ids, ["model.embed_tokens"], seed=3)["model.embed_tokens"]
    # The same sampled labels, by the same draw; the lookup's and the head's gradients taken apart.
    weight = model.model.embed_tokens.weight
    generator = torch.Generator().manual_seed(3)
    lookup_sq, head_sq, both_sq = torch.zeros_like(weight), torch.zeros_like(weight), torch.zeros_like(weight)
    for window in ids.split(1):
        hidden = model.model(input_ids=window, use_cache=False).last_hidden_state  # (1, T, H)
        logprobs = torch.log_softmax(hidden[:, :-1] @ weight.T, dim=-1).reshape(-1, weight.shape[0])
        labels = torch.multinomial(logprobs.detach().exp(), 1, generator=generator)
        nll = -logprobs.gather(1, labels).sum()
        g_both, = torch.autograd.grad(nll, weight)
        both_sq += g_both.square()
        # The head's share: the gradient through the LM head alone (the lookup detached).
        hidden_d = hidden.detach()
        lp_head = torch.log_softmax(hidden_d[:, :-1] @ weight.T, dim=-1).reshape(-1, weight.shape[0])
        g_head, = torch.autograd.grad(-lp_head.gather(1, labels).sum(), weight)
        head_sq += g_head.square()
        lookup_sq += (g_both - g_head).square()
    positions = ids.shape[0] * (ids.shape[1] - 1)
    torch.testing.assert_close(fisher, both_sq / positions, rtol=1e-4, atol=1e-10)
    # Both uses matter: the head alone or the lookup alone would give another Fisher.
    assert not torch.allclose(fisher, head_sq / positions, rtol=1e-2)
    assert lookup_sq[:40].sum() > 0 and lookup_sq[40:].sum() == 0  # the lookup touches only rows it read
    assert fisher[40:].sum() > 0  # ... and the head every row


def test_refuses_a_quantized_model_and_gptq_without_hessians(float_evaluator) -> None:
    ev = float_evaluator
    with pytest.raises(ValueError, match="Hessians"):
        proxy_sensitivity(ev.model, ev.tokens.calib, [quant.QuantSetting("gptq", 4, 32)])
    # No calibration data (--calib-seqs 0): gptq runs as rtn, and so does its prediction.
    units = {"mlp0": [m for m in ev.matrices if "layers.0.mlp" in m]}
    free = proxy_sensitivity(ev.model, ev.tokens.eval, [quant.QuantSetting("gptq", 2, 32)], units=units, hessians={})
    rtn = proxy_sensitivity(ev.model, ev.tokens.eval, [quant.QuantSetting("rtn", 2, 32)], units=units)
    assert list(free.kl["mlp0"].values()) == list(rtn.kl["mlp0"].values())
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        proxy_sensitivity(ev.model, ev.tokens.calib[:0], SETTINGS)
    ev.evaluate_partial({"model.layers.0.mlp.up_proj": SETTINGS[0]})
    with pytest.raises(ValueError, match="restore_float"):
        proxy_sensitivity(ev.model, ev.tokens.calib, SETTINGS)
    # A quantized KV cache (left by an evaluation) cuts the gradient to the key and value projections.
    kv = {m: (KVSetting("turbo", 2), KVSetting("turbo", 2)) for m in attention_modules(ev.model)}
    ev.restore_float()
    ev.evaluate_partial({}, kv=kv)
    with pytest.raises(ValueError, match="KV cache settings are installed"):
        proxy_sensitivity(ev.model, ev.tokens.calib, SETTINGS)
    ev.restore_float()  # the weights and the cache back to float
    assert proxy_sensitivity(ev.model, ev.tokens.calib, SETTINGS[:1]).kl


def _gpt2_pair():
    """A tiny GPT-2 (``Conv1D`` layers, weights stored ``(in, out)``) and the same model with each ``Conv1D``
    replaced by an ``nn.Linear`` holding the transposed weight: one function, two layouts."""
    import copy

    from transformers.pytorch_utils import Conv1D

    from tests.test_architectures import _model

    gpt2 = _model("gpt2")
    linear = copy.deepcopy(gpt2)
    swapped = 0
    for name, module in list(linear.named_modules()):
        if isinstance(module, Conv1D):
            parent, _, child = name.rpartition(".")
            n_in, n_out = module.weight.shape
            layer = torch.nn.Linear(n_in, n_out)
            with torch.no_grad():
                layer.weight.copy_(module.weight.t())
                layer.bias.copy_(module.bias)
            setattr(linear.get_submodule(parent), child, layer)
            swapped += 1
    assert swapped == 8  # c_attn, c_proj, c_fc and mlp.c_proj in each of the two blocks
    return gpt2, linear


def test_conv1d_layers_get_the_fisher_and_prediction_of_the_same_linear_layers() -> None:
    # The proxy's Fisher and its error are taken in (out, in) for every layer: a transposed Conv1D must
    # give what an nn.Linear of the same matrix gives (groups run along the input, as quantize expects).
    gpt2, linear = _gpt2_pair()
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(gpt2(input_ids=ids).logits, linear(input_ids=ids).logits)
    shapes = quant.weight_matrices(gpt2)
    assert shapes == quant.weight_matrices(linear)
    assert shapes["transformer.h.0.attn.c_attn"] == (192, 64)  # a Conv1D stored (64, 192)
    fisher_c, fisher_l = fisher_diagonal(gpt2, ids, seed=2), fisher_diagonal(linear, ids, seed=2)
    for name, shape in shapes.items():
        assert tuple(fisher_c[name].shape) == shape, name
        torch.testing.assert_close(fisher_c[name], fisher_l[name], rtol=1e-4, atol=1e-12)
    settings = [quant.QuantSetting("rtn", 2, 32), quant.QuantSetting("rtn", 3, 64), quant.QuantSetting("rtn", 4, None)]
    table_c = proxy_sensitivity(gpt2, ids, settings, seed=2)
    table_l = proxy_sensitivity(linear, ids, settings, seed=2)
    conv = [n for n in shapes if ".attn." in n or ".mlp." in n]
    for name in conv:
        for s in settings:
            assert table_c.nbytes[name][s.key()] == table_l.nbytes[name][s.key()]
            assert table_c.kl[name][s.key()] == pytest.approx(table_l.kl[name][s.key()], rel=1e-4), (name, s.key())
    # The prediction for the quantization the search applies: quant.quantize of the (out, in) weight.
    name, s = "transformer.h.1.mlp.c_proj", settings[0]  # stored (256, 64): groups of 32 along its 256 inputs
    w = quant.float_weights(gpt2)[name]
    err = quant.quantize(w, s).dequantize() - w
    assert table_c.kl[name][s.key()] == pytest.approx(0.5 * float((fisher_c[name] * err.square()).sum()), rel=1e-5)


def test_correlation_factor_is_the_full_over_the_diagonal_hessian_form() -> None:
    from evaluators.proxy import _correlation

    err = torch.tensor([[1.0, -1.0], [1.0, 1.0], [2.0, 0.0]])
    assert torch.allclose(_correlation(err, torch.eye(2)), torch.ones(3))
    # Inputs that always move together (H = v v^T, v = (1, 1)): an error against them costs nothing,
    # one along them twice its diagonal form, one on a single weight exactly its diagonal form.
    assert torch.allclose(_correlation(err, torch.ones(2, 2)), torch.tensor([0.0, 2.0, 1.0]))


def test_correlations_rescale_only_error_feedback_formats(float_evaluator) -> None:
    ev = float_evaluator
    ev.calibrate([quant.QuantSetting("gptq", 2, 32)])
    units = {"mlp0": [m for m in ev.matrices if "layers.0.mlp" in m]}
    gptq = quant.QuantSetting("gptq", 2, 32)
    settings = [quant.QuantSetting("rtn", 2, 32), gptq]
    with_h = proxy_sensitivity(ev.model, ev.tokens.calib, settings, units=units, hessians=ev.hessians)
    plain = proxy_sensitivity(ev.model, ev.tokens.calib, SETTINGS[:1], units=units)
    assert with_h.kl["mlp0"][settings[0].key()] == plain.kl["mlp0"][settings[0].key()]  # data-free: diagonal
    # gptq's error follows the inputs' correlations: its full Hessian form is below the diagonal one.
    weights = quant.float_weights(ev.model)
    fisher = fisher_diagonal(ev.model, ev.tokens.calib, units["mlp0"])
    diagonal = sum(0.5 * float((fisher[m] * (quant.quantize_calibrated(m, weights[m], gptq, ev.hessians).dequantize()
                                              - weights[m]).square()).sum()) for m in units["mlp0"])
    assert with_h.kl["mlp0"][gptq.key()] < diagonal
