"""Invalid pixels never change valid labels.

A float scene with a small hole of a declared nodata value (-9999, -1e20), NaN or +inf
must get the same label at every valid pixel whatever the hole holds, and the hole
labelled nodata: the reader marks the hole invalid (:func:`pipeline.readers.read_window`),
the network sees one neutral fill there instead of the raw values
(:func:`pipeline.modelspec.model_input`, ``predict_tiled(valid=, fill=)``), and a pixel
whose class scores are not all finite is labelled nodata (:func:`pipeline.inference.finite_scores`).

Scenes are generated here (rasterio, float32, EPSG:32633). How each test was checked
to have teeth is said in a ``Teeth:`` line in its docstring: the code was broken that
way in a scratch copy of the tree, the test run and seen to fail.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml
import zarr
from rasterio.transform import Affine
from torch import nn

from pipeline.errors import SceneError
from pipeline.grid import Box, Span
from pipeline.inference import predict_tiled
from pipeline.model import save_weights
from pipeline.modelspec import ModelSpec, parse_spec
from pipeline.readers import read_window
from pipeline.samples import render
from pipeline.tasks import _valid
from tests.conftest import ROOT, run_cli
from tests.modelspec_factories import spec_dict
from tests.zoo import ZOO

TRANSFORM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4600000.0)
NODATA_LABEL = 255

#: What the hole holds, and the nodata value the scene declares.
HOLES: dict[str, tuple[float, float]] = {
    "nodata-9999": (-9999.0, -9999.0),
    "nodata-1e20": (-1e20, -1e20),
    "nan": (math.nan, -9999.0),
    "inf": (math.inf, -9999.0),
}
#: Plus, end to end: the hole keeps real values and an internal mask declares it invalid.
MASKED = "masked"


def write_scene(path: Path, image: np.ndarray, hole: tuple[slice, slice], value: float | None,
                nodata: float, bands: list[int] | None = None) -> Path:
    """A float32 GeoTIFF of ``image`` ``(3, rows, cols)`` whose ``hole`` holds ``value``
    in ``bands`` (0-based; all by default), declaring ``nodata``. ``value=None`` keeps the
    image's own values in the hole and declares it invalid by an internal mask instead."""
    array = image.astype(np.float32)
    if value is not None:
        for band in range(len(array)) if bands is None else bands:
            array[band][hole] = value
    count, rows, cols = array.shape
    with rasterio.open(path, "w", driver="GTiff", height=rows, width=cols, count=count,
                       dtype="float32", crs="EPSG:32633", transform=TRANSFORM,
                       nodata=nodata) as ds:
        ds.write(array)
        if value is None:
            ds.write_mask(np.where(hole_mask((rows, cols), hole), 0, 255).astype(np.uint8))
    return path


def hole_mask(shape: tuple[int, int], hole: tuple[slice, slice]) -> np.ndarray:
    """Bool ``shape``, True in ``hole``."""
    mask = np.zeros(shape, bool)
    mask[hole] = True
    return mask


# ----------------------------------------------------------------- (a) predict_tiled

SMALL = (48, 64)  # multiples of 8 for the U-Net
SMALL_HOLE = (slice(14, 19), slice(29, 35))  # across tile edges (tiles of 16)


@pytest.fixture(scope="module")
def small_scenes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The four hole contents, and -9999 in band 2 only, over one smooth image."""
    root = tmp_path_factory.mktemp("small")
    rows, cols = np.mgrid[0:SMALL[0], 0:SMALL[1]]
    image = np.stack([np.sin(rows / 5.0) * np.cos(cols / 7.0), np.cos((rows + cols) / 9.0),
                      np.sin(cols / 4.0) + rows / SMALL[0]]) * 0.4 + 0.5
    scenes = {name: write_scene(root / f"{name}.tif", image, SMALL_HOLE, value, nodata)
              for name, (value, nodata) in HOLES.items()}
    scenes["band2-9999"] = write_scene(root / "band2.tif", image, SMALL_HOLE, -9999.0, -9999.0,
                                       bands=[1])
    return scenes


@pytest.mark.parametrize("name", ["dilated", "unet_tiny"])
def test_predict_tiled_valid_labels_do_not_depend_on_the_hole(
        small_scenes: dict[str, Path], name: str, one_torch_thread: None) -> None:
    """Guarantee (a): the reader marks the hole invalid, predict_tiled fills it; the
    argmax labels at valid pixels are byte-identical for every hole content, and tiled
    equals the whole image with the same fill.

    Teeth: _filled() in predict_tiled returning the image unfilled: the -9999/-1e20 holes
    reach the network and the tiled/whole comparison and the label comparison fail;
    read_window() without the float any-band nodata rule: the band-2-only hole is
    "valid" and its labels differ.
    """
    model = ZOO[name]().double()
    hole = hole_mask(SMALL, SMALL_HOLE)
    fill = 0.5
    labels: dict[str, bytes] = {}
    for content, path in small_scenes.items():
        data, valid = read_window(path, Box(Span(0, SMALL[0]), Span(0, SMALL[1])), [1, 2, 3])
        assert np.array_equal(valid, ~hole), content
        image = data.astype(np.float64)
        tiled = predict_tiled(model, image, tile_size=16, valid=valid, fill=fill)
        filled = np.where(valid, image, fill)
        with torch.inference_mode():
            whole = model(torch.from_numpy(filled)[None])[0].numpy()
        assert np.abs(tiled - whole).max() <= 1e-12, content
        labels[content] = tiled.argmax(axis=0).astype(np.uint8)[valid].tobytes()
    first = labels["nodata-9999"]
    assert {k: v == first for k, v in labels.items()} == dict.fromkeys(labels, True)


# ----------------------------------------------------------------- nodata.input override


def _spec(**nodata: object) -> ModelSpec:
    return parse_spec(spec_dict(nodata=nodata), path=Path("/specs/spec.yaml"))


def test_nodata_input_override_the_dtype_cannot_hold_is_refused() -> None:
    """Teeth: _valid() without the nodata_problem() check: 300 on uint8 compares as
    never equal (or overflows) and no error is raised: fails."""
    data = np.ones((3, 4, 5), np.uint8)
    valid = np.ones((4, 5), bool)
    with pytest.raises(SceneError) as caught:
        _valid(_spec(input=300), data, valid, "/data/u8.tif")
    assert str(caught.value) == (
        "u8.tif: nodata.input of /specs/spec.yaml: 300 is outside the uint8 range (0 to 255); "
        "set nodata.input to a value the scene's pixels can hold, or to scene or none"
    )
    with pytest.raises(SceneError, match=r"^u8\.tif: .*0\.5 is not an integer"):
        _valid(_spec(input=0.5), data, valid, "/data/u8.tif")
    with pytest.raises(SceneError, match=r"^f\.tif: .*-1e\+40 is outside the float32 range"):
        _valid(_spec(input=-1e40), data.astype(np.float32), valid, "/data/f.tif")


def test_nodata_input_override_follows_the_reader_rule() -> None:
    """A numeric override: float data invalid where ANY band equals it, integer data where
    EVERY band does; NaN and +-inf are invalid whatever nodata.input says.

    Teeth: the old _valid() (~np.all(data == value)) keeps the one-band -9999 pixel and
    the NaN valid; "none" returning all-True keeps the NaN valid: fails.
    """
    floats = np.ones((3, 2, 3), np.float32)
    floats[1, 0, 0] = -9999
    floats[:, 0, 1] = -9999
    floats[2, 1, 2] = np.nan
    scene_valid = np.ones((2, 3), bool)
    assert _valid(_spec(input=-9999), floats, scene_valid, "f.tif").tolist() == [
        [False, False, True], [True, True, False]]
    assert _valid(_spec(input="none"), floats, scene_valid, "f.tif").tolist() == [
        [True, True, True], [True, True, False]]
    ints = np.ones((3, 2, 3), np.uint8)
    ints[1, 0, 0] = 0
    ints[:, 0, 1] = 0
    assert _valid(_spec(input=0), ints, scene_valid, "u.tif").tolist() == [
        [True, False, True], [True, True, True]]


# ----------------------------------------------------------------- non-finite scores


class LogScores(nn.Module):
    """Scores ``log`` of bands 1 and 2: NaN where a band is negative, -inf where 0."""

    def __init__(self) -> None:
        super().__init__()
        self.pick = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.pick.weight.zero_()
            self.pick.weight[0, 0] = self.pick.weight[1, 1] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W) -> (N, 2, H, W)``."""
        return torch.log(self.pick(x))


def log_scores() -> nn.Module:
    """The factory the spec of :func:`test_non_finite_scores_are_labelled_nodata` names."""
    return LogScores().eval()


@pytest.mark.slow
def test_non_finite_scores_are_labelled_nodata(tmp_path: Path) -> None:
    """A valid, finite input pixel whose class scores are not all finite gets the nodata
    label and NaN probabilities, never argmax's pick (argmax takes a NaN as the maximum).
    Through the CLI, so it holds whatever shape the tasks' internals take.

    Teeth: _infer() masking with `valid` only (no finite_scores): the NaN pixels get
    class 0 and 1, the -inf one class 1: this fails.
    """
    image = np.full((3, 8, 8), 2.0, np.float32)
    image[1, 2, 3] = 5.0  # class 1
    image[0, 4, 4] = -1.0  # NaN score for class 0: argmax picks 0
    image[1, 5, 6] = -1.0  # NaN score for class 1: argmax picks 1
    image[0, 6, 1] = 0.0  # -inf for class 0, finite class 1: argmax's 1 is not trusted either
    scene = tmp_path / "scene.tif"
    with rasterio.open(scene, "w", driver="GTiff", height=8, width=8, count=3, dtype="float32",
                       crs="EPSG:32633", transform=TRANSFORM) as ds:
        ds.write(image)
    save_weights(log_scores(), tmp_path / "log.safetensors")
    spec = spec_dict(architecture="tests.test_invalid_pixels:log_scores", arguments={},
                     weights="log.safetensors", dtypes=["float32"],
                     normalization={"scale": 1.0, "mean": [0, 0, 0], "std": [1, 1, 1]},
                     classes=[{"name": "a", "color": [1, 2, 3]}, {"name": "b", "color": [4, 5, 6]}])
    (tmp_path / "log.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    done = run_cli("run", str(scene), "--out", str(out), "--model", str(tmp_path / "log.yaml"),
                   "--trust-spec-code", "--tile-size", "128", "--workers", "1",
                   "--probabilities", timeout=420,
                   env={"PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    with rasterio.open(out / "scene.tif") as cog:
        labels = cog.read(1)
    expected = np.zeros((8, 8), np.uint8)
    expected[2, 3] = 1
    expected[4, 4] = expected[5, 6] = expected[6, 1] = NODATA_LABEL
    assert labels.tolist() == expected.tolist()
    probs = zarr.open_group(str(out / "scene.zarr"), mode="r")["probabilities"][:]
    assert np.isnan(probs[:, labels == NODATA_LABEL]).all()
    assert np.isfinite(probs[:, labels != NODATA_LABEL]).all()


# ----------------------------------------------------------------- (b) end to end

SIZE = 256
TILE = 128
#: A hole across the tiles' corner at (128, 128): every tile's core or halo has some of it.
HOLE = (slice(122, 134), slice(121, 135))
SEED, OFFSET = 2, 900  # a stretch of sample scene 2 inside its footprint, all four classes


@pytest.mark.slow
def test_cli_valid_labels_do_not_depend_on_the_hole(tmp_path: Path) -> None:
    """Guarantee (b): one real run of five scenes that differ only in what their hole holds
    (-9999 and -1e20 declared nodata, NaN, +inf, and the real reflectances under an internal
    mask): labels byte-identical at every valid pixel, no valid pixel labelled nodata, the
    hole labelled nodata. Reflectances (float32 in 0..1), the demo network with scale 1.

    Teeth: tasks feeding normalize(data) instead of model_input(data, valid) (no fill):
    against the labels of the run with the fill, 1,200 of the 65,368 valid pixels change
    label in the -9999 scene, 1,201 in the -1e20 scene, 2,136 in the NaN and in the +inf
    scene (their scores turn NaN and are labelled nodata), none in the masked one; across
    scenes, as this test compares them, 1 (-1e20), 2,136 (NaN), 2,136 (+inf) and 1,200
    (masked) valid pixels differ from the -9999 scene: fails. read_window() testing only
    np.isnan: the +inf hole gets classes: fails.
    """
    image, _ = render(SEED, (OFFSET, OFFSET + SIZE), (OFFSET, OFFSET + SIZE), (2048, 2048))
    reflectance = image.astype(np.float32) / 255
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    for name, (value, nodata) in HOLES.items():
        write_scene(scenes / f"{name}.tif", reflectance, HOLE, value, nodata)
    write_scene(scenes / f"{MASKED}.tif", reflectance, HOLE, None, -9999.0)
    names = [*HOLES, MASKED]
    demo = ROOT / "pipeline" / "data"
    spec = yaml.safe_load((demo / "demo.yaml").read_text())
    spec["weights"] = str(demo / spec["weights"])
    spec["normalization"]["scale"] = 1.0
    (tmp_path / "reflectance.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    done = run_cli("run", *(str(scenes / f"{n}.tif") for n in names), "--out", str(out),
                   "--model", str(tmp_path / "reflectance.yaml"), "--tile-size", str(TILE),
                   "--workers", "1", timeout=420)
    assert done.returncode == 0, done.stderr
    hole = hole_mask((SIZE, SIZE), HOLE)
    labels = {}
    for name in names:
        with rasterio.open(out / f"{name}.tif") as cog:
            labels[name] = cog.read(1)
    first = labels["nodata-9999"][~hole]
    figures = {name: {"changed": int((v[~hole] != first).sum()),
                      "valid labelled nodata": int((v[~hole] == NODATA_LABEL).sum()),
                      "hole not nodata": int((v[hole] != NODATA_LABEL).sum())}
               for name, v in labels.items()}
    assert all(n == 0 for f in figures.values() for n in f.values()), (
        f"of {int((~hole).sum())} valid pixels: {figures}")
    assert len(np.unique(first)) >= 3  # a real landscape, not one class everywhere
