"""The bundled demo model: a convolutionalized patch classifier, its weights, its training."""

from __future__ import annotations

import operator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from pipeline import demo
from pipeline.demo import (
    PATCH,
    STRIDE,
    DemoFCN,
    PatchClassifier,
    demo_fcn,
    fcn_from_classifier,
    load_demo,
    predict,
    train_demo,
)
from pipeline.inference import predict_tiled
from pipeline.model import build_model
from pipeline.modelspec import file_sha256, load_spec
from pipeline.samples import CLASSES, LABEL_NODATA, render

SPEC = demo.DEMO_DIR / demo.SPEC_NAME
#: A generated scene no training run sees (all four classes), and the packaged
#: model's pixel accuracy on it (0.979 after `fcn-pipeline demo train --out pipeline/data --seed 0`)
#: less 0.05.
HELD_OUT_SEED = 9100
MIN_ACCURACY = 0.929

_ALLOWED_MODULES = (nn.Conv2d, nn.ReLU, nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d, nn.BatchNorm2d)
_ALLOWED_FUNCTIONS = (F.pad, F.interpolate, operator.getitem, operator.add)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def test_demo_fcn_traces_with_only_plain_operations() -> None:
    fcn = demo_fcn()
    gm = fx.symbolic_trace(fcn)
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            assert isinstance(modules[node.target], _ALLOWED_MODULES), node.format_node()
        elif node.op == "call_function":
            assert node.target in _ALLOWED_FUNCTIONS, node.format_node()
        elif node.op == "call_method":
            assert node.target == "size", node.format_node()
    x = torch.randn(1, 3, 45, 38)
    torch.testing.assert_close(gm(x), fcn(x))


@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (17, 29), (64, 33), (101, 8)])
def test_output_has_the_input_shape(shape: tuple[int, int]) -> None:
    with torch.no_grad():
        out = demo_fcn()(torch.randn(2, 3, *shape))
    assert out.shape == (2, len(CLASSES), *shape)


def test_coarse_cells_land_on_patch_centres() -> None:
    # A body that averages each patch gives, on a ramp of pixel-centre coordinates,
    # the patch centre; bilinear upsampling keeps a ramp, so away from the padded
    # edges the dense output equals the input exactly when the crop is aligned.
    fcn = DemoFCN(nn.AvgPool2d(PATCH, STRIDE))
    rows, cols = 70, 93
    r = torch.arange(rows, dtype=torch.float64) + 0.5
    c = torch.arange(cols, dtype=torch.float64) + 0.5
    ramp = torch.stack([r[:, None].expand(rows, cols), c[None, :].expand(rows, cols)])[None]
    out = fcn(ramp)
    inner = np.s_[:, :, PATCH:-PATCH, PATCH:-PATCH]
    torch.testing.assert_close(out[inner], ramp[inner], rtol=0, atol=1e-12)


def test_convolutionalized_body_is_the_classifier_on_every_patch() -> None:
    classifier = PatchClassifier(len(CLASSES)).eval()
    fcn = fcn_from_classifier(classifier)
    patches = torch.randn(6, 3, PATCH, PATCH)
    with torch.no_grad():
        torch.testing.assert_close(fcn.body(patches).flatten(1), classifier(patches))
        image = torch.randn(1, 3, PATCH + 3 * STRIDE + 5, PATCH + 2 * STRIDE)
        coarse = fcn.body(image)
        assert coarse.shape[2:] == (4, 3)
        for i in range(4):
            for j in range(3):
                crop = image[:, :, i * STRIDE : i * STRIDE + PATCH, j * STRIDE : j * STRIDE + PATCH]
                torch.testing.assert_close(coarse[:, :, i, j], classifier(crop))


def test_tiled_prediction_equals_whole_image() -> None:
    fcn = demo_fcn().double()
    image = torch.randn(3, 97, 131, dtype=torch.float64)
    with torch.no_grad():
        whole = fcn(image[None])[0].numpy()
    for tile in (40, (24, 56)):
        np.testing.assert_allclose(predict_tiled(fcn, image, tile_size=tile), whole, atol=1e-12)


def test_packaged_spec_and_weights() -> None:
    spec = load_spec(SPEC)
    assert spec.architecture == "demo-fcn"
    assert spec.weights == SPEC.parent / demo.WEIGHTS_NAME
    assert file_sha256(spec.weights) == spec.sha256
    assert spec.weights.stat().st_size < 2_000_000
    assert spec.classes == CLASSES
    assert spec.normalization.scale == pytest.approx(1 / 255)
    fcn = demo_fcn(**spec.arguments.thaw())
    fcn.load_state_dict(load_demo(spec.weights).state_dict(), strict=True)
    built = build_model(spec)
    x = torch.randn(1, 3, 20, 21)
    with torch.no_grad():
        torch.testing.assert_close(built(x), fcn.eval()(x))


def test_packaged_model_is_accurate_on_a_held_out_scene() -> None:
    spec = load_spec(SPEC)
    image, labels = render(HELD_OUT_SEED, (0, 256), (0, 256), (256, 256))
    predicted = predict(load_demo(spec.weights), image, spec.normalization)
    valid = labels != LABEL_NODATA
    accuracy = float((predicted[valid] == labels[valid]).mean())
    assert accuracy > MIN_ACCURACY


def _tiny_training(out: Path) -> dict:
    return train_demo(out, seed=3, steps=4, scenes=2, scene_size=96, per_scene=200, batch=16,
                      log=lambda _: None)


def test_training_is_reproducible(tmp_path: Path) -> None:
    first = _tiny_training(tmp_path / "a")
    second = _tiny_training(tmp_path / "b")
    assert first["weights"].read_bytes() == second["weights"].read_bytes()
    assert first["sha256"] == second["sha256"]
    spec = load_spec(first["spec"])
    assert spec.sha256 == first["sha256"] == file_sha256(first["weights"])
    assert spec.normalization == first["normalization"]
    demo_fcn(len(spec.classes)).load_state_dict(load_demo(first["weights"]).state_dict())
    assert not torch.are_deterministic_algorithms_enabled()
