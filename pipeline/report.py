"""What a run reports: per scene and in all, for the command line and the manifest.

Plain values, no torch: the command line builds a report of scenes that all failed
their checks without loading the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
    #: skip, resume, publish or start (see the module docstring); None for a failed scene.
    action: str | None = None
    fingerprint: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    #: sha256 of the published COG (``cog``) and of the store's file listing (``zarr``).
    checksums: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Seconds the scene's tasks spent reading windows, running the model, writing
    #: chunks, and publishing (COG and store), summed over tasks and reading threads.
    work_seconds: dict[str, float] = field(default_factory=dict)
    #: What the scene's tiling guarantees (:meth:`pipeline.exactness.Exactness.to_json`):
    #: exact, method, halo, max_abs_deviation, labels_changed.
    exactness: dict[str, Any] | None = None

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
    #: The signal that stopped the run, if one did.
    interrupted: int | None = None
    #: The plan as data (``--dry-run --json``).
    plan: dict[str, Any] = field(default_factory=dict)
    #: Why the run is refused (a dry run reports it instead of raising ConfigError).
    refusal: str | None = None
    #: Why the final manifest could not be written (the run then exits 1).
    manifest_error: str | None = None

    @property
    def ok(self) -> bool:
        return all(s.status == "done" for s in self.scenes)


def failed_report(scenes: list[tuple[str, str, str | None]], plan_text: str) -> RunReport:
    """The report of a run none of whose scenes can run: ``(scene, stem, error)`` each."""
    results = [SceneResult(scene=path, stem=stem, status="failed", error=error)
               for path, stem, error in scenes]
    plan = {"scenes": [{"scene": r.scene, "stem": r.stem, "status": r.status, "error": r.error,
                        "action": None} for r in results]}
    return RunReport(results, None, plan_text, plan=plan)
