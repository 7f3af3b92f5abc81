import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from nqfmt.signs import pack_signs, padding_is_clear, unpack_signs, words_per_row


def test_bit_convention_is_lowest_bit_first_and_one_means_minus():
    signs = np.array([[-1, 1, -1] + [1] * 30 + [-1]], dtype=np.float32)  # 34 columns: two words
    words = pack_signs(signs)
    assert words.dtype == np.uint32 and words.shape == (1, 2)
    assert words[0, 0] == 0b101 and words[0, 1] == 0b10  # column 33 is bit 1 of word 1; padding bits stay 0


def test_set_bit_flips_ieee_sign():
    x = np.float32([0.75] * 32)
    signs = np.where(np.arange(32) % 3 == 0, -1.0, 1.0)
    w = pack_signs(signs[None, :])[0, 0]
    bits = (np.uint32(w) >> np.arange(32, dtype=np.uint32)) & 1
    flipped = (x.view(np.uint32) ^ (bits.astype(np.uint32) << 31)).view(np.float32)
    np.testing.assert_array_equal(flipped, x * signs)


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 200), seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip_odd_sizes(rows, cols, seed):
    rng = np.random.default_rng(seed)
    signs = np.where(rng.random((rows, cols)) < 0.5, -1.0, 1.0)
    words = pack_signs(signs)
    assert words.shape == (rows, words_per_row(cols))
    assert padding_is_clear(words, cols)
    np.testing.assert_array_equal(unpack_signs(words, cols), signs)
    np.testing.assert_array_equal(unpack_signs(words.view(np.int32), cols), signs)  # I32 view from a file


@settings(max_examples=100, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 100), seed=st.integers(0, 2**32 - 1))
def test_pack_matches_slow_reference(rows, cols, seed):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, cols))
    ref = np.zeros((rows, words_per_row(cols)), dtype=np.uint64)
    for i in range(rows):
        for j in range(cols):
            if values[i, j] < 0:
                ref[i, j // 32] |= 1 << (j % 32)
    np.testing.assert_array_equal(pack_signs(values), ref.astype(np.uint32))


def test_zero_counts_as_plus_and_bool_means_negative():
    np.testing.assert_array_equal(pack_signs(np.zeros((1, 5))), [[0]])
    np.testing.assert_array_equal(pack_signs(np.array([[True, False, True]])), [[0b101]])


def test_padding_check_sees_stray_bits():
    words = pack_signs(np.ones((3, 40)))
    words[1, 1] |= np.uint32(1 << 20)  # column 52 does not exist
    assert not padding_is_clear(words, 40)
