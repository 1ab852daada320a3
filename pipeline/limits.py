"""Resource limits read from a scene's header, before anything is planned.

A header is a few bytes that can claim anything: 65,535 bands, a million pixels a side.
Three guards keep such claims from reaching the planner or a worker:

- the band count (:attr:`HeaderLimits.max_bands`, setting ``input.max_bands``);
- the pixel count of one scene (:attr:`HeaderLimits.max_pixels`, ``input.max_pixels``);
- the memory one task's windows need (:func:`window_bytes`), which must fit the memory
  budget (``tiling.memory_budget``; on CPUs :func:`cpu_budget` by default).

:func:`check_header` runs on every header as it is opened; :func:`check_window` in
preflight, on a window no bigger than any the run will read (the tile without its
halo), whenever the budget is known without torch. Pure: no torch, Dask or rasterio.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from pipeline.config import DEFAULT_MAX_BANDS, DEFAULT_MAX_PIXELS, RunConfig, cpu_workers
from pipeline.errors import SceneLimitError
from pipeline.scene import SceneInfo

#: Default cap of one CPU task's memory: beyond tiles of a few thousand pixels the halo
#: overhead hardly falls, while memory keeps growing with the tile's area.
CPU_TASK_BUDGET = 512 * 2**20
#: Host bytes per window pixel besides the bands read: GDAL's uint8 mask of the window
#: and two bool validity arrays.
_MASK_BYTES = 3
#: Bytes per pixel and class of the model's output: float32 scores and their crop.
_SCORE_BYTES = 8
#: Bytes per pixel of the labels (up to int32) and the masks applied to them.
_LABEL_BYTES = 10


@dataclass(frozen=True)
class HeaderLimits:
    """The most bands and pixels a scene's header may declare."""

    max_bands: int = DEFAULT_MAX_BANDS
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def of(cls, config: RunConfig) -> HeaderLimits:
        return cls(config.max_bands, config.max_pixels)


def check_header(name: str, count: int, shape: tuple[int, int], limits: HeaderLimits) -> None:
    """Refuse a header that declares more bands or pixels than ``limits`` allow.

    Args:
        name: The scene's file name, for the message.
        count: Its band count.
        shape: Its ``(rows, cols)`` in pixels.
        limits: The limits of the run.

    Raises:
        SceneLimitError: one line naming the scene, its figure, the limit and the
            setting that raises it.
    """
    if count > limits.max_bands:
        raise SceneLimitError(
            f"{name} has {count} bands, more than input.max_bands ({limits.max_bands}); "
            "if the scene is genuine, raise it (--max-bands or FCN_PIPELINE_INPUT_MAX_BANDS)")
    rows, cols = shape
    if rows * cols > limits.max_pixels:
        raise SceneLimitError(
            f"{name} is {cols}x{rows} px ({rows * cols:.3g} pixels), more than "
            f"input.max_pixels ({limits.max_pixels:.3g}); if the scene is genuine, raise it "
            "(--max-pixels or FCN_PIPELINE_INPUT_MAX_PIXELS)")


def read_bytes(info: SceneInfo, bands: int, window: tuple[int, int]) -> int:
    """Peak host bytes of reading one window of a scene
    (:func:`pipeline.readers.read_window`), from its header.

    The ``bands`` read, in the scene's dtype; one mask or alpha band more (they are read
    one at a time); the window's masks; and one block as GDAL decodes it: of one band,
    or, in a pixel-interleaved scene, of every band at once (reading one band of such
    a block decodes them all).

    Args:
        info: The scene's header.
        bands: How many bands the window's array holds (repeats counted).
        window: ``(rows, cols)`` in pixels.
    """
    rows, cols = window
    pixels = rows * cols
    item = np.dtype(info.dtype).itemsize
    planes = info.count if info.interleave == "pixel" else 1
    block = info.block_shape[0] * info.block_shape[1] * planes * item
    return (bands + 1) * pixels * item + _MASK_BYTES * pixels + block


def window_bytes(info: SceneInfo, bands: int, classes: int, window: tuple[int, int],
                 batch_size: int) -> int:
    """Host bytes one task's windows hold at their peak: per window its read
    (:func:`read_bytes`), the float32 model input, the scores and the labels; times the
    windows of a batch, which are all held until the batch goes through the network.
    The network's activations and weights come on top
    (:func:`pipeline.tiling.task_memory`).

    Args:
        info: The scene's header.
        bands: Bands the model reads.
        classes: Classes the model scores.
        window: ``(rows, cols)`` in pixels.
        batch_size: Windows per task.
    """
    pixels = window[0] * window[1]
    model = pixels * (bands * 4 + classes * _SCORE_BYTES + _LABEL_BYTES)
    return batch_size * (read_bytes(info, bands, window) + model)


def cpu_budget(config: RunConfig) -> int:
    """The default memory budget of a CPU task: 60 % of the RAM split between the
    workers (``compute.workers``, else one per ``compute.threads_per_worker`` usable
    cores, as the embedded cluster starts them), at most :data:`CPU_TASK_BUDGET`."""
    workers = config.workers or cpu_workers(config.threads_per_worker)
    return min(CPU_TASK_BUDGET, int(psutil.virtual_memory().total * 0.6 / workers))


def known_budget(config: RunConfig) -> int | None:
    """The memory budget where it is known without torch: as given, or on CPUs
    :func:`cpu_budget`; ``None`` when it depends on a GPU not yet looked at."""
    if config.memory_budget:
        return config.memory_budget
    return cpu_budget(config) if config.device == "cpu" else None


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


def window_problem(info: SceneInfo, bands: int, needed: int, window: tuple[int, int],
                   batch_size: int, budget: int) -> str | None:
    """The refusal of windows of ``window`` px needing ``needed`` bytes a task, or
    ``None`` when that fits ``budget``."""
    if needed <= budget:
        return None
    name = Path(info.path).name
    layout = (f"; pixel-interleaved, so each block decodes all {info.count} bands"
              if info.interleave == "pixel" and info.count > bands else "")
    batch = f", {batch_size} a task" if batch_size > 1 else ""
    return (
        f"{name}: its windows of {window[1]}x{window[0]} px{batch} need ~{_mib(needed)} "
        f"({bands} of its {info.count} {info.dtype} bands{layout}), more than "
        f"tiling.memory_budget ({_mib(budget)}); raise it (--memory-budget or "
        "FCN_PIPELINE_TILING_MEMORY_BUDGET), or lower --tile-size or --batch-size")


def check_window(info: SceneInfo, bands: int, classes: int, config: RunConfig,
                 tile: int) -> None:
    """Refuse, before torch loads, a scene whose windows cannot fit the memory budget.

    The window is a ``tile`` px square without its halo (not known before the model is
    analysed), cut to the scene: no window the run reads is smaller, so a refusal here
    is never wrong. Nothing is checked when the budget depends on a GPU
    (:func:`known_budget`); :func:`pipeline.tiling.check_task_memory` checks every scene
    again once the model and the device are known.

    Raises:
        SceneLimitError: one line naming the scene, the bytes needed, the budget and
            the settings that change them.
    """
    budget = known_budget(config)
    if budget is None:
        return
    window = (min(tile, info.shape[0]), min(tile, info.shape[1]))
    needed = window_bytes(info, bands, classes, window, config.batch_size)
    problem = window_problem(info, bands, needed, window, config.batch_size, budget)
    if problem:
        raise SceneLimitError(problem)
