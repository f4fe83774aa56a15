"""Helpers shared by the codebook formats: row-wise unpacking and nearest-centroid coding."""

from __future__ import annotations

import torch

from quant.packing import packed_size, unpack_bits

__all__ = ["unpack_rows", "nearest_sorted", "n_groups"]


def n_groups(in_features: int, group_size: int | None) -> int:
    """Groups per row, counting a padded last partial group."""
    if group_size is None:
        return 1
    return -(-in_features // group_size)


def unpack_rows(data: torch.Tensor, bits: int, n_rows: int, row_codes: int,
                rows: torch.Tensor | None = None) -> torch.Tensor:
    """Unpacks ``(n_rows, row_codes)`` codes packed row-major by :func:`pack_bits`.

    With ``rows`` given, only those rows are unpacked (an embedding lookup must not
    decode the whole table). That slicing needs every row to start on a byte
    boundary, i.e. ``row_codes % 8 == 0``; otherwise the whole stream is decoded.

    Returns:
        ``uint8`` codes, ``(len(rows) or n_rows, row_codes)``.
    """
    if rows is None:
        return unpack_bits(data, bits, n_rows * row_codes).view(n_rows, row_codes)
    rows = rows.reshape(-1)
    if row_codes % 8:
        return unpack_bits(data, bits, n_rows * row_codes).view(n_rows, row_codes)[rows]
    row_bytes = packed_size(row_codes, bits)
    sel = data.view(n_rows, row_bytes)[rows]  # (R, row_bytes)
    return unpack_bits(sel.reshape(-1), bits, sel.shape[0] * row_codes).view(sel.shape[0], row_codes)


def nearest_sorted(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level for each element of ``x``.

    Args:
        x: ``(..., n)`` values.
        levels: ascending levels, either ``(K,)`` shared by all, or ``(..., K)`` one
            sorted codebook per leading index of ``x``.

    For scalar codebooks the nearest level is found by comparing with the midpoints
    between neighbours (a binary search), never by building an ``(n, K)`` distance
    table, which would not fit for a 256-level codebook over an embedding table.
    """
    mids = (levels[..., 1:] + levels[..., :-1]) / 2  # (..., K-1)
    if mids.dim() == 1:
        return torch.bucketize(x.contiguous(), mids.contiguous())
    lead = x.shape[:-1]
    idx = torch.searchsorted(mids.reshape(-1, mids.shape[-1]).contiguous(),
                             x.reshape(-1, x.shape[-1]).contiguous())
    return idx.view(*lead, x.shape[-1])
