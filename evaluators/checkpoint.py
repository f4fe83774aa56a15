"""Measuring a packed checkpoint: reload it and score it against the float model it came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import quant
from evaluators.context import measured_on
from evaluators.errors import UserError
from evaluators.evaluator import reference_logprobs
from evaluators.kv_attention import install_kv, kv_figures
from evaluators.metrics import MetricSums

__all__ = ["evaluate_checkpoint"]


@torch.inference_mode()
def evaluate_checkpoint(folder: str | Path, *, batch_size: int = 2, dataset: str | None = None,
                        seq_len: int | None = None, n_eval: int | None = None
                        ) -> tuple[dict[str, Any], quant.PackedCheckpoint]:
    """Reloads ``folder`` and measures it on the data named in its provenance, or on ``dataset``
    (windows as the provenance's unless ``seq_len`` / ``n_eval`` are given).

    The reference comes from the float model named in the provenance (rebuilt as the
    search built it), on the same windows; the scored model is the reloaded checkpoint itself,
    so this checks the file, not a re-quantization. A policy with a ``kv`` section is measured with
    its quantized keys and values, as :class:`~evaluators.Evaluator` measures the policy (the result
    then has ``kv_bytes``, ``kv_bytes_per_token`` and ``kv_bits``); the returned checkpoint's model
    keeps them installed (:func:`evaluators.kv_attention.remove_kv` takes them off, e.g. before
    generating with :meth:`quant.PackedCheckpoint.kv_cache`, which would quantize them twice).
    """
    try:
        ckpt = quant.load_checkpoint(folder)
    except quant.PolicyError as exc:
        raise UserError(str(exc)) from None
    try:
        install_kv(ckpt.model, ckpt.policy.kv)  # here, not in quant: the attention hook lives in evaluators
    except ValueError as exc:  # a kv module the model does not have
        raise UserError(f"checkpoint {folder}: {exc}") from None
    loaded, tokens = measured_on(ckpt.policy.meta, "checkpoint", str(folder), " to measure it against",
                                 dataset=dataset, seq_len=seq_len, n_eval=n_eval)
    reference = reference_logprobs(loaded.model, tokens, batch_size)
    del loaded  # the float model is only needed for the reference
    sums = MetricSums()
    ids = torch.from_numpy(tokens.eval)
    for i in range(0, len(ids), batch_size):
        batch = ids[i:i + batch_size]
        logits = ckpt.model(input_ids=batch, use_cache=False).logits[:, :-1]
        sums.add(torch.log_softmax(logits.float(), dim=-1), torch.from_numpy(reference[i:i + batch_size]),
                 batch[:, 1:])
    numel = sum(p.numel for p in ckpt.packed.values())
    kv = kv_figures(ckpt.model, ckpt.policy.kv, tokens.seq_len) if ckpt.policy.kv else {}
    return {**sums.result(), "bytes": ckpt.nbytes, "bpw": 8.0 * ckpt.nbytes / numel, "windows": len(ids),
            "seq_len": tokens.seq_len, **kv}, ckpt
