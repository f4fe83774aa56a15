"""Measuring a policy: apply it to the model, run the evaluation tokens, compare to the reference."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

import quant
from evaluators.data import TokenSets
from evaluators.kv_attention import install_kv, kv_figures, remove_kv
from evaluators.metrics import MetricSums
from evaluators.models import LoadedModel
from evaluators.reference import Reference, TopKReference

__all__ = ["Evaluator", "calibration_hessians", "reference_logprobs"]

log = logging.getLogger(__name__)


def _forward_logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T-1, V)
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def reference_logprobs(model: nn.Module, tokens: TokenSets, batch_size: int = 2,
                       topk: int | None = None) -> Reference:
    """The float model's log-probs on the evaluation windows: full ``(B, T-1, V)`` float32, or with
    ``topk`` below the vocabulary a :class:`~evaluators.reference.TopKReference` (on the CPU, either way).

    Top-k is made batch by batch: the full tensor never exists at once.
    """
    ids = torch.from_numpy(tokens.eval).to(_device(model))
    full: list[torch.Tensor] = []
    top: list[TopKReference] = []
    for i in range(0, len(ids), batch_size):
        lp = _forward_logprobs(model, ids[i:i + batch_size]).cpu()  # (b, T-1, V)
        if not topk or topk >= lp.shape[-1]:
            full.append(lp)
        else:
            top.append(TopKReference.from_logprobs(lp, topk, first_window=i))
    return TopKReference.concat(top) if top else torch.cat(full).numpy()


@torch.inference_mode()
def calibration_hessians(model: nn.Module, tokens: TokenSets, names: Iterable[str],
                         batch_size: int = 2, *, max_bytes: int | None = None,
                         spill_to: Path | None = None) -> dict[str, torch.Tensor]:
    """Input Hessians of the weight matrices ``names`` over the calibration windows (disjoint from
    the evaluation windows); ``{}`` without calibration windows (gptq then runs data-free, as rtn).

    A tied embedding gets its LM head's Hessian: the table is GPTQ'd for the head's inputs (as a
    lookup table it sees no input activations at all).

    With ``spill_to``, they are collected in groups of at most ``max_bytes`` (one calibration pass per
    group) and each group moved to files in that folder (:func:`evaluators.spill.spill`) before the next
    is collected: a process then holds at most one group in its own memory. The values are the same.
    """
    ids = torch.from_numpy(tokens.calib).to(_device(model))
    if not len(ids):
        log.warning("no calibration windows (--calib-seqs 0): gptq runs without data, as rtn")
        return {}
    names = set(names)
    tied = {head: name for head, name in quant.find_matrices(model)[1].items() if name in names}
    batches = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
    if spill_to is None:
        groups = [sorted(names)]
    else:
        from evaluators.proxy import hessian_groups

        shapes = quant.weight_matrices(model)
        groups = hessian_groups(shapes, sorted(n for n in names if n in shapes), max_bytes)
    hessians: dict[str, torch.Tensor] = {}
    for group in groups:
        part = quant.collect_hessians(model, batches, [*group, *(h for h, n in tied.items() if n in group)])
        for head, name in tied.items():
            if head in part:
                part[name] = part.pop(head)
        if spill_to is not None:
            from evaluators.spill import spill

            part = spill(part, spill_to)
        hessians.update(part)
    return hessians


class PackedCache:
    """Quantized matrices by (name, setting), bounded in bytes (least recently used goes first).

    Trials differ in a few matrices; re-quantizing the rest each time would cost more than the forward.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, str], quant.PackedTensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, name: str, weight: torch.Tensor, setting: quant.QuantSetting,
            hessians: Mapping[str, torch.Tensor]) -> quant.PackedTensor:
        key = (name, setting.key())
        packed = self._items.get(key)
        if packed is not None:
            self.hits += 1
            self._items.move_to_end(key)
            return packed
        self.misses += 1
        packed = quant.quantize_calibrated(name, weight, setting, hessians)
        self._items[key] = packed
        self._bytes += packed.nbytes
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.nbytes
        return packed


class Evaluator:
    """Holds a model, its float weights, the evaluation tokens and the reference; measures policies.

    Args:
        loaded: the model (it is quantized in place by :meth:`evaluate`).
        tokens: evaluation / calibration windows.
        reference: from :func:`reference_logprobs` (full or top-k); computed here if ``None``.
        cache_bytes: budget of the packed-matrix cache.
        reference_topk: the reference computed here keeps the top-k words per position (``None``: full).

    Everything runs on the model's device (move the model before): the reference is copied there
    once (on the CPU it is used in place, e.g. shared from Ray's object store).
    """

    def __init__(self, loaded: LoadedModel, tokens: TokenSets, reference: Reference | None = None,
                 cache_bytes: int = 2 << 30, batch_size: int = 2, reference_topk: int | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.device = _device(self.model)
        self.tokens = tokens
        self.batch_size = batch_size
        self.matrices = quant.weight_matrices(self.model)
        self.weights = {name: w.clone() for name, w in quant.float_weights(self.model).items()}
        self.numel = sum(h * w for h, w in self.matrices.values())
        if reference is None:
            reference = reference_logprobs(self.model, tokens, batch_size, topk=reference_topk)
        self.reference = reference
        self._ref = self._on_device(reference)
        if isinstance(reference, np.ndarray):  # the top-k reference keeps its argmax first
            self._ref_top = self._ref[0].argmax(-1)  # (B, T-1): the same for every trial
        self.cache = PackedCache(cache_bytes)
        self.hessians: dict[str, torch.Tensor] | None = None  # collected when a policy first needs them

    def _measure(self, prune_above: float | None = None, windows: int | None = None) -> dict[str, Any]:
        """Metrics over the first ``windows`` evaluation windows (default all); ``kl_low`` is the KL
        over the first batch alone.

        Multi-fidelity: with ``prune_above``, a policy whose first-batch KL exceeds it stops there
        (``pruned``), costing one batch instead of the whole evaluation.
        """
        sums = MetricSums()
        ids = torch.from_numpy(self.tokens.eval[:windows]).to(self.device)
        kl_low = None
        for i in range(0, len(ids), self.batch_size):
            batch = ids[i:i + self.batch_size]
            logprobs = _forward_logprobs(self.model, batch)
            window = slice(i, i + len(batch))
            if isinstance(self.reference, np.ndarray):
                sums.add(logprobs, self._ref[0][window], batch[:, 1:], ref_top=self._ref_top[window])
            else:
                ref = [r[window] for r in self._ref]
                sums.add_topk(logprobs, *ref[:3], batch[:, 1:], *ref[3:])
            if kl_low is None:
                kl_low = sums.result()["kl"]
                if prune_above is not None and kl_low > prune_above and len(ids) > len(batch):
                    return {"pruned": True, "kl_low": kl_low, "windows": len(batch)}
        return {**sums.result(), "pruned": False, "kl_low": kl_low, "windows": len(ids)}

    def _on_device(self, reference: Reference) -> tuple[torch.Tensor, ...]:
        """The reference's arrays as tensors on the model's device: ``(logprobs,)`` or top-k's
        (:attr:`~evaluators.reference.TopKReference.arrays`)."""
        arrays = (reference,) if isinstance(reference, np.ndarray) else reference.arrays
        return tuple(torch.as_tensor(a).to(self.device) for a in arrays)

    def _apply_kv(self, kv: Mapping[str, quant.kv.KVPair]) -> dict[str, Any]:
        """Installs the KV cache settings ``kv`` (none: float attention, exactly as without) and
        returns what the result reports of them: nothing without settings, else
        :func:`~evaluators.kv_attention.kv_figures` over one evaluation window."""
        install_kv(self.model, kv)
        return kv_figures(self.model, kv, self.tokens.eval.shape[1]) if kv else {}

    def calibrate(self, settings: Iterable[quant.QuantSetting]) -> None:
        """Collects the input Hessians once, on the float model, when ``settings`` first need them."""
        if self.hessians is None and quant.needs_hessians(settings):
            self.restore_float()
            self.hessians = calibration_hessians(self.model, self.tokens, self.matrices, self.batch_size,
                                                 **self._hessian_room())

    def _hessian_room(self) -> dict[str, Any]:
        """Where the Hessians go: in memory, or (beyond a quarter of the memory available) a group at a
        time into files the kernel may page out (10 GB on a 1.5B model, beside two float copies of it)."""
        import psutil

        from evaluators.models import cache_dir

        total = sum(4 * w ** 2 for _, w in self.matrices.values())
        room = psutil.virtual_memory().available // 4
        if total <= room:
            return {}
        log.info("gptq's input Hessians (%.1f GB) are kept in files, %.1f GB collected at a time", total / 1e9,
                 room / 1e9)
        return {"max_bytes": room, "spill_to": cache_dir() / "spill"}

    def _quantize(self, name: str, weight: torch.Tensor, setting: quant.QuantSetting) -> quant.PackedTensor:
        return self.cache.get(name, weight, setting, self.hessians or {})

    def restore_float(self) -> None:
        """Puts every quantized matrix back to float (the kept float weights; nothing is copied) and the KV
        cache too (an evaluation leaves its policy's cache settings installed until the next one)."""
        quant.restore_float(self.model, self.weights)
        remove_kv(self.model)

    @torch.inference_mode()
    def evaluate_partial(self, settings: Mapping[str, quant.QuantSetting], windows: int | None = None,
                         kv: Mapping[str, quant.kv.KVPair] | None = None) -> dict[str, Any]:
        """Metrics with only the named matrices quantized; every other matrix runs in float.
        Over the first ``windows`` evaluation windows (default all): sensitivity can use fewer.
        ``kv``: KV cache settings of attention modules (as :attr:`quant.Policy.kv`; default none).

        A full :class:`quant.Policy` cannot say "float", yet per-matrix sensitivity needs exactly
        that: :func:`quant.apply_policy` with ``partial`` puts the others back to float (around the
        kept float weights, so nothing is copied); :meth:`evaluate` works as before afterwards.
        """
        self.calibrate(settings.values())
        packed = quant.apply_policy(self.model, quant.Policy(dict(settings)), partial=True, weights=self.weights,
                                    quantizer=self._quantize, cache_dense=True)
        kv_result = self._apply_kv(kv or {})
        result = self._measure(windows=windows)
        return {**result, "bytes": sum(p.nbytes for p in packed.values()), **kv_result}

    @torch.inference_mode()
    def evaluate(self, policy: quant.Policy, prune_above: float | None = None) -> dict[str, Any]:
        """Applies ``policy`` (its weights and its KV cache settings) and returns metrics, bytes (of
        the packed weight buffers), timings and, with KV settings, the cache's bytes (see :meth:`_apply_kv`).

        With ``prune_above``, a policy worse than that on the first batch is stopped early: the
        result then has ``pruned=True`` and only ``kl_low`` (see :meth:`_measure`), bytes and timings.
        """
        t0 = time.perf_counter()
        self.calibrate(policy.settings.values())
        packed = quant.apply_policy(self.model, policy, weights=self.weights, quantizer=self._quantize,
                                    cache_dense=True)
        kv_result = self._apply_kv(policy.kv)
        t1 = time.perf_counter()
        result = self._measure(prune_above)
        t2 = time.perf_counter()
        nbytes = sum(p.nbytes for p in packed.values())
        return {**result, "bytes": nbytes, "bpw": 8.0 * nbytes / self.numel,
                "seconds_quantize": t1 - t0, "seconds_forward": t2 - t1, **kv_result}
