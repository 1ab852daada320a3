"""The work of Dask tasks: predict a batch of tiles, publish a finished scene.

A task receives paths, boxes and a model reference (spec path + weights
sha256 + device + whether the run trusts the spec's code), never open files or
weights. It reads only its windows, runs them through the network its worker
process loaded once (:func:`pipeline.model.cached_network`) with the prediction core
(:class:`pipeline.prediction.Predictor`, the one :func:`pipeline.inference.predict_tiled`
uses), and writes each tile's Zarr chunk and its share of the COG's overview levels,
then records the tile with the checksums of those chunks.

Before every write a task checks that its run still holds the output folder
(:func:`pipeline.journal.check_run`), and around every read that the scene file is
the one planned (its size, modification time and inode): a task of an interrupted
run writes nothing, and a scene replaced during the run fails alone.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from pipeline.errors import OutputError, PipelineError, SceneChangedError, SceneError
from pipeline.grid import Box, Tile, TileGrid
from pipeline.journal import FileIdentity, SceneRecord, check_run, record_tile
from pipeline.labels import label_dtype
from pipeline.model import cached_network
from pipeline.modelspec import ModelSpec, fill_values, model_input
from pipeline.overviews import pyramid
from pipeline.prediction import CROP, Predictor, TilePrediction
from pipeline.publication import PublishTarget, publish
from pipeline.readers import pixel_validity, read_window
from pipeline.scene import nodata_problem
from pipeline.writers import write_labels, write_overviews

_Task = TypeVar("_Task", bound=Callable[..., Any])


def _portable_errors(task: _Task) -> _Task:
    """Our errors (and file errors, as :class:`OutputError`) leave a task as a fresh
    exception of the same class and message, without the chain of library exceptions
    behind them: Dask pickles an error's causes to send it
    to the client, and an exception of a C extension (GDAL's through rasterio) that does not
    unpickle turned a one-line error into ``Exception: OutputError('...')``."""

    @functools.wraps(task)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except PipelineError as exc:
            error: PipelineError = exc
        except OSError as exc:  # a file error no step named: still one line with its path
            where = f" ({exc.filename})" if exc.filename else ""
            error = OutputError(f"{exc.strerror or exc}{where}")
        raise type(error)(str(error))  # outside the except block: no context, no cause

    return run  # type: ignore[return-value]  # same signature, by functools.wraps


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
    #: The run trusts the spec's code: a worker builds an import-path architecture only then.
    trust_code: bool = False
    #: Windows per forward pass.
    batch_size: int = 1
    #: How tiles are stitched: ``crop`` or ``blend`` (:mod:`pipeline.prediction`).
    stitch: str = CROP



@dataclass(frozen=True)
class SceneTarget:
    """One scene's input and work folder, as tile tasks need them.

    ``identity`` is the scene file's identity when it was planned; ``run_id`` the run
    that must still hold ``out_dir`` for the task to write; ``overview_levels`` how
    many overview levels each tile builds (0: none).
    """

    scene: str
    identity: FileIdentity
    out_dir: str
    stem: str
    run_id: str
    probabilities: bool
    overview_levels: int = 0
    #: The scene's fingerprint: a task Dask runs again after the scene was published
    #: (its result was lost with a worker) finds it published and writes nothing.
    fingerprint: str = ""
    #: The scene was planned as a VRT (``--allow-vrt``); otherwise it is read only as a
    #: GeoTIFF, whatever the file has become.
    allow_vrt: bool = False
    #: The scene's tiles: a blending task finds the windows around its tiles in it.
    grid: TileGrid | None = None

    @property
    def record(self) -> SceneRecord:
        return SceneRecord(Path(self.out_dir), self.stem)


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

    def plus(self, other: BatchStats) -> BatchStats:
        """The stats of both tasks: every figure summed."""
        return BatchStats(*(a + b for a, b in zip(astuple(self), astuple(other))))


def _valid(spec: ModelSpec, data: np.ndarray, scene_valid: np.ndarray, scene: str) -> np.ndarray:
    """Which pixels of a window are valid under the spec's ``nodata.input``, bool ``(rows, cols)``.

    ``scene``: the reader's rule (:func:`pipeline.readers.read_window`). A number
    replaces the scene's nodata value and masks, by the same rule on the bands
    read: NaN and +-inf are invalid; for float data any band equal to the
    number, for integer data every band equal to it. ``none`` ignores nodata
    and masks, but NaN and +-inf stay invalid: they cannot be fed to a network.

    Raises:
        SceneError: The number is one the scene's dtype cannot hold (300 or 0.5
            on uint8, -1e40 on float32); the message names the scene, the spec
            and the fix.
    """
    if spec.nodata_input == "scene":
        return scene_valid
    if spec.nodata_input == "none":
        return pixel_validity(data)
    value = float(spec.nodata_input)
    problem = nodata_problem(value, data.dtype.name)
    if problem:
        raise SceneError(
            f"{Path(scene).name}: nodata.input of {spec.source}: {problem}; set nodata.input "
            "to a value the scene's pixels can hold, or to scene or none"
        )
    return pixel_validity(data, value)


def _prepare_torch(threads: int) -> None:
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _check_unchanged(target: SceneTarget) -> None:
    """Raise :class:`SceneChangedError` when the scene file is not the one planned."""
    try:
        now = FileIdentity.of(target.scene)
    except OSError as exc:
        raise SceneChangedError(f"{Path(target.scene).name} disappeared during the run "
                                f"({exc.strerror or exc})") from exc
    if now != target.identity:
        raise SceneChangedError(
            f"{Path(target.scene).name} was modified or replaced during the run (its size, "
            "modification time or inode changed); run again to label the file as it is now")


def read_input(spec: ModelSpec, scene: str, window: Box, *,
               allow_vrt: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The network's input for a scene window and its validity: ``(C, h, w)`` float32
    normalised and filled (:func:`pipeline.modelspec.model_input`), ``(h, w)`` bool.

    Raises:
        SceneError: the window cannot be read, or the spec's nodata does not fit the scene.
    """
    data, valid = _raw_input(spec, scene, window, allow_vrt)
    return model_input(data, valid, spec), valid


def _raw_input(spec: ModelSpec, scene: str, window: Box,
               allow_vrt: bool) -> tuple[np.ndarray, np.ndarray]:
    """A window's raw bands (the spec's, in its order) and their validity under the
    spec's ``nodata.input`` (:func:`_valid`)."""
    data, scene_valid = read_window(scene, window, spec.bands, allow_vrt=allow_vrt)
    return data, _valid(spec, data, scene_valid, scene)


def _read(spec: ModelSpec, target: SceneTarget,
          window: Box) -> tuple[np.ndarray, np.ndarray, float]:
    """A raw window, the validity of the whole window, and the seconds it took.

    The scene is checked to be the planned file before and after the read, so no
    window mixes two versions of it.
    """
    start = time.perf_counter()
    _check_unchanged(target)
    data, valid = _raw_input(spec, target.scene, window, target.allow_vrt)
    _check_unchanged(target)
    return data, valid, time.perf_counter() - start


@_portable_errors
def predict_tiles(model_ref: ModelRef, target: SceneTarget, tiles: tuple[Tile, ...]) -> BatchStats:
    """Predict ``tiles`` of one scene and write their chunks.

    The windows the tiles need (:meth:`pipeline.prediction.Predictor.windows`) are read
    by a small thread pool while the network runs, so reading and decoding overlap
    with compute; the prediction core batches windows of equal shape (pinned memory
    and non-blocking copies on a GPU). Tiles whose core has no valid input pixel are
    written as nodata without inference.
    """
    start = time.perf_counter()
    check_run(target.out_dir, target.run_id)
    record = target.record
    if not record.work.exists() and record.published_as(target.fingerprint, deep=False) is not None:
        return BatchStats(len(tiles), 0, sum(t.core.area for t in tiles), 0.0)
    if target.grid is None:
        raise ValueError("predict_tiles needs the scene's grid in its target")
    spec, network = cached_network(
        model_ref.spec_path, model_ref.sha256, model_ref.device, threads=model_ref.threads,
        precision=model_ref.precision, channels_last=model_ref.channels_last,
        compile=model_ref.compile, trust_code=model_ref.trust_code)
    classes = len(spec.classes)
    predictor = Predictor(network, target.grid, classes=classes, nodata=spec.nodata_output,
                          label_dtype=label_dtype(classes), fill=fill_values(spec, np.float32),
                          batch_size=model_ref.batch_size, stitch=model_ref.stitch,
                          scores=target.probabilities, source=spec.source)
    _prepare_torch(model_ref.threads)
    inferred = 0
    read_s = wait_s = write_s = 0.0
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="read") as pool:
        reads = {window: pool.submit(_read, spec, target, window)
                 for window in predictor.windows(tiles)}

        def read(window: Box) -> tuple[np.ndarray, np.ndarray]:
            nonlocal read_s, wait_s
            t0 = time.perf_counter()
            data, valid, seconds = reads.pop(window).result()
            wait_s += time.perf_counter() - t0
            read_s += seconds
            return model_input(data, valid, spec), valid

        predicting = time.perf_counter()
        for result in predictor.predict(tiles, read):
            t0 = time.perf_counter()
            _write(target, result, spec)
            write_s += time.perf_counter() - t0
            inferred += result.inferred
        # what is neither waiting for a window nor writing: normalising, the forward
        # passes, labels and scores back on the host
        model_s = time.perf_counter() - predicting - wait_s - write_s
    pixels = sum(t.core.area for t in tiles)
    return BatchStats(len(tiles), inferred, pixels, time.perf_counter() - start,
                      read_s, model_s, write_s)


def _probabilities(result: TilePrediction, classes: int) -> np.ndarray:
    """A tile's class probabilities, ``(K, rows, cols)`` float16, NaN where not labelled."""
    if result.scores is None or not result.inferred:
        return np.full((classes, *result.tile.core.shape), np.nan, dtype=np.float16)
    scores = torch.from_numpy(np.ascontiguousarray(result.scores)).float()
    probs = torch.softmax(scores, dim=0).to(torch.float16).numpy()
    probs[:, ~result.labelled] = np.nan
    return probs


def _write(target: SceneTarget, result: TilePrediction, spec: ModelSpec) -> None:
    """Write a tile's chunks, then record it with their checksums (only while the run
    still holds the output folder)."""
    tile, labels = result.tile, result.labels
    probs = _probabilities(result, len(spec.classes)) if target.probabilities else None
    record = target.record
    check_run(target.out_dir, target.run_id)
    written = write_labels(record.store, tile.core, labels, probs)
    files = [f"{record.store.name}/{f}" for f in written]
    if target.overview_levels and (labels != spec.nodata_output).any():
        levels = pyramid(labels, spec.nodata_output, target.overview_levels)
        files += [f"{record.overviews.name}/{f}"
                  for f in write_overviews(record.overviews, tile.core, levels)]
    check_run(target.out_dir, target.run_id)
    record_tile(record.work, tile.index, files)


@_portable_errors
def publish_scene(target: PublishTarget) -> BatchStats:
    """Publish a scene whose tiles are all written (:func:`pipeline.publication.publish`);
    its stats hold the publication's seconds alone."""
    start = time.perf_counter()
    publish(target)
    return BatchStats(tiles=0, inferred=0, pixels=0, seconds=time.perf_counter() - start)
