"""Benchmarks that print figures: peak memory of the whole process tree and throughput.

``memory_benchmark`` generates one sample scene per size, runs ``fcn-pipeline
run`` on it in a child process, and samples the resident memory of that
process and all its descendants (the embedded cluster's workers) until it
ends. Figures, never assertions: machines are shared and noisy.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from pipeline.samples import write_sample_scenes


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
