"""llama.cpp's i-quants: iq4_xs.

Layout (ggml-common.h, little-endian, 256-weight super-blocks): ``iq4_xs`` (136 bytes) = fp16 d,
scales_h (uint16: bits 2i, 2i+1 are the top bits of sub-block i's 6-bit scale), scales_l[4] (byte
j: low nibbles of sub-blocks 2j, 2j+1), qs[128] (iq4_nl's nibbles per 32-weight sub-block); value
``d (ls - 32) table[q]`` with iq4_nl's table. The encoder is the k-quants'
:func:`~quant.gguf._kquants.encode_symmetric` on that table.
"""

from __future__ import annotations

import torch

from quant.gguf._bytes import f16_bytes, f16_values, split_fields
from quant.gguf._codec import Codec, register_codec
from quant.gguf._kquants import encode_symmetric
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

