"""The ternary types tq1_0 and tq2_0: 256 weights in {-1, 0, +1} times one fp16 scale.

Layouts (ggml-common.h): ``tq2_0`` = qs[64] (2-bit codes ``t = q + 1``, weight 128 h + 32 s + l in
byte 32 h + l, bits 2 s), fp16 d. ``tq1_0`` = qs[48], qh[4], fp16 d: five trits per byte stored as
the byte ``ceil(256 v / 243)`` of their base-3 number ``v`` (first trit most significant), so that
multiplying the byte by ``3^k`` (mod 256) brings trit ``k`` to the top. Byte m < 32 holds weights
m + 32 n (n = 0..4), byte 32 + m (m < 16) weights 160 + m + 16 n, qh byte j weights 240 + j + 4 n
(n = 0..3, times 3 so that they sit in the top four trits).

Encoder: the best ternary scale is exact here. For a scale ``d`` the codes keep the weights with
``|x| > d / 2``, so the candidate code sets are the prefixes of the weights sorted by ``|x|``; for
each prefix the least-squares scale is its weighted mean ``|x|``; the best prefix wins, then the
scale is rounded to fp16 and the codes re-rounded for it.
"""

from __future__ import annotations

import torch

from quant.gguf._bytes import f16_bytes, f16_values, split_fields
from quant.gguf._codec import Codec, register_codec
from quant.gguf._klayout import pack_2bit, unpack_2bit
from quant.gguf._search import refine_scale, uniform_levels

__all__ = ["ternary_scale"]

_POW3_5 = (81, 27, 9, 3, 1)


def ternary_scale(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """The scale ``(N,)`` minimizing ``sum w (x - d clip(round(x / d), -1, 1))^2`` over all ``d > 0``."""
    a, order = x.abs().sort(dim=-1, descending=True)
    ws = torch.ones_like(a) if w is None else torch.gather(w, -1, order)
    cum_wa, cum_w = (ws * a).cumsum(-1), ws.cumsum(-1)
    gain = torch.where(cum_w > 0, cum_wa.square() / cum_w.clamp(min=1e-30), 0.0)  # error reduction
    k = gain.argmax(-1, keepdim=True)
    return (torch.gather(cum_wa, -1, k) / torch.gather(cum_w, -1, k).clamp(min=1e-30)).squeeze(-1)


def _ternary(x: torch.Tensor, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    d = ternary_scale(x, w)
    # gguf-py's absmax scale is the first start: never worse than it, its bytes where it is as good.
    return refine_scale(x, w, uniform_levels(-1, 1), [x.abs().amax(-1), d])


def _base3_bytes(t: torch.Tensor) -> torch.Tensor:
    """(N, 5, M) trits (most significant first) -> (N, M) bytes ``ceil(256 v / 243)``."""
    pow3 = torch.tensor(_POW3_5[5 - t.shape[1]:], dtype=torch.int32, device=t.device).view(1, -1, 1)
    v = (t.to(torch.int32) * pow3).sum(1)
    if t.shape[1] == 4:
        v = v * 3  # the four qh trits occupy the top of the byte
    return ((v * 256 + 242) // 243).to(torch.uint8)


def _base3_trits(b: torch.Tensor, n: int) -> torch.Tensor:
    """(N, M) bytes -> (N, n, M) trits, trit k = top trit of ``byte * 3^k mod 256`` (gguf-py's way)."""
    pow3 = torch.tensor([1, 3, 9, 27, 81][:n], dtype=torch.int32, device=b.device).view(1, -1, 1)
    v = (b.to(torch.int32).unsqueeze(1) * pow3) & 0xFF
    return (v * 3) >> 8


@register_codec("tq1_0")
class TQ1_0(Codec):
    def quantize_blocks(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        d, q = _ternary(x, w)
        t = (q + 1).to(torch.uint8)
        n = t.shape[0]
        qs0 = _base3_bytes(t[:, :160].reshape(n, 5, 32))
        qs1 = _base3_bytes(t[:, 160:240].reshape(n, 5, 16))
        qh = _base3_bytes(t[:, 240:].reshape(n, 4, 4))
        return torch.cat([qs0, qs1, qh, f16_bytes(d)], dim=1)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        qs, qh, d = split_fields(data, [48, 4, 2])
        n = data.shape[0]
        t = torch.cat([_base3_trits(qs[:, :32], 5).reshape(n, 160), _base3_trits(qs[:, 32:], 5).reshape(n, 80),
                       _base3_trits(qh, 4).reshape(n, 16)], dim=1)
        return f16_values(d).unsqueeze(-1) * (t - 1).float()


@register_codec("tq2_0")
class TQ2_0(Codec):
    def quantize_blocks(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        d, q = _ternary(x, w)
        return torch.cat([pack_2bit((q + 1).to(torch.uint8)), f16_bytes(d)], dim=1)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        qs, d = split_fields(data, [64, 2])
        return f16_values(d).unsqueeze(-1) * (unpack_2bit(qs).to(torch.int8) - 1).float()
