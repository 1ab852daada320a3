"""The CLI's own surface: version, help, inspect, config errors."""

from __future__ import annotations

from click.testing import CliRunner

from pipeline import __version__
from pipeline.cli import main
from tests.conftest import run_cli


def test_version_and_help_from_the_console_entry_point() -> None:
    done = run_cli("--version")
    assert done.returncode == 0
    assert __version__ in done.stdout
    helped = run_cli("--help")
    assert helped.returncode == 0
    for command in ("run", "inspect", "sample-scenes", "bench-memory", "status", "validate",
                    "demo"):
        assert command in helped.stdout


def test_inspect_reproduces_the_paper_table_and_prints_overheads() -> None:
    result = CliRunner().invoke(main, ["inspect", "fcn8s-vgg16", "fcn-alexnet"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split() for line in result.output.splitlines()[2:4]}
    # model, back end, field, RF, stride, coarse RF/stride, align, halo, overhead at 512, 1024,
    # 2048
    assert lines["fcn8s-vgg16"][5] == "404/32"
    assert lines["fcn-alexnet"][5] == "355/32"
    assert lines["fcn8s-vgg16"][1:5] == ["torch", "analysed", "491", "1"]
    assert lines["fcn8s-vgg16"][7] == "224/224"
    overheads = [float(v) for v in lines["fcn8s-vgg16"][8:11]]
    assert overheads == sorted(overheads, reverse=True) and overheads[-1] > 1.0


def test_inspect_rejects_an_unknown_model() -> None:
    result = CliRunner().invoke(main, ["inspect", "no-such-model"])
    assert result.exit_code != 0


def test_sample_scenes_rejects_bad_sizes(tmp_path) -> None:
    result = CliRunner().invoke(main, ["sample-scenes", str(tmp_path), "--size", "0"])
    assert result.exit_code == 2
    assert "size" in result.output
