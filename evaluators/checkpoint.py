"""Policies and checkpoints from files: their provenance checked, a policy quantized as the search did
(:func:`pack_policy`), a packed checkpoint reloaded and scored against the float model it came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import quant
from evaluators.context import DataConfig, measured_on
from evaluators.errors import UserError
from evaluators.evaluator import calibration_hessians, reference_logprobs
from evaluators.kv_attention import install_kv, kv_figures
from evaluators.metrics import MetricSums
from evaluators.models import load_model

__all__ = ["POLICY_FILE", "checked_provenance", "evaluate_checkpoint", "evaluate_export", "pack_policy"]

# The policy document (settings, measured metrics, provenance) an exported Hugging Face folder carries beside
# its weights, so that `turboquant eval FOLDER` can measure the folder against the float model it came from.
POLICY_FILE = "turboquant-policy.json"

REMOTE_CODE_FLAG = "--trust-remote-code"


def checked_provenance(meta: dict[str, Any], label: str, *, trust_remote_code: bool = False) -> dict[str, Any]:
    """``meta`` with its provenance checked and its ``trust_remote_code`` set by the caller, not the file.

    A policy or checkpoint is a file anyone may have written: its provenance's values are checked as
    :class:`~evaluators.context.DataConfig` checks them (integers in range, strings) before anything loads,
    and whether the model may run its own code is decided only by the person at the command line
    (``--trust-remote-code``), never by the file.

    Args:
        label: what the file is, for messages (``policy p.json``, ``checkpoint out/``).

    Raises:
        UserError: naming the file and the field; or, for a provenance asking for remote code without
            the flag, naming the flag.
    """
    provenance = meta.get("provenance") if isinstance(meta, dict) else None
    if not isinstance(provenance, dict):
        return meta  # none: the caller says what is missing (measured_on) or needs none (no calibration)
    try:
        DataConfig.from_dict(provenance)
    except UserError as exc:
        raise UserError(f"{label}: {exc}") from None
    if provenance.get("trust_remote_code") and not trust_remote_code:
        raise UserError(f"{label} was measured on a model that runs its own code; a file cannot allow that: "
                        f"read the model's code, then pass {REMOTE_CODE_FLAG}")
    return {**meta, "provenance": {**provenance, "trust_remote_code": bool(trust_remote_code)}}


@torch.inference_mode()
def evaluate_checkpoint(folder: str | Path, *, batch_size: int = 2, dataset: str | None = None,
                        seq_len: int | None = None, n_eval: int | None = None, trust_remote_code: bool = False
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

    ``trust_remote_code`` (the CLI's flag) is the only thing that lets the float model run its own
    code: a provenance asking for it without the flag is refused (:func:`checked_provenance`).
    """
    try:
        ckpt = quant.load_checkpoint(folder)
    except quant.PolicyError as exc:
        raise UserError(str(exc)) from None
    meta = checked_provenance(ckpt.policy.meta, f"checkpoint {folder}", trust_remote_code=trust_remote_code)
    try:
        install_kv(ckpt.model, ckpt.policy.kv)  # here, not in quant: the attention hook lives in evaluators
    except ValueError as exc:  # a kv module the model does not have
        raise UserError(f"checkpoint {folder}: {exc}") from None
    loaded, tokens = measured_on(meta, "checkpoint", str(folder), " to measure it against",
                                 dataset=dataset, seq_len=seq_len, n_eval=n_eval)
    metrics = _against_reference(ckpt.model, loaded, tokens, batch_size)
    numel = sum(p.numel for p in ckpt.packed.values())
    kv = kv_figures(ckpt.model, ckpt.policy.kv, tokens.seq_len) if ckpt.policy.kv else {}
    return {**metrics, "bytes": ckpt.nbytes, "bpw": 8.0 * ckpt.nbytes / numel, **kv}, ckpt


def evaluate_export(folder: str | Path, *, batch_size: int = 2, dataset: str | None = None,
                    seq_len: int | None = None, n_eval: int | None = None, trust_remote_code: bool = False
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Measures an exported Hugging Face folder (compressed-tensors: transformers decompresses its weights,
    in float32) against the float model its :data:`POLICY_FILE` names, on the same data as
    :func:`evaluate_checkpoint`; returns the metrics and that policy document. ``bytes`` and ``bpw`` are the
    policy's measured ones (the folder may hold its embedding in float: see the exporter's report)."""
    import json

    from transformers import AutoModelForCausalLM

    path = Path(folder) / POLICY_FILE
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"export {folder}: its {POLICY_FILE} cannot be read: {exc}") from None
    meta = checked_provenance(doc, f"export {folder}", trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    loaded, tokens = measured_on(meta, "export", str(folder), " to measure it against",
                                 dataset=dataset, seq_len=seq_len, n_eval=n_eval)
    metrics = _against_reference(model, loaded, tokens, batch_size)
    stored = doc.get("metrics") or {}
    return {**metrics, "bytes": stored.get("bytes"), "bpw": stored.get("bpw")}, doc


@torch.inference_mode()
def _against_reference(model: torch.nn.Module, loaded: Any, tokens: Any, batch_size: int) -> dict[str, Any]:
    """``model``'s metrics against the float ``loaded`` model's log-probs on the evaluation windows (the float
    model is dropped once its reference is taken)."""
    reference = reference_logprobs(loaded.model, tokens, batch_size)
    del loaded
    sums = MetricSums()
    ids = torch.from_numpy(tokens.eval)
    for i in range(0, len(ids), batch_size):
        batch = ids[i:i + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
        sums.add(torch.log_softmax(logits.float(), dim=-1), torch.from_numpy(reference[i:i + batch_size]),
                 batch[:, 1:])
    return {**sums.result(), "windows": len(ids), "seq_len": tokens.seq_len}


def pack_policy(policy: quant.Policy, label: str, *, remap: Any = None, trust_remote_code: bool = False
                ) -> tuple[Any, dict[str, quant.PackedTensor], dict[str, Any]]:
    """Loads the policy's model and quantizes it in place as the search did (calibrated formats on the
    calibration windows its provenance names).

    Args:
        remap: ``(policy, shapes) -> policy`` applied once the model's matrix shapes are known.
        trust_remote_code: whether the model may run its own code: the command line's flag, never the
            policy's provenance (one asking for it without the flag is refused).

    Returns:
        The loaded model, the packed tensors by matrix, and the float weights from before quantizing.
    """
    provenance = checked_provenance(policy.meta, label, trust_remote_code=trust_remote_code).get("provenance")
    model_name = provenance.get("model") if isinstance(provenance, dict) else policy.meta.get("model")
    if not model_name:
        raise UserError(f"{label} names no model; export it with turboquant export")
    if not isinstance(model_name, str):
        raise UserError(f"{label}: its model must be a name (a string), got {model_name!r:.40}")
    hessians = {}
    if quant.needs_hessians(policy.settings.values()):  # gptq: the calibration windows the search used
        if not isinstance(provenance, dict):
            raise UserError(f"{label} uses a calibrated format but has no provenance naming its calibration data")
        loaded, tokens = DataConfig.from_dict(provenance).load()
        hessians = calibration_hessians(loaded.model, tokens, quant.weight_matrices(loaded.model))
    else:
        loaded = load_model(model_name, trust_remote_code=trust_remote_code)
    if remap is not None:
        policy = remap(policy, quant.weight_matrices(loaded.model))
    weights = {n: w.clone() for n, w in quant.float_weights(loaded.model).items()}
    try:
        packed = quant.apply_policy(loaded.model, policy,
                                    quantizer=lambda n, w, s: quant.quantize_calibrated(n, w, s, hessians))
    except quant.PolicyError as exc:
        raise UserError(f"{label} does not fit model {model_name}: {exc}") from None
    return loaded, packed, weights
