"""The GGML block types we encode: geometry as data, read from gguf-py's own table.

Pure data, no torch: ``studies/export_runtimes.py`` (which must not import torch) loads this file
alone for the geometry of llama.cpp's types, so it imports nothing but gguf-py's constants.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = ["BlockType", "BLOCK_TYPES", "block_type"]


@dataclass(frozen=True)
class BlockType:
    """One GGML quantization type's block geometry.

    Attributes:
        name: our lower-case name (``"q4_k"``), also the registered format's name.
        qtype: gguf-py's :class:`GGMLQuantizationType` (the id written in a GGUF file).
        block: weights per block (32, or 256 for a k-quant / ternary super-block).
        block_bytes: bytes per block in the file.
        bits: the whole bits a :class:`~quant.settings.QuantSetting` names it by (the ternary
            types say 2, like the ``ternary`` format); the true rate is :attr:`bits_per_weight`.
        sub_block: weights per scale (a k-quant's or i-quant's sub-block; the block itself for the
            legacy and ternary types), as ggml-common.h lays it out.
    """

    name: str
    qtype: GGMLQuantizationType
    block: int
    block_bytes: int
    bits: int
    sub_block: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block

    def row_bytes(self, row_length: int) -> int:
        """Bytes of one row of ``row_length`` weights (which must be a whole number of blocks)."""
        if row_length % self.block:
            raise ValueError(f"{self.name} needs rows that are a multiple of its {self.block}-weight block; "
                             f"a row of {row_length} weights is not (choose a type with a block dividing it)")
        return row_length // self.block * self.block_bytes


def _make(name: str, bits: int, sub_block: int | None) -> BlockType:
    qtype = GGMLQuantizationType[name.upper()]
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    return BlockType(name, qtype, block, block_bytes, bits, sub_block or block)


# Name -> nominal bits and weights per sub-block scale (None: one scale per block); the rest comes from
# GGML_QUANT_SIZES.
BLOCK_TYPES: dict[str, BlockType] = {n: _make(n, b, sub) for n, b, sub in [
    ("q8_0", 8, None), ("q4_0", 4, None), ("q4_1", 4, None), ("q5_0", 5, None), ("q5_1", 5, None),
    ("iq4_nl", 4, None), ("q2_k", 2, 16), ("q3_k", 3, 16), ("q4_k", 4, 32), ("q5_k", 5, 32), ("q6_k", 6, 16),
    ("tq1_0", 2, None), ("tq2_0", 2, None), ("iq4_xs", 4, 32), ("iq3_s", 3, 32), ("iq3_xxs", 3, 32),
    ("iq2_s", 2, 16), ("iq2_xs", 2, 16), ("iq2_xxs", 2, 32),
]}


def block_type(name: str) -> BlockType:
    """The :class:`BlockType` called ``name`` (``"q4_k"``)."""
    try:
        return BLOCK_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown GGML block type {name!r}; known: {', '.join(BLOCK_TYPES)}") from None
