"""One line per error, fast: file system errors, and checks made before torch is loaded.

Through the real CLI. The read-only and disk-full tests mount a small tmpfs (they skip
where mounting is not permitted). How each test was checked to have teeth is said in a
``Teeth:`` line in its docstring.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.transform import Affine

from tests.conftest import ROOT, run_cli
from tests.support import STEMS, TILE, Reference, cli, manifest, other_lines

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def tmpfs(folder: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``folder`` (the test skips where mount is refused)."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def remount(folder: Path, size: str) -> None:
    done = subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_an_unwritable_output_folder_is_one_line_before_anything_runs(
        reference: Reference, tmp_path: Path) -> None:
    """Guarantee 5: a read-only output folder and an output path under a file each give
    exit 2 and one line naming the path and the cause.

    Teeth: check_output_dir() removed from preflight: the read-only folder fails later
    with an OutputError (exit 1) after torch was loaded; the path under a file gives
    "cannot create the output folder ... Not a directory" (exit 1).
    """
    scene = str(reference.scenes[0])
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        done = cli("run", scene, "--out", str(ro))
        assert done.returncode == 2, done.stderr
        assert other_lines(done.stderr) == [f"error: --out {ro}: cannot write there "
                                            "(read-only file system)"]
        done = cli("run", scene, "--out", str(ro / "new"))
        assert other_lines(done.stderr) == [f"error: --out {ro / 'new'}: cannot be created in "
                                            f"{ro} (read-only file system)"]
    under = tmp_path / "file.tif"
    under.write_text("x")
    done = cli("run", scene, "--out", str(under / "out"))
    assert done.returncode == 2
    assert other_lines(done.stderr) == [f"error: --out {under / 'out'}: cannot be created, "
                                        f"{under} is a file"]


def test_usage_errors_are_found_without_loading_torch(reference: Reference,
                                                      tmp_path: Path) -> None:
    """Guarantee 5: everything checkable without torch is checked first: with a torch that
    cannot be imported, each usage error still gets its own one line and exit 2.

    Teeth: preflight() called after `from pipeline.run import run` in the CLI: every case
    fails with the fake torch's ImportError instead.
    """
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('torch must not load')\n")
    env = {"PYTHONPATH": f"{fake}:{ROOT}"}
    out = tmp_path / "out"
    (out / f"{STEMS[0]}.tif").parent.mkdir(parents=True)
    (out / f"{STEMS[0]}.tif").write_text("a file of the user's")
    cases = {
        "pattern matched no file": ["run", str(tmp_path / "none*.tif"), "--out", str(out)],
        "which fcn-pipeline did not make": ["run", str(reference.scenes[0]), "--out", str(out)],
        "cannot read the model spec": ["run", str(reference.scenes[0]), "--out", str(out),
                                       "--model", str(tmp_path / "missing.yaml")],
        "would replace the input scene": ["run", str(reference.scenes[0]), "--out",
                                          str(reference.scenes[0].parent)],
        "has the scheme 'http'": ["run", str(reference.scenes[0]), "--out",
                                  str(tmp_path / "o3"), "--scheduler", "http://127.0.0.1:8787"],
    }
    for words, args in cases.items():
        done = cli(*args, env=env)
        assert done.returncode == 2, (words, done.stderr)
        lines = other_lines(done.stderr)
        assert len(lines) == 1 and words in lines[0], (words, lines)
    assert not (tmp_path / "o3").exists()  # a bad scheduler address writes nothing


@pytest.mark.parametrize("size", ["200k", "400k"])
def test_disk_full_fails_the_scenes_in_one_line_each_and_the_next_run_finishes(
        size: str, reference: Reference, tmp_path: Path) -> None:
    """Guarantee 5: a disk that fills up during a run fails the scenes it hits, each with
    one line naming the path and the cause, publishes nothing half-written, still exits
    with its code (1); once space is freed the same command resumes and publishes outputs
    byte-identical to an uninterrupted run. A 200 KiB disk fills while tiles are
    written (chunks, tile records), a 400 KiB one while a COG is made.

    Teeth: the tasks' errors sent with their causes (no _portable_errors): the COG's
    line reads "Exception: OutputError(...)"; record_tile without its OutputError:
    "OSError: [Errno 28] No space left on device" without the path (200k).
    """
    with tmpfs(tmp_path / "disk", size) as disk:
        out = disk / "out"
        args = ["run", *(str(s) for s in reference.scenes), "--out", str(out),
                "--tile-size", str(TILE), "--workers", "1"]
        full = cli(*args)
        assert full.returncode == 1, full.stderr
        lines = other_lines(full.stderr)
        assert lines and all(line.startswith("error: ") and "No space left on device" in line
                             for line in lines), lines
        assert all(str(disk) in line for line in lines), lines
        assert "Traceback" not in full.stderr and "_tiff" not in full.stderr
        assert not any(w in line for line in lines for w in ("Exception:", "Error(", "[Errno")), \
            lines
        for stem in STEMS:  # complete or absent
            if (out / f"{stem}.tif").exists() or (out / f"{stem}.zarr").exists():
                reference.assert_same(out, stem)
        assert any(not (out / f"{stem}.tif").exists() for stem in STEMS), "nothing failed"

        remount(disk, "4m")
        done = cli(*args)
        assert done.returncode == 0, done.stderr
        for stem in STEMS:
            reference.assert_same(out, stem)
        assert all(s["status"] == "done" for s in manifest(out).values())


def test_a_model_that_does_not_take_the_spec_bands_is_one_line(tmp_path: Path,
                                                              reference: Reference) -> None:
    """Guarantee 5: a spec listing 2 bands for a network whose first layer takes 3
    channels is refused before any task runs: exit 2, one line naming both numbers.

    Teeth: the input_channels() check removed from tiling.analyse_model: the output-shape
    check then fails with a ModelAnalysisError traceback.
    """
    demo = ROOT / "pipeline" / "data"
    spec = yaml.safe_load((demo / "demo.yaml").read_text())
    spec.update(weights=str(demo / spec["weights"]), bands=[1, 2])
    for key in ("mean", "std"):
        spec["normalization"][key] = spec["normalization"][key][:2]
    path = tmp_path / "two-bands.yaml"
    path.write_text(yaml.safe_dump(spec))
    done = cli("run", str(reference.scenes[0]), "--out", str(tmp_path / "out"), "--model",
               str(path), "--tile-size", str(TILE))
    assert done.returncode == 2, done.stderr
    lines = other_lines(done.stderr)
    assert len(lines) == 1 and "takes 3 input channels but bands lists 2" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_complex_scene_fails_alone_at_its_header(reference: Reference, tmp_path: Path) -> None:
    """Guarantee 5: a complex-valued scene beside a good one: one line for it, found
    before any task runs; the good scene is published.

    Teeth: the numeric-dtype check removed from readers._check_header: the complex scene
    fails late, inside its tasks, with a numpy casting error.
    """
    complex_scene = tmp_path / f"complex-{uuid.uuid4().hex[:6]}.tif"
    with rasterio.open(complex_scene, "w", driver="GTiff", width=64, height=64, count=3,
                       dtype="complex64", crs="EPSG:32633",
                       transform=Affine(10, 0, 500000, 0, -10, 4600000)) as dst:
        dst.write(np.ones((3, 64, 64), np.complex64))
    out = tmp_path / "out"
    done = cli("run", str(complex_scene), str(reference.scenes[0]), "--out", str(out),
               "--tile-size", str(TILE), "--workers", "1")
    assert done.returncode == 1, done.stderr
    lines = other_lines(done.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: {complex_scene.name} "), lines
    assert "has complex pixels" in lines[0], lines  # the header's refusal, not a numpy error
    refused = manifest(out)[complex_scene.stem]
    assert refused["action"] is None and refused["attempts"] == 0, refused  # no task ran
    reference.assert_same(out, STEMS[0])


def test_a_named_pipe_as_a_scene_fails_at_once(reference: Reference, tmp_path: Path) -> None:
    """Guarantee 5: a FIFO named as a scene (opening it would block forever) fails alone,
    at once, with one line; nothing else runs when it is the only scene.

    Teeth: the regular-file check removed from preflight.check_scene: the run blocks in
    open() until the test's timeout.
    """
    fifo = tmp_path / "pipe.tif"
    os.mkfifo(fifo)
    done = run_cli("run", str(fifo), "--out", str(tmp_path / "out"), timeout=60)
    assert done.returncode == 1, done.stderr
    assert other_lines(done.stderr) == [f"error: pipe.tif is a named pipe ({fifo}); pass a "
                                        "GeoTIFF file"]
    assert not (tmp_path / "out").exists()
