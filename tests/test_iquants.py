"""llama.cpp's i-quants (quant/gguf/_iquants.py, _lattice.py): gguf-py reads our bytes as we do, errors in order.

The generic checks (Gaussian, heavy-tailed and edge rows decoded bit for bit, importance, packed
tensor == GGUF tensor) run on every type in test_gguf_codecs.py / test_gguf_formats.py; here are
the i-quants' own cases: sub-blocks and sign groups at their edges, the sign parity, the lattice
search, the error each type reaches, and the sizes a GGUF file gives them.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize

import quant
from quant.gguf import block_grid, block_type, dequantize_blocks, quantize_blocks, with_levels
from quant.gguf._lattice import lattice
from quant.settings import QuantSetting

LATTICE = ("iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s")
IQUANTS = LATTICE + ("iq4_xs",)
PARITY = ("iq2_xxs", "iq2_xs", "iq3_xxs")  # 7 sign bits per 8 weights, the 8th their parity


def gaussian(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def sub_block_edges(seed: int = 0) -> torch.Tensor:
    """(16, 512) rows at the edges of the i-quant structs: zero and lone sub-blocks, odd sign groups."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 512, generator=gen) * 0.02
    w[0] = 0.0
    w[1] = -0.37  # constant and negative: every group of 8 even
    w[2, :] = 0.0
    w[2, 40:72] = torch.randn(32, generator=gen)  # one live sub-block (across a 32-boundary) among zeros
    w[3] = w[3].abs()
    w[3, ::8] *= -1  # one negative weight per group of 8: every group odd
    w[4] = -w[4].abs()
    w[4, 3::8] = 1e-4  # seven negatives per group, one tiny positive
    w[5] *= 3e4  # large, near fp16's top for the sub-block scales
    w[6] *= 5e7  # beyond fp16's range: d saturates, nothing decodes to inf
    w[7] *= 1e-6
    w[8, ::32] = 3.0  # one spike per sub-block
    w[9] = torch.where(torch.arange(512) % 2 == 0, 1.0, -1.0) * 0.05  # alternating signs
    w[10, :] = 0.0
    w[10, ::8] = torch.randn(64, generator=gen)  # one live weight per group
    return w


def encode(name: str, w: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    bt = block_type(name)
    imp = None if importance is None else importance.reshape(-1, bt.block)
    data = quantize_blocks(name, w.reshape(-1, bt.block), imp)
    return data, dequantize_blocks(name, data).reshape(w.shape)


def rel_mse(w: torch.Tensor, d: torch.Tensor, imp: torch.Tensor | None = None) -> float:
    e, s = (w - d).pow(2), w.pow(2)
    if imp is not None:
        e, s = e * imp, s * imp
    return float(e.sum() / s.sum())


def column_energy(cols: int, seed: int) -> torch.Tensor:
    """Uneven input energies, as a layer's Hessian diagonal has them (spread e^(2 N(0,1)))."""
    return torch.exp(2 * torch.randn(cols, generator=torch.Generator().manual_seed(seed)))


def test_the_codebooks_and_the_sign_table_are_gguf_pys() -> None:
    from quant.gguf._lattice import ksigns

    for cls, levels in [("IQ2_XXS", [8, 25, 43]), ("IQ2_XS", [8, 25, 43]), ("IQ2_S", [8, 25, 43]),
                        ("IQ3_XXS", [4, 12, 20, 28, 36, 44, 52, 62]), ("IQ3_S", [1, 3, 5, 7, 9, 11, 13, 15])]:
        lat = lattice(cls)
        ref = getattr(gguf.quants, cls)
        assert tuple(lat.points.shape) == ref.grid_shape and lat.levels.tolist() == levels
        assert np.array_equal(lat.points.numpy(), ref.grid.reshape(ref.grid_shape))
        assert len(set(map(tuple, lat.points.tolist()))) == ref.grid_shape[0]  # distinct points
    signs = ksigns()
    bits = (signs.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    assert torch.equal(signs & 0x7F, torch.arange(128, dtype=torch.uint8))  # index = the first 7 bits
    assert (bits.sum(-1) % 2 == 0).all()  # the 8th bit makes the parity even


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("name", IQUANTS)
def test_gguf_py_decodes_edge_blocks_bit_for_bit(name: str, weighted: bool) -> None:
    w = sub_block_edges()
    imp = column_energy(w.shape[1], seed=1).expand_as(w).contiguous() if weighted else None
    data, deq = encode(name, w, imp)
    ref = gguf_dequantize(data.reshape(w.shape[0], -1).numpy(), block_type(name).qtype)
    assert np.array_equal(ref, deq.numpy()) and torch.isfinite(deq).all()
    assert torch.equal(deq[0], torch.zeros(512))  # a zero row stays zero (d = 0)


@pytest.mark.parametrize("name", PARITY)
def test_an_odd_sign_group_gives_its_cheapest_weight_the_wrong_sign(name: str) -> None:
    w = gaussian(32, 512, seed=2).abs() + 0.05
    w[:, 3::8] = 1e-3
    odd = w.clone()
    odd[:, 3::8] = -1e-3  # one tiny negative per group: the parity forbids it, flipping it costs ~nothing
    _, plain = encode(name, w)
    _, deq = encode(name, odd)
    neg = (deq < 0).view(32, -1, 8).sum(-1)
    assert (neg % 2 == 0).all()  # what the 7 stored bits can say
    flipped = torch.cat([(deq[:, i::8] < 0) != (odd[:, i::8] < 0) for i in range(8)], dim=1).float().mean(0)
    # The flip lands on the tiny weight (column 3 of each group) and nowhere else.
    assert float(flipped[:64].mean()) < 0.02 and float(flipped[3 * 64:4 * 64].mean()) > 0.98
    assert rel_mse(odd, deq) < 1.01 * rel_mse(w, plain)  # as if the tiny weights were positive


@pytest.mark.parametrize("grid", ["IQ2_XXS", "IQ2_S", "IQ3_XXS", "IQ3_S"])
def test_the_nearest_point_is_exact_and_the_shortlist_close(grid: str) -> None:
    lat = lattice(grid)
    gen = torch.Generator().manual_seed(3)
    q = torch.rand(4000, lat.dim, generator=gen) * float(lat.levels[-1]) * 1.2 - 2
    w = torch.rand(4000, lat.dim, generator=gen) ** 3
    dist = lambda idx: ((lat.points[idx] - q).square() * w).sum(-1)  # noqa: E731  (reads q when called)
    every = ((lat.points.unsqueeze(0) - q.unsqueeze(1)).square() * w.unsqueeze(1)).sum(-1)  # (M, K)
    # Exact up to float32 rounding of the expanded distance sum w g^2 - 2 sum w q g (near ties only).
    tol = 1e-6 * (q * q * w).sum(-1) + 1e-6
    assert ((dist(lat.nearest(q, w)) - every.amin(1)).abs() <= tol).all()
    on = lat.index[lat.cells(lat.level_index(q))] >= 0
    assert 0 < float(on.float().mean()) < 1  # both paths taken
    # The scale search's shortlist of 8, on magnitudes shaped like scaled weights: measured 91-96 %
    # of the groups get the exact nearest point, the total distance 1.01-1.05x the exact one.
    q = torch.randn(4000, lat.dim, generator=gen).abs() * float(lat.levels[-1]) / 2.5
    w = torch.rand(4000, lat.dim, generator=gen)
    exact, short = dist(lat.nearest(q, w)), dist(lat.nearest(q, w, shortlist=8))
    assert (short >= exact - 1e-4).all() and float((short <= exact + 1e-4).float().mean()) > 0.85
    assert float(short.sum() / exact.sum()) < 1.06


@pytest.mark.parametrize("name", IQUANTS)
def test_the_tensor_takes_its_size_in_a_gguf_file(name: str, tmp_path) -> None:
    qtype = block_type(name).qtype
    w = gaussian(6, 768, seed=4)
    packed = quant.quantize(w, {"format": name})
    assert packed.nbytes == 6 * 768 // GGML_QUANT_SIZES[qtype][0] * GGML_QUANT_SIZES[qtype][1]
    assert packed.setting.describe() == name and packed.bits_per_weight == block_type(name).bits_per_weight
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor(name, packed.buffers["blocks"].numpy(), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (t,) = gguf.GGUFReader(path).tensors
    assert int(t.n_bytes) == packed.nbytes and t.tensor_type == qtype
    assert np.array_equal(gguf_dequantize(np.asarray(t.data), qtype).reshape(6, 768), packed.dequantize().numpy())


@pytest.mark.parametrize("name", IQUANTS)
def test_rows_that_are_not_whole_super_blocks_are_refused(name: str) -> None:
    fmt = quant.get_format(name)
    setting = QuantSetting.from_dict({"format": name})
    with pytest.raises(ValueError, match="rows of 576 weights"):
        fmt.check_shape((64, 576), setting)  # SmolLM2's rows: only the 32-weight types fit them
    fmt.check_shape((64, 1536), setting)


# Relative MSE on Gaussian weights (64 x 2048), measured: iq2_xxs 0.1067, iq2_xs 0.0807, iq2_s 0.0566,
# iq3_xxs 0.0310, iq3_s 0.01654, iq4_xs 0.00549; for context q2_k 0.0688, q3_k 0.0206, iq4_nl 0.00544.
MEASURED = {"iq2_xxs": 0.1067, "iq2_xs": 0.0807, "iq2_s": 0.0566, "iq3_xxs": 0.0310, "iq3_s": 0.01654,
            "iq4_xs": 0.00549}


def test_the_error_falls_with_the_bits_and_stays_where_it_was_measured() -> None:
    w = gaussian(64, 2048, seed=5)
    err = {n: rel_mse(w, encode(n, w)[1]) for n in ("iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_xs",
                                                    "q2_k", "q3_k", "iq4_nl")}
    order = ["iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_xs"]
    assert all(err[a] > err[b] for a, b in zip(order, order[1:])), err
    for name, value in MEASURED.items():
        assert value * 0.97 < err[name] < value * 1.03, (name, err[name])
    # Against the scalar types of about the same size: iq2_s (2.56 bpw) 0.82x q2_k's (2.63), iq3_s
    # 0.80x q3_k's at the same 3.44 bpw, iq4_xs (4.25) 1.01x iq4_nl's (4.5).
    assert err["iq2_s"] < 0.85 * err["q2_k"] and err["iq3_s"] < 0.85 * err["q3_k"]
    assert err["iq4_xs"] < 1.02 * err["iq4_nl"]


@pytest.mark.parametrize("name", IQUANTS)
def test_importance_lowers_the_weighted_error(name: str) -> None:
    w = gaussian(32, 1024, seed=6)
    imp = column_energy(1024, seed=7).expand_as(w).contiguous()
    plain = rel_mse(w, encode(name, w)[1], imp)
    aware = rel_mse(w, encode(name, w, imp)[1], imp)
    # Measured 0.21-0.36x on the lattice types (q2_k 0.34x, q3_k 0.47x), 0.51x on iq4_xs (iq4_nl 0.52x).
    assert aware < (0.45 if name in LATTICE else 0.6) * plain, (plain, aware)


def test_encoding_is_deterministic_and_chunking_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import quant.gguf._codec as codec

    w = gaussian(8, 1024, seed=8)
    for name in ("iq2_xs", "iq3_xxs", "iq4_xs"):
        a, _ = encode(name, w)
        monkeypatch.setattr(codec, "CHUNK_WEIGHTS", 512)  # two super-blocks per chunk
        b, _ = encode(name, w)
        monkeypatch.undo()
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", LATTICE)
def test_lattice_types_have_no_per_weight_grid(name: str) -> None:
    data, _ = encode(name, gaussian(2, 256))
    with pytest.raises(ValueError, match="no per-weight grid"):
        block_grid(name, data)
    with pytest.raises(ValueError, match="whole group at a time"):
        with_levels(name, data, torch.zeros(2, 256))


def test_iq4_xs_has_a_per_weight_grid() -> None:
    data, deq = encode("iq4_xs", gaussian(4, 512, seed=9))
    data = data.reshape(-1, 136)
    grid = block_grid("iq4_xs", data)
    assert torch.equal(grid.value(grid.round(deq.reshape(-1, 256))), deq.reshape(-1, 256))


@pytest.mark.parametrize("name", ["iq4_xs", "iq3_s", "iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs"])
def test_a_matrix_of_one_block_per_row_takes_its_hessian(name) -> None:
    # Each row is one 256-weight super-block: the input columns' energy broadcast over the rows is then a
    # stride-0 view, which the lattice codecs' .view refused ("view size is not compatible").
    import quant

    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(16, 256, generator=gen), torch.randn(64, 256, generator=gen)
    packed = quant.quantize(w, {"format": name}, hessian=x.T @ x)
    assert packed.nbytes == 16 * block_type(name).block_bytes


@pytest.mark.parametrize("name", ["iq4_xs", "iq3_s", "iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs", "q4_k"])
def test_gptq_on_a_matrix_of_one_block_per_row(name) -> None:
    # The same shape through GPTQ's feedback: the chosen points came back as transposed views, which
    # with_points' .view refused (a tiny model's 256-wide matrices in the slow llama.cpp test).
    import quant

    gen = torch.Generator().manual_seed(1)
    w, x = torch.randn(16, 256, generator=gen), torch.randn(64, 256, generator=gen)
    packed = quant.quantize(w, {"format": name, "options": {"gptq": True, "act_order": True}}, hessian=x.T @ x)
    assert packed.nbytes == 16 * block_type(name).block_bytes
    assert torch.isfinite(packed.dequantize()).all()
