"""Exact tiled prediction in memory: numpy in, numpy out.

A model is run window by window over an image with the tile geometry of
:mod:`pipeline.grid`; each window's output is cropped to its core tile. With
the halo derived from the model's receptive field the result equals running
the model on the whole image at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from pipeline.analysis import receptive_field
from pipeline.errors import GeometryError, ModelAnalysisError
from pipeline.grid import Box, TileGrid
from pipeline.networks import Network, TorchNetwork
from pipeline.prediction import CROP, Predictor
from pipeline.receptive import Halo, ReceptiveField


@dataclass(frozen=True)
class ModelGeometry:
    """What tiling needs to know of a model for one scene shape."""

    field: ReceptiveField
    output_shape: tuple[int, int]
    classes: int
    analysed: bool


def output_shape(model: nn.Module, input_shape: tuple[int, int, int],
                 dtype: torch.dtype = torch.float32) -> tuple[int, ...]:
    """Shape ``model`` gives for one ``(C, H, W)`` input, computed on the meta device.

    No pixel is computed and no weight is copied, so this is cheap for any
    scene size.
    """
    state = {k: v.to("meta") for k, v in model.state_dict(keep_vars=True).items()}
    x = torch.empty((1, *input_shape), dtype=dtype, device="meta")
    try:
        with torch.no_grad():
            y = functional_call(model, state, (x,), strict=False)
    except Exception as exc:  # user models fail in many ways on meta tensors
        raise ModelAnalysisError(
            f"cannot compute the output shape of {type(model).__name__} for an input of "
            f"{tuple(input_shape)} without running it on data (data-dependent values or "
            f"shapes?): {exc}"
        ) from exc
    if not isinstance(y, torch.Tensor):
        raise ModelAnalysisError(f"{type(model).__name__} does not return a single tensor")
    return tuple(y.shape[1:])


def model_geometry(model: nn.Module, input_shape: tuple[int, int, int],
                   dtype: torch.dtype = torch.float32, *, require_field: bool = True,
                   ) -> ModelGeometry:
    """Receptive field and whole-scene output shape of ``model`` for an input shape.

    With ``require_field=False`` a model the analysis rejects gets a
    pixel-wise field (size 1, offset 0) at the stride its output shape implies;
    the caller must then supply the halo.
    """
    out = output_shape(model, input_shape, dtype)
    if len(out) != 3:
        raise ModelAnalysisError(
            f"{type(model).__name__} returns shape {out} per image; expected (classes, H, W)"
        )
    try:
        field = receptive_field(model)
        analysed = True
    except ModelAnalysisError as exc:
        if require_field:
            raise
        strides = []
        for n_in, n_out in zip(input_shape[1:], out[1:]):
            if n_in % n_out:
                raise GeometryError(
                    f"output {out[1:]} is not the input {input_shape[1:]} divided by an integer "
                    "stride; cannot tile a model the analysis rejects"
                ) from exc
            strides.append(n_in // n_out)
        s = (strides[0], strides[1])
        field = ReceptiveField.pointwise(s)
        analysed = False
    return ModelGeometry(field, (out[1], out[2]), out[0], analysed)


def plan_tiles(model: nn.Module, input_shape: tuple[int, int, int],
               tile_size: int | tuple[int, int],
               halo: Halo | int | tuple[int, int] | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[TileGrid, ModelGeometry]:
    """The tile grid for running ``model`` over an input of ``(C, H, W)``."""
    geometry = model_geometry(model, input_shape, dtype, require_field=halo is None)
    grid = TileGrid.build(input_shape[1:], geometry.output_shape, geometry.field, tile_size, halo)
    return grid, geometry


def predict_tiled(
    model: nn.Module | Network,
    image: np.ndarray | torch.Tensor,
    *,
    tile_size: int | tuple[int, int],
    halo: Halo | int | tuple[int, int] | None = None,
    valid: np.ndarray | None = None,
    fill: float | Sequence[float] = 0.0,
    field: ReceptiveField | None = None,
    stitch: str = CROP,
    congruent: bool = False,
) -> np.ndarray:
    """What ``model(filled[None])[0]`` returns, computed tile by tile through the
    prediction core (:class:`pipeline.prediction.Predictor`) that runs also inside the
    Dask tasks.

    ``image`` is ``(C, H, W)`` in any float dtype; a torch module is given it in
    that dtype (float64 stays float64). ``halo=None`` derives the halo from the
    model's receptive field, which makes the result equal to whole-image
    inference; an explicit halo (input pixels, an int, a ``(rows, cols)``
    pair or a :class:`Halo`) overrides it and is required for a model the
    analysis rejects. A :class:`~pipeline.networks.Network` of any back end runs
    with ``field`` (its derived or declared geometry, output at the input's
    resolution) or an explicit ``halo`` (then stride 1).

    ``filled`` is a copy of ``image`` in which every channel of a pixel that
    is invalid (``valid`` False) or non-finite in any channel is set to
    ``fill`` (one value, or one per channel), so no NaN, infinity or nodata
    value reaches the network and what such a pixel held changes no other
    output. A finite image without ``valid`` is used as it is: the result is
    then ``model(image[None])[0]``, as before these arguments existed. A network
    with a fixed input size gets windows of exactly that size, padded with ``fill``.

    Args:
        model: A fully convolutional network giving ``(N, K, H', W')``.
        image: ``(C, H, W)`` floating-point array or tensor.
        tile_size: Core tile size in output pixels, one int or ``(rows, cols)``.
        halo: ``None`` (derived) or an explicit halo in input pixels.
        valid: ``(H, W)`` bool, True where the pixel is a measurement.
        fill: The value invalid pixels get, one float or ``C`` floats.
        field: The geometry of a :class:`Network` (ignored for a torch module).
        stitch: ``crop`` (exact with the derived halo) or ``blend`` (weighted overlap).
        congruent: The network's padding depends on its input's length (as probed):
            windows are kept congruent to the image's (:meth:`TileGrid.congruent`).

    Returns:
        ``(K, H', W')`` array of the model's output dtype.

    Raises:
        GeometryError: ``image`` is not ``(C, H, W)`` floats, ``valid`` is not
            ``(H, W)``, ``fill`` has not 1 or ``C`` values, or the tiles
            cannot be built.
        ModelAnalysisError: The receptive field cannot be derived and no
            ``halo`` is given.
        ModelError: the network gives labels, not scores.
    """
    tensor = torch.as_tensor(image)
    if tensor.dim() != 3:
        raise GeometryError(f"image must be (C, H, W), got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise GeometryError(f"image must be a float array, got {tensor.dtype}")
    tensor = _filled(tensor, valid, fill)
    shape = (int(tensor.shape[0]), int(tensor.shape[1]), int(tensor.shape[2]))
    if isinstance(model, nn.Module):
        network: Network = TorchNetwork(model)
        grid, geometry = plan_tiles(model, shape, tile_size, halo, tensor.dtype)
        classes = geometry.classes
    else:
        network = model
        grid = _network_grid(network, shape, tile_size, halo, field)
        if congruent:
            grid = grid.congruent()
        classes = network.signature.classes or 0
    array = tensor.cpu().numpy()
    fills = np.broadcast_to(np.asarray(fill, dtype=array.dtype).reshape(-1), (shape[0],))
    predictor = Predictor(network, grid, classes=max(classes, 1), nodata=0,
                          label_dtype=np.int32, fill=np.ascontiguousarray(fills),
                          stitch=stitch, scores=True, skip_invalid=False)

    def read(window: Box) -> tuple[np.ndarray, None]:
        rows, cols = window.slices()
        return array[:, rows, cols], None

    result: np.ndarray | None = None
    for tile in predictor.predict(list(grid), read):
        assert tile.scores is not None
        if result is None:
            result = np.empty((tile.scores.shape[0], *grid.output_shape), tile.scores.dtype)
        rows, cols = tile.tile.core.slices()
        result[:, rows, cols] = tile.scores
    assert result is not None
    return result


def _network_grid(network: Network, shape: tuple[int, int, int],
                  tile_size: int | tuple[int, int], halo: Halo | int | tuple[int, int] | None,
                  field: ReceptiveField | None) -> TileGrid:
    """The tiles of a :class:`Network` over an input of ``(C, H, W)`` (output at the
    input's resolution, or at ``field``'s stride)."""
    if field is None:
        if halo is None:
            raise ModelAnalysisError("a network without a receptive field needs a halo")
        field = ReceptiveField.pointwise()
    output = (shape[1] // field.stride[0], shape[2] // field.stride[1])
    return TileGrid.build(shape[1:], output, field, tile_size, halo,
                          window=network.signature.window)


def _filled(image: torch.Tensor, valid: np.ndarray | None,
            fill: float | Sequence[float]) -> torch.Tensor:
    """``image`` ``(C, H, W)``, or a copy with invalid and non-finite pixels set to ``fill``."""
    bad = ~torch.isfinite(image).all(dim=0)
    if valid is not None:
        mask = torch.as_tensor(np.asarray(valid, dtype=bool), device=image.device)
        if tuple(mask.shape) != tuple(image.shape[1:]):
            raise GeometryError(
                f"valid must be (H, W) = {tuple(image.shape[1:])}, got shape {tuple(mask.shape)}"
            )
        bad |= ~mask
    values = torch.as_tensor(fill, dtype=image.dtype, device=image.device).reshape(-1)
    if values.numel() not in (1, image.shape[0]):
        raise GeometryError(
            f"fill must be one value or {image.shape[0]} (one per channel), got {values.numel()}"
        )
    if not bool(bad.any()):
        return image
    return torch.where(bad[None], values[:, None, None], image)


def activation_bytes(model: nn.Module, input_shape: tuple[int, int, int], batch: int = 1,
                     dtype: torch.dtype = torch.float32) -> int:
    """A rough peak of activation memory for one forward pass, from meta shapes.

    The largest input-plus-output of any layer, times the batch: layers run
    one after another and free what they no longer need under
    ``torch.inference_mode``. No pixel is computed.
    """
    peak = 0

    def hook(module: nn.Module, inputs: tuple, output: object) -> None:
        nonlocal peak
        size = sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))
        if isinstance(output, torch.Tensor):
            size += output.numel() * output.element_size()
        peak = max(peak, size)

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        state = {k: v.to("meta") for k, v in model.state_dict(keep_vars=True).items()}
        x = torch.empty((batch, *input_shape), dtype=dtype, device="meta")
        with torch.no_grad():
            functional_call(model, state, (x,), strict=False)
    finally:
        for handle in handles:
            handle.remove()
    return peak


def window_speeds(network: Network, channels: int, windows: list[tuple[int, int]],
                  threads: int, *, time_limit: float = 2.0) -> dict[tuple[int, int], float]:
    """Forward speed (input pixels per second) of ``network`` on windows of each shape,
    smallest first, with ``threads`` torch threads: the best of two passes after a
    warm-up. Stops once ``time_limit`` seconds are spent or a pass takes a quarter of
    it; shapes not reached are left out.
    """
    speeds: dict[tuple[int, int], float] = {}
    cuda = network.device.startswith("cuda")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    generator = np.random.default_rng(0)
    try:
        for shape in sorted(set(windows), key=lambda s: s[0] * s[1]):
            x = generator.random((1, channels, *shape), dtype=np.float32)
            network.forward(x)  # warm-up, not timed
            best = math.inf
            for _ in range(2):
                if cuda:
                    torch.cuda.synchronize(network.device)
                t0 = time.perf_counter()
                network.forward(x)
                if cuda:
                    torch.cuda.synchronize(network.device)
                best = min(best, time.perf_counter() - t0)
            speeds[shape] = shape[0] * shape[1] / best
            spent = time.perf_counter() - start
            if spent > time_limit or best > time_limit / 4:
                break
    finally:
        torch.set_num_threads(old)
    return speeds


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
