"""The test that protects the project: tiled output equals whole-image output.

For every network and several (scene, tile) cases, in float64,
``predict_tiled(model, image, tile_size=T)`` must equal ``model(image[None])[0]``
to 1e-9, and with the derived halo one ``align`` step short on every side it
must not (the teeth: a halo that is too small is caught, by a difference or by
a GeometryError when a window is too short to give its core).

Random weights often make the far edge of a deep network's receptive field
numerically negligible (FCN-8s: differences of 0 or 1e-16), so the teeth use
"edge-heavy" weights (:func:`edge_heavy`), which put most of every kernel on
its corner taps. Exactness is checked with both.

``python -m tests.test_exactness`` prints the table of figures.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline.analysis import receptive_field
from pipeline.errors import GeometryError, ModelAnalysisError
from pipeline.fully_convolutional import convolutionalize
from pipeline.grid import TileGrid
from pipeline.inference import output_shape, predict_tiled
from pipeline.receptive import Halo
from tests.zoo import REJECTED, REJECTED_INPUT_SIZE, SIZE_RULES, ZOO

EXACT = 1e-9


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def classifier_fcn() -> nn.Module:
    """The README's worked example convolutionalized: a coarse output at stride 4."""
    torch.manual_seed(20)
    classifier = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.MaxPool2d(3, stride=2), nn.Flatten(),
        nn.Linear(4 * 5 * 5, 10),
    ).eval()
    return convolutionalize(classifier, 25)


NETWORKS: dict[str, Callable[[], nn.Module]] = {**ZOO, "convolutionalized": classifier_fcn}


def edge_heavy(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with every Conv2d kernel mostly on its four corner taps.

    Small positive noise plus 1.0 on each corner, normalised per output channel to sum 1;
    biases 0.01. Transposed convolutions (the FCNs' frozen bilinear upsamplers) are left
    alone. The outermost pixels of the receptive field then carry real weight.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if type(module) is not nn.Conv2d:
                continue
            weight = torch.rand(module.weight.shape, generator=generator, dtype=torch.float64)
            weight *= 0.01
            for r in (0, -1):
                for c in (0, -1):
                    weight[..., r, c] += 1.0
            weight /= weight.sum(dim=(1, 2, 3), keepdim=True)
            module.weight.copy_(weight)
            if module.bias is not None:
                module.bias.fill_(0.01)
    return model


@dataclass(frozen=True)
class Case:
    """A scene shape and tile size for one network.

    ``teeth``: the short halo must change some window (and then must fail). Cases without
    it are still checked whenever the short halo changes a window, unless ``short`` is
    False. ``random``: also check exactness with the factory's random weights.
    """

    scene: tuple[int, int]
    tile: int
    teeth: bool = True
    random: bool = True
    short: bool = True
    slow: bool = False

    def __str__(self) -> str:
        return f"{self.scene[0]}x{self.scene[1]}/t{self.tile}"


SMALL = [
    Case((97, 131), 16),  # tile smaller than most of the zoo's fields
    Case((200, 243), 50),
    Case((41, 37), 64, teeth=False),  # scene smaller than one tile
]
UNET = [Case((104, 136), 24), Case((168, 96), 56), Case((40, 48), 64, teeth=False)]
FCN = [
    Case((609, 97), 128),  # an interior row tile: cut on both sides (609 > 2 * 224 + 128)
    Case((97, 131), 256, teeth=False),  # scene smaller than one tile
]
FCN8S = [
    Case((289, 61), 32),  # tile far smaller than the 491 px field
    Case((97, 609), 128),  # an interior column tile
    Case((97, 131), 256, teeth=False),
    # Interior tiles on both axes (> 2 * 224 + 128 = 576 each way), edge-heavy weights only;
    # the short halo's teeth are shown on the cheaper cases above (interior along one axis).
    Case((609, 617), 128, teeth=False, random=False, short=False, slow=True),
]
CASES: dict[str, list[Case]] = {
    **{name: SMALL for name in ZOO},
    "unet_tiny": UNET,
    "fcn8s_tiny": FCN8S,
    "fcn32s_tiny": FCN,
    "fcn_alexnet_tiny": FCN,
    "convolutionalized": SMALL,
}


def scene_shape(name: str, case: Case) -> tuple[int, int]:
    rule = SIZE_RULES.get(name)
    return case.scene if rule is None else (rule.near(case.scene[0]), rule.near(case.scene[1]))


def image_for(
    shape: tuple[int, int], seed: int = 1, dtype: torch.dtype = torch.float64
) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((3, *shape), generator=generator, dtype=torch.float64).to(dtype).numpy()


def whole(model: nn.Module, image: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(image)[None])[0].numpy()


def short_halo(model: nn.Module, *, before_only: bool = False) -> Halo:
    """The derived halo, one align step short on every side (or only before each tile)."""
    field = receptive_field(model)
    short = field.halo().shrink(field.align)
    return Halo(short.before, field.halo().after) if before_only else short


def short_outcome(model: nn.Module, image: np.ndarray, tile: int, reference: np.ndarray,
                  *, before_only: bool = False) -> tuple[float, str]:
    """Max |tiled - whole| with the short halo, and how to print it.

    ``inf`` when a window is too short to run: predict_tiled's GeometryError (a window of a
    valid convolution that cannot give its core) or torch's RuntimeError (reflect padding
    wider than the window). Either way the short halo does not pass for exact.
    """
    halo = short_halo(model, before_only=before_only)
    try:
        tiled = predict_tiled(model, image, tile_size=tile, halo=halo)
    except (GeometryError, RuntimeError) as exc:
        return math.inf, type(exc).__name__
    diff = float(np.abs(tiled - reference).max())
    return diff, f"{diff:.1e}"


def short_cuts(model: nn.Module, image: np.ndarray, output: tuple[int, ...], tile: int,
               *, before_only: bool = False) -> bool:
    """Whether the short halo changes any window (else it cannot change the result)."""
    field = receptive_field(model)
    halo = short_halo(model, before_only=before_only)
    short = TileGrid.build(image.shape[1:], output[1:], field, tile, halo=halo)
    derived = TileGrid.build(image.shape[1:], output[1:], field, tile)
    return [t.window for t in short] != [t.window for t in derived]


def teeth(model: nn.Module, image: np.ndarray, tile: int, reference: np.ndarray) -> list[float]:
    """Max |tiled - whole| one step short on every side and, where that cannot even run,
    one step short before each tile only (the numeric difference a window start makes)."""
    diff, _ = short_outcome(model, image, tile, reference)
    found = [diff]
    if math.isinf(diff) and short_cuts(model, image, reference.shape, tile, before_only=True):
        found.append(short_outcome(model, image, tile, reference, before_only=True)[0])
    return found


def _params() -> list:
    params = []
    for name, cases in CASES.items():
        for case in cases:
            marks = [pytest.mark.slow] if case.slow else []
            params.append(pytest.param(name, case, marks=marks, id=f"{name}-{case}"))
    return params


PARAMS = _params()


@pytest.mark.parametrize(("name", "case"), [p for p in PARAMS if p.values[1].random])
def test_tiled_equals_whole(name: str, case: Case) -> None:
    model = NETWORKS[name]().double()
    image = image_for(scene_shape(name, case))
    reference = whole(model, image)
    tiled = predict_tiled(model, image, tile_size=case.tile)
    assert tiled.dtype == np.float64
    assert tiled.shape == reference.shape
    assert np.abs(tiled - reference).max() <= EXACT


@pytest.mark.parametrize(("name", "case"), PARAMS)
def test_tiled_equals_whole_edge_heavy_and_short_halo_fails(name: str, case: Case) -> None:
    model = edge_heavy(NETWORKS[name]().double())
    image = image_for(scene_shape(name, case))
    reference = whole(model, image)
    tiled = predict_tiled(model, image, tile_size=case.tile)
    assert tiled.shape == reference.shape
    assert np.abs(tiled - reference).max() <= EXACT
    halo = receptive_field(model).halo()
    assert max(*halo.before, *halo.after) > 0
    cut = short_cuts(model, image, reference.shape, case.tile)
    assert cut or not case.teeth  # a teeth case must give the short halo something to miss
    if cut and case.short:
        assert all(diff > EXACT for diff in teeth(model, image, case.tile, reference))


@pytest.mark.parametrize("explicit", [False, True], ids=["derived", "explicit"])
@pytest.mark.parametrize(
    "name", ["transposed_conv", "upsampling", "pooling_ceil_padding", "unet_tiny", "fcn8s_tiny"]
)
def test_tiles_off_the_align_grid_are_exact(name: str, explicit: bool) -> None:
    """Tiles whose cores start at every phase: the per-phase reach (``halo=None``), and
    ``halo=field.halo()`` passed explicitly (one value for every phase)."""
    model = edge_heavy(NETWORKS[name]().double())
    rule = SIZE_RULES[name]
    shape = (289, 61) if name == "fcn8s_tiny" else (rule.near(97), rule.near(131))
    tile = 37 if name == "fcn8s_tiny" else 21
    image = image_for(shape)
    halo = receptive_field(model).halo() if explicit else None
    tiled = predict_tiled(model, image, tile_size=tile, halo=halo)
    assert np.abs(tiled - whole(model, image)).max() <= EXACT


@pytest.mark.parametrize(
    ("name", "case"),
    [
        ("conv_padding_stride", Case((97, 131), 16)),
        ("pooling_ceil_padding", Case((97, 131), 16)),
        ("unet_tiny", Case((104, 136), 24)),
        ("fcn8s_tiny", Case((289, 61), 64)),
        ("convolutionalized", Case((97, 131), 16)),
    ],
    ids=str,
)
def test_float32_stays_float32(name: str, case: Case) -> None:
    model = NETWORKS[name]().float()
    image = image_for(scene_shape(name, case), dtype=torch.float32)
    reference = whole(model, image)
    tiled = predict_tiled(model, image, tile_size=case.tile)
    assert tiled.dtype == np.float32
    scale = max(1.0, float(np.abs(reference).max()))
    assert np.abs(tiled - reference).max() <= 1e-5 * scale


def test_tiled_accepts_a_tensor() -> None:
    model = ZOO["crop_skip"]().double()
    image = torch.from_numpy(image_for((40, 50)))
    tiled = predict_tiled(model, image, tile_size=7)
    assert np.abs(tiled - whole(model, image.numpy())).max() <= EXACT


@pytest.mark.parametrize(
    "name", ["global_avg_pool", "group_norm", "instance_norm", "spatial_attention"]
)
def test_rejected_model_needs_a_halo(name: str) -> None:
    """Refused without a halo, run with one. (spatial_attention uses ``x.shape``: the
    analysis must refuse it with ModelAnalysisError, which model_geometry catches, not
    crash with AttributeError as it did before f976a9c.)"""
    model = REJECTED[name]().double()
    image = image_for((37, 45))
    with pytest.raises(ModelAnalysisError):
        predict_tiled(model, image, tile_size=16)
    tiled = predict_tiled(model, image, tile_size=16, halo=4)  # runs; need not equal whole
    assert tiled.shape == whole(model, image).shape


def test_data_dependent_model_is_refused_as_such() -> None:
    """Control flow on values: the analysis cannot trace it, and predict_tiled must say so
    with a ModelAnalysisError. Regression: output_shape runs the model on the meta device
    first, where ``if x.sum() > 0`` once escaped as a bare RuntimeError, halo or not."""
    model = REJECTED["data_dependent_branch"]().double()
    image = image_for((REJECTED_INPUT_SIZE, REJECTED_INPUT_SIZE))
    with pytest.raises(ModelAnalysisError, match="DataDependentBranch"):
        predict_tiled(model, image, tile_size=8)
    try:  # with a halo it may run, or refuse with the same error class; nothing else
        tiled = predict_tiled(model, image, tile_size=8, halo=(2, 3))
    except ModelAnalysisError:
        return
    assert tiled.shape == whole(model, image).shape


@st.composite
def scenes_and_tiles(draw: st.DrawFn) -> tuple[str, tuple[int, int], int]:
    """A small net, a scene of 20..200 a side and a tile of 1..100 px, at most ~400 tiles."""
    name = draw(st.sampled_from(["crop_skip", "conv_padding_stride"]))
    tile = draw(st.integers(1, 100))
    biggest = min(200, 20 * tile)
    return name, (draw(st.integers(20, biggest)), draw(st.integers(20, biggest))), tile


@settings(max_examples=25, deadline=None)
@given(scenes_and_tiles())
def test_tiled_equals_whole_for_any_scene_and_tile(
    example: tuple[str, tuple[int, int], int],
) -> None:
    name, shape, tile = example
    model = edge_heavy(ZOO[name]().double())
    image = image_for(shape)
    reference = whole(model, image)
    assert output_shape(model, image.shape, torch.float64) == reference.shape
    assert np.abs(predict_tiled(model, image, tile_size=tile) - reference).max() <= EXACT


# --- The table of figures -----------------------------------------------------------------------


def main() -> None:
    """Print network, scene, tile, derived halo, max |tiled - whole| (random and edge-heavy
    weights) and max |tiled - whole| one align step short (edge-heavy), per case."""
    torch.set_num_threads(1)
    header = ("network", "scene", "tile", "halo before/after", "random", "edge-heavy",
              "one step short", "s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, cases in CASES.items():
        for case in cases:
            start = time.perf_counter()
            shape = scene_shape(name, case)
            image = image_for(shape)
            random = "-"
            if case.random:
                model = NETWORKS[name]().double()
                tiled = predict_tiled(model, image, tile_size=case.tile)
                random = f"{np.abs(tiled - whole(model, image)).max():.1e}"
            model = edge_heavy(NETWORKS[name]().double())
            reference = whole(model, image)
            edge = float(np.abs(predict_tiled(model, image, tile_size=case.tile) - reference).max())
            short = "no window cut"  # the short halo gives the same windows
            if short_cuts(model, image, reference.shape, case.tile):  # even where tests skip it
                short = short_outcome(model, image, case.tile, reference)[1]
                if short_cuts(model, image, reference.shape, case.tile, before_only=True):
                    before = short_outcome(model, image, case.tile, reference, before_only=True)
                    short += f" (before only: {before[1]})"
            halo = receptive_field(model).halo()
            halo_text = f"{halo.before}/{halo.after}"
            row = (name, f"{shape[0]}x{shape[1]}", str(case.tile), halo_text, random,
                   f"{edge:.1e}", short, f"{time.perf_counter() - start:.1f}")
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
