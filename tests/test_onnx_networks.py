"""The ONNX Runtime back end: networks from ONNX graphs, their signatures read from the
graph and checked against the spec, ONNX spec keys, and the checks before a run.

Graphs are exported from small torch modules in the test (tests/onnx_export.py).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import rasterio
import torch
import yaml
from rasterio.transform import Affine
from torch import nn

from pipeline.errors import ModelError, ModelSpecError
from pipeline.model import cached_network, clear_model_cache, load_network, save_weights
from pipeline.modelspec import LABELS, SCORES, file_sha256, load_spec, parse_spec
from pipeline.networks import (
    MAX_WINDOW,
    NetworkSignature,
    OnnxNetwork,
    TorchNetwork,
    check_signature,
    onnx_memory,
)
from tests import modelspec_factories as factories
from tests.conftest import ROOT
from tests.modelspec_factories import spec_dict
from tests.onnx_export import onnx_bytes, write_onnx
from tests.support import cli, other_lines

#: float32 tolerance of ONNX Runtime against torch on the same weights: both sum the same
#: products in another order (a few ulp of values of order 1).
ATOL = 1e-5
RTOL = 1e-5
TRANSFORM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4600000.0)


@pytest.fixture(autouse=True)
def _fresh() -> Any:
    clear_model_cache()
    yield
    clear_model_cache()


def tiny(channels: int = 3, classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, classes, 1)).eval()


class Argmax(nn.Module):
    """Labels picked in the graph: ``(N, H, W)`` int64, or ``(N, 1, H, W)`` with keepdim."""

    def __init__(self, keepdim: bool = False) -> None:
        super().__init__()
        self.body = tiny()
        self.keepdim = keepdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).argmax(dim=1, keepdim=self.keepdim)


class Both(nn.Module):
    """Two outputs: the scores ``y`` and the labels."""

    def __init__(self) -> None:
        super().__init__()
        self.body = tiny()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.body(x)
        return scores, scores.argmax(dim=1)


def batch(n: int = 2, channels: int = 3, rows: int = 37, cols: int = 45) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, channels, rows, cols)).astype(np.float32)


def reference(module: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def edit_graph(data: bytes, batch: int | None = None, float16: bool = False) -> bytes:
    """``data`` with its input and output batch dim fixed to ``batch``, or its input cast
    from float16 (a Cast node in front of the graph)."""
    model = onnx.load_from_string(data)
    graph = model.graph
    if batch is not None:
        for value in (*graph.input, *graph.output):
            dim = value.type.tensor_type.shape.dim[0]
            dim.ClearField("dim_param")
            dim.dim_value = batch
    if float16:
        name = graph.input[0].name
        for node in graph.node:
            node.input[:] = [f"{name}_32" if i == name else i for i in node.input]
        graph.node.insert(0, onnx.helper.make_node("Cast", [name], [f"{name}_32"],
                                                   to=onnx.TensorProto.FLOAT))
        graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    return model.SerializeToString()


# --------------------------------------------------------------------------- running


def test_an_onnx_network_gives_the_torch_modules_output() -> None:
    """Same weights, same scores within float32 tolerance (ATOL/RTOL), on any window size
    (dynamic dims), as float32 on the CPU; a graph taking float16 gets its input cast.

    Teeth: forward() feeding the float32 batch without casting it to the graph's input
    dtype: ONNX Runtime refuses the float16 graph's input.
    """
    module = tiny()
    x = batch()
    network = OnnxNetwork(onnx_bytes(module, 3))
    y = network.forward(x)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.device.type == "cpu"
    np.testing.assert_allclose(y.numpy(), reference(module, x), atol=ATOL, rtol=RTOL)
    assert network.device == "cpu"

    half = OnnxNetwork(edit_graph(onnx_bytes(module, 3), float16=True))
    assert half.signature.input_dtype == "float16"
    expected = reference(module, x.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(half.forward(x).numpy(), expected, atol=ATOL, rtol=RTOL)


def test_a_graph_with_its_batch_fixed_to_one_runs_any_batch() -> None:
    """A graph exported for batches of 1 records it (signature.batch) and forward still
    takes 3 windows, one at a time.

    Teeth: forward() running the whole batch at once (size = len(x)): ONNX Runtime
    refuses 3 windows for a batch dim of 1.
    """
    module = tiny()
    network = OnnxNetwork(edit_graph(onnx_bytes(module, 3, window=(32, 32)), batch=1))
    assert network.signature.batch == 1
    assert network.signature.window == (32, 32)
    x = batch(3, rows=32, cols=32)
    np.testing.assert_allclose(network.forward(x).numpy(), reference(module, x),
                               atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------- signatures


def test_the_signature_of_a_graph_with_dynamic_dims() -> None:
    """Teeth: onnx_signature() reading the window from the input's dims whatever they are
    (window = (shape[2], shape[3])): ('h', 'w') is not None."""
    signature = OnnxNetwork(onnx_bytes(tiny(3, 4), 3)).signature
    assert signature == NetworkSignature("onnx", 3, None, SCORES, 4, "x", "y", "float32", None)


def test_a_graph_with_a_fixed_input_size_gives_its_window() -> None:
    """Teeth: _static() returning None for every dim: the window is None."""
    signature = OnnxNetwork(onnx_bytes(tiny(), 3, window=(64, 48))).signature
    assert signature.window == (64, 48) and signature.batch is None


@pytest.mark.parametrize("keepdim", [False, True])
def test_labels_picked_in_the_graph_are_detected(keepdim: bool) -> None:
    """An argmax in the graph gives labels (N, H, W) int64, with or without its class dim
    of 1; the declared layout that contradicts it is refused.

    Teeth: _layout() without its labels branch: the int64 output is refused as neither
    scores nor labels; forward() without the squeeze of dim 1: shape (N, 1, H, W).
    """
    module = Argmax(keepdim)
    data = onnx_bytes(module, 3)
    network = OnnxNetwork(data)
    assert network.signature.output == LABELS and network.signature.classes is None
    x = batch()
    y = network.forward(x)
    assert y.dtype == torch.int64 and tuple(y.shape) == (2, 37, 45)
    np.testing.assert_array_equal(y.numpy(), reference(module.body, x).argmax(axis=1))
    with pytest.raises(ModelError, match=r"declares output: scores, but the graph's output y "
                                         r"int64 .* holds labels"):
        OnnxNetwork(data, output=SCORES)


def test_several_outputs_need_a_name() -> None:
    """Teeth: _pick() taking the first output when there are several: no error."""
    data = onnx_bytes(Both(), 3)
    with pytest.raises(ModelError) as refused:
        OnnxNetwork(data, source="spec.yaml: weights both.onnx")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("spec.yaml: weights both.onnx: the graph has 2 outputs (y float32")
    assert "onnx: {output: NAME}" in message
    assert OnnxNetwork(data, output_name="y").signature.output == SCORES
    other = onnxruntime.InferenceSession(data).get_outputs()[1].name
    assert OnnxNetwork(data, output_name=other).signature.output == LABELS
    with pytest.raises(ModelError, match=r"onnx\.output 'logits' is not an output of the graph"):
        OnnxNetwork(data, output_name="logits")


def test_an_input_that_is_not_an_image_batch_is_refused() -> None:
    """Teeth: onnx_signature() without the rank check: a rank 3 input passes."""
    flat = nn.Conv1d(3, 4, 1).eval()
    buffer = onnx_bytes_1d(flat)
    with pytest.raises(ModelError, match=r"input x float32 \(n, 3, 16\) is not a float batch "
                                         r"of images \(N, C, H, W\)"):
        OnnxNetwork(buffer)


def onnx_bytes_1d(module: nn.Module) -> bytes:
    """``module`` exported with an input ``x`` of rank 3 ``(N, 3, 16)``."""
    stream = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.rand(1, 3, 16),), stream, dynamo=False,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return stream.getvalue()


def test_check_signature_refuses_channels_and_classes_the_spec_does_not_list(
        tmp_path: Path) -> None:
    """Teeth: check_signature() without its channels check, then without its classes
    check: no error."""
    spec = parse_spec(onnx_spec_dict(), path=tmp_path / "spec.yaml")
    four = NetworkSignature("onnx", 4, None, SCORES, 3)
    with pytest.raises(ModelError) as refused:
        check_signature(spec, four)
    assert str(refused.value) == (
        f"{tmp_path / 'spec.yaml'}: the model takes 4 input channels but bands lists 3 "
        "([1, 2, 3]); list 4 scene bands in bands")
    with pytest.raises(ModelError, match=r"gives 5 class scores but classes lists 3 \(water, "
                                         r"forest, urban\); list 5 classes in classes"):
        check_signature(spec, NetworkSignature("onnx", 3, None, SCORES, 5))
    check_signature(spec, NetworkSignature("onnx", 3, None, LABELS, None))


# --------------------------------------------------------------------------- devices


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(),
                    reason="this ONNX Runtime has the CUDA execution provider")
def test_a_cuda_device_without_the_cuda_provider_is_one_line() -> None:
    """Teeth: _providers() without the get_available_providers() check: ONNX Runtime
    falls back to the CPU and the error says it could not start CUDA instead."""
    with pytest.raises(ModelError) as refused:
        OnnxNetwork(onnx_bytes(tiny(), 3), device="cuda:1", source="m.onnx")
    message = str(refused.value)
    assert "\n" not in message
    assert "has no CUDA execution provider" in message
    assert "pip install 'fcn-pipeline[onnx-cuda]'" in message


def test_without_onnx_runtime_an_onnx_spec_says_what_to_install(tmp_path: Path) -> None:
    """Importing pipeline.networks loads neither torch, onnx nor ONNX Runtime; with ONNX
    Runtime missing (shadowed), an ONNX graph is refused with the extra to install.

    Teeth: `import onnxruntime` at the top of pipeline.networks: the import fails.
    """
    fake = tmp_path / "shadow" / "onnxruntime"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no onnxruntime here')\n")
    code = (
        "import sys\n"
        "import pipeline.networks as n\n"
        "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))\n"
        "try:\n"
        "    n.OnnxNetwork(b'', source='spec.yaml: weights m.onnx')\n"
        "except n.ModelError as e:\n"
        "    print(e)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "[]", "spec.yaml: weights m.onnx is an ONNX graph, which needs ONNX Runtime: "
              "pip install 'fcn-pipeline[onnx]'"]


# --------------------------------------------------------------------------- memory


def test_the_memory_estimate_of_a_graph() -> None:
    """Largest node in+out (the ReLU: 8 x 64 x 64 float32 each way) times the batch, and
    the initializers' bytes.

    Teeth: onnx_memory() without fixing the input's dims: shape inference leaves the
    spatial dims unknown and the activations count 0.
    """
    activations, weights = onnx_memory(onnx_bytes(tiny(3, 4), 3), (3, 64, 64), batch=2)
    assert activations == 2 * (2 * 8 * 64 * 64 * 4)
    assert weights == (8 * 3 * 9 + 8 + 4 * 8 + 4) * 4


# --------------------------------------------------------------------------- specs


def onnx_spec_dict(**overrides: Any) -> dict[str, Any]:
    data = spec_dict(weights="model.onnx", **overrides)
    del data["architecture"], data["arguments"]
    return data


def write_onnx_spec(folder: Path, module: nn.Module, channels: int = 3,
                    **overrides: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_onnx(module, folder / "model.onnx", channels)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(onnx_spec_dict(**overrides), sort_keys=False))
    return path


def test_an_onnx_spec_needs_no_architecture_and_reads_its_keys(tmp_path: Path) -> None:
    """Teeth: parse_spec() without the halo key (halo=None): the halo is lost."""
    spec = parse_spec(onnx_spec_dict(halo=[16, 24], output="labels",
                                     onnx={"input": "image", "output": "labels"}),
                      path=tmp_path / "spec.yaml")
    assert spec.backend == "onnx" and spec.architecture is None
    assert (spec.halo, spec.output, spec.onnx_input, spec.onnx_output) == (
        (16, 24), "labels", "image", "labels")
    assert parse_spec(onnx_spec_dict(halo=8), path=None).halo == (8, 8)
    torch_spec = parse_spec(spec_dict(), path=tmp_path / "spec.yaml")
    assert torch_spec.backend == "torch" and torch_spec.halo is None and torch_spec.output is None


@pytest.mark.parametrize(("data", "expected"), [
    (spec_dict(weights="model.pt2"), "weights model.pt2 is a torch.export archive, which is "
                                     "never loaded here: torch.export.load unpickles"),
    (spec_dict(weights="model.onnx"), "architecture must not be given with an ONNX graph "
                                      "(model.onnx): the graph carries its architecture"),
    (onnx_spec_dict(halo=-1), "halo must be an integer >= 0, got -1"),
    (onnx_spec_dict(halo=[1, 2, 3]), "halo must be one number of px or [rows, cols]"),
    (onnx_spec_dict(halo=True), "halo must be an integer >= 0, got True"),
    (onnx_spec_dict(output="logits"), "output must be scores or labels"),
    (onnx_spec_dict(onnx={"inputs": "x"}), "onnx.inputs is not a known key of onnx"),
    (spec_dict(onnx={"input": "x"}), "onnx applies to ONNX graphs only"),
    ({k: v for k, v in spec_dict().items() if k != "architecture"},
     "architecture is required (or set weights to an .onnx graph"),
])
def test_spec_refusals_of_the_new_keys(data: dict[str, Any], expected: str) -> None:
    """Teeth: each check removed in turn (the .pt2 branch of _weights, _network_keys,
    _halo's bounds and length, _output's word check, onnx's key list): no error, or
    another message (.pt2: the suffix list's)."""
    with pytest.raises(ModelSpecError) as refused:
        parse_spec(data, path=Path("spec.yaml"))
    assert str(refused.value).startswith("spec.yaml: ")
    assert expected in str(refused.value)
    assert "\n" not in str(refused.value)


# --------------------------------------------------------------------------- loading


def test_load_network_and_the_per_process_cache(tmp_path: Path) -> None:
    """load_network gives the graph's network, checked against the spec; cached_network
    keeps one per key, and refuses weights that changed since the run was planned.

    Teeth: cached_network() without the planned-digest check (_planned_weights returning
    the bytes unchecked): no error for a planned digest that is not the file's.
    """
    path = write_onnx_spec(tmp_path, tiny(3, 3))
    network = load_network(load_spec(path))
    assert isinstance(network, OnnxNetwork) and network.signature.classes == 3
    digest = file_sha256(tmp_path / "model.onnx")
    spec, first = cached_network(str(path), digest, "cpu")
    assert cached_network(str(path), digest, "cpu")[1] is first and spec.backend == "onnx"
    with pytest.raises(ModelError, match="changed since the run was planned"):
        cached_network(str(path), "0" * 64, "cpu")
    with pytest.raises(ModelError, match=r"compute\.precision fp16 applies to PyTorch models"):
        load_network(load_spec(path), precision="fp16")


def test_load_network_of_a_torch_spec_reads_its_input_channels(tmp_path: Path) -> None:
    """Teeth: load_network() building TorchNetwork without channels: signature.channels
    is None (and a 3-band spec of a 4-channel network would pass)."""
    digest = save_weights(factories.tiny(in_channels=3, num_classes=3),
                          tmp_path / "tiny.safetensors")
    path = factories.write_spec(tmp_path, spec_dict(sha256=digest))
    network = load_network(load_spec(path), trust_code=True, precision="bf16")
    assert isinstance(network, TorchNetwork)
    assert network.signature.channels == 3 and network.autocast == torch.bfloat16


# --------------------------------------------------------------------------- the CLI


def write_scene(path: Path, bands: int = 3, size: int = 32) -> Path:
    values = np.random.default_rng(0).integers(0, 255, (bands, size, size), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=bands,
                       dtype="uint8", crs="EPSG:32633", transform=TRANSFORM) as dst:
        dst.write(values)
    return path


def test_an_onnx_graph_that_does_not_take_the_specs_bands_is_refused_before_the_run(
        tmp_path: Path) -> None:
    """`run` with an ONNX graph of 4 input channels and a spec of 3 bands: exit 2, one
    line naming the spec and the fix, before torch loads (torch cannot even be imported)
    or a cluster starts, in well under the time either takes.

    Teeth: preflight without check_onnx_spec (verify_weights only): the run goes on to
    load torch, which fails, and exits 1.
    """
    spec = write_onnx_spec(tmp_path / "model", tiny(4, 3), channels=4)
    scene = write_scene(tmp_path / "scene.tif")
    fake = tmp_path / "no-torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch was loaded')\n")
    started = time.monotonic()
    done = cli("run", str(scene), "--out", str(tmp_path / "out"), "--model", str(spec),
               env={"PYTHONPATH": os.pathsep.join([str(fake.parent), str(ROOT)])})
    took = time.monotonic() - started
    lines = other_lines(done.stderr)
    assert done.returncode == 2, done.stderr
    assert lines == [f"error: {spec}: the model takes 4 input channels but bands lists 3 "
                     "([1, 2, 3]); list 4 scene bands in bands"], lines
    assert not (tmp_path / "out").exists()
    assert took < 10, took


def test_a_graph_fixing_a_huge_window_is_refused_before_anything_is_allocated(
        tmp_path: Path) -> None:
    """`run --halo 4` with a graph whose input and output declare 1x3x100000x100000 (a
    112 GiB window): exit 2, one line naming the spec, the tensor and the limit.

    Teeth: onnx_signature() without the MAX_WINDOW check: the declared halo lets the
    analysis run the network on one zero window, and numpy's MemoryError reaches the
    terminal as a traceback.
    """
    spec = write_onnx_spec(tmp_path / "model", tiny(3, 3))
    model = onnx.load_from_string(onnx_bytes(tiny(3, 3), 3, window=(64, 64)))
    for value in (*model.graph.input, *model.graph.output):
        for dim in value.type.tensor_type.shape.dim[2:]:
            dim.dim_value = 100_000
    (spec.parent / "model.onnx").write_bytes(model.SerializeToString())
    scene = write_scene(tmp_path / "scene.tif")
    done = cli("run", str(scene), "--out", str(tmp_path / "out"), "--model", str(spec),
               "--halo", "4")
    assert done.returncode == 2, done.stderr
    assert other_lines(done.stderr) == [
        f"error: {spec}: weights model.onnx: input x float32 (n, 3, 100000, 100000) fixes its "
        f"windows to 100000x100000 px (width x height), more than the {MAX_WINDOW} px a side "
        "this tool runs; export it with dynamic or smaller H and W"], done.stderr
    assert not (tmp_path / "out").exists()


def test_the_graph_tensors_a_spec_picks_enter_its_fingerprint(tmp_path: Path) -> None:
    """Another output tensor of the same graph gives other labels: it changes the spec's
    fingerprint values; a spec without the new keys keeps the values it had.

    Teeth: spec_values() without the network entry: both ONNX specs give the same values.
    """
    from pipeline.actions import spec_values

    def values(**overrides: Any) -> dict[str, Any]:
        return spec_values(parse_spec(onnx_spec_dict(**overrides), path=tmp_path / "s.yaml"))

    assert values(onnx={"output": "y"}) != values(onnx={"output": "labels"})
    assert "network" not in values() and values() == spec_values(
        parse_spec(spec_dict(), path=tmp_path / "s.yaml"))
