import numpy as np
import pytest

from mgvq_compile.algorithms.packing import pack_codes, packed_nbytes, unpack_codes


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8, 12, 16])
def test_round_trip_at_exact_width(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=(7, 13))
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.size == (codes.size * bits + 7) // 8 == packed_nbytes(codes.size, bits)
    np.testing.assert_array_equal(unpack_codes(packed, bits, codes.size), codes.reshape(-1))


def test_lsb_first_layout():
    # codes 1, 2, 3 at 2 bits: stream 10 01 11 -> byte 0b00111001
    assert pack_codes(np.array([1, 2, 3]), 2).tolist() == [0b00111001]


def test_rejects_codes_that_do_not_fit():
    with pytest.raises(ValueError, match="do not fit"):
        pack_codes(np.array([4]), 2)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_codes(np.zeros(3, np.uint8), 4, 7)
