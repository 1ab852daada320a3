"""The journal defends itself, reruns match what users expect, old outputs are replaced,
not deleted, and publication is idempotent.

End to end through the CLI on the session's reference scenes (tests.support), plus
in-process tests of :func:`pipeline.publication.publish` cut short at each step. How
each test was checked to have teeth is said in a ``Teeth:`` line in its docstring.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import rasterio

from pipeline.journal import SceneRecord, locked
from pipeline.publication import PublishTarget, publish
from tests.support import (
    STEMS,
    TILE,
    WORK,
    Processes,
    Reference,
    cli,
    manifest,
    markers,
    other_lines,
    sha256,
    tree,
    wait_for,
)

pytestmark = pytest.mark.slow


def _interrupted_run(reference: Reference, procs: Processes, out: Path, log: Path,
                     records: int = 6) -> set[tuple[int, int]]:
    """Start the reference run into ``out``, SIGTERM it after ``records`` tile records of
    scene-000; return those records."""
    run = procs.cli(reference.args(out, "--workers", "1"), log)
    wait_for(lambda: len(markers(out, STEMS[0])) >= records, f"{records} tile records",
             watch=run)
    os.kill(run.pid, signal.SIGTERM)
    run.popen.wait(timeout=60)
    assert run.popen.returncode == 143, run.stderr()
    return markers(out, STEMS[0])


def _chunk(out: Path, stem: str, index: tuple[int, int]) -> Path:
    return out / WORK / stem / "labels.zarr" / "labels" / "c" / str(index[0]) / str(index[1])


def test_damaged_work_is_computed_again_and_the_result_is_exact(
        reference: Reference, procs: Processes, tmp_path: Path) -> None:
    """Guarantee 6: between two runs, one recorded chunk deleted, one corrupted (same size),
    one tile record emptied: the rerun recomputes exactly those tiles and the unrecorded
    ones, and publishes outputs byte-identical to an uninterrupted run.

    Teeth: verified_tiles() trusting every record (return set(tile_records()), []): the
    rerun keeps the damaged tiles and fails on the corrupt chunk ("cannot read the chunk
    .../labels/c/I/J: Zstd decompression error"), exit 1.
    """
    out = tmp_path / "out"
    recorded = _interrupted_run(reference, procs, out, tmp_path / "first")
    with_data = reference.tiles_with_data(STEMS[0])
    damaged = sorted(recorded & with_data)[:3]
    assert len(damaged) == 3, (recorded, with_data)
    _chunk(out, STEMS[0], damaged[0]).unlink()
    chunk = _chunk(out, STEMS[0], damaged[1])
    chunk.write_bytes(bytes(b ^ 0xFF for b in chunk.read_bytes()))
    (out / WORK / STEMS[0] / "tiles" / f"{damaged[2][0]}-{damaged[2][1]}").write_text("")

    done = cli(*reference.args(out, "--workers", "1"))
    assert done.returncode == 0, done.stderr
    scene = manifest(out)[STEMS[0]]
    assert scene["action"] == "resume"
    assert scene["inferred"] == len(with_data - recorded) + len(damaged)
    for stem in STEMS:
        reference.assert_same(out, stem)


def test_an_unreadable_fingerprint_starts_the_scene_afresh(
        reference: Reference, procs: Processes, tmp_path: Path) -> None:
    """Guarantee 6: an empty fingerprint.json is treated as missing (the scene starts from
    nothing), not a failure of every rerun; --overwrite always starts from nothing, even
    published scenes of the same fingerprint (its dry run says so).

    Teeth: work_fingerprint() raising on a file that does not parse (json.loads of "")
    makes the rerun fail with a traceback.
    """
    out = tmp_path / "out"
    _interrupted_run(reference, procs, out, tmp_path / "first")
    (out / WORK / STEMS[0] / "fingerprint.json").write_text("")
    done = cli(*reference.args(out, "--workers", "1"))
    assert done.returncode == 0, done.stderr
    scenes = manifest(out)
    assert scenes[STEMS[0]]["action"] == "start"
    assert scenes[STEMS[0]]["inferred"] == len(reference.tiles_with_data(STEMS[0]))
    reference.assert_same(out, STEMS[0])

    again = cli(*reference.args(out, "--overwrite", "--dry-run", "--json"))
    assert again.returncode == 0, again.stderr
    assert [s["action"] for s in json.loads(again.stdout)["scenes"]] == ["start", "start"]


def test_verify_names_every_damaged_published_file(reference: Reference,
                                                   tmp_path: Path) -> None:
    """Guarantee 6: the manifest records each published file's checksum; verify checks
    them: exit 0 on intact outputs, exit 1 naming each damaged, missing or foreign file.

    Teeth: verify_outputs comparing only that files exist: the flipped COG byte and the
    corrupted chunk pass and this fails.
    """
    out = tmp_path / "out"
    shutil.copytree(reference.out, out)
    intact = cli("verify", str(out))
    assert intact.returncode == 0, intact.stdout + intact.stderr
    assert intact.stdout.count("ok ") == 2 * len(STEMS)

    cog = out / f"{STEMS[0]}.tif"
    data = bytearray(cog.read_bytes())
    data[len(data) // 2] ^= 0x01
    cog.write_bytes(bytes(data))
    store = out / f"{STEMS[1]}.zarr"
    chunk = next(p for p in sorted((store / "labels" / "c").rglob("*")) if p.is_file())
    chunk.write_bytes(chunk.read_bytes() + b"\0")
    (store / "labels" / "zarr.json").unlink()
    (store / "stray").write_text("not ours")

    damaged = cli("verify", str(out))
    assert damaged.returncode == 1, damaged.stdout
    bad = {line.split()[1].rstrip(":") for line in damaged.stdout.splitlines()
           if line.startswith("DAMAGED")}
    assert bad == {str(cog), str(chunk), str(store / "labels" / "zarr.json"),
                   str(store / "stray")}, damaged.stdout
    assert "4 damaged output file(s)" in damaged.stderr


def test_identical_scenes_with_new_times_are_the_same_input(reference: Reference,
                                                           tmp_path: Path) -> None:
    """Guarantee 7: scenes generated again (same bytes, new modification time, new inode)
    are the same input: the rerun skips them, keeps the figures of the run that made the
    outputs, appends to the run history; a dry run says so and exits 0.

    Teeth: mtime_ns back in the fingerprint (or the digest cache keyed by path only
    while the fingerprint uses identity) makes the rerun refuse the folder (exit 2).
    """
    out = tmp_path / "out"
    shutil.copytree(reference.out, out)
    for scene in reference.scenes:  # replaced by identical copies, as `make demo` does
        copy = scene.with_name(scene.name + ".new")
        shutil.copyfile(scene, copy)
        os.replace(copy, scene)
    dry = cli(*reference.args(out, "--dry-run"))
    assert dry.returncode == 0, dry.stderr
    assert all(f"{stem}: skip" in dry.stdout for stem in STEMS), dry.stdout
    done = cli(*reference.args(out))
    assert done.returncode == 0, done.stderr
    scenes, made = manifest(out), manifest(reference.out)
    for stem in STEMS:
        assert scenes[stem]["skipped"] and scenes[stem]["inferred"] == made[stem]["inferred"]
        reference.assert_same(out, stem)
    history = json.loads((out / "run.json").read_text())["history"]
    assert len(history) == 2 and history[-1]["scenes"] == {"skipped": 2}


def test_overwrite_keeps_the_old_outputs_until_the_new_ones_are_published(
        reference: Reference, procs: Processes, tmp_path: Path) -> None:
    """Guarantee 8: --overwrite (here with another tile size) killed before publishing
    leaves the old outputs untouched; run again, it replaces them.

    Teeth: run._prepare deleting the published outputs when it starts a scene (as the old
    discard_published did): the kill leaves no scene-000.tif and this fails.
    """
    out = tmp_path / "out"
    shutil.copytree(reference.out, out)
    before = {stem: (sha256(out / f"{stem}.tif"), tree(out / f"{stem}.zarr")) for stem in STEMS}
    args = ["run", *map(str, reference.scenes), "--out", str(out), "--tile-size", str(2 * TILE),
            "--workers", "1", "--overwrite"]
    run = procs.cli(args, tmp_path / "overwrite")
    wait_for(lambda: len(markers(out, STEMS[0])) >= 1, "a tile record", watch=run)
    run.kill()
    for stem in STEMS:
        assert (out / f"{stem}.tif").is_file() and (out / f"{stem}.zarr").is_dir(), stem
        assert (sha256(out / f"{stem}.tif"), tree(out / f"{stem}.zarr")) == before[stem]
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    for stem in STEMS:
        meta = json.loads((out / f"{stem}.zarr" / "labels" / "zarr.json").read_text())
        assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [2 * TILE, 2 * TILE]
        with rasterio.open(out / f"{stem}.tif") as cog:
            assert np.array_equal(cog.read(1), reference.labels[stem])
    assert not list((out / WORK / ".trash").glob("*")) if (out / WORK / ".trash").exists() \
        else True


def test_a_scene_replaced_during_the_run_fails_alone(reference: Reference, procs: Processes,
                                                    tmp_path: Path) -> None:
    """Guarantee 8: a scene file replaced while the run reads it fails with one line; the
    other scene is published; nothing is published for the changed one.

    Teeth: tasks._check_unchanged a no-op: the run stitches a map from both files and
    exits 0.
    """
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    for scene in reference.scenes:
        shutil.copy(scene, scenes / scene.name)
    first, second = (scenes / s.name for s in reference.scenes)
    out = tmp_path / "out"
    run = procs.cli(["run", str(first), str(second), "--out", str(out), "--tile-size",
                     str(TILE), "--workers", "1"], tmp_path / "run")
    wait_for(lambda: len(markers(out, STEMS[0])) >= 2, "2 tile records", watch=run)
    replacement = scenes / "replacement.tif"
    shutil.copy(second, replacement)  # other content, same size: only identity tells
    os.replace(replacement, first)
    run.popen.wait(timeout=300)
    assert run.popen.returncode == 1, run.stderr()
    lines = other_lines(run.stderr())
    assert len(lines) == 1 and lines[0].startswith(f"error: {first.name} was modified or "
                                                    "replaced during the run"), lines
    scenes_done = manifest(out)
    assert scenes_done[STEMS[0]]["status"] == "failed"
    assert not (out / f"{STEMS[0]}.tif").exists() and not (out / f"{STEMS[0]}.zarr").exists()
    assert scenes_done[STEMS[1]]["status"] == "done"
    # "Run again to label the file as it is now": the work of the old version is given up.
    again = cli("run", str(first), str(second), "--out", str(out), "--tile-size", str(TILE),
                "--workers", "1")
    assert again.returncode == 0, again.stderr
    assert manifest(out)[STEMS[0]]["action"] == "start"
    with rasterio.open(out / f"{STEMS[0]}.tif") as cog:  # now the other scene's content
        assert np.array_equal(cog.read(1), reference.labels[STEMS[1]])


# ------------------------------------------------------- publication cut short, in process


@pytest.mark.parametrize("cut", ["none", "after-cog", "after-store", "after-cog-move"])
def test_publication_finishes_from_any_point(cut: str, reference: Reference,
                                             tmp_path: Path) -> None:
    """Guarantee 8: publish() run again after being cut short at any step (as Dask reruns
    it when its worker dies, or a rerun does after a kill) finishes cleanly with the same
    outputs and a consistent published record.

    The work folder is rebuilt from the reference's published outputs: the store moved
    back into the work folder, and publishing.json as the first step writes it.

    Teeth: _publish without its "already published" return: the second call fails with
    "labels.zarr does not exist" (the intermittent failure of the poisoned-tile test, whose
    clean scene's publication Dask ran again after a worker holding its result died);
    publish() moving the store whether or not it is in place already fails
    "after-store" and "after-cog-move" with "cannot publish scene-000 ...: No such file or
    directory"; moving the COG
    whether or not it is in place fails "after-cog-move" the same way.
    """
    out = tmp_path / "out"
    shutil.copytree(reference.out, out)
    stem = STEMS[0]
    record = SceneRecord(out, stem)
    published = record.published_record()
    assert published is not None
    digest = published.fingerprint
    # Rewind: the work folder as a finished tile phase leaves it.
    record.tiles.mkdir(parents=True)
    (record.work / "fingerprint.json").write_text(json.dumps({"fingerprint": digest}))
    shutil.move(str(record.published_store), record.store)
    shutil.copy(out / f"{stem}.tif", tmp_path / "old.tif")
    os.unlink(record.published_record_path)
    target = PublishTarget(str(out), stem, "run-x", digest, str(reference.scenes[0]), False)
    with locked(out, "run-x"):
        if cut != "none":
            from pipeline.publication import _make

            state = _make(target)
            assert state["fingerprint"] == digest
            if cut in ("after-store", "after-cog-move"):
                os.replace(record.store, record.published_store)
            if cut == "after-cog-move":
                os.replace(record.cog, record.published_cog)
        result = publish(target)
        # Run once more, as Dask does when the worker holding its result dies after it
        # finished (the work folder is gone then): the same record, nothing moved.
        before = tree(out)
        assert publish(target) == result and tree(out) == before
    assert not record.work.exists()
    assert tree(out / f"{stem}.zarr") == reference.stores[stem]
    with rasterio.open(out / f"{stem}.tif") as cog:
        assert np.array_equal(cog.read(1), reference.labels[stem])
    assert record.published_as(digest) is not None


def test_verify_checks_every_published_scene_and_never_passes_on_nothing(
        reference: Reference, tmp_path: Path) -> None:
    """Guarantee 6: verify checks what the journal says was published, also scenes the
    latest manifest does not list; a folder with nothing published is not "ok".

    Teeth: verify_outputs reading only the manifest's scenes: the damaged scene-000.tif,
    dropped from the manifest, passes (exit 0).
    """
    out = tmp_path / "out"
    shutil.copytree(reference.out, out)
    data = json.loads((out / "run.json").read_text())
    data["scenes"] = [s for s in data["scenes"] if s["stem"] != STEMS[0]]
    (out / "run.json").write_text(json.dumps(data))
    cog = out / f"{STEMS[0]}.tif"
    data_bytes = bytearray(cog.read_bytes())
    data_bytes[len(data_bytes) // 3] ^= 0x40
    cog.write_bytes(bytes(data_bytes))
    damaged = cli("verify", str(out))
    assert damaged.returncode == 1, damaged.stdout
    assert f"DAMAGED  {cog}: checksum differs" in damaged.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "run.json").write_text(json.dumps({"fcn_pipeline": "0", "scenes": []}))
    nothing = cli("verify", str(empty))
    assert nothing.returncode == 2 and "nothing to verify" in nothing.stderr


def test_links_inside_unfinished_work_are_never_followed(reference: Reference,
                                                         procs: Processes,
                                                         tmp_path: Path) -> None:
    """Guarantee 1 and 6: a link planted inside a scene's unfinished work (where a chunk
    folder was) is never written through: the work is started again, the user's folder
    it points at is untouched, the outputs are exact.

    Teeth: decide() without work_has_links(): the resume writes chunks into the victim
    folder and publishes a store holding the link.
    """
    out = tmp_path / "out"
    recorded = _interrupted_run(reference, procs, out, tmp_path / "first")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "0").write_text("USER DATA")
    rows = out / WORK / STEMS[0] / "labels.zarr" / "labels" / "c"
    last = max(i for i, _ in recorded)
    target = rows / str(last + 1)
    if target.exists():
        shutil.rmtree(target)
    os.symlink(victim, target)
    done = cli(*reference.args(out, "--workers", "1"))
    assert done.returncode == 0, done.stderr
    assert [p.name for p in victim.iterdir()] == ["0"]
    assert (victim / "0").read_text() == "USER DATA"
    assert manifest(out)[STEMS[0]]["action"] == "start"
    for stem in STEMS:
        reference.assert_same(out, stem)


def test_a_damaged_published_store_is_computed_again(reference: Reference,
                                                     tmp_path: Path) -> None:
    """Guarantee 6: a published store whose chunk changed is not skipped as published: the
    rerun computes the scene again and the outputs are exact again.

    Teeth: published_as() without _store_intact(): the rerun skips scene-000 and its
    damaged chunk stays.
    """
    out = tmp_path / "out"
    shutil.copytree(reference.out, out)
    chunk = next(p for p in sorted((out / f"{STEMS[0]}.zarr" / "labels" / "c").rglob("*"))
                 if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:-1] + bytes([chunk.read_bytes()[-1] ^ 0xFF]))
    done = cli(*reference.args(out, "--workers", "1"))
    assert done.returncode == 0, done.stderr
    scenes = manifest(out)
    assert scenes[STEMS[0]]["action"] == "start" and scenes[STEMS[1]]["action"] == "skip"
    for stem in STEMS:
        reference.assert_same(out, stem)


def test_verify_never_reads_outside_the_store_and_a_deep_manifest_is_one_line(
        reference: Reference, tmp_path: Path) -> None:
    """A published record is data a user's folder holds: one naming ``../../secret`` or a
    file reached through a link in the store names the record as not this tool's and
    reads nothing outside the store; a ``run.json`` nested past Python's parser is a
    manifest that does not parse (one line), never a RecursionError.

    Teeth: ``_inside`` always True: verify hashes the secret (its digest matches the
    forged record: no DAMAGED line for it); ``read_json`` without RecursionError: a
    traceback, exit 1.
    """
    out = tmp_path / "out"
    shutil.copytree(reference.out, out)
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET\n")
    record_path = out / WORK / ".published" / f"{STEMS[0]}.json"
    record = json.loads(record_path.read_text())
    store = out / f"{STEMS[0]}.zarr"
    escape = os.path.relpath(secret, store)
    (store / "linked").symlink_to(tmp_path, target_is_directory=True)
    forged = {escape: sha256(secret), "linked/secret.txt": sha256(secret)}
    files = record["zarr"]["files"] if "zarr" in record else None
    assert isinstance(files, dict), record.keys()
    files.update(forged)
    record_path.write_text(json.dumps(record))
    result = cli("verify", str(out))
    assert result.returncode == 1, result.stdout + result.stderr
    for rel in forged:
        assert f"DAMAGED  {store / rel}: names a file outside the store" in result.stdout, \
            result.stdout
    (out / "run.json").write_text("[" * 200_000 + "]" * 200_000)
    for args in (["verify", str(out)], ["status", str(out)]):
        deep = cli(*args)
        assert deep.returncode == 2, deep.stderr
        assert "Traceback" not in deep.stderr and len(deep.stderr.strip().splitlines()) == 1
