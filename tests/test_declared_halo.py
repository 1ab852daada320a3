"""Models with global context run with a declared halo and a measured deviation; the one
prediction core gives ``predict_tiled`` and ``run`` the same labels; blending and fixed
input sizes.

Global-context models here are torch modules (tests/global_models.py): squeeze-and-
excitation and GroupNorm; their ONNX exports are covered in tests/test_onnx_run.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
import yaml
import zarr
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from pipeline.grid import Box, Span
from pipeline.inference import predict_tiled
from pipeline.model import save_weights
from pipeline.modelspec import load_spec, model_input
from pipeline.networks import NetworkSignature, TorchNetwork
from pipeline.prediction import ramp
from pipeline.receptive import ReceptiveField
from tests.conftest import run_cli
from tests.global_models import group_norm, se
from tests.modelspec_factories import spec_dict, tiny
from tests.support import child_env, smooth_scene

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spec(folder: Path, factory: Any, name: str, **extra: Any) -> Path:
    torch.manual_seed(3)
    module = factory()
    with torch.no_grad():  # strong global context: the SE gates and GroupNorm matter
        for parameter in module.parameters():
            parameter.mul_(3.0)
    digest = save_weights(module.eval(), folder / f"{name}.safetensors")
    data = spec_dict(architecture=f"tests.global_models:{factory.__name__}",
                     weights=f"{name}.safetensors", sha256=digest, name=name, **extra)
    data.pop("arguments", None)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _tiny_spec(folder: Path) -> Path:
    torch.manual_seed(1)
    digest = save_weights(tiny(num_classes=3).eval(), folder / "tiny.safetensors")
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec_dict(sha256=digest)))
    return path


def _scene(folder: Path, size: tuple[int, int] = (300, 340), seed: int = 0) -> Path:
    """A smooth random 3-band scene with a nodata corner (:func:`smooth_scene`)."""
    return smooth_scene(folder / "scene.tif", size, seed=seed, cell=20, noise=12.0,
                        hole=(30, 40))


def _cli(*args: str) -> Any:
    return run_cli(*args, env=child_env())


def _plan(scene: Path, spec: Path, out: Path, *args: str) -> dict[str, Any]:
    done = _cli("run", str(scene), "--model", str(spec), "--trust-spec-code", "--out", str(out),
                "--tile-size", "64", "--dry-run", "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_model_with_global_context_is_refused_without_a_halo(tmp_path: Path) -> None:
    """The analysis's reason and how to declare a halo, one line, exit 2, nothing written.

    Teeth: analyse_model() falling back to a pixel-wise field without a declared halo: the
    run goes ahead and exits 0."""
    spec, scene = _spec(tmp_path, se, "se"), _scene(tmp_path)
    done = _cli("run", str(scene), "--model", str(spec), "--trust-spec-code",
                "--out", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "AdaptiveAvgPool2d" in lines[0] and "--halo" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("factory", [se, group_norm], ids=["squeeze-excitation", "groupnorm"])
def test_the_measured_deviation_falls_as_the_declared_halo_grows(tmp_path: Path,
                                                                 factory: Any) -> None:
    """Halo 2 deviates, halo 16 less, and a halo whose windows cover the sample region is
    exact there (0).

    Teeth: measure() comparing the tiled prediction with itself: every deviation is 0 and
    the first assertion fails; measure() ignoring the halo (tiles of halo 0): no fall."""
    spec, scene = _spec(tmp_path, factory, factory.__name__), _scene(tmp_path)
    found = {}
    for halo in (2, 16, 200):
        plan = _plan(scene, spec, tmp_path / f"out{halo}", "--halo", str(halo))
        exactness = plan["scenes"][0]["exactness"]
        assert exactness["exact"] is False and exactness["method"] == "declared"
        assert exactness["halo"] == [halo, halo]
        found[halo] = (exactness["max_abs_deviation"], exactness["labels_changed"])
    assert found[2][0] > found[16][0] > 0, found
    assert found[2][1] >= found[16][1], found
    assert found[200] == (0.0, 0.0), found


def test_the_spec_declares_a_halo_and_the_option_overrides_it(tmp_path: Path) -> None:
    """``halo:`` in the spec is used; ``--halo`` wins over it.

    Teeth: _declared_halo() ignoring the spec: the first plan is refused (exit 2)."""
    spec = _spec(tmp_path, se, "se", halo=[4, 6])
    scene = _scene(tmp_path)
    plan = _plan(scene, spec, tmp_path / "a")
    assert plan["scenes"][0]["exactness"]["halo"] == [4, 6]
    plan = _plan(scene, spec, tmp_path / "b", "--halo", "8")
    assert plan["scenes"][0]["exactness"]["halo"] == [8, 8]


@pytest.mark.slow
def test_a_rerun_with_another_halo_is_refused_naming_the_halo(tmp_path: Path) -> None:
    """Published with ``--halo 4``, the same command skips; with ``--halo 8`` it is
    refused, the reason names the halo (the setting the user changed) and the dry run's
    plan shows the halo asked for.

    Teeth: _WHAT mapping "halo" to "tile size" (as before): the reason names the tile size,
    which did not change; describe() showing the field's halo when no scene is planned:
    the plan says 0x0 px."""
    spec, scene, out = _spec(tmp_path, se, "se"), _scene(tmp_path), tmp_path / "out"
    done = _cli("run", str(scene), "--model", str(spec), "--trust-spec-code", "--out",
                str(out), "--tile-size", "64", "--halo", "4")
    assert done.returncode == 0, done.stderr
    assert _plan(scene, spec, out, "--halo", "4")["scenes"][0]["action"] == "skip"
    done = _cli("run", str(scene), "--model", str(spec), "--trust-spec-code", "--out",
                str(out), "--tile-size", "64", "--halo", "8", "--dry-run")
    assert done.returncode == 2, done.stderr
    assert "scene: refused: outputs made with other halo (--overwrite replaces it)" in \
        done.stdout, done.stdout
    assert "halo before 8x8 px, after 8x8 px (rows x cols)" in done.stdout, done.stdout


@pytest.mark.slow
def test_a_run_records_its_exactness_and_blends_on_request(tmp_path: Path) -> None:
    """run.json ``scenes[].exactness`` for a declared halo (crop, then blend) and for an
    exact model; the summary names the deviation.

    Teeth: _exactness() not storing the measurement: ``exactness`` is None in run.json;
    tasks ignoring ModelRef.stitch: the blended labels equal the cropped ones."""
    spec, scene = _spec(tmp_path, se, "se"), _scene(tmp_path)
    crop_out, blend_out = tmp_path / "crop", tmp_path / "blend"
    for out, extra in ((crop_out, ()), (blend_out, ("--stitch", "blend"))):
        done = _cli("run", str(scene), "--model", str(spec), "--trust-spec-code", "--out",
                    str(out), "--tile-size", "64", "--halo", "6", *extra)
        assert done.returncode == 0, done.stderr
        assert "approximate (declared halo 6x6 px)" in done.stdout
        record = json.loads((out / "run.json").read_text())["scenes"][0]["exactness"]
        assert record["exact"] is False and record["method"] == "declared"
        assert record["max_abs_deviation"] > 0 and 0 <= record["labels_changed"] <= 1
    cropped = zarr.open_group(str(crop_out / "scene.zarr"), mode="r")["labels"][:]
    blended = zarr.open_group(str(blend_out / "scene.zarr"), mode="r")["labels"][:]
    assert not np.array_equal(cropped, blended)
    assert np.array_equal(cropped == 255, blended == 255)  # the same pixels are nodata
    exact_out = tmp_path / "exact"
    done = _cli("run", str(scene), "--model", str(_tiny_spec(tmp_path)), "--trust-spec-code",
                "--out", str(exact_out), "--tile-size", "64")
    assert done.returncode == 0, done.stderr
    record = json.loads((exact_out / "run.json").read_text())["scenes"][0]["exactness"]
    assert record["exact"] is True and record["method"] == "analysed"
    assert record["max_abs_deviation"] == 0.0 and record["labels_changed"] == 0.0


@pytest.mark.slow
def test_run_and_predict_tiled_give_identical_labels(tmp_path: Path) -> None:
    """The labels ``run`` writes equal the arg-max of ``predict_tiled`` on the same
    normalised, filled input, nodata where the scene has it: one core.

    Teeth: Predictor._labelled() picking the class with torch.argmax on a float16 copy
    of the scores in the tasks only (a second code path): labels differ on near ties."""
    spec_path, scene = _tiny_spec(tmp_path), _scene(tmp_path, (257, 203))
    out = tmp_path / "out"
    done = _cli("run", str(scene), "--model", str(spec_path), "--trust-spec-code",
                "--out", str(out), "--tile-size", "64")
    assert done.returncode == 0, done.stderr
    written = zarr.open_group(str(out / "scene.zarr"), mode="r")["labels"][:]
    spec = load_spec(spec_path)
    from pipeline.model import build_model

    model = build_model(spec, trust_code=True)
    with rasterio.open(scene) as src:
        raw, valid = src.read(), src.dataset_mask() > 0
    scores = predict_tiled(model, model_input(raw, valid, spec), tile_size=48)
    expected = scores.argmax(0).astype(np.uint8)
    expected[~valid] = spec.nodata_output
    assert np.array_equal(written, expected)


def test_blending_an_exact_model_equals_the_whole_image(one_torch_thread: None) -> None:
    """A model whose field reaches 1 px is exact everywhere in a window but its outermost
    pixel, which the ramp weighs 0: blending gives the whole image's output.

    Teeth: Predictor._blend() dividing by the number of windows instead of the summed
    weights: the seams are pulled towards 0; a ramp of (d + 1) / (halo + 1): the
    outermost pixels, padded, leak in."""
    torch.manual_seed(0)
    model = tiny(num_classes=3).eval()
    image = torch.rand(3, 90, 77)
    whole = model(image[None])[0].detach().numpy()
    blended = predict_tiled(model, image, tile_size=32, halo=5, stitch="blend")
    np.testing.assert_allclose(blended, whole, atol=1e-5)


class _FixedWindow(TorchNetwork):
    """A torch FCN that refuses any input but ``window``: what a fixed-size export is."""

    def __init__(self, module: nn.Module, window: tuple[int, int]) -> None:
        super().__init__(module)
        self._fixed = NetworkSignature("torch", 3, window, "scores", 3)
        self.shapes: set[tuple[int, int]] = set()

    @property
    def signature(self) -> NetworkSignature:
        return self._fixed

    def forward(self, batch: np.ndarray) -> torch.Tensor:
        assert batch.shape[2:] == self._fixed.window, batch.shape
        self.shapes.add(batch.shape[2:])
        return super().forward(batch)


@pytest.mark.parametrize("shape", [(61, 83), (40, 30), (129, 64)])
def test_a_fixed_input_network_gets_windows_of_exactly_its_size(shape: tuple[int, int]) -> None:
    """Every forward pass is 48x48 (scenes smaller and larger, odd sizes), and the result
    equals the whole image for an exact FCN: the padding is never labelled.

    Teeth: Predictor._pad() skipped: the network's assertion fails on edge windows;
    padding before instead of after: the crops are shifted and the values differ."""
    torch.manual_seed(0)
    module = tiny(num_classes=3).eval()
    field = ReceptiveField(size=(3, 3), stride=(1, 1), offset=(-1, -1), align=(1, 1))
    network = _FixedWindow(module, (48, 48))
    image = torch.rand(3, *shape)
    whole = module(image[None])[0].detach().numpy()
    tiled = predict_tiled(network, image, tile_size=999, field=field)
    assert network.shapes == {(48, 48)}
    np.testing.assert_allclose(tiled, whole, atol=1e-5)


@given(start=st.integers(0, 50), size=st.integers(1, 60), before=st.integers(0, 9),
       after=st.integers(0, 9), scene=st.integers(1, 200))
def test_blend_weights_are_positive_and_full_away_from_inner_edges(
        start: int, size: int, before: int, after: int, scene: int) -> None:
    """Weights lie in [0, 1]; the outermost pixel at an inner edge weighs 0; a pixel at
    least the halo away from every inner edge (or by the scene's edge) weighs 1.

    Teeth: ramp() tapering at scene edges too: the first row of a window at row 0 gets
    less than 1."""
    stop = min(scene, start + size)
    if stop <= start:
        return
    window = Box(Span(start, stop), Span(0, 1))
    weight = ramp(window, (before, 0), (after, 0), (scene, 1))[:, 0]
    assert (weight >= 0).all() and (weight <= 1).all()
    if start > 0 and before > 0:
        assert weight[0] == 0.0
    for k, w in enumerate(weight):
        inner_before = start > 0 and k < before
        inner_after = stop < scene and stop - start - 1 - k < after
        if not inner_before and not inner_after:
            assert w == 1.0


def test_a_sample_region_without_a_seam_is_not_reported_as_exact() -> None:
    """Tiles larger than the sample region leave no seam to measure: the deviation is
    None with the reason, never a misleading 0.

    Teeth: the one-tile check removed from measure(): it reports 0.0."""
    from pipeline.exactness import measure
    from pipeline.receptive import Halo

    torch.manual_seed(0)
    network = TorchNetwork(se().eval())
    field = ReceptiveField(size=(1, 1), stride=(1, 1), offset=(0, 0), align=(1, 1))
    image = np.random.default_rng(0).random((3, 600, 600), dtype=np.float32)

    def read(window: Box) -> tuple[np.ndarray, None]:
        rows, cols = window.slices()
        return image[:, rows, cols], None

    region = Box(Span(150, 450), Span(150, 450))
    found = measure(network, field, Halo.of(8), 512, region, read, classes=3,
                    fill=np.zeros(3, np.float32), stitch="crop", scene_shape=(600, 600))
    assert found.max_abs_deviation is None and found.labels_changed is None
    assert found.note is not None and "no seam" in found.note
    seams = measure(network, field, Halo.of(8), 128, region, read, classes=3,
                    fill=np.zeros(3, np.float32), stitch="crop", scene_shape=(600, 600))
    assert seams.max_abs_deviation is not None and seams.max_abs_deviation > 0


def test_a_halo_larger_than_the_scene_needs_no_more_memory_than_the_scene(
        tmp_path: Path) -> None:
    """Windows are clamped to their scene, so the automatic tile size sizes them so:
    a 60000 px halo on a 300x340 scene plans (exit 0) and its windows cover the region.

    Teeth: choose_tiles() sizing windows as tile + halo uncapped: refused for ~TiB of
    memory."""
    spec, scene = _spec(tmp_path, se, "se"), _scene(tmp_path)
    done = _cli("run", str(scene), "--model", str(spec), "--trust-spec-code", "--out",
                str(tmp_path / "out"), "--halo", "60000", "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    exactness = json.loads(done.stdout)["scenes"][0]["exactness"]
    assert exactness["halo"] == [60000, 60000]


def test_the_sample_region_shrinks_to_fit_the_memory_budget(tmp_path: Path) -> None:
    """One window over the sample region must fit a task's memory budget: with a small
    budget the region is smaller than with the default.

    Teeth: _measure() not passing ``fits`` to sample_region(): both regions are 256 px."""
    spec, scene = _spec(tmp_path, se, "se"), _scene(tmp_path)
    regions = []
    for extra in ((), ("--memory-budget", "3MiB")):
        plan = _plan(scene, spec, tmp_path / f"out{len(extra)}", "--halo", "4", *extra)
        regions.append(plan["scenes"][0]["exactness"]["region"][2:])
    assert regions[0] == [256, 256], regions
    assert max(regions[1]) < 256, regions
