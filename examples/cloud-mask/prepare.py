"""Put the cloud-mask example's network and scene next to its model spec.

    python examples/cloud-mask/prepare.py [FOLDER]

writes, into FOLDER (default: this script's folder):

- ``model_4b_l1c.onnx``: the 4-band Sentinel-2/Landsat Level-1C cloud and cloud-shadow
  network of the ``ukis-csmask`` package (DLR, Apache-2.0), copied from where pip
  installed it; ``model.yaml`` names it and pins its sha256;
- ``sentinel2-bgrn.tif``: a real Sentinel-2 scene (300 x 200 px, 10 m, UTM 19S) from the
  ``xarray-spatial`` package (MIT): its blue, green, red and near-infrared bands, shipped
  as one NetCDF file each, stacked here into one GeoTIFF in that band order, values
  unchanged (reflectance x 10000, uint16). The package does not say the processing
  level; blue brighter than green over bare land, as haze makes it, points to
  top-of-atmosphere reflectance (Level-1C), hence the L1C network.

Neither package is imported (``ukis-csmask`` needs scipy, ``xarray-spatial`` numba and
datashader at import): their files are found through their installed metadata, so
``pip install --no-deps ukis-csmask==1.0.0 xarray-spatial==0.5.3`` is enough. Nothing
is downloaded at run time.
"""

from __future__ import annotations

import shutil
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS

WEIGHTS = "model_4b_l1c.onnx"
SCENE = "sentinel2-bgrn.tif"
#: xarray-spatial's Sentinel-2 bands at 10 m, in the network's band order.
BANDS = ("blue", "green", "red", "nir")
#: The CRS the bands' NetCDF files name in an attribute GDAL does not read as a CRS.
SCENE_CRS = "EPSG:32719"


def installed_file(distribution: str, relative: str) -> Path:
    """A file of an installed distribution, found without importing it.

    Raises:
        SystemExit: the distribution or the file is not installed (one line, with the fix).
    """
    try:
        path = Path(str(metadata.distribution(distribution).locate_file(relative)))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise SystemExit(f"error: {relative} of the {distribution} package is not installed; "
                         f"run: pip install --no-deps ukis-csmask==1.0.0 xarray-spatial==0.5.3")
    return path


def write_scene(out: Path) -> None:
    """Stack xarray-spatial's Sentinel-2 blue, green, red and NIR bands into ``out``."""
    bands = []
    for name in BANDS:
        source = installed_file("xarray-spatial", f"xrspatial/datasets/sentinel-2/{name}_band.nc")
        with rasterio.open(source) as band:
            bands.append(band.read(1))
            transform = band.transform
    values = np.stack(bands)
    if not (np.isfinite(values).all() and (values == np.round(values)).all()
            and values.min() >= 1 and values.max() < 2**16):
        raise SystemExit("error: the xarray-spatial Sentinel-2 bands are not whole reflectance "
                         "values x 10000 as expected; this script knows version 0.5.3")
    with rasterio.open(out, "w", driver="GTiff", width=values.shape[2], height=values.shape[1],
                       count=len(BANDS), dtype="uint16", crs=CRS.from_string(SCENE_CRS),
                       transform=transform, nodata=0, tiled=True, blockxsize=256,
                       blockysize=256, compress="deflate", predictor=2) as scene:
        scene.write(values.astype(np.uint16))
        for k, name in enumerate(BANDS, start=1):
            scene.set_band_description(k, name)
        scene.update_tags(source="xarray-spatial 0.5.3 xrspatial/datasets/sentinel-2 (MIT); "
                                 "contains modified Copernicus Sentinel data")


def main(argv: list[str]) -> None:
    folder = Path(argv[0]) if argv else Path(__file__).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(installed_file("ukis-csmask", f"ukis_csmask/{WEIGHTS}"), folder / WEIGHTS)
    write_scene(folder / SCENE)
    print(f"wrote {folder / WEIGHTS} and {folder / SCENE}")


if __name__ == "__main__":
    main(sys.argv[1:])
