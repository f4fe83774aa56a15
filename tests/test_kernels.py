"""Kernels compute what dequantize-then-matmul computes: every affine-int width (rtn, gptq), every format."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import quant
from quant.formats import format_names
from quant.kernels import GenericKernel, Int4Kernel, Int8Kernel, RTNTiledKernel, prepare
from quant.kernels._registry import kernel_factory
from tests.test_formats import CASES, fitting

GROUPS = [32, 128, None]  # 128 does not divide 576: a padded last group; None: per channel


def _weight(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def _x(m: int, inp: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, inp, generator=torch.Generator().manual_seed(seed))


def _close(y: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    # Tolerance relative to the output's magnitude: a dot of 576 terms has no per-element scale.
    err = float((y - ref).abs().max())
    assert err <= rel * float(ref.abs().max()), f"max error {err:.3g} vs output max {float(ref.abs().max()):.3g}"


def _tolerance(kernel: object) -> float:
    # The int kernels run bfloat16 activations (see quant/kernels/cpu.py); the rest is float32.
    return 1e-2 if isinstance(kernel, (Int4Kernel, Int8Kernel)) else 1e-5


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("m", [1, 3])
def test_rtn_kernel_matches_dequantize(bits: int, group: int | None, symmetric: bool, m: int) -> None:
    packed = quant.quantize(_weight(96, 576), {"bits": bits, "group_size": group,
                                                "options": {"symmetric": symmetric}})
    kernel = prepare(packed)
    x = _x(m, 576)
    _close(kernel(x), x @ packed.dequantize().t(), _tolerance(kernel))


def _rtn(out: int, bits: int, group: int | None, symmetric: bool = False) -> quant.PackedTensor:
    return quant.quantize(_weight(out, 576), {"bits": bits, "group_size": group, "options": {"symmetric": symmetric}})


def _gptq(out: int, bits: int, group: int | None, symmetric: bool = False) -> quant.PackedTensor:
    # A real Hessian, so the codes differ from rtn's: the kernel must read gptq's own codes.
    x = _x(256, 576, seed=7) * (0.2 + 2 * torch.rand(576, generator=torch.Generator().manual_seed(8)))
    return quant.quantize(_weight(out, 576), {"format": "gptq", "bits": bits, "group_size": group,
                                              "options": {"symmetric": symmetric}}, hessian=x.T @ x)


@pytest.mark.parametrize("bits,group,out,kind", [(4, 32, 96, Int4Kernel), (3, 128, 96, Int4Kernel),
                                                 (2, None, 90, RTNTiledKernel), (6, 64, 96, Int8Kernel),
                                                 (8, None, 90, Int8Kernel)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_runs_the_affine_int_kernels_of_its_layout(bits: int, group: int | None, out: int, kind: type,
                                                        symmetric: bool) -> None:
    packed = _gptq(out, bits, group, symmetric)
    assert not torch.equal(packed.buffers["codes"], _rtn(out, bits, group, symmetric).buffers["codes"])  # error feedback moved codes
    kernel = prepare(packed)
    assert type(kernel) is kind
    x = _x(2, 576)
    _close(kernel(x), x @ packed.dequantize().t(), _tolerance(kernel))


def test_kernels_are_chosen_by_layout_not_by_format_name() -> None:
    assert quant.get_format("gptq").layout == quant.get_format("rtn").layout == "affine-int"
    others = {quant.get_format(n).layout for n in format_names()} - {"affine-int"}
    assert others and all(kernel_factory(layout, "cpu") is None for layout in others)
    assert kernel_factory("affine-int", "cpu") is not None


def test_int_kernels_chosen_where_they_fit() -> None:
    def kind(out: int, bits: int, group: int | None) -> type:
        return type(prepare(quant.quantize(_weight(out, 576), {"bits": bits, "group_size": group})))

    assert kind(96, 4, 32) is Int4Kernel and kind(96, 4, None) is Int4Kernel  # per channel: groups of 64
    # 128 does not divide 576: kernel groups of 64 over the real 576 columns, no padded activations.
    assert prepare(quant.quantize(_weight(96, 576), {"bits": 4, "group_size": 128})).kernel_group == 64
    assert kind(90, 4, 32) is RTNTiledKernel  # the int4 op needs out % 16 == 0
    assert kind(96, 2, 32) is Int4Kernel and kind(96, 3, 128) is Int4Kernel  # narrower codes, shifted
    assert kind(96, 8, None) is Int8Kernel and kind(96, 5, 64) is Int8Kernel  # one int8 product per group
    assert kind(90, 8, 128) is Int8Kernel  # any row count; a padded last group meets padded activations
    gptq = quant.quantize(_weight(96, 576), {"format": "gptq", "bits": 4, "group_size": 32})
    assert type(prepare(gptq)) is Int4Kernel  # gptq stores rtn's layout
    with_outliers = quant.quantize(_weight(96, 576), {"bits": 4, "group_size": 32, "options": {"outlier_frac": 0.01}})
    assert type(prepare(with_outliers)) is GenericKernel


def test_rtn_tiled_kernel_ragged_tiles() -> None:
    packed = quant.quantize(_weight(50, 576), {"bits": 5, "group_size": 128})
    x = _x(2, 576)
    torch.testing.assert_close(RTNTiledKernel(packed, tile_rows=16)(x), x @ packed.dequantize().t(),
                               rtol=1e-5, atol=1e-4)


def test_generic_path_matches_int_kernels_exactly_where_both_apply() -> None:
    # The generic path is float32-exact; it pins the int kernels' bfloat16 error.
    packed = quant.quantize(_weight(96, 576), {"bits": 4, "group_size": 64})
    x = _x(1, 576)
    exact = GenericKernel(packed, tile_rows=16)(x)
    torch.testing.assert_close(exact, x @ packed.dequantize().t(), rtol=1e-5, atol=1e-4)
    _close(prepare(packed)(x), exact, 1e-2)


@pytest.mark.parametrize("name,setting", [(n, s) for n, cases in CASES.items() for s, _ in cases],
                         ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("m", [1, 2])
def test_every_format_through_its_kernel(name: str, setting: dict, m: int) -> None:
    assert name in format_names()
    rows, cols = fitting(name, setting, (48, 576))  # 768-wide for llama.cpp's 256-weight blocks
    packed = quant.quantize(_weight(rows, cols), {"format": name, **setting})
    kernel = prepare(packed)
    x = _x(m, cols)
    _close(kernel(x), x @ packed.dequantize().t(), _tolerance(kernel))


def test_generic_tiles_cover_ragged_rows() -> None:
    packed = quant.quantize(_weight(50, 576), {"format": "lloyd", "bits": 3, "group_size": 64})
    x = _x(2, 576)
    torch.testing.assert_close(GenericKernel(packed, tile_rows=16)(x), x @ packed.dequantize().t(),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
def test_quant_linear_dispatch(bias: bool) -> None:
    w = _weight(64, 576)
    packed = quant.quantize(w, {"format": "lloyd", "bits": 3, "group_size": 64})  # generic path: float32-exact
    b = torch.randn(64) if bias else None
    layer = quant.QuantLinear(packed, b)
    ref = F.linear(_x(5, 576), packed.dequantize(), b)
    assert layer._kernel is None
    one = layer(_x(5, 576)[:1].view(1, 1, 576))  # decode: the kernel path, prepared lazily
    assert layer._kernel is not None and one.shape == (1, 1, 64)
    torch.testing.assert_close(one.view(1, 64), ref[:1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer(_x(5, 576).view(1, 5, 576)).view(5, 64), ref)  # prefill: dense path
    layer.packed = quant.quantize(w, {"bits": 4, "group_size": 32})
    assert layer._kernel is None  # a swapped packed tensor drops the runtime layout
    cached = quant.QuantLinear(packed, b, cache_dense=True)
    cached(_x(1, 576))
    assert cached._kernel is None  # the search workers' cache_dense keeps the dense path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("m", [1, 3, 80])  # 80: two programs along the batch
@pytest.mark.parametrize("make", [_rtn, _gptq], ids=["rtn", "gptq"])  # gptq through its layout's kernel
def test_triton_kernel_matches_dequantize(bits: int, group: int | None, symmetric: bool, m: int, make) -> None:
    pytest.importorskip("triton")
    from quant.kernels.triton import TritonRTNKernel

    packed = make(96, bits, group, symmetric)
    ref = (_x(m, 576) @ packed.dequantize().t()).cuda()  # quant.packing unpacks on the CPU
    on_gpu = quant.PackedTensor(packed.setting, packed.shape, {k: v.cuda() for k, v in packed.buffers.items()})
    kernel = prepare(on_gpu)
    assert isinstance(kernel, TritonRTNKernel)
    x = _x(m, 576).cuda()
    torch.testing.assert_close(kernel(x), ref, rtol=1e-4, atol=1e-3 * float(ref.abs().max()))


def test_cpu_machines_never_need_triton() -> None:
    # Without CUDA the Triton module answers "not available" (it imports even where triton is
    # missing) and prepare() stays on the CPU kernels.
    from quant.kernels import triton as triton_kernels

    packed = quant.quantize(_weight(32, 64), {"bits": 4, "group_size": 32})
    if not torch.cuda.is_available():
        assert triton_kernels.available() is False
        assert triton_kernels.affine_int_cuda(packed) is None
    assert type(prepare(packed)).__module__ == "quant.kernels.cpu"
