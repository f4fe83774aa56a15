"""The driver's memory by phase: estimates from shapes, refusal before a phase that cannot fit, and the
leaner proxy (Hessians by groups, in files, the Fisher without every gradient at once) giving the same numbers."""

from __future__ import annotations

import logging

import pytest
import torch

import quant
from evaluators import UserError
from evaluators.proxy import hessian_groups, proxy_sensitivity
from search.memory import ModelSize, Phases, proxy_bytes

GB = 10 ** 9
# Qwen2.5-Coder-1.5B's shapes (28 layers, hidden 1536, FFN 8960, 2 KV heads of 128, vocab 151,936, untied).
QWEN = {"model.embed_tokens": (151936, 1536), "lm_head": (151936, 1536)}
for _i in range(28):
    QWEN |= {f"model.layers.{_i}.self_attn.q_proj": (1536, 1536), f"model.layers.{_i}.self_attn.k_proj": (256, 1536),
             f"model.layers.{_i}.self_attn.v_proj": (256, 1536), f"model.layers.{_i}.self_attn.o_proj": (1536, 1536),
             f"model.layers.{_i}.mlp.gate_proj": (8960, 1536), f"model.layers.{_i}.mlp.up_proj": (8960, 1536),
             f"model.layers.{_i}.mlp.down_proj": (1536, 8960)}


def _qwen_size(element: int = 4) -> ModelSize:
    fed = {n: s for n, s in QWEN.items() if n != "model.embed_tokens"}
    hess = [4 * s[1] ** 2 for s in fed.values()]
    numel = sum(o * i for o, i in QWEN.values())
    return ModelSize(param_bytes=element * (numel + 28 * 3 * 1536), matrix_numel=numel, largest_matrix=151936 * 1536,
                     hessian_bytes=sum(hess), largest_hessian=max(hess), activations=sum(o + i for o, i in fed.values()),
                     vocab=151936, element=element)


def test_qwen_sizes_are_the_issues_figures():
    size = _qwen_size()
    assert 7.0 * GB < size.param_bytes < 7.2 * GB  # the float32 folder: 7.1 GB
    assert size.largest_hessian == 4 * 8960 ** 2  # a down_proj's: 321 MB
    assert 10.5 * GB < size.hessian_bytes < 10.7 * GB  # the 28 down_proj alone are 9 GB
    fisher, pairs, largest = proxy_bytes(size, 256, gptq_bits=4)
    assert pairs == 4 * size.matrix_numel  # the Fisher: float32, one per weight (7.1 GB)
    assert pairs + GB < fisher < pairs + 3 * GB  # and one window's backward (its logits: 152k words)
    assert 8 * GB < largest < 9 * GB  # the head at 4 stacked bit-widths, quantized last


def test_hessian_groups_cut_in_order_under_the_budget():
    names = [n for n in QWEN if n != "model.embed_tokens"][:14]  # two layers
    groups = hessian_groups(QWEN, names, 300 * 2 ** 20)
    assert [m for g in groups for m in g] == names  # in order, every matrix once
    for g in groups:
        assert len(g) == 1 or sum(4 * QWEN[m][1] ** 2 for m in g) <= 300 * 2 ** 20
    assert ["model.layers.0.mlp.down_proj"] in groups  # larger than the budget: alone
    assert hessian_groups(QWEN, names, None) == [names]


def test_a_phase_that_cannot_fit_is_refused_before_it_starts_saying_the_numbers(caplog):
    phases = Phases(limit=2 * GB)
    with caplog.at_level(logging.INFO, logger="search.driver"):
        with pytest.raises(UserError, match=r"phase sensitivity proxy .* needs about 30\.0 GiB.*--dtype bfloat16"):
            phases.start("sensitivity proxy", 30 * 2 ** 30, "the Fisher", "use --dtype bfloat16")
    assert "phase sensitivity proxy: the Fisher; driver about 30.0 GiB" in caplog.text
    phases.start("seeds", 0, "nothing")  # what it holds already fits
    phases.end()
    estimate, peak, seconds = phases.peaks["seeds"]
    assert estimate == 0 and peak > 0 and seconds >= 0


@pytest.fixture(scope="module")
def tiny():
    from evaluators import load_model

    loaded = load_model("tiny-random-llama")
    calib = torch.randint(0, 256, (3, 33), generator=torch.Generator().manual_seed(1))
    return loaded.model, calib


def test_proxy_with_hessians_by_groups_is_bit_for_bit_the_proxy_with_all(tiny):
    from evaluators.evaluator import calibration_hessians
    from evaluators.data import TokenSets

    model, calib = tiny
    tokens = TokenSets(eval=calib.numpy()[:1], calib=calib.numpy(), fingerprint="t")
    settings = [quant.QuantSetting("gptq", b, 32, {"act_order": True, "clip": True}) for b in (2, 3)] + [
        quant.QuantSetting("rtn", 3, 32)]
    names = list(quant.weight_matrices(model))
    everything = calibration_hessians(model, tokens, names)
    whole = proxy_sensitivity(model, calib, settings, hessians=everything)
    calls = []

    def by_group(group):
        calls.append(list(group))
        return calibration_hessians(model, tokens, group)

    grouped = proxy_sensitivity(model, calib, settings, hessians=by_group, hessian_bytes=4 * 128 ** 2)
    assert len(calls) > 3  # several calibration passes
    assert grouped.kl == whole.kl and grouped.nbytes == whole.nbytes


def test_hessians_in_files_are_the_same_values(tiny, tmp_path):
    from evaluators.data import TokenSets
    from evaluators.evaluator import calibration_hessians

    model, calib = tiny
    tokens = TokenSets(eval=calib.numpy()[:1], calib=calib.numpy(), fingerprint="t")
    names = list(quant.weight_matrices(model))
    memory = calibration_hessians(model, tokens, names)
    files = calibration_hessians(model, tokens, names, max_bytes=4 * 64 ** 2, spill_to=tmp_path)
    assert memory.keys() == files.keys()
    for n in memory:
        assert torch.equal(memory[n], files[n]) and files[n].dtype == torch.float32
    assert not list(tmp_path.iterdir())  # unlinked at once: the mappings hold the data
    with torch.inference_mode():
        files[names[1]].add_(1.0)  # copy-on-write: writable, private
    assert not torch.equal(memory[names[1]], files[names[1]])


def test_fisher_holds_no_gradient_after_and_keeps_the_models_grad_state(tiny):
    from evaluators.proxy import fisher_diagonal

    model, calib = tiny
    first = next(model.parameters())
    state = [p.requires_grad for p in model.parameters()]
    first.grad = torch.ones_like(first)
    try:
        f = fisher_diagonal(model, calib[:2])
    finally:
        kept, first.grad = first.grad, None
    assert torch.equal(kept, torch.ones_like(first))  # the caller's gradient is put back untouched
    assert all(p.grad is None for p in list(model.parameters())[1:])
    assert [p.requires_grad for p in model.parameters()] == state
    assert set(f) == set(quant.weight_matrices(model)) and all(v.min() >= 0 for v in f.values())
