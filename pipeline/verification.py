"""``fcn-pipeline verify DIR``: published outputs against the checksums recorded for them.

The manifest records, per published scene, the sha256 of its COG and of its Zarr
store's file listing; the journal's published record (``.fcn-pipeline/.published/``)
holds the sha256 of every file of the store, so a damaged store names its damaged files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.errors import ConfigError
from pipeline.journal import (
    PUBLISHED,
    WORK,
    SceneRecord,
    file_digest,
    listing_digest,
    read_manifest,
    store_files,
)


@dataclass(frozen=True)
class Finding:
    """One published file (or store) and what is wrong with it, if anything."""

    path: str
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "problem": self.problem}


def _check_file(path: Path, sha256: str | None) -> Finding:
    if path.is_symlink():
        return Finding(str(path), "is a link, which this tool never publishes")
    if not path.is_file():
        return Finding(str(path), "missing")
    if sha256 is None:
        return Finding(str(path), "no checksum was recorded for it")
    try:
        actual = file_digest(path)
    except OSError as exc:
        return Finding(str(path), f"cannot be read ({exc.strerror or exc})")
    return Finding(
        str(path), None if actual == sha256 else "checksum differs from the recorded one"
    )


def _check_store(store: Path, files: dict[str, str] | None, sha256: str | None) -> list[Finding]:
    if not store.is_dir():
        return [Finding(str(store), "missing")]
    present = store_files(store)
    if files is None:  # only the listing digest: say whether the store as a whole matches
        actual = {rel: file_digest(store / rel) for rel in present}
        ok = sha256 is not None and listing_digest(actual) == sha256
        return [Finding(str(store), None if ok else "checksum differs from the recorded one "
                        "(the journal's per-file checksums are gone, so no file can be named)")]
    findings = [_check_file(store / rel, want) if _inside(store, rel) else
                Finding(str(store / rel), "names a file outside the store: the record is not "
                        "this tool's (nothing outside the store is read)")
                for rel, want in sorted(files.items())]
    findings += [Finding(str(store / rel), "not part of the published store")
                 for rel in present if rel not in files]
    damaged = [f for f in findings if not f.ok]
    return damaged or [Finding(str(store))]


def _inside(store: Path, rel: str) -> bool:
    """Whether a store-relative path from a record names a file inside its store, through
    no link."""
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts or "\\" in rel:
        return False
    return (store / rel).resolve().is_relative_to(store.resolve())


def verify_outputs(out_dir: Path) -> list[Finding]:
    """Check every scene this tool published in ``out_dir``: each published record of its
    journal (``.fcn-pipeline/.published/``), and the scenes of its manifest recorded as
    done whose record is gone (their manifest checksums then).

    Returns:
        One finding per COG and per store (ok), or per damaged file.

    Raises:
        ConfigError: ``out_dir`` has no manifest that parses, or nothing was published in
            it (so nothing can be checked: verify never passes on nothing).
    """
    manifest = read_manifest(out_dir)
    out_dir = out_dir.absolute()
    findings: list[Finding] = []
    checked: set[str] = set()
    published = out_dir / WORK / PUBLISHED
    for path in sorted(published.glob("*.json")) if published.is_dir() else []:
        record = SceneRecord(out_dir, path.stem)
        entry = record.published_record()
        if entry is None:
            findings.append(Finding(str(path), "the published record does not parse"))
            continue
        checked.add(path.stem)
        findings.append(_check_file(record.published_cog, entry.cog.get("sha256")))
        findings.extend(_check_store(record.published_store, dict(entry.zarr["files"]),
                                     entry.zarr.get("sha256")))
    for scene in manifest["scenes"]:
        if not isinstance(scene, dict) or scene.get("status") != "done":
            continue
        stem = str(scene.get("stem"))
        if stem in checked:
            continue
        checksums = scene.get("checksums") or {}
        record = SceneRecord(out_dir, stem)
        findings.append(_check_file(record.published_cog, (checksums.get("cog") or {}).get(
            "sha256")))
        findings.extend(_check_store(record.published_store, None,
                                     (checksums.get("zarr") or {}).get("sha256")))
    if not findings:
        raise ConfigError(f"nothing to verify: {out_dir} has no published outputs")
    return findings
