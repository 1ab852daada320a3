"""User files are never destroyed, and paths mean what users type.

Through the real CLI: outputs that would replace an input scene are refused whatever the
options; files this tool did not make in the output folder are refused unless
--overwrite; output names keep Unicode letters and digits and colliding names get a
deterministic suffix; an argument naming an existing file is that file; a pattern that
matches nothing, or a run where no scene can run, creates nothing. How each test was
checked to have teeth is said in a ``Teeth:`` line in its docstring.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import rasterio

from tests.support import STEMS, TILE, Reference, cli, other_lines, sha256, tree

pytestmark = pytest.mark.slow


def _files(folder: Path) -> dict[str, str]:
    return tree(folder) if folder.exists() else {}


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_an_output_that_would_replace_an_input_scene_is_refused(
        overwrite: bool, reference: Reference, tmp_path: Path) -> None:
    """Guarantee 1: `run scenes/x.tif --out scenes` (its label map would be scenes/x.tif)
    exits 2 with one line naming both paths, even with --overwrite, and writes nothing.

    Teeth: check_inputs_kept() removed from preflight: the run replaces the scene with
    its label map and exits 0.
    """
    scenes = tmp_path / "scenes"
    shutil.copytree(reference.scenes[0].parent, scenes)
    before = _files(scenes)
    done = cli("run", str(scenes / f"{STEMS[0]}.tif"), "--out", str(scenes),
               *(["--overwrite"] if overwrite else []))
    assert done.returncode == 2, done.stderr
    lines = other_lines(done.stderr)
    assert len(lines) == 1 and lines[0].count(str(scenes / f"{STEMS[0]}.tif")) == 2, lines
    assert "would replace the input scene" in lines[0], lines  # not the foreign-file refusal
    assert _files(scenes) == before and not (scenes / ".fcn-pipeline").exists()


def test_files_this_tool_did_not_make_are_refused_unless_overwrite(reference: Reference,
                                                                  tmp_path: Path) -> None:
    """Guarantee 1: a STEM.tif and a STEM.zarr of the user's in the output folder are
    refused (exit 2, one line naming the scene and the file); --overwrite replaces them
    with the label maps; the run's own outputs are recognised on the next run.

    Teeth: foreign_outputs() returning [] (every file taken as ours): the first run
    overwrites the user's files and exits 0.
    """
    out = tmp_path / "out"
    (out / f"{STEMS[0]}.zarr").mkdir(parents=True)
    (out / f"{STEMS[0]}.zarr" / "notes.txt").write_text("the user's own store")
    (out / f"{STEMS[0]}.tif").write_bytes(b"the user's own GeoTIFF")
    before = _files(out)
    args = ["run", str(reference.scenes[0]), "--out", str(out), "--tile-size", str(TILE),
            "--workers", "1"]
    refused = cli(*args)
    assert refused.returncode == 2, refused.stderr
    lines = other_lines(refused.stderr)
    assert len(lines) == 1 and str(reference.scenes[0]) in lines[0], lines
    assert f"{STEMS[0]}.tif" in lines[0] or f"{STEMS[0]}.zarr" in lines[0]
    assert "--overwrite" in lines[0]
    assert _files(out) == before

    done = cli(*args, "--overwrite")
    assert done.returncode == 0, done.stderr
    reference.assert_same(out, STEMS[0])
    assert not (out / ".fcn-pipeline" / ".trash").exists() or not any(
        (out / ".fcn-pipeline" / ".trash").iterdir())
    again = cli(*args)  # its own outputs: skipped, not refused
    assert again.returncode == 0, again.stderr
    assert "skipped" in again.stdout


NAMES = {  # scene file name -> output stem
    "снимок.tif": "снимок",
    "衛星画像.tif": "衛星画像",
    "lock.tif": "lock",  # once the journal's lock file name
    "a b.tif": "a_b",
}


def test_unicode_names_and_colliding_names(reference: Reference, tmp_path: Path) -> None:
    """Guarantee 1: Cyrillic and CJK names keep their letters; `a b.tif` and `a_b.tif`
    (one stem) both run, the second with a deterministic suffix; a scene named lock.tif
    runs; the manifest maps each scene to its outputs.

    Teeth: plan._UNSAFE back to ASCII ([^A-Za-z0-9._-]): both non-Latin names become "_",
    and the collision suffix removed (name_outputs returning plain stems): the run
    refuses or overwrites.
    """
    scenes = tmp_path / "in"
    scenes.mkdir()
    for name in [*NAMES, "a_b.tif"]:
        shutil.copy(reference.scenes[0], scenes / name)
    out = tmp_path / "out"
    done = cli("run", *(str(scenes / n) for n in [*NAMES, "a_b.tif"]), "--out", str(out),
               "--tile-size", "160", "--workers", "1")
    assert done.returncode == 0, done.stderr
    scenes_out = json.loads((out / "run.json").read_text())["scenes"]
    by_scene = {Path(s["scene"]).name: s for s in scenes_out}
    for name, stem in NAMES.items():
        assert by_scene[name]["stem"] == stem
        assert by_scene[name]["outputs"] == {"zarr": str(out / f"{stem}.zarr"),
                                             "cog": str(out / f"{stem}.tif")}
    suffixed = by_scene["a_b.tif"]["stem"]
    assert suffixed.startswith("a_b-") and len(suffixed) == len("a_b-") + 8
    with rasterio.open(out / "снимок.tif") as a, rasterio.open(out / f"{suffixed}.tif") as b:
        assert (a.read(1) == b.read(1)).all()  # copies of one scene


def test_an_existing_file_is_never_a_pattern_and_a_pattern_may_match_nothing(
        reference: Reference, tmp_path: Path) -> None:
    """Guarantee 3: `x/scene[1].tif` names that file even though `x/scene1.tif` exists; a
    pattern that matches nothing exits 2 with "pattern matched no file" and creates
    nothing; a run where no scene can run creates no output folder.

    Teeth: expand_scenes globbing every argument with magic characters: the dry run
    plans scene1.tif; out_dir.mkdir() before the scenes are checked: "empty" exists.
    """
    folder = tmp_path / "x"
    folder.mkdir()
    shutil.copy(reference.scenes[0], folder / "scene[1].tif")
    shutil.copy(reference.scenes[1], folder / "scene1.tif")
    dry = cli("run", str(folder / "scene[1].tif"), "--out", str(tmp_path / "out"),
              "--tile-size", str(TILE), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)["scenes"]
    assert [Path(s["scene"]).name for s in planned] == ["scene[1].tif"]

    nothing = cli("run", str(tmp_path / "nowhere" / "*.tif"), "--out", str(tmp_path / "o2"))
    assert nothing.returncode == 2
    assert other_lines(nothing.stderr) == [f"error: {tmp_path / 'nowhere' / '*.tif'}: "
                                           "pattern matched no file"]
    assert not (tmp_path / "o2").exists()

    bogus = tmp_path / "bogus.tif"
    bogus.write_text("not a raster")
    failed = cli("run", str(bogus), "--out", str(tmp_path / "empty"))
    assert failed.returncode == 1
    assert other_lines(failed.stderr) == [f"error: {bogus.name} is not a raster: it has no "
                                          f"TIFF header ({bogus}); fcn-pipeline reads "
                                          "GeoTIFF/COG scenes (VRT with --allow-vrt)"]
    assert not (tmp_path / "empty").exists()
    assert sha256(bogus)  # untouched, still there


def test_links_in_the_journal_and_a_foreign_manifest_are_refused(reference: Reference,
                                                                 tmp_path: Path) -> None:
    """Guarantee 1: a run.json that is not a manifest of this tool, a .fcn-pipeline that
    is a link (the run would delete and truncate what it points at) and a link at the
    lock's name are refused: exit 2, one line, the user's files untouched.

    Teeth: check_journal() removed from preflight: the first run replaces the user's
    run.json; with only the journal link, it deletes the user's folder it points at.
    """
    out, mine = tmp_path / "out", tmp_path / "mine"
    out.mkdir()
    mine.mkdir()
    (out / "run.json").write_text('{"experiment": "my own data"}')
    args = ["run", str(reference.scenes[0]), "--out", str(out), "--tile-size", str(TILE)]
    done = cli(*args)
    assert done.returncode == 2 and other_lines(done.stderr) == [
        f"error: {out / 'run.json'} is not an fcn-pipeline manifest, and a run would replace "
        "it; move it away or choose another --out"]
    (out / "run.json").unlink()
    (mine / STEMS[0]).mkdir()
    (mine / STEMS[0] / "data.txt").write_text("precious")
    (mine / ".lock").write_text("precious")
    os.symlink(mine, out / ".fcn-pipeline")
    done = cli(*args)
    assert done.returncode == 2 and "is a symbolic link" in done.stderr, done.stderr
    (out / ".fcn-pipeline").unlink()
    (out / ".fcn-pipeline").mkdir()
    os.symlink(mine / ".lock", out / ".fcn-pipeline" / ".lock")
    done = cli(*args)
    assert done.returncode == 2 and ".lock is a symbolic link" in done.stderr, done.stderr
    assert (mine / STEMS[0] / "data.txt").read_text() == "precious"
    assert (mine / ".lock").read_text() == "precious"


def test_a_pattern_over_the_output_folder_and_a_new_colliding_name(reference: Reference,
                                                                   tmp_path: Path) -> None:
    """Guarantees 1 and 3: `run "nest/**/*.tif" --out nest/out` works again (its own label
    maps are no scenes); a new file whose name collides with a published scene's does not
    take that scene's outputs: the scene keeps its stem, the new file gets the suffix.

    Teeth: expand_scenes without out_dir: the rerun finds nest/out/scene-000.tif and is
    refused (exit 2); name_outputs without the journal's owners: "a b.tif" (first by
    path) takes "a_b" from a_b.tif.
    """
    nest = tmp_path / "nest"
    (nest / "a").mkdir(parents=True)
    shutil.copy(reference.scenes[0], nest / "a" / "a_b.tif")
    args = ["run", str(nest / "**" / "*.tif"), "--out", str(nest / "out"), "--tile-size",
            str(TILE), "--workers", "1"]
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    shutil.copy(reference.scenes[1], nest / "a" / "a b.tif")
    again = cli(*args, "--dry-run", "--json")
    assert again.returncode == 0, again.stderr
    planned = {Path(s["scene"]).name: (s["stem"], s["action"])
               for s in json.loads(again.stdout)["scenes"]}
    assert planned["a_b.tif"] == ("a_b", "skip")
    assert planned["a b.tif"][0].startswith("a_b-") and planned["a b.tif"][1] == "start"
    assert len(planned) == 2
