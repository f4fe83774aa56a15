"""The packed checkpoint: a quantized model written as its packed buffers, and reloaded from them.

A checkpoint folder holds two files:

- ``packed.safetensors``: every packed buffer of every quantized matrix under
  ``{matrix}.{buffer}`` (bit-packed codes, scales, offsets, codebooks, outliers...)
  plus the float tensors that stay float (norms, biases) under their state-dict names.
- ``turboquant.json``: the transformers model config, the policy (settings per matrix,
  with its metrics and provenance), each matrix's shape, kind and buffer names, and
  tied weights.

Reloading rebuilds the architecture from the config and serves the same packed weights
from its own modules (:func:`quant.modules.pack`) as the search measured, so a reloaded
model computes exactly what was measured. The policy's ``kv`` section (KV cache settings) travels
in ``turboquant.json``; generation reads it through :meth:`PackedCheckpoint.kv_cache`, evaluation
(:func:`evaluators.checkpoint.evaluate_checkpoint`) installs it on the attention. The file is not named
``model.safetensors`` on purpose: transformers would try to read it as a float checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from quant.modules import PackedModule, PackedWeight, find_matrices, pack
from quant.packed import PackedTensor
from quant.policy import Policy, PolicyError
from quant.settings import QuantSetting

if TYPE_CHECKING:
    from quant.kv_cache import PackedCache

__all__ = ["CHECKPOINT_VERSION", "TENSORS_FILE", "META_FILE", "PackedCheckpoint", "save_checkpoint",
           "load_checkpoint", "read_packed_tensors"]

CHECKPOINT_VERSION = 1
TENSORS_FILE = "packed.safetensors"
META_FILE = "turboquant.json"


@dataclass
class PackedCheckpoint:
    """A reloaded checkpoint.

    Attributes:
        model: the transformers model, running from the packed tensors, in eval mode.
        policy: the policy it was written with (its ``meta`` holds metrics and provenance).
        packed: the packed tensor of every quantized matrix, by name.
        meta: the whole ``turboquant.json`` document.
    """

    model: nn.Module
    policy: Policy
    packed: dict[str, PackedTensor]
    meta: dict[str, Any]

    @property
    def nbytes(self) -> int:
        """Bytes of the packed matrices (what the search counted)."""
        return sum(p.nbytes for p in self.packed.values())

    def kv_cache(self) -> "PackedCache":
        """A fresh generation cache storing keys and values packed as the policy's ``kv`` section says
        (float where it names nothing): ``model.generate(ids, cache=ckpt.kv_cache())``."""
        from quant.kv_cache import packed_cache  # transformers' cache classes: only when generating

        return packed_cache(self.model, self.policy.kv)


def save_checkpoint(model: nn.Module, policy: Policy, out_dir: str | Path) -> Path:
    """Writes a model that :func:`quant.apply_policy` has quantized with ``policy`` to ``out_dir``.

    The packed tensors are read from the model's modules, so what is written is exactly
    what the model computes with.
    """
    out = Path(out_dir)
    found, all_ties = find_matrices(model)
    tensors: dict[str, torch.Tensor] = {}
    matrices: dict[str, Any] = {}
    for name, setting in policy.settings.items():
        module = found.get(name)
        if not isinstance(module, PackedModule):
            raise PolicyError(f"matrix {name!r} is not quantized in this model; apply the policy first")
        packed = module.packed
        for buf, value in packed.buffers.items():
            # safetensors refuses views and shared storage; a contiguous copy keeps bytes equal.
            tensors[f"{name}.{buf}"] = value.detach().contiguous().clone()
        matrices[name] = {"kind": "embedding" if isinstance(module, nn.Embedding) else "linear",
                          "shape": list(packed.shape), "setting": packed.setting.to_dict(),
                          "buffers": sorted(packed.buffers), "bytes": packed.nbytes}
    ties = {head: name for head, name in all_ties.items() if name in policy.settings}
    floats: list[str] = []
    # After apply_policy the state dict holds only what stays float: norms, biases, unquantized layers.
    for key, value in model.state_dict().items():
        if key in tensors:
            raise PolicyError(f"float tensor {key!r} collides with a packed buffer name")
        tensors[key] = value.detach().contiguous().clone()
        floats.append(key)
    config = getattr(model, "config", None)
    meta = {"format": "turboquant-packed", "version": CHECKPOINT_VERSION,
            "architecture": type(model).__name__,
            "config": config.to_dict() if config is not None else None,
            "policy": policy.to_dict(), "matrices": matrices, "ties": ties, "float_tensors": floats}
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / TENSORS_FILE), metadata={"format": "turboquant-packed",
                                                         "version": str(CHECKPOINT_VERSION)})
    (out / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return out


def _read_meta(folder: Path) -> dict[str, Any]:
    path = folder / META_FILE
    if not folder.is_dir():
        raise PolicyError(f"checkpoint {folder} is not a folder")
    if not path.exists() or not (folder / TENSORS_FILE).exists():
        raise PolicyError(f"{folder} is not a TurboQuant checkpoint (needs {META_FILE} and {TENSORS_FILE}); "
                          "write one with turboquant apply POLICY --out DIR")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PolicyError(f"{path} is not valid JSON: {exc}") from None
    if meta.get("format") != "turboquant-packed" or meta.get("version") != CHECKPOINT_VERSION:
        raise PolicyError(f"{path}: unsupported checkpoint format {meta.get('format')!r} "
                          f"version {meta.get('version')!r}; this TurboQuant reads version {CHECKPOINT_VERSION}")
    return meta


def read_packed_tensors(folder: str | Path) -> tuple[dict[str, PackedTensor], dict[str, torch.Tensor], dict[str, Any]]:
    """The packed matrices, the float tensors and the metadata of a checkpoint, without building a model."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = _read_meta(folder)
    tensors = load_file(str(folder / TENSORS_FILE))
    packed: dict[str, PackedTensor] = {}
    for name, info in meta["matrices"].items():
        try:
            buffers = {buf: tensors.pop(f"{name}.{buf}") for buf in info["buffers"]}
        except KeyError as exc:
            raise PolicyError(f"checkpoint {folder} lacks packed buffer {exc.args[0]!r}") from None
        packed[name] = PackedTensor(setting=QuantSetting.from_dict(info["setting"]),
                                    shape=tuple(info["shape"]), buffers=buffers)
    floats = {key: tensors.pop(key) for key in meta["float_tensors"]}
    if tensors:
        raise PolicyError(f"checkpoint {folder} has tensors its metadata does not name (e.g. {next(iter(tensors))!r})")
    return packed, floats, meta


def _build_model(meta: dict[str, Any], trust_remote_code: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = dict(meta.get("config") or {})
    if "model_type" not in config_dict:
        raise PolicyError("checkpoint has no transformers model config (model_type missing)")
    config = AutoConfig.for_model(**config_dict)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)


def load_checkpoint(folder: str | Path, *, trust_remote_code: bool = False) -> PackedCheckpoint:
    """Reloads a checkpoint written by :func:`save_checkpoint` as a transformers model.

    The architecture comes from the stored config; its randomly initialised weight
    matrices are replaced by packed modules and its float tensors loaded strictly (a
    missing or extra tensor is an error, never silently left random).
    """
    packed, floats, meta = read_packed_tensors(folder)
    model = _build_model(meta, trust_remote_code)
    modules = dict(model.named_modules())
    holders = {name: [name] for name in packed}
    for head, name in meta.get("ties", {}).items():
        holders.setdefault(name, []).append(head)
    for name, p in packed.items():
        shared = PackedWeight(p)
        for holder in holders[name]:
            try:
                if holder not in modules:
                    raise TypeError("no such module")
                pack(modules[holder], shared)  # checks the module holds a matrix of this shape
            except (TypeError, ValueError) as exc:
                raise PolicyError(f"checkpoint matrix {name!r} {tuple(p.shape)} does not fit "
                                  f"{type(model).__name__} at {holder!r}: {exc}") from None
    missing, unexpected = model.load_state_dict(floats, strict=False)
    if missing or unexpected:
        raise PolicyError(f"checkpoint float tensors do not fit the model: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    policy = Policy.from_dict(meta["policy"])
    return PackedCheckpoint(model=model.eval(), policy=policy, packed=packed, meta=meta)
