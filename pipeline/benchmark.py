"""Benchmarks that print figures: peak memory of the whole process tree, and of the
runner alone as the number of tiles grows.

``memory_benchmark`` generates one sample scene per size, runs ``fcn-pipeline
run`` on it in a child process, and samples the resident memory of that
process and all its descendants (the embedded cluster's workers) until it
ends. ``planning_benchmark`` plans scenes of a given number of tiles and runs
their tasks, doing no work, through the run's waves, and reports the runner's
peak memory. Figures, never assertions: machines are shared and noisy.
"""

from __future__ import annotations

import math
import multiprocessing
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import psutil

from pipeline.cluster import ClusterSpec, connect
from pipeline.graph import SceneJob, Waves
from pipeline.grid import Tile, TileGrid
from pipeline.journal import FileIdentity
from pipeline.plan import ScenePlan, outputs_for
from pipeline.publication import PublishTarget
from pipeline.readers import open_scene
from pipeline.receptive import ReceptiveField
from pipeline.samples import write_header_scene, write_sample_scenes
from pipeline.tasks import BatchStats, ModelRef, SceneTarget


@dataclass(frozen=True)
class MemoryFigure:
    """One benchmark row."""

    size: int
    megapixels: float
    generate_seconds: float
    run_seconds: float
    peak_rss_bytes: int
    exit_code: int

    @property
    def megapixels_per_second(self) -> float:
        return self.megapixels / self.run_seconds if self.run_seconds else 0.0


def _tree_rss(root: psutil.Process) -> int:
    total = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def peak_tree_rss(command: list[str], interval: float = 0.1) -> tuple[int, int, float]:
    """Run ``command``; return (exit code, peak RSS of its process tree, seconds)."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(child.pid)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(root))
            stop.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = child.communicate()
    stop.set()
    sampler.join()
    if child.returncode:
        sys.stderr.write(err)
    return child.returncode, peak, time.perf_counter() - start


def memory_benchmark(sizes: tuple[int, ...], *, tile_size: int | None, workers: int | None,
                     model: str = "demo", trust_code: bool = False, workdir: Path | None = None,
                     log: Callable[[str], None] = print) -> list[MemoryFigure]:
    """Generate a scene per size and measure a full ``run`` on it (``trust_code``: with
    ``--trust-spec-code``)."""
    figures = []
    with tempfile.TemporaryDirectory(dir=workdir, prefix="fcn-bench-") as tmp:
        for size in sizes:
            scenes = Path(tmp) / f"scenes-{size}"
            t0 = time.perf_counter()
            sample = write_sample_scenes(scenes, size=size, count=1, seed=size)[0]
            generated = time.perf_counter() - t0
            command = [sys.executable, "-m", "pipeline.cli", "run", str(sample.scene),
                       "--out", str(Path(tmp) / f"out-{size}"), "--model", model]
            if tile_size:
                command += ["--tile-size", str(tile_size)]
            if workers:
                command += ["--workers", str(workers)]
            if trust_code:
                command += ["--trust-spec-code"]
            log(f"size {size}: scene written in {generated:.1f} s; running")
            code, peak, seconds = peak_tree_rss(command)
            figures.append(MemoryFigure(size, size * size / 1e6, generated, seconds, peak, code))
    return figures


def render_memory(figures: list[MemoryFigure]) -> str:
    """The benchmark table, with growth of peak memory relative to the previous size."""
    lines = [f"{'size':>7} {'Mpx':>8} {'run s':>8} {'Mpx/s':>7} {'peak RSS MiB':>13} {'growth':>7}",
             "-" * 56]
    previous = None
    for fig in figures:
        growth = "" if previous is None else f"{fig.peak_rss_bytes / previous - 1:+.0%}"
        lines.append(f"{fig.size:>7} {fig.megapixels:>8.1f} {fig.run_seconds:>8.1f} "
                     f"{fig.megapixels_per_second:>7.2f} {fig.peak_rss_bytes / 2**20:>13.0f} "
                     f"{growth:>7}" + ("" if fig.exit_code == 0 else f"  (exit {fig.exit_code})"))
        previous = fig.peak_rss_bytes
    lines.append("peak RSS: the run command and all its worker processes together; run s: "
                 "includes cluster start-up and COG writing")
    return "\n".join(lines)


# ------------------------------------------------------------------ planning memory

#: The receptive field of a 1x1 convolution: no halo, so a tile's window is the tile.
POINTWISE = ReceptiveField.pointwise()


@dataclass(frozen=True)
class PlanningFigure:
    """One row of :func:`planning_benchmark`: the runner's memory for ``tiles`` tiles."""

    tiles: int
    shape: tuple[int, int]
    baseline_rss_bytes: int
    peak_rss_bytes: int
    plan_seconds: float
    run_seconds: float


def _no_tile_work(model: ModelRef, target: SceneTarget, tiles: tuple[Tile, ...]) -> BatchStats:
    """A tile task that does nothing but report its tiles done."""
    return BatchStats(len(tiles), 0, sum(t.core.area for t in tiles), 0.0)


def _no_publication(target: PublishTarget) -> BatchStats:
    """A publication task that does nothing."""
    return BatchStats(0, 0, 0, 0.0)


def grid_for(tiles: int) -> tuple[int, int]:
    """Rows and columns of tiles, ``rows * cols == tiles``, as near a square as can be."""
    rows = max(r for r in range(1, math.isqrt(tiles) + 1) if tiles % r == 0)
    return rows, tiles // rows


def _planning_probe(scene: str, tile_size: int, workers: int, out_dir: str,
                    answer: Connection) -> None:
    """In a fresh process: start the embedded cluster, plan ``scene`` and run its tasks in
    the run's waves with tasks that do no work; send the figures back."""
    rusage = resource.getrusage
    with connect(ClusterSpec(workers=workers)) as client:
        client.wait_for_workers(workers)
        baseline = rusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        start = time.perf_counter()
        info = open_scene(scene)
        plan = ScenePlan(info, TileGrid.build(info.shape, info.shape, POINTWISE, tile_size),
                         outputs_for(scene, Path(out_dir)))
        job = SceneJob(plan, out_dir, "bench", "0" * 64, FileIdentity.of(scene))
        planned = time.perf_counter()
        waves = Waves(client, {0: job}, ModelRef("none", "0" * 64, "cpu"), batch_size=1,
                      probabilities=False, gpu=False, predict=_no_tile_work,
                      publish=_no_publication)
        done = 0
        for ended in waves:
            stats = ended.future.result()  # raises if a task failed
            done += stats.tiles
        if done != len(plan.grid):
            raise RuntimeError(f"{done} of {len(plan.grid)} tiles reported done")
        ran = time.perf_counter()
    answer.send(PlanningFigure(len(plan.grid), info.shape, baseline,
                               rusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                               planned - start, ran - planned))


def planning_benchmark(tile_counts: tuple[int, ...], *, tile_size: int = 16, workers: int = 2,
                       workdir: Path | None = None,
                       log: Callable[[str], None] = print) -> list[PlanningFigure]:
    """The runner's peak memory when a scene of each of ``tile_counts`` tiles is planned,
    its tasks submitted in the run's waves and followed to their end.

    Each count is measured in a fresh process that starts the embedded cluster (its
    scheduler lives in the runner's process, as in a run) and plans a header-only scene
    (:func:`pipeline.samples.write_header_scene`) of ``tile_size`` px tiles under a 1x1
    convolution's receptive field; the tile tasks and the publication do no work, so the
    figures are the runner's own: tile geometry, futures, the scheduler's task states and
    the tracking of results, not the workers' reading, inference or writing. The peak is
    that process's resident set (``ru_maxrss``); the baseline is the same figure once the
    cluster has started, before planning.
    """
    figures = []
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(dir=workdir, prefix="fcn-bench-planning-") as tmp:
        for count in tile_counts:
            rows, cols = grid_for(count)
            scene = write_header_scene(Path(tmp) / f"scene-{count}.tif",
                                       (rows * tile_size, cols * tile_size))
            log(f"{count} tiles: {cols}x{rows} tiles of {tile_size} px; running")
            receive, send = context.Pipe(duplex=False)
            probe = context.Process(target=_planning_probe, args=(
                str(scene), tile_size, workers, str(Path(tmp) / "out"), send))
            probe.start()
            send.close()
            try:
                figure = receive.recv()
            except EOFError:
                figure = None
            probe.join()
            if figure is None or probe.exitcode:
                raise RuntimeError(f"the planning probe of {count} tiles ended with exit code "
                                   f"{probe.exitcode}")
            figures.append(figure)
    return figures


def render_planning(figures: list[PlanningFigure]) -> str:
    """The planning benchmark table: the runner's peak and its growth over the baseline."""
    lines = [f"{'tiles':>9} {'width x height':>15} {'plan s':>7} {'run s':>8} "
             f"{'baseline MiB':>13} {'peak MiB':>9} {'growth MiB':>11}", "-" * 78]
    for fig in figures:
        lines.append(
            f"{fig.tiles:>9} {f'{fig.shape[1]}x{fig.shape[0]}':>15} {fig.plan_seconds:>7.2f} "
            f"{fig.run_seconds:>8.1f} {fig.baseline_rss_bytes / 2**20:>13.0f} "
            f"{fig.peak_rss_bytes / 2**20:>9.0f} "
            f"{(fig.peak_rss_bytes - fig.baseline_rss_bytes) / 2**20:>11.0f}")
    lines.append("peak: the runner process alone (client and embedded scheduler), tasks that do "
                 "no work; baseline: once its cluster has started, before planning")
    return "\n".join(lines)
