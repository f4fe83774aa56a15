"""Conformance suite run against every registered format, plus each format's known answers."""

from __future__ import annotations

import math

import pytest
import torch

import quant
from quant.formats import format_names, get_format
from quant.formats.ternary import pack_trits, trit_bytes, unpack_trits
from quant.formats.turbo import fwht, lloyd_max_gaussian
from quant.outliers import outlier_count
from quant.settings import QuantSetting

# (setting, bound on relative MSE = MSE / variance on i.i.d. Gaussian weights).
# Bounds sit ~15-30% above what each case measures, so a regression trips them.
CASES: dict[str, list[tuple[dict, float]]] = {
    "rtn": [
        ({"bits": 4, "group_size": 128}, 0.012),
        ({"bits": 3, "group_size": 64, "options": {"symmetric": True}}, 0.075),
        ({"bits": 3, "group_size": 128, "options": {"clip": True}}, 0.042),
        ({"bits": 3, "group_size": 128, "options": {"outlier_frac": 0.01}}, 0.042),
        ({"bits": 3, "group_size": None, "options": {"outlier_frac": 0.02, "symmetric": True}}, 0.058),
    ],
    "gptq": [  # no calibration here: identity Hessian, so rtn's numbers
        ({"bits": 4, "group_size": 128}, 0.012),
        ({"bits": 3, "group_size": None, "options": {"symmetric": True, "damp": 0.05}}, 0.12),
    ],
    "turbo": [
        ({"bits": 2, "group_size": 128}, 0.125),
        ({"bits": 4, "group_size": 64, "options": {"seed": 7}}, 0.0105),
        ({"bits": 3, "group_size": 256, "options": {"qjl": True}}, 0.07),
        ({"bits": 1, "group_size": 32}, 0.38),
        ({"bits": 3, "group_size": 128, "options": {"outlier_frac": 0.01, "seed": 1}}, 0.04),
        ({"bits": 3, "group_size": 64, "options": {"rotation": "orthogonal", "seed": 3}}, 0.04),
        ({"bits": 2, "group_size": 128, "options": {"half_scales": True, "qjl": True}}, 0.2),
        ({"bits": 3, "group_size": 64, "options": {"half_scales": True}}, 0.04),
    ],
    "lloyd": [
        ({"bits": 2, "group_size": 128}, 0.13),
        ({"bits": 3, "group_size": None}, 0.04),
        ({"bits": 4, "group_size": 64, "options": {"preset": "nf"}}, 0.011),
        ({"bits": 2, "group_size": 32, "options": {"preset": "nf"}}, 0.21),
        ({"bits": 3, "group_size": 64, "options": {"preset": "nf", "outlier_frac": 0.01}}, 0.04),
    ],
    "ternary": [
        ({"bits": 2, "group_size": 128}, 0.24),
        ({"bits": 2, "group_size": 32}, 0.23),
        ({"bits": 2, "group_size": 64, "options": {"outlier_frac": 0.02}}, 0.21),
    ],
    "vq": [
        ({"bits": 4, "group_size": 128}, 0.13),
        ({"bits": 5, "group_size": 64, "options": {"dim": 2}}, 0.075),
        ({"bits": 8, "group_size": 128, "options": {"dim": 4}}, 0.11),
        ({"bits": 4, "group_size": 128, "options": {"dim": 2, "outlier_frac": 0.01}}, 0.12),
    ],
    # llama.cpp's block types (quant/formats/gguf.py): fixed geometry, so the setting is the name.
    "q8_0": [({}, 2.8e-5)], "q4_0": [({}, 0.0078)], "q4_1": [({}, 0.0058)], "q5_0": [({}, 0.0019)],
    "q5_1": [({}, 0.0014)], "iq4_nl": [({}, 0.0065)], "q2_k": [({}, 0.08)], "q3_k": [({}, 0.024)],
    "q4_k": [({}, 0.0058)], "q5_k": [({}, 0.0014)], "q6_k": [({}, 0.00034)], "tq1_0": [({}, 0.22)],
    "tq2_0": [({}, 0.22)], "iq4_xs": [({}, 0.0068)], "iq3_s": [({}, 0.02)], "iq3_xxs": [({}, 0.037)],
    "iq2_s": [({}, 0.068)], "iq2_xs": [({}, 0.097)], "iq2_xxs": [({}, 0.13)],
}

PARAMS = [pytest.param(name, s, bound, id=QuantSetting.from_dict({"format": name, **s}).describe())
          for name, cases in CASES.items() for s, bound in cases]


def gaussian(out: int = 48, inp: int = 576, seed: int = 0) -> torch.Tensor:
    # 576 = SmolLM2's hidden size: groups of 128 / 256 leave a padded last group.
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def fitting(name: str, setting: dict, shape: tuple[int, int]) -> tuple[int, int]:
    """``shape``, or, for a format whose rows must be whole blocks and refuses it (576-wide rows in
    llama.cpp's 256-weight super-blocks), the same rows widened to 768 = 3 x 256: every format then
    runs every check, and the refusal itself is checked in test_nbytes_are_the_buffers."""
    try:
        get_format(name).check_shape(shape, QuantSetting.from_dict({"format": name, **setting}))
        return shape
    except ValueError:
        return (shape[0], 768)


def rel_mse(w: torch.Tensor, d: torch.Tensor) -> float:
    return float((w - d).pow(2).mean() / w.var())


def test_every_registered_format_has_cases() -> None:
    assert sorted(CASES) == format_names()


@pytest.mark.parametrize("name,setting,bound", PARAMS)
def test_round_trip_error(name: str, setting: dict, bound: float) -> None:
    w = gaussian(*fitting(name, setting, (48, 576)))
    packed = quant.quantize(w, {"format": name, **setting})
    d = packed.dequantize()
    assert d.shape == w.shape and d.dtype == torch.float32
    assert rel_mse(w, d) < bound


@pytest.mark.parametrize("name,setting,bound", PARAMS)
@pytest.mark.parametrize("shape", [(48, 576), (7, 256)])
def test_nbytes_are_the_buffers(name: str, setting: dict, bound: float, shape: tuple[int, int]) -> None:
    if fitting(name, setting, shape) != shape:  # a shape the format refuses is refused everywhere
        with pytest.raises(ValueError):
            quant.quantize(gaussian(*shape), {"format": name, **setting})
        with pytest.raises(ValueError):
            get_format(name).expected_nbytes(shape, QuantSetting.from_dict({"format": name, **setting}))
        shape = fitting(name, setting, shape)
    w = gaussian(*shape)
    packed = quant.quantize(w, {"format": name, **setting})
    buffer_bytes = sum(b.numel() * b.element_size() for b in packed.buffers.values())
    assert packed.nbytes == buffer_bytes == get_format(name).expected_nbytes(shape, packed.setting)


@pytest.mark.parametrize("name,setting,bound", PARAMS)
def test_dequantize_rows_matches_dequantize(name: str, setting: dict, bound: float) -> None:
    w = gaussian(*fitting(name, setting, (48, 576)))
    packed = quant.quantize(w, {"format": name, **setting})
    rows = torch.tensor([5, 0, 47, 5, 12])  # repeats and any order, as token ids come
    torch.testing.assert_close(packed.dequantize_rows(rows), packed.dequantize()[rows], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,setting,bound", PARAMS)
def test_quantize_is_deterministic(name: str, setting: dict, bound: float) -> None:
    w = gaussian(16, 256)
    a = quant.quantize(w, {"format": name, **setting})
    b = quant.quantize(w, {"format": name, **setting})
    assert a.buffers.keys() == b.buffers.keys()
    assert all(torch.equal(a.buffers[k], b.buffers[k]) for k in a.buffers)


@pytest.mark.parametrize("setting", [
    {"format": "turbo", "bits": 4, "group_size": None},  # Hadamard needs a power of two
    {"format": "turbo", "bits": 4, "group_size": 128, "options": {"seed": -1}},
    {"format": "turbo", "bits": 4, "group_size": 128, "options": {"rotation": "random"}},
    {"format": "ternary", "bits": 3, "group_size": 128},
    {"format": "lloyd", "bits": 4, "group_size": 128, "options": {"preset": "fp4"}},
    {"format": "lloyd", "bits": 6, "group_size": 32},  # 64 centroids for 32 weights
    {"format": "lloyd", "bits": 1, "group_size": 32, "options": {"preset": "nf"}},  # +-absmax is useless
    {"format": "vq", "bits": 4, "group_size": 128, "options": {"dim": 3}},
    {"format": "rtn", "bits": 4, "group_size": 128, "options": {"outlier_frac": 0.5}},
    {"format": "rtn", "bits": 4, "group_size": 128, "options": {"outlier_frac": 1}},  # int, not float
])
def test_invalid_settings_are_rejected(setting: dict) -> None:
    with pytest.raises(ValueError):
        QuantSetting.from_dict(setting)


# --- gptq -----------------------------------------------------------------------------------

@pytest.mark.parametrize("setting", [{"bits": 3, "group_size": 128}, {"bits": 4, "group_size": None},
                                     {"bits": 2, "group_size": 32, "options": {"symmetric": True}},
                                     {"bits": 2, "group_size": 64, "options": {"clip": True}},
                                     {"bits": 3, "group_size": None, "options": {"clip": True, "symmetric": True}}])
def test_gptq_without_calibration_is_rtn_bit_for_bit(setting: dict) -> None:
    w = gaussian()
    a = quant.quantize(w, {"format": "rtn", **setting})
    b = quant.quantize(w, {"format": "gptq", **setting})
    assert a.buffers.keys() == b.buffers.keys()
    assert all(torch.equal(a.buffers[k], b.buffers[k]) for k in a.buffers)


@pytest.mark.parametrize("setting", [{"bits": 3, "group_size": 128}, {"bits": 4, "group_size": None},
                                     {"bits": 2, "group_size": 64, "options": {"clip": True}}])
def test_gptq_act_order_without_calibration_is_rtn_bit_for_bit(setting: dict) -> None:
    # Equal Hessian diagonals keep the column order; the static grids are rtn's grids.
    w = gaussian()
    a = quant.quantize(w, {"format": "rtn", **setting})
    b = quant.quantize(w, {"format": "gptq", **setting, "options": {**setting.get("options", {}), "act_order": True}})
    assert all(torch.equal(a.buffers[k], b.buffers[k]) for k in a.buffers) and a.buffers.keys() == b.buffers.keys()


@pytest.mark.parametrize("setting", [{"bits": 4, "group_size": 64}, {"bits": 3, "group_size": None},
                                     {"bits": 2, "group_size": 64, "options": {"clip": True}}])
def test_gptq_lowers_output_error_on_its_calibration_inputs(setting: dict) -> None:
    gen = torch.Generator().manual_seed(5)
    w = gaussian(64, 256)
    # Correlated inputs with uneven channel scales: where error feedback has something to exploit.
    x = torch.randn(2048, 256, generator=gen) @ (torch.eye(256) + torch.randn(256, 256, generator=gen) / 16)
    x = x * (0.2 + 2 * torch.rand(256, generator=gen))
    rtn = quant.quantize(w, {"format": "rtn", **setting}).dequantize()
    gptq = quant.quantize(w, {"format": "gptq", **setting}, hessian=x.T @ x).dequantize()
    ordered = quant.quantize(w, {"format": "gptq", **setting, "options": {**setting.get("options", {}),
                                                                          "act_order": True}},
                             hessian=x.T @ x).dequantize()
    out_err = lambda d: float((x @ (d - w).T).pow(2).mean())  # noqa: E731
    assert out_err(gptq) < 0.85 * out_err(rtn)
    # Uneven input scales are what activation order exploits: 0.59/0.57/0.71 -> 0.40/0.39/0.55 of rtn.
    assert out_err(ordered) < 0.9 * out_err(gptq)


@pytest.mark.parametrize("bits,group", [(3, 64), (2, 128), (3, None)])
def test_activation_weighted_lloyd_lowers_output_error(bits: int, group: int | None) -> None:
    gen = torch.Generator().manual_seed(5)
    w = gaussian(64, 256)
    x = torch.randn(2048, 256, generator=gen) * (0.2 + 2 * torch.rand(256, generator=gen))  # uneven channels
    setting = {"format": "lloyd", "bits": bits, "group_size": group}
    plain = quant.quantize(w, setting)
    weighted = {**setting, "options": {"weighted": True}}
    out_err = lambda p: float((x @ (p.dequantize() - w).T).pow(2).mean())  # noqa: E731
    # 0.88 / 0.95 / 0.96 of plain k-means's output error when written.
    assert out_err(quant.quantize(w, weighted, hessian=x.T @ x)) < 0.98 * out_err(plain)
    no_data = quant.quantize(w, weighted)  # without calibration: plain k-means, bit for bit
    assert all(torch.equal(plain.buffers[k], no_data.buffers[k]) for k in plain.buffers)
    assert quant.needs_hessians([QuantSetting.from_dict(weighted)])
    assert not quant.needs_hessians([QuantSetting.from_dict(setting)])  # plain lloyd collects nothing


@pytest.mark.parametrize("options", [{}, {"act_order": True, "clip": True}, {"symmetric": True}])
@pytest.mark.parametrize("group, width", [(64, 256), (None, 256), (128, 320), (128, 96)])
def test_gptq_at_several_bit_widths_at_once_is_each_alone(options: dict, group: int | None, width: int) -> None:
    # Widths with a partial last group (320 = 2 x 128 + 64) and with no whole group (96 < 128).
    gen = torch.Generator().manual_seed(6)
    w = gaussian(48, width)
    x = torch.randn(1024, width, generator=gen) * (0.2 + 2 * torch.rand(width, generator=gen))
    settings = [QuantSetting("gptq", b, group, options=options) for b in (2, 3, 4, 8)]
    together = quant.quantize_calibrated_many("m", w, settings, {"m": x.T @ x})
    for s, packed in zip(settings, together):
        alone = quant.quantize(w, s, hessian=x.T @ x)
        assert packed.setting == s and packed.nbytes == alone.nbytes
        # Row by row the arithmetic is the same; a stacked block update may sum in another order, so
        # allow a rare code one step away.
        same = torch.isclose(packed.dequantize(), alone.dequantize(), rtol=0, atol=1e-6).float().mean()
        assert same >= 0.999, (s.describe(), float(same))
    with pytest.raises(ValueError, match="differ in bits only"):
        quant.get_format("gptq").quantize_many(w, [QuantSetting("gptq", 2, 64), QuantSetting("gptq", 2, 128)])


def test_gptq_rejects_a_hessian_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="hessian must be"):
        quant.quantize(gaussian(8, 64), {"format": "gptq", "bits": 4, "group_size": 32}, hessian=torch.eye(32))


# --- turbo: Lloyd-Max known answers -------------------------------------------------------

LLOYD_MAX_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}  # MSE of the optimal N(0,1) quantizer


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lloyd_max_codebook_matches_known_mse(bits: int) -> None:
    levels, mse = lloyd_max_gaussian(bits)
    assert len(levels) == 2**bits and (levels[1:] > levels[:-1]).all()
    assert mse == pytest.approx(LLOYD_MAX_MSE[bits], rel=1e-3)
    assert levels[-1] == pytest.approx(-levels[0])  # symmetric


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [64, None])
def test_lloyd_beats_rtn_levels_with_the_same_codes(bits: int, group: int | None) -> None:
    # k-means starts from rtn's own grid among others, so its levels can only do better; the
    # quantile start alone stalled above rtn at 4 bits in groups of 64 (0.0083 vs 0.0080).
    w = gaussian(256, 576, seed=2)
    rtn = rel_mse(w, quant.quantize(w, {"format": "rtn", "bits": bits, "group_size": group}).dequantize())
    lloyd = rel_mse(w, quant.quantize(w, {"format": "lloyd", "bits": bits, "group_size": group}).dequantize())
    assert lloyd < 0.85 * rtn


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("group", [128, 256])
@pytest.mark.parametrize("rotation", ["hadamard", "orthogonal"])
def test_turbo_reaches_lloyd_max_on_gaussian(bits: int, group: int, rotation: str) -> None:
    w = gaussian(256, 1024, seed=1)
    d = quant.quantize(w, {"format": "turbo", "bits": bits, "group_size": group,
                           "options": {"rotation": rotation}}).dequantize()
    assert rel_mse(w, d) == pytest.approx(LLOYD_MAX_MSE[bits], rel=0.05)


def test_turbo_orthogonal_rotation_is_orthogonal_seeded_and_not_stored() -> None:
    from quant.formats.turbo import _orthogonal

    q = _orthogonal(3, 64)
    torch.testing.assert_close(q @ q.T, torch.eye(64), rtol=0, atol=1e-5)
    assert torch.equal(q, _orthogonal(3, 64)) and not torch.equal(q, _orthogonal(4, 64))
    packed = quant.quantize(gaussian(8, 256), {"format": "turbo", "bits": 3, "group_size": 64,
                                               "options": {"rotation": "orthogonal"}})
    assert set(packed.buffers) == {"codes", "scale"}


def test_fwht_is_orthonormal_and_self_inverse() -> None:
    x = gaussian(3, 64)
    y = fwht(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(fwht(y), x, rtol=0, atol=1e-5)
    e0 = torch.zeros(8)
    e0[0] = 1
    torch.testing.assert_close(fwht(e0), torch.full((8,), 1 / math.sqrt(8)))


def test_turbo_rotation_depends_on_seed_only() -> None:
    w = gaussian(8, 256)
    a = quant.quantize(w, {"format": "turbo", "bits": 3, "group_size": 128, "options": {"seed": 1}})
    b = quant.quantize(w, {"format": "turbo", "bits": 3, "group_size": 128, "options": {"seed": 2}})
    assert not torch.equal(a.buffers["codes"], b.buffers["codes"])
    assert set(a.buffers) == {"codes", "scale"}  # no rotation matrix is stored


def test_turbo_qjl_is_unbiased_for_inner_products() -> None:
    # QJL trades weight MSE for unbiasedness: averaged over seeds, <w_hat, x> -> <w, x>.
    w, x = gaussian(1, 128, seed=3), gaussian(1, 128, seed=4)[0]
    true = float(w[0] @ x)
    est = [float(quant.quantize(w, {"format": "turbo", "bits": 1, "group_size": 128,
                                    "options": {"qjl": True, "seed": s}}).dequantize()[0] @ x) for s in range(200)]
    assert sum(est) / len(est) == pytest.approx(true, abs=0.15 * w.norm().item() * x.norm().item() / 128**0.5)


# --- ternary: the 5-trits-per-byte layout --------------------------------------------------

@pytest.mark.parametrize("n", list(range(1, 13)) + [128, 576])
def test_trit_packing_round_trips_exactly(n: int) -> None:
    trits = torch.randint(0, 3, (4, n), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    data = pack_trits(trits)
    assert data.dtype == torch.uint8 and data.shape == (4, trit_bytes(n)) and int(data.max()) < 243
    assert torch.equal(unpack_trits(data, n), trits)


def test_trit_packing_known_byte() -> None:
    # t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4 for (2, 1, 0, 2, 1) = 2 + 3 + 0 + 54 + 81 = 140.
    assert pack_trits(torch.tensor([[2, 1, 0, 2, 1]])).tolist() == [[140]]
    assert pack_trits(torch.full((1, 5), 2)).tolist() == [[242]]


def test_ternary_costs_1_6_bits_plus_scales() -> None:
    packed = quant.quantize(gaussian(10, 640), {"format": "ternary", "bits": 2, "group_size": 128})
    assert packed.bits_per_weight == pytest.approx(1.6 + 16 / 128)
    assert set(packed.dequantize().unique().abs().tolist()) - {0.0} != set()


# --- outliers ------------------------------------------------------------------------------

def test_outliers_are_stored_exactly_and_help_heavy_tails() -> None:
    w = gaussian(32, 512)
    spikes = torch.randperm(w.numel(), generator=torch.Generator().manual_seed(0))[:80]
    w.view(-1)[spikes] = w.view(-1)[spikes].sign() * 25  # a few huge weights, as in real LLM matrices
    plain = quant.quantize(w, {"format": "rtn", "bits": 4, "group_size": 128})
    setting = {"format": "rtn", "bits": 4, "group_size": 128, "options": {"outlier_frac": 0.01}}
    packed = quant.quantize(w, setting)
    d = packed.dequantize()
    assert packed.buffers["outlier_idx"].dtype == torch.int32
    assert packed.buffers["outlier_idx"].numel() == outlier_count(tuple(w.shape), 0.01) == 163
    assert torch.equal(d.view(-1)[spikes], w.view(-1)[spikes].half().float())  # every spike kept
    assert rel_mse(w, d) < 0.25 * rel_mse(w, plain.dequantize())
    assert packed.nbytes == plain.nbytes + 6 * 163
