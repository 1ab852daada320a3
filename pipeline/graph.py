"""The Dask graph of a run: one task per batch of tiles, one publish task per scene.

Task keys are deterministic: they derive from the scene (its content digest, shape),
the model's weights checksum, the tiling, the output paths and the run's id, so the
same run gives the same keys and two runs never share a task. Inference tasks ask for
the ``GPU`` resource on a GPU run; publishing runs anywhere.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dask.base import tokenize
from distributed import Client, Future

from pipeline.cluster import GPU_RESOURCE
from pipeline.formats import VRT
from pipeline.journal import FileIdentity
from pipeline.plan import ScenePlan
from pipeline.publication import PublishTarget
from pipeline.tasks import ModelRef, SceneTarget, predict_tiles, publish_scene


@dataclass(frozen=True)
class SceneJob:
    """What a run asks of one scene: which tiles, for which run, under which fingerprint."""

    plan: ScenePlan
    out_dir: str
    run_id: str
    fingerprint: str
    identity: FileIdentity
    skip: frozenset[tuple[int, int]] = frozenset()
    #: Every tile is written already: only the publication is left to do.
    publish_only: bool = False


@dataclass(frozen=True)
class SceneFutures:
    """The futures of one scene: its tile batches and its publication."""

    plan: ScenePlan
    tiles: tuple[Future, ...]
    publish: Future
    pixels: tuple[int, ...]

    @property
    def futures(self) -> tuple[Future, ...]:
        return (*self.tiles, self.publish)


def scene_token(job: SceneJob, model: ModelRef, batch_size: int, probabilities: bool) -> str:
    """A deterministic token of everything that decides a scene's tasks and where they write.

    The output paths and the run id are part of it: two runs of one scene, into
    different directories or one after the other on a shared scheduler, never share
    tasks.
    """
    plan = job.plan
    return str(tokenize(
        job.fingerprint, plan.info.shape, model, plan.grid.tile_shape, plan.grid.halo,
        batch_size, probabilities, str(plan.outputs.store), str(plan.outputs.cog), job.run_id,
    ))


def submit_scene(client: Client, job: SceneJob, model: ModelRef, *, batch_size: int,
                 probabilities: bool, gpu: bool) -> SceneFutures:
    """Submit a scene's tile tasks (except the ``job.skip`` tiles, already written) and its
    publication."""
    plan = job.plan
    token = scene_token(job, model, batch_size, probabilities)
    levels = plan.overview_levels()
    target = SceneTarget(plan.info.path, job.identity, job.out_dir, plan.outputs.stem,
                         job.run_id, probabilities, levels, job.fingerprint,
                         allow_vrt=plan.info.driver == VRT)
    resources = {GPU_RESOURCE: 1} if gpu else None
    batches = [] if job.publish_only else plan.batches(batch_size, job.skip)
    tiles = tuple(
        client.submit(
            predict_tiles, model, target, batch,
            key=f"predict-{plan.outputs.stem}-{token}-{k}",
            resources=resources,
            pure=False,
        )
        for k, batch in enumerate(batches)
    )
    publish = client.submit(
        publish_scene,
        PublishTarget(job.out_dir, plan.outputs.stem, job.run_id, job.fingerprint,
                      plan.info.path, bool(levels)),
        *tiles,
        key=f"publish-{plan.outputs.stem}-{token}",
        pure=False,
    )
    return SceneFutures(plan, tiles, publish, tuple(sum(t.core.area for t in b) for b in batches))


def _running_keys(dask_worker: Any) -> list[str]:
    """Keys of the tasks a worker is running now, cancelled ones included (run on workers)."""
    return [str(ts.key) for ts in dask_worker.state.all_running_tasks]


def stop_tasks(client: Client, futures: Iterable[Future], *, timeout: float = 6.0) -> list[str]:
    """Cancel ``futures`` and wait, up to ``timeout`` seconds, until no worker still runs one.

    A running Python task cannot be interrupted: a cancelled task keeps running on its
    worker until it returns. Tasks check before every write that their run still
    holds the output folder, and the run releases it only after this wait, so what
    a straggler does after it is refused.

    Returns:
        The keys still running when the wait ended (empty when all stopped).
    """
    futures = list(futures)
    keys = {str(f.key) for f in futures}
    if not futures:
        return []
    client.cancel(futures, force=True)
    deadline = time.monotonic() + timeout
    running: list[str] = []
    while True:
        try:
            per_worker = client.run(_running_keys, on_error="return")
        except Exception:  # a scheduler that is gone has no tasks left to wait for
            return []
        running = sorted(k for found in per_worker.values() if isinstance(found, list)
                         for k in found if k in keys)
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.1)
