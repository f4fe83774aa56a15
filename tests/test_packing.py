import pytest
import torch

from quant import pack_bits, packed_size, unpack_bits


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 64, 1000])
def test_round_trip_is_exact_for_every_width(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_size(n, bits) == -(-n // 8) * bits
    assert torch.equal(unpack_bits(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_odd_widths_cost_exactly_their_width(bits: int) -> None:
    codes = torch.full((800,), 2**bits - 1, dtype=torch.uint8)
    assert pack_bits(codes, bits).numel() * 8 == 800 * bits


def test_layout_is_lsb_first() -> None:
    # codes 1,0,0,...: 3-bit group of eight -> first byte 0b001
    codes = torch.tensor([1, 2, 0, 0, 0, 0, 0, 7], dtype=torch.uint8)
    packed = pack_bits(codes, 3)
    word = sum(int(b) << (8 * i) for i, b in enumerate(packed))
    assert word == 1 | (2 << 3) | (7 << 21)


def test_rejects_bad_width_and_size() -> None:
    with pytest.raises(ValueError):
        pack_bits(torch.zeros(8, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="expected 3 bytes"):
        unpack_bits(torch.zeros(4, dtype=torch.uint8), 3, 8)


def _reference_pack(codes: list[int], bits: int) -> bytes:
    # The layout by its definition: one little-endian integer of all codes, code i at bit bits * i,
    # padded to whole groups of eight codes.
    n = -(-len(codes) // 8) * 8
    word = sum(c << (bits * i) for i, c in enumerate(codes))
    return word.to_bytes(n * bits // 8, "little")


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 8, 13, 64, 203])
def test_bytes_follow_the_layout_definition(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(7 * bits + n)
    codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.uint8)
    assert bytes(pack_bits(codes, bits).tolist()) == _reference_pack(codes.tolist(), bits)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_any_integer_dtype_and_shape_packs_alike(dtype: torch.dtype, bits: int) -> None:
    codes = torch.randint(0, 2**bits, (6, 40), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes.to(dtype), bits)
    assert torch.equal(packed, pack_bits(codes.reshape(-1).to(torch.uint8), bits))
    assert torch.equal(unpack_bits(packed, bits, codes.numel()), codes.reshape(-1).to(torch.uint8))


def test_packing_does_not_alias_its_input() -> None:
    codes = torch.arange(16, dtype=torch.uint8)
    packed = pack_bits(codes, 8)
    packed[0] = 99
    assert int(codes[0]) == 0
