"""The work of Dask tasks: predict a batch of tiles, publish a finished scene.

A task receives paths, boxes and a model reference (spec path + weights
sha256 + device), never open files or weights. It reads only its windows,
runs the model its worker process loaded once (:func:`cached_model`), crops
each window's output to its core tile and writes that tile's Zarr chunk and its
share of the COG's overview levels.
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.grid import Tile
from pipeline.inference import class_labels
from pipeline.journal import publish_store, record_tile
from pipeline.labels import label_dtype
from pipeline.model import cached_model
from pipeline.modelspec import ModelSpec, normalize
from pipeline.overviews import pyramid
from pipeline.readers import read_window
from pipeline.writers import write_cog, write_labels, write_overviews


@dataclass(frozen=True)
class ModelRef:
    """Which model a task runs, and how: the graph carries this, never weights."""

    spec_path: str
    sha256: str
    device: str
    threads: int = 1
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)


@dataclass(frozen=True)
class SceneTarget:
    """One scene's input and label store, as tile tasks need them."""

    scene: str
    store: str
    tiles_dir: str
    probabilities: bool
    overviews: str | None = None
    overview_levels: int = 0


@dataclass(frozen=True)
class BatchStats:
    """What a tile task did, and where its time went.

    ``read_seconds`` (summed over the reading threads, which overlap the rest),
    ``model_seconds`` (normalising, the forward pass, labels and scores back on the
    host) and ``write_seconds`` (Zarr chunks, overview levels, tile records);
    ``seconds`` is the task's wall time.
    """

    tiles: int
    inferred: int
    pixels: int
    seconds: float
    read_seconds: float = 0.0
    model_seconds: float = 0.0
    write_seconds: float = 0.0


def _valid(spec: ModelSpec, data: np.ndarray, scene_valid: np.ndarray) -> np.ndarray:
    if spec.nodata_input == "scene":
        return scene_valid
    if spec.nodata_input == "none":
        return np.ones(scene_valid.shape, dtype=bool)
    value = float(spec.nodata_input)  # type: ignore[arg-type]
    return ~np.all(data == value, axis=0)


def _prepare_torch(threads: int) -> None:
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _read(spec: ModelSpec, target: SceneTarget,
          tile: Tile) -> tuple[np.ndarray, np.ndarray, float]:
    """A tile's raw window, the validity of its core, and the seconds it took."""
    start = time.perf_counter()
    data, scene_valid = read_window(target.scene, tile.window, spec.bands)
    valid = _valid(spec, data, scene_valid)[tile.crop.slices()]
    return data, valid, time.perf_counter() - start


def predict_tiles(model_ref: ModelRef, target: SceneTarget, tiles: tuple[Tile, ...]) -> BatchStats:
    """Predict ``tiles`` of one scene and write their chunks.

    Windows are read by a small thread pool while the network runs, so reading
    and decoding overlap with compute; windows of equal shape go through the
    network in one batch (pinned memory and non-blocking copies on a GPU).
    Tiles whose core has no valid input pixel are written as nodata without
    inference.
    """
    start = time.perf_counter()
    _prepare_torch(model_ref.threads)
    spec, model = cached_model(model_ref.spec_path, model_ref.sha256, model_ref.device,
                               channels_last=model_ref.channels_last, compile=model_ref.compile)
    inferred = 0
    read_s = model_s = write_s = 0.0
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="read") as pool:
        reads = [pool.submit(_read, spec, target, tile) for tile in tiles]
        groups: dict[tuple[int, int], list[tuple[Tile, np.ndarray, np.ndarray]]] = defaultdict(list)
        for tile, read in zip(tiles, reads):
            data, valid, seconds = read.result()
            read_s += seconds
            if not valid.any():
                t0 = time.perf_counter()
                _write(target, tile, np.full(tile.core.shape, spec.nodata_output), None, spec)
                write_s += time.perf_counter() - t0
                continue
            t0 = time.perf_counter()
            groups[tile.window.shape].append((tile, normalize(data, spec), valid))
            model_s += time.perf_counter() - t0
        for members in groups.values():
            seconds = _infer(model_ref, model, spec, target, members)
            model_s += seconds[0]
            write_s += seconds[1]
            inferred += len(members)
    pixels = sum(t.core.area for t in tiles)
    return BatchStats(len(tiles), inferred, pixels, time.perf_counter() - start,
                      read_s, model_s, write_s)


def _infer(model_ref: ModelRef, model: torch.nn.Module, spec: ModelSpec, target: SceneTarget,
           members: list[tuple[Tile, np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """One forward pass over windows of one shape; crop, mask and write each tile.

    Returns the seconds spent on the model (input copy, forward pass, labels and
    scores on the host) and on writing.
    """
    start = time.perf_counter()
    writing = 0.0
    batch = torch.from_numpy(np.stack([x for _, x, _ in members]))
    cuda = model_ref.device.startswith("cuda")
    if cuda:
        batch = batch.pin_memory()
    batch = batch.to(model_ref.device, non_blocking=cuda)
    if model_ref.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    dtype = model_ref.autocast_dtype
    # uint8 labels where they fit; wider ones go through int32 (_write casts to the store's).
    index_dtype = torch.uint8 if len(spec.classes) <= 255 else torch.int32
    with torch.inference_mode():
        with torch.autocast(batch.device.type, dtype=dtype, enabled=dtype is not None):
            scores = model(batch)
        for k, (tile, _, valid) in enumerate(members):
            rows, cols = tile.crop.slices()
            crop = scores[k:k + 1, :, rows, cols]
            block = class_labels(crop, index_dtype)[0].cpu().numpy()
            block[~valid] = spec.nodata_output
            tile_probs = None
            if target.probabilities:
                probs = torch.softmax(crop.float(), dim=1)[0].to(torch.float16)
                tile_probs = probs.cpu().numpy()
                tile_probs[:, ~valid] = np.nan
            t0 = time.perf_counter()
            _write(target, tile, block, tile_probs, spec)
            writing += time.perf_counter() - t0
    return time.perf_counter() - start - writing, writing


def _write(target: SceneTarget, tile: Tile, labels: np.ndarray, probs: np.ndarray | None,
           spec: ModelSpec) -> None:
    if target.probabilities and probs is None:
        probs = np.full((len(spec.classes), *tile.core.shape), np.nan, dtype=np.float16)
    labels = labels.astype(label_dtype(len(spec.classes)), copy=False)
    write_labels(target.store, tile.core, labels, probs)
    if target.overviews is not None and (labels != spec.nodata_output).any():
        write_overviews(target.overviews, tile.core,
                        pyramid(labels, spec.nodata_output, target.overview_levels))
    record_tile(target.tiles_dir, tile.index)


def publish_scene(store: str, overviews: str | None, cog: str, published_store: str,
                  work_dir: str, *batches: BatchStats) -> BatchStats:
    """Publish a scene whose tiles are all written; sum its tile stats (``seconds``
    is the publication's own).

    The COG is made from the work store and the overview levels the tiles
    built (under a temporary name, renamed into place), then the store itself
    is moved into place and the work folder removed. A kill in between leaves
    the work to redo on the next run, never a published store that is incomplete.
    """
    start = time.perf_counter()
    write_cog(store, cog, overviews=overviews)
    publish_store(store, published_store)
    shutil.rmtree(work_dir, ignore_errors=True)
    return BatchStats(
        tiles=sum(b.tiles for b in batches),
        inferred=sum(b.inferred for b in batches),
        pixels=sum(b.pixels for b in batches),
        seconds=time.perf_counter() - start,
        read_seconds=sum(b.read_seconds for b in batches),
        model_seconds=sum(b.model_seconds for b in batches),
        write_seconds=sum(b.write_seconds for b in batches),
    )
