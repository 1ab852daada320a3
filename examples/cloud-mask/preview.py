"""A small PNG of a scene beside its label map, with the spec's classes as a legend.

    python examples/cloud-mask/preview.py SCENE LABELS SPEC OUT.png

SCENE: a GeoTIFF whose bands 3, 2, 1 are red, green, blue (stretched 2-98 %); LABELS:
the label COG ``fcn-pipeline run`` wrote for it; SPEC: the model spec (its ``classes``
give names and colours, ``nodata.output`` the label nodata, drawn black). Needs
Pillow (``pip install pillow``), which the pipeline itself does not use.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import rasterio
import yaml
from PIL import Image, ImageDraw, ImageFont

SCALE = 2  # px of the PNG per scene pixel
LEGEND = 22  # px per legend row


def natural_colour(scene: Path) -> np.ndarray:
    """``(rows, cols, 3)`` uint8 from bands 3, 2, 1, each stretched from its 2nd to 98th
    percentile of the valid pixels."""
    with rasterio.open(scene) as src:
        rgb = src.read([3, 2, 1]).astype(np.float64)
        valid = src.dataset_mask() > 0
    out = np.zeros(rgb.shape, np.uint8)
    for k, band in enumerate(rgb):
        low, high = np.percentile(band[valid], [2, 98]) if valid.any() else (0.0, 1.0)
        out[k] = np.clip((band - low) / max(high - low, 1e-9) * 255, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, -1)


def coloured_labels(labels: Path, colours: list[list[int]], nodata: int) -> np.ndarray:
    """``(rows, cols, 3)`` uint8: each label in its class colour, nodata black."""
    with rasterio.open(labels) as src:
        values = src.read(1)
    table = np.zeros((256, 3), np.uint8)
    table[: len(colours)] = colours
    table[nodata] = 0
    return table[values]


def main(argv: list[str]) -> None:
    if len(argv) != 4:
        raise SystemExit(__doc__)
    scene, labels, spec_path, out = (Path(a) for a in argv)
    spec = yaml.safe_load(spec_path.read_text())
    classes = spec["classes"]
    nodata = int(spec.get("nodata", {}).get("output", 255))
    left = natural_colour(scene)
    right = coloured_labels(labels, [c["color"] for c in classes], nodata)
    rows, cols = left.shape[:2]
    gap = 8
    width, height = 2 * cols * SCALE + gap, rows * SCALE + LEGEND * (len(classes) + 1)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    for k, array in enumerate((left, right)):
        tile = Image.fromarray(array).resize((cols * SCALE, rows * SCALE), Image.NEAREST)
        canvas.paste(tile, (k * (cols * SCALE + gap), 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=14)
    with rasterio.open(labels) as src:
        counts = np.bincount(src.read(1).ravel(), minlength=256)
    valid = counts[: len(classes)].sum() or 1
    y = rows * SCALE + 4
    draw.text((4, y), f"{spec['name']}: natural colour (left), labels (right)", fill=(0, 0, 0),
              font=font)
    for k, item in enumerate(classes):
        y += LEGEND
        draw.rectangle((4, y, 20, y + 14), fill=tuple(item["color"]), outline=(0, 0, 0))
        share = 100 * counts[k] / valid
        draw.text((28, y), f"{k} {item['name']}: {share:.1f} % of valid pixels", fill=(0, 0, 0),
                  font=font)
    canvas.quantize(colors=128).save(out, optimize=True)  # a palette keeps the file small
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
