"""A model spec names code only through installed packages.

A spec's architecture is a built-in name, a name an installed package registers under
the entry-point group ``fcn_pipeline.architectures``, or an import path, which runs only
with ``--trust-spec-code`` (and never into the standard library). The refusal is a usage
error before torch loads, and again on workers; the weights' checksum is verified before
any factory is imported. Markers (:mod:`tests.marker_factories`) prove that refused
code never ran. How each test was checked to have teeth is said in a ``Teeth:`` line.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.transform import Affine

from pipeline import architectures
from pipeline.architectures import resolve_architecture
from pipeline.errors import ModelSpecError
from pipeline.model import build_model, cached_network, clear_model_cache, save_weights
from pipeline.modelspec import ModelSpec, load_spec
from tests import modelspec_factories as factories
from tests.conftest import ROOT
from tests.marker_factories import MARKER_ENV
from tests.modelspec_factories import spec_dict
from tests.support import cli, other_lines

MARKED = "tests.marker_factories:marked"
TRANSFORM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4600000.0)
#: What an import-path refusal says, besides the spec file.
REFUSAL = ("architecture", "runs code", "--trust-spec-code")


@pytest.fixture(autouse=True)
def _fresh() -> Any:
    clear_model_cache()
    yield
    clear_model_cache()


def write_scene(path: Path, size: int = 32) -> Path:
    """A 3-band uint8 GeoTIFF of random values."""
    values = np.random.default_rng(0).integers(0, 255, (3, size, size), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3,
                       dtype="uint8", crs="EPSG:32633", transform=TRANSFORM) as dst:
        dst.write(values)
    return path


def write_marked_spec(folder: Path, architecture: str = MARKED, *, sha256: str | None = None,
                      arguments: dict[str, Any] | None = None, name: str = "spec.yaml") -> Path:
    """Tiny weights and a spec naming ``architecture`` (their real sha256 unless given)."""
    folder.mkdir(parents=True, exist_ok=True)
    digest = save_weights(factories.tiny(num_classes=3).eval(), folder / "tiny.safetensors")
    data = spec_dict(architecture=architecture, sha256=sha256 or digest,
                     arguments={"num_classes": 3} if arguments is None else arguments)
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def shadowed_torch(folder: Path) -> str:
    """A PYTHONPATH on which ``import torch`` fails: a command that answers with its own
    message under it never loaded torch."""
    fake = folder / "no-torch" / "torch"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text("raise ImportError('torch was loaded')\n")
    return os.pathsep.join([str(fake.parent), str(ROOT)])


def marks(marker: Path) -> list[str]:
    return [line.split()[0] for line in marker.read_text().splitlines()] if marker.exists() \
        else []


# --------------------------------------------------------------------------- refusals


@pytest.mark.slow
def test_an_import_path_is_refused_by_every_command_without_the_flag(tmp_path: Path) -> None:
    """run, run --dry-run and validate (a workflow naming the spec) refuse an import path
    before torch loads (torch cannot even be imported); inspect, bench and demo evaluate
    refuse it too: exit 2, one line naming the spec, the field, that it runs code and
    the flag; the marker file shows the module was never imported nor its factory called.

    Teeth: preflight without resolve_architecture(): run and validate exit 1 (torch
    is loaded to build the model); build_model() ignoring trust_code (resolving with
    trust): the marker holds "imported called" and inspect exits 0.
    """
    spec = write_marked_spec(tmp_path / "model")
    scene = write_scene(tmp_path / "scene.tif")
    marker = tmp_path / "marker"
    workflow = tmp_path / "flow.yaml"
    workflow.write_text(f"schema: 1\nscenes: [{scene}]\nmodel: {spec}\noutput: {tmp_path}/o\n")
    no_torch = shadowed_torch(tmp_path)
    commands: list[tuple[list[str], str | None]] = [
        (["run", str(scene), "--out", str(tmp_path / "o"), "--model", str(spec)], no_torch),
        (["run", str(scene), "--out", str(tmp_path / "o"), "--model", str(spec), "--dry-run"],
         no_torch),
        (["validate", str(workflow)], no_torch),
        (["inspect", str(spec)], None),
        (["bench", "--model", str(spec), "--skip-run", "--size", "64"], None),
        (["demo", "evaluate", "--model", str(spec), "--size", "64"], None),
    ]
    for args, path in commands:
        env = {MARKER_ENV: str(marker), **({"PYTHONPATH": path} if path else {})}
        done = cli(*args, env=env)
        lines = other_lines(done.stderr)
        assert done.returncode == 2, (args, done.stderr)
        assert len(lines) == 1 and str(spec) in lines[0], (args, lines)
        assert all(word in lines[0] for word in REFUSAL), (args, lines)
        assert marks(marker) == [], (args, marks(marker))
    assert not (tmp_path / "o").exists()


HOSTILE = [
    ("os:system", {"command": "touch {marker}"}),
    ("subprocess:run", {"args": ["touch", "{marker}"]}),
    ("builtins:open", {"file": "{marker}", "mode": "w"}),
    ("os.path:join", {"a": "{marker}"}),
    ("importlib:import_module", {"name": "tests.marker_factories"}),
    ("__main__:main", {}),
    ("posix:system", {"command": "touch {marker}"}),
]


@pytest.mark.parametrize(("architecture", "arguments"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_the_standard_library_is_refused_even_when_trusted(
        tmp_path: Path, architecture: str, arguments: dict[str, Any]) -> None:
    """``os:system`` with ``arguments: {command: ...}`` and the like: refused with and
    without trust, naming the standard library; nothing runs.

    Teeth: is_standard_library() returning False: with trust, os:system touches the
    marker and the test fails on "no error raised".
    """
    marker = tmp_path / "marker"
    filled = json.loads(json.dumps(arguments).replace("{marker}", str(marker)))
    spec = load_spec(write_marked_spec(tmp_path, architecture, arguments=filled))
    for trust in (False, True):
        with pytest.raises(ModelSpecError, match="leads into the standard library") as caught:
            build_model(spec, trust_code=trust)
        assert str(spec.path) in str(caught.value) and "--trust-spec-code" in str(caught.value)
    assert not marker.exists()


def test_a_trusted_path_through_an_attribute_into_the_standard_library_is_refused(
        tmp_path: Path) -> None:
    """``tests.marker_factories:os.system`` (a module's attribute that is the standard
    library's): refused after the import, before the call.

    Teeth: the check of the attributes' modules in model._factory removed: os.system
    runs and touches the marker.
    """
    marker = tmp_path / "touched"
    spec = load_spec(write_marked_spec(tmp_path, "tests.marker_factories:os.system",
                                       arguments={"command": f"touch {marker}"}))
    with pytest.raises(ModelSpecError, match=r"leads into the standard library \(os"):
        build_model(spec, trust_code=True)
    assert not marker.exists()


def test_a_worker_refuses_an_untrusted_import_path(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """cached_network, what tasks call on workers, decides again from the model reference's
    trust: without it the factory is never called and nothing is cached.

    Teeth: cached_network() resolving with trust_code=True whatever it is given: the
    factory is called (the marker says "called").
    """
    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    path = write_marked_spec(tmp_path / "model")
    digest = load_spec(path).sha256
    assert digest is not None
    with pytest.raises(ModelSpecError, match="is an import path: it runs code"):
        cached_network(str(path), digest, "cpu")
    assert "called" not in marks(marker)
    cached_network(str(path), digest, "cpu", trust_code=True)
    assert "called" in marks(marker)


def test_tasks_carry_the_trust_of_the_run_to_the_workers(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The tile tasks of a scene, run by a Dask worker: with a model reference that does
    not carry trust they fail with the refusal and the factory is never called; with
    trust they label the scene.

    Teeth: predict_tiles() not passing model_ref.trust_code on: the trusted tasks fail
    with the refusal.
    """
    from distributed import Client, LocalCluster

    from pipeline.analysis import receptive_field
    from pipeline.graph import SceneJob, Waves
    from pipeline.grid import TileGrid
    from pipeline.journal import FileIdentity, SceneRecord, locked
    from pipeline.plan import ScenePlan, outputs_for
    from pipeline.readers import open_scene
    from pipeline.tasks import ModelRef
    from pipeline.writers import LabelStoreSpec, create_label_store

    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    spec_path = write_marked_spec(tmp_path / "model")
    spec = load_spec(spec_path)
    assert spec.sha256 is not None
    scene = write_scene(tmp_path / "scene.tif", 48)
    info = open_scene(scene)
    field = receptive_field(factories.tiny(num_classes=3))
    outcomes = {}
    for trust in (False, True):
        out = tmp_path / f"out-{trust}"
        plan = ScenePlan(info, TileGrid.build(info.shape, info.shape, field, 16),
                         outputs_for(scene, out))
        record = SceneRecord(out, plan.outputs.stem)
        record.start()
        create_label_store(record.store, LabelStoreSpec(
            shape=info.shape, chunks=plan.grid.tile_shape, crs=info.crs,
            transform=info.transform, classes=spec.classes, nodata=255))
        job = SceneJob(plan, str(out), "run-1", "f" * 64, FileIdentity.of(scene))
        model = ModelRef(str(spec_path), spec.sha256, "cpu", trust_code=trust)
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                          dashboard_address=":0") as cluster, \
                Client(cluster) as client, locked(out, job.run_id):
            ended = list(Waves(client, {0: job}, model, batch_size=4, probabilities=False,
                               gpu=False))
            outcomes[trust] = [str(e.future.exception()) if e.future.status == "error"
                               else e.future.status for e in ended if not e.publish]
        if not trust:
            assert "called" not in marks(marker)
        clear_model_cache()
    # the first refusal fails the scene: its other tasks are cancelled, never run
    refused = [o for o in outcomes[False] if o != "cancelled"]
    assert refused and all("is an import path: it runs code" in o for o in refused), \
        outcomes[False]
    assert set(outcomes[True]) == {"finished"}, outcomes[True]


# --------------------------------------------------------------------------- order


def test_the_checksum_is_verified_before_any_factory_is_imported(tmp_path: Path) -> None:
    """A trusted import path whose weights do not match the spec's sha256: exit 2 naming
    both digests; the factory's module was never imported (nor in build_model, nor in
    cached_network).

    Teeth: build_model() assembling before check_digest(): the marker says "imported"
    and "called" (the in-process half of the test fails); the CLI half is kept by
    preflight's verify_weights().
    """
    marker = tmp_path / "marker"
    spec_path = write_marked_spec(tmp_path / "model", sha256="0" * 64)
    scene = write_scene(tmp_path / "scene.tif")
    done = cli("run", str(scene), "--out", str(tmp_path / "o"), "--model", str(spec_path),
               "--trust-spec-code", env={MARKER_ENV: str(marker)})
    assert done.returncode == 2, done.stderr
    assert "sha256 does not match" in done.stderr
    assert marks(marker) == []
    code = (
        "import sys\n"
        "from pipeline.errors import ModelSpecError\n"
        "from pipeline.model import build_model, cached_network\n"
        "from pipeline.modelspec import load_spec, file_sha256\n"
        f"spec = load_spec({str(spec_path)!r})\n"
        "for call in (lambda: build_model(spec, trust_code=True),\n"
        "             lambda: cached_network(str(spec.path), file_sha256(spec.weights), 'cpu',\n"
        "                                  trust_code=True)):\n"
        "    try:\n"
        "        call()\n"
        "    except ModelSpecError as exc:\n"
        "        assert 'sha256 does not match' in str(exc), exc\n"
        "    else:\n"
        "        sys.exit('built')\n"
        "assert 'tests.marker_factories' not in sys.modules\n"
    )
    import subprocess

    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, MARKER_ENV: str(marker), "PYTHONPATH": str(ROOT)},
                         timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert marks(marker) == []


# --------------------------------------------------------------------------- trusted runs


@pytest.mark.slow
def test_a_trusted_run_and_toggling_trust_restarts_no_finished_scene(tmp_path: Path) -> None:
    """With --trust-spec-code the workers build the import path's network and the run
    publishes the scene; the same run trusted by FCN_PIPELINE_TRUST_SPEC_CODE skips it,
    and a workflow with trust_spec_code: true validates. A built-in architecture run
    without trust, then again with it, skips it too: trust is no part of the fingerprint.

    Teeth: trust_spec_code added to actions.fingerprint_values: the built-in run with
    the flag refuses the scene ("published with other settings") and exits 2.
    """
    from pipeline.throughput import write_builtin_spec

    marker = tmp_path / "marker"
    spec = write_marked_spec(tmp_path / "model")
    scene = write_scene(tmp_path / "scene.tif")
    out = tmp_path / "out"

    def run(model: Path, folder: Path, *extra: str, env: dict[str, str] | None = None,
            ) -> list[bool]:
        done = cli("run", str(scene), "--out", str(folder), "--model", str(model),
                   "--tile-size", "16", "--workers", "1", "--json", *extra, env=env)
        assert done.returncode == 0, done.stderr
        return [s["skipped"] for s in json.loads(done.stdout)["scenes"]]

    assert run(spec, out, "--trust-spec-code", env={MARKER_ENV: str(marker)}) == [False]
    assert (out / "scene.tif").is_file() and "called" in marks(marker)
    assert run(spec, out, env={"FCN_PIPELINE_TRUST_SPEC_CODE": "1"}) == [True]
    assert json.loads((out / "run.json").read_text())["config"]["trust_spec_code"] is True
    workflow = tmp_path / "flow.yaml"
    workflow.write_text(f"schema: 1\ntrust_spec_code: true\nmodel: {spec}\n"
                        f"scenes: [{scene}]\noutput: {out}\n")
    checked = cli("validate", str(workflow))
    assert checked.returncode == 0 and "trust_spec_code: true" in checked.stdout, checked.stderr
    built_in = write_builtin_spec("unet-small", tmp_path / "unet", {"base": 2, "depth": 2})
    assert run(built_in, tmp_path / "out-unet") == [False]
    assert run(built_in, tmp_path / "out-unet", "--trust-spec-code") == [True]


# --------------------------------------------------------------------------- entry points


def make_distribution(folder: Path, entries: str, package: str = "mypkg",
                      version: str = "0.1") -> Path:
    """An installed distribution ``package`` in ``folder`` (put it on sys.path): its
    module builds the tiny network and marks its import and calls; ``entries`` is the
    body of its ``[fcn_pipeline.architectures]`` entry points."""
    folder.mkdir(parents=True, exist_ok=True)
    module = folder / package
    module.mkdir()
    (module / "__init__.py").write_text(
        "import os\n"
        "def _mark(what):\n"
        f"    path = os.environ.get({MARKER_ENV!r})\n"
        "    if path:\n"
        "        with open(path, 'a') as stream:\n"
        "            stream.write(f'{what} {os.getpid()}\\n')\n"
        "_mark('imported')\n"
        "def factory(in_channels=3, num_classes=3, width=4):\n"
        "    from torch import nn\n"
        "    _mark('called')\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),\n"
        "                         nn.Conv2d(width, num_classes, 1))\n"
    )
    info = folder / f"{package}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[fcn_pipeline.architectures]\n{entries}\n")
    return folder


@pytest.mark.slow
def test_a_network_an_installed_package_registers_runs_without_the_flag(tmp_path: Path) -> None:
    """A real distribution (``mypkg-0.1.dist-info`` with ``entry_points.txt``) on the
    PYTHONPATH of the CLI registers ``tiny-ep``; ``fcn-pipeline run`` with
    ``architecture: tiny-ep`` and no flag labels the scene, its workers importing the
    package; with a sha256 that does not match, the package is never imported.

    Teeth: resolve_architecture() refusing names that are not built in (no entry
    points): the run exits 2 "is neither a built-in architecture".
    """
    site = make_distribution(tmp_path / "site", "tiny-ep = mypkg:factory")
    pythonpath = os.pathsep.join([str(site), str(ROOT)])
    spec = write_marked_spec(tmp_path / "model", "tiny-ep")
    scene = write_scene(tmp_path / "scene.tif")
    marker = tmp_path / "marker"
    done = cli("run", str(scene), "--out", str(tmp_path / "out"), "--model", str(spec),
               "--tile-size", "16", "--workers", "1",
               env={"PYTHONPATH": pythonpath, MARKER_ENV: str(marker)})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "scene.tif").is_file()
    assert {"imported", "called"} <= set(marks(marker))
    bad = write_marked_spec(tmp_path / "bad", "tiny-ep", sha256="0" * 64)
    other = tmp_path / "other-marker"
    refused = cli("run", str(scene), "--out", str(tmp_path / "out2"), "--model", str(bad),
                  env={"PYTHONPATH": pythonpath, MARKER_ENV: str(other)})
    assert refused.returncode == 2 and "sha256 does not match" in refused.stderr
    assert marks(other) == []


def _on_path(monkeypatch: pytest.MonkeyPatch, *folders: Path) -> None:
    for folder in folders:
        monkeypatch.syspath_prepend(str(folder))
    importlib.invalidate_caches()


def _named_spec(tmp_path: Path, architecture: str) -> ModelSpec:
    return load_spec(write_marked_spec(tmp_path / "model", architecture))


def test_built_in_names_win_and_the_clash_is_said(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A package that registers a built-in name: the built-in runs, and a note names the
    package and the entry point; validate prints it as a warning.

    Teeth: _named() looking up entry points before built-in names: the architecture
    resolves to mypkg:factory.
    """
    site = make_distribution(tmp_path / "site", "unet-small = mypkg:factory")
    _on_path(monkeypatch, site)
    found = resolve_architecture(_named_spec(tmp_path, "unet-small"), trust_code=False)
    assert found.kind == architectures.BUILT_IN_KIND
    assert found.target == "pipeline.models:unet_small"
    assert found.note is not None and "mypkg 0.1 (mypkg:factory)" in found.note
    assert "the built-in unet-small runs" in found.note


def test_a_name_two_packages_register_and_registrations_into_the_standard_library(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two packages registering one name: refused, naming both; a registration of
    os:system: refused; an unknown name lists the registered ones.

    Teeth: _named() taking the first registration: the clash resolves to one of them;
    refuse_standard_library() skipped for entry points: evil resolves to os:system.
    """
    one = make_distribution(tmp_path / "one", "shared = mypkg:factory\nevil = os:system")
    two = make_distribution(tmp_path / "two", "shared = otherpkg:factory", "otherpkg", "2.0")
    _on_path(monkeypatch, one, two)
    with pytest.raises(ModelSpecError, match=r"shared is registered under "
                       r"fcn_pipeline.architectures by more than one installed package "
                       r"\(.*mypkg 0.1 as mypkg:factory.*otherpkg 2.0 as otherpkg:factory"):
        resolve_architecture(_named_spec(tmp_path / "a", "shared"), trust_code=True)
    with pytest.raises(ModelSpecError, match=r"evil as mypkg 0.1 registers it \(os:system\) "
                       "leads into the standard library"):
        resolve_architecture(_named_spec(tmp_path / "b", "evil"), trust_code=True)
    with pytest.raises(ModelSpecError, match=r"registered: evil, shared\)"):
        resolve_architecture(_named_spec(tmp_path / "c", "nothing-here"), trust_code=True)


def test_a_built_in_factory_named_by_its_path_says_the_name(tmp_path: Path) -> None:
    """The old demo spec's ``pipeline.demo:demo_fcn`` is an import path like any other,
    but the refusal says the built-in name to write instead."""
    with pytest.raises(ModelSpecError, match="it is the built-in demo-fcn: write "
                                             "architecture: demo-fcn"):
        resolve_architecture(_named_spec(tmp_path, "pipeline.demo:demo_fcn"), trust_code=False)


def test_a_registration_in_the_folder_a_run_starts_from_is_not_read(tmp_path: Path) -> None:
    """``python -m pipeline.cli`` started from a folder holding ``evilnet-0.1.dist-info``
    (registering ``landcover-net = evilnet:factory``) and the ``evilnet`` package: a spec
    in that folder naming ``landcover-net`` is refused (exit 2, neither built in nor
    registered) and ``evilnet`` is never imported, as for the ``fcn-pipeline`` script.

    Teeth: cli.py's ``__main__`` block without _forget_current_folder(): the folder is
    first on sys.path, the name resolves to evilnet and the marker says "imported".
    """
    bundle = make_distribution(tmp_path / "bundle", "landcover-net = evilnet:factory",
                               package="evilnet")
    spec = write_marked_spec(bundle, "landcover-net")
    write_scene(bundle / "scene.tif")
    marker = tmp_path / "marker"
    done = cli("run", "scene.tif", "--out", "out", "--model", spec.name, cwd=bundle,
               env={MARKER_ENV: str(marker)})
    assert done.returncode == 2, done.stderr
    assert "'landcover-net' is neither a built-in architecture" in done.stderr
    assert marks(marker) == []
    assert not (bundle / "out").exists()
