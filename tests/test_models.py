"""Built-in architectures and the test zoo: shapes, tracing, initialisation."""

from __future__ import annotations

import operator
from collections.abc import Callable

import pytest
import torch
from torch import fx, nn

from pipeline.errors import ModelError
from pipeline.models import (
    ARCHITECTURES,
    bilinear_kernel,
    build,
    fcn8s_vgg16,
    fcn_alexnet,
    unet_small,
)
from tests.zoo import REJECTED, REJECTED_INPUT_SIZE, SIZE_RULES, ZOO

TINY = {
    "fcn32s-vgg16": dict(num_classes=3, channels=(2, 3, 4, 4, 4), fc_channels=6),
    "fcn16s-vgg16": dict(num_classes=3, channels=(2, 3, 4, 4, 4), fc_channels=6),
    "fcn8s-vgg16": dict(num_classes=3, channels=(2, 3, 4, 4, 4), fc_channels=6),
    "fcn-alexnet": dict(num_classes=3, channels=(4, 4, 4, 4, 4), fc_channels=6),
    "unet-small": dict(in_channels=3, num_classes=3, base=2, depth=3),
}
FCNS = ["fcn32s-vgg16", "fcn16s-vgg16", "fcn8s-vgg16", "fcn-alexnet"]
CROP_STARTS = {
    "fcn32s-vgg16": {19},
    "fcn16s-vgg16": {5, 27},
    "fcn8s-vgg16": {5, 9, 31},
    "fcn-alexnet": {18},
}


def _tiny(name: str) -> nn.Module:
    """Architecture ``name`` with tiny widths, seeded, in eval mode."""
    torch.manual_seed(0)
    return build(name, **TINY[name]).eval()


def _slice_starts(graph: fx.Graph) -> set[int]:
    """Starts of every slice used in a ``getitem`` of ``graph``."""
    starts = set()
    for node in graph.nodes:
        if node.op == "call_function" and node.target is operator.getitem:
            index = node.args[1]
            for item in index if isinstance(index, tuple) else (index,):
                if isinstance(item, slice) and item.start is not None:
                    starts.add(item.start)
    return starts


def test_registry_names() -> None:
    assert set(FCNS) | {"unet-small"} <= set(ARCHITECTURES)


def test_build_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ModelError) as info:
        build("nope")
    message = str(info.value)
    assert "'nope'" in message
    assert all(name in message for name in ARCHITECTURES)


@pytest.mark.parametrize("name", FCNS)
@pytest.mark.parametrize("shape", [(37, 50), (64, 64), (97, 131), (1, 3)])
def test_fcn_output_matches_input_size_and_traces(name: str, shape: tuple[int, int]) -> None:
    model = _tiny(name)
    traced = fx.symbolic_trace(model)
    x = torch.randn(1, 3, *shape)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (1, 3, *shape)
        torch.testing.assert_close(traced(x), out, rtol=0, atol=0)
    assert out.std() > 0


@pytest.mark.parametrize("name", FCNS)
def test_fcn_crops_are_literal_reference_offsets(name: str) -> None:
    assert _slice_starts(fx.symbolic_trace(_tiny(name)).graph) == CROP_STARTS[name]


@pytest.mark.parametrize("shape", [(8, 8), (40, 56), (64, 24)])
def test_unet_output_shape_and_traces(shape: tuple[int, int]) -> None:
    model = _tiny("unet-small")
    traced = fx.symbolic_trace(model)
    x = torch.randn(2, 3, *shape)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 3, *shape)
        torch.testing.assert_close(traced(x), out, rtol=0, atol=0)


def test_unet_rejects_bad_arguments() -> None:
    with pytest.raises(ModelError, match="depth"):
        unet_small(depth=0)


def test_bilinear_kernel_matches_reference_filters() -> None:
    even = torch.tensor([0.25, 0.75, 0.75, 0.25])
    odd = torch.tensor([0.5, 1.0, 0.5])
    torch.testing.assert_close(bilinear_kernel(2, 4)[1, 1], even[:, None] * even[None, :])
    torch.testing.assert_close(bilinear_kernel(1, 3)[0, 0], odd[:, None] * odd[None, :])
    weight = bilinear_kernel(3, 4)
    assert weight.shape == (3, 3, 4, 4)
    assert weight[0, 1].abs().sum() == 0 and weight[2, 0].abs().sum() == 0


@pytest.mark.parametrize("name", FCNS)
def test_fcn_upsamplers_are_bilinear_and_frozen(name: str) -> None:
    ups = [m for m in _tiny(name).modules() if isinstance(m, nn.ConvTranspose2d)]
    assert ups
    for up in ups:
        k, s = up.kernel_size[0], up.stride[0]
        assert up.bias is None and not up.weight.requires_grad
        x = torch.zeros(1, 3, 6, 6)
        x[:, 1] = 1.0
        with torch.no_grad():
            y = up(x)
        interior = y[:, :, k : -k, k : -k]
        torch.testing.assert_close(interior[:, 1], torch.ones_like(interior[:, 1]))
        assert interior[:, 0].abs().sum() == 0 and interior[:, 2].abs().sum() == 0
        assert y.shape[-1] == (6 - 1) * s + k


@pytest.mark.parametrize(("factory", "millions"), [(fcn8s_vgg16, 134), (fcn_alexnet, 57)])
def test_full_width_parameter_counts_match_the_paper(
    factory: Callable[[], nn.Module], millions: int
) -> None:
    with torch.device("meta"):
        model = factory()
    learned = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert round(learned / 1e6) == millions


def _coarse_receptive_field(net: nn.Module) -> tuple[int, int]:
    """Size and stride (rows) of a chain of convs and pools, by the usual recursion."""
    size, stride = 1, 1
    for layer in net.modules():
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
            k = layer.kernel_size if isinstance(layer.kernel_size, int) else layer.kernel_size[0]
            d = layer.dilation if isinstance(layer.dilation, int) else layer.dilation[0]
            s = layer.stride if isinstance(layer.stride, int) else layer.stride[0]
            size += (k - 1) * d * stride
            stride *= s
    return size, stride


@pytest.mark.parametrize(("name", "size"), [(n, 404) for n in FCNS[:3]] + [("fcn-alexnet", 355)])
def test_features_and_head_are_the_coarse_fcn_of_table_1(name: str, size: int) -> None:
    model = _tiny(name)
    coarse = nn.Sequential(model.features, model.head)
    assert _coarse_receptive_field(coarse) == (size, 32)
    with torch.no_grad():
        assert coarse(torch.randn(1, 3, 64, 64)).shape[1] == 3


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_entry_runs_in_float64_and_traces(name: str) -> None:
    model = ZOO[name]().double()
    assert not any(m.training for m in model.modules())
    size = SIZE_RULES[name].near(40)
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
        assert out.ndim == 4 and out.shape[0] == 1 and out.numel() > 0
        assert out.dtype == torch.float64 and torch.isfinite(out).all()
        torch.testing.assert_close(fx.symbolic_trace(model)(x), out, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_size_rules_are_tight(name: str) -> None:
    model, rule = ZOO[name]().double(), SIZE_RULES[name]
    with torch.no_grad():
        assert model(torch.randn(1, 3, rule.minimum, rule.minimum, dtype=torch.float64)).numel() > 0
        smaller = rule.minimum - rule.multiple
        if smaller >= 1:
            try:
                out = model(torch.randn(1, 3, smaller, smaller, dtype=torch.float64))
            except RuntimeError:
                return
            assert out.numel() == 0


def test_zoo_factories_are_deterministic() -> None:
    for name, factory in ZOO.items():
        a, b = factory().state_dict(), factory().state_dict()
        assert all(torch.equal(a[key], b[key]) for key in a), name


def test_size_rules_cover_the_zoo() -> None:
    assert set(SIZE_RULES) == set(ZOO)
    assert SIZE_RULES["unet_tiny"].near(37) == 40


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_rejected_entry_runs_eagerly(name: str) -> None:
    model = REJECTED[name]().double()
    assert not model.training
    x = torch.randn(1, 3, REJECTED_INPUT_SIZE, REJECTED_INPUT_SIZE, dtype=torch.float64)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
