"""The Dask graph: bounded waves, deterministic keys, one chunk per task, GPU resource
requests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import zarr
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin

from pipeline.analysis import receptive_field
from pipeline.graph import Finished, SceneJob, Waves, scene_token
from pipeline.grid import TileGrid
from pipeline.journal import FileIdentity, SceneRecord, locked
from pipeline.modelspec import load_spec
from pipeline.plan import ScenePlan, outputs_for
from pipeline.readers import open_scene
from pipeline.samples import write_sample_scenes
from pipeline.tasks import ModelRef
from pipeline.throughput import write_builtin_spec
from pipeline.writers import LabelStoreSpec, create_label_store


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 2-level U-Net of 4 classes with random weights: its spec and weights' sha256."""
    path = write_builtin_spec("unet-small", tmp_path_factory.mktemp("spec"),
                              {"base": 2, "depth": 2})
    digest = load_spec(path).sha256
    assert digest is not None
    return path, digest


def _plan(scene: Path, spec_path: Path, out: Path, tile: int) -> ScenePlan:
    from pipeline.model import build_model

    info = open_scene(scene)
    field = receptive_field(build_model(load_spec(spec_path)))
    grid = TileGrid.build(info.shape, info.shape, field, tile)
    return ScenePlan(info, grid, outputs_for(scene, out))


class _Watch(SchedulerPlugin):
    """What the scheduler saw: the most tasks it had unfinished at once, each task's
    resource restrictions when it started processing, every key."""

    name = "watch"
    _UNFINISHED = ("released", "waiting", "queued", "no-worker", "processing")

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.most = 0
        self.restrictions: dict[str, Any] = {}

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        tasks = self.scheduler.tasks
        unfinished = sum(ts.state in self._UNFINISHED for ts in tasks.values())
        self.most = max(self.most, unfinished)
        if finish == "processing":
            self.restrictions[str(key)] = tasks[key].resource_restrictions


def _run(plan: ScenePlan, spec_path: Path, digest: str, out: Path, *, limit: int,
         run_id: str = "run-1") -> tuple[_Watch, list[Finished], SceneJob]:
    """Label ``plan``'s scene into ``out`` through :class:`Waves` of at most ``limit`` tasks."""
    spec = load_spec(spec_path)
    record = SceneRecord(out, plan.outputs.stem)
    record.start()
    create_label_store(record.store, LabelStoreSpec(
        shape=plan.info.shape, chunks=plan.grid.tile_shape, crs=plan.info.crs,
        transform=plan.info.transform, classes=spec.classes, nodata=255))
    # The device stays on the CPU here; only the resource request is asked for.
    model = ModelRef(str(spec_path), digest, "cpu")
    job = SceneJob(plan, str(out), run_id, "f" * 64, FileIdentity.of(plan.info.path))
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      resources={"GPU": 1}, dashboard_address=":0") as cluster, \
            Client(cluster) as client, locked(out, job.run_id):
        watch = _Watch(cluster.scheduler)
        cluster.scheduler.add_plugin(watch)
        ended = list(Waves(client, {0: job}, model, batch_size=2, probabilities=False,
                           gpu=True, limit=limit))
        for finished in ended:
            assert finished.future.status == "finished", finished.future.exception()
    return watch, ended, job


def test_waves_bound_the_tasks_in_flight_and_change_no_label(tmp_path, tiny_spec) -> None:
    """36 tiles in 18 tasks of 2, at most 3 at a time on the scheduler; labels byte-equal
    to those of all tasks submitted at once; tile tasks ask for the GPU resource.

    Teeth: Waves._top_up ignoring its limit (every task submitted at once): the
    scheduler holds 19 unfinished tasks and this fails.
    """
    spec_path, digest = tiny_spec
    scene = write_sample_scenes(tmp_path / "s", size=96, count=1)[0].scene
    waves, ended, job = _run(_plan(scene, spec_path, tmp_path / "o", 16), spec_path, digest,
                             tmp_path / "o", limit=3)
    assert waves.most <= 3, waves.most
    tiles = [f.future for f in ended if not f.publish]
    publish = [f.future for f in ended if f.publish]
    assert len(tiles) == 18 and len(publish) == 1 and ended[-1].publish
    assert all(waves.restrictions[f.key] == {"GPU": 1} for f in tiles)
    assert not waves.restrictions[publish[0].key]
    token = scene_token(job, ModelRef(str(spec_path), digest, "cpu"), 2, False)
    assert all(token in f.key for f in tiles)
    at_once, _, _ = _run(_plan(scene, spec_path, tmp_path / "all", 16), spec_path, digest,
                         tmp_path / "all", limit=1000)
    assert at_once.most == 18  # the reference run did submit every tile task at once
    labels = [zarr.open_group(str(out / "scene-000.zarr"), mode="r")["labels"][:]
              for out in (tmp_path / "o", tmp_path / "all")]
    assert labels[0].shape == (96, 96) and set(np.unique(labels[0])) <= {0, 1, 2, 3, 255}
    assert np.array_equal(labels[0], labels[1])
    with rasterio.open(tmp_path / "o" / "scene-000.tif") as a, \
            rasterio.open(tmp_path / "all" / "scene-000.tif") as b:
        assert np.array_equal(a.read(), b.read())
    assert not SceneRecord(tmp_path / "o", "scene-000").work.exists()  # published


def test_keys_are_deterministic_and_runs_never_share_them(tmp_path, tiny_spec) -> None:
    spec_path, digest = tiny_spec
    scene = write_sample_scenes(tmp_path / "s", size=96, count=1)[0].scene
    plan = _plan(scene, spec_path, tmp_path / "o", 32)
    model = ModelRef(str(spec_path), digest, "cpu")
    job = SceneJob(plan, str(tmp_path / "o"), "run-1", "f" * 64, FileIdentity.of(scene))
    again = scene_token(job, model, 2, False)
    assert scene_token(job, model, 2, False) == again
    assert scene_token(job, model, 1, False) != again
    elsewhere = _plan(scene, spec_path, tmp_path / "other", 32)
    other = SceneJob(elsewhere, str(tmp_path / "other"), "run-1", "f" * 64, job.identity)
    assert scene_token(other, model, 2, False) != again  # other outputs: other tasks
    later = SceneJob(plan, str(tmp_path / "o"), "run-2", "f" * 64, job.identity)
    assert scene_token(later, model, 2, False) != again  # another run: other tasks
