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
