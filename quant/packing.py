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


def _placements(bits: int) -> list[tuple[int, int, int]]:
    """Where each of the eight codes of a group lands: ``(code i, byte j, bit offset)``.

    Code ``i`` starts at bit ``bits * i`` of the group's ``bits`` bytes; when it
    straddles a byte boundary its high part continues in byte ``j + 1``.
    """
    return [(i, bits * i // 8, bits * i % 8) for i in range(8)]


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
    flat = codes.reshape(-1)
    flat = flat if flat.dtype == torch.uint8 else flat.to(torch.uint8)  # codes < 256: no information lost
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if bits == 8:
        return flat.clone() if flat.data_ptr() == codes.data_ptr() else flat
    c = flat.view(-1, 8)  # (G, 8): one group of eight codes -> `bits` bytes
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, no straddling
        per = 8 // bits
        c = c.view(-1, bits, per)  # (G, bits, per): byte j holds codes j*per .. j*per+per-1
        out = c[..., 0] | (c[..., 1] << bits)  # a new tensor: the input is never aliased
        for k in range(2, per):
            out |= c[..., k] << (bits * k)
        return out.reshape(-1)
    out = torch.zeros(c.shape[0], bits, dtype=torch.uint8, device=c.device)  # (G, bits)
    for i, j, off in _placements(bits):
        out[:, j] |= c[:, i] << off  # uint8 shift drops the bits that belong to byte j + 1
        if off + bits > 8:
            out[:, j + 1] |= c[:, i] >> (8 - off)
    return out.reshape(-1)


def unpack_bits(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: returns ``n`` codes as ``uint8``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if data.numel() != packed_size(n, bits):
        raise ValueError(f"expected {packed_size(n, bits)} bytes for {n} {bits}-bit codes, got {data.numel()}")
    if bits == 8:
        return data.reshape(-1)[:n].clone()
    mask = (1 << bits) - 1
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte
        per = 8 // bits
        d = data.reshape(-1)
        out = torch.empty(d.numel(), per, dtype=torch.uint8, device=data.device)  # (B, per)
        for k in range(per):
            torch.bitwise_and(d >> (bits * k) if k else d, mask, out=out[:, k])
        return out.reshape(-1)[:n]
    d = data.view(-1, bits)  # (G, bits)
    out = torch.empty(d.shape[0], 8, dtype=torch.uint8, device=data.device)  # (G, 8)
    for i, j, off in _placements(bits):
        if off + bits > 8:  # the high part comes from the next byte; uint8 shifts drop what overflows
            torch.bitwise_or(d[:, j] >> off, d[:, j + 1] << (8 - off), out=out[:, i])
            out[:, i] &= mask
        else:
            torch.bitwise_and(d[:, j] >> off, mask, out=out[:, i])
    return out.reshape(-1)[:n]
