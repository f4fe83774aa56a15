"""The KV cache's sensitivity from one pass: the single-unit KL of every (key or value tensor, setting)
predicted without a forward per pair.

:mod:`evaluators.proxy` predicts a weight matrix's loss from the diagonal Fisher of the model's own
predictive distribution; here the "parameters" are the activations the cache stores: each attention
module's key tensor (after rotary, before grouped-query repeat) and value tensor, ``(B, kv_heads, T,
head_dim)``, as attention receives them (:func:`evaluators.kv_attention.captured_kv`). Quantizing one
of them replaces ``x`` by ``x_q`` (``quant.kv.quantize_kv``, what the cache reads back), and to second
order the KL to the float model is ``1/2 e^T F e`` with ``e = x_q - x`` and ``F`` the Fisher of that
window's activations. Unlike weights, ``x`` and ``F`` belong to a window, so the form is summed per
window (each window's own ``F`` with its own error), never with an ``F`` averaged over windows.

Per window: one forward, a next token drawn from the model's own distribution at every position, one
backward of that sample's negative log-likelihood to every key and value (the parameters need no
gradient); then quantizing each captured tensor at each setting. The sum is divided by the predicted
positions (``T - 1`` per window): the per-token KL the evaluator measures.

The diagonal of ``F`` treats every element's error as independent. One part of a cache's error is
not: its mean over the window's tokens (per head and channel), tiny (1e-4 of the error's energy
here) but the same in every token, so every position's output moves by it coherently, which the
diagonal misses (a value's error passes linearly through attention's weights; a common shift of the
keys changes nothing, softmax being shift-invariant, and its Fisher is 0 accordingly). So the form
is split: the diagonal over the error less its mean, plus the mean through the Fisher of shifting
every token alike, ``(sum_t g_t)^2``. Measured (``benchmarks/kv_proxy.py``, SmolLM2, 8 modules x 12
settings at 1,024 tokens, label seeds 0-2): Spearman against the measured KL 0.979-0.986 (values
0.957-0.971) with the split, 0.971-0.977 (values 0.926-0.942) with the plain diagonal, which puts
layer 0's values at 0.2-0.4x their measured KL; an orthonormal Haar basis over tokens (every scale's
mean) or full head-vector blocks did worse (0.90-0.98).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from evaluators.kv_attention import attention_modules, captured_kv
from evaluators.proxy import _check_float, _windows
from quant.kv import KV_ROLES, KVSetting, kv_unit, quantize_kv

__all__ = ["KVProxyTable", "kv_proxy_sensitivity"]


@dataclass
class KVProxyTable:
    """Predicted single-unit KL of every (key / value unit, setting).

    Attributes:
        settings: role (``"k"``, ``"v"``) -> the candidate settings predicted for it.
        kl: unit (:func:`quant.kv.kv_unit`: ``"model.layers.0.self_attn:kv_k"``) -> ``setting.key()``
            -> predicted KL per token (0 exactly for a float setting).
        seconds: all of it; ``seconds_fisher``: the forward and backward passes; ``seconds_quantize``:
            quantizing every captured tensor at every setting.
    """

    settings: dict[str, list[KVSetting]]
    kl: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    seconds_fisher: float = 0.0
    seconds_quantize: float = 0.0


def _check_settings(settings: Mapping[str, Sequence[KVSetting]]) -> dict[str, list[KVSetting]]:
    wrong = sorted(set(settings) - set(KV_ROLES))
    if wrong or not settings:
        raise ValueError(f"settings map a role ('k' keys, 'v' values) to candidate KVSettings, got roles "
                         f"{sorted(settings)}; e.g. {{'k': quant.kv.kv_settings('k'), 'v': quant.kv.kv_settings('v')}}")
    out = {role: list(ss) for role, ss in settings.items()}
    for role, ss in out.items():
        bad = [s for s in ss if not isinstance(s, KVSetting)]
        if bad:
            raise ValueError(f"settings[{role!r}] must hold quant.kv.KVSetting, got {bad[0]!r}")
        if role == "v" and any(s.qjl for s in ss):
            raise ValueError("qjl is for keys only: drop the qjl settings from settings['v']")
    return out


def kv_proxy_sensitivity(model: nn.Module, tokens: np.ndarray | torch.Tensor,
                         settings: Mapping[str, Sequence[KVSetting]], *, seed: int = 0,
                         common_mode: bool = True) -> KVProxyTable:
    """The predicted single-unit KL ``1/2 e^T F e`` per token (``e = x_q - x``) of every attention
    module's keys and values at every candidate setting (see the module docstring).

    Args:
        model: the float model (no quantized weights, no KV settings installed), called as
            ``model(input_ids=..., use_cache=False)``.
        tokens: ``(B, T)`` calibration windows (``TokenSets.calib``; the evaluation windows when there
            are none). ``rtn_channel`` quantizes whole groups of tokens, so windows as long as the
            evaluation's predict what it measures.
        settings: ``{"k": [...], "v": [...]}`` (either role alone is fine).
        seed: seeds the label draws (on the CPU, so the same on any device).
        common_mode: count the error's mean over tokens through the Fisher of a common shift (the
            default); ``False``: the plain diagonal ``1/2 sum F_ii e_i^2``, for comparison.

    Returns:
        A :class:`KVProxyTable` with a row for every attention module and role in ``settings``.

    Raises:
        ValueError: quantized weights, bad windows, or settings that are not ``{role: [KVSetting]}``.
        RuntimeError: KV settings installed on the model (``evaluators.kv_attention.remove_kv`` first).
    """
    t0 = time.perf_counter()
    _check_float(model)
    settings = _check_settings(settings)
    ids = _windows(tokens)
    modules = list(attention_modules(model))
    sums = {(m, role): {s.key(): 0.0 for s in settings[role]} for m in modules for role in settings}
    grad_state = {p: p.requires_grad for p in model.parameters()}
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    positions, seconds_fisher, seconds_quantize = 0, 0.0, 0.0
    try:
        for p in model.parameters():  # gradients with respect to the activations only
            p.requires_grad_(False)
        for window in ids.split(1):  # one window per backward, as evaluators.proxy
            t1 = time.perf_counter()
            with torch.enable_grad(), captured_kv(model, grad=True) as seen:
                logits = model(input_ids=window.to(device), use_cache=False).logits[:, :-1].float()  # (1, T-1, V)
                logprobs = torch.log_softmax(logits, dim=-1).reshape(-1, logits.shape[-1])
                with torch.no_grad():
                    labels = torch.multinomial(logprobs.exp().cpu(), 1, generator=generator).to(device)  # (T-1, 1)
                nll = -logprobs.gather(1, labels).sum()
                probes = [getattr(seen[m], f"{'key' if role == 'k' else 'value'}_probe") for m, role in sums]
                grads = torch.autograd.grad(nll, probes)
            del logits, logprobs, nll, probes
            t2 = time.perf_counter()
            with torch.no_grad():
                for (m, role), g in zip(sums, grads):
                    x = seen[m].key if role == "k" else seen[m].value  # (1, kv_heads, T, head_dim)
                    g = g.float()
                    fisher = g.square()
                    shift = g.sum(2, keepdim=True).square()  # (1, kv_heads, 1, head_dim): every token moved alike
                    for s in settings[role]:
                        if not s.is_float:
                            err = quantize_kv(x, s).float() - x.float()
                            form = 0.0
                            if common_mode:
                                mean = err.mean(2, keepdim=True)  # (1, kv_heads, 1, head_dim)
                                err = err - mean
                                form = float((shift * mean.square()).sum())
                            sums[m, role][s.key()] += 0.5 * (form + float((fisher * err.square()).sum()))
            del grads, seen
            positions += labels.numel()
            seconds_fisher += t2 - t1
            seconds_quantize += time.perf_counter() - t2
    finally:
        for p, state in grad_state.items():
            p.requires_grad_(state)
    table = KVProxyTable(settings, seconds_fisher=seconds_fisher, seconds_quantize=seconds_quantize)
    for (m, role), row in sums.items():
        table.kl[kv_unit(m, role)] = {k: v / positions for k, v in row.items()}
    table.seconds = time.perf_counter() - t0
    return table
