"""Receptive fields of ONNX graphs probed with ONNX Runtime (pipeline.probing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from pipeline.analysis import receptive_field
from pipeline.errors import ModelAnalysisError
from pipeline.grid import TileGrid
from pipeline.probing import (
    ProbedField,
    _check_tiles,
    _check_window,
    _Runner,
    _session,
    probe_onnx,
)
from pipeline.receptive import ReceptiveField
from tests.onnx_export import onnx_bytes
from tests.onnx_zoo import ONNX_ZOO, PlainFCN, exported

FIELDS = [name for name, entry in ONNX_ZOO.items() if entry.field is not None]
GLOBAL = [name for name, entry in ONNX_ZOO.items() if entry.field is None]


def _runner(model: bytes) -> _Runner:
    return _Runner(_session(model), "x", "y", 3)


@pytest.fixture(scope="module")
def probed() -> dict[str, ProbedField]:
    return {name: probe_onnx(exported(name)) for name in FIELDS}


@pytest.mark.parametrize("name", FIELDS)
def test_zoo_fields_are_found_exactly(name: str, probed: dict[str, ProbedField]) -> None:
    entry, got = ONNX_ZOO[name], probed[name]
    assert got.field == entry.field
    assert got.size_dependent_padding is entry.size_dependent
    assert got.window == entry.window
    assert got.checked.startswith("fixed" if entry.window else "tiled == whole")


@pytest.mark.parametrize("name", [n for n in FIELDS if n != "keras_same"])
def test_probe_agrees_with_the_torch_analysis(name: str, probed: dict[str, ProbedField]) -> None:
    assert probed[name].field == receptive_field(ONNX_ZOO[name].build())


class Coarse(nn.Module):
    """Scores at stride (2, 1): a stride-(2, 1) conv between 3x3 convs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(4, 4, 3, stride=(2, 1), padding=1), nn.ReLU(),
                                  nn.Conv2d(4, 2, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def test_coarse_output_has_its_stride() -> None:
    model = Coarse().eval()
    got = probe_onnx(onnx_bytes(model, 3))
    assert got.field.stride == (2, 1)
    assert got.field == receptive_field(model)


class Labels(nn.Module):
    """A zoo network whose graph ends in argmax: an (N, H, W) label output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = PlainFCN()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).argmax(1)


def test_label_output_is_probed_through_its_scores() -> None:
    got = probe_onnx(onnx_bytes(Labels().eval(), 3))
    assert got.field == ONNX_ZOO["plain_fcn"].field


class ZeroRing(nn.Module):
    """A 5x5 conv whose outer ring of weights is zero: structurally 5x5, numerically 3x3."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(12)
        self.conv = nn.Conv2d(3, 2, 5, padding=2)
        with torch.no_grad():
            ring = torch.ones(5, 5, dtype=torch.bool)
            ring[1:4, 1:4] = False
            self.conv.weight[:, :, ring] = 0.0

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def test_probe_copy_measures_the_structural_field() -> None:
    got = probe_onnx(onnx_bytes(ZeroRing().eval(), 3))
    assert got.field.size == (5, 5) and got.field.offset == (-2, -2)


@pytest.mark.parametrize("name", GLOBAL)
def test_global_context_is_refused_with_the_reason(name: str) -> None:
    with pytest.raises(ModelAnalysisError, match=r"^global context: output at") as info:
        probe_onnx(exported(name))
    message = str(info.value)
    assert ONNX_ZOO[name].global_op in message  # type: ignore[operator]
    assert "declare a halo" in message and "\n" not in message


def _tiled(runner: _Runner, image: np.ndarray, grid: TileGrid) -> np.ndarray:
    whole = runner(image)[0]
    out = np.full_like(whole, np.nan)
    for tile in grid:
        rows, cols = tile.window.slices()
        got = runner(np.ascontiguousarray(image[:, :, rows, cols]))[0]
        out[(slice(None), *tile.core.slices())] = got[(slice(None), *tile.crop.slices())]
    return out


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(9, 60), cols=st.integers(9, 60), tile=st.integers(4, 24),
       seed=st.integers(0, 2**16))
def test_keras_same_tiles_equal_whole_with_congruent_windows(
        rows: int, cols: int, tile: int, seed: int) -> None:
    runner = _runner(exported("keras_same"))
    field = ONNX_ZOO["keras_same"].field
    assert field is not None
    image = np.random.default_rng(seed).random((1, 3, rows, cols), dtype=np.float32)
    whole = runner(image)[0]
    grid = TileGrid.build((rows, cols), whole.shape[1:], field, tile).congruent()
    for part, n in ((grid.rows, rows), (grid.cols, cols)):
        assert all((p.window.size - n) % 2 == 0 and p.window.start % 2 == 0 for p in part)
    np.testing.assert_allclose(_tiled(runner, image, grid), whole, rtol=0, atol=1e-5)


def test_keras_same_tiles_differ_without_congruent_windows() -> None:
    runner = _runner(exported("keras_same"))
    field = ONNX_ZOO["keras_same"].field
    assert field is not None
    image = np.random.default_rng(0).random((1, 3, 41, 40), dtype=np.float32)
    whole = runner(image)[0]
    grid = TileGrid.build((41, 40), whole.shape[1:], field, 10)
    assert np.abs(_tiled(runner, image, grid) - whole).max() > 1e-3
    with pytest.raises(ModelAnalysisError, match=r"^cross-check failed: on a"):
        _check_tiles(runner, field, dependent=False)


def _short(field: ReceptiveField) -> ReceptiveField:
    """``field`` one pixel short before every output cell."""
    reach = tuple(tuple((max(0, b - 1), a) for b, a in axis) for axis in field.phase_reach)
    return ReceptiveField(field.size, field.stride, field.offset, field.align,
                          (reach[0], reach[1]))


def test_cross_check_refuses_a_field_one_pixel_short() -> None:
    field = ONNX_ZOO["dilated"].field
    assert field is not None
    runner = _runner(exported("dilated"))
    assert _check_tiles(runner, field, dependent=False).startswith("tiled == whole")
    with pytest.raises(ModelAnalysisError, match=r"^cross-check failed: on a .* declare a halo$"):
        _check_tiles(runner, _short(field), dependent=False)


def test_fixed_window_cross_check_refuses_a_field_one_pixel_short() -> None:
    field = ONNX_ZOO["fixed_64"].field
    assert field is not None
    runner = _runner(exported("fixed_64"))
    assert _check_window(runner, field, (64, 64)).startswith("fixed 64x64 windows")
    with pytest.raises(ModelAnalysisError, match=r"^cross-check failed: fixed windows"):
        _check_window(runner, _short(field), (64, 64))


class Positional(nn.Module):
    """Adds a fixed 64x64 pattern: depends on absolute position."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(13)
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.pattern = nn.Parameter(torch.randn(1, 2, 64, 64))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) + self.pattern


def test_position_dependent_fixed_window_is_refused() -> None:
    with pytest.raises(ModelAnalysisError, match="not translation-equivariant"):
        probe_onnx(onnx_bytes(Positional().eval(), 3, window=(64, 64)))


def test_an_output_that_does_not_cover_the_input_is_refused() -> None:
    """An unpadded 5x5 conv gives H-4 x W-4 cells: tiles at the scene's end would lack
    outputs (a run failed there mid-way), so the probe refuses it with the figures.

    Teeth: _stride() without the coverage check: the field is probed as 5x5 at offset 0.
    """
    with pytest.raises(ModelAnalysisError, match=r"gives \(124, 124\) cells for a \(128, 128\) "
                                                 r"px input at stride \(1, 1\): its output does "
                                                 "not cover the input"):
        probe_onnx(onnx_bytes(nn.Conv2d(3, 4, 5).eval(), 3))


def test_bad_bytes_and_names_are_refused() -> None:
    with pytest.raises(ModelAnalysisError, match=r"^not an ONNX model"):
        probe_onnx(b"not a model")
    with pytest.raises(ModelAnalysisError, match="no output 'scores'"):
        probe_onnx(exported("dilated"), output_name="scores")
    with pytest.raises(ModelAnalysisError, match="no input 'image'"):
        probe_onnx(exported("dilated"), input_name="image")
