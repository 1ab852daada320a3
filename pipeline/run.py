"""``run(config)``: plan every scene, run the Dask graph, publish outputs, write the manifest."""

from __future__ import annotations

import glob
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
import torch
from distributed import as_completed

from pipeline._version import __version__
from pipeline.analysis import receptive_field
from pipeline.cluster import ClusterSpec, connect, default_workers
from pipeline.config import RunConfig
from pipeline.errors import ConfigError, ModelError, PipelineError
from pipeline.graph import SceneFutures, submit_scene
from pipeline.grid import TileGrid
from pipeline.inference import activation_bytes, output_shape, weight_bytes, window_speeds
from pipeline.journal import (
    FINGERPRINT_ATTR,
    SceneRecord,
    clean_leftovers,
    fingerprint,
    load_window_speeds,
    locked,
    save_window_speeds,
    write_manifest,
)
from pipeline.model import build_model
from pipeline.modelspec import ModelSpec, load_spec, verify_weights
from pipeline.plan import (
    TILE_CANDIDATES,
    MemoryEstimate,
    ScenePlan,
    TileChoice,
    check_unique,
    choose_tile_size,
    describe,
    outputs_for,
)
from pipeline.receptive import align_up
from pipeline.scene import SceneInfo
from pipeline.readers import check_bands, open_scene
from pipeline.receptive import ReceptiveField
from pipeline.tasks import ModelRef
from pipeline.writers import LabelStoreSpec, create_label_store, create_overview_store

MANIFEST = "run.json"
_VERSIONED = ("torch", "numpy", "dask", "distributed", "rasterio", "zarr")


@dataclass
class SceneResult:
    """What happened to one scene."""

    scene: str
    stem: str
    shape: tuple[int, int] | None = None
    tiles: int = 0
    tiles_done: int = 0
    inferred: int = 0
    seconds: float = 0.0
    status: str = "pending"
    error: str | None = None
    attempts: int = 0
    skipped: bool = False
    outputs: dict[str, str] = field(default_factory=dict)
    #: Seconds the scene's tasks spent reading windows, running the model, writing
    #: chunks, and publishing (COG and store), summed over tasks and reading threads.
    work_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def megapixels_per_second(self) -> float:
        if not self.shape or not self.seconds:
            return 0.0
        return self.shape[0] * self.shape[1] / 1e6 / self.seconds


@dataclass(frozen=True)
class Progress:
    """A progress event: tiles and pixels done so far."""

    tiles_done: int
    tiles_total: int
    pixels_done: int
    elapsed: float


@dataclass
class RunReport:
    """The outcome of a run."""

    scenes: list[SceneResult]
    manifest: Path | None
    plan_text: str
    dashboard: str | None = None

    @property
    def ok(self) -> bool:
        return all(s.status == "done" for s in self.scenes)


def expand_scenes(patterns: tuple[str, ...]) -> list[str]:
    """Scene paths from paths and glob patterns, in order, without repeats.

    A pattern that matches nothing is kept as a path, so the scene fails
    with a clear "no such file" rather than vanishing.
    """
    if not patterns:
        raise ConfigError("no scenes given: pass scene files or patterns, or set scenes in a workflow")
    seen: dict[str, None] = {}
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        for path in matches or [pattern]:
            seen.setdefault(path, None)
    return list(seen)


def _resolve_device(device: str, remote: bool) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not remote and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked for, but torch sees no CUDA device on this machine "
            "(use --device cpu, or a --scheduler whose workers have GPUs)"
        )
    return device


@dataclass(frozen=True)
class _Model:
    spec: ModelSpec
    sha256: str
    field: ReceptiveField
    module: torch.nn.Module


def _load_model(source: str) -> _Model:
    spec = load_spec(source)
    digest = verify_weights(spec)
    module = build_model(spec)
    return _Model(spec, digest, receptive_field(module), module)


def _open_scene(path: str, config: RunConfig, model: _Model) -> SceneInfo:
    info = open_scene(path, allow_no_crs=config.allow_no_crs)
    check_bands(info, model.spec.bands, model.spec.dtypes)
    channels = len(model.spec.bands)
    shape = output_shape(model.module, (channels, *info.shape))
    if tuple(shape[1:]) != info.shape:
        raise ModelError(
            f"{model.spec.source}: the model gives a {shape[1]}x{shape[2]} output for the "
            f"{info.shape[0]}x{info.shape[1]} scene {Path(path).name}; label maps need an output "
            "at the scene's resolution (upsample in the model)"
        )
    return info


def _memory(model: _Model, window: tuple[int, int], batch_size: int) -> MemoryEstimate:
    """Peak bytes of one inference task on windows of ``window`` pixels."""
    channels = len(model.spec.bands)
    rows, cols = window
    classes = len(model.spec.classes)
    # Per pixel: raw values (up to 8 bytes a band), the float32 model input, the
    # logits and their crop, the labels and the masks.
    per_pixel = channels * (8 + 4) + classes * 4 * 2 + 8 + 2
    return MemoryEstimate(
        window_input=batch_size * rows * cols * per_pixel,
        activations=activation_bytes(model.module, (channels, rows, cols), batch_size),
        weights=weight_bytes(model.module),
    )


#: Default cap of one CPU task's memory: beyond tiles of a few thousand pixels the halo
#: overhead hardly falls, while memory keeps growing with the tile's area.
CPU_TASK_BUDGET = 512 * 2**20


def _default_budget(config: RunConfig, device: str) -> int:
    """A safe share of a worker's memory: 60 % of the GPU; on CPUs 60 % of the RAM
    split between workers, at most :data:`CPU_TASK_BUDGET`."""
    if config.memory_budget:
        return config.memory_budget
    if device == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory * 0.6)
    workers = config.workers or default_workers(config.threads_per_worker, gpu=False)
    return min(CPU_TASK_BUDGET, int(psutil.virtual_memory().total * 0.6 / workers))


@dataclass(frozen=True)
class _Tiling:
    """The tile choice and, where they were measured now, the window speeds behind it."""

    choice: TileChoice
    speeds_key: str | None = None
    measured: dict[tuple[int, int], float] | None = None


def _speed_lookup(speeds: dict[tuple[int, int], float]) -> Callable[[tuple[int, int]], float]:
    """Speed of a window: as measured, else that of the largest measured window not
    bigger (beyond the measured sizes the last speed is assumed to hold)."""
    ordered = sorted(speeds, key=lambda s: s[0] * s[1])

    def speed(window: tuple[int, int]) -> float:
        if window in speeds:
            return speeds[window]
        smaller = [s for s in ordered if s[0] * s[1] <= window[0] * window[1]]
        return speeds[smaller[-1] if smaller else ordered[0]]

    return speed


def _choose_tiles(infos: list[SceneInfo], config: RunConfig, model: _Model,
                  device: str, out_dir: Path) -> _Tiling:
    if config.tile_size is not None:
        return _Tiling(TileChoice(config.tile_size, "as given"))
    workers = config.workers or default_workers(config.threads_per_worker, device == "cuda")
    field = model.field
    halo = field.halo()
    budget = _default_budget(config, device)

    def window(tile: int) -> tuple[int, int]:
        return tuple(align_up(tile + halo.before[k] + halo.after[k], field.align[k])  # type: ignore[return-value]
                     for k in (0, 1))

    def memory_of(tile: int) -> int:
        return _memory(model, window(tile), config.batch_size).total

    shapes = [i.shape for i in infos]
    if device != "cpu" or not shapes:
        # GPUs run bigger windows no slower per pixel; the client may not even have one.
        return _Tiling(choose_tile_size(shapes, field, workers, memory_of, budget))
    key = fingerprint({"model_sha256": model.sha256, "device": device,
                       "threads_per_worker": config.threads_per_worker})
    speeds = load_window_speeds(out_dir, key)
    measured = None
    if speeds is None:
        largest = max(max(s) for s in shapes)
        windows = [window(t) for t in TILE_CANDIDATES
                   if t <= align_up(largest, max(field.align)) and memory_of(t) <= budget]
        speeds = measured = window_speeds(model.module, len(model.spec.bands),
                                          windows or [window(TILE_CANDIDATES[0])],
                                          config.threads_per_worker)
    lookup = _speed_lookup(speeds)
    choice = choose_tile_size(shapes, field, workers, memory_of, budget,
                              speed_of=lambda tile: lookup(window(tile)))
    return _Tiling(choice, key, measured)


def _versions() -> dict[str, str]:
    versions = {"fcn-pipeline": __version__, "python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def _fingerprint_values(plan: ScenePlan, model: _Model, config: RunConfig,
                        device: str) -> dict[str, Any]:
    info = plan.info
    return {
        "scene": info.path, "size_bytes": info.size_bytes, "mtime_ns": info.mtime_ns,
        "shape": list(info.shape), "model_sha256": model.sha256, "model_name": model.spec.name,
        "bands": list(model.spec.bands), "tile_shape": list(plan.grid.tile_shape),
        "halo": asdict(plan.grid.halo), "probabilities": config.probabilities, "device": device,
        "precision": config.precision,
    }


@dataclass(frozen=True)
class _Work:
    """What is left to do for one scene."""

    record: SceneRecord
    digest: str
    skip: frozenset[tuple[int, int]]


def _prepare_work(plans: dict[int, ScenePlan], results: list[SceneResult], model: _Model,
                  config: RunConfig, device: str, out_dir: Path) -> dict[int, _Work]:
    """Decide per scene: already published, resume, or start; refuse changed settings."""
    work: dict[int, _Work] = {}
    conflicts = []
    for k, plan in plans.items():
        record = SceneRecord(out_dir, plan.outputs.stem)
        values = _fingerprint_values(plan, model, config, device)
        digest = fingerprint(values)
        published, started = record.published_fingerprint(), record.work_fingerprint()
        if published == digest:
            # Published stores are complete (they are moved into place last); a work
            # folder left beside one was being removed when a run was killed.
            record.discard_work()
            results[k].status, results[k].skipped = "done", True
            results[k].tiles_done = results[k].tiles
            results[k].outputs = {"zarr": str(plan.outputs.store), "cog": str(plan.outputs.cog)}
            continue
        stale = [f for f in (published, started) if f is not None and f != digest]
        if stale and not config.overwrite:
            conflicts.append(plan.outputs.stem)
            continue
        if stale:
            record.discard_published()
        if started == digest and record.store_complete():
            record.drop_partial_chunks()
            skip = frozenset(record.tiles_done())
        else:
            record.start()
            spec = _store_spec(plan, model, config, digest)
            create_label_store(record.store, spec)
            levels = plan.overview_levels()
            if levels:
                create_overview_store(record.overviews, spec.shape, spec.chunks, levels,
                                      spec.dtype, spec.nodata)
            record.commit(digest, values)
            skip = frozenset()
        work[k] = _Work(record, digest, skip)
    if conflicts:
        raise ConfigError(
            f"{out_dir} holds outputs or unfinished work of {', '.join(conflicts)} made with "
            "another input, model or settings; pass --overwrite to replace them, or choose "
            "another --out"
        )
    return work


def run(config: RunConfig, *, dry_run: bool = False,
        on_progress: Callable[[Progress], None] | None = None,
        on_dashboard: Callable[[str], None] | None = None) -> RunReport:
    """Label every scene of ``config``; never raises for a bad scene, only for bad settings.

    Scenes already published with the same fingerprint are skipped, unfinished
    ones resume from their recorded tiles.
    """
    if not config.output:
        raise ConfigError("no output directory: pass --out DIR or set output in a workflow")
    started = time.time()
    out_dir = Path(config.output).absolute()
    paths = expand_scenes(config.scenes)
    model = _load_model(config.model)
    remote = bool(config.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS"))
    device = _resolve_device(config.device, remote)
    outputs = [outputs_for(p, out_dir) for p in paths]
    check_unique(outputs, paths)

    results = [SceneResult(scene=p, stem=o.stem) for p, o in zip(paths, outputs)]
    infos: dict[int, SceneInfo] = {}
    for k, (path, result) in enumerate(zip(paths, results)):
        try:
            infos[k] = _open_scene(path, config, model)
        except PipelineError as exc:
            result.status, result.error = "failed", str(exc)
    tiling = _choose_tiles(list(infos.values()), config, model, device, out_dir)
    choice = tiling.choice
    plans: dict[int, ScenePlan] = {}
    for k, info in infos.items():
        grid = TileGrid.build(info.shape, info.shape, model.field, choice.size)
        plans[k] = ScenePlan(info, grid, outputs[k])
        results[k].shape = info.shape
        results[k].tiles = len(grid)
    window = max((p.grid.max_window_shape for p in plans.values()),
                 key=lambda s: s[0] * s[1], default=(choice.size, choice.size))
    plan_text = describe(list(plans.values()), model.field,
                         _memory(model, window, config.batch_size), config.batch_size, choice)
    if dry_run:
        return RunReport(results, None, plan_text)

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / MANIFEST

    def save() -> None:
        write_manifest(manifest, _manifest(config, model, device, started, results))

    with locked(out_dir):
        clean_leftovers(out_dir)
        if tiling.measured is not None and tiling.speeds_key is not None:
            save_window_speeds(out_dir, tiling.speeds_key, tiling.measured)
        work = _prepare_work(plans, results, model, config, device, out_dir)
        for k, item in work.items():
            results[k].attempts = item.record.add_attempt()
            results[k].tiles_done = len(item.skip)
            results[k].status = "running"
        save()
        dashboard = None
        if work:
            model_ref = ModelRef(
                str(model.spec.path), model.sha256, device, config.threads_per_worker,
                precision=config.precision,
                channels_last=device == "cuda" if config.channels_last is None else config.channels_last,
                compile=config.compile,
            )
            gpu = device == "cuda" if config.gpu_resource is None else config.gpu_resource
            cluster = ClusterSpec(config.scheduler, config.workers, config.threads_per_worker,
                                  gpu=gpu)
            with connect(cluster) as client:
                services = client.scheduler_info().get("services", {})
                dashboard = client.dashboard_link if "dashboard" in services else None
                if dashboard and on_dashboard:
                    on_dashboard(dashboard)
                submitted = {
                    k: submit_scene(client, plans[k], model_ref, item.record,
                                    batch_size=config.batch_size,
                                    probabilities=config.probabilities,
                                    gpu=gpu, skip=item.skip)
                    for k, item in work.items()
                }
                _track(submitted, results, time.time(), on_progress, save)
        for k, plan in plans.items():
            if results[k].status == "done":
                results[k].outputs = {"zarr": str(plan.outputs.store), "cog": str(plan.outputs.cog)}
        save()
    return RunReport(results, manifest, plan_text, dashboard)


def _manifest(config: RunConfig, model: _Model, device: str, started: float,
              results: list[SceneResult]) -> dict[str, Any]:
    return {
        "fcn_pipeline": __version__,
        "started": started,
        "updated": time.time(),
        "config": config.to_tree(),
        "device": device,
        "model": {
            "spec": str(model.spec.path), "name": model.spec.name, "sha256": model.sha256,
            "receptive_field": asdict(model.field),
        },
        "versions": _versions(),
        "scenes": [asdict(r) for r in results],
    }


def _store_spec(plan: ScenePlan, model: _Model, config: RunConfig, digest: str) -> LabelStoreSpec:
    info = plan.info
    return LabelStoreSpec(
        shape=info.shape,
        chunks=tuple(min(t, n) for t, n in zip(plan.grid.tile_shape, info.shape)),  # type: ignore[arg-type]
        crs=info.crs,
        transform=info.transform,
        classes=model.spec.classes,
        nodata=model.spec.nodata_output,
        probabilities=config.probabilities,
        attrs={
            "fcn_pipeline": __version__,
            "scene": info.path,
            "model": model.spec.name,
            "model_sha256": model.sha256,
            "tile_size": plan.grid.tile_shape[0],
            "halo": asdict(plan.grid.halo),
            FINGERPRINT_ATTR: digest,
        },
    )


def _track(submitted: dict[int, SceneFutures], results: list[SceneResult], started: float,
           on_progress: Callable[[Progress], None] | None,
           on_scene: Callable[[], None]) -> None:
    """Follow every future to its end, updating results and reporting progress."""
    owner: dict[str, tuple[int, int | None]] = {}
    futures = []
    for k, scene in submitted.items():
        for b, future in enumerate(scene.tiles):
            owner[future.key] = (k, b)
            futures.append(future)
        owner[scene.publish.key] = (k, None)
        futures.append(scene.publish)
        results[k].status = "running"
    total = sum(len(s.plan.grid) for s in submitted.values())
    done_tiles = sum(results[k].tiles_done for k in submitted)
    done_pixels = 0
    scene_start = {k: started for k in submitted}
    for future in as_completed(futures):
        k, batch = owner[future.key]
        result = results[k]
        if future.status == "cancelled":
            continue
        if future.status == "error":
            if result.status != "failed":
                result.status = "failed"
                result.error = _one_line(future.exception())
                scene = submitted[k]
                for pending in (*scene.tiles, scene.publish):  # the scene has failed: stop it
                    if not pending.done():
                        pending.cancel()
                on_scene()
            continue
        if batch is None:
            stats = future.result()
            result.inferred += stats.inferred
            result.seconds = time.time() - scene_start[k]
            result.work_seconds = {
                "read": round(stats.read_seconds, 3), "model": round(stats.model_seconds, 3),
                "write": round(stats.write_seconds, 3), "publish": round(stats.seconds, 3),
            }
            result.status = "done"
            on_scene()
            continue
        stats = future.result()
        result.tiles_done += stats.tiles
        done_tiles += stats.tiles
        done_pixels += stats.pixels
        if on_progress:
            on_progress(Progress(done_tiles, total, done_pixels, time.time() - started))
