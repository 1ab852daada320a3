"""The CUDA path: tiled inference and ``fcn-pipeline run --device cuda`` agree with the CPU.

Skipped without a CUDA device. TF32 is switched off while these tests run, so
convolutions on the GPU are plain float32 and comparable to the CPU at 1e-4.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from pipeline.inference import predict_tiled
from pipeline.model import build_model
from pipeline.models import build
from pipeline.modelspec import load_spec, normalize
from pipeline.samples import render, write_sample_scenes
from tests.conftest import run_cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def plain_float32() -> Iterator[None]:
    """No TF32 in cuDNN convolutions or matrix products for the duration of a test."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _both(model_on: dict[str, torch.nn.Module], image: np.ndarray, tile: int) -> None:
    cpu = predict_tiled(model_on["cpu"], image, tile_size=tile)
    cuda = predict_tiled(model_on["cuda"], image, tile_size=tile)
    assert cuda.shape == cpu.shape and cuda.dtype == np.float32
    np.testing.assert_allclose(cuda, cpu, rtol=0, atol=TOLERANCE)
    with torch.inference_mode():
        whole = model_on["cuda"](torch.from_numpy(image)[None].cuda())[0].cpu().numpy()
    np.testing.assert_allclose(cuda, whole, rtol=0, atol=TOLERANCE)


def test_demo_tiled_on_cuda_equals_cpu() -> None:
    spec = load_spec("demo")
    image = normalize(render(11, (0, 300), (0, 347), (300, 347))[0], spec)
    _both({d: build_model(spec, device=d) for d in ("cpu", "cuda")}, image, tile=128)


def test_small_fcn8s_tiled_on_cuda_equals_cpu() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cpu = build("fcn8s-vgg16", num_classes=5, channels=(8, 16, 16, 32, 32),
                    fc_channels=32).eval()
    cuda = build("fcn8s-vgg16", num_classes=5, channels=(8, 16, 16, 32, 32), fc_channels=32)
    cuda.load_state_dict(cpu.state_dict())
    image = np.random.default_rng(1).standard_normal((3, 333, 301)).astype(np.float32)
    _both({"cpu": cpu, "cuda": cuda.eval().cuda()}, image, tile=160)


def _labels(out: Path) -> np.ndarray:
    with rasterio.open(out / "scene-000.tif") as cog:
        return cog.read(1)


def test_run_on_cuda_labels_like_cpu(tmp_path: Path) -> None:
    scene = write_sample_scenes(tmp_path / "scenes", size=640, count=1, seed=21)[0].scene
    labels = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        done = run_cli("run", str(scene), "--out", str(out), "--model", "demo", "--device", device,
                       "--workers", "1", "--tile-size", "256")
        assert done.returncode == 0, done.stderr
        labels[device] = _labels(out)
    assert labels["cuda"].shape == labels["cpu"].shape == (640, 640)
    agreement = float(np.mean(labels["cuda"] == labels["cpu"]))
    assert agreement >= 0.999, f"cuda and cpu labels agree on {agreement:.4%} of pixels"
