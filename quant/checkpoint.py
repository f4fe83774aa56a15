"""The packed checkpoint: a quantized model written as its packed buffers, and reloaded from them.

A checkpoint folder holds two files:

- ``packed.safetensors``: every packed buffer of every quantized matrix under
  ``{matrix}.{buffer}`` (bit-packed codes, scales, offsets, codebooks, outliers...)
  plus the float tensors that stay float (norms, biases) under their state-dict names.
- ``turboquant.json``: the transformers model config, the policy (settings per matrix,
  with its metrics and provenance), each matrix's shape, kind and buffer names, tied
  weights, and the size and sha256 of ``packed.safetensors`` (``tensors``): the two files
  are one checkpoint, and a tensor file that is not the one the config was written with
  (a crash between the two writes, a copy from elsewhere) is refused when loading.
  Checkpoints written before the hash was recorded load as before.

Each file is written under a temporary name in the folder and renamed over the old one
(:func:`replace_atomically`), so a crash leaves the previous file whole, never half of one.

Reloading rebuilds the architecture from the config and serves the same packed weights
from its own modules (:func:`quant.modules.pack`) as the search measured, so a reloaded
model computes exactly what was measured. The policy's ``kv`` section (KV cache settings) travels
in ``turboquant.json``; generation reads it through :meth:`PackedCheckpoint.kv_cache`, evaluation
(:func:`evaluators.checkpoint.evaluate_checkpoint`) installs it on the attention. The file is not named
``model.safetensors`` on purpose: transformers would try to read it as a float checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from quant.modules import PackedModule, PackedWeight, find_matrices, pack
from quant.packed import PackedTensor
from quant.policy import Policy, PolicyError
from quant.settings import QuantSetting

if TYPE_CHECKING:
    from quant.kv_cache import PackedCache

__all__ = ["CHECKPOINT_VERSION", "TENSORS_FILE", "META_FILE", "PackedCheckpoint", "save_checkpoint",
           "load_checkpoint", "read_packed_tensors", "replace_atomically", "file_sha256"]

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


@contextlib.contextmanager
def replace_atomically(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; once the block ends without an error, that file
    replaces ``path`` in one rename (``os.replace``). On an error the temporary file is removed and
    ``path`` is left as it was: readers see the old file or the new one, never half of one.

    A symbolic link at ``path`` is itself replaced: nothing is written through it to where it points.
    A device or pipe (``/dev/stdout``) is written directly, since there is nothing to rename over it.

    Raises:
        OSError: naming ``path`` (not the temporary name) when its folder cannot be written or
            ``path`` is a folder.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "Is a directory (give a file name)", str(path))
    if path.exists() and not path.is_file():
        # A device or pipe (/dev/stdout, a FIFO) is written as it is: renaming a file over /dev/null
        # would replace the device itself.
        yield path
        return
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp makes 0600; the file gets what open() would give it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 16 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(model: nn.Module, policy: Policy, out_dir: str | Path) -> Path:
    """Writes a model that :func:`quant.apply_policy` has quantized with ``policy`` to ``out_dir``.

    The packed tensors are read from the model's modules, so what is written is exactly
    what the model computes with. Both files are replaced atomically, the tensors first; the
    config records their size and sha256, so a crash between the two renames leaves a folder
    that is refused when loaded (hash mismatch), never one that loads the wrong weights.
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
    with replace_atomically(out / TENSORS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "turboquant-packed", "version": str(CHECKPOINT_VERSION)})
        meta["tensors"] = {"file": TENSORS_FILE, "bytes": tmp.stat().st_size, "sha256": file_sha256(tmp)}
    with replace_atomically(out / META_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return out


def _read_meta(folder: Path) -> dict[str, Any]:
    path = folder / META_FILE
    if not folder.is_dir():
        raise PolicyError(f"checkpoint {folder} is not a folder")
    if not path.exists() or not (folder / TENSORS_FILE).exists():
        raise PolicyError(f"{folder} is not a TurboQuant checkpoint (needs {META_FILE} and {TENSORS_FILE}); "
                          "write one with turboquant apply POLICY --out DIR")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise PolicyError(f"{path} is nested too deeply to be a checkpoint's config") from None
    except OSError as exc:
        raise PolicyError(f"cannot read {path}: {exc.strerror}") from None
    if not isinstance(meta, dict):
        raise PolicyError(f"{path} is not a checkpoint config (a JSON object); write one with turboquant apply")
    if meta.get("format") != "turboquant-packed" or meta.get("version") != CHECKPOINT_VERSION:
        raise PolicyError(f"{path}: unsupported checkpoint format {meta.get('format')!r} "
                          f"version {meta.get('version')!r}; this TurboQuant reads version {CHECKPOINT_VERSION}")
    return meta


def _check_tensors_file(folder: Path, meta: dict[str, Any]) -> None:
    """Refuses a tensor file that is not the one the config was written with (size, then sha256)."""
    recorded = meta.get("tensors")
    if recorded is None:
        return  # written before the hash was recorded
    path = folder / TENSORS_FILE
    size = path.stat().st_size
    again = f"; write the checkpoint again with turboquant apply POLICY --out {folder}"
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), str):
        raise PolicyError(f"checkpoint {folder}: {META_FILE} has a malformed 'tensors' entry{again}")
    if recorded.get("bytes") != size:
        raise PolicyError(f"checkpoint {folder}: {TENSORS_FILE} is {size:,} bytes, its config says "
                          f"{recorded.get('bytes')!r} (half-written or from another checkpoint){again}")
    if file_sha256(path) != recorded["sha256"]:
        raise PolicyError(f"checkpoint {folder}: {TENSORS_FILE} does not match the sha256 its config records "
                          f"(changed or from another checkpoint){again}")


def read_packed_tensors(folder: str | Path) -> tuple[dict[str, PackedTensor], dict[str, torch.Tensor], dict[str, Any]]:
    """The packed matrices, the float tensors and the metadata of a checkpoint, without building a model."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = _read_meta(folder)
    _check_tensors_file(folder, meta)
    try:
        tensors = load_file(str(folder / TENSORS_FILE))
    except Exception as exc:  # safetensors' own error type for a truncated or foreign file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PolicyError(f"checkpoint {folder}: {TENSORS_FILE} cannot be read ({reason}): half-written or "
                          f"damaged; write it again with turboquant apply") from None
    packed: dict[str, PackedTensor] = {}
    try:
        for name, info in meta["matrices"].items():
            try:
                buffers = {buf: tensors.pop(f"{name}.{buf}") for buf in info["buffers"]}
            except KeyError as exc:
                raise PolicyError(f"checkpoint {folder} lacks packed buffer {exc.args[0]!r}") from None
            shape = tuple(info["shape"])
            if len(shape) != 2 or not all(isinstance(d, int) and 0 < d < 1 << 40 for d in shape):
                raise PolicyError(f"checkpoint {folder}: matrix {name!r} has shape {list(shape)!r}")
            packed[name] = PackedTensor(setting=QuantSetting.from_dict(info["setting"]), shape=shape, buffers=buffers)
        floats = {key: tensors.pop(key) for key in meta["float_tensors"]}
    except PolicyError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as exc:  # a config edited by hand, or not ours
        raise PolicyError(f"checkpoint {folder}: {META_FILE} is malformed ({type(exc).__name__}: {exc})") from None
    if tensors:
        raise PolicyError(f"checkpoint {folder} has tensors its metadata does not name (e.g. {next(iter(tensors))!r})")
    return packed, floats, meta


def _build_model(meta: dict[str, Any], trust_remote_code: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = meta.get("config") or {}
    if not isinstance(config_dict, dict) or "model_type" not in config_dict:
        raise PolicyError("checkpoint has no transformers model config (model_type missing)")
    try:
        config = AutoConfig.for_model(**config_dict)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # an unknown model_type, a bad field
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PolicyError(f"checkpoint's model config cannot be built: {reason}") from None


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
