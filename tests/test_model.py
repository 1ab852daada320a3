"""Building models from specs: exact weights, clear refusals, one load per process."""

from __future__ import annotations

import hashlib
import os
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from pipeline import architectures
from pipeline import model as model_module
from pipeline.demo import demo_fcn
from pipeline.errors import ModelError, ModelSpecError
from pipeline.model import build_model, cached_network, clear_model_cache, save_weights
from pipeline.modelspec import ModelSpec, file_sha256, load_spec, verify_weights
from tests import modelspec_factories as factories
from tests.modelspec_factories import spec_dict, write_spec


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    clear_model_cache()
    factories.calls = 0
    torch.manual_seed(0)
    yield
    clear_model_cache()


@pytest.fixture
def reference() -> nn.Module:
    """The network whose weights the specs point at."""
    return factories.tiny(num_classes=3).eval()


def _spec(folder: Path, weights: str = "tiny.safetensors", **overrides: Any) -> ModelSpec:
    return load_spec(write_spec(folder, spec_dict(weights=weights, **overrides)))


def _same_outputs(a: nn.Module, b: nn.Module) -> bool:
    x = torch.randn(2, 3, 9, 11)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_safetensors_weights_load_exactly(tmp_path: Path, reference: nn.Module) -> None:
    digest = save_weights(reference, tmp_path / "tiny.safetensors")
    assert digest == file_sha256(tmp_path / "tiny.safetensors")
    built = build_model(_spec(tmp_path, sha256=digest), trust_code=True)
    assert not built.training
    assert next(built.parameters()).device.type == "cpu"
    assert _same_outputs(built, reference)


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_pytorch_state_dict_loads_exactly(
    tmp_path: Path, reference: nn.Module, suffix: str
) -> None:
    torch.save(reference.state_dict(), tmp_path / f"tiny{suffix}")
    built = build_model(_spec(tmp_path, weights=f"tiny{suffix}"), trust_code=True)
    assert _same_outputs(built, reference)


def test_builtin_architecture(
    tmp_path: Path, reference: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A built-in name builds without trust; an unknown name names the built-ins and the
    entry-point group."""
    monkeypatch.setitem(architectures.BUILT_IN, "tiny-fcn", "tests.modelspec_factories:tiny")
    save_weights(reference, tmp_path / "tiny.safetensors")
    assert _same_outputs(build_model(_spec(tmp_path, architecture="tiny-fcn")), reference)
    with pytest.raises(ModelSpecError, match=r"architecture 'fcn9s' is neither a built-in "
                       r"architecture \(.*tiny-fcn.*\) nor registered by an installed package "
                       r"under fcn_pipeline.architectures"):
        build_model(_spec(tmp_path, architecture="fcn9s"), trust_code=True)


def test_the_built_in_names_are_the_package_networks() -> None:
    """Every network of pipeline.models is built in under its name, to the same factory."""
    import importlib

    from pipeline import models

    for name, factory in models.ARCHITECTURES.items():
        module, _, attribute = architectures.BUILT_IN[name].partition(":")
        assert getattr(importlib.import_module(module), attribute) is factory
    module, _, attribute = architectures.BUILT_IN["demo-fcn"].partition(":")
    assert getattr(importlib.import_module(module), attribute) is demo_fcn
    assert set(architectures.BUILT_IN) == set(models.ARCHITECTURES) | {"demo-fcn"}


class _RunsCommand:
    """Unpickling this runs a shell command (``touch`` of a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class _WritesFile:
    """Unpickling this opens (creates) the marker file for writing."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


class _Thing:
    """An object that is not a tensor."""


def _pickled_weights(kind: str, path: Path, marker: Path) -> None:
    """Write a hostile or foreign ``.pt`` file of ``kind`` at ``path``."""
    module = factories.tiny(num_classes=3)
    if kind == "module":
        torch.save(module, path)
    elif kind == "legacy module":
        torch.save(module, path, _use_new_zipfile_serialization=False)
    elif kind == "raw pickle running a command":
        path.write_bytes(pickle.dumps(_RunsCommand(marker), protocol=2))
    elif kind == "raw pickle writing a file":
        path.write_bytes(pickle.dumps(_WritesFile(marker), protocol=4))
    elif kind == "zip running a command":
        torch.save({**module.state_dict(), "evil": _RunsCommand(marker)}, path)
    elif kind == "zip with an object":
        torch.save({**module.state_dict(), "thing": _Thing()}, path)
    else:
        raise AssertionError(kind)


#: What the refusal of each kind says (a protocol 4 pickle has opcodes torch's
#: restricted unpickler does not read at all).
PICKLES = {
    "module": "is a pickle that refers to torch.nn.modules",
    "legacy module": "is a pickle that refers to torch.nn.modules",
    "raw pickle running a command": "is a pickle that refers to posix.system",
    "raw pickle writing a file": "is not a PyTorch state dict (its pickle cannot be read",
    "zip running a command": "is a pickle that refers to posix.system",
    "zip with an object": "is a pickle that refers to tests.test_model._Thing",
}
CONVERT = "convert it where the model was trained: safetensors.torch.save_file(" \
          "model.state_dict(), 'tiny.safetensors'), then set weights: tiny.safetensors"


@pytest.mark.parametrize("kind", list(PICKLES))
def test_pickles_are_refused_unread_and_the_message_says_how_to_convert(
        tmp_path: Path, kind: str) -> None:
    """Pickled modules (zip and legacy files), pickles whose unpickling would run a
    command or write a file, a zip file holding an object: refused with one line that
    says how to convert the weights to safetensors without this tool unpickling them;
    torch's advice to load the file unrestricted is never passed on, not even chained;
    the marker file the hostile pickles would make does not exist.

    Teeth: _state_dict() raising ModelError(str(exc)) (torch's text): "weights_only"
    appears and the test fails; torch.load(weights_only=False): the marker exists.
    """
    marker = tmp_path / "marker"
    _pickled_weights(kind, tmp_path / "tiny.pt", marker)
    with pytest.raises(ModelError) as caught:
        build_model(_spec(tmp_path, weights="tiny.pt"), trust_code=True)
    text = str(caught.value)
    assert len(text.splitlines()) == 1, text
    assert f"tiny.pt {PICKLES[kind]}" in text and CONVERT in text
    assert "weights_only" not in text and "safe_globals" not in text
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert not marker.exists()


@pytest.mark.slow
def test_no_command_passes_on_torchs_advice_on_pickles(tmp_path: Path) -> None:
    """``fcn-pipeline run`` and ``inspect`` with hostile .pt files (a built-in
    architecture: no flag needed): exit 2, one line that says how to convert, never
    "weights_only", no marker; a protocol-0 pickle is refused before torch loads (not a
    zip, no pickle protocol 2+ header).

    Teeth: as the test above: with torch's text passed on, "weights_only" is printed.
    """
    import numpy as np
    import rasterio
    from rasterio.transform import Affine

    from tests.support import cli, other_lines

    scene = tmp_path / "scene.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=32, height=32, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=Affine(10, 0, 500000, 0, -10, 4600000)) as ds:
        ds.write(np.zeros((3, 32, 32), np.uint8))
    marker = tmp_path / "marker"
    # (kind of file, command, what the one line says): run and inspect, a few kinds each
    cases = [("zip running a command", "run", CONVERT), ("legacy module", "run", CONVERT),
             ("module", "inspect", CONVERT), ("raw pickle writing a file", "inspect", CONVERT),
             ("protocol 0", "run", "is not a PyTorch weights file")]
    for kind, command, says in cases:
        folder = tmp_path / f"{command}-{kind.replace(' ', '-')}"
        folder.mkdir()
        if kind == "protocol 0":
            (folder / "tiny.pt").write_bytes(pickle.dumps(_RunsCommand(marker), protocol=0))
        else:
            _pickled_weights(kind, folder / "tiny.pt", marker)
        spec = write_spec(folder, spec_dict(architecture="unet-small", weights="tiny.pt",
                                            arguments={"num_classes": 3}))
        args = ["run", str(scene), "--out", str(folder / "out"), "--model", str(spec)] \
            if command == "run" else ["inspect", str(spec)]
        done = cli(*args)
        assert done.returncode == 2, (kind, args, done.stderr)
        lines = other_lines(done.stderr)
        assert len(lines) == 1 and "tiny.pt" in lines[0] and says in lines[0], (kind, lines)
        assert "weights_only" not in done.stdout + done.stderr, (kind, done.stderr)
    assert not marker.exists()


def test_training_checkpoint_is_refused(tmp_path: Path, reference: nn.Module) -> None:
    torch.save({"state_dict": reference.state_dict(), "epoch": 3}, tmp_path / "tiny.pt")
    with pytest.raises(
        ModelError, match=r"not a plain state dict: 2 entries are not tensors \(state_dict, epoch\)"
    ):
        build_model(_spec(tmp_path, weights="tiny.pt"), trust_code=True)


def test_tensor_file_is_refused(tmp_path: Path) -> None:
    torch.save(torch.zeros(3), tmp_path / "tiny.pt")
    with pytest.raises(ModelError, match="holds a Tensor, not a state dict"):
        build_model(_spec(tmp_path, weights="tiny.pt"), trust_code=True)


@pytest.mark.parametrize("name", ["tiny.safetensors", "tiny.pt"])
def test_corrupt_weights(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"not weights at all")
    with pytest.raises(ModelError, match=f"weights {name} is not a"):
        build_model(_spec(tmp_path, weights=name), trust_code=True)


def test_missing_weights(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    with pytest.raises(
        ModelSpecError, match=r"spec\.yaml: weights file .*tiny\.safetensors does not exist"
    ):
        build_model(spec, trust_code=True)


def test_checksum_is_checked_before_loading(tmp_path: Path, reference: nn.Module) -> None:
    digest = save_weights(reference, tmp_path / "tiny.safetensors")
    wrong = "f" * 64
    with pytest.raises(ModelSpecError) as caught:
        build_model(_spec(tmp_path, sha256=wrong), trust_code=True)
    assert "sha256 does not match" in str(caught.value)
    assert digest in str(caught.value) and wrong in str(caught.value)
    assert factories.calls == 1  # the reference only: the factory never ran


def test_state_dict_mismatch_names_keys(tmp_path: Path) -> None:
    state = {k: v.clone() for k, v in factories.tiny(num_classes=2).state_dict().items()}
    del state["0.bias"]
    for i in range(7):
        state[f"extra.{i}"] = torch.zeros(1)
    torch.save(state, tmp_path / "tiny.pt")
    with pytest.raises(ModelError) as caught:
        build_model(_spec(tmp_path, weights="tiny.pt"), trust_code=True)
    text = str(caught.value)
    assert "do not fit architecture tests.modelspec_factories:tiny" in text
    assert "1 missing (0.bias)" in text
    assert "7 unexpected (extra.0, extra.1, extra.2, extra.3, extra.4, ... 2 more)" in text
    assert "2.weight is (2, 4, 1, 1), the network needs (3, 4, 1, 1)" in text


@pytest.mark.parametrize(
    ("architecture", "message"),
    [
        ("tests.no_such_module:tiny",
         "cannot import module tests.no_such_module (ModuleNotFoundError"),
        ("tests.modelspec_factories:huge", "tests.modelspec_factories has no attribute huge"),
        ("tests.modelspec_factories:NOT_CALLABLE", "NOT_CALLABLE is a int, not a callable"),
    ],
)
def test_bad_import_path(
    tmp_path: Path, reference: nn.Module, architecture: str, message: str
) -> None:
    save_weights(reference, tmp_path / "tiny.safetensors")
    with pytest.raises(ModelSpecError, match=f"spec.yaml: architecture {architecture}: ") as caught:
        build_model(_spec(tmp_path, architecture=architecture), trust_code=True)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("architecture", "message"),
    [
        ("tests.modelspec_factories:failing",
         "failed with arguments {'num_classes': 3}: RuntimeError: boom"),
        ("tests.modelspec_factories:not_a_module", "returned a int, not a torch.nn.Module"),
    ],
)
def test_factory_errors(
    tmp_path: Path, reference: nn.Module, architecture: str, message: str
) -> None:
    save_weights(reference, tmp_path / "tiny.safetensors")
    with pytest.raises(ModelError, match=r"spec\.yaml: architecture ") as caught:
        build_model(_spec(tmp_path, architecture=architecture), trust_code=True)
    assert message in str(caught.value)


def test_bad_arguments_for_factory(tmp_path: Path, reference: nn.Module) -> None:
    save_weights(reference, tmp_path / "tiny.safetensors")
    with pytest.raises(ModelError, match=r"TypeError: .*unexpected keyword argument 'depth'"):
        build_model(_spec(tmp_path, arguments={"depth": 3}), trust_code=True)


def test_bad_device(tmp_path: Path, reference: nn.Module) -> None:
    save_weights(reference, tmp_path / "tiny.safetensors")
    with pytest.raises(ModelError, match="cannot move model tiny to device 'warp-drive'"):
        build_model(_spec(tmp_path), device="warp-drive", trust_code=True)


def test_save_weights_needs_safetensors_suffix(tmp_path: Path, reference: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"writes \.safetensors files"):
        save_weights(reference, tmp_path / "tiny.pt")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- cache


def _planned(tmp_path: Path, reference: nn.Module) -> tuple[str, str]:
    save_weights(reference, tmp_path / "tiny.safetensors")
    path = write_spec(tmp_path)
    return str(path), verify_weights(load_spec(path))


def test_cache_loads_once(tmp_path: Path, reference: nn.Module) -> None:
    spec_path, digest = _planned(tmp_path, reference)
    factories.calls = 0
    spec, first = cached_network(spec_path, digest, "cpu", trust_code=True)
    again_spec, second = cached_network(spec_path, digest, "cpu", trust_code=True)
    assert second is first and again_spec is spec
    assert factories.calls == 1
    assert spec.name == "tiny"
    assert _same_outputs(first.module, reference)


def test_cache_loads_once_across_threads(tmp_path: Path, reference: nn.Module) -> None:
    spec_path, digest = _planned(tmp_path, reference)
    factories.calls = 0
    results: list[nn.Module] = []
    threads = [
        threading.Thread(target=lambda: results.append(
            cached_network(spec_path, digest, "cpu", trust_code=True)[1]))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(r is results[0] for r in results)
    assert factories.calls == 1


def test_cache_checks_the_planned_digest(tmp_path: Path, reference: nn.Module) -> None:
    spec_path, digest = _planned(tmp_path, reference)
    factories.calls = 0
    planned = hashlib.sha256(b"other weights").hexdigest()
    with pytest.raises(ModelError) as caught:
        cached_network(spec_path, planned, "cpu", trust_code=True)
    text = str(caught.value)
    assert "changed since the run was planned" in text
    assert digest in text and planned in text
    assert factories.calls == 0
    assert model_module._NETWORKS == {}


def test_cache_checks_the_spec_digest(tmp_path: Path, reference: nn.Module) -> None:
    """Teeth: cached_network() assembling before check_digest(): the factory is called."""
    save_weights(reference, tmp_path / "tiny.safetensors")
    path = write_spec(tmp_path, spec_dict(sha256="0" * 64))
    factories.calls = 0
    with pytest.raises(ModelSpecError, match="sha256 does not match"):
        cached_network(str(path), file_sha256(tmp_path / "tiny.safetensors"), "cpu",
                     trust_code=True)
    assert factories.calls == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_build_on_cuda(tmp_path: Path, reference: nn.Module) -> None:
    save_weights(reference, tmp_path / "tiny.safetensors")
    built = build_model(_spec(tmp_path), device="cuda", trust_code=True)
    assert next(built.parameters()).is_cuda
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(built(x.cuda()).cpu(), reference(x))
