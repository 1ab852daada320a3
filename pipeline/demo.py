"""The bundled demo model, made the FCN paper's way.

A small :class:`PatchClassifier` learns the class at the centre of
``PATCH x PATCH`` patches cut from generated sample scenes
(:mod:`pipeline.samples`). :func:`pipeline.fully_convolutional.convolutionalize`
turns it into a fully convolutional body whose coarse output cell ``(i, j)``
is the classifier applied to the patch at ``(i * STRIDE, j * STRIDE)``;
:func:`demo_fcn` pads the input, runs that body, upsamples its coarse map by
``STRIDE`` (bilinear) and crops it to the input's size, so the output is a
dense ``(N, classes, H, W)`` map aligned with the input pixels.

Alignment: the label of a training patch is the class at its centre, the
corner point shared by its four central pixels (a patch is used only when
those four pixels agree). With ``PATCH // 2`` pixels of padding before the
input, coarse cell ``i`` is centred on input coordinate ``i * STRIDE``
(pixel ``k`` spans ``[k, k + 1)``); bilinear upsampling with
``align_corners=False`` puts coarse cell ``i`` at upsampled coordinate
``i * STRIDE + STRIDE / 2``, so the crop starts at ``STRIDE // 2``.

Train, evaluate or time it with the CLI::

    fcn-pipeline demo train --out pipeline/data --seed 0
    fcn-pipeline demo evaluate
    fcn-pipeline demo speed
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from pipeline.fully_convolutional import convolutionalize
from pipeline.modelspec import Normalization
from pipeline.samples import CLASSES, LABEL_NODATA, render

#: Side of the square training patches, in pixels.
PATCH = 32
#: Output stride of the convolutionalized body: coarse cells are this many pixels apart.
STRIDE = 8
#: Padding before the input (rows and columns): puts coarse cell 0 on input coordinate 0.
PAD_BEFORE = PATCH // 2
#: Padding after the input: enough coarse cells to reach one stride past the last pixel.
PAD_AFTER = PATCH // 2 + STRIDE - 1
#: First row and column of the upsampled map kept by the crop.
CROP = STRIDE // 2

#: Training scenes are rendered from seeds ``TRAIN_SEED + k``; evaluation uses others.
TRAIN_SEED = 1000
EVAL_SEEDS = range(9000, 9004)
WEIGHTS_NAME = "demo.safetensors"
SPEC_NAME = "demo.yaml"
DEMO_DIR = Path(__file__).parent / "data"
_LEARNING_RATE = 3e-3


# --------------------------------------------------------------------------- networks


class PatchClassifier(nn.Module):
    """Class of the centre of a ``PATCH x PATCH`` RGB patch: ``(N, 3, P, P) -> (N, classes)``.

    Features at stride 4 from the first layer (a 4x4 stride-4 convolution, so
    no layer runs at full resolution), stride 8 after the second, a 3x3
    convolution, then two ``Linear`` layers on the flattened 2x2 feature map.
    No padding anywhere: once convolutionalized, each coarse output is exactly
    the classifier on one patch.
    """

    def __init__(self, num_classes: int = 4, width: int = 32, features: int = 64,
                 hidden: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 4, stride=4),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, features, 2, stride=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(features, features, 3),
            nn.ReLU(inplace=True),
        )
        side = PATCH // STRIDE - 2
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(features * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


class DemoFCN(nn.Module):
    """Dense prediction from a convolutionalized :class:`PatchClassifier`.

    ``(N, 3, H, W) -> (N, classes, H, W)`` for any ``H, W >= 1``: the input is
    padded by replication (so tiny inputs work and scene edges look like their
    border pixels), the body gives logits every ``STRIDE`` pixels, bilinear
    upsampling makes them dense and a crop aligns them with the input.
    """

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = x.size(2), x.size(3)
        x = F.pad(x, (PAD_BEFORE, PAD_AFTER, PAD_BEFORE, PAD_AFTER), mode="replicate")
        y = self.body(x)
        y = F.interpolate(y, scale_factor=STRIDE, mode="bilinear", align_corners=False)
        return y[:, :, CROP : rows + CROP, CROP : cols + CROP]


def fcn_from_classifier(classifier: PatchClassifier) -> DemoFCN:
    """The dense FCN computing ``classifier`` on every patch (weights copied, eval mode)."""
    return DemoFCN(convolutionalize(classifier, PATCH)).eval()


def demo_fcn(num_classes: int = 4) -> nn.Module:
    """The demo network, untrained, in eval mode; load ``demo.safetensors`` into it."""
    return fcn_from_classifier(PatchClassifier(num_classes))


# --------------------------------------------------------------------------- data


@contextmanager
def _torch_settings(threads: int, seed: int | None = None) -> Iterator[None]:
    """Threads, deterministic algorithms and a seeded RNG, restored on exit."""
    old_threads = torch.get_num_threads()
    old_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
                torch.use_deterministic_algorithms(True)
            yield
    finally:
        torch.use_deterministic_algorithms(old_deterministic)
        torch.set_num_threads(old_threads)


def _centre_labels(labels: np.ndarray) -> np.ndarray:
    """Class at each interior corner point ``(r, c)``, ``1 <= r < H``, or nodata.

    The corner is shared by pixels ``(r-1..r, c-1..c)``; its class is theirs when
    all four agree, else :data:`LABEL_NODATA`. Index ``[r - 1, c - 1]``.
    """
    a, b = labels[:-1, :-1], labels[:-1, 1:]
    c, d = labels[1:, :-1], labels[1:, 1:]
    same = (a == b) & (a == c) & (a == d)
    return np.where(same, a, np.uint8(LABEL_NODATA))


def _sample_patches(
    seeds: Sequence[int], size: int, per_scene: int, rng: np.random.Generator
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Rendered scenes and ``per_scene`` patch centres with labels from each.

    Returns the scenes ``(S, 3, size, size)`` uint8, the centres as rows of
    ``(scene, row, col)`` (corner coordinates, patches fully inside the
    raster) and their labels.
    """
    half = PATCH // 2
    images = np.empty((len(seeds), 3, size, size), np.uint8)
    centres, targets = [], []
    for k, seed in enumerate(seeds):
        images[k], labels = render(seed, (0, size), (0, size), (size, size))
        corner = _centre_labels(labels)[half - 1 : size - half, half - 1 : size - half]
        valid = np.flatnonzero(corner != LABEL_NODATA)
        pick = np.sort(rng.choice(valid, size=min(per_scene, len(valid)), replace=False))
        r, c = np.divmod(pick, corner.shape[1])
        centres.append(np.stack([np.full_like(r, k), r + half, c + half], axis=1))
        targets.append(corner.ravel()[pick])
    return torch.from_numpy(images), np.concatenate(centres), np.concatenate(targets)


def _crop_batch(images: torch.Tensor, centres: np.ndarray) -> torch.Tensor:
    """Patches ``(B, 3, PATCH, PATCH)`` uint8 centred on corner points ``(scene, row, col)``."""
    offsets = torch.arange(PATCH) - PATCH // 2
    at = torch.from_numpy(centres)
    rows = (at[:, 1, None] + offsets)[:, :, None]
    cols = (at[:, 2, None] + offsets)[:, None, :]
    patches = images[at[:, 0, None, None], :, rows, cols]  # (B, P, P, 3)
    return patches.permute(0, 3, 1, 2).contiguous()


def _band_statistics(images: torch.Tensor) -> Normalization:
    """Per-band mean and std of ``raw / 255`` over the pixels inside the footprints.

    Rounded to 4 decimals: the spec stores them, and training uses the stored values.
    """
    count = 0
    total, squares = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for image in images:
        values = image[:, (image != 0).any(dim=0)].double() / 255.0  # every band >= 1 inside
        count += values.shape[1]
        total += values.sum(dim=1)
        squares += (values * values).sum(dim=1)
    mean = total / count
    std = ((squares - count * mean * mean) / (count - 1)).sqrt()
    return Normalization(1 / 255, tuple(round(float(m), 4) for m in mean),
                         tuple(round(float(v), 4) for v in std))


def _normalizer(normalization: Normalization) -> Callable[[torch.Tensor], torch.Tensor]:
    """``raw -> (raw * scale - mean) / std`` on ``(N, bands, H, W)`` tensors, in float32."""
    scale = float(normalization.scale)
    mean = torch.tensor(normalization.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(normalization.std, dtype=torch.float32).view(1, -1, 1, 1)

    def normalize(raw: torch.Tensor) -> torch.Tensor:
        return (raw.float() * scale - mean) / std

    return normalize


# --------------------------------------------------------------------------- training


def train_demo(
    out_dir: Path,
    *,
    seed: int = 0,
    steps: int = 1500,
    threads: int = 2,
    scenes: int = 16,
    scene_size: int = 1024,
    per_scene: int = 40000,
    batch: int = 256,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Train the demo model and write ``out_dir/demo.safetensors`` and ``out_dir/demo.yaml``.

    Patches are cut from sample scenes ``TRAIN_SEED ..``; the same ``seed`` on
    the same machine (and thread count) gives the same weights, byte for byte.
    Returns a summary: paths, sha256, normalization, final loss, seconds.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, centres, targets = _sample_patches(
        range(TRAIN_SEED, TRAIN_SEED + scenes), scene_size, per_scene, rng
    )
    normalization = _band_statistics(images)
    counts = np.bincount(targets, minlength=len(CLASSES))
    log(f"{len(targets)} patches from {scenes} scenes of {scene_size} px; "
        f"per class {counts.tolist()}")

    def patches(pick: np.ndarray) -> torch.Tensor:
        return _crop_batch(images, centres[pick])

    def progress(step: int, loss: float) -> None:
        log(f"step {step}/{steps}: loss {loss:.4f} ({time.perf_counter() - start:.0f} s)")

    with _torch_settings(threads, seed):
        classifier = PatchClassifier(len(CLASSES))
        loss = _fit(classifier, patches, _normalizer(normalization), targets,
                    rng.permutation(len(targets)), steps=steps, batch=batch, log=progress)
        fcn = fcn_from_classifier(classifier)

    weights = out_dir / WEIGHTS_NAME
    tensors = {k: v.detach().clone().contiguous() for k, v in fcn.state_dict().items()}
    safetensors.torch.save_file(tensors, str(weights), metadata={"format": "pt"})
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    spec = out_dir / SPEC_NAME
    options = f"--seed {seed} --steps {steps} --threads {threads}"
    spec.write_text(_spec_text(digest, normalization, options), encoding="utf-8")
    seconds = time.perf_counter() - start
    log(f"wrote {weights} ({weights.stat().st_size} bytes) and {spec} in {seconds:.0f} s")
    return {
        "weights": weights, "spec": spec, "sha256": digest, "normalization": normalization,
        "loss": loss, "steps": steps, "patches": len(targets), "seconds": seconds,
    }


def _fit(
    classifier: nn.Module,
    patches: Callable[[np.ndarray], torch.Tensor],
    normalize: Callable[[torch.Tensor], torch.Tensor],
    targets: np.ndarray,
    order: np.ndarray,
    *,
    steps: int,
    batch: int,
    log: Callable[[int, float], Any],
) -> float:
    """AdamW with a cosine learning rate over batches taken from ``order`` in turn.

    ``patches(indices)`` gives raw patches; returns the smoothed final loss.
    """
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=_LEARNING_RATE, weight_decay=1e-4)
    labels = torch.from_numpy(targets.astype(np.int64))
    classifier.train()
    running = 0.0
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * step / steps))
        pick = order[np.arange(step * batch, (step + 1) * batch) % len(order)]
        loss = F.cross_entropy(classifier(normalize(patches(pick))), labels[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            log(step + 1, running)
    classifier.eval()
    return running


def _spec_text(digest: str, normalization: Normalization, options: str) -> str:
    spec = {
        "schema": 1,
        "name": "demo",
        "architecture": "demo-fcn",
        "arguments": {"num_classes": len(CLASSES)},
        "weights": WEIGHTS_NAME,
        "sha256": digest,
        "bands": [1, 2, 3],
        "normalization": {
            "scale": normalization.scale,
            "mean": list(normalization.mean),
            "std": list(normalization.std),
        },
        "nodata": {"input": "scene", "output": int(LABEL_NODATA)},
        "classes": [{"name": c.name, "color": list(c.color)} for c in CLASSES],
    }
    header = (
        "# The bundled demo model: a patch classifier convolutionalized into an FCN.\n"
        f"# Written by: fcn-pipeline demo train {options}\n"
    )
    return header + yaml.safe_dump(spec, sort_keys=False, default_flow_style=None)


# --------------------------------------------------------------------------- evaluation


def predict(fcn: nn.Module, image: np.ndarray, normalization: Normalization) -> np.ndarray:
    """Class of every pixel of a ``(3, H, W)`` raw image, by whole-image inference."""
    normalize = _normalizer(normalization)
    with torch.inference_mode():
        logits = fcn(normalize(torch.from_numpy(image)[None]))
    return logits[0].argmax(dim=0).to(torch.uint8).numpy()


def evaluate_demo(
    fcn: nn.Module,
    normalization: Normalization,
    *,
    seeds: Iterable[int] = EVAL_SEEDS,
    size: int = 1024,
    threads: int = 2,
) -> dict[str, Any]:
    """Pixel accuracy and IoU of ``fcn`` over generated ``size x size`` scenes.

    Each scene is predicted whole; pixels labelled nodata (outside the
    footprint) are ignored. Returns ``pixel_accuracy``, ``mean_iou``, ``iou``
    (per class name) and the ``confusion`` matrix (rows: truth).
    """
    n = len(CLASSES)
    confusion = np.zeros((n, n), np.int64)
    fcn.eval()
    with _torch_settings(threads):
        for seed in seeds:
            image, labels = render(seed, (0, size), (0, size), (size, size))
            predicted = predict(fcn, image, normalization)
            valid = labels != LABEL_NODATA
            pairs = labels[valid].astype(np.int64) * n + predicted[valid]
            confusion += np.bincount(pairs, minlength=n * n).reshape(n, n)
    hits = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - hits
    iou = np.where(union > 0, hits / np.maximum(union, 1), np.nan)
    return {
        "pixel_accuracy": float(hits.sum() / confusion.sum()),
        "mean_iou": float(np.nanmean(iou)),
        "iou": {c.name: float(v) for c, v in zip(CLASSES, iou)},
        "confusion": confusion,
    }


def load_demo(weights: Path, num_classes: int = len(CLASSES)) -> nn.Module:
    """``demo_fcn()`` with the weights of a ``demo.safetensors`` file (strict)."""
    fcn = demo_fcn(num_classes)
    fcn.load_state_dict(safetensors.torch.load_file(str(weights)), strict=True)
    return fcn.eval()


def benchmark_demo(
    sizes: Sequence[int] = (256, 512, 1024), *, threads: int = 2, repeats: int = 10
) -> dict[int, float]:
    """Best-of-``repeats`` forward speed of :func:`demo_fcn`, megapixels per second, per size."""
    fcn = demo_fcn()
    speeds = {}
    with _torch_settings(threads), torch.inference_mode():
        for size in sizes:
            x = torch.randn(1, 3, size, size)
            fcn(x)
            best = math.inf
            for _ in range(repeats):
                t = time.perf_counter()
                fcn(x)
                best = min(best, time.perf_counter() - t)
            speeds[size] = size * size / best / 1e6
    return speeds


# --------------------------------------------------------------------------- command line
