"""The one prediction core: windows in, each tile's labels (and scores) out.

Both :func:`pipeline.inference.predict_tiled` (numpy in memory, which the exactness
tests protect) and the Dask tile tasks (:mod:`pipeline.tasks`, production) go through
:class:`Predictor`, whatever the back end (:mod:`pipeline.networks`), so what the
tests prove is what runs.

For each tile of a :class:`~pipeline.grid.TileGrid` the predictor reads the windows it
needs (through a ``read`` callable: an array slice in memory, a raster window in a
task), runs them through the network in batches of one window shape, and stitches the
tile's core:

- ``crop`` (the default): the tile's own window's output, cropped to the core. With
  the halo derived from the receptive field this equals the whole-scene output.
- ``blend``: every window of the grid that overlaps the core contributes, weighted by
  a ramp that is 1 on its own core and falls linearly across its halo to 0 at an
  inner window edge (no ramp at a scene edge), so a model with global context shows
  no hard seam, and a window's outermost pixels, which see the least context, count
  least. Each window is computed once per call.

A window smaller than the network's fixed input (:attr:`NetworkSignature.window`, at a
scene edge) is padded after its last row and column with ``fill`` (what the network sees
in place of an invalid pixel); the padding is cropped away, never labelled.

Labels: the class of highest score (:func:`class_labels`), or the network's own labels;
a pixel whose input is invalid or whose scores are not all finite gets ``nodata``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import GeometryError, ModelError
from pipeline.grid import Box, Tile, TileGrid
from pipeline.networks import LABELS, Network

CROP = "crop"
BLEND = "blend"
STITCHES = (CROP, BLEND)

#: ``read(window) -> (data, valid)``: the network's input for a window, ``(C, h, w)``
#: floats already normalised and filled, and ``(h, w)`` bool, True where valid (None:
#: every pixel is).
Reader = Callable[[Box], tuple[np.ndarray, "np.ndarray | None"]]


@dataclass(frozen=True)
class TilePrediction:
    """One tile's result.

    ``labels``: ``(rows, cols)`` of ``label_dtype`` (uint8 up to 255 classes, else
    int32), ``nodata`` where not ``labelled``; ``labelled``: ``(rows, cols)`` bool;
    ``scores``: ``(K, rows, cols)`` of the network's output dtype when asked for, else
    None; ``inferred``: False when the core had no valid pixel and nothing ran.
    """

    tile: Tile
    labels: np.ndarray
    labelled: np.ndarray
    scores: np.ndarray | None
    inferred: bool = True


def finite_scores(scores: torch.Tensor) -> torch.Tensor:
    """Where every class score of a pixel is finite: ``(N, C, H, W) -> bool (N, H, W)``.

    A pixel with a NaN or infinite score has no trustworthy class (``argmax``
    would pick the NaN, or the infinity); its label is the nodata label.

    Raises:
        GeometryError: ``scores`` is not 4-D.
    """
    if scores.dim() != 4:
        raise GeometryError(f"scores must be (N, C, H, W), got shape {tuple(scores.shape)}")
    return torch.isfinite(scores).all(dim=1)


def class_labels(scores: torch.Tensor, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """The class of highest score, ``(N, C, H, W) -> (N, H, W)``: ``scores.argmax(1)``.

    The same indices as ``argmax`` (the first class on ties, a NaN wins), from
    ``torch.max(dim=1)``, which on a cropped CPU tensor of scores is some 6 times
    faster than ``argmax`` (measured with torch 2.13: 0.14 s against 0.85 s for
    4 classes on 2112 x 2112 px, one thread), there slower than the network itself.
    """
    if scores.dim() != 4:
        raise GeometryError(f"scores must be (N, C, H, W), got shape {tuple(scores.shape)}")
    return torch.max(scores, dim=1).indices.to(dtype)


def ramp(window: Box, halo_before: tuple[int, int], halo_after: tuple[int, int],
         scene_shape: tuple[int, int]) -> np.ndarray:
    """The blend weight of a window's output pixels, ``(h, w)`` float32 in ``[0, 1]``.

    Per axis, ``min(1, d / halo)`` where ``d`` is the distance in px from the pixel to
    the window's edge on that side (0 for the outermost pixel) and ``halo`` the halo
    there; an edge on the scene's border has no ramp (nothing beyond it to blend with).
    The product of both axes. A tile's own window weighs 1 on its core, which lies a
    halo inside it, so every core pixel has a positive total weight.
    """
    axes = []
    for k, span in enumerate((window.rows, window.cols)):
        n = span.size
        weight = np.ones(n, dtype=np.float32)
        position = np.arange(n, dtype=np.float32)
        before, after = halo_before[k], halo_after[k]
        if span.start > 0 and before > 0:
            weight = np.minimum(weight, position / before)
        if span.stop < scene_shape[k] and after > 0:
            weight = np.minimum(weight, (n - 1 - position) / after)
        axes.append(weight)
    return axes[0][:, None] * axes[1][None, :]


class Predictor:
    """Runs a network over tiles; see the module docstring.

    Args:
        network: The network (any back end).
        grid: The scene's tiles; its output must be at the scene's resolution for
            labels (stride 1 at the output), or scores only are asked for.
        classes: K, the number of classes the spec lists.
        nodata: The label of pixels not labelled.
        label_dtype: numpy dtype of the labels (uint8 up to 255 classes, else int32).
        fill: ``(C,)`` what a padded pixel holds (normalised): the network's fill value.
        batch_size: Windows per forward pass (1 when the network takes one at a time).
        stitch: :data:`CROP` or :data:`BLEND`.
        scores: Return each tile's scores too (a network that gives labels has none).
        skip_invalid: A tile whose core has no valid pixel is not run: all nodata.
        source: The model spec file, to name in errors about the network's output.

    Raises:
        ModelError: scores or blending asked of a network that gives labels.
        GeometryError: an unknown stitch, or blending an output of stride > 1.
    """

    def __init__(self, network: Network, grid: TileGrid, *, classes: int, nodata: int,
                 label_dtype: np.dtype | type = np.uint8, fill: np.ndarray | None = None,
                 batch_size: int = 1, stitch: str = CROP, scores: bool = False,
                 skip_invalid: bool = True, source: str = "") -> None:
        if stitch not in STITCHES:
            raise GeometryError(f"stitch must be one of {', '.join(STITCHES)}, got {stitch!r}")
        if stitch == BLEND and grid.stride != (1, 1):
            raise GeometryError(f"blending needs an output at the scene's resolution; this "
                                f"network's output has stride {grid.stride}")
        signature = network.signature
        if signature.output == LABELS and (scores or stitch == BLEND):
            what = "blending" if stitch == BLEND else "scores (probabilities)"
            raise ModelError(f"the network gives labels, not class scores: {what} cannot be "
                             "computed from it")
        self.network, self.grid = network, grid
        self.classes, self.nodata = classes, nodata
        self.label_dtype = np.dtype(label_dtype)
        self.fill = fill
        self.batch_size = max(1, batch_size if signature.batch is None else signature.batch)
        self.stitch, self.scores, self.skip_invalid = stitch, scores, skip_invalid
        self.source = source

    # ----------------------------------------------------------------- windows

    def windows(self, tiles: Sequence[Tile]) -> list[Box]:
        """The windows ``tiles`` need, each once, in the order they are run: for ``crop``
        each tile's own; for ``blend`` every grid window overlapping one of their cores."""
        if self.stitch == CROP:
            return list(dict.fromkeys(t.window for t in tiles))
        return list(self._owners(tiles))

    def _overlapping(self, tile: Tile) -> list[Tile]:
        """The grid's tiles whose window overlaps ``tile``'s core (itself included)."""
        grid = self.grid
        rows = [i for i, p in enumerate(grid.rows)
                if p.window.start < tile.core.rows.stop and tile.core.rows.start < p.window.stop]
        cols = [j for j, p in enumerate(grid.cols)
                if p.window.start < tile.core.cols.stop and tile.core.cols.start < p.window.stop]
        return [grid.tile(i, j) for i in rows for j in cols]

    # ----------------------------------------------------------------- predict

    def predict(self, tiles: Sequence[Tile], read: Reader) -> Iterator[TilePrediction]:
        """Each of ``tiles``' result, as soon as it is known (``crop``: batch by batch;
        ``blend``: once every window is run).

        ``read`` is called once per window :meth:`windows` lists, in that order.

        Raises:
            GeometryError: a window's output cannot be cropped to its core.
            ModelError: the network gives labels outside the spec's classes.
        """
        if self.stitch == BLEND:
            yield from self._blend(tiles, read)
            return
        groups: dict[tuple[int, ...], list[tuple[Tile, np.ndarray, np.ndarray | None]]] = {}
        for tile in tiles:
            data, valid = read(tile.window)
            if self.skip_invalid and not self._valid(valid, tile).any():
                yield self._empty(tile)
                continue
            group = groups.setdefault(data.shape, [])
            group.append((tile, data, valid))
            if len(group) == self.batch_size:
                yield from self._crop_batch(groups.pop(data.shape))
        for members in groups.values():
            yield from self._crop_batch(members)

    def _valid(self, valid: np.ndarray | None, tile: Tile) -> np.ndarray:
        """The validity of ``tile``'s core cells from its window's ``(h, w)`` validity: an
        output cell is valid when the first input pixel of its stride cell is."""
        if valid is None:
            return np.ones(tile.core.shape, bool)
        s0, s1 = self.grid.stride
        rows, cols = tile.crop.slices()
        return valid[::s0, ::s1][rows, cols]

    def _empty(self, tile: Tile) -> TilePrediction:
        shape = tile.core.shape
        scores = np.full((self.classes, *shape), np.nan, np.float32) if self.scores else None
        return TilePrediction(tile, np.full(shape, self.nodata, self.label_dtype),
                              np.zeros(shape, bool), scores, inferred=False)

    def _crop_batch(self, members: list[tuple[Tile, np.ndarray, np.ndarray | None]]
                    ) -> Iterator[TilePrediction]:
        for start in range(0, len(members), self.batch_size):
            part = members[start:start + self.batch_size]
            out = self._forward([data for _, data, _ in part])
            for k, (tile, _, valid) in enumerate(part):
                crop = self._crop(out[k:k + 1], tile.crop, tile)
                yield self._labelled(tile, crop, self._valid(valid, tile))

    def _forward(self, windows: list[np.ndarray]) -> torch.Tensor:
        """One forward pass over windows of one shape, padded to the network's fixed
        input; the output keeps the padded size (crops lie inside the real window)."""
        batch = np.stack(windows)
        fixed = self.network.signature.window
        if fixed is not None:
            batch = self._pad(batch, fixed)
        return self.network.forward(batch)

    def _pad(self, batch: np.ndarray, fixed: tuple[int, int]) -> np.ndarray:
        rows, cols = batch.shape[2:]
        if (rows, cols) == fixed:
            return batch
        if rows > fixed[0] or cols > fixed[1]:
            raise GeometryError(f"window {rows}x{cols} px is larger than the network's fixed "
                                f"input {fixed[0]}x{fixed[1]} px")
        padded = np.empty((*batch.shape[:2], *fixed), dtype=batch.dtype)
        fill = self.fill if self.fill is not None else np.zeros(batch.shape[1], batch.dtype)
        padded[...] = np.asarray(fill, batch.dtype)[None, :, None, None]
        padded[:, :, :rows, :cols] = batch
        return padded

    def _crop(self, out: torch.Tensor, crop: Box, tile: Tile) -> torch.Tensor:
        rows, cols = crop.slices()
        block = out[..., rows, cols]
        if tuple(block.shape[-2:]) != tile.core.shape:
            raise GeometryError(
                f"window {tile.window} gave output {tuple(out.shape[-2:])}; cropping {crop} "
                f"does not give the core tile {tile.core.shape}"
            )
        return block

    def _labelled(self, tile: Tile, crop: torch.Tensor, valid: np.ndarray) -> TilePrediction:
        """A tile's labels from its ``(1, K, rows, cols)`` scores or ``(1, rows, cols)``
        labels, with nodata where ``valid`` is False or a score is not finite."""
        if self.network.signature.output == LABELS:
            labels = crop[0].cpu().numpy()
            outside = (labels < 0) | (labels >= self.classes)
            if outside.any():
                where = f"{self.source}: " if self.source else ""
                raise ModelError(f"{where}the network gave label {int(labels[outside].flat[0])}"
                                 f", outside the spec's {self.classes} classes (0 to "
                                 f"{self.classes - 1}); list every class the network gives "
                                 "in classes")
            labelled = valid.copy()
            block = labels.astype(self.label_dtype)
            block[~labelled] = self.nodata
            return TilePrediction(tile, block, labelled, None)
        index = torch.uint8 if self.label_dtype == np.uint8 else torch.int32
        block = class_labels(crop, index)[0].cpu().numpy().astype(self.label_dtype, copy=False)
        labelled = valid & finite_scores(crop)[0].cpu().numpy()
        block[~labelled] = self.nodata
        scores = crop[0].cpu().numpy() if self.scores else None
        return TilePrediction(tile, block, labelled, scores)

    # ----------------------------------------------------------------- blend

    def _blend(self, tiles: Sequence[Tile], read: Reader) -> Iterator[TilePrediction]:
        """Weighted overlap: accumulate every window's ramped scores on the cores it
        overlaps, then label each core from the weighted mean."""
        sums: dict[Tile, torch.Tensor] = {}
        weights: dict[Tile, np.ndarray] = {}
        valids: dict[Tile, np.ndarray] = {}
        halo = self.grid.halo
        groups: dict[tuple[int, ...], list[tuple[Tile, np.ndarray, np.ndarray | None]]] = {}
        for window, owner in self._owners(tiles).items():
            data, valid = read(window)
            groups.setdefault(data.shape, []).append((owner, data, valid))
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                part = members[start:start + self.batch_size]
                out = self._forward([data for _, data, _ in part])
                for k, (owner, _, valid) in enumerate(part):
                    scores = out[k, :, :owner.window.rows.size, :owner.window.cols.size]
                    if valid is None:
                        valid = np.ones(owner.window.shape, bool)
                    weight = ramp(owner.window, halo.before, halo.after, self.grid.scene_shape)
                    for tile in tiles:
                        self._accumulate(tile, owner.window, scores, weight, valid,
                                         sums, weights, valids)
        for tile in tiles:
            mean = sums[tile] / torch.as_tensor(weights[tile], device=sums[tile].device)
            yield self._labelled(tile, mean[None], valids[tile])

    def _owners(self, tiles: Sequence[Tile]) -> dict[Box, Tile]:
        """Every grid window overlapping one of ``tiles``' cores, each once, with the tile
        it is the window of."""
        return {o.window: o for t in tiles for o in self._overlapping(t)}

    @staticmethod
    def _accumulate(tile: Tile, window: Box, scores: torch.Tensor, weight: np.ndarray,
                    valid: np.ndarray, sums: dict[Tile, torch.Tensor],
                    weights: dict[Tile, np.ndarray], valids: dict[Tile, np.ndarray]) -> None:
        """Add ``window``'s weighted scores on the part of ``tile``'s core it covers."""
        core = tile.core
        r0, r1 = max(core.rows.start, window.rows.start), min(core.rows.stop, window.rows.stop)
        c0, c1 = max(core.cols.start, window.cols.start), min(core.cols.stop, window.cols.stop)
        if r0 >= r1 or c0 >= c1:
            return
        src = (slice(r0 - window.rows.start, r1 - window.rows.start),
               slice(c0 - window.cols.start, c1 - window.cols.start))
        dst = (slice(r0 - core.rows.start, r1 - core.rows.start),
               slice(c0 - core.cols.start, c1 - core.cols.start))
        if tile not in sums:
            sums[tile] = torch.zeros((scores.shape[0], *core.shape), dtype=torch.float32,
                                     device=scores.device)
            weights[tile] = np.zeros(core.shape, np.float32)
            valids[tile] = np.zeros(core.shape, bool)
        w = weight[src]
        every = slice(None)
        sums[tile][every, dst[0], dst[1]] += scores[every, src[0], src[1]].float() * \
            torch.as_tensor(w, device=scores.device)
        weights[tile][dst] += w
        if window == tile.window:
            valids[tile][dst] = valid[src]
