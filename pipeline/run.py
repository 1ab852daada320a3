"""``run(config)``: check, plan every scene, run the Dask graph, publish, write the manifest.

A run goes through these steps:

1. :func:`pipeline.preflight.preflight` (no torch): usage errors, scene headers,
   content digests, output folder, files that must not be replaced;
2. the model is built and analysed; its input channels are checked against the
   spec's bands; each scene's output shape is checked; the tile size is chosen;
3. each scene's fingerprint (input content, model, settings) decides what to do:
   skip (published with this fingerprint), resume (work with this fingerprint:
   only tiles without a valid record), publish (every tile written), start, or a
   refusal (outputs made otherwise, without ``--overwrite``). ``--dry-run`` stops here;
4. the output folder is created and locked, the work prepared, the graph run;
5. SIGINT/SIGTERM (:mod:`pipeline.signals`) stop the tasks, record the scenes as
   ``interrupted`` and release the lock; a rerun resumes.
"""

from __future__ import annotations

import os
import platform
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline._version import __version__
from pipeline.actions import (
    PUBLISH,
    REFUSE,
    RESUME,
    SKIP,
    action_line,
    decide,
    fingerprint_values,
)
from pipeline.cluster import ClusterSpec, connect
from pipeline.config import RunConfig
from pipeline.errors import ConfigError, OutputError
from pipeline.exactness import Exactness, measure, sample_region
from pipeline.formats import VRT
from pipeline.graph import SceneJob, Waves, stop_tasks
from pipeline.grid import Box
from pipeline.journal import (
    FINGERPRINT_ATTR,
    WORK,
    WORKER_LOG,
    SceneRecord,
    clean_leftovers,
    fingerprint,
    locked,
    previous_history,
    previous_scenes,
    save_window_speeds,
    write_json,
    write_manifest,
)
from pipeline.modelspec import LABELS, fill_values
from pipeline.plan import MemoryEstimate, ScenePlan, TileChoice, describe
from pipeline.preflight import Preflight, SceneCheck, preflight, save_digests
from pipeline.report import Progress, RunReport, SceneResult, failed_report
from pipeline.signals import Interrupted, deferred
from pipeline.tasks import BatchStats, ModelRef, read_input
from pipeline.tiling import (
    AnalysedModel,
    Tiling,
    analyse_model,
    check_output_shape,
    check_task_memory,
    choose_tiles,
    default_budget,
    task_memory,
)
from pipeline.tls import tls_files
from pipeline.writers import LabelStoreSpec, create_label_store, create_overview_store

#: The plan text of a run none of whose scenes can run.
NO_SCENE = "no scene can run"
_VERSIONED = ("torch", "numpy", "dask", "distributed", "rasterio", "zarr")

def _resolve_device(device: str, remote: bool) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not remote and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked for, but torch sees no CUDA device on this machine "
            "(use --device cpu, or a --scheduler whose workers have GPUs)"
        )
    return device


def _versions() -> dict[str, str]:
    versions = {"fcn-pipeline": __version__, "python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def one_line(exc: BaseException) -> str:
    """An exception as one line: its first line, with its class name unless ours; a file
    error as its cause and the file."""
    if isinstance(exc, OSError) and not type(exc).__module__.startswith("pipeline.") \
            and exc.strerror:
        return f"{exc.strerror}" + (f" ({exc.filename})" if exc.filename else "")
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if type(exc).__module__.startswith("pipeline."):
        return first or type(exc).__name__
    return f"{type(exc).__name__}: {first}".strip()


@dataclass(frozen=True)
class _Scene:
    """One scene the run works on: its check, plan, fingerprint and action."""

    index: int
    check: SceneCheck
    plan: ScenePlan
    digest: str
    values: dict[str, Any]
    action: str


def _figures(result: SceneResult) -> dict[str, Any]:
    return {"seconds": result.seconds, "tiles": result.tiles, "inferred": result.inferred,
            "attempts": result.attempts, "work_seconds": result.work_seconds,
            "exactness": result.exactness}


def _apply_skip(result: SceneResult, scene: _Scene, out_dir: Path) -> None:
    """A skipped scene keeps the figures of the run that made its outputs."""
    record = SceneRecord(out_dir, scene.plan.outputs.stem).published_record()
    figures = dict(record.figures) if record is not None else {}
    result.status, result.skipped = "done", True
    result.tiles_done = result.tiles
    result.seconds = float(figures.get("seconds") or 0.0)
    result.inferred = int(figures.get("inferred") or 0)
    result.attempts = int(figures.get("attempts") or 0)
    result.work_seconds = dict(figures.get("work_seconds") or {})
    result.outputs = {"zarr": str(scene.plan.outputs.store), "cog": str(scene.plan.outputs.cog)}
    if record is not None:
        result.checksums = _checksums(record.cog, record.zarr)


def _checksums(cog: Any, zarr: Any) -> dict[str, dict[str, Any]]:
    return {"cog": {"sha256": cog.get("sha256"), "bytes": cog.get("bytes")},
            "zarr": {"sha256": zarr.get("sha256"), "files": len(zarr.get("files") or {})}}


def _plan_scenes(checked: Preflight, results: list[SceneResult], model: AnalysedModel,
                 config: RunConfig, device: str,
                 choice: TileChoice) -> tuple[list[_Scene], str | None]:
    """The scenes to work on, and the refusal of the run when some outputs in the output
    folder were made with another input, model or settings (without ``--overwrite``)."""
    scenes, conflicts = [], []
    for k, check in enumerate(checked.scenes):
        if check.info is None:
            continue
        grid = model.grid(check.info.shape, choice.size)
        plan = ScenePlan(check.info, grid, check.outputs)
        values = fingerprint_values(plan, check.digest, model.spec, model.sha256, config,
                                    device)
        digest = fingerprint(values)
        action, reason = decide(SceneRecord(checked.out_dir, check.outputs.stem), digest,
                                values, config.overwrite)
        results[k].shape, results[k].tiles = check.info.shape, len(grid)
        results[k].fingerprint = digest
        results[k].action = action
        if action == REFUSE:
            conflicts.append(f"{check.outputs.stem} ({reason})")
            results[k].error = reason
            continue
        scenes.append(_Scene(k, check, plan, digest, values, action))
    if not conflicts:
        return scenes, None
    return scenes, (
        f"{checked.out_dir} holds outputs or unfinished work of {', '.join(conflicts)}; pass "
        "--overwrite to replace them, or choose another --out")


def run(config: RunConfig, *, dry_run: bool = False,
        on_progress: Callable[[Progress], None] | None = None,
        on_dashboard: Callable[[str], None] | None = None,
        log: Callable[[str], None] | None = None,
        checked: Preflight | None = None) -> RunReport:
    """Label every scene of ``config``; never raises for a bad scene, only for bad settings.

    Args:
        config: The resolved configuration.
        dry_run: Plan, decide what each scene would need, and stop: nothing is written.
        on_progress: Called as tiles complete.
        on_dashboard: Called with the Dask dashboard's address, when there is one.
        log: Called with lines worth showing with ``--verbose``.
        checked: The result of :func:`pipeline.preflight.preflight` when already made.

    Returns:
        The report; ``interrupted`` is set when SIGINT or SIGTERM stopped the run after
        it had started writing (scenes then recorded as ``interrupted``).

    Raises:
        ConfigError, ModelError: usage errors (one line each).
        OutputError: the output folder or the manifest cannot be written.
        Interrupted: a stop signal before anything was written.
    """
    say = log or (lambda _: None)
    started = time.time()
    checked = checked or preflight(config)
    out_dir = checked.out_dir
    results = [SceneResult(scene=c.path, stem=c.outputs.stem,
                           status="failed" if c.error else "pending", error=c.error)
               for c in checked.scenes]
    if not checked.runnable:
        return failed_report([(r.scene, r.stem, r.error) for r in results], NO_SCENE)
    model = analyse_model(checked.spec, checked.weights_sha256,
                          trust_code=config.trust_spec_code, halo=config.halo)
    _check_layout(model, config)
    remote = bool(config.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS"))
    device = _resolve_device(config.device, remote)
    for check in checked.runnable:
        assert check.info is not None
        check_output_shape(check.info, model)
    infos = [c.info for c in checked.runnable if c.info is not None]
    tiling = choose_tiles(infos, config, model, device, out_dir,
                          [c.outputs.stem for c in checked.runnable])
    scenes, refusal = _plan_scenes(checked, results, model, config, device, tiling.choice)
    if refusal and not dry_run:
        raise ConfigError(refusal)
    plans = [s.plan for s in scenes]
    memory = check_task_memory(plans, model, config, device, tiling.choice.size)
    _exactness(scenes, results, model, config, tiling.choice.size, checked.out_dir)
    plan_text = describe(plans, model.field, memory, config.batch_size, tiling.choice,
                         model.method, model.halo)
    plan_text += "\n" + "\n".join(action_line(r.stem, r.action, r.error) for r in results)
    plan_text += "".join(f"\n{r.stem}: {r.exactness['summary']}" for r in results
                         if r.exactness and not r.exactness["exact"])
    plan_data = _plan_data(scenes, results, model, memory, tiling.choice, config)
    if dry_run:
        plan_data["refusal"] = refusal
        return RunReport(results, None, plan_text, plan=plan_data, refusal=refusal)
    for result in results:
        say(action_line(result.stem, result.action, result.error))
    return _execute(config, checked, scenes, results, model, device, tiling, plan_text,
                    plan_data, started, on_progress, on_dashboard, say)


def _check_layout(model: AnalysedModel, config: RunConfig) -> None:
    """Raise :class:`ConfigError` for settings a network that gives labels cannot serve:
    blending and probabilities need class scores."""
    if model.network.signature.output != LABELS:
        return
    asked = [what for what, on in (("--stitch blend", config.stitch == "blend"),
                                   ("--probabilities", config.probabilities)) if on]
    if asked:
        raise ConfigError(f"{model.spec.source}: the network gives labels, not class scores: "
                          f"{' and '.join(asked)} need scores; run without them")


def _exactness(scenes: list[_Scene], results: list[SceneResult], model: AnalysedModel,
               config: RunConfig, tile: int, out_dir: Path) -> None:
    """Each planned scene's exactness: exact for a derived field; for a declared halo,
    the deviation measured on the scene's sample region (a skipped scene keeps what the
    run that made it measured)."""
    for scene in scenes:
        result = results[scene.index]
        if model.exact:
            result.exactness = model.exactness().to_json()
            continue
        if scene.action == SKIP:
            record = SceneRecord(out_dir, scene.plan.outputs.stem).published_record()
            kept = (record.figures or {}).get("exactness") if record is not None else None
            if kept:
                result.exactness = dict(kept)
                continue
        result.exactness = _measure(scene, model, config, tile).to_json()


def _measure(scene: _Scene, model: AnalysedModel, config: RunConfig, tile: int) -> Exactness:
    """The deviation of the tiled prediction from one window on the scene's sample region
    (:func:`pipeline.exactness.measure`), on this process's copy of the network; the region
    shrinks until one window over it fits the memory budget of a CPU task."""
    info = scene.plan.info
    spec = model.spec
    budget = default_budget(config, "cpu")  # the measurement runs here, on the CPU

    def fits(shape: tuple[int, int]) -> bool:
        return task_memory(model, [info], shape, 1).total <= budget

    region = sample_region(info.shape, scene.plan.grid.tile_shape, fits)

    def read(window: Box) -> tuple[np.ndarray, np.ndarray]:
        return read_input(spec, info.path, window, allow_vrt=info.driver == VRT)

    return measure(model.network, model.field, model.halo, tile, region, read,
                   classes=len(spec.classes), fill=fill_values(spec, np.float32),
                   stitch=config.stitch, method=model.method, scene_shape=info.shape,
                   source=spec.source)


def _plan_data(scenes: list[_Scene], results: list[SceneResult], model: AnalysedModel,
               memory: MemoryEstimate, choice: TileChoice, config: RunConfig) -> dict[str, Any]:
    halo = model.halo
    return {
        "tile_size": choice.size, "tile_reason": choice.reason,
        "receptive_field": list(model.field.size), "stride": list(model.field.stride),
        "align": list(model.field.align),
        "halo": {"before": list(halo.before), "after": list(halo.after)},
        "method": model.method, "exact": model.exact, "stitch": config.stitch,
        "window": list(model.window) if model.window else None,
        "memory_per_task_bytes": memory.total,
        "scenes": [
            {"scene": r.scene, "stem": r.stem, "status": r.status, "error": r.error,
             "action": r.action,
             "width": r.shape[1] if r.shape else None, "height": r.shape[0] if r.shape else None,
             "tiles": r.tiles, "exactness": r.exactness,
             "outputs": {"zarr": str(s.plan.outputs.store), "cog": str(s.plan.outputs.cog)}
             if (s := next((x for x in scenes if x.index == k), None)) else {}}
            for k, r in enumerate(results)
        ],
    }


def _prepare(scene: _Scene, model: AnalysedModel, config: RunConfig, out_dir: Path,
             say: Callable[[str], None]) -> frozenset[tuple[int, int]]:
    """Make the scene's work ready for its action; the tiles already written (to skip)."""
    record = SceneRecord(out_dir, scene.plan.outputs.stem)
    if scene.action == PUBLISH:  # the publication checks (or has checked) the chunks
        return frozenset()
    if scene.action == RESUME:
        record.drop_partial_chunks()
        good, damaged = record.verified_tiles()
        for line in damaged:
            say(f"{record.stem}: {line}: computed again")
        return frozenset(good)
    record.start()
    spec = _store_spec(scene.plan, model, config, scene.digest)
    create_label_store(record.store, spec)
    levels = scene.plan.overview_levels()
    if levels:
        create_overview_store(record.overviews, spec.shape, spec.chunks, levels,
                              spec.dtype, spec.nodata)
    record.commit(scene.digest, scene.values, scene.check.path)
    return frozenset()


def _execute(config: RunConfig, checked: Preflight, scenes: list[_Scene],
             results: list[SceneResult], model: AnalysedModel, device: str, tiling: Tiling,
             plan_text: str, plan_data: dict[str, Any], started: float,
             on_progress: Callable[[Progress], None] | None,
             on_dashboard: Callable[[str], None] | None,
             say: Callable[[str], None]) -> RunReport:
    """Steps 4 and 5 of the module docstring: everything that writes."""
    out_dir = checked.out_dir
    run_id = uuid.uuid4().hex[:16]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {out_dir}: "
                          f"{exc.strerror or exc}") from exc
    history = previous_history(out_dir)
    others = [s for s in previous_scenes(out_dir) if s["stem"] not in {r.stem for r in results}]
    state: dict[str, Any] = {"status": "running", "interrupted": None, "dashboard": None}

    def save() -> None:
        """Write the manifest; when it cannot be (disk full) the run goes on and reports
        its scenes and this error at the end (exit 1); a later write may succeed."""
        with deferred():
            try:
                write_manifest(out_dir, _manifest(config, model, device, started, results,
                                                  run_id, history, state, others))
            except OutputError as exc:
                state["manifest_error"] = str(exc)
            else:
                state["manifest_error"] = None

    try:
        with locked(out_dir, run_id):
            try:
                _work(config, checked, scenes, results, model, device, tiling, run_id, state,
                      save, on_progress, on_dashboard, say)
            except Interrupted as exc:
                state["interrupted"] = exc.signum
            finally:
                with deferred():
                    for result in results:
                        if result.status in ("pending", "running"):
                            result.status = "interrupted" if state["interrupted"] else "failed"
                            result.error = result.error or (
                                f"interrupted by {_signal_name(state['interrupted'])}"
                                if state["interrupted"] else "the run ended before this scene")
                    state["status"] = ("interrupted" if state["interrupted"] else
                                       "failed" if any(r.status == "failed" for r in results)
                                       else "done")
                    save()
    except OSError as exc:
        if isinstance(exc, OutputError):
            raise
        raise OutputError(f"cannot write in the output folder {out_dir}: "
                          f"{exc.strerror or exc}") from exc
    return RunReport(results, out_dir / "run.json", plan_text, state["dashboard"],
                     state["interrupted"], plan_data,
                     manifest_error=state.get("manifest_error"))


def _signal_name(signum: int | None) -> str:
    import signal

    return signal.Signals(signum).name if signum else "a signal"


def _work(config: RunConfig, checked: Preflight, scenes: list[_Scene],
          results: list[SceneResult], model: AnalysedModel, device: str, tiling: Tiling,
          run_id: str, state: dict[str, Any], save: Callable[[], None],
          on_progress: Callable[[Progress], None] | None,
          on_dashboard: Callable[[str], None] | None, say: Callable[[str], None]) -> None:
    out_dir = checked.out_dir
    clean_leftovers(out_dir)
    save_digests(checked)
    if tiling.measured is not None and tiling.speeds_key is not None:
        save_window_speeds(out_dir, tiling.speeds_key, tiling.measured)
    jobs: dict[int, SceneJob] = {}
    for scene in scenes:
        result = results[scene.index]
        if scene.action == SKIP:
            # A work folder beside published outputs was being removed when a run was
            # killed, or belongs to settings given up since: the outputs stand.
            SceneRecord(out_dir, scene.plan.outputs.stem).discard_work()
            _apply_skip(result, scene, out_dir)
            continue
        try:
            skip = _prepare(scene, model, config, out_dir, say)
        except OSError as exc:
            result.status, result.error = "failed", one_line(exc)
            continue
        record = SceneRecord(out_dir, scene.plan.outputs.stem)
        result.attempts = record.add_attempt()
        result.tiles_done = len(skip)
        result.status = "running"
        assert scene.check.identity is not None
        jobs[scene.index] = SceneJob(scene.plan, str(out_dir), run_id, scene.digest,
                                     scene.check.identity, skip,
                                     publish_only=scene.action == PUBLISH
                                     or len(skip) == len(scene.plan.grid))
    save()
    if not jobs:
        return
    model_ref = ModelRef(
        str(model.spec.path), model.sha256, device, config.threads_per_worker,
        precision=config.precision,
        channels_last=device == "cuda" if config.channels_last is None else config.channels_last,
        compile=config.compile, trust_code=config.trust_spec_code,
        batch_size=config.batch_size, stitch=config.stitch,
    )
    gpu = device == "cuda" if config.gpu_resource is None else config.gpu_resource
    cluster = ClusterSpec(config.scheduler, config.workers, config.threads_per_worker, gpu=gpu,
                          worker_log=str(out_dir / WORK / WORKER_LOG), listen=config.listen,
                          tls=tls_files(config.tls_ca_file, config.tls_cert, config.tls_key))
    with connect(cluster) as client:
        info = client.scheduler_info()
        say(f"Dask scheduler: {info.get('address')}")
        services = info.get("services", {})
        dashboard = client.dashboard_link if "dashboard" in services else None
        state["dashboard"] = dashboard
        if dashboard and on_dashboard:
            on_dashboard(dashboard)
        waves = Waves(client, jobs, model_ref, batch_size=config.batch_size,
                      probabilities=config.probabilities, gpu=gpu)
        try:
            _track(waves, jobs, results, time.time(), on_progress, save, out_dir)
        except Interrupted:
            with deferred():
                if cluster.address():  # an embedded cluster's workers die with it
                    stop_tasks(client, waves.in_flight())
            raise


def _manifest(config: RunConfig, model: AnalysedModel, device: str, started: float,
              results: list[SceneResult], run_id: str, history: list[dict[str, Any]],
              state: dict[str, Any], others: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest: this run's settings and scenes, then the folder's other scenes as
    earlier runs recorded them, and the history of runs."""
    counts: dict[str, int] = {}
    for r in results:
        key = "skipped" if r.skipped else r.status
        counts[key] = counts.get(key, 0) + 1
    this = {"run_id": run_id, "started": started, "updated": time.time(),
            "status": state["status"], "scenes": counts}
    return {
        "fcn_pipeline": __version__,
        "run_id": run_id,
        "started": started,
        "updated": time.time(),
        "status": state["status"],
        "config": config.to_tree(),
        "device": device,
        "model": {
            "spec": str(model.spec.path), "name": model.spec.name, "sha256": model.sha256,
            "receptive_field": asdict(model.field),
            "method": model.method, "halo": asdict(model.halo),
            "window": list(model.window) if model.window else None,
        },
        "versions": _versions(),
        "scenes": [asdict(r) for r in results] + others,
        "history": [*history[-199:], this],
    }


def _store_spec(plan: ScenePlan, model: AnalysedModel, config: RunConfig,
                digest: str) -> LabelStoreSpec:
    info = plan.info
    return LabelStoreSpec(
        shape=info.shape,
        chunks=(min(plan.grid.tile_shape[0], info.shape[0]),
                min(plan.grid.tile_shape[1], info.shape[1])),
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


def _track(waves: Waves, jobs: dict[int, SceneJob], results: list[SceneResult],
           started: float, on_progress: Callable[[Progress], None] | None,
           on_scene: Callable[[], None], out_dir: Path) -> None:
    """Follow every task of ``waves`` to its end, updating results and reporting progress."""
    for k in jobs:
        results[k].status = "running"
    total = sum(len(job.plan.grid) for job in jobs.values())
    done_tiles = sum(results[k].tiles_done for k in jobs)
    done_pixels = 0
    sums = {k: BatchStats(0, 0, 0, 0.0) for k in jobs}
    for ended in waves:
        k, future = ended.scene, ended.future
        result = results[k]
        if future.status == "cancelled" or result.status == "done":
            continue  # a scene already published: nothing it does any more matters
        if future.status == "error":
            if result.status != "failed":  # its other tasks are cancelled by the waves
                result.status = "failed"
                result.error = one_line(future.exception())
                on_scene()
            continue
        stats = future.result()
        if ended.publish:
            _finish_scene(result, sums[k], stats, started, jobs[k].plan, out_dir)
            on_scene()
            continue
        sums[k] = sums[k].plus(stats)
        result.tiles_done += stats.tiles
        done_tiles += stats.tiles
        done_pixels += stats.pixels
        if on_progress:
            on_progress(Progress(done_tiles, total, done_pixels, time.time() - started))


def _finish_scene(result: SceneResult, tiles: BatchStats, publication: BatchStats,
                  started: float, plan: ScenePlan, out_dir: Path) -> None:
    """Record a published scene: its figures (``tiles``: its tile tasks' stats summed),
    outputs and checksums, also in its record."""
    result.inferred += tiles.inferred
    result.seconds = time.time() - started
    result.work_seconds = {
        "read": round(tiles.read_seconds, 3), "model": round(tiles.model_seconds, 3),
        "write": round(tiles.write_seconds, 3), "publish": round(publication.seconds, 3),
    }
    result.status = "done"
    result.tiles_done = result.tiles
    result.outputs = {"zarr": str(plan.outputs.store), "cog": str(plan.outputs.cog)}
    record = SceneRecord(out_dir, plan.outputs.stem)
    published = record.published_record()
    if published is None:
        return
    result.checksums = _checksums(published.cog, published.zarr)
    data = published.to_json()
    data["figures"] = _figures(result)
    try:
        write_json(record.published_record_path, data)
    except OSError:
        pass  # the figures are a convenience; the record itself is in place


