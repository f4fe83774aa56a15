"""Model fingerprints from the weights' content, cached by the identity of the files they came from.

A fingerprint keys cached sensitivity rows, tokenized corpora and provenance, so it must change
whenever the weights do: it hashes every tensor of the loaded model (names, dtypes, shapes and
bytes) together with the folder's other files (config, tokenizer). Two checkpoints of one shape
with different weights therefore never share cached rows, as they did when the fingerprint was
made of file names and sizes. Hashing a 135M-parameter model takes about a second, so the answer
is kept under the cache directory, keyed by each file's path, size and modification time: it is
computed once per checkpoint, and again only when a file changes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

__all__ = ["hub_folder", "model_fingerprint", "tensor_hash"]

# Files that hold weights; their content reaches the fingerprint through the loaded tensors.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


def tensor_hash(model: nn.Module) -> str:
    """SHA-256 over every tensor of ``model``'s state dict, in name order: name, dtype, shape, bytes."""
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            # The raw bytes, whatever the dtype (bf16 has no numpy type): a byte view, no copy when contiguous.
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def _identity(folder: Path) -> str:
    """What the cached answer depends on: every file's path, size and modification time."""
    h = hashlib.sha256(str(folder.resolve()).encode())
    for path in _files(folder):
        stat = path.stat()
        h.update(f"\0{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def _compute(model: nn.Module, folder: Path | None, tag: str) -> str:
    h = hashlib.sha256(f"{tag}\0{tensor_hash(model)}".encode())
    for path in _files(folder) if folder is not None else []:
        if not path.name.endswith(_WEIGHT_SUFFIXES) and not path.name.endswith(".index.json"):
            h.update(f"\0{path.name}\0".encode() + path.read_bytes())  # config, tokenizer: small files
    return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module, folder: Path | None = None, *, tag: str = "", cache: Path | None = None) -> str:
    """The fingerprint of ``model``, loaded from ``folder`` (``None``: built in memory, not cached).

    Args:
        tag: what else identifies the model beyond its tensors and files (a built-in tokenizer's name).
        cache: where answers for a ``folder`` are kept (``None``: computed every time).
    """
    if folder is None or cache is None:
        return _compute(model, folder, tag)
    entry = cache / f"{_identity(folder)}-{hashlib.sha256(tag.encode()).hexdigest()[:8]}"
    try:
        return entry.read_text().strip()
    except OSError:
        pass
    value = _compute(model, folder, tag)
    cache.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed into place: processes loading the model together never read half a file.
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=entry.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(value)
    os.replace(tmp, entry)
    return value


def hub_folder(name: str) -> Path | None:
    """The local snapshot folder a hub model ``name`` was loaded from, or ``None`` if it cannot be found
    (then its fingerprint is computed at every load instead of cached)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not in the local hub cache in that form; offline errors come in several types
        return None
