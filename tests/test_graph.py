"""The Dask graph: deterministic keys, one chunk per task, GPU resource requests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from distributed import Client, LocalCluster, wait

from pipeline.analysis import receptive_field
from pipeline.graph import SceneJob, scene_token, submit_scene
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


def test_gpu_runs_ask_for_the_gpu_resource_and_keys_are_deterministic(tmp_path, tiny_spec) -> None:
    spec_path, digest = tiny_spec
    scene = write_sample_scenes(tmp_path / "s", size=96, count=1)[0].scene
    plan = _plan(scene, spec_path, tmp_path / "o", 32)
    spec = load_spec(spec_path)
    record = SceneRecord(tmp_path / "o", plan.outputs.stem)
    record.start()
    create_label_store(record.store, LabelStoreSpec(
        shape=plan.info.shape, chunks=plan.grid.tile_shape, crs=plan.info.crs,
        transform=plan.info.transform, classes=spec.classes, nodata=255))
    # The device stays on the CPU here; only the resource request is under test.
    model = ModelRef(str(spec_path), digest, "cpu")
    job = SceneJob(plan, str(tmp_path / "o"), "run-1", "f" * 64, FileIdentity.of(scene))
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      resources={"GPU": 1}, dashboard_address=":0") as cluster, \
            Client(cluster) as client, locked(tmp_path / "o", job.run_id):
        futures = submit_scene(client, job, model, batch_size=2, probabilities=False, gpu=True)
        wait([*futures.tiles, futures.publish])
        restrictions = client.run_on_scheduler(
            lambda dask_scheduler: {
                k: ts.resource_restrictions for k, ts in dask_scheduler.tasks.items()
            }
        )
        assert all(f.status == "finished" for f in futures.tiles), [
            f.exception() for f in futures.tiles
        ]
        assert futures.publish.status == "finished"
    assert len(futures.tiles) == 3 * 2  # 3 rows of tiles, 3 tiles a row in runs of 2
    for future in futures.tiles:
        assert restrictions[future.key] == {"GPU": 1}
    assert not restrictions[futures.publish.key]
    again = scene_token(job, model, 2, False)
    assert all(again in f.key for f in futures.tiles)
    assert scene_token(job, model, 1, False) != again
    elsewhere = _plan(scene, spec_path, tmp_path / "other", 32)
    other = SceneJob(elsewhere, str(tmp_path / "other"), "run-1", "f" * 64, job.identity)
    assert scene_token(other, model, 2, False) != again  # other outputs: other tasks
    later = SceneJob(plan, str(tmp_path / "o"), "run-2", "f" * 64, job.identity)
    assert scene_token(later, model, 2, False) != again  # another run: other tasks
    labels = zarr.open_group(str(plan.outputs.store), mode="r")["labels"][:]
    assert labels.shape == (96, 96) and set(np.unique(labels)) <= {0, 1, 2, 3, 255}
    assert plan.outputs.cog.is_file()
    assert not record.work.exists()  # published: the work folder is gone
