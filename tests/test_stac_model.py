"""STAC Items with the Machine Learning Model (MLM) extension, read as model specs.

Each item is written here, as a publisher would, for the bundled demo model; it is checked
against the MLM JSON schema (v1.5.2, shipped in ``tests/data/stac`` with the schemas it
refers to, Apache-2.0), mapped to a spec and compared with the demo's YAML spec, and run
through the CLI. How each test was checked to have teeth is said in a ``Teeth:`` line.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import zarr
from rasterio.transform import Affine

from pipeline.architectures import resolve_architecture
from pipeline.errors import ModelSpecError
from pipeline.labels import default_color
from pipeline.modelspec import DEMO, load_spec, normalize, verify_weights
from pipeline.samples import render
from pipeline.stac_model import item_spec
from tests.support import cli

SCHEMAS = Path(__file__).parent / "data" / "stac"
MLM = "https://stac-extensions.github.io/mlm/v1.5.2/schema.json"
DEMO_SPEC = load_spec(DEMO)
NAMES = ["red", "green", "blue"]
SIZE = 80


def demo_item(href: str | None = None) -> dict[str, Any]:
    """An MLM Item of the bundled demo model, as its publisher would write it."""
    spec = DEMO_SPEC
    norm = spec.normalization
    return {
        "type": "Feature", "stac_version": "1.1.0", "id": "demo", "geometry": None,
        "stac_extensions": [MLM, "https://stac-extensions.github.io/file/v2.1.0/schema.json"],
        "properties": {
            "datetime": None, "bands": [{"name": n} for n in NAMES],
            "mlm:name": spec.name, "mlm:framework": "PyTorch", "mlm:architecture": "demo-fcn",
            "mlm:tasks": ["semantic-segmentation"], "mlm:hyperparameters": {"num_classes": 4},
            "mlm:input": [{
                "name": "rgb", "bands": list(NAMES),
                "input": {"shape": [-1, 3, -1, -1],
                          "dim_order": ["batch", "bands", "height", "width"],
                          "data_type": "float32"},
                # the demo's (raw / 255 - mean) / std in raw units
                "value_scaling": [{"type": "z-score", "mean": m * 255, "stddev": s * 255}
                                  for m, s in zip(norm.mean, norm.std)],
            }],
            "mlm:output": [{
                "name": "scores", "tasks": ["semantic-segmentation"],
                "result": {"shape": [-1, 4, -1, -1],
                           "dim_order": ["batch", "class", "height", "width"],
                           "data_type": "float32"},
                "classification:classes": [
                    {"value": k, "name": c.name, "description": c.name,
                     "color_hint": "{:02X}{:02X}{:02X}".format(*c.color)}
                    for k, c in enumerate(spec.classes)],
            }],
        },
        "assets": {"model": {
            "href": href or str(spec.weights), "roles": ["mlm:model", "mlm:weights"],
            "mlm:artifact_type": "safetensors.torch.save_file",
            "file:checksum": "1220" + str(spec.sha256),
        }},
        "links": [],
    }


def write(folder: Path, item: dict[str, Any], name: str = "model.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(item, indent=1))
    return path


def refusal(folder: Path, item: dict[str, Any]) -> str:
    """The one-line error of loading ``item``."""
    with pytest.raises(ModelSpecError) as caught:
        load_spec(write(folder, item))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(folder / "model.json"))
    return message


def schema_validator() -> Any:
    """A validator of the MLM schema that resolves its references from tests/data/stac."""
    jsonschema = pytest.importorskip("jsonschema")
    referencing = pytest.importorskip("referencing")
    resources = []
    for name in ("classification-v1.1.0", "raster-v1.1.0", "processing-v1.1.0"):
        contents = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
        resource = referencing.Resource.from_contents(
            contents, default_specification=referencing.jsonschema.DRAFT7)
        kind, version = name.split("-")
        url = f"https://stac-extensions.github.io/{kind}/{version}/schema.json"
        resources += [(url, resource), (contents["$id"].rstrip("#"), resource)]
    registry = referencing.Registry().with_resources(resources)
    schema = json.loads((SCHEMAS / "mlm-v1.5.2.schema.json").read_text())
    return jsonschema.Draft7Validator(schema, registry=registry)


def test_demo_item_is_valid_mlm() -> None:
    """The items these tests write are what the MLM schema accepts, checked offline.

    Teeth: the validator refuses the same item without ``mlm:input``, and without the
    ``bands`` its input names (both asserted here)."""
    validator = schema_validator()
    item = demo_item()
    assert not [e.message for e in validator.iter_errors(item)]
    broken = copy.deepcopy(item)
    del broken["properties"]["mlm:input"]
    assert list(validator.iter_errors(broken))
    broken = copy.deepcopy(item)
    del broken["properties"]["bands"]
    assert list(validator.iter_errors(broken))


def test_demo_item_gives_the_demo_spec(tmp_path: Path) -> None:
    """Every field of the spec mapped from the item equals the YAML's; the normalisation,
    written in raw units in the item, gives the network the same float32 input for every
    uint8 value.

    Teeth: dropping the mapping of mlm:hyperparameters to arguments, or placing classes
    in item order reversed, fails the comparison (both tried)."""
    spec = load_spec(write(tmp_path, demo_item()))
    assert spec.band_names == tuple(NAMES)
    assert spec.normalization.scale == 1.0
    for name in ("name", "architecture", "arguments", "weights", "sha256", "bands", "dtypes",
                 "nodata_input", "nodata_output", "classes", "nodata_fill"):
        assert getattr(spec, name) == getattr(DEMO_SPEC, name), name
    raw = np.tile(np.arange(256, dtype=np.uint8), (3, 1, 1))
    assert np.array_equal(normalize(raw, spec), normalize(raw, DEMO_SPEC))


@pytest.mark.parametrize(("scaling", "expected"), [
    ({"type": "z-score", "mean": 10.0, "stddev": 4.0}, lambda x: (x - 10.0) / 4.0),
    ({"type": "min-max", "minimum": 20, "maximum": 220}, lambda x: (x - 20) / 200),
    ({"type": "offset", "value": 7}, lambda x: x - 7.0),
    ({"type": "scale", "value": 255}, lambda x: x / 255),
    (None, lambda x: x),
    ({"type": None}, lambda x: x),
])
def test_value_scaling_becomes_the_same_normalisation(tmp_path: Path, scaling: Any,
                                                       expected: Any) -> None:
    """Each MLM scaling, given for one band among z-scored others or once for all bands,
    normalises raw values as the MLM README defines it.

    Teeth: min-max mapped to std = maximum, and scale mapped to mean = value, fail."""
    raw = np.linspace(0, 255, 64).reshape(1, 8, 8)
    item = demo_item()
    scalings = item["properties"]["mlm:input"][0]["value_scaling"]
    scalings[1] = scaling
    spec = load_spec(write(tmp_path, item))
    got = normalize(np.repeat(raw, 3, axis=0), spec, np.float64)
    np.testing.assert_allclose(got[1], expected(raw[0]), rtol=1e-12, atol=1e-12)
    item["properties"]["mlm:input"][0]["value_scaling"] = [scaling]
    spec = load_spec(write(tmp_path, item))
    got = normalize(np.repeat(raw, 3, axis=0), spec, np.float64)
    for band in range(3):
        np.testing.assert_allclose(got[band], expected(raw[0]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scaling", [
    {"type": "clip", "minimum": 0, "maximum": 100},
    {"type": "clip-min", "minimum": 0},
    {"type": "processing", "format": "gdal-calc", "expression": "A * 2"},
])
def test_unsupported_scaling_is_refused(tmp_path: Path, scaling: dict[str, Any]) -> None:
    """A scaling that is not ``(raw - mean) / std`` is refused, naming it and the field.

    Teeth: accepting any other type as identity (returning 0, 1) loads the spec."""
    item = demo_item()
    item["properties"]["mlm:input"][0]["value_scaling"][2] = scaling
    message = refusal(tmp_path, item)
    assert "properties.mlm:input[0].value_scaling[2].type" in message
    assert json.dumps(scaling["type"]) in message


def test_classes_are_placed_by_value(tmp_path: Path) -> None:
    """Classes listed in any order land at their value; a missing colour gets the default
    palette's; a gap or a repeated value is refused naming the field.

    Teeth: keeping the item's order, and skipping the gap check (a KeyError escapes), fail."""
    item = demo_item()
    classes = item["properties"]["mlm:output"][0]["classification:classes"]
    classes.reverse()
    del classes[0]["color_hint"]  # value 3
    spec = load_spec(write(tmp_path, item))
    assert [c.name for c in spec.classes] == [c.name for c in DEMO_SPEC.classes]
    assert spec.classes[3].color == default_color(3)
    assert spec.classes[:3] == DEMO_SPEC.classes[:3]

    classes[1]["value"] = 7  # value 2 is gone
    message = refusal(tmp_path, item)
    assert "classification:classes values must be 0 to 3" in message and "2 missing" in message
    classes[1]["value"] = 1  # repeats classes[2]
    message = refusal(tmp_path, item)
    assert "classification:classes[2].value 1 repeats" in message


def test_checksum_multihash_is_the_weights_sha256(tmp_path: Path) -> None:
    """``file:checksum`` 1220... is the sha256 checked before use; another digest or
    another hash function is refused, naming the item field.

    Teeth: not stripping the 1220 prefix fails the first assertion; ignoring
    file:checksum lets the wrong digest through."""
    spec = load_spec(write(tmp_path, demo_item()))
    assert spec.sha256 == DEMO_SPEC.sha256
    assert verify_weights(spec) == DEMO_SPEC.sha256

    item = demo_item()
    item["assets"]["model"]["file:checksum"] = "1220" + "0" * 64
    with pytest.raises(ModelSpecError, match=r"model\.json: assets\.model\.file:checksum does "
                                             "not match the weights file"):
        verify_weights(load_spec(write(tmp_path, item)))

    item["assets"]["model"]["file:checksum"] = "1340" + "0" * 128  # sha2-512
    assert "assets.model.file:checksum" in refusal(tmp_path, item)


def test_local_hrefs_relative_absolute_and_file_uri(tmp_path: Path) -> None:
    """The model file is found relative to the item, by an absolute path or a file:// URI.

    Teeth: resolving a relative href from the working folder fails the first assertion."""
    local = tmp_path / "weights" / "demo copy.safetensors"
    local.parent.mkdir()
    local.write_bytes(DEMO_SPEC.weights.read_bytes())
    for href in ("weights/demo copy.safetensors", str(local), local.as_uri()):
        spec = load_spec(write(tmp_path, demo_item(href)))
        assert spec.weights == local, href
        assert verify_weights(spec) == DEMO_SPEC.sha256


@pytest.mark.parametrize("href", [
    "https://example.org/models/demo.safetensors", "s3://bucket/demo.safetensors",
])
def test_remote_href_is_refused(tmp_path: Path, href: str) -> None:
    """A remote model file is refused in one line; nothing is downloaded.

    Teeth: treating any scheme as a path loads a spec whose weights are 'missing'."""
    message = refusal(tmp_path, demo_item(href))
    assert "assets.model.href" in message and "is remote" in message and href in message


def test_missing_input_is_refused(tmp_path: Path) -> None:
    """An item without ``mlm:input`` is refused naming the field.

    Teeth: defaulting the input to bands [1, 2, 3] loads the spec."""
    item = demo_item()
    del item["properties"]["mlm:input"]
    message = refusal(tmp_path, item)
    assert message == (f"{tmp_path / 'model.json'}: properties.mlm:input is required (the "
                       "model's input: bands, shape, value_scaling)")


@pytest.mark.parametrize(("change", "words"), [
    (lambda i: i.update(stac_extensions=[]), "does not list the Machine Learning Model"),
    (lambda i: i.update(stac_extensions=[MLM.replace("1.5.2", "1.3.0")]), "lists MLM v1.3"),
    (lambda i: i.update(type="Collection"), "is not an Item"),
])
def test_non_mlm_json_is_refused(tmp_path: Path, change: Any, words: str) -> None:
    """A STAC document that is not an MLM Item (v1.4 or later) is refused in one line.

    Teeth: skipping the extension check makes the first case load (the fields are there)."""
    item = demo_item()
    change(item)
    assert words in refusal(tmp_path, item)


def test_json_that_is_not_a_stac_item_is_read_as_a_spec(tmp_path: Path) -> None:
    """JSON with no STAC keys is a spec (JSON is YAML), as before: a wrong one is refused by
    the spec's own checks; malformed JSON in a .json file is refused as JSON.

    Teeth: sending every .json file through the MLM mapping refuses the spec."""
    values = {"schema": 1, "name": "demo", "architecture": "demo-fcn",
              "arguments": {"num_classes": 4}, "weights": str(DEMO_SPEC.weights),
              "bands": [1, 2, 3], "normalization": {"mean": [0, 0, 0], "std": [1, 1, 1]},
              "classes": [{"name": f"c{k}", "color": [k, k, k]} for k in range(4)]}
    assert load_spec(write(tmp_path, values)).name == "demo"
    (tmp_path / "model.json").write_text('{"type": "Feature",')
    with pytest.raises(ModelSpecError, match="is not valid JSON"):
        load_spec(tmp_path / "model.json")


def test_json_reader_is_bounded(tmp_path: Path) -> None:
    """Repeated keys, NaN and nesting beyond 64 levels are refused in one line.

    Teeth: json.loads without the hooks accepts the first two; without the depth check
    the third reaches the mapping."""
    text = json.dumps(demo_item())
    cases = {
        text.replace('"id": "demo"', '"id": "demo", "id": "other"'): "repeats",
        text.replace('"mean": 101', '"mean": NaN, "x": 101', 1): "NaN",
        text.replace('"links": []', '"links": ' + "[" * 70 + "]" * 70): "deeper than 64",
    }
    for bad, words in cases.items():
        assert bad != text
        (tmp_path / "model.json").write_text(bad)
        with pytest.raises(ModelSpecError, match=words):
            load_spec(tmp_path / "model.json")


def test_later_errors_name_the_item_fields(tmp_path: Path) -> None:
    """Errors found by the spec's checks, and later by the architecture's, name the item
    field the value came from.

    Teeth: without the field names, the messages say 'name' and 'architecture'."""
    item = demo_item()
    item["properties"]["mlm:name"] = " "
    assert "properties.mlm:name must be a non-empty string" in refusal(tmp_path, item)
    item = demo_item()
    item["properties"]["mlm:architecture"] = "ResNet"
    spec = load_spec(write(tmp_path, item))
    with pytest.raises(ModelSpecError, match=r"properties\.mlm:architecture 'ResNet' is "
                                             "neither a built-in"):
        resolve_architecture(spec, trust_code=False)
    item["properties"]["mlm:output"][0]["classification:classes"][1]["color_hint"] = "red"
    assert "classification:classes[1].color_hint must be RRGGBB" in refusal(tmp_path, item)


def test_onnx_framework_maps_to_an_onnx_model_without_architecture() -> None:
    """An ONNX item gives ``weights: X.onnx`` and no architecture or arguments.

    Teeth: taking mlm:architecture for every framework fails."""
    item = demo_item("model.onnx")
    item["properties"]["mlm:framework"] = "ONNX"
    item["assets"]["model"]["mlm:artifact_type"] = "onnx"
    mapped = item_spec(item, source="model.json")
    assert mapped.data["weights"] == "model.onnx"
    assert "architecture" not in mapped.data and "arguments" not in mapped.data
    item["properties"]["mlm:framework"] = "TensorFlow"
    with pytest.raises(ModelSpecError, match=r"properties\.mlm:framework \"TensorFlow\" is not"):
        item_spec(item, source="model.json")


def test_spec_band_names_must_match_the_bands(tmp_path: Path) -> None:
    """A YAML spec may name its bands, one name per band.

    Teeth: without the length check, two names for three bands load."""
    text = (DEMO_SPEC.path or Path()).read_text().replace(
        "weights: demo.safetensors", f"weights: {DEMO_SPEC.weights}")
    (tmp_path / "spec.yaml").write_text(text + "band_names: [red, green, blue]\n")
    assert load_spec(tmp_path / "spec.yaml").band_names == tuple(NAMES)
    (tmp_path / "spec.yaml").write_text(text + "band_names: [red, green]\n")
    with pytest.raises(ModelSpecError, match="band_names must have 3 names"):
        load_spec(tmp_path / "spec.yaml")


def write_scene(path: Path, descriptions: tuple[str, ...] | None) -> Path:
    pixels, _ = render(2, (900, 900 + SIZE), (900, 900 + SIZE), (2048, 2048))
    with rasterio.open(path, "w", driver="GTiff", height=SIZE, width=SIZE, count=3,
                       dtype="uint8", crs="EPSG:32633",
                       transform=Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4600000.0)) as ds:
        ds.write(pixels)
        if descriptions:
            ds.descriptions = descriptions
    return path


@pytest.mark.slow
def test_run_with_an_item_labels_as_the_yaml_spec(tmp_path: Path) -> None:
    """``run --model item.json`` writes the labels the demo YAML spec gives, on a scene
    whose band descriptions name the item's bands in another case; a scene describing its
    bands in another order fails alone, its line naming both lists.

    Teeth: comparing descriptions case-sensitively fails the first scene; without the
    band-name check the second scene runs."""
    item = write(tmp_path, demo_item())
    good = write_scene(tmp_path / "good.tif", ("RED", "Green", "blue"))
    swapped = write_scene(tmp_path / "swapped.tif", ("blue", "green", "red"))
    done = cli("run", str(good), "--out", str(tmp_path / "yaml"), "--tile-size", "64")
    assert done.returncode == 0, done.stderr
    done = cli("run", str(good), str(swapped), "--out", str(tmp_path / "item"),
               "--model", str(item), "--tile-size", "64")
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "swapped.tif" in line]
    assert lines == [
        "error: swapped.tif: its bands [1, 2, 3] are described as ['blue', 'green', 'red'], "
        "but the model reads ['red', 'green', 'blue'] (band names of " + str(item) + "); give "
        "a scene with those bands in that order (gdal_translate -b selects and orders bands)"
    ], done.stderr
    want = zarr.open_group(str(tmp_path / "yaml" / "good.zarr"), mode="r")["labels"][:]
    got = zarr.open_group(str(tmp_path / "item" / "good.zarr"), mode="r")["labels"][:]
    assert (want != 255).any()
    assert np.array_equal(got, want)
    assert not (tmp_path / "item" / "swapped.zarr").exists()


def test_the_declared_output_layout_is_checked_against_the_network(tmp_path: Path) -> None:
    """An item whose result is ``[batch, height, width]`` declares labels: loading the
    demo network, which gives scores, is refused naming the item's field.

    Teeth: _output() not mapping the layout: the item loads as scores, no refusal."""
    from pipeline.tiling import analyse_model

    item = demo_item()
    item["properties"]["mlm:output"][0]["result"] = {
        "shape": [-1, -1, -1], "dim_order": ["batch", "height", "width"],
        "data_type": "uint8"}
    spec = load_spec(write(tmp_path, item))
    assert spec.output == "labels"
    with pytest.raises(ModelSpecError, match=r"result\.dim_order declares labels but the "
                                             r"network gives scores"):
        analyse_model(spec, str(spec.sha256))
    assert load_spec(write(tmp_path, demo_item(), "scores.json")).output == "scores"
