"""Sensitivity from one pass: the single-unit KL of every (unit, setting) predicted without a forward per pair.

Near the float weights ``w`` the KL from the float model to a perturbed one is, to second order,
``1/2 (w_q - w)^T F (w_q - w)`` with ``F`` the Fisher information of the model's own predictive
distribution (the KL's Hessian at ``w``). Keeping the diagonal of ``F`` (ModelOpt's AutoQuantize score)
makes the prediction for a unit ``1/2 sum_i F_ii (w_q,i - w_i)^2`` over its matrices: ``F`` costs one
forward and backward per calibration window, after which a pair costs only quantizing its matrices.

Chosen by measurement (``benchmarks/sensitivity_proxy.py``, SmolLM2, 61 blocks x rtn 2-4 bits x groups
32-128 against the measured table): Spearman per format 0.93-0.96 with labels drawn from the model, 0.85-0.89
with the text's own next tokens (the empirical Fisher), 0.83-0.90 for HIGGS's ``alpha_u * relative MSE``
(one noise-injection forward per unit) and 0.87-0.91 for the Fisher rescaled per unit by such a forward;
the weights' error alone (plain or relative MSE) does not rank units at all (-0.36 to 0.28).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence, Union

import numpy as np
import torch
from torch import nn

import quant
from evaluators.kv_attention import has_kv
from quant.modules import as_matrix

__all__ = ["HessianSource", "ProxyTable", "fisher_diagonal", "hessian_groups", "proxy_sensitivity"]

# Input Hessians for the calibrated formats: all of them, or a function that collects those of the
# matrices it is given (one calibration pass per call), so that only a group is held at a time.
HessianSource = Union[Mapping[str, torch.Tensor], Callable[[Sequence[str]], Mapping[str, torch.Tensor]]]


@dataclass
class ProxyTable:
    """Predicted KL and packed bytes of every (unit, setting): the fields of ``search``'s ``SensitivityTable``."""

    units: dict[str, list[str]]  # unit name -> its matrices
    settings: list[quant.QuantSetting]
    kl: dict[str, dict[str, float]] = field(default_factory=dict)  # unit -> setting key -> predicted KL
    nbytes: dict[str, dict[str, int]] = field(default_factory=dict)  # unit -> setting key -> bytes
    seconds: float = 0.0  # all of it
    seconds_fisher: float = 0.0  # the forward and backward passes
    seconds_quantize: float = 0.0  # quantizing every matrix at every setting


def _windows(tokens: np.ndarray | torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(tokens)
    if ids.dim() != 2 or ids.shape[1] < 2 or len(ids) == 0 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"the proxy needs integer token windows (B, T) with B >= 1 and T >= 2, got "
                         f"{tuple(ids.shape)} {ids.dtype}; pass TokenSets.calib (check --calib-seqs > 0)")
    return ids.long()


def _check_float(model: nn.Module) -> None:
    quantized = [n for n, m in model.named_modules() if isinstance(m, quant.PackedModule)]
    if quantized:
        raise ValueError(f"the proxy needs the float model, but {len(quantized)} modules are quantized "
                         f"(e.g. {quantized[0]}); call Evaluator.restore_float() first")
    if has_kv(model):  # a quantized cache cuts the gradient to the key and value projections
        raise ValueError("the proxy needs the float model, but KV cache settings are installed; call "
                         "Evaluator.restore_float() (or evaluators.kv_attention.remove_kv) first")


def fisher_diagonal(model: nn.Module, tokens: np.ndarray | torch.Tensor, names: Iterable[str] | None = None,
                    *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Diagonal Fisher ``F_ii`` per predicted token of the weight matrices ``names`` (default: all of them).

    Per window: one forward, a next token drawn from the model's own distribution at every position,
    one backward of that sample's negative log-likelihood. The squared gradient estimates the Fisher
    summed over the window's positions (a sampled label's gradient has mean zero, so the positions'
    cross terms vanish on average); dividing by the positions gives the per-token Fisher whose quadratic
    form predicts the per-token KL the evaluator measures. Drawing labels (not the text's next tokens,
    the "empirical" Fisher) is what makes it the KL's Hessian. A tied embedding's gradient sums both of
    its uses (lookup and LM head), because autograd accumulates every use of the one parameter. The
    Fisher is laid out as :func:`quant.float_weights` lays out the weight, ``(out, in)``, whatever the
    module stores (GPT-2's ``Conv1D`` keeps ``(in, out)``).

    Args:
        model: the float model, called as ``model(input_ids=..., use_cache=False)``.
        tokens: ``(B, T)`` calibration windows (disjoint from the evaluation windows).
        names: weight matrices (module names as in :func:`quant.weight_matrices`).
        seed: seeds the label draws.

    Returns:
        ``(out, in)`` float32 tensors by name.
    """
    _check_float(model)
    ids = _windows(tokens)
    modules = dict(model.named_modules())
    names = list(quant.weight_matrices(model) if names is None else names)
    params = {n: modules[n].weight for n in names}
    grad_state = {p: (p.requires_grad, p.grad) for p in model.parameters()}
    fisher = {n: torch.zeros_like(as_matrix(modules[n], p), dtype=torch.float32) for n, p in params.items()}
    # Labels are drawn on the CPU whatever the model's device: the same draws, so the same Fisher, on a GPU.
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    positions = 0

    # Each gradient is squared into its accumulator as soon as backward has it whole, and freed: the
    # gradients of all matrices never exist at once (as many bytes as the model, 7 GB on a 1.5B model).
    # A parameter several names share (a tied head) is accumulated once per name, as before.
    owners: dict[nn.Parameter, list[str]] = {}
    for n, p in params.items():
        owners.setdefault(p, []).append(n)

    def accumulate(p: torch.Tensor) -> None:
        for n in owners[p]:
            g = as_matrix(modules[n], p.grad).float()  # the parameter's layout -> (out, in)
            fisher[n].addcmul_(g, g)
        p.grad = None

    handles = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for p in owners:
            p.requires_grad_(True)
            handles.append(p.register_post_accumulate_grad_hook(accumulate))
        with torch.enable_grad():
            # One window per backward: more (and smaller) squared gradients average out more noise
            # for the same compute.
            for window in ids.split(1):
                logits = model(input_ids=window.to(device), use_cache=False).logits[:, :-1].float()  # (1, T-1, V)
                logprobs = torch.log_softmax(logits, dim=-1)
                with torch.no_grad():
                    labels = torch.multinomial(logprobs.exp().reshape(-1, logprobs.shape[-1]).cpu(), 1,
                                               generator=generator).to(device)  # (T-1, 1)
                nll = -logprobs.reshape(-1, logprobs.shape[-1]).gather(1, labels).sum()
                del logits, logprobs
                nll.backward()
                positions += labels.numel()
    finally:
        for h in handles:
            h.remove()
        for p, (state, grad) in grad_state.items():
            p.requires_grad_(state)
            p.grad = grad
    for f in fisher.values():
        f.div_(positions)
    return fisher


def _correlation(err: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per output row, ``e H e^T / sum_i H_ii e_i^2``: how much the inputs' correlations change the row's error.

    The diagonal Fisher treats every weight's error as independent of the others'. That holds for a
    data-free quantizer, whose rounding errors do not follow the data; a calibrated one (gptq's error
    feedback) makes its errors cancel along the calibration inputs' correlations, so the full quadratic
    form of the input Hessian ``H`` is far below its diagonal and the diagonal overestimates its loss
    (SmolLM2, gptq+act_order+clip 2-3 bits g64: 3.8-4.1x the measured single-unit KL, rank correlation
    0.55-0.58; with this factor 0.49-0.54x and 0.84). The factor rescales each row's diagonal-Fisher form
    by the ratio of the full to the diagonal ``H`` form (K-FAC's input factor, exact diagonal kept).
    """
    h = hessian.to(err.device, torch.float32)
    full = ((err @ h) * err).sum(1)
    diag = (err.square() * torch.diagonal(h)).sum(1)
    return full / diag.clamp_min(torch.finfo(torch.float32).tiny)


def hessian_groups(shapes: Mapping[str, tuple[int, int]], names: Sequence[str], max_bytes: int | None) -> list[list[str]]:
    """``names`` in order, cut into runs whose float32 input Hessians (``in x in`` each) take at most
    ``max_bytes`` together (a matrix larger than that alone); one group when ``max_bytes`` is ``None``."""
    groups: list[list[str]] = [[]]
    held = 0
    for m in names:
        size = 4 * shapes[m][1] ** 2
        if max_bytes is not None and groups[-1] and held + size > max_bytes:
            groups.append([])
            held = 0
        groups[-1].append(m)
        held += size
    return groups


_LARGE = 1 << 26  # elements: a matrix this large (a large vocabulary's embedding or head) is predicted last


def _quantize_batches(name: str, settings: list[quant.QuantSetting],
                      hessians: Mapping[str, torch.Tensor]) -> list[list[quant.QuantSetting]]:
    """``settings`` as :func:`quant.quantize_calibrated_many` runs them: those one error-feedback pass
    quantizes together (same format, group and options, Hessian at hand) in one batch, the others alone.
    Each batch is the same call, so the same packed tensors, as all at once; only one batch is held."""
    together: dict[tuple, list[quant.QuantSetting]] = {}
    batches: list[list[quant.QuantSetting]] = []
    for s in settings:
        fmt = quant.get_format(s.format)
        if name in hessians and quant.needs_hessians([s]) and hasattr(fmt, "quantize_many"):
            key = (s.format, s.group_size, fmt.options_of(s))
            if key not in together:
                together[key] = []
                batches.append(together[key])
            together[key].append(s)
        else:
            batches.append([s])
    return batches


def proxy_sensitivity(model: nn.Module, tokens: np.ndarray | torch.Tensor, settings: Iterable[quant.QuantSetting],
                      *, units: Mapping[str, list[str]] | None = None,
                      hessians: HessianSource | None = None, seed: int = 0,
                      hessian_bytes: int | None = None) -> ProxyTable:
    """The predicted single-unit KL ``1/2 sum F_ii (w_q - w)^2`` and exact packed bytes of every (unit, setting).

    ``w_q`` is the real quantized weight (``quant.quantize_calibrated(...).dequantize()``), so a
    format's grid, scales and clipping all show in the prediction.

    Args:
        model: the float model (put an evaluator's model back with ``Evaluator.restore_float()``).
        tokens: ``(B, T)`` calibration windows for the Fisher (a few suffice: see the benchmark).
        settings: the settings of the search space.
        units: unit name -> matrices quantized together (default: every matrix alone).
        hessians: input Hessians for the calibrated formats (``evaluators.calibration_hessians``), or a
            function ``names -> Hessians`` called for one group of matrices at a time (each group's freed
            before the next is collected); needed only when a setting takes them (gptq), which otherwise
            runs data-free. The prediction
            of a format with error feedback (gptq) is corrected by the inputs' correlations
            (:func:`_correlation`); the others' errors do not follow them (measured: rtn unchanged).
        seed: seeds the Fisher's label draws.
        hessian_bytes: with a function for ``hessians``, the most bytes of Hessians held at once
            (:func:`hessian_groups`; default: all in one group).

    Each matrix's Fisher is freed once its pairs are predicted. The numbers do not depend on the
    grouping: every Hessian is summed over the same batches in the same order, whichever others are
    collected beside it.

    Returns:
        A :class:`ProxyTable`.
    """
    t0 = time.perf_counter()
    settings = list(settings)
    matrices = quant.weight_matrices(model)
    units = {m: [m] for m in matrices} if units is None else {u: list(ms) for u, ms in units.items()}
    unknown = sorted({m for ms in units.values() for m in ms} - set(matrices))
    if unknown:
        raise ValueError(f"units name matrices the model lacks: {unknown[:3]}; use names from quant.weight_matrices")
    if quant.needs_hessians(settings) and hessians is None:  # {}: no calibration data, gptq runs as rtn
        raise ValueError("some settings quantize with input Hessians (gptq); pass "
                         "hessians=evaluators.calibration_hessians(model, tokens, names)")
    names = [m for ms in units.values() for m in ms]
    fisher = fisher_diagonal(model, tokens, names, seed=seed)
    t1 = time.perf_counter()
    weights = quant.float_weights(model)  # (out, in), as quantize and the search's workers take them
    # A lookup table's inputs are one-hot (no correlations); a tied one's Hessian is its LM head's use only.
    modules = dict(model.named_modules())
    lazy = callable(hessians)
    # The largest matrices (embedding, head) last: quantizing one at every setting takes a few times its
    # float size, and by then the other matrices' Fisher is freed.
    order = sorted(dict.fromkeys(names), key=lambda m: matrices[m][0] * matrices[m][1] > _LARGE)
    groups = hessian_groups(matrices, order, hessian_bytes) if lazy else [order]
    # Per matrix, every setting its rows fit (gptq's bit-widths in one pass): predicted KL and bytes.
    pairs: dict[str, dict[str, tuple[float, int]]] = {}
    for group in groups:
        held = (hessians(group) if quant.needs_hessians(settings) else {}) if lazy else (hessians or {})
        correlated = {m for m in group if m in held and not isinstance(modules[m], nn.Embedding)}
        with torch.inference_mode():
            for m in group:
                w, fits = weights[m], [s for s in settings if s.fits(matrices[m])]
                pairs[m] = {}
                f = fisher.pop(m)
                for batch in _quantize_batches(m, fits, held):  # the packed tensors of one batch at a time
                    for s, packed in zip(batch, quant.quantize_calibrated_many(m, w, batch, held)):
                        err = packed.dequantize() - w.float()  # (out, in)
                        rows = (f * err.square()).sum(1)  # each output row's diagonal-Fisher form
                        if m in correlated and quant.get_format(s.format).feeds_errors(s):
                            rows *= _correlation(err, held[m])
                        pairs[m][s.key()] = 0.5 * float(rows.sum()), packed.nbytes
                        del packed, err, rows
                del f
        del held
    table = ProxyTable(units, settings)
    for unit, members in units.items():
        # A setting some member's rows do not fit (a llama.cpp type's block) has no pair for the unit.
        keys = [s.key() for s in settings if all(s.key() in pairs[m] for m in members)]
        table.kl[unit] = {k: sum(pairs[m][k][0] for m in members) for k in keys}
        table.nbytes[unit] = {k: sum(pairs[m][k][1] for m in members) for k in keys}
    t2 = time.perf_counter()
    table.seconds, table.seconds_fisher, table.seconds_quantize = t2 - t0, t1 - t0, t2 - t1
    return table
