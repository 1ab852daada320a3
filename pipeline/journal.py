"""The on-disk record of a run, so nothing is lost and nothing is half-published.

Inside the output directory::

    run.json                  the manifest (replaced atomically)
    STEM.tif, STEM.zarr       published outputs: they appear only when complete
    .fcn-pipeline/lock        held (flock) by the run writing this directory
    .fcn-pipeline/.window-speeds.json
                              the model's measured speed per window size, per model
                              and threads: the automatic tile size of every later run
                              into this directory comes from the same figures
    .fcn-pipeline/STEM/       the work of a scene not yet published:
        fingerprint.json      what decides its outputs (input, model, settings)
        labels.zarr/          the label store being filled, one chunk per tile
        overviews.zarr/       the first overview levels of the COG, one chunk per tile
        tiles/I-J             an empty file per tile written (also all-nodata ones)
        attempts              how many runs have worked on it

A rerun with the same fingerprint resumes: only tiles without a record are
computed. Publication writes the COG (temporary name, renamed) and then moves
the store into place, so a published store is always complete.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, OutputError

WORK = ".fcn-pipeline"
FINGERPRINT_ATTR = "fcn_pipeline_fingerprint"


def fingerprint(values: Mapping[str, Any]) -> str:
    """A stable digest of the JSON-able values that decide a scene's outputs."""
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _held_error(out_dir: Path, fd: int) -> ConfigError:
    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
    return ConfigError(
        f"another fcn-pipeline run (pid {holder}) is writing {out_dir}; wait for it to "
        "finish or choose another --out"
    )


def _take_lock(fd: int, out_dir: Path) -> None:
    """flock ``fd`` without waiting; a lock held elsewhere is a ConfigError naming its pid."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise _held_error(out_dir, fd) from None


def check_unlocked(out_dir: Path) -> None:
    """Fail at once when another run holds ``out_dir``'s lock (a cheap early check)."""
    path = out_dir / WORK / "lock"
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDWR)
    try:
        _take_lock(fd, out_dir)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def locked(out_dir: Path) -> Iterator[None]:
    """Hold the output directory's lock; fail at once when another run holds it.

    The lock is an ``flock`` on a file, so the kernel releases it when the
    holder dies, even by SIGKILL: a stale lock never blocks a rerun.
    """
    work = out_dir / WORK
    work.mkdir(parents=True, exist_ok=True)
    fd = os.open(work / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _take_lock(fd, out_dir)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


SPEEDS = ".window-speeds.json"


def _speeds_path(out_dir: Path) -> Path:
    return out_dir / WORK / SPEEDS


def load_window_speeds(out_dir: Path, key: str) -> dict[tuple[int, int], float] | None:
    """The window speeds measured for ``key`` by an earlier run into ``out_dir``."""
    path = _speeds_path(out_dir)
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text()).get(key)
    except (OSError, ValueError):
        return None  # unreadable: measured again
    if not stored:
        return None
    speeds = {}
    for shape, speed in stored.items():
        rows, _, cols = shape.partition("x")
        speeds[(int(rows), int(cols))] = float(speed)
    return speeds


def save_window_speeds(out_dir: Path, key: str, speeds: Mapping[tuple[int, int], float]) -> None:
    """Remember ``speeds`` for ``key`` in ``out_dir`` (kept beside other keys' figures)."""
    path = _speeds_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        stored = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        stored = {}
    stored[key] = {f"{r}x{c}": speed for (r, c), speed in sorted(speeds.items())}
    _write_json(path, stored)


def clean_leftovers(out_dir: Path) -> list[Path]:
    """Remove temporary files a killed run left next to the outputs."""
    removed = []
    for path in out_dir.glob(".*.tmp"):
        path.unlink(missing_ok=True)
        removed.append(path)
    for path in out_dir.glob(".*.aux.xml"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


@dataclass(frozen=True)
class SceneRecord:
    """Paths of one scene's work and published outputs."""

    out_dir: Path
    stem: str

    @property
    def work(self) -> Path:
        return self.out_dir / WORK / self.stem

    @property
    def store(self) -> Path:
        """The store tiles write into while the scene is in progress."""
        return self.work / "labels.zarr"

    @property
    def overviews(self) -> Path:
        """The store of the overview levels that tiles build alongside their labels."""
        return self.work / "overviews.zarr"

    @property
    def tiles(self) -> Path:
        return self.work / "tiles"

    @property
    def published_store(self) -> Path:
        return self.out_dir / f"{self.stem}.zarr"

    @property
    def published_cog(self) -> Path:
        return self.out_dir / f"{self.stem}.tif"

    def work_fingerprint(self) -> str | None:
        path = self.work / "fingerprint.json"
        if not path.is_file():
            return None
        return json.loads(path.read_text()).get("fingerprint")

    def published_fingerprint(self) -> str | None:
        """The fingerprint of the published outputs, or None when not (fully) published."""
        meta = self.published_store / "zarr.json"
        if not (meta.is_file() and self.published_cog.is_file()):
            return None
        return json.loads(meta.read_text()).get("attributes", {}).get(FINGERPRINT_ATTR)

    def start(self) -> None:
        """Begin fresh work on the scene (discarding any earlier work).

        The fingerprint is written by :meth:`commit` once the label store exists,
        so a kill in between leaves work without a fingerprint: started afresh.
        """
        self.discard_work()
        self.tiles.mkdir(parents=True)

    def store_complete(self) -> bool:
        """Whether the work store was fully created (its labels array exists)."""
        return (self.store / "labels" / "zarr.json").is_file()

    def commit(self, digest: str, values: Mapping[str, Any]) -> None:
        """Record the fingerprint: from now on this work can be resumed."""
        _write_json(self.work / "fingerprint.json", {"fingerprint": digest, "values": dict(values)})

    def discard_work(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def discard_published(self) -> None:
        shutil.rmtree(self.published_store, ignore_errors=True)
        self.published_cog.unlink(missing_ok=True)

    def add_attempt(self) -> int:
        path = self.work / "attempts"
        count = (int(path.read_text()) if path.is_file() else 0) + 1
        _write_text(path, str(count))
        return count

    def attempts(self) -> int:
        path = self.work / "attempts"
        return int(path.read_text()) if path.is_file() else 0

    def drop_partial_chunks(self) -> None:
        """Remove chunk files a kill left half-written (zarr writes ``*.partial``, then renames)."""
        for path in self.work.rglob("*.partial"):
            path.unlink(missing_ok=True)

    def tiles_done(self) -> set[tuple[int, int]]:
        if not self.tiles.is_dir():
            return set()
        done = set()
        for entry in os.scandir(self.tiles):
            i, _, j = entry.name.partition("-")
            if i.isdigit() and j.isdigit():
                done.add((int(i), int(j)))
        return done


def record_tile(tiles_dir: str | Path, index: tuple[int, int]) -> None:
    """Record that a tile's chunk is written (after the write, never before)."""
    marker = Path(tiles_dir) / f"{index[0]}-{index[1]}"
    marker.touch()


def publish_store(work_store: str | Path, published: str | Path) -> None:
    """Move a complete store into place (a directory rename on one file system)."""
    target = Path(published)
    if target.exists():
        shutil.rmtree(target)
    try:
        os.replace(work_store, target)
    except OSError as exc:
        raise OutputError(f"cannot publish {target}: {exc}") from exc


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    _write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def write_manifest(path: Path, payload: Mapping[str, Any]) -> None:
    """Write the run manifest atomically."""
    _write_json(path, payload)


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """The manifest of the run that wrote ``out_dir``."""
    path = out_dir / "run.json"
    if not path.is_file():
        raise ConfigError(f"{out_dir} has no run manifest (run.json): is it an fcn-pipeline output?")
    return json.loads(path.read_text())
