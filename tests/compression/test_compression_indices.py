"""Index packing: round trips, the smallest coding wins, hostile streams fail cleanly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_llm_train.compression import MalformedPayloadError, pack_indices, unpack_indices
from dist_llm_train.compression.indices import (
    FIXED_WIDTHS,
    packed_size,
    varint_decode,
    varint_encode,
    varint_max_bytes,
)
from dist_llm_train.errors import PreconditionError

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def index_sets(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    numel = draw(st.one_of(st.integers(1, 300), st.integers(1, 2**20), st.integers(1, 2**36)))
    picks = draw(st.lists(st.integers(0, numel - 1), max_size=300, unique=True))
    return np.array(sorted(picks), dtype=np.int64), numel


@SETTINGS
@given(index_sets())
def test_pack_round_trips_and_picks_the_smallest_coding(case: tuple[np.ndarray, int]) -> None:
    indices, numel = case
    coding, packed = pack_indices(indices, numel)
    assert packed.dtype == np.uint8
    out = unpack_indices(coding, packed, indices.size, numel)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, indices)
    # the chosen coding is the smallest of all applicable ones, and its size is what went out
    gaps = np.diff(indices, prepend=-1) - 1
    sizes = {k: v for k, v in packed_size(gaps.astype(np.uint64)).items() if v >= 0}
    assert packed.size == sizes[coding] == min(sizes.values())


@SETTINGS
@given(st.lists(st.integers(0, 2**63 - 1), max_size=200))
def test_varint_round_trips_any_63_bit_values(values: list[int]) -> None:
    arr = np.array(values, dtype=np.uint64)
    enc = varint_encode(arr)
    assert enc.size == sum(max(1, -(-v.bit_length() // 7)) for v in values)
    np.testing.assert_array_equal(varint_decode(enc, len(values), 9), arr)


@SETTINGS
@given(
    coding=st.sampled_from([*FIXED_WIDTHS, "varint"]),
    data=st.binary(max_size=64),
    count=st.integers(0, 40),
    numel=st.integers(1, 5000),
)
def test_hostile_streams_decode_validly_or_raise_cleanly(
    coding: str, data: bytes, count: int, numel: int
) -> None:
    try:
        out = unpack_indices(coding, np.frombuffer(data, dtype=np.uint8), count, numel)
    except MalformedPayloadError:
        return
    assert out.size == count
    assert bool((np.diff(out) > 0).all()) and (count == 0 or (out[0] >= 0 and out[-1] < numel))


def test_dense_indices_use_one_byte_and_sparse_ones_use_varint() -> None:
    coding, packed = pack_indices(np.arange(0, 1000, 3), 1000)
    assert (coding, packed.size) == ("u8", 334)
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(10_000_000, size=100_000, replace=False))
    coding, packed = pack_indices(idx, 10_000_000)
    assert coding == "varint"
    assert packed.size < 1.4 * idx.size  # vs 4 bytes for uint32 and 8 for int64
    assert varint_max_bytes(10_000_000) == 4


def test_specific_hostile_streams() -> None:
    with pytest.raises(MalformedPayloadError, match="gap of 300"):
        unpack_indices("u16", np.array([44, 1], dtype=np.uint8), 1, 300)
    with pytest.raises(MalformedPayloadError, match="reaches index 300"):
        unpack_indices("u8", np.array([150, 149], dtype=np.uint8), 2, 300)
    with pytest.raises(MalformedPayloadError, match="declares no indices"):
        unpack_indices("varint", np.array([1], dtype=np.uint8), 0, 300)
    with pytest.raises(MalformedPayloadError, match="unknown index coding"):
        unpack_indices("zigzag", np.array([1], dtype=np.uint8), 1, 300)
    # u64 gaps near 2**64 must not wrap around into valid-looking indices
    huge = np.array([2**63 + 5, 2**63 + 5], dtype=np.uint64).view(np.uint8)
    with pytest.raises(MalformedPayloadError):
        unpack_indices("u64", huge, 2, 300)


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(PreconditionError, match="strictly increasing"):
        pack_indices(np.array([3, 3]), 10)
    with pytest.raises(PreconditionError, match=r"lie in \[0, 10\)"):
        pack_indices(np.array([2, 10]), 10)
    with pytest.raises(PreconditionError, match="1-D integer"):
        pack_indices(np.array([1.5]), 10)
    with pytest.raises(PreconditionError, match="up to 9 bytes"):
        varint_decode(np.array([1], dtype=np.uint8), 1, 10)
