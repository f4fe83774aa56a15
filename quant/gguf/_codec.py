"""The codec registry: one pure quantize / dequantize pair per GGML block type, found by name."""

from __future__ import annotations

import abc
from typing import Callable, TypeVar

import torch

from quant.gguf._table import BlockType, block_type
from quant.primitives import one_thread
from quant.registry import Registry

__all__ = ["Codec", "register_codec", "get_codec", "codec_names", "quantize_blocks", "dequantize_blocks"]

_CODECS: Registry["Codec"] = Registry("GGUF codec")
C = TypeVar("C", bound=type)

# Blocks per chunk: the searches build a few (chunk, block) temporaries per candidate, so chunks
# of about 2**20 weights keep them in a few MB whatever the matrix (an embedding has 28M weights).
CHUNK_WEIGHTS = 1 << 20


class Codec(abc.ABC):
    """One GGML type's block encoder and decoder.

    Both are pure functions of their inputs on ``(n_blocks, ...)`` tensors; :func:`quantize_blocks`
    and :func:`dequantize_blocks` validate shapes, chunk big inputs and dispatch here by name.
    A new type implements :meth:`quantize_blocks` and :meth:`dequantize_blocks` and registers with
    ``@register_codec("name")`` (its geometry comes from :data:`quant.gguf.BLOCK_TYPES`).
    """

    type: BlockType

    @abc.abstractmethod
    def quantize_blocks(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        """``(N, block)`` float32 weights and their importance (``None``: uniform) -> ``(N, block_bytes)`` uint8."""

    @abc.abstractmethod
    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        """``(N, block_bytes)`` uint8 -> ``(N, block)`` float32, bit for bit gguf-py's dequantization."""


def register_codec(name: str) -> Callable[[C], C]:
    """Class decorator: registers a :class:`Codec` for the block type ``name``."""
    def deco(cls: C) -> C:
        codec = cls()
        codec.type = block_type(name)
        _CODECS.add(name, codec)
        return cls
    return deco


def get_codec(name: str) -> Codec:
    """The codec of GGML type ``name``; ``ValueError`` naming the known ones otherwise."""
    return _CODECS.get(name)


def codec_names() -> list[str]:
    """The GGML types with a codec, sorted."""
    return _CODECS.names()


def _importance(w: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    if w is None:
        return None
    if tuple(w.shape) != tuple(x.shape):
        raise ValueError(f"importance must have the blocks' shape {tuple(x.shape)}, got {tuple(w.shape)}")
    # Contiguous: a row's importance broadcast over a matrix whose rows are one block each is a stride-0 view,
    # and the codecs reshape it with .view (a 256-wide matrix in an i-quant failed so).
    w = w.float().contiguous()
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("importance must be finite and >= 0 (e.g. the Hessian diagonal, sum of x_j^2)")
    # A block whose inputs never fire cannot matter; weigh it uniformly rather than not at all.
    dead = w.sum(-1, keepdim=True) <= 0
    return torch.where(dead, 1.0, w) if bool(dead.any()) else w


def quantize_blocks(name: str, x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Encodes ``(n_blocks, block)`` weights as GGML type ``name``: ``(n_blocks, block_bytes)`` uint8.

    Args:
        name: a block type (``"q4_k"``; see :func:`codec_names`).
        x: float weights, one block per row (a GGUF row of ``n`` weights is ``n / block`` rows here).
        importance: optional ``(n_blocks, block)`` non-negative weight of each weight in the error
            the encoder minimizes (the input column's calibration energy ``H[j, j]``); uniform if None.
    """
    codec = get_codec(name)
    bt = codec.type
    if x.dim() != 2 or x.shape[1] != bt.block:
        raise ValueError(f"{name} encodes blocks of {bt.block} weights: expected (n_blocks, {bt.block}), "
                         f"got {tuple(x.shape)}")
    x = x.detach().float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: weights must be finite (found inf or nan)")
    w = _importance(importance, x)
    step = max(1, CHUNK_WEIGHTS // bt.block)
    out = torch.empty(x.shape[0], bt.block_bytes, dtype=torch.uint8, device=x.device)
    # One thread: the same bytes whatever the caller's thread count (sums split alike), and these
    # short memory-bound ops gain little from a second thread but lose 10x when the cores are
    # shared (measured on 2 loaded cores: 0.12 s vs 1.0 s CPU for 1.2M weights).
    with one_thread():
        for i in range(0, x.shape[0], step):
            out[i:i + step] = codec.quantize_blocks(x[i:i + step], None if w is None else w[i:i + step])
    return out


def dequantize_blocks(name: str, data: torch.Tensor) -> torch.Tensor:
    """Decodes ``(n_blocks, block_bytes)`` uint8 GGML blocks of type ``name`` to ``(n_blocks, block)`` float32."""
    codec = get_codec(name)
    bt = codec.type
    if data.dim() != 2 or data.dtype != torch.uint8 or data.shape[1] != bt.block_bytes:
        raise ValueError(f"{name} blocks are uint8 (n_blocks, {bt.block_bytes}), got {data.dtype} {tuple(data.shape)}")
    return codec.dequantize_blocks(data)
