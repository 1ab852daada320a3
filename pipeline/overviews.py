"""Overview pyramids of label maps: each level the 2x2 majority of the level above.

A label map's overviews must never invent a class (no averaging), so every
overview pixel takes the most frequent valid label of the four pixels above
it; ties go to the lowest label, and it is nodata only where all four are.
Level ``l`` has ``ceil(n / 2**l)`` pixels along an axis of ``n`` (odd edges
are padded with nodata), as GDAL sizes overviews.

Because each level depends only on 2x2 blocks of the one above, a tile whose
origin and size are multiples of ``2**l`` can compute its share of the first
``l`` levels alone, and its blocks equal those of the whole map: tile tasks
build their part of the pyramid in parallel, and only the coarse levels are
left for the end of a scene. Pure numpy.
"""

from __future__ import annotations

import numpy as np

#: Side of a COG block, and of the smallest overview.
COG_BLOCKSIZE = 512


def overview_factors(shape: tuple[int, int], blocksize: int) -> list[int]:
    """Powers of two until the smallest overview fits in one block (as GDAL's COG driver does)."""
    factors = []
    factor = 2
    while max(shape) > blocksize * (factor // 2):
        factors.append(factor)
        factor *= 2
    return factors


def level_shape(shape: tuple[int, int], level: int) -> tuple[int, int]:
    """The shape of overview ``level`` (factor ``2**level``) of a ``shape`` map."""
    f = 2**level
    return (-(-shape[0] // f), -(-shape[1] // f))


def majority_2x2(labels: np.ndarray, nodata: int) -> np.ndarray:
    """The next overview level of a 2-D label array: the majority of each 2x2 block.

    Labels are uint8 or uint16; ``nodata`` counts for nothing.
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    if labels.dtype.kind != "u" or labels.dtype.itemsize > 2:
        raise ValueError(f"labels must be uint8 or uint16, got {labels.dtype}")
    rows, cols = labels.shape
    if rows % 2 or cols % 2:
        padded = np.full((rows + rows % 2, cols + cols % 2), nodata, dtype=labels.dtype)
        padded[:rows, :cols] = labels
        labels = padded
    corners = (labels[0::2, 0::2], labels[0::2, 1::2], labels[1::2, 0::2], labels[1::2, 1::2])
    same = {(i, j): corners[i] == corners[j] for i in range(4) for j in range(i + 1, 4)}
    best = np.full(corners[0].shape, nodata, dtype=labels.dtype)
    most = np.zeros(corners[0].shape, dtype=np.uint8)
    for i, value in enumerate(corners):
        valid = value != nodata
        votes = valid.view(np.uint8).copy()
        for j in range(4):
            if j != i:
                votes += same[min(i, j), max(i, j)].view(np.uint8)
        votes *= valid
        better = (votes > most) | ((votes == most) & (votes > 0) & (value < best))
        np.copyto(best, value, where=better)
        np.copyto(most, votes, where=better)
    return best


def pyramid(labels: np.ndarray, nodata: int, levels: int) -> list[np.ndarray]:
    """Overview levels ``1 .. levels`` of ``labels``, each from the one before."""
    out = []
    for _ in range(levels):
        labels = majority_2x2(labels, nodata)
        out.append(labels)
    return out


def _twos(n: int) -> int:
    """How many times 2 divides ``n`` (> 0)."""
    return (n & -n).bit_length() - 1


def tile_levels(scene_shape: tuple[int, int], tile_shape: tuple[int, int], levels: int) -> int:
    """How many of ``levels`` overview levels every tile can compute alone.

    Level ``l`` needs tile origins and sizes that are multiples of ``2**l``
    along every axis cut into more than one tile (the far edge tile may be
    shorter: the map is padded there anyway).
    """
    limit = levels
    for n, t in zip(scene_shape, tile_shape):
        if n > t:
            limit = min(limit, _twos(t))
    return limit
