"""Byte-level helpers for the GGML block layouts: fp16 fields and bit planes (little-endian)."""

from __future__ import annotations

import torch

__all__ = ["f16_bytes", "f16_values", "pack_planes", "unpack_planes", "split_fields"]


def f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """``(N,)`` floats -> ``(N, 2)`` bytes of their fp16 values (round to nearest even, as ggml)."""
    return v.reshape(-1, 1).to(torch.float16).contiguous().view(torch.uint8)


def f16_values(b: torch.Tensor) -> torch.Tensor:
    """``(N, 2)`` bytes of fp16 values -> ``(N,)`` float32 (exact)."""
    return b.contiguous().view(torch.float16).reshape(-1).float()


def pack_planes(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Packs ``(N, 8 // width, M)`` codes of ``width`` bits into ``(N, M)`` bytes.

    Code ``[n, k, m]`` lands in byte ``m`` at bits ``[k * width, (k + 1) * width)``: the way ggml
    spreads a sub-block's codes over the bit planes of a run of bytes.
    """
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=codes.device).view(1, -1, 1)
    return (codes.to(torch.uint8) << shifts).sum(1, dtype=torch.uint8)


def unpack_planes(data: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_planes`: ``(N, M)`` bytes -> ``(N, 8 // width, M)`` ``uint8`` codes."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=data.device).view(1, -1, 1)
    return (data.unsqueeze(1) >> shifts) & ((1 << width) - 1)


def split_fields(data: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Splits ``(N, block_bytes)`` blocks into their struct fields, ``sizes`` bytes each."""
    if data.dim() != 2 or data.dtype != torch.uint8 or data.shape[1] != sum(sizes):
        raise ValueError(f"expected uint8 blocks of shape (n_blocks, {sum(sizes)}), "
                         f"got {data.dtype} {tuple(data.shape)}")
    return list(torch.split(data, sizes, dim=1))
