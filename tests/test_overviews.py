"""Label overview pyramids: 2x2 majority, and tiles that build their share alone."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.overviews import (
    level_shape,
    majority_2x2,
    overview_factors,
    pyramid,
    tile_levels,
)

NODATA = 255


def _brute_majority(labels: np.ndarray, nodata: int) -> np.ndarray:
    rows, cols = level_shape(labels.shape, 1)
    out = np.full((rows, cols), nodata, dtype=labels.dtype)
    for i in range(rows):
        for j in range(cols):
            block = labels[2 * i:2 * i + 2, 2 * j:2 * j + 2].ravel()
            votes = Counter(int(v) for v in block if v != nodata)
            if votes:
                most = max(votes.values())
                out[i, j] = min(v for v, n in votes.items() if n == most)
    return out


labels_arrays = st.tuples(st.integers(1, 13), st.integers(1, 13), st.integers(1, 4),
                          st.integers(0, 2**31 - 1))


@settings(max_examples=80, deadline=None)
@given(labels_arrays)
def test_majority_matches_counting(args: tuple[int, int, int, int]) -> None:
    rows, cols, classes, seed = args
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=(rows, cols)).astype(np.uint8)
    labels[rng.random((rows, cols)) < 0.2] = NODATA
    assert np.array_equal(majority_2x2(labels, NODATA), _brute_majority(labels, NODATA))


def test_ties_nodata_and_uint16() -> None:
    labels = np.array([[3, 1, 5, 5, 9],
                       [1, 3, 9, 9, 9]], dtype=np.uint16)
    # 3/1 tie -> 1; 5 5 9 9 tie -> 5; odd column: 9 and 9 over padding -> 9
    assert majority_2x2(labels, 65535).tolist() == [[1, 5, 9]]
    empty = np.full((2, 2), NODATA, dtype=np.uint8)
    assert majority_2x2(empty, NODATA).tolist() == [[NODATA]]
    one = np.array([[NODATA, NODATA], [NODATA, 7]], dtype=np.uint8)
    assert majority_2x2(one, NODATA).tolist() == [[7]]
    big = np.array([[1000, 1000], [2, 65534]], dtype=np.uint16)
    assert majority_2x2(big, 65535).tolist() == [[1000]]


def test_refuses_what_it_cannot_rank() -> None:
    with pytest.raises(ValueError, match="uint8 or uint16"):
        majority_2x2(np.zeros((2, 2), dtype=np.int32), 0)
    with pytest.raises(ValueError, match="2-D"):
        majority_2x2(np.zeros((1, 2, 2), dtype=np.uint8), 0)


def test_factors_and_shapes() -> None:
    assert overview_factors((8192, 8192), 512) == [2, 4, 8, 16]
    assert overview_factors((512, 300), 512) == []
    assert overview_factors((513, 10), 512) == [2]
    assert level_shape((8193, 7), 2) == (2049, 2)
    assert [a.shape for a in pyramid(np.zeros((9, 17), np.uint8), NODATA, 3)] == [
        (5, 9), (3, 5), (2, 3)]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 3), st.integers(0, 2**31 - 1),
       st.integers(1, 70), st.integers(1, 70))
def test_tiles_build_the_whole_maps_pyramid(tr: int, tc: int, twos: int, seed: int,
                                            rows: int, cols: int) -> None:
    # Tiles of (tr, tc) * 2**twos px: each builds its first levels alone; stitched
    # together they equal the pyramid of the whole map.
    tile = (tr * 2**twos, tc * 2**twos)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=(rows, cols)).astype(np.uint8)
    labels[rng.random((rows, cols)) < 0.1] = NODATA
    levels = tile_levels((rows, cols), tile, 5)
    assert levels <= 5
    whole = pyramid(labels, NODATA, levels)
    stitched = [np.full(level_shape((rows, cols), k + 1), 0, np.uint8) for k in range(levels)]
    for r in range(0, rows, tile[0]):
        for c in range(0, cols, tile[1]):
            parts = pyramid(labels[r:r + tile[0], c:c + tile[1]], NODATA, levels)
            for k, part in enumerate(parts):
                f = 2 ** (k + 1)
                stitched[k][r // f:r // f + part.shape[0], c // f:c // f + part.shape[1]] = part
    for a, b in zip(whole, stitched):
        assert np.array_equal(a, b)


def test_tile_levels() -> None:
    assert tile_levels((8192, 8192), (1536, 1536), 4) == 4
    assert tile_levels((8192, 8192), (1000, 1000), 4) == 3
    assert tile_levels((8192, 500), (1000, 1000), 4) == 3  # one tile across: no limit there
    assert tile_levels((900, 900), (1000, 1000), 2) == 2
    assert tile_levels((8192, 8192), (999, 1024), 4) == 0
