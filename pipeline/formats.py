"""What a scene file is, judged from its bytes, and every file a VRT scene reaches.

GDAL opens whatever it recognises: a ``.tif`` that holds VRT XML is read as a VRT, and
a VRT may read the raw bytes of any file (``VRTRawRasterBand``), a URL, or whatever a
GDAL connection string names. fcn-pipeline reads scenes from an allow-list instead:

- GeoTIFF/COG (GDAL's ``GTiff`` driver), always;
- VRT, only when the run allows it (``input.allow_vrt``), and then only a plain VRT
  (as ``gdalbuildvrt`` writes them: no raw, derived, warped or other special bands or
  datasets) whose every source is a local regular file that passes the same rules, VRTs
  nested at most :data:`MAX_VRT_DEPTH` deep and without loops. Source paths are
  resolved as GDAL resolves them: relative to the VRT's folder with
  ``relativeToVRT="1"``, as written otherwise. A URL, a ``/vsi...`` path, a GDAL
  connection string (``DRIVER:...``, subdatasets, derived datasets, ``vrt://``) or
  inline XML is refused.

The sidecar files GDAL opens by name next to any of these files, ``NAME.ovr`` and
``NAME.msk`` (GDAL opens them with every driver it has), must be GeoTIFFs too, and a
``NAME.aux.xml`` must be a small PAM file (root ``PAMDataset``, at most
:data:`MAX_AUX_XML_BYTES`: GDAL parses it on every open) holding no VRT element and not
naming an overview file elsewhere (``OVERVIEW_FILE``). Being a sidecar vouches for
nothing else: a VRT source that names one is judged by its bytes like any other.

XML that GDAL reads is parsed here without namespaces: GDAL's parser knows none, so
``<SourceFilename xmlns="urn:x">`` is a source to GDAL but ``{urn:x}SourceFilename`` to
Python's. A VRT or ``.aux.xml`` that declares or uses a namespace is refused.

The file is never opened by GDAL here: the readers open it afterwards with the one
driver named by :func:`scene_file`, under GDAL options that forbid raw VRT bands and
network file systems again. The standard library only.
"""

from __future__ import annotations

import io
import os
import re
import stat
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import SceneError, SceneFormatError, SceneReadError

#: GDAL drivers of the scene formats.
GEOTIFF = "GTiff"
VRT = "VRT"
#: VRTs within VRTs, the scene's own included.
MAX_VRT_DEPTH = 8
#: Largest VRT read; ``gdalbuildvrt`` writes about 1 KiB per source.
MAX_XML_BYTES = 64 * 2**20
#: Largest ``.aux.xml`` sidecar read: GDAL parses it on every open of its file (each tile
#: read); a PAM file of statistics, metadata and a colour table is a few KiB.
MAX_AUX_XML_BYTES = 2**20
#: What a refused scene is told.
READS = "fcn-pipeline reads GeoTIFF/COG scenes (VRT with --allow-vrt)"

#: The bytes GDAL reads to identify a file's format.
_HEADER_BYTES = 1024
_TIFF = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
#: Leading bytes of formats GDAL reads that are not scenes here, to name them in refusals.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000"),
    (b"\x89HDF\r\n\x1a\n", "HDF5"), (b"CDF\x01", "NetCDF"), (b"CDF\x02", "NetCDF"),
    (b"EHFA_HEADER_TAG", "ERDAS Imagine"), (b"PK\x03\x04", "ZIP"), (b"\x1f\x8b", "gzip"),
    (b"%PDF", "PDF"), (b"<?xml", "XML"),
)
#: A GDAL connection string: a driver prefix (``HDF5:``, ``GTIFF_DIR:``, ``MEM:::``,
#: ``DERIVED_SUBDATASET:``...) or a URL scheme.
_CONNECTION = re.compile(r"[A-Za-z][A-Za-z0-9_+.-]*:")
#: Sidecars GDAL opens by name with any driver: overviews and masks (both cases: with
#: GDAL_DISABLE_READDIR_ON_OPEN, GDAL probes the upper-case names too).
_SIDECARS = (".ovr", ".OVR", ".msk", ".MSK")
#: The band sub-classes a plain VRT may declare.
_PLAIN_BANDS = ("", "vrtsourcedrasterband")
_FILE_ELEMENTS = ("sourcefilename", "sourcedataset")
#: Elements of a VRT, never of a PAM ``.aux.xml`` (nor are names ending in "source").
_VRT_ELEMENTS = (*_FILE_ELEMENTS, "vrtdataset", "vrtrasterband")


@dataclass(frozen=True)
class SceneFile:
    """A scene file the run may read.

    ``driver`` is the one GDAL driver to open it with (:data:`GEOTIFF` or :data:`VRT`);
    ``sources`` every other file a VRT reads (its sources, their sources...), each
    once, in document order, as GDAL resolves their paths; empty for a GeoTIFF.
    ``vrts`` lists the VRT files among them, the scene first; ``files`` holds the real
    path of every file checked, existing sidecars included: what GDAL may open.
    """

    driver: str
    sources: tuple[str, ...] = ()
    vrts: tuple[str, ...] = ()
    files: frozenset[str] = frozenset()


def scene_file(path: str | Path, *, allow_vrt: bool = False) -> SceneFile:
    """Check what the file at ``path`` is, and every file it would make GDAL read.

    Args:
        path: The scene file (made absolute, links not resolved: GDAL resolves a
            VRT's relative sources from the folder of the path it opens).
        allow_vrt: Accept a VRT (``--allow-vrt``) of local GeoTIFFs and VRTs.

    Returns:
        The driver to open it with, and a VRT's sources.

    Raises:
        SceneFormatError: The file, one of its sources or sidecars is of a format the
            run does not read (a VRT without ``allow_vrt``, PNG, JPEG...), a VRT reaches
            anything but local GeoTIFFs and plain VRTs, nests too deep or loops.
        SceneReadError: The file is missing or cannot be read.
        SceneError: The file is a directory, or no raster at all (no known header).
    """
    file = Path(path).absolute()
    name = file.name
    head = _head(file, name)
    kind = _kind(head)
    if kind == GEOTIFF:
        return SceneFile(GEOTIFF, files=frozenset(_check_sidecars(file, name)))
    if kind == VRT and allow_vrt:
        walk = _Walk(name)
        walk.vrt(file, (os.path.realpath(file),))
        return SceneFile(VRT, tuple(walk.sources), tuple(walk.vrts), frozenset(walk.files))
    if kind is None:
        raise SceneError(f"{name} is not a raster: it has no TIFF header ({file}); {READS}")
    raise SceneFormatError(f"{name}: is {_a(kind)} {kind} file, not a GeoTIFF; {READS}")


def _a(word: str) -> str:
    return "an" if word[0] in "AEHIOUX" else "a"


def _head(path: Path, name: str, *, where: str = "") -> bytes:
    """The first bytes of a regular file, never blocking on a named pipe. ``where`` says
    what the file is to the scene ``name`` (empty: the scene itself)."""
    label = f"{name}: {where} {path}" if where else name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        if not where:
            raise SceneReadError(f"{name}: no such file ({path}); check the scene path") from None
        raise SceneFormatError(f"{label}: no such file") from None
    except OSError as exc:
        raise SceneReadError(f"{label} cannot be read: {exc.strerror or exc} ({path})") from exc
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode) and not where:
            raise SceneError(f"{name} is not a raster but a directory ({path})")
        if not stat.S_ISREG(mode):
            raise SceneFormatError(f"{label}: is not a regular file (a directory, pipe or "
                                   f"device); {READS}")
        return os.read(fd, _HEADER_BYTES)
    except OSError as exc:
        raise SceneReadError(f"{label} cannot be read: {exc.strerror or exc} ({path})") from exc
    finally:
        os.close(fd)


def _kind(head: bytes) -> str | None:
    """The format of a file from its first bytes: a driver name, another format's name,
    or None when unknown. GDAL's VRT driver takes any file whose header, up to its first
    NUL byte, contains ``<VRTDataset``."""
    if head.startswith(_TIFF):
        return GEOTIFF
    if b"<VRTDataset" in head.split(b"\x00", 1)[0]:
        return VRT
    return next((kind for magic, kind in _SIGNATURES if head.startswith(magic)), None)


def _xml(path: Path, label: str, limit: str = "") -> ElementTree.Element:
    """The parsed XML of a VRT or ``.aux.xml`` file (``limit``: the end of the message
    for one over :data:`MAX_AUX_XML_BYTES`; empty for a VRT, up to :data:`MAX_XML_BYTES`):
    bounded in size, no DTD and no namespace (GDAL's parser knows neither entity
    declarations nor namespaces, so the two parsers could read different names)."""
    most = MAX_AUX_XML_BYTES if limit else MAX_XML_BYTES
    try:
        size = path.stat().st_size
        if size > most:
            raise SceneFormatError(f"{label}: {size} bytes of XML, more than the "
                                   f"{most // 2**20} MiB fcn-pipeline reads{limit}")
        data = path.read_bytes()
    except OSError as exc:
        raise SceneReadError(f"{label} cannot be read: {exc.strerror or exc}") from exc
    if b"<!doctype" in data.lower():
        raise SceneFormatError(f"{label}: its XML has a DOCTYPE, which no VRT needs; remove it")
    root = None
    try:
        for event, item in ElementTree.iterparse(io.BytesIO(data), ("start-ns", "end")):
            if event == "start-ns":
                prefix, uri = item
                raise _namespace(label, f"xmlns{':' if prefix else ''}{prefix}={uri!r}")
            root = item
    except ElementTree.ParseError as exc:
        raise SceneFormatError(f"{label}: is not valid XML ({exc})") from None
    assert root is not None  # a document without an element is a ParseError
    for element in root.iter():
        for name in (element.tag, *element.attrib):
            if name.startswith("{"):  # the predefined xml: prefix, declared nowhere
                raise _namespace(label, name)
    return root


def _namespace(label: str, name: str) -> SceneFormatError:
    return SceneFormatError(
        f"{label}: its XML uses a namespace ({name}), which no VRT or .aux.xml needs and "
        "which GDAL's XML parser ignores (it could read another file than the one "
        "checked); remove it")


def _attribute(element: ElementTree.Element, name: str, label: str) -> str:
    """An attribute as GDAL reads it (its name in any case); "" when absent."""
    values = [v for k, v in element.attrib.items() if k.lower() == name]
    if len(values) > 1:
        raise SceneFormatError(f"{label}: <{element.tag}> has the attribute {name} twice")
    return values[0] if values else ""


def _check_sidecars(path: Path, name: str, depth: int = 2) -> list[str]:
    """Refuse the sidecars GDAL would open with ``path`` unless they are GeoTIFFs, and an
    ``.aux.xml`` unless it is a small PAM file without VRT elements that does not point
    GDAL at an overview file elsewhere; the sidecars' own sidecars (``NAME.msk.ovr``,
    the mask's overviews) to ``depth`` levels.

    Returns:
        The real paths of ``path`` and of its sidecars that exist.
    """
    found = [os.path.realpath(path)]
    for suffix in _SIDECARS if depth else ():
        side = Path(f"{path}{suffix}")
        if not os.path.lexists(side):
            continue
        kind = _kind(_head(side, name, where="sidecar"))
        if kind != GEOTIFF:
            what = f"{_a(kind)} {kind} file" if kind else "no GeoTIFF"
            raise SceneFormatError(
                f"{name}: sidecar {side} is {what}, and GDAL reads it with {path.name}: "
                "remove it, or make it a GeoTIFF (gdaladdo -ro for overviews)")
        found += _check_sidecars(side, name, depth - 1)
    aux = Path(f"{path}.aux.xml")
    if os.path.isfile(aux):
        label = f"{name}: sidecar {aux}"
        root = _xml(aux, label, f" in an .aux.xml, a sidecar GDAL parses on every read of "
                                f"{path.name}; remove it or make it smaller")
        _check_pam(root, label, path.name)
        for item in root.iter():
            key = _attribute(item, "key", label) if item.tag.lower() == "mdi" else ""
            if key.upper() == "OVERVIEW_FILE":
                raise SceneFormatError(
                    f"{label} names an overview file elsewhere ({(item.text or '').strip()}), "
                    f"which GDAL would read with {path.name}; remove that OVERVIEW_FILE item "
                    "or the .aux.xml")
        found.append(os.path.realpath(aux))
    return found


def _check_pam(root: ElementTree.Element, label: str, name: str) -> None:
    """Refuse an ``.aux.xml`` (read with the file ``name``) that is not a GDAL PAM file,
    or holds VRT elements: a VRT source that names it must find no VRT there."""
    if root.tag.lower() != "pamdataset":
        raise SceneFormatError(
            f"{label}: its root element is <{root.tag}>, not <PAMDataset>: it is no GDAL "
            f"metadata file, and GDAL reads it with {name}; remove it")
    for item in root.iter():
        tag = item.tag.lower()
        if tag in _VRT_ELEMENTS or tag.endswith("source"):
            raise SceneFormatError(
                f"{label} holds a VRT element <{item.tag}>, which no GDAL metadata file has, "
                f"and GDAL reads it with {name}; remove it or the .aux.xml")


class _Walk:
    """A depth-first check of a VRT and everything it reaches, each file once."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sources: list[str] = []
        self.vrts: list[str] = []
        self.files: set[str] = set()
        #: Real paths of the sources judged by their bytes (not the sidecars in files).
        self.checked: set[str] = set()

    def refuse(self, text: str) -> SceneFormatError:
        return SceneFormatError(f"{self.name}: {text}")

    def vrt(self, path: Path, chain: tuple[str, ...]) -> None:
        """Check the VRT at ``path``; ``chain`` holds the real paths of the VRTs that lead
        to it, its own last."""
        if len(chain) > MAX_VRT_DEPTH:
            raise self.refuse(f"VRTs nest more than {MAX_VRT_DEPTH} deep ("
                              + " -> ".join(Path(p).name for p in chain[:3])
                              + f" -> ... -> {path.name}); make a GeoTIFF or a flatter VRT")
        self.files.update(_check_sidecars(path, self.name))
        label = f"{self.name}: {path}" if len(chain) > 1 else self.name
        root = _xml(path, label)
        self.plain(root, path, label)
        self.vrts.append(str(path))
        for element in root.iter():
            if element.tag.lower() in _FILE_ELEMENTS:
                self.source(self.source_path(element, path, label), path, chain)

    def plain(self, root: ElementTree.Element, path: Path, label: str) -> None:
        """Refuse what a plain VRT does not hold: raw, derived and other special bands,
        and warped, pansharpened or processed datasets."""
        if root.tag.lower() != "vrtdataset":
            raise self.refuse(f"{path} is not a VRT (its root element is {root.tag})")
        kind = _attribute(root, "subclass", label)
        if kind:
            raise self.refuse(
                f"{path} is a {kind} VRT; fcn-pipeline reads only plain VRTs of local "
                "GeoTIFFs (as gdalbuildvrt writes them): make a GeoTIFF of it first "
                "(gdal_translate or gdalwarp)")
        for band in root.iter():
            kind = _attribute(band, "subclass", label)
            if band.tag.lower() != "vrtrasterband" or kind.lower() in _PLAIN_BANDS:
                continue
            if kind.lower() == "vrtrawrasterband":
                raise self.refuse(
                    f"{path} has a VRTRawRasterBand, which reads the raw bytes of another "
                    "file; fcn-pipeline never reads one: make a GeoTIFF of that file first")
            raise self.refuse(
                f"{path} has a {kind} band; fcn-pipeline reads only plain VRT bands of "
                "local GeoTIFFs (as gdalbuildvrt writes them): make a GeoTIFF of it first")

    def source_path(self, element: ElementTree.Element, vrt: Path, label: str) -> Path:
        """The local file a source element names, resolved as GDAL resolves it."""
        text = element.text or ""
        relative = _attribute(element, "relativetovrt", label) or "0"
        where = f"{vrt} names the source {text!r}"
        if relative not in ("0", "1"):
            raise self.refuse(f"{where} with relativeToVRT={relative!r}; it must be 0 or 1")
        if text != text.strip() or not text:
            raise self.refuse(f"{where}: a file name without leading or trailing spaces "
                              "is needed")
        what = None
        if text.startswith("/vsi"):
            what = f"a GDAL virtual file system path (/{text.split('/')[1]}/)"
        elif "://" in text:
            what = "a URL"
        elif _CONNECTION.match(text):
            what = "a GDAL connection string (driver prefix, subdataset or derived dataset)"
        elif text.startswith("<"):
            what = "inline XML"
        if what:
            raise self.refuse(f"{where}, {what}, not a local file; fcn-pipeline reads VRT "
                              "sources only from local GeoTIFF or VRT files")
        return Path(vrt.parent if relative == "1" else Path.cwd(), text)

    def source(self, path: Path, vrt: Path, chain: tuple[str, ...]) -> None:
        real = os.path.realpath(path)
        if real in chain:
            loop = [Path(p).name for p in chain[chain.index(real):]] + [path.name]
            raise self.refuse("VRT sources loop (" + " -> ".join(loop) + "); a VRT must "
                              "never read itself")
        if real in self.checked:
            return
        label = f"source of {vrt.name}"
        kind = _kind(_head(path, self.name, where=label))
        self.sources.append(str(path))
        if kind == GEOTIFF:
            self.files.update(_check_sidecars(path, self.name))
            self.checked.add(real)
        elif kind == VRT:
            self.vrt(path, (*chain, real))
            self.checked.add(real)
        else:
            what = f"{_a(kind)} {kind} file" if kind else "no GeoTIFF or VRT (no TIFF header)"
            raise self.refuse(f"{label} {path} is {what}; fcn-pipeline reads VRT sources "
                              "only from local GeoTIFF or VRT files")
