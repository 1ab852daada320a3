"""Model descriptions as STAC Items with the Machine Learning Model (MLM) extension.

A STAC Item (JSON) whose ``stac_extensions`` list the MLM extension
(https://github.com/stac-extensions/mlm, v1.4 or later: the versions with
``value_scaling``) is read wherever a model spec is, and mapped to the mapping a
spec YAML would give, which :func:`pipeline.modelspec.parse_spec` validates:

- ``mlm:name`` -> ``name``; ``mlm:architecture`` -> ``architecture`` (a PyTorch
  model: a built-in or registered network name); ``mlm:hyperparameters`` ->
  ``arguments`` (the factory's keyword arguments);
- ``mlm:input`` (one input, ``dim_order`` batch, bands or channel, height, width;
  ``data_type`` float32): its ``bands`` are scene bands 1..n in that order, their
  names kept as ``band_names`` (a scene whose band descriptions name other bands is
  refused); without ``bands``, the channel count of ``input.shape`` gives bands 1..C;
- ``value_scaling`` (one object per band, or one for all) -> ``normalization`` with
  ``scale`` 1: ``z-score`` (mean, stddev), ``min-max`` (minimum, maximum - minimum),
  ``offset`` (value, 1), ``scale`` (0, value) and ``null`` (0, 1) are
  ``(raw - mean) / std`` exactly; ``clip``, ``clip-min``, ``clip-max`` and
  ``processing`` are refused;
- ``mlm:output`` (one output, a dense result: ``dim_order`` ending in height, width)
  -> ``classes``, ``classification:classes`` placed by ``value`` (0..K-1, no gaps,
  no repeats), ``name`` (else ``description``), ``color_hint`` (``RRGGBB``; missing
  ones get :func:`pipeline.labels.default_color`);
- the one asset with the role ``mlm:model`` -> ``weights`` (``href``: a local path,
  relative to the item, absolute, or ``file://``; a remote one is refused, nothing
  is downloaded) and ``sha256`` (``file:checksum``, a sha2-256 multihash,
  ``1220`` then 64 hex digits). ``mlm:framework`` ONNX gives an ``.onnx`` model
  without architecture; PyTorch (or none, for a ``.pt``/``.pth``/``.safetensors``
  file) needs ``mlm:architecture``.

Every problem is one :class:`~pipeline.errors.ModelSpecError` naming the item file
and the item's field (``properties.mlm:input[0].value_scaling[1].type``);
:attr:`MappedItem.fields` tells :func:`~pipeline.modelspec.parse_spec` which item
field each spec field came from, so its errors name the item's fields too.

Pure: the standard library only.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

from pipeline.errors import ModelSpecError
from pipeline.labels import default_color

#: The MLM extension's schema URL, as ``stac_extensions`` lists it.
MLM_SCHEMA = re.compile(r"https://stac-extensions\.github\.io/mlm/v(\d+)\.(\d+)\.(\d+)/schema\.json")
#: The oldest MLM version read: 1.4 moved normalisation into ``value_scaling``.
OLDEST_MLM = (1, 4)
#: The deepest nesting of JSON arrays and objects accepted (as for YAML).
MAX_DEPTH = 64
#: ``mlm:framework`` (lower case) -> the runtime that runs the model.
FRAMEWORKS = {"pytorch": "pytorch", "onnx": "onnx"}
#: ``mlm:artifact_type`` values of a PyTorch model this tool loads: weights only.
TORCH_ARTIFACTS = ("torch.save", "safetensors.torch.save_file")
#: ``file:checksum`` prefix of a sha2-256 multihash: function 0x12, 32 bytes (0x20).
SHA256_MULTIHASH = "1220"
_BATCH = ("batch",)
_CHANNELS = ("bands", "channel", "channels")
_HEIGHT = ("height", "y")
_WIDTH = ("width", "x")
_RESIZE_ACCEPTED = (None, "crop", "pad")
_HEX_COLOR = re.compile(r"[0-9A-Fa-f]{6}")
_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class MappedItem:
    """An MLM Item as a model spec: ``data`` is the mapping a spec YAML would give;
    ``fields`` maps each spec field (``classes[2].color``) to the item field it came
    from (``properties.mlm:output[0].classification:classes[0].color_hint``)."""

    data: dict[str, Any]
    fields: dict[str, str]


class _NotJson(Exception):
    """The text is not JSON (it may still be YAML)."""


class _Item:
    """Error factory for one item: every message names the file and the item field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, field: str, problem: str) -> NoReturn:
        raise ModelSpecError(f"{self.source}: {field} {problem}")

    def mapping(self, value: Any, field: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            self.error(field, f"must be a JSON object, got {_show(value)}")
        return value

    def required(self, block: Mapping[str, Any], key: str, field: str, what: str) -> Any:
        if block.get(key) is None:
            self.error(_join(field, key), f"is required ({what})")
        return block[key]

    def one(self, value: Any, field: str, what: str) -> Mapping[str, Any]:
        if not isinstance(value, list) or len(value) != 1:
            count = len(value) if isinstance(value, list) else _show(value)
            self.error(field, f"must list exactly one {what}, got {count} (this tool runs "
                              f"models of one {what})")
        return self.mapping(value[0], f"{field}[0]")

    def string(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.error(field, f"must be a non-empty string, got {_show(value)}")
        return value

    def number(self, block: Mapping[str, Any], key: str, field: str) -> float:
        value = block.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                value):
            self.error(_join(field, key), f"must be a finite number, got {_show(value)}")
        return float(value)


def _join(field: str, key: str) -> str:
    return f"{field}.{key}" if field else key


def _show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, list, dict)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- reading


def read_item(text: str, *, source: str, json_only: bool) -> Mapping[str, Any] | None:
    """The STAC Item in ``text``, or ``None`` when ``text`` is no STAC document (a spec).

    Args:
        text: The file's text, as :func:`pipeline.yaml_input.read_text` read it.
        source: The file, for messages.
        json_only: The file is named ``.json``: text that is not JSON is an error
            rather than YAML to read.

    Raises:
        ModelSpecError: one line naming the file: the JSON is malformed (with
            ``json_only``), nests deeper than :data:`MAX_DEPTH`, repeats a key in one
            object or holds NaN or Infinity; it is a STAC document that is not an Item
            with the MLM extension, or of an MLM version this release does not read.
    """
    if not text.lstrip().startswith("{"):
        if json_only:
            raise ModelSpecError(f"{source}: the model description is not a JSON object "
                                 "(a STAC Item starts with {)")
        return None
    try:
        data = _parse_json(text, source)
    except _NotJson as exc:
        if json_only:
            raise ModelSpecError(f"{source}: {exc}") from None
        return None
    if not isinstance(data, Mapping) or not (
            "stac_version" in data or "stac_extensions" in data or data.get("type") == "Feature"):
        return None
    _check_mlm(data, source)
    return data


def _parse_json(text: str, source: str) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise ModelSpecError(f"{source}: the key {key!r} repeats in one JSON object; a "
                                     "key may appear once per object")
            out[key] = value
        return out

    def constant(name: str) -> NoReturn:
        raise ModelSpecError(f"{source}: {name} is not a JSON number; write a finite number")

    try:
        data = json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except json.JSONDecodeError as exc:
        raise _NotJson(f"line {exc.lineno}: the model description is not valid JSON: {exc.msg} "
                       f"(column {exc.colno})") from None
    except RecursionError:
        data = None
        depth = MAX_DEPTH + 1
    else:
        depth = _depth(data)
    if depth > MAX_DEPTH:
        raise ModelSpecError(f"{source}: the model description nests arrays and objects deeper "
                             f"than {MAX_DEPTH} levels, the most accepted")
    return data


def _depth(data: Any) -> int:
    """How deep arrays and objects nest in ``data``, found without recursion."""
    deepest = 0
    stack = [(data, 1)]
    while stack:
        value, level = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(
            value, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level <= MAX_DEPTH:
            stack.extend((child, level + 1) for child in children)
    return deepest


def _check_mlm(data: Mapping[str, Any], source: str) -> None:
    kind = data.get("type")
    if kind != "Feature":
        raise ModelSpecError(f"{source}: type is {_show(kind)}: this STAC document is not an "
                             "Item; give the STAC Item (type Feature) that describes the model")
    extensions = data.get("stac_extensions")
    urls = [e for e in extensions if isinstance(e, str)] if isinstance(extensions, list) else []
    versions = [(int(m[1]), int(m[2])) for m in map(MLM_SCHEMA.fullmatch, urls) if m]
    if not versions:
        raise ModelSpecError(
            f"{source}: stac_extensions does not list the Machine Learning Model extension "
            "(https://stac-extensions.github.io/mlm/v1.5.2/schema.json): this STAC Item does "
            "not describe a model this tool can run; describe it with MLM, or write a model "
            "spec YAML"
        )
    version = max(versions)
    if version[0] != OLDEST_MLM[0] or version < OLDEST_MLM:
        raise ModelSpecError(
            f"{source}: stac_extensions lists MLM v{version[0]}.{version[1]}; this release reads "
            f"MLM v{OLDEST_MLM[0]}.{OLDEST_MLM[1]} and later 1.x versions (value_scaling); "
            "update the item to MLM v1.5"
        )


# --------------------------------------------------------------------------- mapping


def item_spec(item: Mapping[str, Any], *, source: str) -> MappedItem:
    """Map an MLM Item (from :func:`read_item`) to a model spec mapping.

    Raises:
        ModelSpecError: one line naming ``source`` and the item field: a field the
            mapping needs is missing or malformed, or describes what this tool does
            not run (several inputs or outputs, derived bands, a scaling other than
            z-score, min-max, offset and scale, a non-dense output, a remote or
            non-local model file, a framework other than PyTorch and ONNX).
    """
    f = _Item(source)
    props = f.mapping(f.required(item, "properties", "", "the Item's properties"),
                      "properties")
    fields: dict[str, str] = {"name": "properties.mlm:name"}
    data: dict[str, Any] = {"schema": 1}
    data["name"] = f.required(props, "mlm:name", "properties", "the model's name")

    key, asset = _model_asset(f, item)
    where = f"assets.{key}"
    framework = _framework(f, props, asset, where)
    weights = _href(f, asset, where)
    data["weights"] = weights
    fields["weights"] = f"{where}.href"
    checksum = _sha256(f, asset, where)
    if checksum is not None:
        data["sha256"] = checksum
        fields["sha256"] = f"{where}.file:checksum"
    if framework == "pytorch":
        artifact = asset.get("mlm:artifact_type")
        if artifact is not None and artifact not in TORCH_ARTIFACTS:
            f.error(f"{where}.mlm:artifact_type",
                    f"{_show(artifact)} is not read: a PyTorch model is loaded as weights into "
                    f"a network this tool builds ({' or '.join(TORCH_ARTIFACTS)}); export it "
                    "to ONNX, or save its state dict")
        owner, holder = (where, asset) if "mlm:architecture" in asset else ("properties", props)
        data["architecture"] = f.required(
            holder, "mlm:architecture", owner, "a PyTorch model names its network: a built-in "
            "architecture such as fcn8s-vgg16, or one an installed package registers")
        fields["architecture"] = f"{owner}.mlm:architecture"
        if props.get("mlm:hyperparameters") is not None:
            data["arguments"] = props["mlm:hyperparameters"]
            fields["arguments"] = "properties.mlm:hyperparameters"

    _input(f, props, data, fields)
    _output(f, props, data, fields)
    return MappedItem(data, fields)


def _model_asset(f: _Item, item: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    assets = f.mapping(f.required(item, "assets", "", "the asset of role mlm:model"),
                       "assets")
    models = [(k, v) for k, v in assets.items() if isinstance(v, Mapping)
              and isinstance(v.get("roles"), list) and "mlm:model" in v["roles"]]
    if not models:
        f.error("assets", "has no asset with the role mlm:model (the model file)")
    if len(models) > 1:
        f.error("assets", f"has {len(models)} assets with the role mlm:model "
                          f"({', '.join(k for k, _ in models)}); keep the one to run")
    return models[0]


def _framework(f: _Item, props: Mapping[str, Any], asset: Mapping[str, Any],
               where: str) -> str:
    in_asset = "mlm:framework" in asset
    value = asset["mlm:framework"] if in_asset else props.get("mlm:framework")
    field = f"{where}.mlm:framework" if in_asset else "properties.mlm:framework"
    if value is None:
        href = asset.get("href")
        return "onnx" if isinstance(href, str) and href.lower().endswith(".onnx") else "pytorch"
    framework = FRAMEWORKS.get(f.string(value, field).strip().lower())
    if framework is None:
        f.error(field, f"{_show(value)} is not run by this tool (PyTorch or ONNX)")
    return framework


def _href(f: _Item, asset: Mapping[str, Any], where: str) -> str:
    href = f.string(f.required(asset, "href", where, "the model file"), f"{where}.href")
    parts = urlsplit(href)
    if parts.scheme.lower() == "file":
        if parts.netloc not in ("", "localhost"):
            f.error(f"{where}.href", f"{href} names a file on host {parts.netloc}; give a "
                                     "local path")
        return unquote(parts.path)
    if len(parts.scheme) > 1:  # one letter: a Windows drive
        f.error(f"{where}.href",
                f"{href} is remote ({parts.scheme}); this release reads a local model file "
                "only and downloads nothing: download it, and give its path (relative to "
                "the item, or absolute)")
    return href


def _sha256(f: _Item, asset: Mapping[str, Any], where: str) -> str | None:
    value = asset.get("file:checksum")
    if value is None:
        return None
    field = f"{where}.file:checksum"
    text = f.string(value, field).strip().lower()
    if not _HEX.fullmatch(text):
        f.error(field, f"must be a multihash in hexadecimal, got {_show(value)}")
    if not text.startswith(SHA256_MULTIHASH) or len(text) != len(SHA256_MULTIHASH) + 64:
        f.error(field, f"{_show(value)} is not a sha2-256 multihash (1220 then 64 hex digits), "
                       "the only checksum this tool checks; give the file's sha2-256")
    return text[len(SHA256_MULTIHASH):]


def _input(f: _Item, props: Mapping[str, Any], data: dict[str, Any],
           fields: dict[str, str]) -> None:
    field = "properties.mlm:input"
    block = f.one(f.required(props, "mlm:input", "properties",
                             "the model's input: bands, shape, value_scaling"), field, "input")
    field = f"{field}[0]"
    if block.get("variables"):
        f.error(f"{field}.variables", "are data cube variables; this tool feeds scene bands")
    if block.get("pre_processing_function") is not None:
        f.error(f"{field}.pre_processing_function", "is a custom pre-processing, which this "
                "tool does not run; express the scaling in value_scaling")
    if block.get("resize_type") not in _RESIZE_ACCEPTED:
        f.error(f"{field}.resize_type", f"is {_show(block['resize_type'])}: this tool feeds "
                "the scene at its own resolution, never resampled")
    names = _band_names(f, block.get("bands"), f"{field}.bands")
    structure = f.mapping(f.required(block, "input", field, "shape, dim_order, data_type"),
                          f"{field}.input")
    shape, order = _structure(f, structure, f"{field}.input")
    _dims(f, order, (_BATCH, _CHANNELS, _HEIGHT, _WIDTH), f"{field}.input.dim_order",
          "[batch, bands or channel, height, width] (NCHW)")
    channels = shape[1]
    if names:
        if channels not in (-1, len(names)):
            f.error(f"{field}.input.shape", f"has {channels} channels, bands lists {len(names)}")
        data["bands"] = list(range(1, len(names) + 1))
        data["band_names"] = names
        fields.update({"bands": f"{field}.bands", "band_names": f"{field}.bands"})
    else:
        if channels < 1:
            f.error(f"{field}.input.shape", f"has {channels} channels and bands lists none; "
                    "list the bands, or give the channel count")
        data["bands"] = list(range(1, channels + 1))
        fields["bands"] = f"{field}.input.shape"
    if structure.get("data_type") != "float32":
        f.error(f"{field}.input.data_type", f"is {_show(structure.get('data_type'))}; this "
                "tool feeds float32 to the network")
    data["normalization"] = _normalization(f, block.get("value_scaling"), len(data["bands"]),
                                           f"{field}.value_scaling")
    fields["normalization"] = f"{field}.value_scaling"


def _band_names(f: _Item, value: Any, field: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        f.error(field, f"must be a list of band names, got {_show(value)}")
    names = []
    for i, band in enumerate(value):
        if isinstance(band, Mapping):
            if "expression" in band or "format" in band:
                f.error(f"{field}[{i}]", "is a band derived by an expression, which this tool "
                                         "does not compute; give scene bands by name")
            band = band.get("name")
        names.append(f.string(band, f"{field}[{i}]"))
    return names


def _structure(f: _Item, block: Mapping[str, Any], field: str) -> tuple[list[int], list[str]]:
    shape = f.required(block, "shape", field, "the array's shape")
    order = f.required(block, "dim_order", field, "the names of the shape's dimensions")
    if not isinstance(shape, list) or any(
            isinstance(n, bool) or not isinstance(n, int) or n == 0 or n < -1 for n in shape):
        f.error(f"{field}.shape", f"must be a list of sizes (-1 for any), got {_show(shape)}")
    if not isinstance(order, list) or len(order) != len(shape) or not all(
            isinstance(n, str) for n in order):
        f.error(f"{field}.dim_order", f"must name each of the {len(shape)} dimensions of "
                                      f"shape, got {_show(order)}")
    return shape, order


def _dims(f: _Item, order: Sequence[str], wanted: Sequence[Sequence[str]], field: str,
          what: str) -> None:
    if len(order) != len(wanted) or any(
            name.lower() not in names for name, names in zip(order, wanted)):
        f.error(field, f"must be {what}, got {_show(list(order))}")


def _normalization(f: _Item, value: Any, n_bands: int, field: str) -> dict[str, Any]:
    """``value_scaling`` as ``(raw * 1 - mean) / std`` per band."""
    if value is None:
        value = [None]
    if not isinstance(value, list) or len(value) not in (1, n_bands):
        f.error(field, f"must list one scaling per band ({n_bands}) or one for all, got "
                       f"{_show(value)}")
    means, stds = [], []
    for i, scaling in enumerate(value):
        mean, std = _scaling(f, scaling, f"{field}[{i}]")
        means.append(mean)
        stds.append(std)
    if len(value) == 1:
        means, stds = means * n_bands, stds * n_bands
    return {"scale": 1.0, "mean": means, "std": stds}


def _scaling(f: _Item, scaling: Any, field: str) -> tuple[float, float]:
    if scaling is None or (isinstance(scaling, Mapping) and scaling.get("type") is None):
        return 0.0, 1.0
    block = f.mapping(scaling, field)
    kind = block["type"]
    if kind == "z-score":
        mean, std = f.number(block, "mean", field), f.number(block, "stddev", field)
        if std <= 0:
            f.error(f"{field}.stddev", f"must be positive, got {std}")
        return mean, std
    if kind == "min-max":
        low, high = f.number(block, "minimum", field), f.number(block, "maximum", field)
        if not high > low:
            f.error(f"{field}.maximum", f"must be above minimum ({low}), got {high}")
        return low, high - low
    if kind == "offset":
        return f.number(block, "value", field), 1.0
    if kind == "scale":
        divisor = f.number(block, "value", field)
        if divisor <= 0:
            f.error(f"{field}.value", f"must be positive (data / value), got {divisor}")
        return 0.0, divisor
    f.error(f"{field}.type", f"{_show(kind)} is not supported: this tool scales a band as "
            "(raw - mean) / std, which z-score, min-max, offset, scale and null express; "
            "clipping and processing expressions are not applied")


def _output(f: _Item, props: Mapping[str, Any], data: dict[str, Any],
            fields: dict[str, str]) -> None:
    field = "properties.mlm:output"
    block = f.one(f.required(props, "mlm:output", "properties",
                             "the model's output: result, classification:classes"),
                  field, "output")
    field = f"{field}[0]"
    result = f.mapping(f.required(block, "result", field, "shape, dim_order, data_type"),
                       f"{field}.result")
    shape, order = _structure(f, result, f"{field}.result")
    if len(order) == 4:
        _dims(f, [order[0], order[2], order[3]], (_BATCH, _HEIGHT, _WIDTH),
              f"{field}.result.dim_order", "[batch, class, height, width] (scores) or [batch, "
              "height, width] (labels): a dense prediction")
    else:
        _dims(f, order, (_BATCH, _HEIGHT, _WIDTH), f"{field}.result.dim_order",
              "[batch, class, height, width] (scores) or [batch, height, width] (labels): a "
              "dense prediction")
    classes = _classes(f, block.get("classification:classes"),
                       f"{field}.classification:classes", fields)
    if len(order) == 4 and shape[1] not in (-1, len(classes)):
        f.error(f"{field}.result.shape", f"has {shape[1]} classes, classification:classes "
                                         f"lists {len(classes)}")
    data["classes"] = classes
    # The layout the item declares: checked against what the network gives, like a spec's.
    data["output"] = "scores" if len(order) == 4 else "labels"
    fields["output"] = f"{field}.result.dim_order"


def _classes(f: _Item, value: Any, field: str, fields: dict[str, str]) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        f.error(field, f"must list the output classes (value, name, color_hint), got "
                       f"{_show(value)}")
    at: dict[int, int] = {}
    for i, entry in enumerate(value):
        block = f.mapping(entry, f"{field}[{i}]")
        label = block.get("value")
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            f.error(f"{field}[{i}].value", f"must be a label value >= 0, got {_show(label)}")
        if label in at:
            f.error(f"{field}[{i}].value", f"{label} repeats {field}[{at[label]}].value")
        at[label] = i
    missing = sorted(set(range(len(value))) - set(at))
    if missing:
        f.error(field, f"values must be 0 to {len(value) - 1}, one per output channel; "
                       f"{', '.join(map(str, missing))} missing (values: {sorted(at)})")
    classes = []
    for label in range(len(value)):
        i = at[label]
        block = value[i]
        where = f"{field}[{i}]"
        fields[f"classes[{label}]"] = where
        fields[f"classes[{label}].name"] = f"{where}.name"
        fields[f"classes[{label}].color"] = f"{where}.color_hint"
        name = block.get("name")
        if name is None:
            name = f.string(block.get("description"), f"{where}.name")
        hint = block.get("color_hint")
        if hint is None:
            color = list(default_color(label))
        elif isinstance(hint, str) and _HEX_COLOR.fullmatch(hint):
            color = [int(hint[k:k + 2], 16) for k in (0, 2, 4)]
        else:
            f.error(f"{where}.color_hint", f"must be RRGGBB in hexadecimal, got {_show(hint)}")
        classes.append({"name": name, "color": color})
    fields["classes"] = field
    return classes

