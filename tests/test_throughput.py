"""The throughput benchmark: sane figures, consistent ratios, exact tiling, a working run.

Speed is never asserted (machines are shared); only that every figure is there,
positive and consistent, and that tiled logits equal whole-image logits while
sliding windows do not.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.modelspec import load_spec
from pipeline.throughput import (
    BUILTIN_NORMALIZATION,
    BenchModel,
    GpuMonitor,
    interleaved_best,
    load_bench_model,
    predict_sliding,
    ratios,
    render_throughput,
    throughput_benchmark,
    whole_image,
    window_starts,
    write_builtin_spec,
)

FAST = dict(size=256, tile_size=128, repeats=1, raw_sizes=(128, 256), threads=1,
            end_to_end=False, log=lambda _: None)


@pytest.fixture(scope="module")
def demo_result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return throughput_benchmark("demo", workdir=tmp_path_factory.mktemp("bench"), **FAST)


def _positive(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_figures_are_positive(demo_result: dict) -> None:
    assert _positive(demo_result["raw"]["mpx_per_s"])
    assert demo_result["raw"]["best_size"] in (128, 256)
    assert all(_positive(v) for v in demo_result["raw"]["by_size"].values())
    for part in ("tiled", "sliding"):
        assert _positive(demo_result[part]["mpx_per_s"])
        assert _positive(demo_result[part]["seconds"])
    assert demo_result["tiled"]["tiles"] == 4
    assert demo_result["tiled"]["halo_overhead"] > 1
    assert demo_result["sliding"]["computed_ratio"] > 1
    assert demo_result["process_peak_rss_bytes"] > 0
    assert demo_result["run"] is None and demo_result["gpu"] == "n/a"


def test_ratios_are_consistent(demo_result: dict) -> None:
    r = demo_result["ratios"]
    assert r["tiled_over_raw"] == pytest.approx(
        demo_result["tiled"]["mpx_per_s"] / demo_result["raw"]["mpx_per_s"])
    assert r["tiled_over_sliding"] == pytest.approx(
        demo_result["tiled"]["mpx_per_s"] / demo_result["sliding"]["mpx_per_s"])
    assert r["run_over_raw"] is None and r["run_over_sliding"] is None
    assert r["run_scene_over_raw"] is None and r["run_scene_over_sliding"] is None
    fake = dict(demo_result, run={"mpx_per_s": 0.5, "scene_mpx_per_s": 0.8})
    assert ratios(fake)["run_over_raw"] == pytest.approx(0.5 / demo_result["raw"]["mpx_per_s"])
    assert ratios(fake)["run_over_sliding"] == pytest.approx(
        0.5 / demo_result["sliding"]["mpx_per_s"])
    assert ratios(fake)["run_scene_over_raw"] == pytest.approx(
        0.8 / demo_result["raw"]["mpx_per_s"])
    assert ratios(fake)["run_scene_over_sliding"] == pytest.approx(
        0.8 / demo_result["sliding"]["mpx_per_s"])


def test_tiled_is_exact_and_sliding_is_not(demo_result: dict) -> None:
    assert demo_result["deviation_crop"] == 256
    assert demo_result["tiled"]["max_abs_deviation"] <= 1e-4
    assert demo_result["sliding"]["max_abs_deviation"] > demo_result["tiled"]["max_abs_deviation"]
    assert demo_result["sliding"]["max_abs_deviation"] > 1e-3


def test_result_is_json_and_renders(demo_result: dict) -> None:
    again = json.loads(json.dumps(demo_result, allow_nan=False))
    assert again["tile_size"] == 128
    table = render_throughput(again)
    for part in ("(a) raw", "(b) exact tiled", "(c) fcn-pipeline run", "(d) sliding", "ratios"):
        assert part in table
    assert "skipped" in table
    on_gpu = dict(again, gpu={
        "raw": {"max_memory_allocated_bytes": 2**20, "utilisation_percent": "n/a",
                "memory_used_peak_bytes": "n/a"},
        "run": {"utilisation_percent": 55.0, "memory_used_peak_bytes": 2**30}})
    table = render_throughput(on_gpu)
    assert "GPU raw: max allocated 1 MiB" in table and "utilisation 55 %" in table


def test_gpu_monitor_reports_na_or_figures() -> None:
    figures: dict = {}
    with GpuMonitor(interval=0.01).sample(figures):
        pass
    assert set(figures) == {"utilisation_percent", "memory_used_peak_bytes"}
    if not GpuMonitor().available:
        assert figures["utilisation_percent"] == "n/a"


def test_builtin_architecture_with_random_weights(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = throughput_benchmark("unet-small", arguments={"base": 2, "depth": 2},
                                  workdir=tmp_path, **FAST)
    json.dumps(result, allow_nan=False)
    assert _positive(result["tiled"]["mpx_per_s"])
    assert result["tiled"]["max_abs_deviation"] <= 1e-4
    assert result["sliding"]["max_abs_deviation"] > result["tiled"]["max_abs_deviation"]


def test_builtin_spec_has_one_class_per_output(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = write_builtin_spec("fcn8s-vgg16", tmp_path, {
        "num_classes": 21, "channels": [4, 4, 8, 8, 8], "fc_channels": 8})
    spec = load_spec(path)
    assert len(spec.classes) == 21 and len({c.name for c in spec.classes}) == 21
    assert spec.normalization.mean == tuple(BUILTIN_NORMALIZATION["mean"])
    assert spec.normalization.scale == pytest.approx(1 / 255)
    bench = load_bench_model(str(path), tmp_path)
    assert bench.module(torch.zeros(1, 3, 64, 64)).shape == (1, 21, 64, 64)


def test_interleaved_rounds_warm_up_then_keep_the_best() -> None:
    order: list[str] = []
    calls = {"a": lambda: order.append("a") or 1, "b": lambda: order.append("b") or 2}
    timed = interleaved_best(calls, repeats=2)
    assert order == ["a", "b"] * 3  # a warm-up round, then two timed rounds
    assert timed["a"]["result"] == 1 and timed["b"]["result"] == 2
    assert all(0 <= t["seconds"] < 1 for t in timed.values())


def test_window_starts_cover_the_axis() -> None:
    assert window_starts(100, 128, 96) == [0]
    assert window_starts(256, 128, 96) == [0, 96, 128]
    for length, window, step in [(1000, 128, 96), (300, 100, 75), (129, 128, 96)]:
        starts = window_starts(length, window, step)
        covered = np.zeros(length, bool)
        for s in starts:
            assert 0 <= s <= length - window
            covered[s:s + window] = True
        assert covered.all()


def test_sliding_with_one_window_is_whole_image(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bench: BenchModel = load_bench_model("demo", tmp_path)
    image = np.random.default_rng(0).standard_normal((3, 70, 90)).astype(np.float32)
    sliding, computed = predict_sliding(bench, image, window=128)
    assert computed == 70 * 90
    np.testing.assert_array_equal(sliding, whole_image(bench, image))


@pytest.mark.slow
def test_everything_once_with_the_real_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = throughput_benchmark("demo", size=256, workers=1, threads=1, repeats=1,
                                  raw_sizes=(256,), workdir=tmp_path, log=lambda _: None)
    json.dumps(result, allow_nan=False)
    run = result["run"]
    assert run["exit_code"] == 0
    assert _positive(run["mpx_per_s"]) and _positive(run["seconds"])
    assert run["mpx_per_s"] == pytest.approx(256 * 256 / run["seconds"] / 1e6)
    assert run["peak_rss_bytes"] > 0
    assert run["scene_seconds"] is None or run["scene_seconds"] <= run["seconds"]
    assert set(run["work_seconds"]) == {"read", "model", "write", "publish"}
    assert all(_positive(v) for v in run["work_seconds"].values())
    assert result["tile_size"] >= 128 and result["tile_reason"].startswith("auto")
    assert result["ratios"]["run_over_raw"] == pytest.approx(
        run["mpx_per_s"] / result["raw"]["mpx_per_s"])
    assert result["ratios"]["run_over_sliding"] == pytest.approx(
        run["mpx_per_s"] / result["sliding"]["mpx_per_s"])
    assert result["tiled"]["max_abs_deviation"] <= 1e-4
    assert "(c) fcn-pipeline run" in render_throughput(result)
    assert "tasks' seconds: read" in render_throughput(result)


@pytest.mark.slow
def test_scaling_reports_parallel_efficiency(tmp_path) -> None:
    from pipeline.throughput import render_scaling, scaling_benchmark

    rows = scaling_benchmark("demo", size=256, workers=(1, 2), tile_size=128, workdir=tmp_path,
                             log=lambda m: None)
    assert [r["workers"] for r in rows] == [1, 2]
    assert all(r["exit_code"] == 0 and r["mpx_per_s"] > 0 for r in rows)
    assert rows[0]["mpx_per_s_efficiency"] == pytest.approx(1.0)
    assert 0 < rows[1]["mpx_per_s_efficiency"] < 2
    assert "eff." in render_scaling(rows, 256)
