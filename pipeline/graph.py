"""The Dask side of a run: its tasks, submitted in bounded waves.

One task per batch of tiles, one publish task per scene once its tiles are written.
:class:`Waves` keeps a bounded number of tasks in flight and submits the next as one
ends, so the runner's memory does not grow with the number of tiles.

Task keys are deterministic: they derive from the scene (its content digest, shape),
the model's weights checksum, the tiling, the output paths and the run's id, so the
same run gives the same keys and two runs never share a task. Inference tasks ask for
the ``GPU`` resource on a GPU run; publishing runs anywhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from dask.base import tokenize
from distributed import Client, Future, as_completed

from pipeline.cluster import GPU_RESOURCE
from pipeline.formats import VRT
from pipeline.grid import Tile
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


#: Tasks kept in flight per worker thread: enough that no thread waits for the client to
#: top the queue up, few enough that the runner holds a bounded number of futures.
TASKS_PER_THREAD = 16
#: Fewest tasks kept in flight (a cluster whose workers are still starting has no threads).
MIN_IN_FLIGHT = 64
#: Seconds between two looks at the cluster's thread count (workers come and go).
_THREADS_REFRESH = 5.0


def in_flight_limit(client: Client) -> int:
    """How many tasks a run keeps in flight on ``client``'s cluster now."""
    return max(MIN_IN_FLIGHT, TASKS_PER_THREAD * sum(client.nthreads().values()))


@dataclass(frozen=True)
class Finished:
    """A task that ended (done, failed or cancelled): its scene's key in the run's jobs, its
    future, and whether it was the scene's publication."""

    scene: int
    future: Future
    publish: bool


class _Scene:
    """The progress of one scene's tasks inside :class:`Waves`."""

    def __init__(self, key: int, job: SceneJob, token: str, target: SceneTarget,
                 batches: Iterator[tuple[Tile, ...]]) -> None:
        self.key, self.job, self.token, self.target = key, job, token, target
        self.batches = batches
        self.submitted = 0
        self.running: dict[str, Future] = {}
        self.exhausted = False
        self.failed = False


class Waves:
    """A run's tasks, submitted in bounded waves and yielded as they end.

    At most ``limit`` tasks are in flight (by default :func:`in_flight_limit`, looked at
    again every few seconds); as one ends, the next is submitted. Scenes go in the order
    of ``jobs``; a scene's tiles go in row-major batches of ``batch_size``
    (:meth:`pipeline.plan.ScenePlan.batches`, made one at a time, leaving out the tiles
    ``job.skip`` lists as written), and its publication once every one of them has
    succeeded. So the runner holds a number of futures, and of tiles, that does not grow
    with a scene's size. Publications go ahead of waiting tile tasks. A scene one of whose
    tasks fails gets no further task; its tasks in flight are cancelled.

    ``predict`` and ``publish`` are the task functions (:func:`pipeline.tasks.predict_tiles`
    and :func:`pipeline.tasks.publish_scene`; a benchmark passes ones that do no work).
    Inference tasks ask for the ``GPU`` resource when ``gpu``.
    """

    def __init__(self, client: Client, jobs: Mapping[int, SceneJob], model: ModelRef, *,
                 batch_size: int, probabilities: bool, gpu: bool, limit: int | None = None,
                 predict: Callable[..., Any] = predict_tiles,
                 publish: Callable[..., Any] = publish_scene) -> None:
        self._client, self._model = client, model
        self._batch_size, self._probabilities = batch_size, probabilities
        self._resources = {GPU_RESOURCE: 1} if gpu else None
        self._predict, self._publish = predict, publish
        self._fixed_limit = limit
        self._limit = limit or in_flight_limit(client)
        self._looked = time.monotonic()
        self._jobs = iter(jobs.items())
        self._current: _Scene | None = None
        self._owner: dict[str, tuple[_Scene, bool]] = {}
        self._ended = as_completed()

    def in_flight(self) -> list[Future]:
        """The futures submitted and not yet yielded."""
        return [scene.running[key] for key, (scene, _) in self._owner.items()]

    def __iter__(self) -> Iterator[Finished]:
        self._top_up()
        for future in self._ended:
            scene, publishing = self._owner.pop(str(future.key))
            scene.running.pop(str(future.key), None)
            if future.status == "error":
                self._fail(scene)
            elif not publishing and future.status == "finished":
                self._publish_if_done(scene)
            yield Finished(scene.key, future, publishing)
            self._top_up()

    def _fail(self, scene: _Scene) -> None:
        """No more tasks for ``scene``; cancel those in flight (they end as cancelled)."""
        scene.failed = True
        if scene.running:
            self._client.cancel(list(scene.running.values()))

    def _top_up(self) -> None:
        """Fill the tasks in flight up to the limit once a quarter of it is free (tasks go
        to the scheduler in one message a fill, not one each)."""
        if self._fixed_limit is None and time.monotonic() - self._looked > _THREADS_REFRESH:
            self._limit, self._looked = in_flight_limit(self._client), time.monotonic()
        room = self._limit - len(self._owner)
        if room < max(1, self._limit // 4) and self._owner:
            return
        tiles: list[tuple[_Scene, tuple[Tile, ...]]] = []
        while len(tiles) < room:
            if self._current is None:
                self._current = self._next_scene()
                if self._current is None:
                    break
            scene = self._current
            batch = None if scene.failed else next(scene.batches, None)
            if batch is not None:
                tiles.append((scene, batch))
                continue
            self._submit_tiles(tiles)  # before the scene's publication is considered
            tiles = []
            scene.exhausted, self._current = True, None
            if self._publish_if_done(scene):
                room -= 1
        self._submit_tiles(tiles)

    def _next_scene(self) -> _Scene | None:
        entry = next(self._jobs, None)
        if entry is None:
            return None
        key, job = entry
        plan = job.plan
        token = scene_token(job, self._model, self._batch_size, self._probabilities)
        target = SceneTarget(plan.info.path, job.identity, job.out_dir, plan.outputs.stem,
                             job.run_id, self._probabilities, plan.overview_levels(),
                             job.fingerprint, allow_vrt=plan.info.driver == VRT,
                             grid=plan.grid)
        batches = iter(()) if job.publish_only else plan.batches(self._batch_size, job.skip)
        return _Scene(key, job, token, target, batches)

    def _submit_tiles(self, tiles: list[tuple[_Scene, tuple[Tile, ...]]]) -> None:
        """Submit tile tasks, one for each ``(scene, batch)``, in one message, after those
        submitted before (``fifo_timeout="0 ms"``: else the scheduler interleaves the tasks of
        calls made within 100 ms, and a scene's last tiles wait behind the next scene's)."""
        if not tiles:
            return
        keys = []
        for scene, _ in tiles:
            keys.append(f"predict-{scene.job.plan.outputs.stem}-{scene.token}-{scene.submitted}")
            scene.submitted += 1
        futures = self._client.map(
            self._predict, [self._model] * len(tiles), [scene.target for scene, _ in tiles],
            [batch for _, batch in tiles], key=keys, resources=self._resources, pure=False,
            fifo_timeout="0 ms")
        for (scene, _), future in zip(tiles, futures):
            self._track(scene, future, publishing=False)

    def _publish_if_done(self, scene: _Scene) -> bool:
        """Submit ``scene``'s publication once all its tiles are submitted and succeeded,
        ahead of the tile tasks waiting (a scene is published as soon as its tiles are
        written, not after the next scene's tiles in flight)."""
        if not scene.exhausted or scene.failed or scene.running:
            return False
        job, plan = scene.job, scene.job.plan
        future = self._client.submit(
            self._publish,
            PublishTarget(job.out_dir, plan.outputs.stem, job.run_id, job.fingerprint,
                          plan.info.path, bool(scene.target.overview_levels)),
            key=f"publish-{plan.outputs.stem}-{scene.token}", priority=1, pure=False)
        self._track(scene, future, publishing=True)
        return True

    def _track(self, scene: _Scene, future: Future, *, publishing: bool) -> None:
        scene.running[str(future.key)] = future
        self._owner[str(future.key)] = (scene, publishing)
        self._ended.add(future)


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
