"""class_labels: argmax over classes, fast on cropped CPU tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import GeometryError
from pipeline.inference import class_labels


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

    model = nn.Conv2d(3, 2, 3, padding=1).eval()
    before = torch.get_num_threads()
    speeds = window_speeds(model, 3, [(64, 64), (32, 48), (64, 64)], threads=before + 1)
    assert torch.get_num_threads() == before  # restored
    assert list(speeds) == [(32, 48), (64, 64)]
    assert all(v > 0 for v in speeds.values())
    slow = window_speeds(model, 3, [(16, 16), (512, 512), (1024, 1024)], threads=1,
                         time_limit=0.0)
    assert list(slow) == [(16, 16)]  # over the limit after the first shape: no more
