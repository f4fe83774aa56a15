"""Tensors moved out of the process's memory into files the kernel pages in and out: for large,
read-mostly data (gptq's input Hessians: 10 GB on a 1.5B model) that a worker keeps for the whole search.

Each tensor is written to a file, mapped back copy-on-write and the file unlinked at once: the mapping
keeps the data (the disk space is freed when the last tensor is), nothing is left behind by a crash, and
under memory pressure the kernel drops the pages and reads them again instead of killing the process.
A write to a mapped tensor stays private to the process (copy-on-write), as with an ordinary tensor.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

__all__ = ["spill"]


def spill(tensors: Mapping[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    """``tensors`` (on the CPU) as file-backed tensors of the same values, dtype and shape."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        array = t.detach().contiguous().numpy()
        fd, path = tempfile.mkstemp(prefix="spill-", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                array.tofile(f)
            mapped = np.memmap(path, dtype=array.dtype, mode="c", shape=array.shape)
        finally:
            os.unlink(path)
        out[name] = torch.from_numpy(mapped)
    return out
