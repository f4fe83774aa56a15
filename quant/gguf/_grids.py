"""Each block's fixed grid, read back from its bytes, and the bytes with other codes on that grid.

What GPTQ-style error feedback needs from a block format: first every scale is fixed (the blocks
are encoded once from the original weights), then each weight is rounded to *its* grid,
``value = scale * level + offset`` with ``level`` one of the type's levels, and finally the chosen
levels are written into the blocks in place of the first codes, the scale fields untouched.

Every scalar type has one (iq4_xs included: a sub-block scale times iq4_nl's table). The lattice
i-quants (iq2_xxs, iq2_xs, iq2_s, iq3_xxs, iq3_s) have none: a group of 8 (iq3: 4) weights is one
point of a fixed codebook, with one parity bit over 8 signs for iq2_xxs / iq2_xs / iq3_xxs, so a
weight's possible values depend on the rest of its group; :func:`block_grid` refuses them, and
:func:`lattice_grid` / :func:`with_points` are their counterparts, a group of 8 weights at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from quant.gguf._bytes import f16_bytes, f16_values, split_fields
from quant.gguf._klayout import (pack_2bit, pack_high_bits, pack_nibbles_64, pack_q6, unpack_scales_k4,
                                 unpack_scales_q3)
from quant.gguf._codec import get_codec
from quant.gguf._iquants import _LatticeCodec, unpack_iq4xs_scales
from quant.gguf._lattice import LatticeSpec, round_groups
from quant.gguf._legacy import IQ4_NL_VALUES, _fifth_bits, _nibbles
from quant.gguf._search import Nearest, table_levels, uniform_levels
from quant.gguf._table import block_type

__all__ = ["Grid", "LatticeGrid", "block_grid", "lattice_grid", "with_levels", "with_points"]


@dataclass(frozen=True)
class Grid:
    """Per weight ``(N, block)``: ``value = scale * level + offset`` (offset ``None``: 0)."""

    scale: torch.Tensor
    offset: torch.Tensor | None
    nearest: Nearest

    def round(self, x: torch.Tensor, cols: slice | int = slice(None)) -> torch.Tensor:
        """The levels nearest to ``x`` on the grid's columns ``cols`` (``x`` shaped like ``scale[:, cols]``)."""
        s = self.scale[:, cols]
        y = x if self.offset is None else x - self.offset[:, cols]
        return self.nearest(torch.where(s != 0, y / torch.where(s != 0, s, 1.0), 0.0))

    def value(self, levels: torch.Tensor, cols: slice | int = slice(None)) -> torch.Tensor:
        v = self.scale[:, cols] * levels
        return v if self.offset is None else v + self.offset[:, cols]


def _per_weight(v: torch.Tensor, sub: int) -> torch.Tensor:
    """(N, n_sub) per-sub-block values -> (N, n_sub * sub) per weight."""
    return v.repeat_interleave(sub, dim=1)


def _d(data: torch.Tensor, at: int, block: int) -> torch.Tensor:
    return f16_values(data[:, at:at + 2]).unsqueeze(-1).expand(-1, block)


def _k_affine(data: torch.Tensor):  # q4_k / q5_k: d, dmin, 12 scale bytes
    sc, mn = unpack_scales_k4(data[:, 4:16])
    dl = f16_values(data[:, 0:2]).unsqueeze(-1) * sc.float()
    ml = f16_values(data[:, 2:4]).unsqueeze(-1) * mn.float()
    return _per_weight(dl, 32), -_per_weight(ml, 32)


def _q2k(data: torch.Tensor):
    scales, _, d, dm = split_fields(data, [16, 64, 2, 2])
    dl = f16_values(d).unsqueeze(-1) * (scales & 0x0F).float()
    ml = f16_values(dm).unsqueeze(-1) * (scales >> 4).float()
    return _per_weight(dl, 16), -_per_weight(ml, 16)


def _q3k(data: torch.Tensor):
    sc = (unpack_scales_q3(data[:, 96:108]).to(torch.int8) - 32).float()
    return _per_weight(f16_values(data[:, 108:110]).unsqueeze(-1) * sc, 16), None


def _q6k(data: torch.Tensor):
    sc = data[:, 192:208].contiguous().view(torch.int8).float()
    return _per_weight(f16_values(data[:, 208:210]).unsqueeze(-1) * sc, 16), None


def _iq4xs(data: torch.Tensor):
    ls = unpack_iq4xs_scales(data[:, 2:8]).float()
    return _per_weight(f16_values(data[:, 0:2]).unsqueeze(-1) * ls, 32), None


def _iq4xs_codes(lev: torch.Tensor) -> torch.Tensor:
    return _nibbles(torch.searchsorted(_IQ4, lev.reshape(-1, 32).contiguous())).reshape(lev.shape[0], 128)


def _q3k_codes(lev: torch.Tensor) -> torch.Tensor:
    u = (lev + 4).to(torch.uint8)
    return torch.cat([pack_high_bits(u >> 2), pack_2bit(u & 3)], dim=1)


def _q5k_codes(lev: torch.Tensor) -> torch.Tensor:
    u = lev.to(torch.uint8)
    return torch.cat([pack_high_bits(u >> 4), pack_nibbles_64(u & 0x0F)], dim=1)


def _tq1_codes(lev: torch.Tensor) -> torch.Tensor:
    from quant.gguf._ternary import _base3_bytes

    t, n = (lev + 1).to(torch.uint8), lev.shape[0]
    return torch.cat([_base3_bytes(t[:, :160].reshape(n, 5, 32)), _base3_bytes(t[:, 160:240].reshape(n, 5, 16)),
                      _base3_bytes(t[:, 240:].reshape(n, 4, 4))], dim=1)


_IQ4 = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32)
# name -> (scale and offset per weight from the blocks, the levels, code bytes [start, stop), levels -> code bytes)
_SPECS: dict[str, tuple[Callable, Callable[[], Nearest], tuple[int, int], Callable]] = {
    "q8_0": (lambda b: (_d(b, 0, 32), None), lambda: uniform_levels(-128, 127), (2, 34),
             lambda q: q.to(torch.int8).view(torch.uint8)),
    "q4_0": (lambda b: (_d(b, 0, 32), None), lambda: uniform_levels(-8, 7), (2, 18), lambda q: _nibbles(q + 8)),
    "q5_0": (lambda b: (_d(b, 0, 32), None), lambda: uniform_levels(-16, 15), (2, 22),
             lambda q: torch.cat([_fifth_bits((q + 16).to(torch.uint8)), _nibbles(q + 16)], dim=1)),
    "q4_1": (lambda b: (_d(b, 0, 32), _d(b, 2, 32)), lambda: uniform_levels(0, 15), (4, 20), _nibbles),
    "q5_1": (lambda b: (_d(b, 0, 32), _d(b, 2, 32)), lambda: uniform_levels(0, 31), (4, 24),
             lambda q: torch.cat([_fifth_bits(q.to(torch.uint8)), _nibbles(q)], dim=1)),
    "iq4_nl": (lambda b: (_d(b, 0, 32), None), lambda: table_levels(_IQ4), (2, 18),
               lambda v: _nibbles(torch.searchsorted(_IQ4, v))),
    "q2_k": (_q2k, lambda: uniform_levels(0, 3), (16, 80), pack_2bit),
    "q3_k": (_q3k, lambda: uniform_levels(-4, 3), (0, 96), _q3k_codes),
    "q4_k": (_k_affine, lambda: uniform_levels(0, 15), (16, 144), pack_nibbles_64),
    "q5_k": (_k_affine, lambda: uniform_levels(0, 31), (16, 176), _q5k_codes),
    "q6_k": (_q6k, lambda: uniform_levels(-32, 31), (0, 192), lambda q: torch.cat(pack_q6(q + 32), dim=1)),
    "tq1_0": (lambda b: (_d(b, 52, 256), None), lambda: uniform_levels(-1, 1), (0, 52), _tq1_codes),
    "tq2_0": (lambda b: (_d(b, 64, 256), None), lambda: uniform_levels(-1, 1), (0, 64),
              lambda q: pack_2bit((q + 1).to(torch.uint8))),
    "iq4_xs": (_iq4xs, lambda: table_levels(_IQ4), (8, 136), _iq4xs_codes),
}


# The byte offsets of each type's fp16 super-scales (its d, and dmin where it has one): every weight of a block is
# a multiple of them (d times integers, minus dmin times integers), so scaling them scales the whole block.
SCALE_FIELDS: dict[str, tuple[int, ...]] = {
    "q8_0": (0,), "q4_0": (0,), "q5_0": (0,), "iq4_nl": (0,), "q4_1": (0, 2), "q5_1": (0, 2),
    "q2_k": (80, 82), "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,), "tq1_0": (52,), "tq2_0": (64,),
    "iq4_xs": (0,), "iq3_s": (0,), "iq3_xxs": (0,), "iq2_s": (0,), "iq2_xs": (0,), "iq2_xxs": (0,),
}


def rescale_blocks(name: str, data: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``(N, block_bytes)`` blocks of type ``name`` with every value times ``factor`` ``(N,)`` (up to the fp16
    rounding of the scaled super-scales); a block whose scaled scales would not be finite fp16 is kept."""
    out = data.clone()
    fields = [f16_values(data[:, at:at + 2]) * factor for at in SCALE_FIELDS[name]]
    keep = ~torch.stack([torch.isfinite(f.to(torch.float16)) for f in fields]).all(0)
    for at, f in zip(SCALE_FIELDS[name], fields):
        out[:, at:at + 2] = torch.where(keep.unsqueeze(-1), data[:, at:at + 2], f16_bytes(f))
    return out


def _spec(name: str):
    codec = get_codec(name)
    if isinstance(codec, _LatticeCodec):  # a weight's level depends on its group's: no scalar grid
        raise ValueError(
            f"{name} has no per-weight grid: it stores each group of {codec.group} weights as one point "
            "of a fixed codebook (times a sign per weight and the sub-block scale), so the level of one weight "
            "depends on the others'; rounding onto it takes a whole group at a time (block_grid / with_levels "
            f"cover the scalar types: {', '.join(_SPECS)})")
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"no grid for GGML type {name!r}; known: {', '.join(_SPECS)}") from None


def block_grid(name: str, data: torch.Tensor) -> Grid:
    """The grid of every weight of the ``(N, block_bytes)`` blocks ``data`` of type ``name``.

    Raises:
        ValueError: for a lattice i-quant (``iq2_xxs`` .. ``iq3_s``), whose weights have no scalar grid.
    """
    spec = _spec(name)
    scale, offset = spec[0](data)
    return Grid(scale.contiguous(), None if offset is None else offset.contiguous(), spec[1]())


def with_levels(name: str, data: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``data`` with its codes replaced by ``levels`` ``(N, block)`` (level values of :func:`block_grid`)."""
    bt = block_type(name)
    spec = _spec(name)
    if tuple(levels.shape) != (data.shape[0], bt.block):
        raise ValueError(f"levels must be ({data.shape[0]}, {bt.block}), got {tuple(levels.shape)}")
    (a, b), pack = spec[2], spec[3]
    out = data.clone()
    out[:, a:b] = pack(levels)
    return out


# --- the lattice types: a group of 8 weights at a time -------------------------------------------

@dataclass(frozen=True)
class LatticeGrid:
    """Per weight ``(N, 256)``: its sub-block's scale ``db``; a group of 8 weights is rounded together
    onto the type's codebook (:func:`~quant.gguf._lattice.round_groups`), its signs beside it."""

    scale: torch.Tensor
    spec: LatticeSpec

    def round(self, x: torch.Tensor, db: torch.Tensor, w: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(M, 8)`` weights at scales ``db (M,)`` -> indices ``(M, 8 / n)``, sign bits and values ``(M, 8)``."""
        return round_groups(x, db, w, self.spec)


def _lattice_codec(name: str) -> _LatticeCodec:
    codec = get_codec(name)
    if not isinstance(codec, _LatticeCodec):
        raise ValueError(f"{name} is not a lattice type (those are iq2_xxs, iq2_xs, iq2_s, iq3_xxs, iq3_s): "
                         "use block_grid / with_levels")
    return codec


def lattice_grid(name: str, data: torch.Tensor) -> LatticeGrid:
    """The sub-block scale of every weight of the ``(N, block_bytes)`` lattice blocks ``data``."""
    codec = _lattice_codec(name)
    ls, _, _ = codec.unpack(data[:, 2:])
    db = codec.spec.sub_scale(f16_values(data[:, :2]).unsqueeze(-1), ls.float())  # (N, n_sub), the decoder's
    return LatticeGrid(_per_weight(db, codec.spec.sub).contiguous(), codec.spec)


def with_points(name: str, data: torch.Tensor, idx: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """``data`` with codebook indices ``idx (N, 256 / n)`` and sign bits ``neg (N, 256)`` in place of its own,
    ``d`` and the sub-block scales untouched (where the type stores 7 sign bits per 8, the groups of 8
    must hold an even number of negatives)."""
    codec = _lattice_codec(name)
    n = codec.group
    if tuple(idx.shape) != (data.shape[0], 256 // n) or tuple(neg.shape) != (data.shape[0], 256):
        raise ValueError(f"idx must be ({data.shape[0]}, {256 // n}) and neg ({data.shape[0]}, 256), got "
                         f"{tuple(idx.shape)} and {tuple(neg.shape)}")
    # Contiguous: a matrix of one block per row hands them in as transposed views.
    idx, neg = idx.contiguous(), neg.contiguous()
    if codec.spec.parity and bool((neg.view(-1, 8).sum(-1) % 2).any()):
        raise ValueError(f"{name} stores an even number of negatives per 8 weights; some groups have an odd one")
    ls, _, _ = codec.unpack(data[:, 2:])
    return torch.cat([data[:, :2], *codec.pack(None, ls, idx.long(), neg.bool())], dim=1)
