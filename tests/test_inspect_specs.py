"""``fcn-pipeline inspect`` and ``bench`` on any model spec: ONNX graphs (probed, global
context, fixed window), torch specs and the demo, through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.onnx_zoo import write_spec
from tests.support import cli

pytest.importorskip("onnxruntime")


def _rows(stdout: str) -> dict[str, list[str]]:
    """Table rows by model label (the lines after the header and its rule)."""
    lines = stdout.split("\n\n")[0].splitlines()[2:]
    return {line.split()[0]: line.split() for line in lines if len(line.split()) > 8}


def _block(stdout: str, label: str) -> str:
    """The detail block of one spec."""
    return next(b for b in stdout.split("\n\n") if b.startswith(f"{label}: "))


@pytest.mark.slow
def test_inspect_reports_every_kind_of_spec(tmp_path: Path) -> None:
    """One call: an FCN graph shows its probed field and halo, a "same"-padded one its
    length-dependent padding, a fixed-size one its window and fixed tile, a global-context
    one "global context" with the reason and the advice (exit 0), the demo its analysed
    field; one table row each (back end, how the field is known, RF), then the blocks.

    Teeth: inspect_rows without the ModelAnalysisError branch (analyse_model's error
    passed on): exit 2 on squeeze_excite; _block without the window line: "64x64 px fixed"
    missing; the ONNX row built without ``congruent``: no padding line for keras_same.
    """
    specs = [write_spec(tmp_path, n) for n in ("plain_fcn", "keras_same", "fixed_64",
                                          "squeeze_excite")]
    done = cli("inspect", *map(str, specs), "demo", "--tile-sizes", "256,512")
    assert done.returncode == 0, done.stderr
    rows = _rows(done.stdout)
    # model, back end, field, RF, stride, coarse, align, halo, ovh@256, ovh@512
    assert rows["plain_fcn"][1:4] == ["onnx", "probed", "11"]
    assert rows["plain_fcn"][7] == "6/6" and float(rows["plain_fcn"][8]) > 1.0
    assert rows["squeeze_excite"][1:4] == ["onnx", "global", "-"]
    assert rows["squeeze_excite"][7:] == ["-", "-", "-"]
    assert rows["fixed_64"][8:] == ["-", "-"]  # one fixed tile, not these sizes
    assert rows["demo"][1:4] == ["torch", "analysed", "47"]

    plain = _block(done.stdout, "plain_fcn")
    assert "(N, 3, any, any) float32" in plain and "scores (N, 4, any, any)" in plain
    assert "probed: 11x11 px" in plain and "(probed)" in plain and "padding" not in plain
    assert "depends on the input length" in _block(done.stdout, "keras_same")
    fixed = _block(done.stdout, "fixed_64")
    assert "(N, 3, 64, 64)" in fixed and "64x64 px fixed" in fixed
    assert "56x56 px (fixed): window 64x64" in fixed
    glob = " ".join(_block(done.stdout, "squeeze_excite").split())
    assert "global context: output at (0, 0) changes" in glob and "GlobalAveragePool" in glob
    assert "declare a halo (--halo PX" in glob and "none known" in glob
    assert "analysed: 47x47 px" in _block(done.stdout, "demo")
    # every line of the blocks fits 100 columns, but their headers, which hold the spec's
    # path (as long as the folder it is in)
    details = [line for block in done.stdout.split("\n\n")[1:]
               for line in block.splitlines()[1:]]
    assert details and all(len(line) <= 100 for line in details)


@pytest.mark.slow
def test_inspect_with_a_declared_halo_as_json(tmp_path: Path) -> None:
    """``--halo 8``: the global-context graph gets the declared halo (method declared, the
    reason kept), the exact graph keeps its probed field under the larger halo, the fixed
    window's tile shrinks to 48 px; ``--json`` carries the same as plain values.

    Teeth: the CLI not passing --halo to inspect_rows: squeeze_excite's method is null
    and its halo null; rows_as_json without "global_context": KeyError.
    """
    specs = [write_spec(tmp_path, n) for n in ("group_norm", "plain_fcn", "fixed_64")]
    done = cli("inspect", *map(str, specs), "--halo", "8", "--json", "--tile-sizes", "256")
    assert done.returncode == 0, done.stderr
    rows = {Path(r["model"]).stem: r for r in json.loads(done.stdout)}
    norm, plain, fixed = rows["group_norm"], rows["plain_fcn"], rows["fixed_64"]
    assert norm["method"] == "declared" and norm["halo_declared"]
    assert norm["halo"] == {"before": [8, 8], "after": [8, 8]}
    assert norm["global_context"].startswith("global context")
    assert norm["receptive_field"] is None and norm["overhead"]["256"] > 1.0
    assert plain["method"] == "probed" and plain["halo_declared"]
    assert plain["receptive_field"] == [11, 11] and plain["global_context"] is None
    assert plain["input"] == {"shape": [None, 3, None, None], "dtype": "float32",
                              "channels": 3}
    assert plain["output"] == {"layout": "scores", "shape": [None, 4, None, None]}
    assert plain["backend"] == "onnx" and plain["memory_bytes"]["256"] > 0
    assert fixed["window"] == [64, 64] and fixed["fixed_tile"]["tile"] == [48, 48]
    assert fixed["overhead"] == {"256": None}
    assert set(plain) >= {"model", "source", "backend", "input", "output", "method",
                          "global_context", "receptive_field", "stride", "offset", "align",
                          "halo", "halo_declared", "window", "length_dependent_padding",
                          "coarse", "overhead", "memory_bytes", "fixed_tile"}


@pytest.mark.slow
def test_bench_compares_runtimes(tmp_path: Path) -> None:
    """``bench --model SPEC``: a torch spec is timed on PyTorch and, exported in memory, on
    ONNX Runtime, with their ratio; an ONNX spec on ONNX Runtime only, saying why, with
    its tiles run through the prediction core (exact: deviation 0).

    Teeth: compare_runtimes without the export (torch only): "onnxruntime" is null for
    the torch spec; throughput_benchmark without the ONNX branch of load_bench_model:
    build_model refuses the ONNX spec, exit 2.
    """
    from pipeline.throughput import write_builtin_spec

    torch_spec = write_builtin_spec("unet-small", tmp_path / "torch", {"base": 2, "depth": 2})
    common = ("--size", "64", "--skip-run", "--repeats", "1", "--threads", "1")
    done = cli("bench", "--model", str(torch_spec), *common, "--json")
    assert done.returncode == 0, done.stderr
    runtimes = json.loads(done.stdout)["runtimes"]
    assert runtimes["torch"] > 0 and runtimes["onnxruntime"] > 0
    assert runtimes["onnxruntime_over_torch"] == pytest.approx(
        runtimes["onnxruntime"] / runtimes["torch"])
    assert runtimes["per_core"]["torch"] == pytest.approx(runtimes["torch"])

    onnx = write_spec(tmp_path, "plain_fcn")
    done = cli("bench", "--model", str(onnx), *common)
    assert done.returncode == 0, done.stderr
    assert "plain_fcn.yaml (onnx)" in done.stdout
    runtimes_line = next(line for line in done.stdout.splitlines()
                         if line.startswith("runtimes on"))
    assert "onnxruntime" in runtimes_line and "torch" not in runtimes_line
    assert "no PyTorch version of an ONNX graph" in done.stdout
    tiled = next(line for line in done.stdout.splitlines() if line.startswith("(b)"))
    assert "max |dev| 0 on 64 px" in tiled
