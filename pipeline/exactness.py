"""How exact a run's tiling is, per scene: derived, or declared and measured.

A model whose receptive field is derived (torch analysis, or probing an ONNX graph)
is tiled exactly: the stitched map equals one prediction over the whole scene. A
model with global context (squeeze-and-excitation, GroupNorm, attention) runs with a
declared halo, and no halo makes it exact; before its tiles run, :func:`measure`
compares, on a bounded sample region of the scene, the tiled prediction with one
window covering the region, through the same prediction core
(:class:`pipeline.prediction.Predictor`), and reports the largest absolute score
difference and the fraction of labels that changed. A larger halo lowers both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.grid import Box, Span, Tile, TileGrid
from pipeline.networks import LABELS, Network
from pipeline.prediction import Predictor, Reader
from pipeline.receptive import Halo, ReceptiveField

ANALYSED = "analysed"
PROBED = "probed"
DECLARED = "declared"
METHODS = (ANALYSED, PROBED, DECLARED)
#: Longest side of the sample region, px: the one window covering it must fit in memory.
MAX_REGION = 2048
#: Shortest side of the sample region (where the scene has it), px.
MIN_REGION = 256


@dataclass(frozen=True)
class Exactness:
    """What a scene's tiling guarantees, as ``run.json`` records it per scene.

    ``halo``: ``(rows, cols)`` px, the larger of the halo before and after a tile;
    ``max_abs_deviation``: the largest absolute class-score difference between the
    tiled and the one-window prediction over the valid pixels of ``region``;
    ``labels_changed``: the fraction (0 to 1) of those pixels whose label differs;
    both 0.0 for an exact tiling, None when not measurable (``note`` says why);
    ``region``: ``(row, col, rows, cols)`` px of the sample region, None if none.
    """

    exact: bool
    method: str
    halo: tuple[int, int]
    max_abs_deviation: float | None = 0.0
    labels_changed: float | None = 0.0
    region: tuple[int, int, int, int] | None = None
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The manifest's form: exact, method, halo, max_abs_deviation, labels_changed,
        a one-line summary, and region and note where known."""
        data: dict[str, Any] = {
            "exact": self.exact, "method": self.method, "halo": list(self.halo),
            "max_abs_deviation": self.max_abs_deviation, "labels_changed": self.labels_changed,
            "summary": self.describe(),
        }
        if self.region is not None:
            data["region"] = list(self.region)
        if self.note:
            data["note"] = self.note
        return data

    def describe(self) -> str:
        """One line for the plan and the summary."""
        if self.exact:
            return f"exact ({self.method} receptive field, halo {self.halo[0]}x{self.halo[1]} px)"
        head = f"approximate (declared halo {self.halo[0]}x{self.halo[1]} px)"
        if self.max_abs_deviation is None and self.labels_changed is None:
            return f"{head}: deviation not measured ({self.note})"
        parts = []
        if self.max_abs_deviation is not None:
            parts.append(f"max score deviation {self.max_abs_deviation:.3g}")
        if self.labels_changed is not None:
            parts.append(f"{100 * self.labels_changed:.3f} % of labels changed")
        where = ""
        if self.region is not None:
            where = f" on {self.region[3]}x{self.region[2]} px (width x height)"
        return f"{head}: {', '.join(parts)} vs one window{where}"


def halo_pair(halo: Halo) -> tuple[int, int]:
    """``(rows, cols)``: the larger of the halo before and after, per axis."""
    return (max(halo.before[0], halo.after[0]), max(halo.before[1], halo.after[1]))


def exact(method: str, halo: Halo) -> Exactness:
    """The record of an exact tiling (nothing to measure)."""
    return Exactness(True, method, halo_pair(halo))


def sample_region(scene_shape: tuple[int, int], tile_shape: tuple[int, int],
                  fits: Callable[[tuple[int, int]], bool] = lambda _: True) -> Box:
    """The sample region of a scene: centred, twice the tile per axis (so it holds a
    seam) between :data:`MIN_REGION` and :data:`MAX_REGION` px, within the scene, and
    halved (down to one tile) until one window over it ``fits`` in memory."""
    sides = [min(n, max(MIN_REGION, min(MAX_REGION, 2 * t)))
             for n, t in zip(scene_shape, tile_shape)]
    while not fits((sides[0], sides[1])) and max(sides) > min(MIN_REGION, *tile_shape):
        k = 0 if sides[0] >= sides[1] else 1
        sides[k] = max(1, sides[k] // 2)
    spans = [Span((n - s) // 2, (n - s) // 2 + s) for n, s in zip(scene_shape, sides)]
    return Box(spans[0], spans[1])


def measure(network: Network, field: ReceptiveField, halo: Halo, tile_size: int,
            region: Box, read: Reader, *, classes: int, fill: np.ndarray, stitch: str,
            method: str = DECLARED, scene_shape: tuple[int, int] | None = None,
            source: str = "") -> Exactness:
    """The deviation of the tiled prediction on ``region`` from one window over it.

    The region is tiled as a scene of its own (its edges are scene edges in both
    predictions, so only the seams inside differ), with ``tile_size``, ``halo`` and
    ``stitch`` as the run uses them; ``read`` reads scene windows (the network's
    input, normalised and filled, and validity). Only valid pixels are compared.

    A network that takes one window size only (``scene_shape`` must then be given) is
    compared instead on one window of that size centred in the scene (or as much of it
    as the scene holds): the scene's own tiles against that window, on its pixels that
    are at least the halo away from its inner edges (:func:`_measure_fixed`).

    ``source``: the model spec file, named in errors about the network's output.

    Raises:
        GeometryError: the tiles cannot be built.
        ModelError: the network gives labels outside the spec's classes.
        ValueError: a fixed-size network without ``scene_shape``.
    """
    pair = halo_pair(halo)
    shape = region.shape
    origin = region.origin
    fixed = network.signature.window
    options: dict[str, Any] = dict(classes=classes, nodata=-1, label_dtype=np.int32, fill=fill,
                                   scores=network.signature.output != LABELS,
                                   skip_invalid=False, source=source)
    if fixed is not None:
        if scene_shape is None:
            raise ValueError("measure() needs the scene's shape for a fixed-size network")
        return _measure_fixed(network, field, halo, tile_size, scene_shape, read, options,
                              stitch, method)

    def relative(window: Box) -> tuple[np.ndarray, np.ndarray | None]:
        return read(Box(window.rows.shift(origin[0]), window.cols.shift(origin[1])))

    tiled = TileGrid.build(shape, shape, field, tile_size, halo)
    if len(tiled) == 1 and shape != scene_shape:
        return Exactness(False, method, pair, None, None,
                         (region.rows.start, region.cols.start, shape[0], shape[1]),
                         f"the {shape[1]}x{shape[0]} px sample region holds no seam between "
                         f"{tile_size} px tiles; use smaller tiles to see the deviation")
    whole = TileGrid.build(shape, shape, field, shape, Halo((0, 0), (0, 0)))
    got = _stitched(Predictor(network, tiled, stitch=stitch, **options), tiled, relative)
    want = _stitched(Predictor(network, whole, **options), whole, relative)
    return _compare(got, want, (region.rows.start, region.cols.start, shape[0], shape[1]),
                    pair, method)


def _measure_fixed(network: Network, field: ReceptiveField, halo: Halo, tile_size: int,
                   scene_shape: tuple[int, int], read: Reader, options: dict[str, Any],
                   stitch: str, method: str) -> Exactness:
    """A fixed-size network: its window centred in the scene against the scene's tiles,
    on the pixels the window sees with at least the halo of context (its inner edges
    less the halo; a scene edge needs none)."""
    window = network.signature.window
    assert window is not None
    sides = [min(n, w) for n, w in zip(scene_shape, window)]
    starts = [(n - s) // 2 for n, s in zip(scene_shape, sides)]
    spans = []
    for k in (0, 1):
        lo, hi = starts[k], starts[k] + sides[k]
        inner_lo = lo if lo == 0 else lo + halo.before[k]
        inner_hi = hi if hi == scene_shape[k] else hi - halo.after[k]
        spans.append(Span(inner_lo, max(inner_lo, inner_hi)))
    interior = Box(spans[0], spans[1])
    pair = halo_pair(halo)
    if interior.area == 0:
        return Exactness(False, method, pair, None, None, None,
                         f"a {window[1]}x{window[0]} px window less the halo leaves nothing "
                         "to compare")
    grid = TileGrid.build(scene_shape, scene_shape, field, tile_size, halo, window=window)
    tiles = [t for t in grid if _overlaps(t.core, interior)]
    got = _placed(Predictor(network, grid, stitch=stitch, **options), tiles, read, interior)
    box = Box(Span(starts[0], starts[0] + sides[0]), Span(starts[1], starts[1] + sides[1]))
    one = TileGrid.build(box.shape, box.shape, field, box.shape, Halo((0, 0), (0, 0)),
                         window=window)

    def relative(part: Box) -> tuple[np.ndarray, np.ndarray | None]:
        return read(Box(part.rows.shift(box.rows.start), part.cols.shift(box.cols.start)))

    want = _stitched(Predictor(network, one, **options), one, relative)
    inside = (slice(interior.rows.start - box.rows.start, interior.rows.stop - box.rows.start),
              slice(interior.cols.start - box.cols.start, interior.cols.stop - box.cols.start))
    want_cut = (want[0][inside],
                None if want[1] is None else want[1][:, inside[0], inside[1]])
    where = (interior.rows.start, interior.cols.start, *interior.shape)
    return _compare(got, want_cut, where, pair, method)


def _overlaps(a: Box, b: Box) -> bool:
    return (a.rows.start < b.rows.stop and b.rows.start < a.rows.stop
            and a.cols.start < b.cols.stop and b.cols.start < a.cols.stop)


def _placed(predictor: Predictor, tiles: list[Tile], read: Reader,
            interior: Box) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels ``(h, w)`` of ``interior`` (-1 where not labelled) and scores ``(K, h, w)``
    (or None), from the results of ``tiles`` there."""
    labels = np.full(interior.shape, -1, np.int32)
    scores: np.ndarray | None = None
    for result in predictor.predict(tiles, read):
        core = result.tile.core
        r0, r1 = max(core.rows.start, interior.rows.start), min(core.rows.stop,
                                                                interior.rows.stop)
        c0, c1 = max(core.cols.start, interior.cols.start), min(core.cols.stop,
                                                                interior.cols.stop)
        src = (slice(r0 - core.rows.start, r1 - core.rows.start),
               slice(c0 - core.cols.start, c1 - core.cols.start))
        dst = (slice(r0 - interior.rows.start, r1 - interior.rows.start),
               slice(c0 - interior.cols.start, c1 - interior.cols.start))
        labels[dst] = np.where(result.labelled[src], result.labels[src], -1)
        if result.scores is not None:
            if scores is None:
                scores = np.zeros((result.scores.shape[0], *interior.shape), np.float32)
            scores[:, dst[0], dst[1]] = result.scores[:, src[0], src[1]]
    return labels, scores


def _compare(got: tuple[np.ndarray, np.ndarray | None],
             want: tuple[np.ndarray, np.ndarray | None], where: tuple[int, int, int, int],
             pair: tuple[int, int], method: str) -> Exactness:
    """The deviation of ``got`` from ``want`` (labels, scores) on their valid pixels."""
    valid = (got[0] >= 0) & (want[0] >= 0)
    if not valid.any():
        return Exactness(False, method, pair, None, None, where,
                         "the sample region has no valid pixel")
    changed = float(np.mean(got[0][valid] != want[0][valid]))
    deviation = None
    if got[1] is not None and want[1] is not None:
        deviation = float(np.max(np.abs(got[1][:, valid].astype(np.float64)
                                        - want[1][:, valid].astype(np.float64))))
    return Exactness(False, method, pair, deviation, changed, where)


def _stitched(predictor: Predictor, grid: TileGrid,
              read: Reader) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels ``(h, w)`` (-1 where not labelled) and scores ``(K, h, w)`` (or None) of
    every tile of ``grid``."""
    rows, cols = grid.output_shape
    return _placed(predictor, list(grid), read, Box(Span(0, rows), Span(0, cols)))
