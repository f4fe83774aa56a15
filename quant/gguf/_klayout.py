"""Byte layouts of the k-quant super-blocks (256 weights), as ggml-common.h defines them.

Every function maps codes ``(N, 256)`` (or sub-block scales) to the struct's fields and back.
Field order per block: ``q2_k`` scales[16] qs[64] d dmin; ``q3_k`` hmask[32] qs[64] scales[12] d;
``q4_k`` d dmin scales[12] qs[128]; ``q5_k`` d dmin scales[12] qh[32] qs[128];
``q6_k`` ql[128] qh[64] scales[16] d (d and dmin fp16).
"""

from __future__ import annotations

import torch

from quant.gguf._bytes import pack_planes, unpack_planes

__all__ = ["pack_2bit", "unpack_2bit", "pack_high_bits", "unpack_high_bits", "pack_nibbles_64",
           "unpack_nibbles_64", "pack_scales_k4", "unpack_scales_k4", "pack_scales_q3", "unpack_scales_q3",
           "pack_q6", "unpack_q6"]


def _pack_super_block(codes: torch.Tensor, planes: int, bits: int) -> torch.Tensor:
    """(N, 256) codes -> (N, 256 * bits / 8): runs of 32 weights, ``planes`` runs interleaved per byte group."""
    n = codes.shape[0]
    runs = 256 // (32 * planes)  # byte groups of 32 per super-block
    return pack_planes(codes.reshape(n * runs, planes, 32), bits).reshape(n, 32 * runs)


def _unpack_super_block(data: torch.Tensor, planes: int, bits: int) -> torch.Tensor:
    n = data.shape[0]
    return unpack_planes(data.reshape(n * (256 // (32 * planes)), 32), bits).reshape(n, 256)


def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """(N, 256) 2-bit codes -> (N, 64): weight 128 h + 32 s + l sits in byte 32 h + l, bits 2 s."""
    return _pack_super_block(codes, 4, 2)


def unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    return _unpack_super_block(qs, 4, 2)


def pack_high_bits(bits: torch.Tensor) -> torch.Tensor:
    """(N, 256) single bits -> (N, 32): weight 32 b + l sits in byte l, bit b (q3_k hmask, q5_k qh)."""
    return pack_planes(bits.reshape(-1, 8, 32), 1)


def unpack_high_bits(qh: torch.Tensor) -> torch.Tensor:
    return unpack_planes(qh, 1).reshape(-1, 256)


def pack_nibbles_64(codes: torch.Tensor) -> torch.Tensor:
    """(N, 256) 4-bit codes -> (N, 128): weight 64 c + 32 s + l sits in byte 32 c + l, nibble s."""
    return _pack_super_block(codes, 2, 4)


def unpack_nibbles_64(qs: torch.Tensor) -> torch.Tensor:
    return _unpack_super_block(qs, 2, 4)



def pack_scales_k4(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """(N, 8) 6-bit scales and mins -> q4_k / q5_k's 12 bytes.

    Bytes 0-3: scales 0-3, with bits 4-5 of scales 4-7 on top; bytes 4-7 the same for the mins;
    bytes 8-11: low nibbles of scales 4-7 and (high nibble) of mins 4-7.
    """
    sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
    first = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    second = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    third = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return torch.cat([first, second, third], dim=1)


def unpack_scales_k4(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d, m, md = b[:, :4], b[:, 4:8], b[:, 8:]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def pack_scales_q3(u: torch.Tensor) -> torch.Tensor:
    """(N, 16) 6-bit values (scale + 32) -> q3_k's 12 bytes.

    Bytes 0-7: low nibbles of values k (low) and k + 8 (high); byte 8 + k holds bits 4-5 of
    values k, 4 + k, 8 + k, 12 + k at bits 0-1, 2-3, 4-5, 6-7.
    """
    u = u.to(torch.uint8)
    low = (u[:, :8] & 0x0F) | ((u[:, 8:] & 0x0F) << 4)
    high = pack_planes((u >> 4).reshape(-1, 4, 4), 2)  # [n, i, k] = value 4 i + k
    return torch.cat([low, high], dim=1)


def unpack_scales_q3(b: torch.Tensor) -> torch.Tensor:
    low = torch.cat([b[:, :8] & 0x0F, b[:, :8] >> 4], dim=1)
    high = unpack_planes(b[:, 8:], 2).reshape(-1, 16)
    return low | (high << 4)


def pack_q6(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 256) 6-bit codes -> ql (N, 128), qh (N, 64).

    Weight 128 h + 64 s + k: low nibble in ql byte 64 h + k, nibble s; weight 128 h + 32 t + l:
    top two bits in qh byte 32 h + l, bits 2 t.
    """
    n = u.shape[0]
    u = u.to(torch.uint8)
    ql = pack_planes((u & 0x0F).reshape(n * 2, 2, 64), 4).reshape(n, 128)
    qh = pack_planes((u >> 4).reshape(n * 2, 4, 32), 2).reshape(n, 64)
    return ql, qh


def unpack_q6(ql: torch.Tensor, qh: torch.Tensor) -> torch.Tensor:
    n = ql.shape[0]
    low = unpack_planes(ql.reshape(n * 2, 64), 4).reshape(n, 256)
    high = unpack_planes(qh.reshape(n * 2, 32), 2).reshape(n, 256)
    return low | (high << 4)
