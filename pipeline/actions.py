"""What a run does with each scene, decided from fingerprints before anything is written.

A scene's fingerprint (:func:`fingerprint_values`) is what decides its outputs: the
scene file's content, the model's weights and spec, the settings that change labels.
Against the output folder's journal it gives one action (:func:`decide`):

- ``skip``: the outputs in place are this tool's publication of this fingerprint;
- ``resume``: work with this fingerprint exists: only tiles without a valid record run;
- ``publish``: every tile was written and the publication had begun: it is finished;
- ``start``: from nothing (always so with ``--overwrite``);
- ``refuse``: published outputs made with another fingerprint, or unfinished work made
  with another model or settings, without ``--overwrite`` (unfinished work of another
  version of the scene file is started again: it can never be resumed).

No torch, no Dask: journal files and plain values only.
"""

from __future__ import annotations

import json
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
    values = {
        "bands": list(spec.bands), "normalization": asdict(spec.normalization),
        "nodata": [spec.nodata_input, spec.nodata_output],
        "fill": [float(v) for v in fill_values(spec)],
        "classes": [[c.name, list(c.color)] for c in spec.classes],
    }
    # Which graph tensors run and how the output is read; only when the spec says, so the
    # fingerprints of specs without these keys stay as they were (the halo enters through
    # the plan's grid).
    network = {"input": spec.onnx_input, "output": spec.onnx_output, "layout": spec.output}
    if any(v is not None for v in network.values()):
        values["network"] = network
    return values


def fingerprint_values(plan: ScenePlan, scene_sha256: str | None, spec: ModelSpec,
                       model_sha256: str, config: RunConfig, device: str) -> dict[str, Any]:
    """What decides a scene's outputs: the scene's content (not its path or modification
    time: a copied or regenerated identical scene is the same input), model, settings."""
    values = {
        "scene_sha256": scene_sha256, "shape": list(plan.info.shape),
        "model_sha256": model_sha256, "model_name": spec.name,
        "spec": spec_values(spec), "tile_shape": list(plan.grid.tile_shape),
        "halo": asdict(plan.grid.halo), "probabilities": config.probabilities, "device": device,
        "precision": config.precision,
    }
    if config.stitch != "crop":  # only then: outputs made before blending existed stay valid
        values["stitch"] = config.stitch
    return values


#: Fingerprint values by what they are to a user, for the reason of a refusal.
_WHAT = {"scene_sha256": "input", "shape": "input", "model_sha256": "model",
         "model_name": "model", "spec": "model spec", "tile_shape": "tile size",
         "halo": "halo", "probabilities": "settings", "device": "settings",
         "precision": "settings", "stitch": "settings"}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints' values, in words ("input", "tile size", "halo",
    "settings (precision)")."""
    new = json.loads(json.dumps(new, default=str))  # as stored: tuples become lists
    found: list[str] = []
    settings = [key for key, what in _WHAT.items()
                if what == "settings" and (key in old or key in new)
                and old.get(key) != new.get(key)]
    for key, what in _WHAT.items():
        if (key in old or key in new) and old.get(key) != new.get(key) and what not in found:
            found.append(what)
    return [f"settings ({', '.join(settings)})" if w == "settings" else w for w in found]


def _reason(old: dict[str, Any], new: dict[str, Any], made: str) -> str:
    what = _differences(old, new)
    if what == ["input"]:
        return f"{made} from another version of the scene file"
    return f"{made} with other {' and '.join(what) or 'input, model or settings'}"


def decide(record: SceneRecord, digest: str, values: dict[str, Any],
           overwrite: bool) -> tuple[str, str | None]:
    """The action for one scene, and for a refusal its reason.

    Unfinished work made from another version of the scene file is given up (it can
    never be resumed: that file is gone); work made with another model or settings, and
    published outputs made otherwise, are refused without ``overwrite``.
    """
    if overwrite:
        return START, None
    if record.published_as(digest) is not None:
        return SKIP, None
    started = record.work_fingerprint()
    if started is not None and record.work_has_links():
        started = None  # tampered with: a resume would write through the links
    if started is not None and started != digest:
        old = record.work_values()
        if _differences(old, values) != ["input"]:
            return REFUSE, _reason(old, values, "unfinished work made")
        started = None  # stale: started again below
    published = record.published_record()
    if (published is not None and published.fingerprint != digest
            and os.path.lexists(record.published_store)):
        return REFUSE, _reason(dict(published.values), values, "outputs made")
    if started == digest:
        if record.publishing_state() is not None:
            return PUBLISH, None
        if record.store_complete():
            return RESUME, None
    return START, None


def action_line(stem: str, action: str | None, error: str | None = None) -> str:
    """What the run does with one scene, in words (dry run and ``--verbose``); a scene
    without an action fails with ``error``."""
    words = {SKIP: "skip: published with the same input, model and settings",
             RESUME: "resume: tiles recorded by an earlier run are kept",
             PUBLISH: "publish: every tile was written by an earlier run",
             START: "start",
             REFUSE: "refused"}
    if action is None:
        return f"{stem}: fails: {error}"
    if action == REFUSE:
        return f"{stem}: refused: {error or 'made otherwise'} (--overwrite replaces it)"
    return f"{stem}: {words[action]}"
