"""Bit packing of integer codes into a dense little-endian byte stream.

Layout ("lsb-first, groups of eight"): codes are taken eight at a time; the eight
``b``-bit codes of a group form one ``8 * b``-bit little-endian integer
(code ``i`` occupies bits ``[b*i, b*(i+1))``), stored as ``b`` bytes. So every
width 1..8 packs to exactly ``ceil(n / 8) * b`` bytes, with no byte alignment
between codes, and 3-, 5-, 6- and 7-bit codes cost exactly their width.
"""

from __future__ import annotations

import torch

__all__ = ["pack_bits", "unpack_bits", "packed_size"]


def packed_size(n: int, bits: int) -> int:
    """Bytes that :func:`pack_bits` produces for ``n`` codes of ``bits`` bits."""
    return -(-n // 8) * bits


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs integer codes in ``[0, 2**bits)`` into a flat ``uint8`` tensor.

    Args:
        codes: any-shaped integer tensor; it is flattened in row-major order.
        bits: code width, 1..8.

    Returns:
        ``uint8`` tensor of ``packed_size(codes.numel(), bits)`` bytes.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.reshape(-1).to(torch.int64)
    n = flat.numel()
    pad = (-n) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, 8)  # (G, 8)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    words = (groups << shifts).sum(dim=1)  # (G,) at most 64 bits; sum == bitwise or here
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    out = (words.unsqueeze(1) >> byte_shifts) & 0xFF  # (G, bits)
    return out.to(torch.uint8).reshape(-1)


def unpack_bits(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: returns ``n`` codes as ``uint8``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if data.numel() != packed_size(n, bits):
        raise ValueError(f"expected {packed_size(n, bits)} bytes for {n} {bits}-bit codes, got {data.numel()}")
    rows = data.view(-1, bits).to(torch.int64)  # (G, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    words = (rows << byte_shifts).sum(dim=1)  # (G,)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    codes = (words.unsqueeze(1) >> shifts) & ((1 << bits) - 1)  # (G, 8)
    return codes.reshape(-1)[:n].to(torch.uint8)
