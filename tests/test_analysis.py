"""Receptive-field analysis: the zoo cross-checked against measured supports, the FCN
paper's Table 1, the networks the analysis must refuse, and convolutionalize."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.analysis import probe_receptive_field, receptive_field
from pipeline.errors import ModelAnalysisError
from pipeline.fully_convolutional import convolutionalize
from pipeline.inference import output_shape
from pipeline.models import fcn8s_vgg16, fcn16s_vgg16, fcn32s_vgg16, fcn_alexnet
from pipeline.receptive import Halo
from tests.zoo import REJECTED, SIZE_RULES, ZOO

# Networks whose output goes through bilinear interpolation: its outermost taps can get
# zero weight at some phases, so the analysis (one pixel of reach each side per bilinear
# step) may be up to 2 px wider per side than the measured support.
BILINEAR = {"upsampling"}
# Big FCNs: 32 phases per axis at about 0.2 s a probe. They are square (same kernels,
# strides and paddings on both axes), so all phases are probed along the rows and the
# phases that set the extremes, plus phase 0, along the columns.
SQUARE_FCNS = {"fcn8s_tiny", "fcn32s_tiny", "fcn_alexnet_tiny"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _probe_axis(
    model: nn.Module, name: str, k: int, phases: list[int]
) -> dict[int, tuple[int, int]]:
    """Measured support along axis ``k``, relative to ``j * stride``, of interior cells ``j``
    at the given phases (``j % (align // stride)``)."""
    field = receptive_field(model)
    stride, align, offset, size = field.stride[k], field.align[k], field.offset[k], field.size[k]
    period = align // stride
    rule = SIZE_RULES[name]
    # First cell of phase 0 whose whole field lies inside the input, then enough input
    # for the last probed cell's field plus one align step (ceil-mode pools and the
    # like must not clip it). The other axis is as short as the network allows.
    j0 = -(-max(0, -offset) // align) * period
    n_long = rule.near((j0 + period) * stride + offset + size + align)
    shape = [3, rule.near(1), rule.near(1)]
    shape[1 + k] = n_long
    supports = {}
    for phase in phases:
        j = j0 + phase
        at = (j, 0) if k == 0 else (0, j)
        first, last = probe_receptive_field(model, tuple(shape), at)[k]  # type: ignore[arg-type]
        assert offset + j * stride >= 0 and offset + j * stride + size <= n_long  # interior
        supports[phase] = (first - j * stride, last - j * stride)
    return supports


def _check_axis(name: str, field_offset: int, field_size: int,
                supports: dict[int, tuple[int, int]]) -> None:
    lo_field, hi_field = field_offset, field_offset + field_size - 1
    for phase, (lo, hi) in supports.items():
        assert lo_field <= lo <= hi <= hi_field, f"{name} phase {phase}: {lo}..{hi}"
    lo = min(s[0] for s in supports.values())
    hi = max(s[1] for s in supports.values())
    if name in BILINEAR:
        assert 0 <= lo - lo_field <= 2 and 0 <= hi_field - hi <= 2, (lo, hi, lo_field, hi_field)
    else:
        assert (lo, hi) == (lo_field, hi_field)  # tight


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SQUARE_FCNS else n for n in ZOO],
)
def test_zoo_field_matches_probe(name: str) -> None:
    model = ZOO[name]()
    field = receptive_field(model)
    for k in (0, 1):
        assert field.align[k] % field.stride[k] == 0
        assert len(field.phase_reach[k]) in (1, field.align[k] // field.stride[k])
    periods = [field.align[k] // field.stride[k] for k in (0, 1)]
    rows = _probe_axis(model, name, 0, list(range(periods[0])))
    _check_axis(name, field.offset[0], field.size[0], rows)
    if name in SQUARE_FCNS:
        assert (field.size[0], field.stride[0], field.offset[0], field.align[0]) == (
            field.size[1], field.stride[1], field.offset[1], field.align[1])
        extremes = {0, min(rows, key=lambda p: rows[p][0]), max(rows, key=lambda p: rows[p][1])}
        cols = _probe_axis(model, name, 1, sorted(extremes))
        assert cols == {p: rows[p] for p in cols}
        _check_axis(name, field.offset[1], field.size[1], {**rows, **cols})
    else:
        cols = _probe_axis(model, name, 1, list(range(periods[1])))
        _check_axis(name, field.offset[1], field.size[1], cols)


def test_zoo_geometry_recorded() -> None:
    """A few fields written out, so a change in the analysis shows up as a diff here."""
    expected = {
        "conv_padding_stride": ((5, 5), (2, 2), (-2, -2), (2, 2), Halo((2, 2), (2, 2))),
        "conv_anisotropic": ((11, 7), (2, 2), (-1, -2), (2, 2), Halo((2, 2), (8, 4))),
        "transposed_conv": ((15, 15), (1, 1), (-6, -6), (4, 4), Halo((8, 8), (8, 8))),
        "upsampling": ((10, 10), (1, 1), (-5, -5), (2, 2), Halo((6, 6), (4, 4))),
        "crop_skip": ((7, 7), (1, 1), (-1, -1), (1, 1), Halo((1, 1), (5, 5))),
        "unet_tiny": ((103, 103), (1, 1), (-51, -51), (8, 8), Halo((48, 48), (48, 48))),
    }
    for name, (size, stride, offset, align, halo) in expected.items():
        field = receptive_field(ZOO[name]())
        assert (field.size, field.stride, field.offset, field.align, field.halo()) == (
            size, stride, offset, align, halo), name


# --- The FCN paper's Table 1 ------------------------------------------------------------------

TABLE_1 = [
    (fcn32s_vgg16, 404, 32),
    (fcn16s_vgg16, 404, 32),
    (fcn8s_vgg16, 404, 32),
    (fcn_alexnet, 355, 32),
]


@pytest.mark.parametrize(
    ("factory", "size", "stride"), TABLE_1, ids=lambda v: getattr(v, "__name__", str(v))
)
def test_table_1_coarse_fcns(factory, size: int, stride: int) -> None:
    """Full-width nets built on the meta device: the geometry needs no weights."""
    with torch.device("meta"):
        model = factory().eval()
    assert all(p.is_meta for p in model.parameters())
    field = receptive_field(nn.Sequential(model.features, model.head))
    assert field.size == (size, size)
    assert field.stride == (stride, stride)
    assert field.align == (stride, stride)


@pytest.mark.parametrize(
    ("factory", "halo"),
    [
        (fcn32s_vgg16, Halo((224, 224), (224, 224))),
        (fcn16s_vgg16, Halo((224, 224), (224, 224))),
        (fcn8s_vgg16, Halo((224, 224), (224, 224))),  # as currently computed
        (fcn_alexnet, Halo((224, 224), (192, 192))),
    ],
    ids=lambda v: getattr(v, "__name__", "halo"),
)
def test_full_fcns_at_input_resolution(factory, halo: Halo) -> None:
    with torch.device("meta"):
        model = factory().eval()
    field = receptive_field(model)
    assert field.stride == (1, 1)
    assert field.align == (32, 32)
    assert len(field.phase_reach[0]) == len(field.phase_reach[1]) == 32
    assert field.halo() == halo
    assert field.size[0] > 404  # the upsampling adds to the coarse net's field


def test_geometry_is_width_independent() -> None:
    with torch.device("meta"):
        full = receptive_field(fcn8s_vgg16().eval())
    tiny = receptive_field(ZOO["fcn8s_tiny"]())
    assert full == tiny


# --- Networks the analysis must refuse ---------------------------------------------------------

REJECTED_NAMES = {
    "global_avg_pool": "AdaptiveAvgPool2d",
    "spatial_attention": "flatten",  # the first op that mixes positions: .flatten(2)
    "data_dependent_branch": "DataDependentBranch",
    "flatten_linear": "view",
    "interpolate_fixed_size": "interpolate",
    "bilinear_align_corners": "align_corners",
    "group_norm": "GroupNorm",
    "instance_norm": "InstanceNorm2d",
}


def test_rejected_names_cover_the_zoo() -> None:
    assert set(REJECTED_NAMES) == set(REJECTED)


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_rejected(name: str) -> None:
    with pytest.raises(ModelAnalysisError, match=REJECTED_NAMES[name]):
        receptive_field(REJECTED[name]())


class _ShapeCrop(nn.Module):
    """A padded conv cropped by one pixel each side, with sizes taken from ``x.shape``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        return h[:, :, 1 : 1 + x.shape[2], 1 : 1 + x.shape[3]]


class _FunctionalAvgPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv(x), 2)


def test_x_shape_and_functional_avg_pool_are_analysed() -> None:
    """``x.shape`` (a getattr call) and ``F.avg_pool2d`` are ordinary in forward methods.

    Regression: ``_Analyzer.function`` once named ``torch.avg_pool2d``, which torch does
    not have, so every call_function that got that far raised AttributeError.
    """
    assert receptive_field(_ShapeCrop()).size == (3, 3)
    field = receptive_field(_FunctionalAvgPool())
    assert (field.size, field.stride, field.offset) == ((4, 4), (2, 2), (-1, -1))


# --- convolutionalize -------------------------------------------------------------------------


def _worked_example() -> nn.Sequential:
    """The README's classifier: trained on 25x25 patches, 10 classes."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2),  # 25 -> 12
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2),  # 12 -> 5
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 10),
    ).double().eval()


def test_convolutionalize_worked_example() -> None:
    classifier = _worked_example()
    fcn = convolutionalize(classifier, 25)
    field = receptive_field(fcn)
    assert field.size == (23, 23) and field.stride == (4, 4) and field.offset == (0, 0)
    assert output_shape(fcn, (3, 50, 50), torch.float64) == (10, 7, 7)

    torch.manual_seed(1)
    patch = torch.rand(2, 3, 25, 25, dtype=torch.float64)
    with torch.no_grad():
        assert fcn(patch).shape == (2, 10, 1, 1)
        assert torch.allclose(fcn(patch)[:, :, 0, 0], classifier(patch))
        image = torch.rand(1, 3, 50, 50, dtype=torch.float64)
        dense = fcn(image)[0]
        crops = torch.cat([image[:, :, 4 * i : 4 * i + 25, 4 * j : 4 * j + 25]
                           for i in range(7) for j in range(7)])
        expected = classifier(crops).T.reshape(10, 7, 7)
    assert torch.allclose(dense, expected)
    # The original is untouched.
    assert isinstance(classifier[3], nn.Flatten) and isinstance(classifier[4], nn.Linear)


def _two_linear(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Flatten(),
        nn.Linear(100, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 5),
    )
    bn = model[5]
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    return model.to(dtype).eval()


def _check_dense(classifier: nn.Module, fcn: nn.Module, dtype: torch.dtype, atol: float) -> None:
    torch.manual_seed(3)
    image = torch.rand(1, 3, 33, 37, dtype=dtype)
    with torch.no_grad():
        dense = fcn(image)[0]
        stride = receptive_field(fcn).stride
        for i in range(dense.shape[1]):
            for j in range(dense.shape[2]):
                r, c = stride[0] * i, stride[1] * j
                crop = image[:, :, r : r + 25, c : c + 25]
                assert torch.allclose(dense[:, i, j], classifier(crop)[0], atol=atol)


def test_convolutionalize_two_linear_layers() -> None:
    classifier = _two_linear(torch.float32)
    fcn = convolutionalize(classifier, 25)
    assert not fcn.training
    assert receptive_field(fcn).stride == (4, 4)
    _check_dense(classifier, fcn, torch.float32, atol=1e-5)


def test_convolutionalize_batchnorm1d_keeps_float64() -> None:
    """Regression: ``_batchnorm1d_to_2d`` once built its BatchNorm2d in the default dtype,
    so a float64 classifier failed with "mixed dtype" when called."""
    classifier = _two_linear(torch.float64)
    fcn = convolutionalize(classifier, 25)
    assert {p.dtype for p in fcn.parameters()} == {torch.float64}
    _check_dense(classifier, fcn, torch.float64, atol=1e-12)


class _TorchFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.pool = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(4 * 6 * 6, 7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(torch.relu(self.conv(x)))
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


def test_convolutionalize_module_with_torch_flatten() -> None:
    torch.manual_seed(4)
    classifier = _TorchFlatten().double().eval()
    fcn = convolutionalize(classifier, 25)
    field = receptive_field(fcn)
    assert (field.size, field.stride, field.offset) == ((25, 25), (4, 4), (0, 0))
    _check_dense(classifier, fcn, torch.float64, atol=1e-12)


def test_convolutionalize_needs_a_flatten() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ModelAnalysisError, match="flatten"):
        convolutionalize(model, 25)


def test_convolutionalize_refuses_non_elementwise_after_flatten() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2), nn.Flatten(), nn.Linear(576, 8), nn.LayerNorm(8),
        nn.Linear(8, 2),
    ).eval()
    with pytest.raises(ModelAnalysisError, match="LayerNorm"):
        convolutionalize(model, 25)


def test_convolutionalize_linear_in_features_mismatch() -> None:
    """Regression: ``_feature_shape`` once ran the whole classifier, Linear included, so
    the shape error came out of torch as a RuntimeError before the in_features check."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Flatten(), nn.Linear(577, 8)).eval()
    with pytest.raises(ModelAnalysisError, match="577"):
        convolutionalize(model, 25)


def test_padding_computed_from_the_input_size_is_refused_with_the_reason() -> None:
    """TensorFlow-style "same" padding (amounts from ``x.shape``) is a ModelAnalysisError
    naming the operation, not a TypeError from deep in the analysis.

    Teeth: the isinstance check in _pad_steps() removed: int() of an fx Node raises
    TypeError."""
    from tests.onnx_zoo import ONNX_ZOO

    with pytest.raises(ModelAnalysisError, match="computed from the input's size"):
        receptive_field(ONNX_ZOO["keras_same"].build())
