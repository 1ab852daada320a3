"""Tile geometry: property tests of ``plan_axis`` and ``TileGrid`` (pure Python, no torch).

The properties are the ones exact tiling rests on: cores partition the output
plane once, windows stay inside the scene with inner edges on the ``align``
grid, every window covers its cells' receptive fields, and cropping a
window's output gives back its core.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import GeometryError
from pipeline.grid import AxisPart, Box, Span, TileGrid, interior_overhead, plan_axis
from pipeline.receptive import Halo, ReceptiveField, align_down, align_up

STRIDES = st.sampled_from([1, 2, 4, 8])
MULTIPLES = st.sampled_from([1, 2, 4])


@st.composite
def axes(draw: st.DrawFn, max_n_in: int = 3000, max_tile: int = 600) -> dict:
    """One axis: input length, output length, tile, stride, align and per-phase reach."""
    stride = draw(STRIDES)
    align = stride * draw(MULTIPLES)
    n_in = draw(st.integers(1, max_n_in))
    full = math.ceil(n_in / stride)
    n_out = full - draw(st.integers(0, min(3, full - 1)))  # "same" nets, or a few cells less
    phases = draw(st.sampled_from([1, align // stride]))
    reach = draw(
        st.lists(
            st.tuples(st.integers(0, 300), st.integers(0, 300)), min_size=phases, max_size=phases
        )
    )
    tile = draw(st.integers(1, max_tile))
    return dict(n_in=n_in, n_out=n_out, tile=tile, stride=stride, align=align, reach=reach)


def _plan(axis: dict) -> tuple[AxisPart, ...]:
    return plan_axis(
        axis["n_in"], axis["n_out"], axis["tile"],
        stride=axis["stride"], align=axis["align"], reach=axis["reach"],
    )


@settings(max_examples=300, deadline=None)
@given(axes())
def test_plan_axis_properties(axis: dict) -> None:
    n_in, n_out, tile = axis["n_in"], axis["n_out"], axis["tile"]
    stride, align, reach = axis["stride"], axis["align"], axis["reach"]
    parts = _plan(axis)
    phases = len(reach)

    # Cores partition [0, n_out) exactly once, in order, in tiles of `tile` cells.
    assert parts[0].core.start == 0
    assert parts[-1].core.stop == n_out
    for left, right in itertools.pairwise(parts):
        assert left.core.stop == right.core.start
    assert all(p.core.size == tile for p in parts[:-1])
    assert 1 <= parts[-1].core.size <= tile

    for part in parts:
        core, window, crop = part.core, part.window, part.crop
        j0, j1 = core.start, core.stop
        # Windows lie inside the scene, on the align grid unless at a scene edge.
        assert 0 <= window.start < window.stop <= n_in
        assert window.start == 0 or window.start % align == 0
        assert window.stop == n_in or window.stop % align == 0
        # ... and reach as far as the core's first and last cells need.
        if window.start != 0:
            assert window.start <= j0 * stride - reach[j0 % phases][0]
        if window.stop != n_in:
            assert window.stop >= j1 * stride + reach[(j1 - 1) % phases][1]
        # Not wastefully far: less than one align step beyond what is needed.
        assert window.start > j0 * stride - reach[j0 % phases][0] - align
        assert window.stop < j1 * stride + reach[(j1 - 1) % phases][1] + align
        # The crop is the core in the window's output coordinates.
        assert window.start % stride == 0
        assert crop.size == core.size
        assert crop == core.shift(-(window.start // stride))
        assert crop.start >= 0


@settings(max_examples=100, deadline=None)
@given(axes())
def test_plan_axis_covers_the_scene(axis: dict) -> None:
    """With a "same" output length, windows chain from 0 to n_in without gaps."""
    axis["n_out"] = math.ceil(axis["n_in"] / axis["stride"])
    parts = _plan(axis)
    assert parts[0].window.start == 0
    assert parts[-1].window.stop == axis["n_in"]
    for left, right in itertools.pairwise(parts):
        assert right.window.start <= left.window.stop
    assert sum(p.window.size for p in parts) >= axis["n_in"]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_in=0, n_out=1, tile=1, stride=1, align=1),
        dict(n_in=5, n_out=0, tile=1, stride=1, align=1),
        dict(n_in=5, n_out=5, tile=0, stride=1, align=1),
        dict(n_in=5, n_out=5, tile=1, stride=0, align=1),
        dict(n_in=5, n_out=3, tile=1, stride=2, align=3),
    ],
)
def test_plan_axis_rejects_bad_arguments(kwargs: dict) -> None:
    n_in, n_out, tile = kwargs.pop("n_in"), kwargs.pop("n_out"), kwargs.pop("tile")
    with pytest.raises(GeometryError):
        plan_axis(n_in, n_out, tile, reach=[(0, 0)], **kwargs)


def _field(rows: dict, cols: dict) -> ReceptiveField:
    """A field whose stride, align and reach are those of two drawn axes."""
    return ReceptiveField(
        size=(1, 1),
        stride=(rows["stride"], cols["stride"]),
        offset=(0, 0),
        align=(rows["align"], cols["align"]),
        reach=(tuple(rows["reach"]), tuple(cols["reach"])),
    )


@settings(max_examples=150, deadline=None)
@given(axes(), axes())
def test_tile_grid_build(rows: dict, cols: dict) -> None:
    field = _field(rows, cols)
    scene, out = (rows["n_in"], cols["n_in"]), (rows["n_out"], cols["n_out"])
    tile = (rows["tile"] * rows["stride"], cols["tile"] * cols["stride"])
    grid = TileGrid.build(scene, out, field, tile)

    assert grid.tile_shape == (rows["tile"], cols["tile"])
    assert grid.rows == _plan(rows) and grid.cols == _plan(cols)
    assert grid.halo == field.halo()
    assert tuple(map(sum, grid.chunks)) == out
    assert grid.grid_shape == (len(grid.chunks[0]), len(grid.chunks[1]))
    assert len(grid) == grid.grid_shape[0] * grid.grid_shape[1]
    assert grid.max_window_shape == (
        max(p.window.size for p in grid.rows), max(p.window.size for p in grid.cols)
    )
    windows = (sum(p.window.size for p in grid.rows), sum(p.window.size for p in grid.cols))
    assert grid.computed_pixels == windows[0] * windows[1]
    assert grid.overhead == pytest.approx(grid.computed_pixels / (scene[0] * scene[1]))
    if out == tuple(math.ceil(n / s) for n, s in zip(scene, field.stride)):
        assert grid.computed_pixels >= scene[0] * scene[1]
        assert grid.overhead >= 1


@settings(max_examples=100, deadline=None)
@given(axes(max_n_in=200, max_tile=40), axes(max_n_in=200, max_tile=40))
def test_tiles_cover_every_output_cell_once(rows: dict, cols: dict) -> None:
    field = _field(rows, cols)
    scene, out = (rows["n_in"], cols["n_in"]), (rows["n_out"], cols["n_out"])
    grid = TileGrid.build(scene, out, field, (rows["tile"] * rows["stride"], cols["tile"]))
    counter = np.zeros(out, dtype=int)
    seen = []
    for tile in grid:
        seen.append(tile.index)
        counter[tile.core.slices()] += 1
        assert tile == grid.tile(*tile.index)
        assert tile.crop.shape == tile.core.shape
        assert tile.window.rows.stop <= scene[0] and tile.window.cols.stop <= scene[1]
        assert tile.crop.origin == (
            tile.core.rows.start - tile.window.rows.start // field.stride[0],
            tile.core.cols.start - tile.window.cols.start // field.stride[1],
        )
    assert (counter == 1).all()
    assert len(seen) == len(set(seen)) == len(grid)


def test_tile_size_is_rounded_up_to_whole_output_cells() -> None:
    field = ReceptiveField(size=(3, 3), stride=(4, 2), offset=(0, 0), align=(8, 2))
    grid = TileGrid.build((100, 100), (25, 50), field, 5)
    assert grid.tile_shape == (2, 3)
    assert TileGrid.build((100, 100), (25, 50), field, (8, 7)).tile_shape == (2, 4)


def test_tile_grid_explicit_halo_overrides_the_field() -> None:
    field = ReceptiveField(size=(9, 9), stride=(1, 1), offset=(-4, -4), align=(4, 4))
    grid = TileGrid.build((50, 60), (50, 60), field, 16, halo=Halo((1, 2), (3, 4)))
    assert grid.halo == Halo((1, 2), (3, 4))
    # rows: core [16, 32) reads from align_down(16 - 1, 4) = 12 to align_up(32 + 3, 4) = 36
    assert grid.rows[1].window == Span(12, 36)
    assert grid.cols[1].window == Span(12, 36)  # cols: 16 - 2 -> 12, 32 + 4 -> 36
    assert TileGrid.build((50, 60), (50, 60), field, 16, halo=0).rows[1].window == Span(16, 32)


@pytest.mark.parametrize(
    "args",
    [
        ((10, 10), (10, 10), 0),
        ((10, 10), (10, 10), (4, 0)),
        ((10, 10), (10, 10), (4, 4, 4)),
        ((0, 10), (1, 10), 4),
        ((10, 10), (10, 0), 4),
    ],
)
def test_tile_grid_rejects_bad_shapes(args: tuple) -> None:
    field = ReceptiveField(size=(3, 3), stride=(1, 1), offset=(-1, -1), align=(1, 1))
    scene, out, tile = args
    with pytest.raises(GeometryError):
        TileGrid.build(scene, out, field, tile)


def test_span_and_box() -> None:
    span = Span(3, 10)
    assert span.size == 7 and span.slice() == slice(3, 10) and span.shift(-3) == Span(0, 7)
    box = Box(Span(1, 4), Span(2, 7))
    assert box.shape == (3, 5) and box.origin == (1, 2) and box.area == 15
    assert box.slices() == (slice(1, 4), slice(2, 7))


# --- Halo -------------------------------------------------------------------------------------


def test_halo_of() -> None:
    assert Halo.of(3) == Halo((3, 3), (3, 3))
    assert Halo.of((2, 5)) == Halo((2, 5), (2, 5))
    halo = Halo((1, 2), (3, 4))
    assert Halo.of(halo) is halo
    assert Halo.of(0) == Halo((0, 0), (0, 0))
    with pytest.raises(GeometryError):
        Halo.of(-1)
    with pytest.raises(ValueError):  # GeometryError is also a ValueError
        Halo((0, -1), (0, 0))


@given(
    st.tuples(*[st.integers(0, 500)] * 4),
    st.tuples(st.integers(0, 64), st.integers(0, 64)),
)
def test_halo_shrink(sides: tuple[int, int, int, int], step: tuple[int, int]) -> None:
    halo = Halo(sides[:2], sides[2:])
    small = halo.shrink(step)
    for k in (0, 1):
        assert small.before[k] == max(0, halo.before[k] - step[k])
        assert small.after[k] == max(0, halo.after[k] - step[k])
    assert halo.shrink((0, 0)) == halo


# --- ReceptiveField ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(align=(3, 2)),  # align not a multiple of stride
        dict(align=(2, 5)),
        dict(size=(5.0, 5)),  # non-int values
        dict(stride=(2, "2")),
        dict(offset=(0, 0.5)),
        dict(size=(5, 5, 5)),  # not a pair
        dict(size=(0, 5)),  # not positive
        dict(stride=(2, 0), align=(2, 2)),
        dict(reach=(((0, 0),) * 3, ((0, 0),))),  # 3 phases where align // stride == 2
        dict(reach=(((0, 0),), ((0, 0),) * 4)),
    ],
)
def test_receptive_field_validation(kwargs: dict) -> None:
    base = dict(size=(5, 5), stride=(2, 2), offset=(-2, -2), align=(4, 2))
    with pytest.raises(GeometryError) as info:
        ReceptiveField(**{**base, **kwargs})
    assert isinstance(info.value, ValueError)


def test_receptive_field_accepts_one_or_all_phases() -> None:
    base = dict(size=(5, 5), stride=(2, 2), offset=(-2, -2), align=(4, 2))
    assert ReceptiveField(**base, reach=(((1, 2),), ((3, 4),))).halo() == Halo((4, 4), (4, 4))
    field = ReceptiveField(**base, reach=(((1, 2), (5, 6)), ((3, 4),)))
    assert field.phase_reach == (((1, 2), (5, 6)), ((3, 4),))


@given(
    st.tuples(st.integers(1, 500), st.integers(1, 500)),
    st.tuples(STRIDES, STRIDES),
    st.tuples(st.integers(-300, 300), st.integers(-300, 300)),
    st.tuples(MULTIPLES, MULTIPLES),
)
def test_default_reach_and_halo(size, stride, offset, multiple) -> None:
    align = (stride[0] * multiple[0], stride[1] * multiple[1])
    field = ReceptiveField(size=size, stride=stride, offset=offset, align=align)
    halo = field.halo()
    for k in (0, 1):
        # Cell j reads input pixels offset + j*stride .. offset + j*stride + size - 1 and owns
        # j*stride .. (j+1)*stride - 1: the default reach is what lies beyond its own cell.
        first, last = offset[k], offset[k] + size[k] - 1
        assert field.phase_reach[k] == ((max(0, -first), max(0, last - (stride[k] - 1))),)
        before, after = field.phase_reach[k][0]
        # halo() is the reach rounded up to the align grid.
        assert halo.before[k] % align[k] == 0 and halo.after[k] % align[k] == 0
        assert before <= halo.before[k] < before + align[k]
        assert after <= halo.after[k] < after + align[k]
    assert field.required_halo() == Halo(
        tuple(field.phase_reach[k][0][0] for k in (0, 1)),
        tuple(field.phase_reach[k][0][1] for k in (0, 1)),
    )


def test_halo_uses_first_phase_before_and_last_phase_after() -> None:
    field = ReceptiveField(
        size=(9, 9), stride=(1, 1), offset=(-4, -4), align=(4, 4),
        reach=(((3, 9), (7, 1), (2, 2), (1, 5)), ((0, 0),)),
    )
    assert field.halo() == Halo((4, 0), (8, 0))
    assert field.required_halo() == Halo((7, 0), (9, 0))


def test_align_helpers() -> None:
    assert [align_up(v, 4) for v in (0, 1, 4, 5)] == [0, 4, 4, 8]
    assert [align_down(v, 4) for v in (-1, 0, 3, 4, 7)] == [-4, 0, 0, 4, 4]


# --- interior_overhead ------------------------------------------------------------------------


def _interior_ratio(grid: TileGrid, field: ReceptiveField) -> float:
    """Input pixels read per core pixel, for a tile that touches no scene edge and starts on
    the align grid (found in the grid itself)."""
    ratio = 1.0
    for k, parts in enumerate((grid.rows, grid.cols)):
        n_in = grid.scene_shape[k]
        inner = [
            p for p in parts
            if p.window.start > 0 and p.window.stop < n_in
            and (p.core.start * field.stride[k]) % field.align[k] == 0
        ]
        assert inner, "scene too small for an interior tile"
        part = inner[0]
        ratio *= part.window.size / (part.core.size * field.stride[k])
    return ratio


@settings(max_examples=60, deadline=None)
@given(
    st.tuples(STRIDES, STRIDES),
    st.tuples(MULTIPLES, MULTIPLES),
    st.tuples(st.integers(-80, 0), st.integers(-80, 0)),
    st.tuples(st.integers(1, 200), st.integers(1, 200)),
    st.integers(1, 64),
    st.booleans(),
)
def test_interior_overhead_matches_a_tile_grid(stride, multiple, offset, size, tile, aligned):
    align = (stride[0] * multiple[0], stride[1] * multiple[1])
    field = ReceptiveField(size=size, stride=stride, offset=offset, align=align)
    lcm = math.lcm(*align)
    if aligned:
        tile = tile * lcm  # whole align steps: the derived per-phase grid is the interior one
        halo = None
    else:
        halo = field.halo()  # any tile size: explicit halo, tiles starting on the align grid
    core = max(math.ceil(tile / s) * s for s in stride)
    n = 8 * (core + 2 * max(align) + 2 * max(size) + 2 * max(-o for o in offset)) + 3
    out = (math.ceil(n / stride[0]), math.ceil(n / stride[1]))
    grid = TileGrid.build((n, n), out, field, tile, halo=halo)
    assert interior_overhead(field, tile, halo) == pytest.approx(_interior_ratio(grid, field))


def test_interior_overhead_worked_numbers() -> None:
    # FCN-8s-like: stride 1, align 32, halo 224 on every side, 512-pixel tiles.
    field = ReceptiveField(
        size=(491, 491), stride=(1, 1), offset=(-245, -245), align=(32, 32),
        reach=(((221, 214),), ((221, 214),)),
    )
    assert field.halo() == Halo((224, 224), (224, 224))
    assert interior_overhead(field, 512) == pytest.approx(((512 + 448) / 512) ** 2)
    assert interior_overhead(field, 512, Halo.of(0)) == pytest.approx(1.0)
