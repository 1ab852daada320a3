"""The on-disk record of a run, so nothing is lost, nothing half-published, nothing foreign
overwritten.

Inside the output directory::

    run.json                  the manifest (replaced atomically), with the run history
    STEM.tif, STEM.zarr       published outputs: they appear only when complete
    .fcn-pipeline/.lock       held (flock) by the run writing this directory; it holds
                              "PID RUN-ID" while that run lives: tasks check the run id
                              before every write, so a task of an ended run writes nothing
    .fcn-pipeline/.published/STEM.json
                              what this tool published as STEM.tif/STEM.zarr: fingerprint,
                              the checksum of every file, the figures of the run that made it
    .fcn-pipeline/.scene-digests.json
                              content digests of input scenes, reused while a scene's size,
                              modification time and inode are unchanged
    .fcn-pipeline/.window-speeds.json
                              the model's measured speed per window size, per model
                              and threads: the automatic tile size of every later run
                              into this directory comes from the same figures
    .fcn-pipeline/.trash/     old outputs being replaced (removed once the new ones are in place)
    .fcn-pipeline/.workers.log
                              what the embedded cluster's worker processes printed
    .fcn-pipeline/STEM/       the work of a scene not yet published:
        fingerprint.json      what decides its outputs (input content, model, settings)
        labels.zarr/          the label store being filled, one chunk per tile
        overviews.zarr/       the first overview levels of the COG, one chunk per tile
        tiles/I-J             a record per tile written: the sha256 of each chunk file it
                              wrote, made after those files were synced to disk
        labels.tif            the COG, once made, until it is moved into place
        publishing.json       present from the moment publication may move files
        attempts              how many runs have worked on it

Names beginning with a dot never clash with a scene's work folder: output stems never
begin with one. A rerun with the same fingerprint resumes: only tiles without a valid
record (record parses, every chunk it names is there with its checksum) are computed.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, OutputError, RunEnded

WORK = ".fcn-pipeline"
LOCK = ".lock"
PUBLISHED = ".published"
TRASH = ".trash"
SPEEDS = ".window-speeds.json"
DIGESTS = ".scene-digests.json"
MANIFEST = "run.json"
WORKER_LOG = ".workers.log"
FINGERPRINT_ATTR = "fcn_pipeline_fingerprint"
#: Runs kept in the manifest's history, newest last.
HISTORY_LIMIT = 200
_HASH_BLOCK = 4 * 2**20


def fingerprint(values: Mapping[str, Any]) -> str:
    """A stable digest of the JSON-able values that decide a scene's outputs."""
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path) -> Any:
    """The JSON document at ``path``, or None when it is missing, unreadable or does not
    parse (or nests deeper than Python's parser goes): a damaged journal file counts as
    absent, never as an error of the run."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


# --------------------------------------------------------------------------- the lock


def _held_error(out_dir: Path, fd: int) -> ConfigError:
    holder = os.pread(fd, 64, 0).decode(errors="replace").split()
    return ConfigError(
        f"another fcn-pipeline run (pid {holder[0] if holder else 'unknown'}) is writing "
        f"{out_dir}; wait for it to finish or choose another --out"
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
    """Fail at once when another run holds ``out_dir``'s lock (a cheap early check that
    creates nothing)."""
    path = out_dir / WORK / LOCK
    if not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # unreadable: the run itself will say why it cannot write there
    try:
        _take_lock(fd, out_dir)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def locked(out_dir: Path, run_id: str) -> Iterator[None]:
    """Hold the output directory's lock for run ``run_id``; fail at once when another
    run holds it.

    The lock is an ``flock`` on a file, so the kernel releases it when the holder
    dies, even by SIGKILL: a stale lock never blocks a rerun. While held, the file
    says ``PID RUN-ID``; it is emptied before the lock is released, which is what
    tells a task still running somewhere that its run has ended (:func:`check_run`).
    """
    work = out_dir / WORK
    work.mkdir(parents=True, exist_ok=True)
    # O_NOFOLLOW: a link planted at the lock's name is refused, its target never truncated.
    fd = os.open(work / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        _take_lock(fd, out_dir)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {run_id}\n".encode(), 0)
        os.fsync(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            with suppress(OSError):
                os.fsync(fd)
    finally:
        os.close(fd)


def check_run(out_dir: str | Path, run_id: str) -> None:
    """Raise :class:`RunEnded` unless run ``run_id`` still holds ``out_dir``.

    Tasks call this before every write: a run that was interrupted (or lost its
    client) empties its lock file before releasing it, and a later run writes its own
    id, so a task of an ended run, still executing on some worker, writes nothing.
    """
    try:
        with open(Path(out_dir) / WORK / LOCK, "rb") as stream:
            holder = stream.read(256).decode(errors="replace").split()
    except OSError:
        holder = []
    if len(holder) < 2 or holder[1] != run_id:
        raise RunEnded(f"run {run_id} no longer holds {out_dir}: its tasks write nothing more")


# --------------------------------------------------------------------------- small files


def _fsync_dir(path: Path) -> None:
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Flush a written file to disk (its data, not only the page cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str, *, durable: bool = False) -> None:
    """Replace ``path`` atomically; on failure (disk full) no temporary file stays behind."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as stream:
            stream.write(text)
            if durable:
                stream.flush()
                os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def write_json(path: Path, payload: Mapping[str, Any], *, durable: bool = False) -> None:
    """Write ``payload`` as JSON at ``path`` atomically (see :func:`_write_text`)."""
    _write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n",
                durable=durable)


# --------------------------------------------------------------------------- speeds, digests


def _speeds_path(out_dir: Path) -> Path:
    return out_dir / WORK / SPEEDS


def load_window_speeds(out_dir: Path, key: str) -> dict[tuple[int, int], float] | None:
    """The window speeds measured for ``key`` by an earlier run into ``out_dir``."""
    stored = read_json(_speeds_path(out_dir))
    entry = stored.get(key) if isinstance(stored, dict) else None
    if not isinstance(entry, dict) or not entry:
        return None
    speeds = {}
    try:
        for shape, speed in entry.items():
            rows, _, cols = shape.partition("x")
            speeds[(int(rows), int(cols))] = float(speed)
    except (TypeError, ValueError):
        return None  # damaged: measured again
    return speeds


def save_window_speeds(out_dir: Path, key: str, speeds: Mapping[tuple[int, int], float]) -> None:
    """Remember ``speeds`` for ``key`` in ``out_dir`` (kept beside other keys' figures)."""
    path = _speeds_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = read_json(path)
    stored = stored if isinstance(stored, dict) else {}
    stored[key] = {f"{r}x{c}": speed for (r, c), speed in sorted(speeds.items())}
    write_json(path, stored)


@dataclass(frozen=True)
class FileIdentity:
    """What changes when a file is modified or replaced: size, modification time, inode,
    and the inode's change time, which no program can set back (a write that restores
    the modification time still changes it)."""

    size: int
    mtime_ns: int
    inode: int
    device: int
    ctime_ns: int = 0

    @classmethod
    def of(cls, path: str | Path) -> FileIdentity:
        st = os.stat(path)
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns)

    def key(self) -> list[int]:
        return [self.size, self.mtime_ns, self.inode, self.device, self.ctime_ns]


class DigestCache:
    """Content digests of scene files, reused while their :class:`FileIdentity` holds.

    The input part of a scene's fingerprint is the sha256 of its bytes, so a scene
    copied or generated again with identical content is the same input; hashing
    runs at about 1.1 GB/s a core, and this cache makes a rerun pay it only for
    files that changed identity.
    """

    def __init__(self, out_dir: Path | None) -> None:
        self.path = out_dir / WORK / DIGESTS if out_dir is not None else None
        stored = read_json(self.path) if self.path is not None else None
        self.entries: dict[str, Any] = stored if isinstance(stored, dict) else {}
        self.changed = False

    def digest(self, path: str) -> tuple[str, FileIdentity]:
        """sha256 of the file at ``path`` (absolute), from the cache while still valid, and
        the file's identity taken before it was read."""
        identity = FileIdentity.of(path)
        entry = self.entries.get(path)
        if isinstance(entry, dict) and entry.get("identity") == identity.key() \
                and isinstance(entry.get("sha256"), str):
            return str(entry["sha256"]), identity
        value = file_digest(path)
        self.remember(path, value, identity)
        return value, identity

    def remember(self, path: str, digest: str, identity: FileIdentity) -> None:
        entry = {"identity": identity.key(), "sha256": digest}
        if self.entries.get(path) != entry:
            self.entries[path] = entry
            self.changed = True

    def save(self) -> None:
        """Write the cache back (only when something was hashed, and never in a dry run)."""
        if self.path is not None and self.changed:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, self.entries)
            self.changed = False


def clean_leftovers(out_dir: Path) -> list[Path]:
    """Remove temporary files a killed run left next to the outputs and in the journal,
    and old outputs left in the trash by a publication that was cut short."""
    removed = []
    for pattern in (".*.tmp", ".*.aux.xml", f"{WORK}/.*.tmp", f"{WORK}/{PUBLISHED}/.*.tmp"):
        for path in out_dir.glob(pattern):
            path.unlink(missing_ok=True)
            removed.append(path)
    trash = out_dir / WORK / TRASH
    if trash.is_dir():
        for path in trash.iterdir():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:  # a file, or a link (never followed: its target is not ours)
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# --------------------------------------------------------------------------- one scene


@dataclass(frozen=True)
class PublishedRecord:
    """What this tool published as a scene's outputs (``.fcn-pipeline/.published/STEM.json``).

    ``cog`` holds ``sha256``, ``bytes`` and ``mtime_ns`` of ``STEM.tif``; ``zarr`` holds
    ``sha256`` (of its listing) and ``files`` (relative path -> sha256) of
    ``STEM.zarr``; ``figures`` the scene's figures from the run that published it.
    """

    fingerprint: str
    scene: str
    cog: Mapping[str, Any]
    zarr: Mapping[str, Any]
    figures: Mapping[str, Any]
    #: The values behind the fingerprint (what a refusal names as changed).
    values: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: Any) -> PublishedRecord | None:
        if not isinstance(data, dict):
            return None
        try:
            record = cls(str(data["fingerprint"]), str(data.get("scene", "")), dict(data["cog"]),
                         dict(data["zarr"]), dict(data.get("figures") or {}),
                         dict(data.get("values") or {}))
        except (KeyError, TypeError, ValueError):
            return None
        if not isinstance(record.zarr.get("files"), dict):
            return None
        return record

    def to_json(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "scene": self.scene, "cog": dict(self.cog),
                "zarr": dict(self.zarr), "figures": dict(self.figures),
                "values": dict(self.values)}


def has_links(folder: Path) -> bool:
    """Whether ``folder`` is, or holds at any depth, a symbolic link (never followed)."""
    if folder.is_symlink():
        return True
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in (*dirs, *files):
            if os.path.islink(os.path.join(root, name)):
                return True
    return False


def listing_digest(files: Mapping[str, str]) -> str:
    """One sha256 for a store: of its sorted ``relative path -> sha256`` listing."""
    return fingerprint(dict(sorted(files.items())))


def store_files(store: Path) -> list[str]:
    """Every file of a store, as sorted paths relative to it."""
    return sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())


def cog_matches(path: Path, recorded: Mapping[str, Any]) -> bool:
    """Whether the file at ``path`` is the COG ``recorded`` describes (``bytes``,
    ``mtime_ns``, ``sha256``): same size and modification time, or, for a copy that
    did not keep its time, same size and content."""
    try:
        st = path.stat()
    except OSError:
        return False
    if not path.is_file() or st.st_size != recorded.get("bytes"):
        return False
    if st.st_mtime_ns == recorded.get("mtime_ns"):
        return True
    try:
        return file_digest(path) == recorded.get("sha256")
    except OSError:
        return False


@dataclass(frozen=True)
class SceneRecord:
    """Paths and journal of one scene's work and published outputs."""

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
    def cog(self) -> Path:
        """The COG once made, until publication moves it into place."""
        return self.work / "labels.tif"

    @property
    def publishing(self) -> Path:
        return self.work / "publishing.json"

    @property
    def published_store(self) -> Path:
        return self.out_dir / f"{self.stem}.zarr"

    @property
    def published_cog(self) -> Path:
        return self.out_dir / f"{self.stem}.tif"

    @property
    def published_record_path(self) -> Path:
        return self.out_dir / WORK / PUBLISHED / f"{self.stem}.json"

    # ----------------------------------------------------------------- state

    def work_fingerprint(self) -> str | None:
        """The fingerprint of the work in progress; None when absent or damaged."""
        data = read_json(self.work / "fingerprint.json")
        value = data.get("fingerprint") if isinstance(data, dict) else None
        return value if isinstance(value, str) and value else None

    def published_record(self) -> PublishedRecord | None:
        """What this tool last published for the stem; None when absent or damaged."""
        return PublishedRecord.parse(read_json(self.published_record_path))

    def store_fingerprint(self) -> str | None:
        """The fingerprint attribute of the published store, if it has one."""
        data = read_json(self.published_store / "zarr.json")
        attrs = data.get("attributes") if isinstance(data, dict) else None
        value = attrs.get(FINGERPRINT_ATTR) if isinstance(attrs, dict) else None
        return value if isinstance(value, str) else None

    def publishing_state(self) -> dict[str, Any] | None:
        """The publication in progress (COG checksum, store listing), if one started."""
        data = read_json(self.publishing)
        return data if isinstance(data, dict) and "fingerprint" in data else None

    def _ours(self, fingerprints: set[str], cog_identities: list[Mapping[str, Any]]) -> bool:
        cog, store = self.published_cog, self.published_store
        if os.path.lexists(store) and (store.is_symlink() or self.store_fingerprint()
                                       not in fingerprints):
            return False
        return not os.path.lexists(cog) or (
            not cog.is_symlink() and any(cog_matches(cog, c) for c in cog_identities)
        )

    def foreign_outputs(self) -> list[Path]:
        """``STEM.tif``/``STEM.zarr`` in the output directory that this tool did not make
        there (no record of this directory's journal matches them)."""
        fingerprints: set[str] = set()
        identities: list[Mapping[str, Any]] = []
        record = self.published_record()
        if record is not None:
            fingerprints.add(record.fingerprint)
            identities.append(record.cog)
        work = self.work_fingerprint()
        state = self.publishing_state()
        if work is not None:
            fingerprints.add(work)
            if state is not None and state.get("fingerprint") == work:
                identities.append(state.get("cog") or {})
        foreign = []
        for path in (self.published_cog, self.published_store):
            if os.path.lexists(path) and not self._ours(fingerprints, identities):
                foreign.append(path)
        return foreign

    def published_as(self, digest: str, *, deep: bool = True) -> PublishedRecord | None:
        """The record when the outputs in place are this tool's publication of ``digest``
        and intact: the record, the store's attribute, the COG (size and time, or content)
        and, with ``deep``, every file of the store (its checksum) agree; else None.

        ``deep=False`` suits a task of the run that published the scene a moment ago
        (is there anything left to write?); whether a rerun may skip the scene is decided
        with ``deep``, which reads the whole store."""
        record = self.published_record()
        if record is None or record.fingerprint != digest:
            return None
        if self.store_fingerprint() != digest or not cog_matches(self.published_cog, record.cog):
            return None
        if deep and not self._store_intact(record):
            return None
        return record

    def _store_intact(self, record: PublishedRecord) -> bool:
        """Whether the published store holds exactly the files recorded, unchanged."""
        store = self.published_store
        if has_links(store):
            return False
        try:
            files = {rel: file_digest(store / rel) for rel in store_files(store)}
        except OSError:
            return False
        return listing_digest(files) == record.zarr.get("sha256")

    def work_has_links(self) -> bool:
        """Whether a link lies anywhere in the work folder: never made by this tool, and one
        a resume would follow out of the output folder (the work is then started again)."""
        return has_links(self.work)

    # ----------------------------------------------------------------- changes

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

    def commit(self, digest: str, values: Mapping[str, Any], scene: str = "") -> None:
        """Record the fingerprint (and the scene file it is of): from now on this work can be
        resumed."""
        write_json(self.work / "fingerprint.json",
                   {"fingerprint": digest, "values": dict(values), "scene": scene}, durable=True)

    def work_values(self) -> dict[str, Any]:
        """The values behind the work's fingerprint (empty when absent or damaged)."""
        data = read_json(self.work / "fingerprint.json")
        values = data.get("values") if isinstance(data, dict) else None
        return dict(values) if isinstance(values, dict) else {}

    def discard_work(self) -> None:
        """Remove the scene's work folder (a link in its place is removed, never followed)."""
        if self.work.is_symlink():
            self.work.unlink()
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    def add_attempt(self) -> int:
        path = self.work / "attempts"
        count = self.attempts() + 1
        _write_text(path, str(count))
        return count

    def attempts(self) -> int:
        try:
            return int((self.work / "attempts").read_text().strip())
        except (OSError, ValueError):
            return 0

    def drop_partial_chunks(self) -> None:
        """Remove chunk files a kill left half-written (zarr writes ``*.partial``, then renames)."""
        for path in self.work.rglob("*.partial"):
            path.unlink(missing_ok=True)

    # ----------------------------------------------------------------- tile records

    def tile_records(self) -> dict[tuple[int, int], dict[str, str]]:
        """Tile index -> ``{chunk file relative to the work folder: sha256}``; records that do
        not parse are left out (their tiles count as not written)."""
        if not self.tiles.is_dir():
            return {}
        records = {}
        for entry in os.scandir(self.tiles):
            i, _, j = entry.name.partition("-")
            if not (i.isdigit() and j.isdigit()):
                continue
            data = read_json(Path(entry.path))
            files = data.get("files") if isinstance(data, dict) else None
            if isinstance(files, dict) and all(isinstance(v, str) for v in files.values()):
                records[(int(i), int(j))] = files
        return records

    def tiles_done(self) -> set[tuple[int, int]]:
        """Tiles with a record that parses (not checked against their chunks)."""
        return set(self.tile_records())

    def verified_tiles(self) -> tuple[set[tuple[int, int]], list[str]]:
        """Tiles whose record parses and whose every chunk file is there with its recorded
        sha256; the records of the others are removed, so those tiles are computed again.

        Returns the good tiles and a line per damaged tile naming its bad chunk.
        """
        good: set[tuple[int, int]] = set()
        damaged: list[str] = []
        recorded = self.tile_records()
        for name in os.listdir(self.tiles) if self.tiles.is_dir() else []:
            i, _, j = name.partition("-")
            if i.isdigit() and j.isdigit() and (int(i), int(j)) not in recorded:
                (self.tiles / name).unlink(missing_ok=True)  # a record that does not parse
                damaged.append(f"tile {i}-{j}: record does not parse")
        for index, files in recorded.items():
            problem = None
            for rel, want in sorted(files.items()):
                path = self.work / rel
                try:
                    if file_digest(path) != want:
                        problem = f"chunk {path} does not match its checksum"
                except OSError as exc:
                    problem = f"chunk {path} cannot be read ({exc.strerror or exc})"
                if problem:
                    break
            if problem is None:
                good.add(index)
            else:
                (self.tiles / f"{index[0]}-{index[1]}").unlink(missing_ok=True)
                damaged.append(f"tile {index[0]}-{index[1]}: {problem}")
        return good, damaged


def stem_owners(out_dir: Path) -> dict[str, str]:
    """Output stem -> the scene file its published outputs or unfinished work are of, from
    the journal of ``out_dir`` (so a scene keeps its stem when a new file's name collides)."""
    owners: dict[str, str] = {}
    work = out_dir / WORK
    published = work / PUBLISHED
    for path in sorted(published.glob("*.json")) if published.is_dir() else []:
        record = PublishedRecord.parse(read_json(path))
        if record is not None and record.scene:
            owners[path.stem] = record.scene
    for path in sorted(work.glob("*/fingerprint.json")) if work.is_dir() else []:
        data = read_json(path)
        scene = data.get("scene") if isinstance(data, dict) else None
        if isinstance(scene, str) and scene:
            owners.setdefault(path.parent.name, scene)
    return owners


def earlier_tile_sizes(out_dir: Path, stems: list[str]) -> set[int]:
    """The tile sizes the published outputs and unfinished work of ``stems`` in ``out_dir``
    were made with (what an automatic choice keeps, so reruns plan the same tiles)."""
    sizes: set[int] = set()
    for stem in stems:
        record = SceneRecord(out_dir, stem)
        data = read_json(record.published_store / "zarr.json")
        attrs = data.get("attributes") if isinstance(data, dict) else None
        size = attrs.get("tile_size") if isinstance(attrs, dict) else None
        if isinstance(size, int) and size > 0:
            sizes.add(size)
        tile = record.work_values().get("tile_shape")
        if isinstance(tile, list) and tile and isinstance(tile[0], int):
            sizes.add(tile[0])
    return sizes


def record_tile(work: str | Path, index: tuple[int, int], files: list[str]) -> None:
    """Record that a tile's chunk files (paths relative to the work folder ``work``) are
    written: each is synced to disk and its sha256 noted, then the record is written
    atomically. Never before the chunks are durable.

    Raises:
        OutputError: a chunk cannot be synced or read, or the record cannot be written
            (disk full): one line naming the file and the cause.
    """
    work = Path(work)
    sums = {}
    record = work / "tiles" / f"{index[0]}-{index[1]}"
    try:
        for rel in files:
            path = work / rel
            fsync_file(path)
            sums[rel] = file_digest(path)
        write_json(record, {"files": sums}, durable=True)
    except OSError as exc:
        raise OutputError(f"cannot record tile {index[0]}-{index[1]} in {record}: "
                          f"{exc.strerror or exc}") from exc


def move_aside(path: Path, out_dir: Path) -> None:
    """Move an old output into the journal's trash (one rename on the same file system), to
    be removed once its replacement is in place."""
    trash = out_dir / WORK / TRASH
    trash.mkdir(parents=True, exist_ok=True)
    os.replace(path, trash / f"{path.name}.{uuid.uuid4().hex[:12]}")


# --------------------------------------------------------------------------- manifest


def write_manifest(out_dir: Path, payload: Mapping[str, Any]) -> Path:
    """Write the run manifest atomically; one :class:`OutputError` line when it cannot be."""
    path = out_dir / MANIFEST
    try:
        write_json(path, payload)
    except OSError as exc:
        raise OutputError(f"cannot write the manifest {path}: {exc.strerror or exc}") from exc
    return path


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """The manifest of the run that wrote ``out_dir``."""
    path = out_dir / MANIFEST
    if not path.is_file():
        raise ConfigError(
            f"{out_dir} has no run manifest (run.json): is it an fcn-pipeline output?"
        )
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("scenes"), list):
        raise ConfigError(f"{path} is not an fcn-pipeline run manifest (it does not parse)")
    data["scenes"] = [s for s in data["scenes"]
                      if isinstance(s, dict) and isinstance(s.get("stem"), str)]
    return data


def previous_history(out_dir: Path) -> list[dict[str, Any]]:
    """The run history of the manifest already in ``out_dir`` (empty when none parses)."""
    data = read_json(out_dir / MANIFEST)
    history = data.get("history") if isinstance(data, dict) else None
    return [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []


def previous_scenes(out_dir: Path) -> list[dict[str, Any]]:
    """The scenes of the manifest already in ``out_dir`` (a run keeps those it does not
    work on itself, so the manifest describes every scene of the folder)."""
    data = read_json(out_dir / MANIFEST)
    scenes = data.get("scenes") if isinstance(data, dict) else None
    if not isinstance(scenes, list):
        return []
    return [s for s in scenes if isinstance(s, dict) and isinstance(s.get("stem"), str)]


def lock_holder(out_dir: Path) -> str | None:
    """The pid of the run holding ``out_dir``'s lock, or None when no run holds it."""
    try:
        check_unlocked(out_dir)
    except ConfigError:
        data = (out_dir / WORK / LOCK).read_text(errors="replace").split()
        return data[0] if data else "unknown"
    return None
