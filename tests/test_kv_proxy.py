"""The KV cache's one-pass proxy: the capture changes nothing and gives the keys' and values' true
gradients; the predictions are zero for a float cache, grow as bits fall, and follow the measured
single-unit KL in rank and in size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import quant
from evaluators import kv_attention
from evaluators.kv_attention import attention_modules, captured_kv, kv_installed, remove_kv
from evaluators.kv_proxy import kv_proxy_sensitivity
from quant import KVSetting, QuantSetting
from quant.kv import FLOAT_KV, kv_settings, kv_unit
from tests.test_architectures import _ids, _logits, _model

BITS = (2, 3, 4, 8)
# The tiny models' windows are shorter than rtn_channel's default group of 128 tokens (nothing quantized).
SETTINGS = {"k": [s for s in kv_settings("k") if s.format != "rtn_channel"]
            + [KVSetting("rtn_channel", b, group=32) for b in BITS], "v": kv_settings("v")}


@pytest.fixture
def float_evaluator(evaluator):
    evaluator.restore_float()  # other tests leave the shared model quantized, or its cache
    remove_kv(evaluator.model)
    yield evaluator
    evaluator.restore_float()


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2", "gpt2"])
def test_the_capture_leaves_logits_bit_for_bit_and_records_what_the_cache_holds(arch: str) -> None:
    model, ids = _model(arch), _ids(n=2, length=20)
    reference = _logits(model, ids)
    infos = attention_modules(model)
    with captured_kv(model) as seen:
        assert torch.equal(_logits(model, ids), reference)
    with torch.enable_grad(), captured_kv(model, grad=True) as probed:
        logits = model(input_ids=ids, use_cache=False).logits
        assert torch.equal(logits.detach(), reference) and logits.requires_grad
    assert set(seen) == set(probed) == set(infos)
    for name, info in infos.items():
        assert seen[name].key.shape == seen[name].value.shape == (2, info.kv_heads, 20, info.head_dim)
        assert seen[name].key_probe is None and probed[name].key_probe.shape == seen[name].key.shape
        assert torch.equal(seen[name].key, probed[name].key)
    assert model.config._attn_implementation == "sdpa" and kv_attention._capture is None  # inactive again
    with kv_installed(model, {next(iter(infos)): (KVSetting("turbo", 4), FLOAT_KV)}):
        with pytest.raises(RuntimeError, match="remove_kv"):
            with captured_kv(model):
                pass


def test_a_probes_gradient_is_the_total_derivative_through_every_later_layer(monkeypatch) -> None:
    model, ids = _model("llama").double(), _ids(n=1, length=16)
    weights = torch.randn(1, 16, model.config.vocab_size, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(0))

    def loss() -> torch.Tensor:
        return (model(input_ids=ids, use_cache=False).logits * weights).sum()

    name = "model.layers.0.self_attn"  # its keys and values also reach layer 1 through the residual stream
    with torch.enable_grad(), captured_kv(model, grad=True) as seen:
        grads = torch.autograd.grad(loss(), [seen[name].key_probe, seen[name].value_probe])
    # A common shift of every key moves no softmax: the keys' gradients sum to zero over tokens.
    assert grads[0].sum(2).abs().max() < 1e-9 * grads[0].abs().max()
    eps = 1e-3  # central differences: the norms compute in float32 even in a float64 model
    for role, g in zip("kv", grads):
        direction = torch.randn(g.shape, dtype=g.dtype, generator=torch.Generator().manual_seed(1))
        moved = []
        for step in (eps, -eps):
            # The hook's quantizer turned into "add step * direction" to this module's keys (or values) only.
            monkeypatch.setattr(kv_attention, "quantize_kv", lambda x, s, r=role, step=step:
                                x + step * direction if (s.format == "turbo") == (r == "k") else x)
            with kv_installed(model, {name: (KVSetting("turbo", 4), KVSetting("rtn_token", 4))}), torch.inference_mode():
                moved.append(loss())
        assert float((moved[0] - moved[1]) / (2 * eps)) == pytest.approx(float((g * direction).sum()), rel=1e-3)


def test_float_is_zero_and_every_format_predicts_more_loss_as_bits_fall(float_evaluator) -> None:
    ev = float_evaluator
    before = [p.requires_grad for p in ev.model.parameters()]
    table = kv_proxy_sensitivity(ev.model, ev.tokens.calib, SETTINGS)
    assert [p.requires_grad for p in ev.model.parameters()] == before  # the pass needs no parameter's gradient
    modules = attention_modules(ev.model)
    assert set(table.kl) == {kv_unit(m, role) for m in modules for role in "kv"}
    assert table.settings == SETTINGS and table.seconds >= table.seconds_fisher + table.seconds_quantize - 1e-6
    for unit, row in table.kl.items():
        role = unit[-1]
        assert set(row) == {s.key() for s in SETTINGS[role]}
        assert row[FLOAT_KV.key()] == 0.0
        for fmt, qjl in {(s.format, s.qjl) for s in SETTINGS[role] if not s.is_float}:
            ladder = [row[s.key()] for b in BITS for s in SETTINGS[role] if (s.format, s.qjl, s.bits) == (fmt, qjl, b)]
            assert ladder == sorted(ladder, reverse=True) and ladder[-1] > 0, (unit, fmt, qjl, ladder)
            assert len(set(ladder)) == len(BITS)


def test_predictions_follow_the_measured_single_unit_kl(float_evaluator) -> None:
    ev = float_evaluator
    pairs = [(m, role, s) for m in attention_modules(ev.model) for role in "kv" for s in SETTINGS[role]
             if not s.is_float]
    measured = np.array([ev.evaluate_partial({}, kv={m: (s, FLOAT_KV) if role == "k" else (FLOAT_KV, s)})["kl"]
                         for m, role, s in pairs])
    remove_kv(ev.model)
    table = kv_proxy_sensitivity(ev.model, ev.tokens.calib, SETTINGS)
    predicted = np.array([table.kl[kv_unit(m, role)][s.key()] for m, role, s in pairs])
    # Measured on this model over label seeds 0-5: Spearman 0.996-0.998 over the 68 pairs.
    assert spearmanr(predicted, measured)[0] >= 0.98
    # A second-order prediction: right in size where the error is small. 4 and 8 bits: each pair's
    # predicted / measured 0.65-2.97, their median 1.02-1.22 (seeds 0-5); 2 bits overshoot up to 11x
    # on this random model, whose keys' KL saturates.
    ratio = (predicted / measured)[np.array([s.bits in (4, 8) for _, _, s in pairs])]
    assert 0.5 <= ratio.min() and ratio.max() <= 4.0
    assert 0.8 <= float(np.median(ratio)) <= 1.5


def test_the_proxy_refuses_what_it_cannot_predict(float_evaluator) -> None:
    ev = float_evaluator
    with pytest.raises(ValueError, match="role"):
        kv_proxy_sensitivity(ev.model, ev.tokens.calib, {"keys": kv_settings("k")})
    with pytest.raises(ValueError, match="qjl is for keys only"):
        kv_proxy_sensitivity(ev.model, ev.tokens.calib, {"v": [KVSetting("turbo", 3, qjl=True)]})
    with pytest.raises(ValueError, match="integer token windows"):
        kv_proxy_sensitivity(ev.model, ev.tokens.calib[:, :1], SETTINGS)
    model = _model("llama")
    quant.apply_policy(model, quant.Policy({n: QuantSetting("rtn", 8, None) for n in quant.weight_matrices(model)}))
    with pytest.raises(ValueError, match="needs the float model"):
        kv_proxy_sensitivity(model, _ids(), SETTINGS)
