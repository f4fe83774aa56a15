"""llama.cpp's block types as registered formats (quant/formats/gguf.py): the packed tensor is the GGUF tensor."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import quant
from quant.gguf import BLOCK_TYPES
from quant.settings import QuantSetting

TYPES = sorted(BLOCK_TYPES)


def gaussian(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", TYPES)
def test_the_packed_tensor_is_the_gguf_tensor(name: str) -> None:
    bt = BLOCK_TYPES[name]
    w = gaussian(6, 768)  # 768 = 24 x 32 = 3 x 256: every type takes it
    packed = quant.quantize(w, {"format": name})
    assert (packed.setting.bits, packed.setting.group_size) == (bt.bits, bt.block)
    assert packed.setting.describe() == name
    (blocks,) = packed.buffers.values()
    assert blocks.dtype == torch.uint8
    assert tuple(blocks.shape) == gguf.quants.quant_shape_to_byte_shape(w.shape, bt.qtype)  # rows x row bytes
    assert packed.nbytes == 6 * 768 // bt.block * bt.block_bytes == quant.get_format(name).expected_nbytes((6, 768), packed.setting)
    assert packed.bits_per_weight == bt.bits_per_weight
    ref = gguf.quants.dequantize(blocks.numpy(), bt.qtype)
    assert np.array_equal(ref, packed.dequantize().numpy())
    assert quant.get_format(name).ggml_type == bt.qtype
    assert quant.get_format(name).runtime(packed.setting).types == {"llamacpp": name}


def test_a_gguf_file_holds_exactly_the_packed_bytes(tmp_path) -> None:
    w = gaussian(8, 512, seed=1)
    packed = {n: quant.quantize(w, {"format": n}) for n in ("q4_k", "q8_0", "tq1_0")}
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for n, p in packed.items():
        writer.add_tensor(n, p.buffers["blocks"].numpy(), raw_dtype=quant.get_format(n).ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for t in gguf.GGUFReader(path).tensors:
        p = packed[t.name]
        assert int(t.n_bytes) == p.nbytes and tuple(int(d) for d in reversed(t.shape)) == p.shape
        assert np.array_equal(np.asarray(t.data).reshape(p.shape[0], -1), p.buffers["blocks"].numpy())


@pytest.mark.parametrize("name", ["q4_k", "q2_k", "q6_k", "tq2_0"])
def test_rows_that_are_not_whole_blocks_are_refused_up_front(name: str) -> None:
    fmt = quant.get_format(name)
    setting = QuantSetting.from_dict({"format": name})
    with pytest.raises(ValueError, match="rows of 576 weights"):
        fmt.check_shape((64, 576), setting)
    with pytest.raises(ValueError, match="256-weight blocks"):
        quant.quantize(gaussian(4, 576), setting)
    fmt.check_shape((64, 1536), setting)  # SmolLM2's down_proj rows fit


@pytest.mark.parametrize("setting", [{"format": "q4_k", "bits": 3}, {"format": "q4_0", "group_size": 64},
                                     {"format": "q8_0", "options": {"imatrix": 1}},
                                     {"format": "q5_k", "options": {"clip": True}}])
def test_other_geometry_or_options_are_refused(setting: dict) -> None:
    with pytest.raises(ValueError):
        QuantSetting.from_dict(setting)


def test_the_importance_is_the_hessian_diagonal_in_llamacpps_form() -> None:
    """Each weight's importance: its input column's energy (the Hessian's diagonal) times sqrt(sigma^2 + w^2),
    sigma^2 the block's mean square, as llama.cpp weighs its imatrix."""
    from quant.gguf import BLOCK_TYPES, quantize_blocks

    gen = torch.Generator().manual_seed(3)
    w = gaussian(64, 512, seed=2)
    x = torch.randn(1024, 512, generator=gen) * torch.exp(1.5 * torch.randn(512, generator=gen))  # uneven inputs
    h = x.T @ x
    out_err = lambda p: float((x @ (p.dequantize() - w).T).pow(2).mean())  # noqa: E731
    for name in ("q4_0", "q4_k", "q3_k", "iq4_nl"):
        plain = quant.quantize(w, {"format": name})
        weighted = quant.quantize(w, {"format": name}, hessian=h)
        assert out_err(weighted) < 0.9 * out_err(plain), name
        # Only the diagonal counts, and imatrix=false ignores the data.
        assert torch.equal(quant.quantize(w, {"format": name}, hessian=torch.diag(torch.diagonal(h))).buffers["blocks"],
                           weighted.buffers["blocks"])
        blocks = w.reshape(-1, BLOCK_TYPES[name].block)
        importance = torch.diagonal(h).expand(w.shape[0], -1).reshape(blocks.shape) * torch.sqrt(
            (blocks * blocks).mean(dim=1, keepdim=True) + blocks * blocks)
        assert torch.equal(quantize_blocks(name, blocks, importance).view(w.shape[0], -1), weighted.buffers["blocks"])
        off = quant.quantize(w, {"format": name, "options": {"imatrix": False}}, hessian=h)
        assert torch.equal(off.buffers["blocks"], plain.buffers["blocks"])
    assert quant.needs_hessians([QuantSetting.from_dict({"format": "q4_k"})])
    assert not quant.needs_hessians([QuantSetting.from_dict({"format": "q4_k", "options": {"imatrix": False}})])


@pytest.mark.parametrize("name", ["iq2_xxs", "iq3_xxs", "q2_k", "q3_k", "tq1_0"])
def test_unbias_gives_every_row_its_gain_back_in_a_plain_block_file(name: str) -> None:
    """``unbias``: each row's super-scales rescaled so that its gain on the inputs (sum e w w_hat / sum e w^2,
    e the Hessian diagonal) is 1 up to the fp16 rounding of the scales; the bytes stay the type's (gguf-py
    decodes them to our values) and nothing else moves: the codes are the plain encoding's."""
    from quant.gguf import BLOCK_TYPES as TYPES_
    from quant.gguf._grids import SCALE_FIELDS

    gen = torch.Generator().manual_seed(5)
    w = gaussian(32, 512, seed=4)
    x = torch.randn(1024, 512, generator=gen) * torch.exp(torch.randn(512, generator=gen))
    h = x.T @ x
    e = torch.diagonal(h)
    gain = lambda q: (w * q * e).sum(1) / (w * w * e).sum(1)  # noqa: E731
    plain = quant.quantize(w, {"format": name}, hessian=h)
    fixed = quant.quantize(w, {"format": name, "options": {"unbias": True}}, hessian=h)
    assert float((gain(plain.dequantize()) - 1).abs().max()) > 5e-3  # at these bits the plain encoding shrinks rows
    assert float((gain(fixed.dequantize()) - 1).abs().max()) < 2e-3
    values = gguf.quants.dequantize(fixed.buffers["blocks"].numpy().reshape(-1), TYPES_[name].qtype)
    assert np.array_equal(values.reshape(w.shape), fixed.dequantize().numpy())
    assert fixed.nbytes == plain.nbytes
    # Only the fp16 super-scales differ: every other byte (codes, sub-block scales) is the plain encoding's.
    bt = TYPES_[name]
    other = torch.ones(bt.block_bytes, dtype=torch.bool)
    for at in SCALE_FIELDS[name]:
        other[at:at + 2] = False
    a, b = (p.buffers["blocks"].view(-1, bt.block_bytes) for p in (plain, fixed))
    assert torch.equal(a[:, other], b[:, other]) and not torch.equal(a, b)
    with pytest.raises(ValueError, match="unbias"):
        QuantSetting.from_dict({"format": name, "options": {"unbias": True, "gptq": True}}).validate()


def test_a_hessian_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="hessian must be"):
        quant.quantize(gaussian(4, 256), {"format": "q4_k"}, hessian=torch.eye(128))


def test_a_calibrated_policy_of_block_types_runs_the_model(evaluator) -> None:
    # The tiny model's 64- and 128-wide rows take the 32-weight types (not the 256-weight ones).
    names = list(evaluator.matrices)
    q8 = evaluator.evaluate(quant.Policy.uniform(names, QuantSetting.from_dict({"format": "q8_0"})))
    q4 = evaluator.evaluate(quant.Policy.uniform(names, QuantSetting.from_dict({"format": "q4_0"})))
    assert 0 <= q8["kl"] < q4["kl"] and q8["kl"] < 0.01
    assert evaluator.hessians  # the Hessians were collected for the block types' importance
