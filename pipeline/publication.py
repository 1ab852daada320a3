"""Publishing a finished scene: its COG and label store moved into place, idempotently.

Publication runs as a Dask task, which Dask may run again when the worker running
it dies, and a run may be killed between any two of its steps. So every step looks at
what is already done and does only the rest:

1. unless ``publishing.json`` says it is done: check every tile's chunks against their
   recorded checksums, make the COG in the work folder from the label store and the
   overview levels the tiles built, and write ``publishing.json`` (the COG's checksum,
   size and modification time, and the checksum of every file of the store);
2. move the label store into place (an old one first goes to the journal's trash, so
   ``--overwrite`` replaces old outputs only now, never before the new ones exist);
3. move the COG into place (one atomic rename over the old one);
4. write the published record (``.fcn-pipeline/.published/STEM.json``), remove the work
   folder and the trash.

Each step first checks that its run still holds the output folder
(:func:`pipeline.journal.check_run`): a publication of an interrupted run moves nothing.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import OutputError
from pipeline.journal import (
    TRASH,
    WORK,
    PublishedRecord,
    SceneRecord,
    check_run,
    cog_matches,
    file_digest,
    fsync_file,
    listing_digest,
    move_aside,
    store_files,
    write_json,
)
from pipeline.writers import write_cog


@dataclass(frozen=True)
class PublishTarget:
    """What a publication task needs: the scene's journal and the run that publishes it."""

    out_dir: str
    stem: str
    run_id: str
    fingerprint: str
    scene: str
    #: Whether the tiles built overview levels in ``overviews.zarr``.
    overviews: bool

    @property
    def record(self) -> SceneRecord:
        return SceneRecord(Path(self.out_dir), self.stem)


def _verify_tiles(record: SceneRecord) -> dict[str, str]:
    """Every tile's chunks against their checksums; the checksums of the store's chunks.

    Raises:
        OutputError: a chunk is missing or changed since its tile was written; its tile
            record is removed, so the next run computes that tile again.
    """
    _good, damaged = record.verified_tiles()
    if damaged:
        raise OutputError(f"{record.stem}: {damaged[0]}; rerun to compute "
                          f"{'that tile' if len(damaged) == 1 else f'those {len(damaged)} tiles'}"
                          " again")
    known: dict[str, str] = {}
    for files in record.tile_records().values():
        known.update(files)
    return known


def _listing(record: SceneRecord, known: dict[str, str]) -> dict[str, str]:
    """sha256 of every file of the work store, relative to the store (chunks from their
    tile records, which were just verified; the metadata files hashed now)."""
    prefix = record.store.name + "/"
    listing = {}
    for rel in store_files(record.store):
        digest = known.get(prefix + rel)
        listing[rel] = digest if digest is not None else file_digest(record.store / rel)
    return listing


def _make(target: PublishTarget) -> dict[str, Any]:
    record = target.record
    known = _verify_tiles(record)
    listing = _listing(record, known)
    check_run(target.out_dir, target.run_id)
    write_cog(record.store, record.cog,
              overviews=record.overviews if target.overviews else None)
    fsync_file(record.cog)
    st = record.cog.stat()
    state = {
        "fingerprint": target.fingerprint,
        "values": record.work_values(),
        "cog": {"sha256": file_digest(record.cog), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns},
        "zarr": {"sha256": listing_digest(listing), "files": listing},
    }
    check_run(target.out_dir, target.run_id)
    write_json(record.publishing, state, durable=True)
    return state


def publish(target: PublishTarget) -> PublishedRecord:
    """Publish a scene whose tiles are all written (see the module docstring); safe to
    run again after it was cut short at any point.

    Returns:
        The published record: fingerprint, checksums of the COG and every store file.

    Raises:
        RunEnded: the run no longer holds the output folder (nothing more is moved).
        OutputError: a chunk is damaged, the COG cannot be written (disk full,
            permissions), or the work is in a state no publication leaves.
    """
    record = target.record
    try:
        return _publish(target, record)
    except OSError as exc:
        if isinstance(exc, OutputError):
            raise
        raise OutputError(f"cannot publish {target.stem} in {target.out_dir}: "
                          f"{exc.strerror or exc}"
                          + (f" ({exc.filename})" if exc.filename else "")) from exc


def _publish(target: PublishTarget, record: SceneRecord) -> PublishedRecord:
    check_run(target.out_dir, target.run_id)
    if not record.work.exists():  # run again by Dask after it finished (its result lost)
        done = record.published_as(target.fingerprint)
        if done is not None:
            return done
    state = record.publishing_state()
    if state is None or state.get("fingerprint") != target.fingerprint:
        state = _make(target)
    check_run(target.out_dir, target.run_id)
    # The moves: each looks at what is done already.
    if record.store.is_dir():
        if os.path.lexists(record.published_store):
            move_aside(record.published_store, record.out_dir)
        os.replace(record.store, record.published_store)
    elif record.store_fingerprint() != target.fingerprint:
        raise OutputError(f"cannot publish {record.published_store}: its label store is "
                          "neither in the work folder nor in place; rerun to compute it again")
    if record.cog.is_file():
        os.replace(record.cog, record.published_cog)
    elif not cog_matches(record.published_cog, state["cog"]):
        raise OutputError(f"cannot publish {record.published_cog}: the COG is neither in the "
                          "work folder nor in place; rerun to make it again")
    published = PublishedRecord(target.fingerprint, target.scene, state["cog"], state["zarr"],
                                {}, state.get("values") or {})
    record.published_record_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(record.published_record_path, published.to_json(), durable=True)
    shutil.rmtree(record.work, ignore_errors=True)
    trash = record.out_dir / WORK / TRASH
    for old in trash.glob(f"{record.published_store.name}.*") if trash.is_dir() else []:
        if old.is_symlink():  # a link the user had put there: removed, never followed
            old.unlink(missing_ok=True)
        else:
            shutil.rmtree(old, ignore_errors=True)
    return published
