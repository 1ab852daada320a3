"""Workflow files: the shipped ones validate; {date}; errors name the file, line and key;
precedence file < environment < command line."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from pipeline.config import RunConfig, resolve, values_from_env
from pipeline.errors import ConfigError
from pipeline.workflow import load_workflow, run_date, validate_workflow

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
SHIPPED = sorted(p for p in WORKFLOWS.glob("*.yaml") if p.name != "kustomization.yaml")


def write(tmp_path: Path, text: str, name: str = "flow.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_shipped_workflows_are_there() -> None:
    assert {p.name for p in SHIPPED} >= {"nightly.yaml", "local-smoke.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_workflows_validate(path: Path) -> None:
    config = validate_workflow(path, date="2024-06-30")
    assert isinstance(config, RunConfig)
    assert config.scenes and config.output
    assert "{date}" not in " ".join(config.scenes) + config.output


def test_nightly_is_a_dated_gpu_run() -> None:
    config = validate_workflow(WORKFLOWS / "nightly.yaml", date="2024-06-30")
    assert config.scenes == ("/data/incoming/2024-06-30/*.tif",)
    assert config.output == "/data/labels/2024-06-30"
    assert config.device == "cuda"
    assert config.scheduler is None  # where it runs is deploy/'s business


def test_local_smoke_runs_on_a_laptop() -> None:
    config = validate_workflow(WORKFLOWS / "local-smoke.yaml")
    assert (config.model, config.device, config.output) == ("demo", "cpu", "demo/out")
    assert config.scenes == ("demo/scenes/*.tif",)


FLOW = """\
schema: 1
scenes:
  - in/{date}/*.tif
  - extra.tif
output: out/{date}
tiling:
  tile_size: 512
"""


def test_date_is_substituted_in_scenes_and_output(tmp_path: Path) -> None:
    values = load_workflow(write(tmp_path, FLOW), date="2024-02-29")
    assert values["scenes"] == ("in/2024-02-29/*.tif", "extra.tif")
    assert values["output"] == "out/2024-02-29"  # relative paths stay relative
    assert values["tile_size"] == 512


def test_date_defaults_to_today_in_utc(tmp_path: Path) -> None:
    before = dt.datetime.now(dt.timezone.utc).date().isoformat()
    values = load_workflow(write(tmp_path, FLOW))
    after = dt.datetime.now(dt.timezone.utc).date().isoformat()
    assert values["output"] in (f"out/{before}", f"out/{after}")
    assert run_date() in (before, after)


def test_a_single_scene_string_works(tmp_path: Path) -> None:
    values = load_workflow(write(tmp_path, "schema: 1\nscenes: a/{date}.tif\n"), date="2024-01-02")
    assert values["scenes"] == ("a/2024-01-02.tif",)


@pytest.mark.parametrize("bad", ["2024-13-01", "2024-02-30", "24-01-01", "2024/01/01", "today", ""])
def test_a_bad_date_is_a_config_error(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match="date"):
        load_workflow(write(tmp_path, FLOW), date=bad)


def test_an_unknown_key_names_file_line_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "schema: 1\ntiling:\n  tile_size: 512\n  tile_sise: 256\n")
    with pytest.raises(ConfigError) as err:
        load_workflow(path)
    message = str(err.value)
    assert message.startswith(f"{path}:4: tiling.tile_sise")
    assert "known: tile_size, batch_size" in message


def test_an_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, "schema: 1\nschedule: nightly\n")
    with pytest.raises(ConfigError, match=rf"^{path}:2: schedule is not a known setting"):
        load_workflow(path)


def test_a_wrong_type_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "schema: 1\ntiling:\n  batch_size: four\n")
    with pytest.raises(ConfigError, match=rf"^{path}:3: tiling.batch_size must be int"):
        load_workflow(path)


@pytest.mark.parametrize(("section", "text", "line"), [
    ("tiling.batch_size", "tiling:\n  batch_size: 0\n", 3),
    ("tiling.tile_size", "tiling:\n  tile_size: 8\n", 3),
    ("compute.device", "compute:\n  device: tpu\n", 3),
    ("compute.workers", "compute:\n  workers: 0\n", 3),
])
def test_a_bad_value_names_file_line_and_key(
    tmp_path: Path, section: str, text: str, line: int
) -> None:
    path = write(tmp_path, "schema: 1\n" + text)
    load_workflow(path)  # the types are right: only resolving sees the value is wrong
    with pytest.raises(ConfigError) as err:
        validate_workflow(path)
    assert str(err.value).startswith(f"{path}:{line}: {section} ")


def test_a_missing_or_wrong_schema(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="schema must be 1"):
        load_workflow(write(tmp_path, "scenes: a.tif\n"))
    with pytest.raises(ConfigError, match=r":1: schema must be 1, got 2"):
        load_workflow(write(tmp_path, "schema: 2\n"))


def test_duplicate_keys_are_refused_with_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "schema: 1\noutput: a\ntiling:\n  tile_size: 512\noutput: b\n")
    with pytest.raises(
        ConfigError, match=rf"^{path}:5: duplicate key 'output' \(first on line 2\)"
    ):
        load_workflow(path)


def test_yaml_syntax_errors_name_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "schema: 1\ntiling:\n  tile_size: [512\noutput: x\n")
    with pytest.raises(ConfigError, match=rf"^{path}:\d+: the workflow is not valid YAML"):
        load_workflow(path)


def test_empty_missing_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is empty"):
        load_workflow(write(tmp_path, "# nothing\n"))
    with pytest.raises(ConfigError, match="cannot read the workflow"):
        load_workflow(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="a workflow is a mapping"):
        load_workflow(write(tmp_path, "- schema: 1\n"))


def test_placeholders_other_than_date_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "schema: 1\noutput: out/{day}\n")
    with pytest.raises(
        ConfigError, match=rf"^{path}:2: output has the unknown placeholder {{day}}"
    ):
        load_workflow(path)
    path = write(tmp_path, "schema: 1\nmodel: /models/{date}/m.yaml\n")
    with pytest.raises(
        ConfigError, match=r":2: model contains \{date\}, which is only replaced in scenes"
    ):
        load_workflow(path)


def test_precedence_file_then_environment_then_command_line(tmp_path: Path) -> None:
    path = write(tmp_path, FLOW + "  batch_size: 2\ncompute:\n  device: cpu\n")
    file_values = load_workflow(path, date="2024-06-30")
    env = values_from_env(
        {"FCN_PIPELINE_TILING_TILE_SIZE": "256", "FCN_PIPELINE_COMPUTE_DEVICE": "cuda"}
    )
    cli = {"tile_size": 128, "scenes": None, "output": None, "batch_size": None}

    config = resolve(file_values, env, cli)
    assert config.tile_size == 128            # command line over environment over file
    assert config.device == "cuda"            # environment over file
    assert config.batch_size == 2             # file over default
    assert config.output == "out/2024-06-30"  # None on the command line leaves it alone
    assert resolve(file_values).tile_size == 512
    assert resolve(file_values, env).tile_size == 256


def test_validate_checks_the_files_a_workflow_names(tmp_path: Path) -> None:
    """`fcn-pipeline validate` checks what `run` would refuse, before anything runs: scenes
    exist (patterns match) and suit the model, the spec can be read, the output folder is
    writable and holds no file this tool did not make, the FCN_PIPELINE_* environment is
    valid: exit 2, one line each; a good workflow exits 0 and creates nothing.

    Teeth: the validate command without preflight(): the missing scene, the user's file
    in the output folder and the bad environment all exit 0.
    """
    import numpy as np
    import rasterio
    from rasterio.transform import Affine

    from tests.conftest import run_cli

    scene = tmp_path / "scene.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=32, height=32, count=3,
                       dtype="uint8", crs="EPSG:32633",
                       transform=Affine(10, 0, 500000, 0, -10, 4600000)) as dst:
        dst.write(np.zeros((3, 32, 32), np.uint8))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "scene.tif").write_text("the user's own file")
    good = f"scenes: [{scene}]\noutput: {tmp_path}/o\n"
    cases = {
        "pattern matched no file": (f"scenes: {tmp_path}/none/*.tif\noutput: {tmp_path}/o\n",
                                    {}),
        "no such file": (f"scenes: [{tmp_path}/missing.tif]\noutput: {tmp_path}/o\n", {}),
        "cannot read the model spec": (good + f"model: {tmp_path}/missing.yaml\n", {}),
        f"{blocker} is a file": (f"scenes: [{scene}]\noutput: {blocker}/out\n", {}),
        "which fcn-pipeline did not make": (f"scenes: [{scene}]\noutput: {taken}\n", {}),
        "compute.workers": (good, {"FCN_PIPELINE_COMPUTE_WORKERS": "0"}),
    }
    for words, (body, env) in cases.items():
        done = run_cli("validate", str(write(tmp_path, "schema: 1\n" + body)), env=env)
        assert done.returncode == 2, (words, done.stdout, done.stderr)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and words in lines[0], (words, lines)
    ok = run_cli("validate", str(write(tmp_path, "schema: 1\n" + good)))
    assert ok.returncode == 0, ok.stderr
    assert not (tmp_path / "o").exists()
