"""Model specs: the small YAML file that lets a user bring their own model.

A spec names the network (a built-in architecture, one an installed package
registers, or a ``package.module:factory`` import path: which of them may run is
decided by :mod:`pipeline.architectures`), its weights and their checksum, which
scene bands feed it and how they are normalised, how nodata is handled and what
the output classes are::

    schema: 1
    name: demo
    architecture: fcn8s-vgg16
    arguments: {num_classes: 4}
    weights: demo.safetensors        # relative to this file, or absolute
    sha256: "<64 hex digits>"        # optional
    bands: [1, 2, 3]                 # 1-based scene bands, repeats allowed
    band_names: [red, green, blue]   # optional: checked against the scene's band descriptions
    dtypes: [uint8, uint16]          # optional: scene dtypes accepted
    normalization: {scale: 0.0039, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
    nodata: {input: scene, output: 255, fill: mean}
    classes:
      - {name: water, color: [30, 90, 200]}

An ONNX graph carries its architecture: its spec names no ``architecture`` (nor
``arguments``), and may pick the graph's input and output tensors by name and
declare what the output holds and a halo::

    schema: 1
    name: segmenter
    weights: segmenter.onnx
    sha256: "<64 hex digits>"
    bands: [4, 3, 2, 8]
    normalization: {mean: [0, 0, 0, 0], std: [10000, 10000, 10000, 10000]}
    onnx: {input: image, output: logits}   # optional: needed when the graph has several
    output: scores                   # optional: scores (N, K, H, W) or labels (N, H, W)
    halo: [64, 64]                   # optional: px (rows, cols) read around each tile
    classes:
      - {name: water, color: [30, 90, 200]}

``halo`` (one number of px, or ``[rows, cols]``) declares the context a tile needs
for a network whose receptive field cannot be derived (global context: squeeze and
excitation, group normalisation, attention). ``.pt2`` files are refused:
``torch.export.load`` unpickles parts of them.

``nodata.fill`` is what the network sees in place of an invalid pixel (nodata,
masked, NaN, infinite): ``mean`` (the default: the normalisation mean, 0 once
normalised), or a number or a per-band list of numbers in raw scene units,
normalised like the data. :func:`model_input` normalises a window and fills it,
so the labels of valid pixels never depend on what an invalid pixel held.

This module is pure (numpy and YAML, no torch): a Dask client validates a spec
and checksums its weights without loading a network; :mod:`pipeline.model`
builds the network. Every problem is one :class:`ModelSpecError` whose message
names the spec file and the field path (``classes[1].color``).

A STAC Item with the Machine Learning Model extension is read as a spec too
(:mod:`pipeline.stac_model` maps it); its errors name the item's fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from pipeline.errors import ModelSpecError
from pipeline.labels import DEFAULT_NODATA, LabelClass, label_dtype
from pipeline.stac_model import item_spec, read_item
from pipeline.yaml_input import parse_yaml, read_text

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from importlib.resources.abc import Traversable
    else:
        from importlib.abc import Traversable

#: The only spec schema version this release reads.
SCHEMA_VERSION = 1
#: ``load_spec(DEMO)`` reads the spec bundled with the package.
DEMO = "demo"
WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth", ".onnx")
#: The weights suffix of an ONNX graph: the graph is the network, run by ONNX Runtime.
ONNX_SUFFIX = ".onnx"
#: Back ends (:attr:`ModelSpec.backend`).
TORCH = "torch"
ONNX = "onnx"
#: Output layouts: class scores ``(N, K, H, W)`` or labels already picked ``(N, H, W)``.
SCORES = "scores"
LABELS = "labels"
OUTPUTS = (SCORES, LABELS)
#: ``nodata.input`` words; any number is an override of the scene's nodata value.
NODATA_INPUT_WORDS = ("scene", "none")
#: ``nodata.fill`` word for the normalisation mean (0 after normalising), the default.
FILL_MEAN = "mean"

_REQUIRED = ("schema", "name", "weights", "bands", "normalization", "classes")
_OPTIONAL = ("architecture", "arguments", "sha256", "dtypes", "nodata", "halo", "output", "onnx",
             "band_names")
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_BUILTIN_NAME = re.compile(r"[A-Za-z0-9][\w.\-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20
#: The last part of a field path: ``.key`` or ``[index]``.
_LAST_PART = re.compile(r"(\.[^.\[]*|\[\d+\])$")


class Arguments(Mapping[str, Any]):
    """Factory keyword arguments, frozen (lists become tuples) so a spec stays hashable.

    :meth:`thaw` gives back plain ``dict``/``list`` values for the factory call.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        self._items = {k: _freeze(v, k) for k, v in sorted((items or {}).items())}

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __repr__(self) -> str:
        return f"Arguments({self._items!r})"

    def thaw(self) -> dict[str, Any]:
        """The arguments as plain Python values (tuples back to lists, nested dicts)."""
        return {k: _thaw(v) for k, v in self._items.items()}


class _UnsupportedValue(TypeError):
    """An argument value that YAML would not produce (a date, an object)."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where} {problem}")
        self.where = where
        self.problem = problem


def _freeze(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Arguments):
        return value
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise _UnsupportedValue(where, f"keys must be strings, got {key!r}")
        return Arguments({k: _freeze(v, f"{where}.{k}") for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise _UnsupportedValue(
        where,
        f"must be a number, string, boolean, null, list or mapping, "
        f"got {type(value).__name__} {value!r}",
    )


def _thaw(value: Any) -> Any:
    if isinstance(value, Arguments):
        return value.thaw()
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class Normalization:
    """Model input = ``(raw * scale - mean) / std``, per band."""

    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class ModelSpec:
    """A validated model spec. ``weights`` is absolute when the spec came from a file."""

    path: Path | None
    name: str
    #: The network factory; None for an ONNX graph, which carries its architecture.
    architecture: str | None
    arguments: Arguments
    weights: Path
    sha256: str | None
    bands: tuple[int, ...]
    dtypes: tuple[str, ...] | None
    normalization: Normalization
    nodata_input: str | float
    nodata_output: int
    classes: tuple[LabelClass, ...]
    #: ``"mean"`` or one raw value per band: what invalid pixels are replaced by.
    nodata_fill: str | tuple[float, ...] = FILL_MEAN
    #: The name of each band in ``bands`` (model channel order), checked against a scene's
    #: band descriptions; ``None`` when the spec names none.
    band_names: tuple[str, ...] | None = None
    #: Spec field -> the field of the file it came from (a STAC Item's), for messages.
    field_names: tuple[tuple[str, str], ...] = dataclasses.field(
        default=(), compare=False, repr=False)
    #: Declared halo ``(rows, cols)`` in px, for networks whose receptive field cannot be
    #: derived; None: derived from the network.
    halo: tuple[int, int] | None = None
    #: Declared output layout, :data:`SCORES` or :data:`LABELS`; None: detected.
    output: str | None = None
    #: The ONNX graph's input and output tensor names the spec picks (None: the only one).
    onnx_input: str | None = None
    onnx_output: str | None = None

    @property
    def source(self) -> str:
        """The spec file, as error messages name it."""
        return _source(self.path)

    @property
    def backend(self) -> str:
        """:data:`ONNX` for an ``.onnx`` graph (ONNX Runtime), else :data:`TORCH`."""
        return ONNX if self.weights.suffix.lower() == ONNX_SUFFIX else TORCH

    @property
    def is_import_path(self) -> bool:
        """True when ``architecture`` is ``package.module:factory`` rather than a built-in name."""
        return self.architecture is not None and ":" in self.architecture

    def error(self, field: str, problem: str) -> ModelSpecError:
        """A :class:`ModelSpecError` naming this spec's file and ``field``."""
        return ModelSpecError(f"{self.source}: {_field_name(self.field_names, field)} {problem}")


def _source(path: Path | None) -> str:
    return str(path) if path is not None else "model spec"


def _field_name(names: Sequence[tuple[str, str]], field: str) -> str:
    """``field`` as the file names it: the field it came from, or that of its nearest
    parent (``classes[2].name`` -> ``...classification:classes[0].name``)."""
    known = dict(names)
    head = field
    while head not in known:
        parent = _LAST_PART.sub("", head)
        if parent == head:
            return field
        head = parent
    return known[head] + field[len(head):]


# --------------------------------------------------------------------------- loading


def load_spec(source: str | PathLike[str]) -> ModelSpec:
    """Read and validate a spec: ``"demo"`` (the bundled demo model), a YAML file path,
    or the path of a STAC Item (JSON) with the Machine Learning Model extension.

    The file is read by :func:`pipeline.yaml_input.read_text` (a regular file, at most
    1 MiB); YAML is then parsed as :func:`pipeline.yaml_input.read_yaml` does (nested at
    most 64 levels, no anchors, aliases, merge keys or repeated keys), a STAC Item by
    :func:`pipeline.stac_model.read_item` and mapped by
    :func:`pipeline.stac_model.item_spec`. Nothing the spec names is imported.

    Raises:
        ModelSpecError: one line naming the file (and the line or the field): it cannot
            be read, is not such YAML or such an Item, or a field is missing, unknown or
            invalid.
    """
    path = _demo_path() if source == DEMO else Path(source).expanduser().absolute()
    what = "model spec"
    text = read_text(path, what=what, error=ModelSpecError)
    item = read_item(text, source=str(path), json_only=path.suffix.lower() == ".json")
    if item is not None:
        mapped = item_spec(item, source=str(path))
        return parse_spec(mapped.data, path=path, field_names=mapped.fields)
    data = parse_yaml(text, source=str(path), what=what, error=ModelSpecError).data
    return parse_spec(data, path=path)


def _package_data() -> Traversable:
    return resources.files("pipeline") / "data"


def _demo_path() -> Path:
    resource = _package_data() / f"{DEMO}.yaml"
    if not resource.is_file():
        raise ModelSpecError(
            "the demo model is not bundled with this installation (pipeline/data/demo.yaml "
            "is missing); pass the path of a model spec YAML file instead"
        )
    if not isinstance(resource, Path):
        raise ModelSpecError(
            f"the demo model spec {resource} is inside an archive; install fcn-pipeline "
            "as plain files (pip install, not a zip) so its weights can be read"
        )
    return resource


# --------------------------------------------------------------------------- validation


class _Fields:
    """Error factory for one spec: every message names the file and the field path."""

    def __init__(self, path: Path | None, names: Sequence[tuple[str, str]] = ()) -> None:
        self.source = _source(path)
        self.names = names

    def error(self, field: str, problem: str) -> ModelSpecError:
        return ModelSpecError(f"{self.source}: {_field_name(self.names, field)} {problem}")

    def mapping(
        self, value: Any, field: str, required: Sequence[str], optional: Sequence[str] = ()
    ) -> Mapping[str, Any]:
        what = field or "the spec"
        if not isinstance(value, Mapping):
            raise self.error(field or "top level", f"must be a mapping, got {_show(value)}")
        allowed = (*required, *optional)
        for key in value:
            if key not in allowed:
                raise self.error(
                    _join(field, key),
                    f"is not a known key of {what} (allowed: {', '.join(allowed)})",
                )
        for key in required:
            if key not in value:
                raise self.error(_join(field, key), "is required")
        return value

    def string(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.error(field, f"must be a non-empty string, got {_show(value)}")
        return value

    def integer(self, value: Any, field: str, low: int, high: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value > high
        ):
            limit = f"from {low} to {high}" if high is not None else f">= {low}"
            raise self.error(field, f"must be an integer {limit}, got {_show(value)}")
        return value

    def number(self, value: Any, field: str, *, allow_nan: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(field, f"must be a number, got {_show(value)}")
        if math.isinf(value) or (math.isnan(value) and not allow_nan):
            raise self.error(field, f"must be a finite number, got {value}")
        return float(value)

    def sequence(self, value: Any, field: str, *, what: str) -> Sequence[Any]:
        if not isinstance(value, (list, tuple)) or not value:
            raise self.error(field, f"must be a non-empty list of {what}, got {_show(value)}")
        return value

    def per_band(self, value: Any, field: str, n_bands: int) -> tuple[float, ...]:
        if not isinstance(value, (list, tuple)):
            raise self.error(
                field, f"must be a list of {n_bands} numbers (one per band), got {_show(value)}"
            )
        if len(value) != n_bands:
            raise self.error(
                field, f"must have {n_bands} values (one per band), got {len(value)}"
            )
        return tuple(self.number(v, f"{field}[{i}]") for i, v in enumerate(value))


def _join(field: str, key: Any) -> str:
    return f"{field}.{key}" if field else str(key)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_spec(data: Mapping[str, Any], *, path: Path | None,
               field_names: Mapping[str, str] | None = None) -> ModelSpec:
    """Validate a spec already parsed from YAML; ``path`` is the file it came from.

    A relative ``weights`` path is taken relative to the folder of ``path``.
    ``field_names`` maps spec fields to the fields of the file they came from (a STAC
    Item's), which messages name instead.
    """
    names = tuple(sorted((field_names or {}).items()))
    f = _Fields(path, names)
    if not isinstance(data, Mapping):
        raise f.error("top level", f"must be a mapping of spec fields, got {_show(data)}")
    if "schema" not in data:
        raise f.error("schema", f"is required (schema: {SCHEMA_VERSION})")
    schema = data["schema"]
    if isinstance(schema, bool) or schema != SCHEMA_VERSION:
        raise f.error(
            "schema", f"must be {SCHEMA_VERSION}, got {_show(schema)} (this release reads schema "
            f"{SCHEMA_VERSION} only)"
        )
    f.mapping(data, "", _REQUIRED, _OPTIONAL)

    bands = _bands(f, data["bands"])
    classes = _classes(f, data["classes"])
    input_nodata, output_nodata, fill = _nodata(f, data.get("nodata"), classes, len(bands))
    weights = _weights(f, data["weights"], path)
    onnx = weights.suffix.lower() == ONNX_SUFFIX
    _network_keys(f, data, weights, onnx)
    onnx_input, onnx_output = _onnx_names(f, data.get("onnx"))
    spec = ModelSpec(
        path=path,
        name=f.string(data["name"], "name"),
        architecture=None if onnx else _architecture(f, data["architecture"]),
        arguments=_arguments(f, data.get("arguments")),
        weights=weights,
        sha256=_sha256(f, data.get("sha256")),
        bands=bands,
        dtypes=_dtypes(f, data.get("dtypes")),
        normalization=_normalization(f, data["normalization"], len(bands)),
        nodata_input=input_nodata,
        nodata_output=output_nodata,
        classes=classes,
        nodata_fill=fill,
        band_names=_band_names(f, data.get("band_names"), len(bands)),
        field_names=names,
        halo=_halo(f, data.get("halo")),
        output=_output(f, data.get("output")),
        onnx_input=onnx_input,
        onnx_output=onnx_output,
    )
    with np.errstate(over="ignore", invalid="ignore"):
        finite = bool(np.isfinite(fill_values(spec)).all())
    if not finite:
        raise f.error(
            "nodata.fill", f"{list(fill)} does not normalise to finite float32 values "
            "((fill * scale - mean) / std); choose values within the scene's range"
        )
    return spec


def _architecture(f: _Fields, value: Any) -> str:
    name = f.string(value, "architecture").strip()
    pattern = _IMPORT_PATH if ":" in name else _BUILTIN_NAME
    if not pattern.fullmatch(name):
        raise f.error(
            "architecture",
            "must be a built-in name such as fcn8s-vgg16 or an import path "
            f"package.module:factory, got {name!r}",
        )
    return name


def _network_keys(f: _Fields, data: Mapping[str, Any], weights: Path, onnx: bool) -> None:
    """The keys that say what the network is agree with the kind of weights file: an ONNX
    graph carries its architecture, other weights need one."""
    if onnx:
        for key in ("architecture", "arguments"):
            if key in data:
                raise f.error(key, f"must not be given with an ONNX graph ({weights.name}): the "
                                   "graph carries its architecture; remove it from the spec")
    else:
        if "architecture" not in data:
            raise f.error("architecture", "is required (or set weights to an .onnx graph, "
                                          "which carries its architecture)")
        if "onnx" in data:
            raise f.error("onnx", f"applies to ONNX graphs only; weights {weights.name} is not "
                                  "an .onnx file")


def _onnx_names(f: _Fields, value: Any) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    block = f.mapping(value, "onnx", (), ("input", "output"))
    names = [f.string(block[key], f"onnx.{key}").strip() if key in block else None
             for key in ("input", "output")]
    return names[0], names[1]


def _halo(f: _Fields, value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise f.error("halo", f"must be one number of px or [rows, cols], got {_show(value)}")
        rows, cols = (f.integer(v, f"halo[{i}]", 0) for i, v in enumerate(value))
        return rows, cols
    size = f.integer(value, "halo", 0)
    return size, size


def _output(f: _Fields, value: Any) -> str | None:
    if value is None:
        return None
    if value not in OUTPUTS:
        raise f.error("output", f"must be {' or '.join(OUTPUTS)} (class scores (N, K, H, W) or "
                                f"labels (N, H, W)), got {_show(value)}")
    return str(value)


def _arguments(f: _Fields, value: Any) -> Arguments:
    if value is None:
        return Arguments()
    if not isinstance(value, Mapping):
        raise f.error("arguments", f"must be a mapping of keyword arguments, got {_show(value)}")
    for key in value:
        if not isinstance(key, str) or not key.isidentifier():
            raise f.error(f"arguments.{key}", "is not a valid keyword argument name")
    try:
        return Arguments(value)
    except _UnsupportedValue as exc:
        raise f.error(f"arguments.{exc.where}", exc.problem) from None


def _weights(f: _Fields, value: Any, path: Path | None) -> Path:
    weights = Path(f.string(value, "weights")).expanduser()
    if weights.suffix.lower() == ".pt2":
        raise f.error(
            "weights", f"{weights.name} is a torch.export archive, which is never loaded here: "
            "torch.export.load unpickles parts of it, and unpickling can run any code; export "
            "the model to ONNX instead (torch.onnx.export) and set weights to the .onnx file"
        )
    if weights.suffix.lower() not in WEIGHTS_SUFFIXES:
        raise f.error(
            "weights", f"must be a .safetensors, .pt, .pth or .onnx file, got {str(weights)!r}"
        )
    if not weights.is_absolute() and path is not None:
        weights = path.parent / weights
    return weights


def _sha256(f: _Fields, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _SHA256.fullmatch(value.strip().lower()):
        raise f.error(
            "sha256", f"must be 64 hexadecimal digits in quotes, got {_show(value)}"
        )
    return value.strip().lower()


def _bands(f: _Fields, value: Any) -> tuple[int, ...]:
    items = f.sequence(value, "bands", what="1-based band numbers")
    return tuple(f.integer(b, f"bands[{i}]", 1) for i, b in enumerate(items))


def _band_names(f: _Fields, value: Any, n_bands: int) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = f.sequence(value, "band_names", what=f"{n_bands} band names, one per band")
    if len(items) != n_bands:
        raise f.error("band_names", f"must have {n_bands} names (one per band), got {len(items)}")
    return tuple(f.string(name, f"band_names[{i}]").strip() for i, name in enumerate(items))


def _dtypes(f: _Fields, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    names: list[str] = []
    for i, item in enumerate(f.sequence(value, "dtypes", what="numpy dtype names")):
        field = f"dtypes[{i}]"
        try:
            dtype = np.dtype(f.string(item, field))
        except TypeError:
            dtype = None
        if dtype is None or dtype.kind not in "biuf":
            raise f.error(field, f"must be a numeric dtype such as uint8 or float32, got {item!r}")
        names.append(dtype.name)
    return tuple(dict.fromkeys(names))


def _normalization(f: _Fields, value: Any, n_bands: int) -> Normalization:
    block = f.mapping(value, "normalization", ("mean", "std"), ("scale",))
    scale = f.number(block.get("scale", 1.0), "normalization.scale")
    if scale <= 0:
        raise f.error("normalization.scale", f"must be positive, got {scale}")
    mean = f.per_band(block["mean"], "normalization.mean", n_bands)
    std = f.per_band(block["std"], "normalization.std", n_bands)
    for i, s in enumerate(std):
        if s <= 0:
            raise f.error(f"normalization.std[{i}]", f"must be positive, got {s}")
    return Normalization(scale=scale, mean=mean, std=std)


def _classes(f: _Fields, value: Any) -> tuple[LabelClass, ...]:
    items = f.sequence(value, "classes", what="{name, color} mappings, one per output channel")
    limit = np.iinfo(np.uint16).max
    if len(items) >= limit:
        raise f.error("classes", f"has {len(items)} entries; at most {limit - 1} are supported")
    classes: list[LabelClass] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        field = f"classes[{i}]"
        entry = f.mapping(item, field, ("name", "color"))
        name = f.string(entry["name"], f"{field}.name")
        if name in seen:
            raise f.error(f"{field}.name", f"{name!r} repeats classes[{seen[name]}].name")
        seen[name] = i
        color = entry["color"]
        if not isinstance(color, (list, tuple)) or len(color) != 3:
            raise f.error(f"{field}.color", f"must be [red, green, blue], got {_show(color)}")
        rgb = tuple(f.integer(c, f"{field}.color[{j}]", 0, 255) for j, c in enumerate(color))
        classes.append(LabelClass(name=name, color=rgb))  # type: ignore[arg-type]
    return tuple(classes)


def _nodata(f: _Fields, value: Any, classes: tuple[LabelClass, ...], n_bands: int,
            ) -> tuple[str | float, int, str | tuple[float, ...]]:
    n = len(classes)
    block = f.mapping({} if value is None else value, "nodata", (), ("input", "output", "fill"))
    raw_input = block.get("input", "scene")
    if isinstance(raw_input, str):
        if raw_input not in NODATA_INPUT_WORDS:
            raise f.error(
                "nodata.input", f"must be 'scene', 'none' or a number, got {raw_input!r}"
            )
        nodata_input: str | float = raw_input
    elif isinstance(raw_input, (int, float)) and not isinstance(raw_input, bool):
        nodata_input = f.number(raw_input, "nodata.input", allow_nan=True)
    else:
        raise f.error(
            "nodata.input", f"must be 'scene', 'none' or a number, got {_show(raw_input)}"
        )

    dtype = label_dtype(n)
    top = int(np.iinfo(dtype).max)
    default = DEFAULT_NODATA if n <= DEFAULT_NODATA else top
    output = f.integer(block.get("output", default), "nodata.output", 0)
    if output > top:
        raise f.error(
            "nodata.output", f"must fit the {dtype.name} label map (0 to {top}), got {output}"
        )
    if output < n:
        raise f.error(
            "nodata.output",
            f"{output} is the label of class {classes[output].name!r} (classes are 0 to {n - 1}); "
            f"pick a value from {n} to {top}, such as {top}",
        )
    return nodata_input, output, _fill(f, block.get("fill", FILL_MEAN), n_bands)


def _fill(f: _Fields, value: Any, n_bands: int) -> str | tuple[float, ...]:
    if value == FILL_MEAN:
        return FILL_MEAN
    if isinstance(value, (list, tuple)):
        return f.per_band(value, "nodata.fill", n_bands)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (f.number(value, "nodata.fill"),) * n_bands
    raise f.error(
        "nodata.fill",
        f"must be 'mean', a number or a list of {n_bands} numbers (raw scene values, one "
        f"per band), got {_show(value)}",
    )


# --------------------------------------------------------------------------- weights


def file_sha256(path: str | PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_weights(spec: ModelSpec) -> bytes:
    """The weights file's bytes, read once: hash them and load from the same bytes, so the
    weights used are exactly the weights checked.

    Raises:
        ModelSpecError: the file is missing or cannot be read.
    """
    try:
        return spec.weights.read_bytes()
    except FileNotFoundError:
        raise missing_weights_error(spec) from None
    except OSError as exc:
        raise spec.error("weights", f"file {spec.weights} cannot be read ({exc})") from exc


def missing_weights_error(spec: ModelSpec) -> ModelSpecError:
    """The error for a weights file that does not exist."""
    hint = " (a relative path is taken from the spec file's folder)" if spec.path else ""
    return spec.error("weights", f"file {spec.weights} does not exist{hint}")


def check_digest(spec: ModelSpec, digest: str) -> None:
    """Raise when the spec pins ``sha256`` and the weights' ``digest`` differs."""
    if spec.sha256 is not None and digest != spec.sha256:
        raise spec.error(
            "sha256",
            f"does not match the weights file {spec.weights}: the file's sha256 is {digest}, "
            f"the spec expects {spec.sha256} (restore the weights, or update sha256 if they "
            "were replaced on purpose)",
        )


def _format_problem(path: Path) -> str | None:
    """What is wrong with the container of a weights file, read without torch: a
    ``.safetensors`` file starts with the length of a JSON header that fits in the file; a
    PyTorch ``.pt``/``.pth`` file is a zip archive (or, from torch before 1.6, a pickle); an
    ``.onnx`` graph is not empty (ONNX Runtime reads the rest when the graph is checked)."""
    with open(path, "rb") as stream:
        head = stream.read(8)
        size = path.stat().st_size
        if path.suffix.lower() == ONNX_SUFFIX:
            return "is empty, not an ONNX graph" if size == 0 else None
        if path.suffix.lower() == ".safetensors":
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < length <= size - 8:
                return "is not a safetensors file (no header at its start)"
            try:
                header = json.loads(stream.read(length))
            except (ValueError, UnicodeDecodeError):
                return "is not a safetensors file (its header is not JSON)"
            if not isinstance(header, dict):
                return "is not a safetensors file"
            ends = [entry["data_offsets"][1] for entry in header.values()
                    if isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
                    and len(entry["data_offsets"]) == 2]
            if ends and max(ends) > size - 8 - length:
                return (f"is cut short: its tensors end at byte {8 + length + max(ends)}, "
                        f"the file at {size}")
            return None
    if zipfile.is_zipfile(path) or head[:1] == b"\x80":
        return None
    return "is not a PyTorch weights file (neither a zip archive nor a pickle)"


def verify_weights(spec: ModelSpec) -> str:
    """Check that the weights exist, look like weights and match ``spec.sha256``; return
    their sha256. No torch: a bad file is a usage error before the model is loaded.

    A Dask client calls this once while planning, so tasks can carry the digest.

    Raises:
        ModelSpecError: the file is missing, not a regular file, not a weights file of its
            kind, or its sha256 differs from the spec's.
    """
    if spec.weights.exists() and not spec.weights.is_file():
        raise spec.error("weights", f"{spec.weights} is not a regular file")
    if not spec.weights.is_file():
        raise missing_weights_error(spec)
    problem = _format_problem(spec.weights)
    if problem:
        raise spec.error("weights", f"file {spec.weights} {problem}")
    digest = file_sha256(spec.weights)
    check_digest(spec, digest)
    return digest


# --------------------------------------------------------------------------- input


def normalize(
    raw: npt.ArrayLike, spec: ModelSpec, dtype: npt.DTypeLike = np.float32
) -> npt.NDArray[np.floating[Any]]:
    """Model input from raw scene values ``(bands, rows, cols)``: ``(raw * scale - mean) / std``.

    ``raw`` holds the spec's bands in spec order. Computed as ``raw * gain - offset``
    into one new array of ``dtype``, with no other temporary of the window's size.
    """
    values = np.asarray(raw)
    if values.ndim != 3 or values.shape[0] != len(spec.bands):
        raise ValueError(
            f"normalize needs raw values shaped (bands, rows, cols) with {len(spec.bands)} bands "
            f"(the spec's bands {list(spec.bands)}), got shape {values.shape}"
        )
    out_dtype = np.dtype(dtype)
    if out_dtype.kind != "f":
        raise ValueError(f"normalize writes floating-point values, got dtype {out_dtype}")
    norm = spec.normalization
    std = np.asarray(norm.std, dtype=np.float64)
    gain = (norm.scale / std).astype(out_dtype)[:, None, None]
    offset = (np.asarray(norm.mean, dtype=np.float64) / std).astype(out_dtype)[:, None, None]
    out = np.multiply(values, gain, out=np.empty(values.shape, dtype=out_dtype))
    return np.subtract(out, offset, out=out)


def fill_values(spec: ModelSpec,
                dtype: npt.DTypeLike = np.float32) -> npt.NDArray[np.floating[Any]]:
    """What the network sees at an invalid pixel: one normalised value per band, ``(bands,)``.

    ``nodata.fill: mean`` gives 0 (the normalisation mean, normalised); raw
    values are normalised like the data, ``(fill * scale - mean) / std``.
    """
    if spec.nodata_fill == FILL_MEAN:
        return np.zeros(len(spec.bands), dtype=dtype)
    raw = np.asarray(spec.nodata_fill, dtype=np.float64)[:, None, None]
    return normalize(raw, spec, dtype)[:, 0, 0]


def model_input(raw: npt.ArrayLike, valid: npt.ArrayLike, spec: ModelSpec,
                dtype: npt.DTypeLike = np.float32) -> npt.NDArray[np.floating[Any]]:
    """The network's input for a window: normalised, invalid pixels filled.

    Every band of a pixel that is invalid (``valid`` False), or whose
    normalised value is not finite in some band, is set to
    :func:`fill_values`, so the network never sees a NaN, an infinity or a
    nodata sentinel, and what an invalid pixel held changes no valid label.

    Args:
        raw: ``(bands, rows, cols)`` raw scene values, the spec's bands in
            spec order, any numeric dtype.
        valid: ``(rows, cols)`` bool, True where the pixel is a measurement
            (from :func:`pipeline.readers.read_window`), for the whole window.
        spec: Gives the normalisation and ``nodata.fill``.
        dtype: A floating-point dtype for the result.

    Returns:
        ``(bands, rows, cols)`` array of ``dtype``, all finite.

    Raises:
        ValueError: ``raw`` has not the spec's band count, ``valid`` is not
            ``(rows, cols)``, or ``dtype`` is not floating-point.
    """
    out = normalize(raw, spec, dtype)
    mask = np.asarray(valid)
    if mask.shape != out.shape[1:]:
        raise ValueError(
            f"model_input needs valid shaped {out.shape[1:]} (rows, cols), got {mask.shape}"
        )
    bad = ~(mask.astype(bool, copy=False) & np.isfinite(out).all(axis=0))
    if bad.any():
        np.copyto(out, fill_values(spec, out.dtype)[:, None, None], where=bad[None])
    return out
