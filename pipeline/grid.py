"""Tile geometry: core tiles of the output plane, their windows and crops.

Pure Python: no torch, files or Dask. Per axis, output cell ``j`` covers input
pixels ``j * stride ... j * stride + stride - 1``; a core tile of output cells
``[j0, j1)`` is read through a window of input pixels that covers the
receptive field of every cell in it, with window edges on the ``align`` grid
unless they are scene edges (where the network pads exactly as on the whole
scene). Running the network on the window and cropping its output with
``crop`` gives the whole-scene output on the core.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from pipeline.errors import GeometryError
from pipeline.receptive import Halo, ReceptiveField, align_down, align_up

Pair = tuple[int, int]


@dataclass(frozen=True)
class Span:
    """Half-open interval ``[start, stop)`` along one axis."""

    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def slice(self) -> slice:
        return slice(self.start, self.stop)

    def shift(self, by: int) -> Span:
        return Span(self.start + by, self.stop + by)


@dataclass(frozen=True)
class Box:
    """A rectangle as row and column spans."""

    rows: Span
    cols: Span

    @property
    def shape(self) -> Pair:
        return (self.rows.size, self.cols.size)

    @property
    def origin(self) -> Pair:
        return (self.rows.start, self.cols.start)

    @property
    def area(self) -> int:
        return self.rows.size * self.cols.size

    def slices(self) -> tuple[slice, slice]:
        return (self.rows.slice(), self.cols.slice())


@dataclass(frozen=True)
class AxisPart:
    """One tile along one axis: output core, input window, crop of the window's output."""

    core: Span
    window: Span
    crop: Span


def plan_axis(
    n_in: int,
    n_out: int,
    tile: int,
    *,
    stride: int,
    align: int,
    reach: Sequence[tuple[int, int]],
    fixed: int | None = None,
) -> tuple[AxisPart, ...]:
    """Cut one axis of ``n_out`` output cells into cores of ``tile`` cells.

    ``n_in`` is the input length. ``reach[j % len(reach)]`` is how many input
    pixels output cell ``j`` needs before and after its own cell (one entry
    for a fixed halo). Windows are clamped to ``[0, n_in)`` and their inner
    edges put on multiples of ``align``.

    ``fixed``: the one window length the network takes. A shorter window is
    lengthened inside the scene (more real context, inner edges still on the
    ``align`` grid) up to ``fixed``; one still shorter (a scene shorter than
    ``fixed``, or alignment) is padded by the prediction core, never labelled.

    Raises:
        GeometryError: a length is not positive, ``align`` is not a multiple of
            ``stride``, or a window needs more than ``fixed`` px.
    """
    if min(n_in, n_out, tile, stride, align) < 1:
        raise GeometryError(
            f"lengths, tile, stride and align must be positive: n_in={n_in}, n_out={n_out}, "
            f"tile={tile}, stride={stride}, align={align}"
        )
    if align % stride:
        raise GeometryError(f"align {align} is not a multiple of stride {stride}")
    parts = []
    for j0 in range(0, n_out, tile):
        j1 = min(j0 + tile, n_out)
        lo = j0 * stride - reach[j0 % len(reach)][0]
        hi = j1 * stride + reach[(j1 - 1) % len(reach)][1]
        w0 = 0 if lo <= 0 else align_down(lo, align)
        w1 = n_in if hi >= n_in else min(n_in, align_up(hi, align))
        if fixed is not None:
            w0, w1 = _fit(w0, w1, n_in, fixed, align)
        shift = w0 // stride
        parts.append(AxisPart(Span(j0, j1), Span(w0, w1), Span(j0 - shift, j1 - shift)))
    return tuple(parts)


def _fit(w0: int, w1: int, n_in: int, fixed: int, align: int) -> tuple[int, int]:
    """A window ``[w0, w1)`` lengthened towards ``fixed`` px inside ``[0, n_in)``."""
    if w1 - w0 > fixed:
        raise GeometryError(f"a window of {w1 - w0} px is needed but the network takes "
                            f"{fixed} px; use a smaller halo")
    w1 = min(n_in, w0 + fixed)
    if w1 - w0 < fixed and w0 > 0:
        w0 = max(0, align_up(w1 - fixed, align))
    return w0, w1


def fixed_tile_size(window: Pair, field: ReceptiveField, halo: Halo | None = None) -> Pair:
    """The core tile, in input px ``(rows, cols)``, of a network that takes only
    ``window`` px windows: the window less the halo on both sides (each rounded up to
    the ``align`` grid), rounded down to that grid.

    Raises:
        GeometryError: the halo leaves no core tile inside the window.
    """
    used = field.halo() if halo is None else halo
    sizes = []
    for k in (0, 1):
        a = field.align[k]
        size = align_down(window[k] - align_up(used.before[k], a) - align_up(used.after[k], a), a)
        if size < field.stride[k]:
            raise GeometryError(
                f"the network takes {window[0]}x{window[1]} px windows; a halo of "
                f"{used.before[k]}+{used.after[k]} px leaves no core tile inside them "
                "(declare a smaller halo)")
        sizes.append(size)
    return (sizes[0], sizes[1])


@dataclass(frozen=True)
class Tile:
    """A core tile of the output plane and the window that computes it."""

    index: Pair
    core: Box
    window: Box
    crop: Box


@dataclass(frozen=True)
class TileGrid:
    """The partition of a scene's output plane into core tiles, with windows.

    ``scene_shape`` is the input ``(rows, cols)``; ``output_shape`` what the
    network gives on the whole scene; ``tile_shape`` the core tile in output
    cells. Build it with :meth:`build`.
    """

    scene_shape: Pair
    output_shape: Pair
    tile_shape: Pair
    stride: Pair
    align: Pair
    halo: Halo
    rows: tuple[AxisPart, ...]
    cols: tuple[AxisPart, ...]
    #: The one ``(rows, cols)`` window the network takes, or None.
    window: Pair | None = None

    @classmethod
    def build(
        cls,
        scene_shape: Pair,
        output_shape: Pair,
        field: ReceptiveField,
        tile_size: int | Pair,
        halo: Halo | int | Pair | None = None,
        window: Pair | None = None,
    ) -> TileGrid:
        """Tiles of about ``tile_size`` input pixels a side for a scene.

        ``halo=None`` takes the field's derived halo; an explicit halo
        overrides it. ``tile_size`` is in input pixels and is rounded up to a
        whole number of output cells. ``window``: the one ``(rows, cols)`` input
        the network takes; the tiles are then :func:`fixed_tile_size` and
        ``tile_size`` is not used.

        Raises:
            GeometryError: a size is not positive, or the halo does not fit ``window``.
        """
        if window is not None:
            tile_size = fixed_tile_size(window, field, None if halo is None else Halo.of(halo))
        tile_in = (tile_size, tile_size) if isinstance(tile_size, int) else tuple(tile_size)
        if len(tile_in) != 2 or min(tile_in) < 1:
            raise GeometryError(f"tile size must be a positive int or pair, got {tile_size!r}")
        if min(scene_shape) < 1 or min(output_shape) < 1:
            raise GeometryError(
                f"scene {scene_shape} and output {output_shape} shapes must be positive"
            )
        if halo is None:
            used = field.halo()
            reaches = field.phase_reach
        else:
            used = Halo.of(halo)
            reaches = (((used.before[0], used.after[0]),), ((used.before[1], used.after[1]),))
        tile_out = (
            math.ceil(tile_in[0] / field.stride[0]), math.ceil(tile_in[1] / field.stride[1])
        )
        axes = [
            plan_axis(
                scene_shape[k],
                output_shape[k],
                tile_out[k],
                stride=field.stride[k],
                align=field.align[k],
                reach=reaches[k],
                fixed=None if window is None else window[k],
            )
            for k in (0, 1)
        ]
        return cls(
            scene_shape=(scene_shape[0], scene_shape[1]),
            output_shape=(output_shape[0], output_shape[1]),
            tile_shape=tile_out,
            stride=field.stride,
            align=field.align,
            halo=used,
            rows=axes[0],
            cols=axes[1],
            window=window,
        )

    def congruent(self) -> TileGrid:
        """This grid with inner window ends moved out so that every window's length is
        congruent to the scene's modulo ``align``: what a network whose padding depends
        on the input length (TensorFlow/Keras "same" padding) needs to reproduce the
        whole scene's output (:mod:`pipeline.probing`).

        A window ``[w0, w1)`` ending short of the scene end ``n`` gets ``w1 = n -
        align_down(n - w1, align)``: the smallest end at or after ``w1`` with ``w1 -
        w0`` congruent to ``n`` modulo ``align`` (``w0`` is on the align grid). Cores
        and crops are unchanged; windows only grow.
        """
        def axis(parts: Sequence[AxisPart], n: int, align: int) -> tuple[AxisPart, ...]:
            return tuple(
                p if p.window.stop >= n else replace(
                    p, window=Span(p.window.start, n - align_down(n - p.window.stop, align)))
                for p in parts
            )
        return replace(self, rows=axis(self.rows, self.scene_shape[0], self.align[0]),
                       cols=axis(self.cols, self.scene_shape[1], self.align[1]))

    @property
    def grid_shape(self) -> Pair:
        """Number of tiles along rows and columns."""
        return (len(self.rows), len(self.cols))

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def tile(self, i: int, j: int) -> Tile:
        r, c = self.rows[i], self.cols[j]
        return Tile((i, j), Box(r.core, c.core), Box(r.window, c.window), Box(r.crop, c.crop))

    def __iter__(self) -> Iterator[Tile]:
        for i in range(len(self.rows)):
            for j in range(len(self.cols)):
                yield self.tile(i, j)

    @property
    def chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Output chunk sizes per axis, in the form Dask and Zarr use."""
        return (
            tuple(p.core.size for p in self.rows),
            tuple(p.core.size for p in self.cols),
        )

    @property
    def max_window_shape(self) -> Pair:
        """The largest window (the network's fixed input, if any), for memory estimates."""
        if self.window is not None:
            return self.window
        return (
            max(p.window.size for p in self.rows),
            max(p.window.size for p in self.cols),
        )

    @property
    def computed_pixels(self) -> int:
        """Input pixels the network is run on, summed over all windows."""
        return sum(p.window.size for p in self.rows) * sum(p.window.size for p in self.cols)

    @property
    def overhead(self) -> float:
        """Pixels computed per scene pixel (1.0 means no halo recompute)."""
        return self.computed_pixels / (self.scene_shape[0] * self.scene_shape[1])


def interior_overhead(field: ReceptiveField, tile_size: int, halo: Halo | None = None) -> float:
    """Pixels computed per output pixel for a tile far from scene edges."""
    used = field.halo() if halo is None else halo
    ratio = 1.0
    for k in (0, 1):
        core = math.ceil(tile_size / field.stride[k]) * field.stride[k]
        lo = align_up(used.before[k], field.align[k])
        hi = align_up(used.after[k] + core, field.align[k]) - core
        ratio *= (core + lo + hi) / core
    return ratio
