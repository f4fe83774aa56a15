"""GPTQ's error feedback onto every GGUF block type (option ``gptq``): plain GGUF bytes, lower output error.

Each type is quantized twice from one random weight and one correlated Hessian ``H = X^T X``: plainly
(the importance matrix only) and with ``gptq`` (the same scales, codes chosen column by column, each
column's error pushed forward). The bytes must still be the type's blocks (gguf-py decodes them as
we do), the scale fields those of the plain encoding, and the layer's output error
``tr((W - Q) H (W - Q)^T)`` lower.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import quant
from quant.gguf import BLOCK_TYPES, block_grid, get_codec, lattice_grid, quantize_blocks, with_points
from quant.gguf._iquants import _LatticeCodec
from quant.settings import QuantSetting

TYPES = sorted(BLOCK_TYPES)
LATTICE = sorted(n for n in TYPES if isinstance(get_codec(n), _LatticeCodec))
OUT, IN = 32, 512  # rows of 2 super-blocks: every type fits

# Output error with gptq / without, measured on the case below (torch 2.x CPU, one thread) with GPTQ's paper
# damping (0.01; the default is heavier, see test_the_default_damping_generalizes). Columns: gptq, gptq + act_order. The bound asserted is each + 0.06 (a change of encoder or of the column
# loop that loses a quarter of the gain fails). On SmolLM2's real Hessians a prototype measured
# 0.34-0.49x (q4_0, iq4_nl, q2_k, q3_k); act_order's large gain here comes from the inputs' 10x
# spread of scales (the columns with the largest inputs first). ternary types: the same grid, 3 levels.
RATIOS = {
    "q8_0": (0.769, 0.306), "q4_0": (0.749, 0.311), "q4_1": (0.806, 0.349), "q5_0": (0.749, 0.301),
    "q5_1": (0.817, 0.359), "iq4_nl": (0.744, 0.312), "q2_k": (0.842, 0.534), "q3_k": (0.783, 0.379),
    "q4_k": (0.797, 0.351), "q5_k": (0.799, 0.342), "q6_k": (0.804, 0.340), "tq1_0": (0.731, 0.508),
    "tq2_0": (0.731, 0.508), "iq4_xs": (0.735, 0.311), "iq3_s": (0.713, 0.307), "iq3_xxs": (0.737, 0.340),
    "iq2_s": (0.756, 0.397), "iq2_xs": (0.783, 0.448), "iq2_xxs": (0.732, 0.446),
}
MARGIN = 0.06


@pytest.fixture(scope="module")
def case() -> tuple[torch.Tensor, torch.Tensor]:
    """A gaussian ``(32, 512)`` weight and the Hessian of 1024 inputs with correlated columns of spread scales."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(OUT, IN, generator=gen)
    mix = torch.eye(IN) + 2.0 * torch.randn(IN, IN, generator=gen) / IN ** 0.5
    x = (torch.randn(1024, IN, generator=gen) @ mix) * torch.linspace(0.3, 3.0, IN)
    return w, x.T @ x


def output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    e = q - w  # (out, in)
    return float(((e @ h) * e).sum())


def scale_fields(name: str, blocks: torch.Tensor) -> list[torch.Tensor]:
    """What must not change: each weight's grid (scale, offset), or a lattice type's d and sub-block scales."""
    data = blocks.reshape(-1, BLOCK_TYPES[name].block_bytes)
    if name in LATTICE:
        return [data[:, :2], get_codec(name).unpack(data[:, 2:])[0], lattice_grid(name, data).scale]
    grid = block_grid(name, data)
    return [grid.scale] + ([] if grid.offset is None else [grid.offset])


@pytest.mark.parametrize("act_order", [False, True], ids=["columns", "act_order"])
@pytest.mark.parametrize("name", TYPES)
def test_gptq_keeps_the_scales_and_lowers_the_output_error(name: str, act_order: bool, case) -> None:
    w, h = case
    bt = BLOCK_TYPES[name]
    plain = quant.quantize(w, {"format": name}, hessian=h)
    opts = {"gptq": True, "damp": 0.01, **({"act_order": True} if act_order else {})}
    packed = quant.quantize(w, {"format": name, "options": opts}, hessian=h)
    blocks = packed.buffers["blocks"]
    assert blocks.shape == plain.buffers["blocks"].shape and packed.nbytes == plain.nbytes
    ref = gguf.quants.dequantize(blocks.numpy(), bt.qtype).reshape(OUT, IN)
    assert np.array_equal(ref, packed.dequantize().numpy())  # still the type's blocks, bit for bit
    for a, b in zip(scale_fields(name, blocks), scale_fields(name, plain.buffers["blocks"])):
        assert torch.equal(a, b)  # only the codes changed
    assert not torch.equal(blocks, plain.buffers["blocks"])
    ratio = output_error(w, packed.dequantize(), h) / output_error(w, plain.dequantize(), h)
    assert ratio < RATIOS[name][act_order] + MARGIN, f"{name}: gptq / plain output error {ratio:.3f}"
    again = quant.quantize(w, {"format": name, "options": opts}, hessian=h)
    assert torch.equal(again.buffers["blocks"], blocks)  # deterministic


@pytest.mark.parametrize("name", ["q2_k", "iq3_xxs", "q4_0"])
def test_the_default_damping_generalizes(name: str, case) -> None:
    """The feedback fits its calibration inputs; what counts is other inputs. With fewer calibration inputs than
    columns (a Hessian of deficient rank, as a down_proj of 8960 inputs on 8192 tokens), GPTQ's 0.01 damping
    lowers the calibration error yet raises the error on new inputs above the plain encoding's; the default
    (quant.formats.gguf.GGUF_GPTQ_DAMP) keeps most of the gain on new inputs."""
    w, _ = case
    gen = torch.Generator().manual_seed(1)
    mix = torch.eye(IN) + 2.0 * torch.randn(IN, IN, generator=gen) / IN ** 0.5
    scale = torch.linspace(0.3, 3.0, IN)
    calib, new = ((torch.randn(n, IN, generator=gen) @ mix) * scale for n in (384, 4096))
    h, h_new = calib.T @ calib, new.T @ new
    plain = quant.quantize(w, {"format": name}, hessian=h).dequantize()
    errors = {}
    for damp in (0.01, None):
        opts = {"gptq": True, "act_order": True, **({} if damp is None else {"damp": damp})}
        q = quant.quantize(w, {"format": name, "options": opts}, hessian=h).dequantize()
        errors[damp] = (output_error(w, q, h), output_error(w, q, h_new))
    assert errors[0.01][0] < errors[None][0] < output_error(w, plain, h)  # on its own inputs: less damping fits
    assert errors[None][1] < 0.95 * min(errors[0.01][1], output_error(w, plain, h_new))  # on new ones: it wins


@pytest.mark.parametrize("name", ["q4_k", "iq2_xxs"])
def test_without_a_hessian_gptq_is_the_plain_encoding(name: str, case) -> None:
    w, _ = case
    plain = quant.quantize(w, {"format": name})
    packed = quant.quantize(w, {"format": name, "options": {"gptq": True}})
    assert torch.equal(packed.buffers["blocks"], plain.buffers["blocks"])


def test_the_option_is_a_calibrated_error_feedback_setting() -> None:
    fmt = quant.get_format("q4_k")
    s = QuantSetting.from_dict({"format": "q4_k", "options": {"gptq": True, "imatrix": False}})
    assert fmt.uses_calibration(s) and fmt.feeds_errors(s) and quant.needs_hessians([s])
    assert not fmt.feeds_errors(QuantSetting.from_dict({"format": "q4_k"}))
    assert quant.get_format("gptq").feeds_errors(QuantSetting.from_dict({"format": "gptq"}))
    assert not quant.get_format("rtn").feeds_errors(QuantSetting.from_dict({"format": "rtn"}))
    from search.space import format_label, format_setting

    s = format_setting("q3_k+gptq", 3, 256)
    assert s.options == {"gptq": True} and format_label(s) == "q3_k+gptq"
    assert format_label(format_setting("q3_k+act_order+gptq", 3, 256)) == "q3_k+act_order+gptq"


@pytest.mark.parametrize("options, match", [
    ({"act_order": True}, "need 'gptq'"),
    ({"gptq": True, "damp": 0.0}, r"damp.*\(0, 1\]"),
    ({"gptq": 1}, "must be a boolean"),
])
def test_bad_options_are_refused(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantSetting.from_dict({"format": "q4_0", "options": options}).validate()


@pytest.mark.parametrize("name", LATTICE)
def test_lattice_groups_round_back_onto_their_own_points(name: str) -> None:
    """Decoded values are on the grid: rounding them again (scales fixed) and writing the points back
    gives the same values and, where each value has one code, the same bytes."""
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    data = quantize_blocks(name, x)
    deq = get_codec(name).dequantize_blocks(data)
    grid = lattice_grid(name, data)
    idx, neg, values = grid.round(deq.view(-1, 8), grid.scale.reshape(-1, 8)[:, 0])
    assert torch.equal(values.view(8, 256), deq)
    rewritten = with_points(name, data, idx.view(8, -1), neg.view(8, 256))
    assert torch.equal(get_codec(name).dequantize_blocks(rewritten), deq)
    _, idx0, neg0 = get_codec(name).unpack(data[:, 2:])
    assert torch.equal(with_points(name, data, idx0, neg0), data)


def test_the_gguf_space_offers_every_type_plainly_and_with_gptq() -> None:
    from search.request import SearchRequest
    from search.space import SearchSpace

    formats = SearchRequest(budget="3bpw", formats=["gguf"]).formats
    assert formats == list(BLOCK_TYPES) + [f"{n}+act_order+gptq" for n in BLOCK_TYPES]  # 19 -> 38
    matrices = {"model.layers.0.self_attn.q_proj": (576, 576), "model.layers.0.mlp.down_proj": (576, 1536)}
    space = SearchSpace(matrices, formats=tuple(formats), granularity="matrix")
    # 576-wide rows take the six 32-weight types, 1536-wide ones all 19: each twice.
    assert space.levels("model.layers.0.self_attn.q_proj") == 12 and space.levels("model.layers.0.mlp.down_proj") == 38
    ladder = space.ladders["model.layers.0.mlp.down_proj"]
    assert [s.format for s in ladder[:2]] == ["tq1_0", "tq1_0"]
    assert ladder[1].options == {"act_order": True, "gptq": True}
    assert quant.needs_hessians(space.settings())


def test_the_llamacpp_export_knows_every_type_and_maps_gptq_to_its_plain_type() -> None:
    from studies.export_runtimes import export_runtime

    gptq = {"gptq": True, "act_order": True}
    settings = {"model.layers.0.self_attn.q_proj": {"format": "iq2_xxs", "options": gptq},
                "model.layers.0.self_attn.k_proj": {"format": "q4_k", "options": {"gptq": True}},
                "model.layers.0.self_attn.v_proj": {"format": "iq4_xs"},
                "model.layers.0.mlp.down_proj": {"format": "iq3_s"},
                "model.layers.0.mlp.up_proj": {"format": "rtn", "bits": 3, "group_size": 64}}
    shapes = dict.fromkeys(settings, (512, 512)) | {"model.layers.0.mlp.down_proj": (512, 576)}
    policy = quant.Policy.from_dict({"format_version": 1, "matrices": settings})
    policy.shapes = shapes
    out = export_runtime(policy.to_dict(), "llamacpp")
    pairs = dict(line.split("=") for line in out.text.split())
    assert pairs == {"blk.0.attn_q.weight": "iq2_xxs", "blk.0.attn_k.weight": "q4_k", "blk.0.attn_v.weight": "iq4_xs",
                     "blk.0.ffn_down.weight": "iq3_s", "blk.0.ffn_up.weight": "q3_k"}
    # Only what llama.cpp changes is noted: the 576-wide rows iq3_s cannot hold, rtn's group 64 in
    # q3_k's sub-blocks of 16 (rtn is llama.cpp's own kind of quantizer: no format note).
    assert out.approximations == [
        "model.layers.0.mlp.down_proj (blk.0.ffn_down.weight): rows of 576 weights are not whole 256-weight blocks "
        "of iq3_s; llama-quantize falls back to another type for it",
        "model.layers.0.mlp.up_proj (blk.0.ffn_up.weight): group 64 -> q3_k's blocks of 16",
    ]
