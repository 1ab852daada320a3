"""Throughput benchmark: how far ``fcn-pipeline run`` is from the model's own speed.

One call of :func:`throughput_benchmark` measures, on the same machine and
the same number of threads:

(a) ``raw``: forward passes over in-memory float32 tensors (no I/O, no halo),
    at the input size where the model is fastest per pixel: the ceiling;
(b) ``tiled``: :func:`pipeline.inference.predict_tiled` over a generated
    image in memory, with the tile size of the run;
(c) ``run``: ``fcn-pipeline run`` on the same image written as a GeoTIFF, in
    a child process (cluster start-up, reading, writing the Zarr store and
    the COG included), with the peak RSS of its process tree;
(d) ``sliding``: the usual approach for reference, windows of the tile size
    with 25 % overlap whose logits are averaged, and how far that is from
    whole-image logits (next to (b)'s deviation, which should be ~0).

Figures, never assertions: machines are shared and noisy. The run goes through
the real CLI in a subprocess, so this module needs no Dask.
"""

from __future__ import annotations

import io
import json
import math
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import yaml
from torch import nn

from pipeline.analysis import receptive_field
from pipeline.benchmark import peak_tree_rss
from pipeline.config import usable_cores
from pipeline.errors import ConfigError, ModelAnalysisError, ModelError
from pipeline.inference import activation_bytes, output_shape, plan_tiles, predict_tiled
from pipeline.model import build_model, load_network, save_weights
from pipeline.modelspec import (
    LABELS,
    ONNX,
    ModelSpec,
    load_spec,
    normalize,
    read_weights,
    verify_weights,
)
from pipeline.networks import Network, OnnxNetwork, onnx_memory
from pipeline.receptive import Halo, ReceptiveField
from pipeline.samples import render, write_sample_scenes

#: Input sizes tried for the raw ceiling (a), where memory allows.
RAW_SIZES = (256, 512, 1024, 2048)
#: Side of the largest crop on which whole-image logits are compared with (b) and (d).
DEVIATION_CROP = 2048
#: Overlap of neighbouring windows in the sliding-window reference (d).
SLIDING_OVERLAP = 0.25
#: Seed of the generated scene (and of random weights for built-in architectures).
SCENE_SEED = 4242
#: Normalisation written into the spec of a built-in architecture with random weights.
BUILTIN_NORMALIZATION = {"scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3}
#: The run manifest that ``fcn-pipeline run`` writes into its output folder.
RUN_MANIFEST = "run.json"

Log = Callable[[str], Any]


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class BenchModel:
    """The model under test: its spec (a file the CLI can load) and the network on a device.

    ``module``: the torch module of a torch spec, else None; ``network``: the network the
    prediction core runs (an ONNX graph's on ONNX Runtime with the bench's threads);
    ``field`` and ``halo``: an ONNX spec's analysed field and declared halo
    (:func:`pipeline.tiling.analyse_model`), ``field`` None when the analysis refused it
    and no halo is declared (``refused`` then says why).
    """

    name: str
    spec: ModelSpec
    module: nn.Module | None
    device: str
    network: Network | None = None
    field: ReceptiveField | None = None
    halo: Halo | None = None
    refused: str | None = None
    graph: bytes | None = None
    #: The graph's padding depends on its input's length: windows kept congruent.
    congruent: bool = False

    @property
    def channels(self) -> int:
        return len(self.spec.bands)

    @property
    def tiles(self) -> bool:
        """Tiles can be planned: the network's field is derived (a torch module's as it is
        tiled, an ONNX graph's probed) or a halo is declared."""
        return self.refused is None or self.halo is not None

    @property
    def scores(self) -> bool:
        """The network gives class scores (a label output has none to tile or average)."""
        return self.network is None or self.network.signature.output != LABELS

    @property
    def window(self) -> tuple[int, int] | None:
        """The one input ``(rows, cols)`` the network takes, or None."""
        return self.network.signature.window if self.network is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> the network's output (scores), on :attr:`device` for torch."""
        if self.module is not None:
            with torch.inference_mode():
                return self.module(x)
        assert self.network is not None
        return self.network.forward(x.cpu().numpy())


def write_builtin_spec(name: str, directory: Path, arguments: Mapping[str, Any] | None = None,
                       *, seed: int = SCENE_SEED) -> Path:
    """A spec and ``.safetensors`` of built-in architecture ``name`` with random weights.

    Three uint8 bands scaled by 1/255, mean 0.5, std 0.25; as many classes as
    the network outputs, with generated names and colours. Returns the spec path.
    """
    from pipeline.models import ARCHITECTURES, build

    if name not in ARCHITECTURES:
        raise ModelError(
            f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}"
        )
    kwargs = json.loads(json.dumps(dict(arguments or {})))  # plain lists for YAML
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            module = build(name, **kwargs).eval()
        except (TypeError, ValueError) as exc:  # an argument the factory cannot take
            raise ModelError(f"architecture {name} failed with arguments {kwargs}: "
                             f"{type(exc).__name__}: {exc}") from exc
    classes = output_shape(module, (3, 256, 256))[0]
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{name}.safetensors"
    digest = save_weights(module, weights)
    colours = np.random.default_rng(classes).integers(0, 256, size=(classes, 3))
    spec = {
        "schema": 1,
        "name": f"{name}-random",
        "architecture": name,
        "arguments": kwargs,
        "weights": weights.name,
        "sha256": digest,
        "bands": [1, 2, 3],
        "normalization": BUILTIN_NORMALIZATION,
        "classes": [{"name": f"class-{k:02d}", "color": [int(c) for c in colours[k]]}
                    for k in range(classes)],
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def load_bench_model(model: str, directory: Path, *, device: str = "cpu",
                     arguments: Mapping[str, Any] | None = None,
                     trust_code: bool = False, threads: int = 1) -> BenchModel:
    """``demo``, a spec path or a built-in architecture name (random weights, spec written
    into ``directory``), built on ``device``; ``trust_code`` lets a spec's import path run;
    ``threads``: ONNX Runtime's intra-op threads for an ONNX spec."""
    from pipeline.models import ARCHITECTURES

    if model in ARCHITECTURES and not Path(model).is_file():
        source: str | Path = write_builtin_spec(model, directory, arguments)
    elif arguments:
        raise ConfigError("architecture arguments apply to built-in architecture names only; "
                          f"{model!r} is a spec: put them in its arguments")
    else:
        source = model
    spec = load_spec(source)
    if max(spec.bands) > 3:
        raise ConfigError(f"{spec.source}: bands {list(spec.bands)} ask for band "
                          f"{max(spec.bands)}; the generated scenes have 3 bands")
    if spec.backend == ONNX:
        return _onnx_bench_model(model, spec, device, threads)
    module = build_model(spec, device=device, trust_code=trust_code)
    try:
        receptive_field(module)
    except ModelAnalysisError as exc:  # tiled with the spec's halo, else not at all
        halo = Halo.of(spec.halo) if spec.halo is not None else None
        return BenchModel(model, spec, module, device, halo=halo, refused=_one_line(exc))
    return BenchModel(model, spec, module, device)


def _onnx_bench_model(model: str, spec: ModelSpec, device: str, threads: int) -> BenchModel:
    """An ONNX spec's graph on ONNX Runtime (``threads`` intra-op threads) and its field
    as ``run`` analyses it; a refused field (global context, no halo) is kept as a reason."""
    from pipeline.tiling import analyse_model

    digest = verify_weights(spec)
    network = load_network(spec, device=device, threads=threads)
    try:
        analysed = analyse_model(spec, digest)
    except ModelAnalysisError as exc:
        return BenchModel(model, spec, None, device, network, refused=_one_line(exc),
                          graph=read_weights(spec))
    return BenchModel(model, spec, None, device, network, analysed.field, analysed.declared,
                      graph=analysed.graph, congruent=analysed.congruent)


def _one_line(exc: BaseException) -> str:
    lines = str(exc.__cause__ or exc).strip().splitlines()
    return lines[0].split("; ", 1)[0] if lines else type(exc).__name__


def model_input(bench: BenchModel, raw: np.ndarray) -> np.ndarray:
    """The float32 model input for raw ``(3, H, W)`` scene values, as a run computes it."""
    return normalize(raw[np.asarray(bench.spec.bands) - 1], bench.spec)


# --------------------------------------------------------------------------- timing


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to ``threads``, restored on exit."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "memory" in str(exc).lower())


def fits(bench: BenchModel, shape: tuple[int, int]) -> bool:
    """Whether a forward pass on ``shape`` likely fits: twice the estimated activation peak
    within 60 % of free GPU memory, or 50 % of available RAM."""
    if bench.module is not None:
        need = 2 * activation_bytes(bench.module, (bench.channels, *shape))
    else:
        assert bench.graph is not None
        need = 2 * sum(onnx_memory(bench.graph, (bench.channels, *shape), 1,
                                   input_name=bench.spec.onnx_input))
    if bench.device.startswith("cuda"):
        free = torch.cuda.mem_get_info()[0] * 0.6
    else:
        free = psutil.virtual_memory().available * 0.5
    return need <= free


# --------------------------------------------------------------------------- (a) .. (d)


def raw_inputs(bench: BenchModel, sizes: Sequence[int]) -> dict[int, torch.Tensor]:
    """(a) Random ``size x size`` inputs for the sizes whose forward pass fits in memory.

    Each is run once here (this is the warm-up); a size that runs out of memory is left out.
    """
    inputs: dict[int, torch.Tensor] = {}
    if bench.window is not None:  # the network takes one input size (square here)
        sizes = [bench.window[0]] if bench.window[0] == bench.window[1] else []
    for size in sizes:
        if not fits(bench, (size, size)):
            continue
        x = torch.randn(1, bench.channels, size, size, device=bench.device)
        try:
            bench(x)
        except RuntimeError as exc:  # OutOfMemoryError is a RuntimeError
            if not _is_oom(exc):
                raise
            del x
            continue
        inputs[size] = x
    return inputs


def _forward(bench: BenchModel, x: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        bench(x)

    return call


def interleaved_best(calls: Mapping[str, Callable[[], Any]], repeats: int,
                     device: str = "cpu") -> dict[str, dict[str, Any]]:
    """Best wall time of each call over ``repeats`` rounds that run every call once in turn.

    Interleaving makes every part see the same load on a shared machine. A
    warm-up round comes first. Per call: ``seconds``, its last ``result`` and,
    on CUDA, ``max_memory_allocated_bytes`` over its runs.
    """
    cuda = device.startswith("cuda")
    figures: dict[str, dict[str, Any]] = {k: {"seconds": math.inf} for k in calls}
    for round_ in range(max(1, repeats) + 1):
        for name, call in calls.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            start = time.perf_counter()
            result = call()
            _sync(device)
            seconds = time.perf_counter() - start
            entry = figures[name]
            entry["result"] = result
            if round_:
                entry["seconds"] = min(entry["seconds"], seconds)
            if cuda:
                entry["max_memory_allocated_bytes"] = max(
                    entry.get("max_memory_allocated_bytes", 0), torch.cuda.max_memory_allocated())
    return figures


def whole_image(bench: BenchModel, image: np.ndarray) -> np.ndarray:
    """``model(image[None])[0]`` as a numpy array."""
    out = bench(torch.from_numpy(image)[None].to(bench.device))[0]
    return out.float().cpu().numpy()


def window_starts(length: int, window: int, step: int) -> list[int]:
    """Starts of windows of ``window`` px every ``step`` px covering ``[0, length)``; the last
    one is moved back to end on the edge."""
    if length <= window:
        return [0]
    return [*range(0, length - window, step), length - window]


def predict_sliding(bench: BenchModel, image: np.ndarray, window: int,
                    overlap: float = SLIDING_OVERLAP) -> tuple[np.ndarray, int]:
    """(d) Logits of overlapping windows, averaged where they overlap; and pixels computed.

    The usual approach: each window is run as an image of its own (the network
    pads at its edges), so pixels near window edges differ from whole-image
    inference.
    """
    tensor = torch.from_numpy(image).to(bench.device)
    _, rows, cols = tensor.shape
    win = (min(window, rows), min(window, cols))
    steps = tuple(max(1, w - int(w * overlap)) for w in win)
    total: torch.Tensor | None = None
    count = torch.zeros((rows, cols), device=bench.device)
    computed = 0
    with torch.inference_mode():
        for r in window_starts(rows, win[0], steps[0]):
            for c in window_starts(cols, win[1], steps[1]):
                out = bench(tensor[None, :, r:r + win[0], c:c + win[1]])[0].float()
                if total is None:
                    total = torch.zeros((out.shape[0], rows, cols), device=bench.device)
                total[:, r:r + win[0], c:c + win[1]] += out
                count[r:r + win[0], c:c + win[1]] += 1
                computed += win[0] * win[1]
        assert total is not None
        return (total / count).cpu().numpy(), computed


def deviation_crop(bench: BenchModel, size: int, limit: int = DEVIATION_CROP) -> int:
    """The side of the largest square crop (``size``, else ``limit`` halved) whose
    whole-image inference fits in memory."""
    side = min(size, limit)
    while side > 64 and not fits(bench, (side, side)):
        side //= 2
    return side


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b)))


# --------------------------------------------------------------------------- (c) the CLI


def _cli(scene: Path, out: Path, spec: Path, tile: int | None, workers: int, threads: int,
         device: str, trust_code: bool) -> list[str]:
    command = [sys.executable, "-m", "pipeline.cli", "run", str(scene), "--out", str(out),
               "--model", str(spec), "--workers", str(workers),
               "--threads-per-worker", str(threads), "--device", device]
    return (command + (["--tile-size", str(tile)] if tile else [])
            + (["--trust-spec-code"] if trust_code else []))


def planned_tile_size(command: list[str]) -> tuple[int, str]:
    """The tile size (and the reason) that ``fcn-pipeline run`` picks, from its dry run."""
    done = subprocess.run([*command, "--dry-run"], capture_output=True, text=True, check=False)
    found = re.search(r"^tile size (\d+) px \((.*)\)$", done.stdout, re.MULTILINE)
    if done.returncode or not found:
        raise ConfigError(f"`{' '.join(command[2:])} --dry-run` exited {done.returncode} without "
                          f"a tile size: {(done.stderr or done.stdout).strip()[-500:]}")
    return int(found.group(1)), found.group(2)


def run_end_to_end(command: list[str], out: Path, pixels: int) -> dict[str, Any]:
    """(c) Run the CLI; Mpx/s over its wall time, peak RSS of its process tree and the
    seconds the run itself reports (from submitting tiles to the published COG)."""
    code, peak, seconds = peak_tree_rss(command)
    reported, work = None, None
    manifest = out / RUN_MANIFEST
    if manifest.is_file():
        scenes = json.loads(manifest.read_text(encoding="utf-8")).get("scenes", [])
        reported = scenes[0].get("seconds") if scenes else None
        work = scenes[0].get("work_seconds") if scenes else None
    return {
        "exit_code": code,
        "seconds": seconds,
        "mpx_per_s": pixels / seconds / 1e6 if code == 0 else None,
        "scene_seconds": reported,
        "scene_mpx_per_s": pixels / reported / 1e6 if code == 0 and reported else None,
        "peak_rss_bytes": peak,
        "work_seconds": work or None,
    }


# --------------------------------------------------------------------------- GPU figures


class GpuMonitor:
    """Samples device-wide GPU utilisation and memory use (pynvml, else nvidia-smi)
    in a thread while a part runs; ``available`` is False where neither exists."""

    def __init__(self, index: int = 0, interval: float = 0.1) -> None:
        self.index, self.interval = index, interval
        self._query = self._nvml() or self._smi()

    @property
    def available(self) -> bool:
        return self._query is not None

    def _nvml(self) -> Callable[[], tuple[float, float]] | None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import pynvml
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception:  # no library, no driver: fall back
            return None

        def query() -> tuple[float, float]:
            util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
            return float(util), float(pynvml.nvmlDeviceGetMemoryInfo(handle).used)

        return query

    def _smi(self) -> Callable[[], tuple[float, float]] | None:
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return None

        def query() -> tuple[float, float]:
            text = subprocess.run(
                [smi, f"--id={self.index}", "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True,
            ).stdout
            util, used = (float(v) for v in text.strip().split(","))
            return util, used * 2**20

        return query

    @contextmanager
    def sample(self, into: dict[str, Any]) -> Iterator[None]:
        """Fill ``into`` with ``utilisation_percent`` (mean) and ``memory_used_peak_bytes``."""
        if self._query is None:
            into.update(utilisation_percent="n/a", memory_used_peak_bytes="n/a")
            yield
            return
        samples: list[tuple[float, float]] = []
        stop = threading.Event()
        query = self._query

        def poll() -> None:
            while not stop.is_set():
                try:
                    samples.append(query())
                except Exception:  # a failed query loses one sample, not the benchmark
                    pass
                stop.wait(self.interval)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            into.update(
                utilisation_percent=float(np.mean([s[0] for s in samples])) if samples else "n/a",
                memory_used_peak_bytes=int(max(s[1] for s in samples)) if samples else "n/a",
            )


# --------------------------------------------------------------------------- the benchmark


def throughput_benchmark(
    model: str = "demo",
    *,
    size: int = 2048,
    tile_size: int | None = None,
    workers: int | None = None,
    threads: int | None = None,
    repeats: int = 3,
    device: str = "cpu",
    raw_sizes: Sequence[int] = RAW_SIZES,
    arguments: Mapping[str, Any] | None = None,
    end_to_end: bool = True,
    trust_code: bool = False,
    workdir: Path | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Measure (a) raw, (b) tiled, (c) run and (d) sliding throughput in one go.

    Args:
        model: ``demo``, a spec path, or a built-in architecture name (random weights;
            ``arguments`` go to its factory, e.g. ``{"base": 4}`` for ``unet-small``).
        size: side of the generated scene, in pixels.
        tile_size: tile size of (b), (c) and (d); default: what ``run`` picks (its dry run).
        workers: workers of the run's embedded cluster; default ``threads`` on a CPU
            (one thread each), 1 on CUDA.
        threads: torch threads of (a), (b), (d), and workers x threads per worker of (c);
            default: the cores this process may use.
        repeats: timed passes of (a), (b), (d) after a warm-up; the best counts.
        device: ``cpu`` or ``cuda`` for (a), (b), (d); passed to the run as ``--device``.
        end_to_end: False skips (c) (its figures and ratios are then None).
        trust_code: the spec's import path may run, here and in (c) (``--trust-spec-code``).
        workdir: where the temporary scene, spec and outputs go.
        log: progress messages.

    Returns:
        A JSON-serialisable dict; :func:`render_throughput` prints it.
    """
    threads = threads or usable_cores()
    cuda = device.startswith("cuda")
    workers = workers or (1 if cuda else threads)
    per_worker = 1 if cuda else max(1, threads // workers)
    with tempfile.TemporaryDirectory(dir=workdir, prefix="fcn-throughput-") as tmp_name:
        tmp = Path(tmp_name)
        bench = load_bench_model(model, tmp / "model", device=device, arguments=arguments,
                                 trust_code=trust_code, threads=threads)
        out, command, reason = tmp / "out", None, "as given"
        notes: list[str] = []
        if not bench.tiles:  # run refuses it: no tiles without a field or a halo
            notes.append(f"(b), (c): {bench.refused}; declare a halo (--halo PX or halo: in "
                         "the spec) to tile it")
            end_to_end = False
            if tile_size is None:
                tile_size, reason = min(size, RAW_SIZES[1]), "sliding windows only"
        if end_to_end or tile_size is None:
            t0 = time.perf_counter()
            scene = write_sample_scenes(tmp / "scene", size=size, count=1, seed=SCENE_SEED)[0].scene
            log(f"scene {size}x{size} written in {time.perf_counter() - t0:.1f} s")
            spec_path = bench.spec.path or Path(model)
            if tile_size is None:
                tile_size, reason = planned_tile_size(
                    _cli(scene, out, spec_path, None, workers, per_worker, device, trust_code))
                log(f"tile size {tile_size} px ({reason})")
            command = _cli(scene, out, spec_path, tile_size, workers, per_worker, device,
                           trust_code)
        result: dict[str, Any] = {
            "model": model, "device": device, "threads": threads, "size": size,
            "megapixels": size * size / 1e6, "tile_size": tile_size, "tile_reason": reason,
            "repeats": repeats, "workers": workers, "threads_per_worker": per_worker,
            "backend": bench.spec.backend, "notes": notes,
        }
        monitor = GpuMonitor() if cuda else None
        gpu: dict[str, Any] = {}
        with torch_threads(threads):
            _in_memory(bench, result, gpu, monitor, raw_sizes, repeats, log)
            result["runtimes"] = compare_runtimes(bench, [result["raw"]["best_size"]], threads,
                                                  repeats, log)
        if end_to_end and command is not None:
            log(f"(c) {' '.join(command[2:])}")
            gpu["run"] = {}
            with monitor.sample(gpu["run"]) if monitor else nullcontext():
                result["run"] = run_end_to_end(command, out, size * size)
        else:
            result["run"] = None
    result["ratios"] = ratios(result)
    result["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["gpu"] = gpu if cuda else "n/a"
    return result


def _in_memory(bench: BenchModel, result: dict[str, Any], gpu: dict[str, Any],
               monitor: GpuMonitor | None, raw_sizes: Sequence[int], repeats: int,
               log: Log) -> None:
    """Parts (a), (b) and (d), timed in interleaved rounds, and the deviations from
    whole-image logits, into ``result``; a part that does not apply to the model is None,
    with a note saying why."""
    size, tile, device = result["size"], result["tile_size"], bench.device
    notes: list[str] = result["notes"]
    inputs = raw_inputs(bench, raw_sizes)
    if not inputs:
        raise ModelError(f"{bench.name}: no raw size of {list(raw_sizes)} fits in memory")
    image = model_input(bench, render(SCENE_SEED, (0, size), (0, size), (size, size))[0])
    calls: dict[str, Callable[[], Any]] = {
        f"raw {k}": _forward(bench, x) for k, x in inputs.items()
    }
    if not bench.scores:
        notes.append("(b), (d): the graph gives labels, not scores; tiles and windows are "
                      "compared on scores")
    tiled_call = _tiled_call(bench, image, tile) if bench.tiles and bench.scores else None
    planning, tiles, overhead = 0.0, 0, 0.0
    if tiled_call is not None:
        start = time.perf_counter()
        grid = _grid(bench, image.shape, tile)  # predict_tiled does this each call
        planning, tiles, overhead = time.perf_counter() - start, len(grid), grid.overhead
        calls["tiled"] = tiled_call
    window = bench.window[0] if bench.window is not None else tile
    if bench.scores:
        calls["sliding"] = lambda: predict_sliding(bench, image, window)
    log(f"(a) raw forward at {', '.join(map(str, inputs))} px, (b) predict_tiled on {tiles} "
        f"tiles of {tile} px, (d) sliding {window} px windows: {repeats} interleaved rounds")
    with monitor.sample(gpu.setdefault("in_memory", {})) if monitor else nullcontext():
        timed = interleaved_best(calls, repeats, device)
    sizes = list(inputs)
    inputs.clear()

    speeds = {k: k * k / timed[f"raw {k}"]["seconds"] / 1e6 for k in sizes}
    best = max(speeds, key=speeds.__getitem__)
    result["raw"] = {"best_size": best, "mpx_per_s": speeds[best],
                     "by_size": {str(k): v for k, v in speeds.items()}}
    result["tiled"] = None if "tiled" not in calls else {
        "seconds": timed["tiled"]["seconds"], "tiles": tiles, "halo_overhead": overhead,
        "plan_seconds": planning}
    result["sliding"] = None if "sliding" not in calls else {
        "seconds": timed["sliding"]["seconds"], "window": min(window, size),
        "overlap": SLIDING_OVERLAP, "computed_ratio": timed["sliding"]["result"][1] / size**2}
    for part in ("tiled", "sliding"):
        if result[part] is not None:
            result[part]["mpx_per_s"] = size * size / result[part]["seconds"] / 1e6
    if device.startswith("cuda"):
        for name in ("tiled", "sliding", f"raw {best}"):
            if name in timed:
                gpu.setdefault(name.split()[0], {})["max_memory_allocated_bytes"] = int(
                    timed[name]["max_memory_allocated_bytes"])
    _deviations(bench, result, image, timed, tiled_call, window, log)


def _tiled_call(bench: BenchModel, image: np.ndarray, tile: int) -> Callable[[], np.ndarray]:
    """(b): the prediction core over ``image``: a torch module with its analysed field, a
    network with its probed field (or declared halo)."""
    if bench.module is not None:
        module, declared = bench.module, bench.halo
        return lambda: predict_tiled(module, image, tile_size=tile, halo=declared)
    assert bench.network is not None
    network, field, halo = bench.network, bench.field, bench.halo
    return lambda: predict_tiled(network, image, tile_size=tile, halo=halo, field=field,
                                 congruent=bench.congruent)


def _grid(bench: BenchModel, shape: tuple[int, ...], tile: int) -> Any:
    """The tiles :func:`_tiled_call` runs (to count them and their overhead)."""
    if bench.module is not None:
        return plan_tiles(bench.module, (shape[0], shape[1], shape[2]), tile, bench.halo)[0]
    from pipeline.grid import TileGrid

    assert bench.field is not None
    rows, cols = shape[1] // bench.field.stride[0], shape[2] // bench.field.stride[1]
    return TileGrid.build((shape[1], shape[2]), (rows, cols), bench.field, tile, bench.halo,
                          window=bench.window)


def _deviations(bench: BenchModel, result: dict[str, Any], image: np.ndarray,
                timed: Mapping[str, Mapping[str, Any]],
                tiled_call: Callable[[], np.ndarray] | None, window: int, log: Log) -> None:
    """The largest deviation of (b) and (d) from whole-image logits, on the largest crop
    that fits; None (with a note) where the network cannot take the whole image."""
    size = result["size"]
    result["deviation_crop"], result["whole_logit_range"] = None, None
    if not bench.scores:
        return
    if bench.window is not None:
        result["notes"].append(f"deviations: the graph takes only {bench.window[0]}x"
                               f"{bench.window[1]} px windows, so there is no whole-image "
                               "output to compare with")
        return
    crop = deviation_crop(bench, size)
    log(f"deviation from whole-image logits on {crop}x{crop} px")
    tiled = timed["tiled"]["result"] if tiled_call is not None else None
    sliding = timed["sliding"]["result"][0]
    if crop < size:
        image = np.ascontiguousarray(image[:, :crop, :crop])
        tiled = _tiled_call(bench, image, result["tile_size"])() if tiled_call else None
        sliding, _ = predict_sliding(bench, image, window)
    whole = whole_image(bench, image)
    result["deviation_crop"] = crop
    if tiled is not None:
        result["tiled"]["max_abs_deviation"] = _max_abs(tiled, whole)
    result["sliding"]["max_abs_deviation"] = _max_abs(sliding, whole)
    result["whole_logit_range"] = [float(whole.min()), float(whole.max())]


# --------------------------------------------------------------------------- runtimes

#: Why an ONNX spec is timed on ONNX Runtime only.
NO_TORCH_VERSION = ("no PyTorch version of an ONNX graph here (converting one needs "
                    "onnx2torch, which pulls torchvision)")


def export_onnx(module: nn.Module, channels: int, *, opset: int = 17) -> bytes:
    """``module`` as an ONNX graph, in memory: input ``x`` ``(N, channels, H, W)`` with N,
    H and W dynamic, output ``y``; torch's TorchScript-based exporter (``dynamo=False``),
    its deprecation and tracer warnings silenced.

    Raises:
        ModelError: the exporter fails (one line).
    """
    device = next((t.device for t in module.parameters()), torch.device("cpu"))
    example = torch.rand(1, channels, 64, 64, device=device)
    axes = {"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n"}}
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the TorchScript exporter writes to a file object; torch's stubs name paths only
            torch.onnx.export(module.eval(), (example,), buffer,  # type: ignore[arg-type]
                              dynamo=False,
                              opset_version=opset, input_names=["x"], output_names=["y"],
                              dynamic_axes=axes)
    except Exception as exc:  # the exporter fails in many ways on user models
        raise ModelError(f"the network could not be exported to ONNX: {_one_line(exc)}") \
            from None
    return buffer.getvalue()


def compare_runtimes(bench: BenchModel, sizes: Sequence[int], threads: int, repeats: int,
                     log: Log) -> dict[str, Any]:
    """ONNX Runtime against PyTorch on the same network and the same windows: a torch
    module is exported to ONNX in memory (:func:`export_onnx`) and both runtimes are timed
    in interleaved rounds with ``threads`` threads (best of ``repeats``); an ONNX graph is
    timed on ONNX Runtime only (:data:`NO_TORCH_VERSION`).

    Returns:
        ``window`` (px a side), ``threads``, ``torch`` and ``onnxruntime`` (Mpx/s, None
        where not timed), their ``per_core`` figures (Mpx/s per thread), the ratio
        ``onnxruntime_over_torch`` and a ``note`` where a runtime is missing.
    """
    figures: dict[str, Any] = {"window": None, "threads": threads, "torch": None,
                               "onnxruntime": None, "onnxruntime_over_torch": None,
                               "note": None}
    inputs = raw_inputs(bench, sizes)
    if not inputs:
        figures["note"] = "no window size fits in memory"
        return figures
    size = max(inputs)
    x = inputs[size]
    figures["window"] = size
    calls: dict[str, Callable[[], Any]] = {}
    if bench.module is not None:
        calls["torch"] = _forward(bench, x)
        try:
            graph = export_onnx(bench.module, bench.channels)
            ort: Network = OnnxNetwork(graph, device=bench.device, threads=threads,
                                       source=f"{bench.name} exported to ONNX")
        except ModelError as exc:
            figures["note"] = str(exc)
        else:
            array = x.cpu().numpy()
            calls["onnxruntime"] = lambda: ort.forward(array)
    else:
        figures["note"] = NO_TORCH_VERSION
        calls["onnxruntime"] = _forward(bench, x)
    log(f"runtimes: {' and '.join(calls)} on {size}x{size} px windows, {threads} threads")
    timed = interleaved_best(calls, repeats, bench.device)
    for name in calls:
        figures[name] = size * size / timed[name]["seconds"] / 1e6
    figures["per_core"] = {name: figures[name] / threads if figures[name] else None
                           for name in ("torch", "onnxruntime")}
    if figures["torch"] and figures["onnxruntime"]:
        figures["onnxruntime_over_torch"] = figures["onnxruntime"] / figures["torch"]
    return figures


def ratios(result: Mapping[str, Any]) -> dict[str, float | None]:
    """(c)/(a), (b)/(a), (c)/(d), (b)/(d) of the Mpx/s figures, and (c) on the run's own
    time (without start-up and shutdown) over (a) and (d); None where a part did not run."""
    raw = result["raw"]["mpx_per_s"]
    tiled = (result.get("tiled") or {}).get("mpx_per_s")
    sliding = (result.get("sliding") or {}).get("mpx_per_s")
    run = (result.get("run") or {}).get("mpx_per_s")
    scene = (result.get("run") or {}).get("scene_mpx_per_s")
    return {
        "run_over_raw": run / raw if run else None,
        "run_scene_over_raw": scene / raw if scene else None,
        "tiled_over_raw": tiled / raw if tiled else None,
        "run_over_sliding": run / sliding if run and sliding else None,
        "run_scene_over_sliding": scene / sliding if scene and sliding else None,
        "tiled_over_sliding": tiled / sliding if tiled and sliding else None,
    }


# --------------------------------------------------------------------------- the table


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec) if not isinstance(value, str) else value


def _mib(value: Any) -> str:
    return value if isinstance(value, str) else f"{value / 2**20:.0f} MiB"


def _deviation(part: Mapping[str, Any], crop: int | None) -> str:
    value = part.get("max_abs_deviation")
    return "" if value is None else f"; max |dev| {value:.2g} on {crop} px"


def render_throughput(result: Mapping[str, Any]) -> str:
    """The benchmark as a table, with ratios, runtimes, memory and (on CUDA) GPU figures;
    a part that did not apply says so (the notes say why)."""
    raw, tiled, sliding, run = result["raw"], result["tiled"], result["sliding"], result["run"]
    ratio = result["ratios"]
    crop = result["deviation_crop"]
    lines = [
        f"{result['model']} ({result.get('backend', 'torch')}) on {result['device']}, "
        f"{result['threads']} threads; scene {result['size']}x{result['size']} "
        f"({result['megapixels']:.1f} Mpx); tile {result['tile_size']} px "
        f"({result['tile_reason']})",
        f"{'part':<34} {'Mpx/s':>8} {'seconds':>8} {'x raw':>6}  notes",
        "-" * 100,
        f"{'(a) raw forward, in memory':<34} {raw['mpx_per_s']:>8.2f} {'':>8} {1:>6.2f}  "
        f"best at {raw['best_size']} px; no I/O, no halo",
    ]
    if tiled:
        lines.append(
            f"{'(b) exact tiled, in memory':<34} {tiled['mpx_per_s']:>8.2f} "
            f"{tiled['seconds']:>8.2f} {ratio['tiled_over_raw']:>6.2f}  {tiled['tiles']} tiles, "
            f"halo overhead {tiled['halo_overhead']:.3f}; planning {tiled['plan_seconds']:.2f} "
            f"s a call{_deviation(tiled, crop)}")
    else:
        lines.append(f"{'(b) exact tiled, in memory':<34} {'n/a':>8}  (see the notes)")
    if run:
        failed = "" if run["exit_code"] == 0 else f" EXIT {run['exit_code']};"
        lines.append(
            f"{'(c) fcn-pipeline run, end to end':<34} {_fmt(run['mpx_per_s']):>8} "
            f"{run['seconds']:>8.2f} {_fmt(ratio['run_over_raw']):>6}  {failed}"
            f" peak RSS {_mib(run['peak_rss_bytes'])}; "
            f"run's own time {_fmt(run['scene_seconds'], '.1f')} s "
            f"({_fmt(run['scene_mpx_per_s'])} Mpx/s); {result['workers']} workers x "
            f"{result['threads_per_worker']} threads")
        work = run.get("work_seconds")
        if work:
            lines.append(
                f"{'':<34} tasks' seconds: read {work['read']:.1f} (in reading threads), model "
                f"{work['model']:.1f}, write {work['write']:.1f}, publish {work['publish']:.1f}")
    else:
        lines.append(f"{'(c) fcn-pipeline run, end to end':<34} {'skipped':>8}")
    if sliding:
        lines.append(
            f"{'(d) sliding windows, 25 % overlap':<34} {sliding['mpx_per_s']:>8.2f} "
            f"{sliding['seconds']:>8.2f} {sliding['mpx_per_s'] / raw['mpx_per_s']:>6.2f}  "
            f"window {sliding['window']} px, {sliding['computed_ratio']:.3f} px computed per px"
            f"{_deviation(sliding, crop)}")
    else:
        lines.append(f"{'(d) sliding windows, 25 % overlap':<34} {'n/a':>8}  (see the notes)")
    lines += [
        f"ratios: (c)/(a) {_fmt(ratio['run_over_raw'])} (run's own time "
        f"{_fmt(ratio['run_scene_over_raw'])})  (b)/(a) {_fmt(ratio['tiled_over_raw'])}  "
        f"(c)/(d) {_fmt(ratio['run_over_sliding'])} (run's own time "
        f"{_fmt(ratio['run_scene_over_sliding'])})  (b)/(d) {_fmt(ratio['tiled_over_sliding'])}",
        "raw by input size: " + ", ".join(f"{k} px {v:.2f}" for k, v in raw["by_size"].items())
        + " Mpx/s",
    ]
    lines += _render_runtimes(result.get("runtimes"))
    logits = result["whole_logit_range"]
    where = (f"whole-image logits range {logits[0]:.3g} .. {logits[1]:.3g}; " if logits
             else "")
    lines.append(f"{where}peak RSS of this process (a, b, d) "
                 f"{_mib(result['process_peak_rss_bytes'])}")
    lines += [f"note: {note}" for note in result.get("notes", [])]
    gpu = result["gpu"]
    if isinstance(gpu, Mapping):
        for part, figures in gpu.items():
            util = figures.get("utilisation_percent", "n/a")
            lines.append(
                f"GPU {part}: max allocated "
                f"{_mib(figures.get('max_memory_allocated_bytes', 'n/a'))}"
                f", device memory used peak {_mib(figures.get('memory_used_peak_bytes', 'n/a'))}"
                f", utilisation {util if isinstance(util, str) else f'{util:.0f} %'}")
    lines.append("(c) seconds: wall time of the command (start-up, cluster, reading, writing the "
                 "Zarr store and COG); run's own time: from submitting tiles to the published COG")
    return "\n".join(lines)


def scaling_benchmark(model: str = "demo", *, size: int = 4096, workers: Sequence[int] = (1, 2),
                      tile_size: int | None = None, trust_code: bool = False,
                      workdir: Path | None = None, log: Log = print) -> list[dict[str, Any]]:
    """End-to-end ``run`` throughput with N single-threaded workers, and parallel efficiency.

    ``trust_code`` lets the spec's import path run (``--trust-spec-code``).

    Efficiency of N workers is their throughput over N times the throughput of one,
    measured on the run's own time (from submitting tiles to the published COG) and on
    the wall time of the whole command (which includes start-up).
    """
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=workdir, prefix="fcn-scaling-") as tmp_name:
        tmp = Path(tmp_name)
        bench = load_bench_model(model, tmp / "model", trust_code=trust_code)
        scene = write_sample_scenes(tmp / "scene", size=size, count=1, seed=SCENE_SEED)[0].scene
        spec_path = bench.spec.path or Path(model)
        for n in workers:
            out = tmp / f"out-{n}"
            command = _cli(scene, out, spec_path, tile_size, n, 1, "cpu", trust_code)
            log(f"scaling: {n} worker(s)")
            rows.append({"workers": n, **run_end_to_end(command, out, size * size)})
    base = rows[0]
    for row in rows:
        for key in ("mpx_per_s", "scene_mpx_per_s"):
            first, value = base.get(key), row.get(key)
            row[f"{key}_efficiency"] = (
                value / (first * row["workers"] / base["workers"]) if first and value else None)
    return rows


def _render_runtimes(runtimes: Mapping[str, Any] | None) -> list[str]:
    """The runtime comparison's lines (none when it was not made)."""
    if not runtimes:
        return []
    per_core = runtimes.get("per_core") or {}
    parts = [f"{name} {runtimes[name]:.2f} Mpx/s ({per_core[name]:.2f} per core)"
             for name in ("torch", "onnxruntime") if runtimes.get(name)]
    window = runtimes["window"]
    head = (f"runtimes on {window}x{window} px windows, {runtimes['threads']} threads: "
            if window else "runtimes: ")
    line = head + ("; ".join(parts) or "not timed")
    if runtimes.get("onnxruntime_over_torch"):
        line += f"; ONNX Runtime / PyTorch {runtimes['onnxruntime_over_torch']:.2f}"
    return [line] + ([f"runtimes: {runtimes['note']}"] if runtimes.get("note") else [])


def render_scaling(rows: Sequence[Mapping[str, Any]], size: int) -> str:
    """The scaling table."""
    lines = [f"end-to-end run of a {size}x{size} scene (demo model unless given), CPU workers "
             "of 1 thread each",
             f"{'workers':>7} {'wall s':>8} {'Mpx/s':>7} {'eff.':>5} {'run s':>7} {'Mpx/s':>7} "
             f"{'eff.':>5} {'peak RSS MiB':>13}"]
    for row in rows:
        lines.append(
            f"{row['workers']:>7} {row['seconds']:>8.1f} {_fmt(row['mpx_per_s']):>7} "
            f"{_fmt(row['mpx_per_s_efficiency']):>5} {_fmt(row['scene_seconds'], '.1f'):>7} "
            f"{_fmt(row['scene_mpx_per_s']):>7} {_fmt(row['scene_mpx_per_s_efficiency']):>5} "
            f"{row['peak_rss_bytes'] / 2**20:>13.0f}")
    lines.append("wall: the whole command (start-up included); run: the run's own time from "
                 "submitting tiles to the published COG; eff.: throughput / (N x one worker's)")
    return "\n".join(lines)
