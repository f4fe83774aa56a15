"""GGML's block formats (the types a GGUF file stores), with encoders of our own.

One codec per type, each a pure pair ``quantize_blocks(x, importance) -> uint8 (n_blocks,
block_bytes)`` / ``dequantize_blocks(uint8) -> float32 (n_blocks, block)``, registered by name;
the geometry of every type is data in :data:`BLOCK_TYPES` (from gguf-py's ``GGML_QUANT_SIZES``).
The byte layouts are ggml's (``ggml-common.h``); gguf-py's ``gguf.quants.dequantize`` of our bytes
equals :func:`dequantize_blocks` bit for bit (the tests check every type). :func:`block_grid` reads
each weight's fixed grid back from the bytes and :func:`with_levels` writes other codes on it (for
error feedback with the scales fixed); the lattice i-quants (iq2_xxs .. iq3_s), whose groups of 8
or 4 weights are codebook points, have no per-weight grid: :func:`lattice_grid` and :func:`with_points`
do the same for them a group of 8 weights at a time.
"""

from quant.gguf._table import BLOCK_TYPES, BlockType, block_type
from quant.gguf._codec import Codec, codec_names, dequantize_blocks, get_codec, quantize_blocks, register_codec
from quant.gguf import _legacy  # noqa: F401  (registers q8_0, q4_0, q5_0, q4_1, q5_1, iq4_nl)
from quant.gguf import _kquants  # noqa: F401  (registers q2_k, q3_k, q4_k, q5_k, q6_k)
from quant.gguf import _ternary  # noqa: F401  (registers tq1_0, tq2_0)
from quant.gguf import _iquants  # noqa: F401  (registers iq4_xs, iq3_s, iq3_xxs, iq2_s, iq2_xs, iq2_xxs)
from quant.gguf._grids import (Grid, LatticeGrid, block_grid, lattice_grid, rescale_blocks, with_levels,
                              with_points)

__all__ = ["BLOCK_TYPES", "BlockType", "Codec", "Grid", "LatticeGrid", "block_grid", "block_type", "codec_names",
           "dequantize_blocks", "get_codec", "lattice_grid", "quantize_blocks", "register_codec", "rescale_blocks",
           "with_levels", "with_points"]
