"""The GGML block types we encode: geometry as data, read from gguf-py's own table."""

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
    """

    name: str
    qtype: GGMLQuantizationType
    block: int
    block_bytes: int
    bits: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block

    def row_bytes(self, row_length: int) -> int:
        """Bytes of one row of ``row_length`` weights (which must be a whole number of blocks)."""
        if row_length % self.block:
            raise ValueError(f"{self.name} needs rows that are a multiple of its {self.block}-weight block; "
                             f"a row of {row_length} weights is not (choose a type with a block dividing it)")
        return row_length // self.block * self.block_bytes


def _make(name: str, bits: int) -> BlockType:
    qtype = GGMLQuantizationType[name.upper()]
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    return BlockType(name, qtype, block, block_bytes, bits)


# Name -> nominal bits; everything else comes from GGML_QUANT_SIZES.
BLOCK_TYPES: dict[str, BlockType] = {n: _make(n, b) for n, b in [
    ("q8_0", 8), ("q4_0", 4), ("q4_1", 4), ("q5_0", 5), ("q5_1", 5), ("iq4_nl", 4),
    ("q2_k", 2), ("q3_k", 3), ("q4_k", 4), ("q5_k", 5), ("q6_k", 6), ("tq1_0", 2), ("tq2_0", 2),
    ("iq4_xs", 4), ("iq3_s", 3), ("iq3_xxs", 3), ("iq2_s", 2), ("iq2_xs", 2), ("iq2_xxs", 2),
]}


def block_type(name: str) -> BlockType:
    """The :class:`BlockType` called ``name`` (``"q4_k"``)."""
    try:
        return BLOCK_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown GGML block type {name!r}; known: {', '.join(BLOCK_TYPES)}") from None
