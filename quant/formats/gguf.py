"""llama.cpp's block types as formats: ``q8_0`` ... ``q4_k`` ... ``tq2_0``, ``iq4_xs`` ... ``iq2_xxs``, one each.

Each format is one GGML type of :data:`quant.gguf.BLOCK_TYPES`, with that type's fixed geometry:
``quant.quantize(w, {"format": "q4_k"})`` gets bits 4 and group 256 (the super-block) by default,
and no other bits or group is allowed. The packed tensor holds one buffer, ``"blocks"``: the
tensor's GGUF bytes, ``(out, in / block * block_bytes)`` uint8, rows in order, each row its blocks
in order, exactly as a GGUF file stores the tensor (``nbytes`` is its size in the file). A matrix
whose rows are not whole blocks (SmolLM2's 576-wide rows for the 256-weight types) is refused by
:meth:`~GGUFBlockFormat.check_shape` and by ``quantize``.

Calibration: ``quant.quantize(w, setting, hessian=H)`` weighs each weight's error by its input
column's energy ``H[j, j]`` (the diagonal of ``H = X^T X``: llama.cpp's importance matrix), so the
scales are chosen where the layer's output error is made. Without ``H`` (or with option
``imatrix: false``) every weight counts alike.

Option ``gptq`` (``"q4_k+gptq"`` in ``--formats``): GPTQ's error feedback onto the type's own grid
(:mod:`quant.formats._gguf_feedback`): the blocks' scales are fixed by that plain encoding, then the
codes are chosen column by column with the whole Hessian ``H``, each column's error pushed onto the
columns not yet quantized. The bytes are the same kind of blocks (only the codes differ), so the
file is a plain GGUF. ``act_order`` and ``damp`` as the ``gptq`` format has them. Without ``H`` the
plain encoding is returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from quant.formats._base import Format, register_format
from quant.formats._gguf_feedback import gptq_blocks
from quant.formats._options import FormatOptions
from quant.gguf import BLOCK_TYPES, BlockType, dequantize_blocks, quantize_blocks, rescale_blocks
from quant.packed import PackedTensor
from quant.primitives import one_thread
from quant.settings import QuantSetting

__all__ = ["GGUFBlockFormat", "GGUFOptions"]


# GPTQ's damping on a GGUF grid: 0.3 of the mean Hessian diagonal, not the 0.01 of GPTQ's paper. The feedback fits
# the calibration windows; held-out text is what counts. Qwen2.5-Coder-1.5B layer 0 at q2_k, calibrated on 32 x 256
# Shakespeare tokens, output error on Python's help texts relative to the weights' own: plain 0.0162, damp 0.01
# 0.0147, 0.1 0.0123, 0.3 0.0119, 1.0 0.0123; down_proj (8960 inputs, more than the 8192 tokens) 0.0395 plain,
# 0.0851 at damp 0.01 (twice the plain error), 0.0401 at 0.3 (benchmarks/results/gguf_heldout_q2_k.txt).
GGUF_GPTQ_DAMP = 0.3


@dataclass(frozen=True)
class GGUFOptions(FormatOptions):
    """Options of every GGUF block format.

    Attributes:
        imatrix: weigh the encoder's error by the calibration Hessian's diagonal when one is given.
        gptq: choose the codes by GPTQ's error feedback with the calibration Hessian, the scales fixed.
        act_order: with ``gptq``, quantize columns by decreasing Hessian diagonal.
        damp: with ``gptq``, fraction of the mean Hessian diagonal added to it for stability, in (0, 1].
        unbias: with a Hessian, rescale each row's super-scales so that the row keeps its output's gain
            (``sum e w^2 = sum e w w_hat``, ``e`` the Hessian diagonal): the least-squares scales shrink rows
            (Qwen2.5-Coder-1.5B at iq2_xxs: matrix gains 0.94-1.00, llama.cpp's own encoder's 0.99-1.07), and
            that shared shrink costs more KL than the lower error saves (docs/exports.md). Off by default until
            measured on every type.
    """

    imatrix: bool = True
    gptq: bool = False
    act_order: bool = False
    damp: float = GGUF_GPTQ_DAMP
    unbias: bool = False

    def check(self) -> None:
        if not 0.0 < self.damp <= 1.0:
            raise ValueError(f"option 'damp' must be in (0, 1] (a fraction of the mean Hessian diagonal "
                             f"added for stability), got {self.damp!r}")
        if not self.gptq and (self.act_order or self.damp != GGUF_GPTQ_DAMP):
            raise ValueError("options 'act_order' and 'damp' tune the error feedback: they need 'gptq': true")
        if self.unbias and self.gptq:
            raise ValueError("option 'unbias' rescales the plain encoding; with 'gptq' it is not measured")


class GGUFBlockFormat(Format):
    """One GGML block type; subclasses (one per type, made below) set :attr:`block_type`."""

    block_type: BlockType
    Options = GGUFOptions
    calibration = ("hessian",)
    native_runtimes = ("llamacpp",)

    @property
    def ggml_type(self):
        """The ``gguf.GGMLQuantizationType`` whose bytes this format writes (for the GGUF writer)."""
        return self.block_type.qtype

    def uses_calibration(self, setting: QuantSetting) -> bool:
        opts = self.options_of(setting)
        return opts.imatrix or opts.gptq

    def feeds_errors(self, setting: QuantSetting) -> bool:
        return self.options_of(setting).gptq

    def check_shape(self, shape: tuple[int, int], setting: QuantSetting) -> None:
        bt = self.block_type
        if len(shape) != 2 or shape[1] % bt.block:
            raise ValueError(f"{bt.name} stores rows of whole {bt.block}-weight blocks; a matrix of shape "
                             f"{tuple(shape)} has rows of {shape[-1]} weights (choose a type whose block divides "
                             "the row length)")

    def code_bits(self, setting: QuantSetting) -> float:
        if self.block_type.name.startswith("tq"):
            return round(math.log2(3), 2)  # a trit's information, as the ternary format says
        return float(self.block_type.bits)

    def quantize(self, weight: torch.Tensor, setting: QuantSetting, **calibration: Any) -> PackedTensor:
        unknown = set(calibration) - set(self.calibration)
        if unknown:
            raise ValueError(f"{self.name} takes calibration 'hessian' ((in, in) sum of x x^T), got {sorted(unknown)}")
        shape = tuple(weight.shape)
        self.check_shape(shape, setting)
        bt = self.block_type
        importance = None
        opts = self.options_of(setting)
        h = calibration.get("hessian")
        if h is not None and tuple(h.shape) != (shape[1], shape[1]):
            raise ValueError(f"hessian must be ({shape[1]}, {shape[1]}) for a weight of shape {shape}, "
                             f"got {tuple(h.shape)}")
        energy = None if h is None else torch.diagonal(h).float().clamp(min=0)  # (in,): each column's sum of x_j^2
        if energy is not None and opts.imatrix:
            # llama.cpp's form: the column's energy times sqrt(sigma^2 + w^2), sigma^2 the block's mean square, so
            # large weights count more than the diagonal alone says. Qwen2.5-Coder-1.5B layer 0 at q2_k: output
            # error on held-out text 0.96x the diagonal's over the layer (lower on q, gate and down_proj, higher
            # on k and v_proj: benchmarks/results/gguf_heldout_q2_k.txt); the file's KL in llama-perplexity
            # 1.02x llama.cpp's own encoder instead of 1.14x (gguf_encoders).
            x = weight.detach().float().reshape(-1, bt.block)
            importance = energy.expand(shape[0], -1).reshape(-1, bt.block) * torch.sqrt(
                (x * x).mean(dim=1, keepdim=True) + x * x)
        if h is not None and opts.gptq:
            with one_thread():  # the same codes whatever the caller's thread count (see one_thread)
                blocks = gptq_blocks(bt.name, weight.detach(), h.detach(), importance, opts.damp, opts.act_order)
        else:
            blocks = quantize_blocks(bt.name, weight.float().reshape(-1, bt.block), importance)
            if energy is not None and opts.unbias:
                blocks = _unbiased(bt.name, weight, blocks, energy)
        return PackedTensor(setting=setting, shape=shape, buffers={"blocks": blocks.view(shape[0], -1)})

    def decode(self, packed: PackedTensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        data = packed.buffers["blocks"]
        if rows is not None:
            data = data[rows]
        bt = self.block_type
        return dequantize_blocks(bt.name, data.reshape(-1, bt.block_bytes)).view(data.shape[0], packed.shape[1])

    def expected_nbytes(self, shape: tuple[int, int], setting: QuantSetting) -> int:
        self.check_shape(shape, setting)
        return shape[0] * self.block_type.row_bytes(shape[1])


def _unbiased(name: str, weight: torch.Tensor, blocks: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """``blocks`` (one row of ``weight`` after another) with each row's super-scales times
    ``sum e w^2 / sum e w w_hat``: the row's gain on inputs of column energies ``e`` made 1."""
    w = weight.detach().float()
    q = dequantize_blocks(name, blocks).view(w.shape)
    num, den = (w * w * energy).sum(1), (w * q * energy).sum(1)
    factor = torch.where((den > 0) & (num > 0), num / den.clamp(min=1e-30), torch.ones_like(num))
    return rescale_blocks(name, blocks, factor.repeat_interleave(blocks.shape[0] // w.shape[0]))


def _register(bt: BlockType) -> type[GGUFBlockFormat]:
    attrs = {"name": bt.name, "layout": f"gguf-{bt.name}", "block_type": bt,
             "bits_range": (bt.bits, bt.bits), "group_sizes": (bt.block,),
             "default_bits": bt.bits, "default_group_size": bt.block, "runtime_types": {"llamacpp": bt.name},
             "__doc__": f"GGML type {bt.qtype.name}: blocks of {bt.block} weights in {bt.block_bytes} bytes "
                        f"({bt.bits_per_weight:g} bits per weight)."}
    return register_format(type(f"GGUF_{bt.name.upper()}", (GGUFBlockFormat,), attrs))


FORMATS = {name: _register(bt) for name, bt in BLOCK_TYPES.items()}
