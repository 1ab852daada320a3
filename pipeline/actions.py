"""What a run does with each scene, decided from fingerprints before anything is written.

A scene's fingerprint (:func:`fingerprint_values`) is what decides its outputs: the
scene file's content, the model's weights and spec, the settings that change labels.
Against the output folder's journal it gives one action (:func:`decide`):

- ``skip``: the outputs in place are this tool's publication of this fingerprint;
- ``resume``: work with this fingerprint exists: only tiles without a valid record run;
- ``publish``: every tile was written and the publication had begun: it is finished;
- ``start``: from nothing (always so with ``--overwrite``);
- a refusal (``None``): outputs or work made with another fingerprint, without
  ``--overwrite``.

No torch, no Dask: journal files and plain values only.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from pipeline.config import RunConfig
from pipeline.journal import SceneRecord
from pipeline.modelspec import ModelSpec, fill_values
from pipeline.plan import ScenePlan

#: What a run does with a scene, decided from fingerprints before anything is written.
SKIP, RESUME, PUBLISH, START, REFUSE = "skip", "resume", "publish", "start", "refuse"


def spec_values(spec: ModelSpec) -> dict[str, Any]:
    """What of the spec decides the outputs besides the weights."""
    return {
        "bands": list(spec.bands), "normalization": asdict(spec.normalization),
        "nodata": [spec.nodata_input, spec.nodata_output],
        "fill": [float(v) for v in fill_values(spec)],
        "classes": [[c.name, list(c.color)] for c in spec.classes],
    }


def fingerprint_values(plan: ScenePlan, scene_sha256: str | None, spec: ModelSpec,
                       model_sha256: str, config: RunConfig, device: str) -> dict[str, Any]:
    """What decides a scene's outputs: the scene's content (not its path or modification
    time: a copied or regenerated identical scene is the same input), model, settings."""
    return {
        "scene_sha256": scene_sha256, "shape": list(plan.info.shape),
        "model_sha256": model_sha256, "model_name": spec.name,
        "spec": spec_values(spec), "tile_shape": list(plan.grid.tile_shape),
        "halo": asdict(plan.grid.halo), "probabilities": config.probabilities, "device": device,
        "precision": config.precision,
    }


def decide(record: SceneRecord, digest: str, overwrite: bool) -> str | None:
    """The action for one scene (None: refused, its outputs were made otherwise)."""
    if overwrite:
        return START
    if record.published_as(digest) is not None:
        return SKIP
    published = record.published_record()
    started = record.work_fingerprint()
    if (published is not None and published.fingerprint != digest
            and os.path.lexists(record.published_store)) \
            or (started is not None and started != digest):
        return None
    if started == digest:
        if record.publishing_state() is not None:
            return PUBLISH
        if record.store_complete():
            return RESUME
    return START


def action_line(stem: str, action: str | None, error: str | None = None) -> str:
    """What the run does with one scene, in words (dry run and ``--verbose``); a scene
    without an action fails with ``error``."""
    words = {SKIP: "skip: published with the same input, model and settings",
             RESUME: "resume: tiles recorded by an earlier run are kept",
             PUBLISH: "publish: every tile was written by an earlier run",
             START: "start",
             REFUSE: "refused: its outputs were made with another input, model or settings "
                       "(--overwrite replaces them)"}
    if action is None:
        return f"{stem}: fails: {error}"
    return f"{stem}: {words[action]}"
