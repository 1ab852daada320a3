"""class_labels: argmax over classes, fast on cropped CPU tensors; finite_scores; the
fill of invalid pixels in predict_tiled."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import GeometryError
from pipeline.inference import predict_tiled
from pipeline.prediction import class_labels, finite_scores
from tests.zoo import ZOO


@settings(max_examples=60, deadline=None)
@given(
    classes=st.integers(1, 6),
    rows=st.integers(1, 9),
    cols=st.integers(1, 9),
    levels=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_equals_argmax_with_ties(classes: int, rows: int, cols: int, levels: int,
                                 seed: int) -> None:
    # Few distinct values make ties common: both must pick the lowest class.
    rng = np.random.default_rng(seed)
    scores = torch.from_numpy(rng.integers(0, levels, size=(2, classes, rows, cols)).astype(
        np.float32))
    assert torch.equal(class_labels(scores, torch.int64), scores.argmax(dim=1))


def test_cropped_and_channels_last_inputs() -> None:
    scores = torch.randn(2, 5, 40, 48)
    expected = scores[:, :, 3:37, 5:41].argmax(dim=1)
    crop = scores[:, :, 3:37, 5:41]
    assert not crop.is_contiguous()
    assert torch.equal(class_labels(crop, torch.int64), expected)
    last = scores.contiguous(memory_format=torch.channels_last)[:, :, 3:37, 5:41]
    assert torch.equal(class_labels(last, torch.int64), expected)


def test_dtype_and_many_classes() -> None:
    scores = torch.randn(1, 300, 4, 4)
    labels = class_labels(scores, torch.int32)
    assert labels.dtype == torch.int32
    assert torch.equal(labels.long(), scores.argmax(dim=1))


def test_nan_scores_as_argmax() -> None:
    scores = torch.tensor([[[[float("nan")]], [[1.0]], [[float("nan")]]]])
    assert class_labels(scores).item() == scores.argmax(dim=1).item()
    infinite = torch.tensor([[[[float("inf")]], [[2.0]], [[float("-inf")]]]])
    assert class_labels(infinite).item() == 0


def test_refuses_other_ranks() -> None:
    with pytest.raises(GeometryError, match=r"\(N, C, H, W\)"):
        class_labels(torch.zeros(3, 4, 4))


def test_window_speeds_are_measured_smallest_first_within_the_time_limit() -> None:
    from torch import nn

    from pipeline.inference import window_speeds
    from pipeline.networks import TorchNetwork

    model = nn.Conv2d(3, 2, 3, padding=1).eval()
    before = torch.get_num_threads()
    speeds = window_speeds(TorchNetwork(model), 3, [(64, 64), (32, 48), (64, 64)],
                           threads=before + 1)
    assert torch.get_num_threads() == before  # restored
    assert list(speeds) == [(32, 48), (64, 64)]
    assert all(v > 0 for v in speeds.values())
    slow = window_speeds(TorchNetwork(model), 3, [(16, 16), (512, 512), (1024, 1024)], threads=1,
                         time_limit=0.0)
    assert list(slow) == [(16, 16)]  # over the limit after the first shape: no more


def test_finite_scores_marks_pixels_with_any_non_finite_class_score() -> None:
    """Teeth: finite_scores() testing only isnan marks the inf pixels finite: fails."""
    scores = torch.zeros(2, 3, 2, 2)
    scores[0, 1, 0, 0] = float("nan")
    scores[0, 2, 1, 1] = float("inf")
    scores[1, 0, 0, 1] = float("-inf")
    finite = finite_scores(scores)
    assert finite.dtype == torch.bool and finite.shape == (2, 2, 2)
    assert finite.tolist() == [[[False, True], [True, False]], [[True, False], [True, True]]]
    with pytest.raises(GeometryError, match=r"\(N, C, H, W\)"):
        finite_scores(torch.zeros(3, 2, 2))


@pytest.mark.parametrize("name", ["dilated", "unet_tiny"])
@pytest.mark.parametrize("fill", [0.0, (0.25, -1.0, 3.0)])
def test_predict_tiled_with_a_fill_equals_the_whole_filled_image(
        name: str, fill: float | tuple[float, ...], one_torch_thread: None) -> None:
    """Exactness with invalid pixels: tiled equals whole on the same filled image, and
    what invalid or non-finite pixels held changes nothing.

    Teeth: _filled() returning the image unchanged: NaN reaches the output (and the
    sentinel changes it): fails; filling only the core of each window instead of the
    image before tiling would change halos and fail the whole-image comparison.
    """
    model = ZOO[name]().double()
    rng = np.random.default_rng(5)
    image = rng.normal(size=(3, 48, 56))
    valid = np.ones((48, 56), bool)
    valid[10:14, 20:30] = False  # a hole across tile edges (tiles of 16)
    filled = image.copy()
    filled[:, ~valid] = np.asarray(fill, dtype=np.float64).reshape(-1, 1)
    filled[:, 40, 7] = filled[:, 3, 50] = filled[:, 30, 30] = np.asarray(fill).reshape(-1)
    with torch.inference_mode():
        whole = model(torch.from_numpy(filled)[None])[0].numpy()
    results = []
    for hole in (-9999.0, np.nan, np.inf):
        held = image.copy()
        held[:, ~valid] = hole
        held[0, 40, 7] = np.nan  # non-finite in one channel of a "valid" pixel
        held[2, 3, 50] = np.inf
        held[1, 30, 30] = -np.inf
        tiled = predict_tiled(model, held, tile_size=16, valid=valid, fill=fill)
        assert np.abs(tiled - whole).max() <= 1e-12
        results.append(tiled.tobytes())
    assert len(set(results)) == 1


def test_predict_tiled_unchanged_for_finite_images_without_valid() -> None:
    """Teeth: _filled() treating every pixel as invalid (bad all True) sets the image to
    the fill: fails."""
    model = ZOO["dilated"]().double()
    image = np.random.default_rng(6).normal(size=(3, 20, 24))
    with torch.inference_mode():
        whole = model(torch.from_numpy(image)[None])[0].numpy()
    np.testing.assert_array_equal(predict_tiled(model, image, tile_size=8, fill=5.0), whole)


def test_predict_tiled_checks_valid_and_fill() -> None:
    """Teeth: _filled() without its checks: torch raises its own broadcasting error, not
    GeometryError: fails."""
    model = ZOO["dilated"]().double()
    image = np.zeros((3, 8, 8))
    with pytest.raises(GeometryError,
                       match=r"valid must be \(H, W\) = \(8, 8\), got shape \(8, 7\)"):
        predict_tiled(model, image, tile_size=4, valid=np.ones((8, 7), bool))
    with pytest.raises(GeometryError, match=r"fill must be one value or 3 .*got 2"):
        predict_tiled(model, image, tile_size=4, fill=(1.0, 2.0))
