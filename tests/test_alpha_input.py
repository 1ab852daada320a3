"""An alpha band is the scene's mask of valid pixels, never data a model reads.

Scenes written here with rasterio, colour interpretations set per band: an ARGB
scene (alpha first, which GDAL does not take as the dataset's mask) and an RGBA
scene (alpha last, which it does). Each goes through :func:`open_scene`, which
records the colour interpretations, then :func:`check_bands`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import ColorInterp
from rasterio.transform import Affine

from pipeline.errors import SceneError
from pipeline.readers import check_bands, open_scene

ALPHA, RED, GREEN, BLUE = ColorInterp.alpha, ColorInterp.red, ColorInterp.green, ColorInterp.blue


def write_scene(path: Path, colorinterp: tuple[ColorInterp, ...]) -> Path:
    """A small georeferenced uint8 scene, one band per colour interpretation given."""
    count = len(colorinterp)
    data = (np.arange(count * 16 * 16).reshape(count, 16, 16) % 251).astype(np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=16, height=16, count=count,
                       dtype="uint8", crs="EPSG:32633",
                       transform=Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5500000.0)) as ds:
        ds.colorinterp = colorinterp
        ds.write(data)
    return path


def refusal(path: Path, bands: list[int]) -> str:
    with pytest.raises(SceneError) as caught:
        check_bands(open_scene(path), bands)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_argb_scene_refuses_its_alpha_band_and_accepts_the_colour_bands(tmp_path: Path) -> None:
    """Bands [1, 2, 3] of an ARGB scene fed the mask to the network as its first channel.

    Teeth: check_bands() without the alpha bands (_bands_problem(..., palette) as before)
    accepts [1, 2, 3]: the refusal fails (seen failing, restored).
    """
    path = write_scene(tmp_path / "argb.tif", (ALPHA, RED, GREEN, BLUE))
    info = open_scene(path)
    assert info.colorinterp == ("alpha", "red", "green", "blue")
    message = refusal(path, [1, 2, 3])
    assert message == (
        "argb.tif band 1 is an alpha band (the scene's mask of valid pixels, not data), but "
        "the model reads bands [1, 2, 3]; choose other bands in the model spec, from the "
        "data bands [2, 3, 4]"
    )
    check_bands(info, [2, 3, 4], dtypes=["uint8"])
    check_bands(info, [4, 3, 2])


def test_rgba_scene_reads_rgb_but_not_its_alpha(tmp_path: Path) -> None:
    """Alpha last: [1, 2, 3] is the normal case and passes; asking for band 4 does not.

    Teeth: with the alpha test in _bands_problem removed (`if set(wanted) & set(alpha)`
    made False), [1, 2, 3, 4] and [4, 4, 4] are accepted: fails (seen failing, restored).
    """
    path = write_scene(tmp_path / "rgba.tif", (RED, GREEN, BLUE, ALPHA))
    check_bands(open_scene(path), [1, 2, 3])
    for bands in ([1, 2, 3, 4], [4, 4, 4]):
        message = refusal(path, bands)
        assert message.startswith("rgba.tif band 4 is an alpha band (the scene's mask")
        assert message.endswith("choose other bands in the model spec, from the data bands "
                                "[1, 2, 3]")


def test_a_missing_band_is_still_reported_as_missing(tmp_path: Path) -> None:
    """A band the scene lacks is named as missing, even when an alpha band is asked for too.

    Teeth: with the alpha test moved before the band-count test in _bands_problem,
    [1, 5] is refused as reading an alpha band, not as a missing band 5 (seen
    failing, restored).
    """
    path = write_scene(tmp_path / "argb.tif", (ALPHA, RED, GREEN, BLUE))
    assert refusal(path, [1, 5]) == (
        "argb.tif has 4 bands; the model needs bands [1, 5] "
        "(choose bands from 1 to 4 in the model spec)"
    )


def test_two_alpha_bands_read_are_both_named(tmp_path: Path) -> None:
    """Teeth: with _alpha_advice naming only the first band read, fails (seen failing,
    restored)."""
    path = write_scene(tmp_path / "two.tif", (ALPHA, RED, ALPHA))
    message = refusal(path, [1, 2, 3])
    assert message.startswith("two.tif bands [1, 3] are alpha bands (the scene's mask")
    assert message.endswith("from the data bands [2]")
