"""The Dask graph of a run: one task per batch of tiles, one publish task per scene.

Task keys are deterministic: they derive from the scene file (path, size,
modification time), the model's weights checksum and the tiling, so the same
run gives the same keys. Inference tasks ask for the ``GPU`` resource on a
GPU run; publishing runs anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from dask.base import tokenize
from distributed import Client, Future

from pipeline.cluster import GPU_RESOURCE
from pipeline.journal import SceneRecord
from pipeline.plan import ScenePlan
from pipeline.tasks import ModelRef, SceneTarget, predict_tiles, publish_scene


@dataclass(frozen=True)
class SceneFutures:
    """The futures of one scene: its tile batches and its publication."""

    plan: ScenePlan
    tiles: tuple[Future, ...]
    publish: Future
    pixels: tuple[int, ...]


def scene_token(plan: ScenePlan, model: ModelRef, batch_size: int, probabilities: bool) -> str:
    """A deterministic token of everything that decides a scene's tasks and where they write.

    The output paths are part of it: two runs of one scene into different
    directories on a shared scheduler must not share tasks.
    """
    info = plan.info
    return tokenize(
        info.path, info.shape, info.size_bytes, info.mtime_ns, model, plan.grid.tile_shape,
        plan.grid.halo, batch_size, probabilities, str(plan.outputs.store), str(plan.outputs.cog),
    )


def submit_scene(client: Client, plan: ScenePlan, model: ModelRef, record: SceneRecord, *,
                 batch_size: int, probabilities: bool, gpu: bool,
                 skip: frozenset[tuple[int, int]] = frozenset()) -> SceneFutures:
    """Submit a scene's tile tasks (except the ``skip`` tiles, already written) and its publication."""
    token = scene_token(plan, model, batch_size, probabilities)
    levels = plan.overview_levels()
    target = SceneTarget(plan.info.path, str(record.store), str(record.tiles), probabilities,
                         str(record.overviews) if levels else None, levels)
    resources = {GPU_RESOURCE: 1} if gpu else None
    batches = plan.batches(batch_size, skip)
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
        publish_scene, str(record.store), target.overviews, str(plan.outputs.cog),
        str(plan.outputs.store), str(record.work), *tiles,
        key=f"publish-{plan.outputs.stem}-{token}",
        pure=False,
    )
    return SceneFutures(plan, tiles, publish, tuple(sum(t.core.area for t in b) for b in batches))
