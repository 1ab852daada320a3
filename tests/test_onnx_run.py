"""ONNX networks through ``fcn-pipeline run``: an exact FCN with its probed halo, networks
with global context under a declared halo, a fixed input size over a scene of odd size,
and the one prediction core shared by ``predict_tiled`` and the tasks.

Every network is exported from torch in the test run (tests/onnx_zoo.py). Float32
tolerance: ONNX Runtime and the whole-scene reference may order sums differently, so
labels are compared on pixels whose two best class scores differ by more than
:data:`MARGIN`; scores are compared within ``1e-4 * max(1, max |score|)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
import zarr

from pipeline.inference import predict_tiled
from pipeline.modelspec import load_spec, model_input
from tests.conftest import run_cli
from tests.onnx_zoo import ONNX_ZOO, K, exported, write_spec
from tests.support import child_env, smooth_scene

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Labels are compared where the best class leads the second by more than this.
MARGIN = 1e-4
NODATA = 255


def _spec(folder: Path, name: str, graph: bytes | None = None) -> Path:
    """:func:`tests.onnx_zoo.write_spec` with nodata 255 out."""
    return write_spec(folder, name, graph, nodata={"input": "scene", "output": NODATA})


def _scene(folder: Path, shape: tuple[int, int], seed: int = 0) -> Path:
    """A smooth random 3-band scene with a nodata corner (:func:`smooth_scene`)."""
    return smooth_scene(folder / f"scene-{shape[0]}x{shape[1]}.tif", shape, seed=seed)


def _run(scene: Path, spec: Path, out: Path, *args: str) -> Any:
    done = run_cli("run", str(scene), "--model", str(spec), "--out", str(out), *args,
                   env=child_env())
    assert done.returncode == 0, done.stderr
    return done


def _whole(name: str, scene: Path, spec_path: Path,
           multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The torch module's whole-scene scores ``(K, H, W)`` and the scene's validity; the
    input padded after its end with the fill (0 once normalised) to a ``multiple``."""
    spec = load_spec(spec_path)
    with rasterio.open(scene) as src:
        raw, valid = src.read(), src.dataset_mask() > 0
    image = model_input(raw, valid, spec)
    rows, cols = image.shape[1:]
    padded = np.zeros((3, -(-rows // multiple) * multiple, -(-cols // multiple) * multiple),
                      np.float32)
    padded[:, :rows, :cols] = image
    module = ONNX_ZOO[name].build()
    with torch.no_grad():
        scores = module(torch.from_numpy(padded)[None])[0].numpy()
    return scores[:, :rows, :cols], valid


def _same_labels(written: np.ndarray, scores: np.ndarray, valid: np.ndarray) -> None:
    expected = scores.argmax(0).astype(np.uint8)
    expected[~valid] = NODATA
    top2 = np.sort(scores, axis=0)[-2:]
    clear = (top2[1] - top2[0] > MARGIN) | ~valid
    assert clear.mean() > 0.99
    assert np.array_equal(written[clear], expected[clear])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain_fcn", "keras_same"])
def test_an_onnx_fcn_is_tiled_exactly_with_its_probed_halo(tmp_path: Path, name: str) -> None:
    """Small tiles over a scene of odd size give the whole scene's labels; run.json says
    the field was probed and the tiling is exact.

    Teeth: AnalysedModel.grid() without congruent windows for a length-dependent network:
    keras_same's labels differ along the seams; a probed halo one px short: plain_fcn's
    labels differ along the seams."""
    spec, scene = _spec(tmp_path, name), _scene(tmp_path, (101, 77))
    out = tmp_path / "out"
    _run(scene, spec, out, "--tile-size", "16")
    record = json.loads((out / "run.json").read_text())["scenes"][0]
    assert record["exactness"]["exact"] is True
    assert record["exactness"]["method"] == "probed"
    assert record["tiles"] > 16
    written = zarr.open_group(str(out / f"{scene.stem}.zarr"), mode="r")["labels"][:]
    _same_labels(written, *_whole(name, scene, spec))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["squeeze_excite", "group_norm"])
def test_onnx_networks_with_global_context_run_with_a_declared_halo(tmp_path: Path,
                                                                    name: str) -> None:
    """Refused without a halo (the probe's reason); with one the deviation is measured and
    falls as the halo grows, to 0 once windows cover the sample region.

    Teeth: the probe's global-context refusal removed: the first run exits 0;
    measure() ignoring the halo: the deviations do not fall."""
    spec, scene = _spec(tmp_path, name), _scene(tmp_path, (300, 300))
    refused = run_cli("run", str(scene), "--model", str(spec), "--out", str(tmp_path / "no"),
                      env=child_env())
    assert refused.returncode == 2, refused.stderr
    assert "global context" in refused.stderr and "--halo" in refused.stderr
    assert refused.stderr.count("declare") == 1, refused.stderr  # the advice, said once
    found = {}
    for halo in (2, 16, 300):
        done = _run(scene, spec, tmp_path / f"out{halo}", "--halo", str(halo), "--tile-size",
                    "64", "--dry-run", "--json")
        exactness = json.loads(done.stdout)["scenes"][0]["exactness"]
        assert exactness["method"] == "declared" and exactness["exact"] is False
        found[halo] = (exactness["max_abs_deviation"], exactness["labels_changed"])
    assert found[2][0] > found[16][0] > 0, found
    assert found[300] == (0.0, 0.0), found
    done = _run(scene, spec, tmp_path / "out", "--halo", "16", "--tile-size", "64")
    assert "approximate (declared halo 16x16 px)" in done.stdout


@pytest.mark.slow
def test_a_fixed_size_onnx_network_over_a_scene_of_odd_size(tmp_path: Path) -> None:
    """A network that takes only 64x64 windows labels a 101x77 scene (larger than a window
    along the rows, smaller along the columns) and a 50x45 one: the labels equal the
    torch module's on the whole scene padded after its end to even sizes (its stride 2)
    with the fill, as the windows at the scene's end are; the padding is never labelled.

    Teeth: Predictor._pad() skipped: ONNX Runtime refuses the edge windows (exit 1)."""
    spec = _spec(tmp_path, "fixed_64")
    for shape in ((101, 77), (50, 45)):
        scene = _scene(tmp_path, shape, seed=shape[0])
        out = tmp_path / f"out{shape[0]}"
        _run(scene, spec, out)
        assert json.loads((out / "run.json").read_text())["model"]["window"] == [64, 64]
        written = zarr.open_group(str(out / f"{scene.stem}.zarr"), mode="r")["labels"][:]
        assert written.shape == shape
        _same_labels(written, *_whole("fixed_64", scene, spec, multiple=2))


@pytest.mark.slow
def test_predict_tiled_and_run_give_identical_onnx_labels(tmp_path: Path) -> None:
    """``predict_tiled`` over the ONNX network (the same core, the same runtime) gives the
    labels ``run`` wrote, pixel for pixel.

    Teeth: tasks computing labels by their own arg-max on float16 scores: differences
    where two classes nearly tie."""
    from pipeline.model import load_network
    from pipeline.probing import probe_onnx

    spec_path, scene = _spec(tmp_path, "plain_fcn"), _scene(tmp_path, (90, 70))
    out = tmp_path / "out"
    _run(scene, spec_path, out, "--tile-size", "32")
    written = zarr.open_group(str(out / f"{scene.stem}.zarr"), mode="r")["labels"][:]
    spec = load_spec(spec_path)
    network = load_network(spec)
    field = probe_onnx(spec.weights.read_bytes()).field
    with rasterio.open(scene) as src:
        raw, valid = src.read(), src.dataset_mask() > 0
    scores = predict_tiled(network, model_input(raw, valid, spec), tile_size=32, field=field)
    expected = scores.argmax(0).astype(np.uint8)
    expected[~valid] = NODATA
    assert np.array_equal(written, expected)


@pytest.mark.slow
def test_a_fixed_size_network_with_global_context_has_its_deviation_measured(
        tmp_path: Path) -> None:
    """A 64x64-only network with GroupNorm: its deviation is measured on a
    64x64 window centred in the scene against the scene's tiles, on the pixels the
    window sees with the halo around them; a larger halo compares fewer pixels.

    Teeth: measure() returning "not measured" for fixed-size networks (as it did): the
    deviation is None."""
    from tests.onnx_export import onnx_bytes

    spec = _spec(tmp_path, "norm64",
                 onnx_bytes(ONNX_ZOO["group_norm"].build(), 3, window=(64, 64)))
    scene = _scene(tmp_path, (150, 130))
    found = {}
    for halo in (4, 16):
        done = _run(scene, spec, tmp_path / f"out{halo}", "--halo", str(halo), "--dry-run",
                    "--json")
        exactness = json.loads(done.stdout)["scenes"][0]["exactness"]
        assert exactness["method"] == "declared", exactness
        assert exactness["max_abs_deviation"] is not None and exactness["max_abs_deviation"] > 0
        found[halo] = exactness["region"]
    assert found[4][2:] == [56, 56] and found[16][2:] == [32, 32], found


def test_predict_tiled_keeps_windows_congruent_for_length_dependent_padding() -> None:
    """Keras-style "same" padding: with ``congruent=True`` the tiles of an odd-sized image
    equal the whole image; without, they do not (the probe's flag matters).

    Teeth: predict_tiled() ignoring ``congruent``: the first comparison fails."""
    from pipeline.networks import OnnxNetwork
    from pipeline.probing import probe_onnx

    graph = exported("keras_same")
    network = OnnxNetwork(graph)
    probed = probe_onnx(graph)
    assert probed.size_dependent_padding
    image = np.random.default_rng(5).random((3, 67, 53), dtype=np.float32)
    whole = network.forward(image[None]).numpy()[0]
    tiled = predict_tiled(network, image, tile_size=16, field=probed.field, congruent=True)
    np.testing.assert_allclose(tiled, whole, atol=1e-4)
    loose = predict_tiled(network, image, tile_size=16, field=probed.field)
    assert np.abs(loose - whole).max() > 1e-3


class _Labels(torch.nn.Module):
    """A zoo FCN whose graph picks the class itself: labels ``(N, H, W)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = ONNX_ZOO["plain_fcn"].build()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).argmax(1)


@pytest.mark.slow
def test_a_labels_network_refuses_blending_and_probabilities_before_the_run(
        tmp_path: Path) -> None:
    """Blending and probabilities need class scores: a network that gives labels gets a
    usage error (exit 2, one line) before anything is written, and runs without them.

    Teeth: _check_layout() removed from run(): the scene fails mid-run (exit 1)."""
    from tests.onnx_export import onnx_bytes

    spec = _spec(tmp_path, "labels", onnx_bytes(_Labels().eval(), 3))
    scene = _scene(tmp_path, (60, 50))
    for option in ("--probabilities", "--stitch=blend"):
        done = run_cli("run", str(scene), "--model", str(spec), "--out", str(tmp_path / "o"),
                       option, env=child_env())
        assert done.returncode == 2, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "gives labels, not class scores" in lines[0], lines
        assert not (tmp_path / "o").exists()
    _run(scene, spec, tmp_path / "o")
    written = zarr.open_group(str(tmp_path / "o" / f"{scene.stem}.zarr"), mode="r")["labels"][:]
    assert set(np.unique(written)) <= {*range(K), NODATA}


class _OutsideLabels(_Labels):
    """Labels 10 to 13: outside a 4-class spec."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 10


@pytest.mark.slow
def test_labels_outside_the_spec_classes_fail_the_scene_naming_the_spec(
        tmp_path: Path) -> None:
    """A labels network that gives classes the spec does not list is refused with one line
    naming the spec and the label (found by the deviation measurement, before anything is
    written), never a map of wrong classes.

    Teeth: measure() building its Predictor without ``source``: the line does not name
    the spec."""
    from tests.onnx_export import onnx_bytes

    spec = _spec(tmp_path, "outside", onnx_bytes(_OutsideLabels().eval(), 3))
    scene = _scene(tmp_path, (40, 40))
    done = run_cli("run", str(scene), "--model", str(spec), "--out", str(tmp_path / "o"),
                   "--halo", "4", env=child_env())
    assert done.returncode == 2, done.stderr
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "outside the spec's 4 classes" in lines[0], lines
    assert str(spec) in lines[0] and "label 1" in lines[0]
    assert not (tmp_path / "o").exists()
