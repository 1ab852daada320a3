"""Scenes read only what they are: hostile files made here, through the CLI and the reader.

A ``.tif`` that is VRT XML reading another file's raw bytes, a VRT that reaches a URL, a
PNG or JPEG renamed ``.tif``, VRT chains that loop or nest without end, sidecars that
are not GeoTIFFs: each is refused with one line, before torch loads (exit 2), and no
request reaches the HTTP server each test starts. A plain VRT of local GeoTIFFs runs
with ``--allow-vrt`` and labels exactly as the GeoTIFF mosaic. Further tests bypass the
format checks on purpose to show that the GDAL options and the one-driver open refuse
the same files on their own. How each test was checked to have teeth is said in a
``Teeth:`` line in its docstring.
"""

from __future__ import annotations

import re
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine

from pipeline import formats, readers
from pipeline.config import resolve, values_from_env, values_from_tree
from pipeline.errors import SceneError, SceneFormatError
from pipeline.formats import MAX_VRT_DEPTH, SceneFile
from pipeline.grid import Box, Span, Tile
from pipeline.journal import FileIdentity
from pipeline.modelspec import load_spec
from pipeline.readers import open_scene, read_window
from pipeline.samples import render
from pipeline.tasks import SceneTarget, _read
from tests.support import Processes, cli, other_lines, tree, wait_for

TRANSFORM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4600000.0)
GEO = "500000,10,0,4600000,0,-10"
SIZE = 64
#: What stands for /etc/passwd: bytes that must never come out of the pipeline.
CANARY = b"root:x:0:0:CANARY-secret-of-the-host:/root:/bin/bash\n"
READS = "fcn-pipeline reads GeoTIFF/COG scenes (VRT with --allow-vrt)"


def box(rows: int, cols: int) -> Box:
    return Box(Span(0, rows), Span(0, cols))


def write_tif(path: Path, image: np.ndarray, transform: Affine = TRANSFORM,
              **extra: object) -> Path:
    count, rows, cols = image.shape
    with rasterio.open(path, "w", driver="GTiff", height=rows, width=cols, count=count,
                       dtype=image.dtype.name, crs="EPSG:32633", transform=transform,
                       **extra) as ds:
        ds.write(image)
    return path


def image(rows: int = SIZE, cols: int = SIZE, seed: int = 2) -> np.ndarray:
    """A stretch of sample scene ``seed`` inside its footprint: (3, rows, cols) uint8."""
    pixels, _ = render(seed, (900, 900 + rows), (900, 900 + cols), (2048, 2048))
    return pixels


def source_xml(name: str, band: int = 1, relative: int = 1, rect: str = "") -> str:
    return (f'<SimpleSource><SourceFilename relativeToVRT="{relative}">{name}</SourceFilename>'
            f"<SourceBand>{band}</SourceBand>{rect}</SimpleSource>")


def write_vrt(path: Path, bands: list[str], rows: int = SIZE, cols: int = SIZE) -> Path:
    """A VRT of ``rows x cols`` Byte bands, each band's inner XML given."""
    body = "".join(
        band if band.startswith("<VRTRasterBand")
        else f'<VRTRasterBand dataType="Byte" band="{k}">{band}</VRTRasterBand>'
        for k, band in enumerate(bands, start=1))
    path.write_text(f'<VRTDataset rasterXSize="{cols}" rasterYSize="{rows}">'
                    f"<SRS>EPSG:32633</SRS><GeoTransform>{GEO}</GeoTransform>{body}</VRTDataset>")
    return path


def raw_band(secret: Path, band: int) -> str:
    """A VRTRawRasterBand reading ``secret``'s bytes as pixels."""
    return (f'<VRTRasterBand dataType="Byte" band="{band}" subClass="VRTRawRasterBand">'
            f'<SourceFilename relativeToVRT="0">{secret}</SourceFilename>'
            f"<ImageOffset>0</ImageOffset><PixelOffset>1</PixelOffset>"
            f"<LineOffset>{SIZE}</LineOffset></VRTRasterBand>")


def secret_file(folder: Path) -> Path:
    """A file of known bytes outside the scenes' folder, standing for /etc/passwd."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "passwd"
    path.write_bytes((CANARY * (SIZE * SIZE // len(CANARY) + 1))[:SIZE * SIZE])
    return path


def assert_one_line_refusal(done: object, *words: str) -> str:
    """Exit 2 and exactly one line on stderr holding ``words``; the line."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)  # type: ignore[attr-defined]
    lines = other_lines(done.stderr)  # type: ignore[attr-defined]
    assert len(lines) == 1, lines
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


# ----------------------------------------------------------------- a recording HTTP server


@dataclass
class Recorder:
    """A real HTTP server on 127.0.0.1 (a child process) and the requests it logged."""

    port: int
    log: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def requests(self) -> list[str]:
        return re.findall(r'"([A-Z]+ \S+) HTTP/', self.log.read_text(errors="replace"))

    def assert_untouched(self) -> None:
        """No request so far; then a probe request is logged (the server does record)."""
        assert self.requests() == [], self.requests()
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(self.url("/probe"), timeout=10)
        deadline = time.monotonic() + 10
        while self.requests() != ["GET /probe"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.requests() == ["GET /probe"], self.requests()


@pytest.fixture
def server(procs: Processes, tmp_path: Path) -> Iterator[Recorder]:
    www = tmp_path / "www"
    www.mkdir()
    proc = procs.start([sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1", "0",
                        "--directory", str(www)], tmp_path / "http" / "server.log")
    wait_for(lambda: "port" in proc.stdout(), "the HTTP server to listen", watch=proc,
             timeout=60)
    found = re.search(r"port (\d+)", proc.stdout())
    assert found is not None
    yield Recorder(int(found.group(1)), proc.log.with_suffix(".err"))


# ----------------------------------------------------------------- (a) raw bytes of a file


def test_a_tif_of_vrt_xml_reading_raw_bytes_is_refused_with_or_without_allow_vrt(
        tmp_path: Path) -> None:
    """(a) evil.tif is VRT XML whose three bands are VRTRawRasterBands over a file of
    known bytes (standing for /etc/passwd): `run` exits 2 with one line, by default
    because it is a VRT, with --allow-vrt because of the raw band; nothing is written, and
    the bytes appear in no output.

    Teeth: scene_file() taking a VRT for a GeoTIFF (the VRT refusal removed): the GTiff
    driver refuses it and the scene fails alone (exit 1): fails. _Walk.plain() without
    the VRTRawRasterBand refusal: GDAL's GDAL_VRT_ENABLE_RAWRASTERBAND=NO refuses it and the
    scene fails alone (exit 1): fails. Before this change (no format checks, no options):
    the run labelled the bytes and exited 0.
    """
    secret = secret_file(tmp_path / "etc")
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    evil = write_vrt(scenes / "evil.tif", [raw_band(secret, k) for k in (1, 2, 3)])
    for allow in ([], ["--allow-vrt"]):
        out = tmp_path / f"out{len(allow)}"
        done = cli("run", str(evil), "--out", str(out), "--tile-size", "32", "--workers", "1",
                   *allow)
        words = ("is a VRT file, not a GeoTIFF", READS) if not allow else (
            "VRTRawRasterBand", "raw bytes")
        line = assert_one_line_refusal(done, "evil.tif", *words)
        assert not out.exists(), tree(out)
        assert CANARY[:20].decode() not in done.stdout + done.stderr, line


def test_the_reader_refuses_raw_bytes_with_or_without_allow_vrt(tmp_path: Path) -> None:
    """(a) at the reader: open_scene and read_window refuse the raw-band `.tif` and `.vrt`.

    Teeth: scene_file() taking the VRT for a GeoTIFF: a SceneError "not a raster", not a
    SceneFormatError: fails. The raw-band refusal removed: the band is refused as any
    other special band, without saying it reads raw bytes: fails.
    """
    secret = secret_file(tmp_path / "etc")
    for name in ("evil.tif", "evil.vrt"):
        evil = write_vrt(tmp_path / name, [raw_band(secret, 1)])
        with pytest.raises(SceneFormatError, match=rf"^{name}: is a VRT file, not a GeoTIFF"):
            open_scene(evil)
        raw = "has a VRTRawRasterBand, which reads the raw bytes of another file"
        with pytest.raises(SceneFormatError, match=raw):
            open_scene(evil, allow_vrt=True)
        with pytest.raises(SceneFormatError, match=raw):
            read_window(evil, box(SIZE, SIZE), [1], allow_vrt=True)


# ----------------------------------------------------------------- (b) network


def test_a_vrt_reaching_vsicurl_is_refused_and_no_request_is_made(
        tmp_path: Path, server: Recorder) -> None:
    """(b) meta.vrt's source is /vsicurl/http://127.0.0.1:PORT/latest/meta-data on a real
    server started here: `run` exits 2 with one line with and without --allow-vrt, and
    the server received no request.

    Teeth: _Walk.source_path() accepting /vsi paths: GDAL's own list of the VRT's files
    names the URL, and _check_vrt_files() refuses it, but not as a virtual file system
    path: fails; with that check removed too, CPL_VSIL_CURL_ALLOWED_FILENAME stops the
    request and the scene fails alone (exit 1): fails. Before this change the server
    received HEAD /latest/meta-data.
    """
    url = server.url("/latest/meta-data")
    vrt = write_vrt(tmp_path / "meta.vrt", [source_xml(f"/vsicurl/{url}", relative=0)] * 3)
    for allow in ([], ["--allow-vrt"]):
        done = cli("run", str(vrt), "--out", str(tmp_path / "out"), "--workers", "1", *allow)
        words = ("is a VRT file, not a GeoTIFF",) if not allow else (
            "GDAL virtual file system path (/vsicurl/)", "not a local file")
        line = assert_one_line_refusal(done, "meta.vrt", *words)
        assert "404" not in line.replace(url, "")  # the port may hold 404
    server.assert_untouched()


@pytest.mark.parametrize("reach", ["/vsicurl/{url}", "/vsizip//vsicurl/{url}.zip/a.tif",
                                   "{url}", "vrt://{url}", "HTTP:{url}", "<VRTDataset/>"])
def test_the_reader_refuses_every_way_out_of_local_files(
        tmp_path: Path, server: Recorder, reach: str) -> None:
    """(b) at the reader, with allow_vrt: a /vsi path, a /vsi chain, a plain URL (GDAL's
    HTTP driver would fetch it), vrt://, a driver prefix and inline XML as a source are
    refused, and the server received no request.

    Teeth: _Walk.source_path() without its checks of what a source names: the /vsi,
    URL and driver-prefix cases fail on the message (GDAL's file list still refuses them)
    and the inline XML case opens an empty VRT: fails.
    """
    text = reach.format(url=server.url("/latest/meta-data")).replace("<", "&lt;")
    vrt = write_vrt(tmp_path / "out.vrt", [source_xml(text, relative=0)])
    with pytest.raises(SceneFormatError, match=r"not a local file"):
        read_window(vrt, box(SIZE, SIZE), [1], allow_vrt=True)
    server.assert_untouched()


def test_url_scene_arguments_are_a_usage_error(tmp_path: Path, server: Recorder) -> None:
    """Scene arguments are local files: /vsicurl/... and http://... exit 2 with one line
    saying so, before any request.

    Teeth: patterns._remote_problem() returning None: both are "no such file" scenes
    (exit 1): fails.
    """
    for argument in (f"/vsicurl/{server.url('/latest/meta-data')}", server.url("/x.tif")):
        done = cli("run", argument, "--out", str(tmp_path / "out"))
        assert_one_line_refusal(done, argument, "not a local file")
    server.assert_untouched()


# ----------------------------------------------------------------- (c) a legitimate VRT


@pytest.mark.slow
def test_a_plain_vrt_of_local_geotiffs_labels_as_the_geotiff_mosaic(tmp_path: Path) -> None:
    """(c) mosaic.vrt over left.tif and right.tif (relative paths, as gdalbuildvrt writes
    them) runs with --allow-vrt and its labels equal those of whole.tif, the same pixels in
    one GeoTIFF; without --allow-vrt it is refused (exit 2, one line). A changed source
    changes the VRT's input fingerprint: the next run refuses to keep the old outputs.

    Teeth: scene_file() refusing every VRT: the --allow-vrt run exits 2: fails.
    _with_digest() hashing the VRT file alone: the run after the source changed skips the
    scene (exit 0): fails.
    """
    rows, cols, half = 96, 128, 64
    pixels = image(rows, cols)
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    whole = write_tif(scenes / "whole.tif", pixels)
    write_tif(scenes / "left.tif", pixels[:, :, :half])
    write_tif(scenes / "right.tif", np.ascontiguousarray(pixels[:, :, half:]),
              TRANSFORM @ Affine.translation(half, 0))
    rect = ('<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
            '<DstRect xOff="{x}" yOff="0" xSize="{w}" ySize="{h}"/>')
    vrt = write_vrt(scenes / "mosaic.vrt", [
        source_xml("left.tif", k, rect=rect.format(x=0, w=half, h=rows))
        + source_xml("right.tif", k, rect=rect.format(x=half, w=cols - half, h=rows))
        for k in (1, 2, 3)], rows, cols)
    out = tmp_path / "out"
    args = ["run", str(vrt), str(whole), "--out", str(out), "--tile-size", "64",
            "--workers", "1"]
    assert_one_line_refusal(cli(*args), "mosaic.vrt: is a VRT file, not a GeoTIFF", READS)
    assert not out.exists()

    done = cli(*args, "--allow-vrt")
    assert done.returncode == 0, done.stderr
    with rasterio.open(out / "mosaic.tif") as a, rasterio.open(out / "whole.tif") as b:
        labels = a.read(1)
        assert np.array_equal(labels, b.read(1))
        assert a.transform == b.transform and a.crs == b.crs
    assert len(np.unique(labels)) >= 2

    changed = pixels[:, :, :half].copy()
    changed[:, :8, :8] = 255 - changed[:, :8, :8]
    write_tif(scenes / "left.tif", changed)
    again = cli(*args, "--allow-vrt")
    assert again.returncode == 2, (again.stdout, again.stderr)
    assert "of mosaic (outputs made from another version of the scene file)" in again.stderr


def test_allow_vrt_comes_from_the_workflow_the_environment_and_the_command_line() -> None:
    """The setting's three sources; off by default.

    Teeth: input.allow_vrt removed from config._LAYOUT: the workflow key and the
    environment variable are unknown settings: fails.
    """
    assert resolve().allow_vrt is False
    assert resolve(values_from_tree({"schema": 1, "input": {"allow_vrt": True}})).allow_vrt
    assert resolve(values_from_env({"FCN_PIPELINE_INPUT_ALLOW_VRT": "yes"})).allow_vrt
    assert resolve().to_tree()["input"]["allow_vrt"] is False


# ----------------------------------------------------------------- (d) other formats


@pytest.mark.parametrize("driver", ["PNG", "JPEG"])
def test_a_png_or_jpeg_named_tif_is_refused(tmp_path: Path, driver: str) -> None:
    """(d) photo.tif is a PNG or JPEG: `run` exits 2 with one line naming the format, with
    and without --allow-vrt; the reader refuses it too.

    Teeth: formats._kind() not naming other formats (None): a SceneError "not a raster"
    and the scene fails alone (exit 1): fails. Before this change GDAL read the PNG and
    JPEG as scenes (no CRS: refused only for that).
    """
    path = write_photo(tmp_path / "photo.tif", driver)
    for allow in ([], ["--allow-vrt"]):
        done = cli("run", str(path), "--out", str(tmp_path / "out"), *allow)
        assert_one_line_refusal(done, f"photo.tif: is a {driver} file, not a GeoTIFF", READS)
    with pytest.raises(SceneFormatError, match=f"is a {driver} file"):
        read_window(path, box(SIZE, SIZE), [1])


def write_photo(path: Path, driver: str) -> Path:
    """A PNG or JPEG of sample pixels (no georeferencing) at ``path``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver=driver, width=SIZE, height=SIZE, count=3,
                           dtype="uint8") as ds:
            ds.write(image())
    return path


# ----------------------------------------------------------------- (e) chains


def _chain(folder: Path, depth: int) -> Path:
    """v0.vrt -> v1.vrt -> ... -> v{depth-1}.vrt -> base.tif: ``depth`` VRTs."""
    write_tif(folder / "base.tif", image())
    target = "base.tif"
    for k in reversed(range(depth)):
        write_vrt(folder / f"v{k}.vrt", [source_xml(target, b) for b in (1, 2, 3)])
        target = f"v{k}.vrt"
    return folder / "v0.vrt"


def test_vrt_chains_that_loop_or_nest_too_deep_stop_with_one_line(tmp_path: Path) -> None:
    """(e) with --allow-vrt: a VRT that reads itself, two that read each other, and a
    chain one VRT deeper than the limit each exit 2 with one line; a chain at the limit
    opens.

    Teeth: _Walk.source() without the loop check: the looping VRT is taken as checked,
    passes preflight and fails alone on its band count (exit 1): fails. _Walk.vrt()
    without the depth limit: the deep chain runs (exit 0): fails. scene_file() refusing
    every VRT: the message is the plain VRT refusal: fails.
    """
    self_loop = write_vrt(tmp_path / "self.vrt", [source_xml("self.vrt")])
    write_vrt(tmp_path / "a.vrt", [source_xml("b.vrt")])
    pair = write_vrt(tmp_path / "b.vrt", [source_xml("a.vrt")])
    (tmp_path / "deep").mkdir()
    (tmp_path / "ok").mkdir()
    deep = _chain(tmp_path / "deep", MAX_VRT_DEPTH + 1)
    cases = {self_loop: "VRT sources loop (self.vrt -> self.vrt)",
             pair: "VRT sources loop (b.vrt -> a.vrt -> b.vrt)",
             deep: f"VRTs nest more than {MAX_VRT_DEPTH} deep"}
    for path, words in cases.items():
        done = cli("run", str(path), "--out", str(tmp_path / "out"), "--tile-size", "32",
                   "--workers", "1", "--allow-vrt")
        assert_one_line_refusal(done, path.name, words)
    info = open_scene(_chain(tmp_path / "ok", MAX_VRT_DEPTH), allow_vrt=True)
    assert info.driver == "VRT" and len(info.sources) == MAX_VRT_DEPTH


# ----------------------------------------------------------------- sidecars


def test_geotiff_sidecars_still_work(tmp_path: Path) -> None:
    """External overviews (.ovr), an external mask (.msk) and a PAM .aux.xml next to a
    GeoTIFF are read as before: the .msk is the mask.

    Teeth: _check_sidecars() refusing every sidecar: fails.
    """
    pixels = image()
    path = write_tif(tmp_path / "scene.tif", pixels)
    mask = np.full((SIZE, SIZE), 255, np.uint8)
    mask[:10, :20] = 0
    # GDAL's options for a mask and overviews outside the file: scene.tif.msk, scene.tif.ovr
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=False, TIFF_USE_OVR=True), \
            rasterio.open(path, "r+") as ds:
        ds.write_mask(mask)
        ds.build_overviews([2, 4])
    (tmp_path / "scene.tif.aux.xml").write_text(
        '<PAMDataset><Metadata><MDI key="note">kept</MDI></Metadata></PAMDataset>')
    assert {p.name for p in tmp_path.iterdir()} == {
        "scene.tif", "scene.tif.msk", "scene.tif.msk.ovr", "scene.tif.ovr", "scene.tif.aux.xml"}
    info = open_scene(path)
    assert info.shape == (SIZE, SIZE) and info.driver == "GTiff"
    data, valid = read_window(path, box(SIZE, SIZE), [1, 2, 3])
    assert np.array_equal(data, pixels)
    assert np.array_equal(valid, mask > 0)


def test_a_sidecar_that_is_not_a_geotiff_is_refused(tmp_path: Path, server: Recorder) -> None:
    """scene.tif is a real GeoTIFF, but scene.tif.msk is VRT XML whose mask comes from a
    URL (GDAL opens a .msk with any driver, and its HTTP driver fetches a plain URL), and
    an .aux.xml may point GDAL at an overview file elsewhere: both are refused, and the
    server received no request.

    Teeth: _check_sidecars() without the .msk/.ovr check: read_window() reads the mask
    through the VRT and the server receives GET /mask: fails. Without the OVERVIEW_FILE
    check: the .aux.xml case opens: fails.
    """
    path = write_tif(tmp_path / "scene.tif", image())
    msk = write_vrt(tmp_path / "scene.tif.msk", [source_xml(server.url("/mask"), relative=0)])
    msk.write_text(msk.read_text().replace(
        "<SRS>", '<Metadata><MDI key="INTERNAL_MASK_FLAGS_1">2</MDI>'
                 '<MDI key="INTERNAL_MASK_FLAGS_2">2</MDI>'
                 '<MDI key="INTERNAL_MASK_FLAGS_3">2</MDI></Metadata><SRS>'))
    with pytest.raises(SceneFormatError, match=r"^scene\.tif: sidecar .*scene\.tif\.msk is a "
                                               r"VRT file"):
        read_window(path, box(SIZE, SIZE), [1, 2, 3])
    msk.unlink()
    (tmp_path / "scene.tif.aux.xml").write_text(
        '<PAMDataset><Metadata domain="OVERVIEWS"><MDI key="OVERVIEW_FILE">/tmp/x.vrt</MDI>'
        "</Metadata></PAMDataset>")
    with pytest.raises(SceneFormatError, match=r"names an overview file elsewhere"):
        open_scene(path)
    server.assert_untouched()


def namespaced_source(name: str, band: int) -> str:
    """A source whose SourceFilename is in a default XML namespace: GDAL's parser, which
    knows no namespaces, reads it as any other; Python's sees {urn:x}SourceFilename."""
    return (f'<SimpleSource><SourceFilename xmlns="urn:x" relativeToVRT="1">{name}'
            f"</SourceFilename><SourceBand>{band}</SourceBand></SimpleSource>")


@pytest.mark.parametrize("reach", ["network", "file"])
def test_a_namespaced_source_reading_the_scene_s_own_aux_xml_is_refused(
        tmp_path: Path, server: Recorder, reach: str) -> None:
    """With --allow-vrt, evil.tif is a VRT whose sources, in an XML namespace, name its
    own sidecar evil.tif.aux.xml, itself a VRT of URLs on a real server started here
    (network) or of raw bands over a file of known bytes (file): `run` exits 2 with one
    line, writes nothing, the server received no request and the bytes appear nowhere.

    Teeth: the namespace refusal in formats._xml(), _check_pam() and the sidecar-is-no-
    source rule removed together: the server receives GET /x.tif (network), the run
    labels the bytes and exits 0 (file): fails. Any one of them alone is enough to pass
    (the reviewer's repro was refused by none of them).
    """
    secret = secret_file(tmp_path / "etc")
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    evil = write_vrt(scenes / "evil.tif", [namespaced_source("evil.tif.aux.xml", k)
                                           for k in (1, 2, 3)])
    write_vrt(scenes / "evil.tif.aux.xml", [
        source_xml(server.url("/x.tif"), relative=0) if reach == "network"
        else raw_band(secret, k) for k in (1, 2, 3)])
    out = tmp_path / "out"
    done = cli("run", str(evil), "--out", str(out), "--tile-size", "32", "--workers", "1",
               "--allow-vrt")
    assert_one_line_refusal(done, "evil.tif")
    assert not out.exists(), tree(out)
    assert CANARY[:20].decode() not in done.stdout + done.stderr
    server.assert_untouched()


@pytest.mark.parametrize("xml", [
    '<SourceFilename xmlns="urn:x" relativeToVRT="1">base.tif</SourceFilename>',
    '<x:SourceFilename xmlns:x="urn:x" relativeToVRT="1">base.tif</x:SourceFilename>',
    '<SourceFilename relativeToVRT="1" xml:space="preserve">base.tif</SourceFilename>'])
def test_xml_namespaces_are_refused_in_vrts_and_aux_xml(tmp_path: Path, xml: str) -> None:
    """A VRT declaring a namespace (default or prefixed) or using the predefined xml:
    prefix, and an .aux.xml declaring one, are refused as such: no VRT or PAM file needs
    one, and GDAL's parser reads names as written.

    Teeth: the namespace refusal in formats._xml() removed: the default-namespace source
    is invisible to the walk and refused by GDAL's file list, not as a namespace; the
    prefixed one and xml:space open (GDAL ignores x:SourceFilename: an empty band); the
    .aux.xml opens: fails.
    """
    write_tif(tmp_path / "base.tif", image())
    vrt = write_vrt(tmp_path / "ns.vrt", [
        f"<SimpleSource>{xml}<SourceBand>1</SourceBand></SimpleSource>"])
    with pytest.raises(SceneFormatError, match=r"^ns\.vrt: its XML uses a namespace \("):
        open_scene(vrt, allow_vrt=True)
    scene = write_tif(tmp_path / "scene.tif", image())
    (tmp_path / "scene.tif.aux.xml").write_text(
        '<PAMDataset xmlns:gdal="urn:x"><Metadata><MDI key="a">b</MDI></Metadata></PAMDataset>')
    with pytest.raises(SceneFormatError, match=r"aux\.xml: its XML uses a namespace "
                                               r"\(xmlns:gdal='urn:x'\)"):
        open_scene(scene)


@pytest.mark.parametrize("aux, words", [
    ("<VRTDataset/>", "its root element is <VRTDataset>, not <PAMDataset>"),
    ('<PAMDataset><VRTRasterBand band="1"/></PAMDataset>', "holds a VRT element <VRTRasterBand>"),
    ("<PAMDataset><PAMRasterBand band=\"1\"><ComplexSource/></PAMRasterBand></PAMDataset>",
     "holds a VRT element <ComplexSource>")])
def test_an_aux_xml_must_be_a_pam_file_without_vrt_elements(
        tmp_path: Path, aux: str, words: str) -> None:
    """scene.tif.aux.xml that is a VRT, or a PAM file holding VRT elements, is refused:
    a VRT source may name it, and it would then be read as a VRT.

    Teeth: formats._check_pam() removed: the scene opens: fails.
    """
    scene = write_tif(tmp_path / "scene.tif", image())
    (tmp_path / "scene.tif.aux.xml").write_text(aux)
    with pytest.raises(SceneFormatError, match=re.escape(f"scene.tif.aux.xml: {words}")
                       if "root" in words else re.escape(f"scene.tif.aux.xml {words}")):
        open_scene(scene)


def test_a_source_naming_a_sidecar_is_judged_by_its_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Being a checked sidecar vouches for nothing as a source: a VRT source naming a
    GeoTIFF's PAM .aux.xml is refused as no GeoTIFF or VRT; and with the .aux.xml rules
    fooled, a source naming the VRT's own .aux.xml, a raw-band VRT over a file of known
    bytes, is refused for that raw band and the bytes are never returned.

    Teeth: _Walk.source() skipping any path among the checked files (sidecars included),
    as before: the PAM .aux.xml is opened by GDAL as a source and fails as unreadable,
    not for its bytes; the raw bytes are returned: fails.
    """
    write_tif(tmp_path / "base.tif", image())
    (tmp_path / "base.tif.aux.xml").write_text(
        '<PAMDataset><Metadata><MDI key="note">kept</MDI></Metadata></PAMDataset>')
    vrt = write_vrt(tmp_path / "pam.vrt", [source_xml("base.tif", 1)
                                           + source_xml("base.tif.aux.xml", 1)])
    with pytest.raises(SceneFormatError, match=r"base\.tif\.aux\.xml is no GeoTIFF or VRT"):
        read_window(vrt, box(SIZE, SIZE), [1], allow_vrt=True)
    monkeypatch.setattr(formats, "_check_pam", lambda root, label, name: None)
    evil = write_vrt(tmp_path / "evil.vrt", [source_xml("evil.vrt.aux.xml", 1)])
    write_vrt(tmp_path / "evil.vrt.aux.xml", [raw_band(secret_file(tmp_path / "etc"), 1)])
    with pytest.raises(SceneFormatError, match="has a VRTRawRasterBand"):
        read_window(evil, box(SIZE, SIZE), [1], allow_vrt=True)


def test_a_large_aux_xml_is_a_usage_error_at_once(tmp_path: Path) -> None:
    """A 2 MiB scene.tif.aux.xml (a PAM file of empty elements) next to a valid GeoTIFF:
    `run --dry-run` exits 2 with one line naming the 1 MiB limit and why, in seconds
    (GDAL would parse the file on every open of the scene: each tile read).

    Teeth: formats.MAX_AUX_XML_BYTES set to MAX_XML_BYTES: the dry run plans the scene
    (exit 0): fails.
    """
    scene = write_tif(tmp_path / "scene.tif", image())
    (tmp_path / "scene.tif.aux.xml").write_bytes(
        b"<PAMDataset>" + b"<a/>" * (2**19) + b"</PAMDataset>")
    start = time.monotonic()
    done = cli("run", str(scene), "--out", str(tmp_path / "out"), "--dry-run")
    assert_one_line_refusal(done, "scene.tif.aux.xml", "more than the 1 MiB",
                            "a sidecar GDAL parses on every read of scene.tif")
    assert time.monotonic() - start < 30


# ----------------------------------------------------------------- a file changed mid-run


def test_a_scene_planned_as_geotiff_is_never_read_as_another_format(tmp_path: Path) -> None:
    """A scene planned as a GeoTIFF that became a VRT (even a plain one over a local
    GeoTIFF) or a PNG fails in its task with one line; a scene planned as a VRT is read
    as one. The identity check is taken as fooled: the task's identity is the new file's.

    Teeth: tasks._read() calling read_window() with allow_vrt=True whatever the plan:
    the plain VRT is read: fails.
    """
    spec = load_spec("demo")
    write_tif(tmp_path / "base.tif", image())
    scene = tmp_path / "scene.tif"
    tile = corner_tile()
    write_vrt(scene, [source_xml("base.tif", b) for b in (1, 2, 3)])
    for allow_vrt, expected in ((False, "is a VRT file, not a GeoTIFF"), (True, None)):
        target = SceneTarget(str(scene), FileIdentity.of(scene), str(tmp_path / "out"), "scene",
                             "run", False, allow_vrt=allow_vrt)
        if expected is None:
            data, _, _ = _read(spec, target, tile.window)
            assert np.array_equal(data, image()[:, :32, :32])
            continue
        with pytest.raises(SceneFormatError, match=expected) as caught:
            _read(spec, target, tile.window)
        assert "\n" not in str(caught.value)
    write_photo(scene, "PNG")
    target = SceneTarget(str(scene), FileIdentity.of(scene), str(tmp_path / "out"), "scene",
                         "run", False, allow_vrt=True)
    with pytest.raises(SceneFormatError, match="is a PNG file, not a GeoTIFF"):
        _read(spec, target, tile)


def corner_tile() -> Tile:
    """A 32 x 32 tile at the scene's corner, its window the same box."""
    core = Box(Span(0, 32), Span(0, 32))
    return Tile(index=(0, 0), core=core, window=core, crop=core)


# ----------------------------------------------------------------- the GDAL layer on its own


def test_gdal_s_own_list_of_a_vrt_s_files_refuses_raw_bytes_past_the_xml_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the XML check blind to raw bands, GDAL's own list of the VRT's files names the
    raw file, which was never checked: refused before any pixel is read, and the bytes are
    never returned. (GDAL 3.10 has no run-time switch for raw bands: its
    GDAL_VRT_ENABLE_RAWRASTERBAND is a build option, so this check stands in for it.)

    Teeth: _check_vrt_files() removed: read_window() returns the canary's bytes: fails.
    """
    evil = write_vrt(tmp_path / "evil.vrt", [raw_band(secret_file(tmp_path / "etc"), 1)])
    monkeypatch.setattr(formats._Walk, "plain", lambda self, root, path, label: None)
    monkeypatch.setattr(formats, "_FILE_ELEMENTS", ())
    with pytest.raises(SceneFormatError, match=r"GDAL would read .*passwd for evil\.vrt"):
        read_window(evil, box(SIZE, SIZE), [1], allow_vrt=True)


def test_gdal_makes_no_request_even_past_the_format_checks(
        tmp_path: Path, server: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every format check fooled (the file passes as a VRT of checked files),
    CPL_VSIL_CURL_ALLOWED_FILENAME keeps /vsicurl/ and the file systems built on it from
    sending anything.

    Teeth: that option removed from readers.GDAL_OPTIONS: the server receives
    HEAD /latest/meta-data: fails.
    """
    monkeypatch.setattr(readers, "scene_file", lambda path, *, allow_vrt=False: SceneFile(
        "VRT", files=frozenset({str(Path(path).absolute())})))
    monkeypatch.setattr(readers, "_check_vrt_files", lambda name, scene: None)
    url = server.url("/latest/meta-data")
    for k, text in enumerate((f"/vsicurl/{url}", f"/vsizip//vsicurl/{url}.zip/a.tif")):
        vrt = write_vrt(tmp_path / f"net{k}.vrt", [source_xml(text, relative=0)])
        with pytest.raises(SceneError):
            read_window(vrt, box(SIZE, SIZE), [1], allow_vrt=True)
    server.assert_untouched()


def test_the_geotiff_driver_alone_refuses_a_vrt_past_the_format_checks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the format check fooled into calling VRT XML a GeoTIFF, GDAL is given the GTiff
    driver only and refuses the file.

    Teeth: _dataset() opening without driver=: the VRT opens and reads: fails.
    """
    base = write_tif(tmp_path / "base.tif", image())
    vrt = write_vrt(tmp_path / "vrt.tif", [source_xml(base.name)])
    monkeypatch.setattr(readers, "scene_file",
                        lambda path, *, allow_vrt=False: SceneFile(formats.GEOTIFF))
    with pytest.raises(SceneError, match="is not a raster"):
        open_scene(vrt)
