"""llama.cpp's i-quants: iq4_xs, and the lattice types iq3_s, iq3_xxs, iq2_s, iq2_xs, iq2_xxs.

Layouts (ggml-common.h, little-endian, 256-weight super-blocks, fp16 ``d`` first):

- ``iq4_xs`` (136 bytes): d, scales_h (uint16: bits 2i, 2i+1 are the top bits of sub-block i's
  6-bit scale), scales_l[4] (byte j: low nibbles of sub-blocks 2j, 2j+1), qs[128] (iq4_nl's
  nibbles per 32-weight sub-block); value ``d (ls - 32) table[q]``.
- ``iq2_xxs`` (66): qs[64], eight bytes per 32 weights: four grid indices (256 points of 8
  weights), then a uint32 of four 7-bit sign indices (bits 7g) and the 4-bit scale (bits 28-31).
- ``iq2_xs`` (74): qs as 32 uint16 (9-bit grid index of 512 points | 7-bit sign index << 9),
  scales[8] (4 bits per 16 weights, low nibble first).
- ``iq2_s`` (82): qs[32] (low 8 bits of a 10-bit index into 1024 points), signs[32] (one byte
  per 8 weights, bit i: weight i negative), qh[8] (byte j, bits 2t: top two bits of index 4j + t),
  scales[8] as iq2_xs.
- ``iq3_xxs`` (98): qs[64] (an index into 256 points of 4 weights per 4 weights), then per 32
  weights a uint32 as iq2_xxs's (signs per 8 weights, scale on top).
- ``iq3_s`` (110): qs[64] (low 8 bits of 9-bit indices into 512 points of 4), qh[8] (bit i of
  byte j: top bit of index 8j + i), signs[32] as iq2_s, scales[4] (4 bits per 32 weights).

The lattice types' value is ``db * grid[index] * sign``, with the sub-block scale ``db`` from the
4-bit ``ls``: ``d (0.5 + ls) / 4`` (iq2), ``d (0.5 + ls) / 2`` (iq3_xxs), ``d (1 + 2 ls)``
(iq3_s). A "7-bit sign index" names ggml's ``ksigns_iq2xs`` entry: the 8 sign bits whose 8th is
the parity of the first 7, so an even number of the 8 weights is negative. The grids and sign
table are gguf-py's (:mod:`quant.gguf._lattice`); the encoders are in :mod:`quant.gguf._lattice`
and, for iq4_xs, the k-quants' :func:`~quant.gguf._kquants.encode_symmetric` on iq4_nl's table.
"""

from __future__ import annotations

import torch

from quant.gguf._bytes import f16_bytes, f16_values, pack_planes, split_fields, unpack_planes
from quant.gguf._codec import Codec, register_codec
from quant.gguf._kquants import encode_symmetric
from quant.gguf._lattice import LatticeSpec, encode_lattice, ksigns, lattice
from quant.gguf._legacy import IQ4_NL_VALUES, OFFSETS_4, _nibbles, _unnibble
from quant.gguf._search import table_levels

__all__ = ["pack_iq4xs_scales", "unpack_iq4xs_scales"]

QK = 256


def _iq4_table(device: torch.device) -> torch.Tensor:
    return torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=device)


def pack_iq4xs_scales(ls: torch.Tensor) -> torch.Tensor:
    """``(N, 8)`` scales in ``[-32, 31]`` -> scales_h (2 bytes) and scales_l (4 bytes), ``(N, 6)``."""
    u = (ls + 32).to(torch.int32)
    shifts = torch.arange(0, 16, 2, dtype=torch.int32, device=ls.device)
    high = ((u >> 4) << shifts).sum(-1, dtype=torch.int32)  # (N,) the uint16
    scales_h = torch.stack([high & 0xFF, high >> 8], dim=1).to(torch.uint8)
    scales_l = ((u[:, 0::2] & 0x0F) | ((u[:, 1::2] & 0x0F) << 4)).to(torch.uint8)
    return torch.cat([scales_h, scales_l], dim=1)


def unpack_iq4xs_scales(b: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_iq4xs_scales`: ``(N, 6)`` bytes -> ``(N, 8)`` int32 scales."""
    high = b[:, 0].to(torch.int32) | (b[:, 1].to(torch.int32) << 8)
    h = (high.unsqueeze(-1) >> torch.arange(0, 16, 2, dtype=torch.int32, device=b.device)) & 3
    low = torch.stack([b[:, 2:6] & 0x0F, b[:, 2:6] >> 4], dim=-1).reshape(-1, 8).to(torch.int32)
    return (low | (h << 4)) - 32


@register_codec("iq4_xs")
class IQ4_XS(Codec):
    def quantize_blocks(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        values = _iq4_table(x.device)
        d, ls, v = encode_symmetric(x, w, 32, IQ4_NL_VALUES[0], IQ4_NL_VALUES[-1], -32, 31,
                                    OFFSETS_4 + [4.0, 6.0, 8.0], levels=table_levels(values))
        qs = _nibbles(torch.searchsorted(values, v.reshape(-1, 32).contiguous())).reshape(x.shape[0], 128)
        return torch.cat([f16_bytes(d), pack_iq4xs_scales(ls), qs], dim=1)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        d, scales, qs = split_fields(data, [2, 6, 128])
        n = data.shape[0]
        dl = (f16_values(d).unsqueeze(-1) * unpack_iq4xs_scales(scales).float()).unsqueeze(-1)  # (N, 8, 1)
        q = _iq4_table(data.device)[_unnibble(qs.reshape(-1, 16)).long()].view(n, 8, 32)
        return (dl * q).reshape(n, QK)


# --- the lattice types -------------------------------------------------------------------------

def _sign_bytes(neg: torch.Tensor) -> torch.Tensor:
    """``(N, 256)`` sign bits -> ``(N, 32)`` bytes, bit i of byte k: weight 8 k + i negative."""
    return pack_planes(neg.view(neg.shape[0], 32, 8).transpose(1, 2).to(torch.uint8), 1)


def _sign_bits(b: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_sign_bytes`: ``(N, 32)`` bytes -> ``(N, 256)`` bool."""
    return unpack_planes(b, 1).transpose(1, 2).reshape(b.shape[0], QK).bool()


def _le_bytes(v: torch.Tensor, width: int) -> torch.Tensor:
    """``(N, M)`` integers -> ``(N, M * width)`` little-endian bytes."""
    shifts = torch.arange(0, 8 * width, 8, dtype=torch.int64, device=v.device)
    return ((v.to(torch.int64).unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).reshape(v.shape[0], -1)


def _le_int(b: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of :func:`_le_bytes`: ``(N, M * width)`` bytes -> ``(N, M)`` int64."""
    shifts = torch.arange(0, 8 * width, 8, dtype=torch.int64, device=b.device)
    return (b.view(b.shape[0], -1, width).to(torch.int64) << shifts).sum(-1)


def _nibble_pairs(v: torch.Tensor) -> torch.Tensor:
    """``(N, 2M)`` 4-bit values -> ``(N, M)`` bytes, value 2 j in the low nibble of byte j."""
    return (v[:, 0::2] | (v[:, 1::2] << 4)).to(torch.uint8)


def _unnibble_pairs(b: torch.Tensor) -> torch.Tensor:
    return torch.stack([b & 0x0F, b >> 4], dim=-1).reshape(b.shape[0], -1)


def _signs_and_scales(neg: torch.Tensor, ls: torch.Tensor) -> torch.Tensor:
    """iq2_xxs / iq3_xxs's uint32 per 32 weights: 7-bit sign indices at bits 7 g, the scale at 28."""
    sign7 = (_sign_bytes(neg) & 0x7F).to(torch.int64).view(-1, 8, 4)  # (N, 8, 4)
    shifts = torch.arange(0, 28, 7, dtype=torch.int64, device=neg.device)
    return (sign7 << shifts).sum(-1) | (ls.to(torch.int64) << 28)  # (N, 8)


def _parity_signs(sign7: torch.Tensor) -> torch.Tensor:
    """``(N, 32)`` 7-bit sign indices -> ``(N, 256)`` sign bits, through ksigns (even parity)."""
    return _sign_bits(ksigns().to(sign7.device)[sign7.long()])


class _LatticeCodec(Codec):
    spec: LatticeSpec

    @property
    def group(self) -> int:
        """Weights per codebook point (8, or 4 for iq3)."""
        return lattice(self.spec.grid).dim

    def pack(self, d, ls, idx, neg) -> list[torch.Tensor]:
        """The struct's fields after ``d``."""
        raise NotImplementedError

    def unpack(self, fields: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The struct's fields after ``d`` -> ``ls (N, n_sub)``, indices ``(N, 256 / n)``, sign bits ``(N, 256)``."""
        raise NotImplementedError

    def quantize_blocks(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        d, ls, idx, neg = encode_lattice(x, w, self.spec)
        return torch.cat([f16_bytes(d), *self.pack(d, ls, idx, neg)], dim=1)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        n = data.shape[0]
        ls, idx, neg = self.unpack(data[:, 2:])
        db = self.spec.sub_scale(f16_values(data[:, :2]).unsqueeze(-1), ls.float())  # (N, n_sub)
        grid = lattice(self.spec.grid).points.to(data.device).index_select(0, idx.reshape(-1).long())
        grid = grid.view(n, db.shape[1], -1)
        sign = torch.where(neg, -1.0, 1.0).view(grid.shape)
        return (db.unsqueeze(-1) * grid * sign).reshape(n, QK)


def _iq2_scale(d: torch.Tensor, ls: torch.Tensor) -> torch.Tensor:
    return d * (0.5 + ls) * 0.25


@register_codec("iq2_xxs")
class IQ2_XXS(_LatticeCodec):
    spec = LatticeSpec("IQ2_XXS", 32, True, _iq2_scale, 1 / 8)

    def pack(self, d, ls, idx, neg):
        aux = _le_bytes(_signs_and_scales(neg, ls), 4).view(-1, 8, 4)
        return [torch.cat([idx.to(torch.uint8).view(-1, 8, 4), aux], dim=2).view(-1, 64)]

    def unpack(self, fields):
        qs = fields.view(-1, 8, 8)
        aux = _le_int(qs[:, :, 4:].reshape(-1, 32), 4)  # (N, 8)
        sign7 = (aux.unsqueeze(-1) >> torch.arange(0, 28, 7, device=fields.device)) & 0x7F
        return aux >> 28, qs[:, :, :4].reshape(-1, 32), _parity_signs(sign7.view(-1, 32))


@register_codec("iq2_xs")
class IQ2_XS(_LatticeCodec):
    spec = LatticeSpec("IQ2_XS", 16, True, _iq2_scale, 1 / 8)

    def pack(self, d, ls, idx, neg):
        sign7 = (_sign_bytes(neg) & 0x7F).to(torch.int64)
        return [_le_bytes(idx | (sign7 << 9), 2), _nibble_pairs(ls)]

    def unpack(self, fields):
        qs = _le_int(fields[:, :64], 2)  # (N, 32)
        return _unnibble_pairs(fields[:, 64:]), qs & 511, _parity_signs(qs >> 9)


@register_codec("iq2_s")
class IQ2_S(_LatticeCodec):
    spec = LatticeSpec("IQ2_S", 16, False, _iq2_scale, 1 / 8)

    def pack(self, d, ls, idx, neg):
        high = (idx >> 8).view(-1, 8, 4) << torch.arange(0, 8, 2, device=idx.device)
        return [(idx & 0xFF).to(torch.uint8), _sign_bytes(neg), high.sum(-1).to(torch.uint8), _nibble_pairs(ls)]

    def unpack(self, fields):
        qs, signs, qh, scales = split_fields(fields, [32, 32, 8, 8])
        high = (qh.to(torch.int64).unsqueeze(-1) >> torch.arange(0, 8, 2, device=fields.device)) & 3
        return _unnibble_pairs(scales), qs.to(torch.int64) | (high.view(-1, 32) << 8), _sign_bits(signs)


@register_codec("iq3_xxs")
class IQ3_XXS(_LatticeCodec):
    spec = LatticeSpec("IQ3_XXS", 32, True, lambda d, ls: d * (0.5 + ls) * 0.5, 1 / 4)

    def pack(self, d, ls, idx, neg):
        return [idx.to(torch.uint8), _le_bytes(_signs_and_scales(neg, ls), 4)]

    def unpack(self, fields):
        aux = _le_int(fields[:, 64:], 4)  # (N, 8)
        sign7 = (aux.unsqueeze(-1) >> torch.arange(0, 28, 7, device=fields.device)) & 0x7F
        return aux >> 28, fields[:, :64], _parity_signs(sign7.view(-1, 32))


@register_codec("iq3_s")
class IQ3_S(_LatticeCodec):
    spec = LatticeSpec("IQ3_S", 32, False, lambda d, ls: d * (1 + 2 * ls), 1.0)

    def pack(self, d, ls, idx, neg):
        high = pack_planes((idx >> 8).view(-1, 8, 8).transpose(1, 2).to(torch.uint8), 1)  # bit i of byte j: 8 j + i
        return [(idx & 0xFF).to(torch.uint8), high, _sign_bytes(neg), _nibble_pairs(ls)]

    def unpack(self, fields):
        qs, qh, signs, scales = split_fields(fields, [64, 8, 32, 4])
        high = unpack_planes(qh, 1).transpose(1, 2).reshape(-1, 64).to(torch.int64)
        return _unnibble_pairs(scales), qs.to(torch.int64) | (high << 8), _sign_bits(signs)
