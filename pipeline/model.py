"""Models from specs: build the network, load its checked weights, keep one per process.

The weights file is read once into memory, hashed and checked against the spec's
``sha256`` *before* anything is deserialised, then loaded from those same bytes,
so the weights used are exactly the weights checked. ``.safetensors`` files and
PyTorch state dicts (``.pt``/``.pth``, read with ``torch.load(weights_only=True)``)
are accepted; pickled modules or other objects are refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import pickle
import tempfile
import threading
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from pipeline.errors import ModelError
from pipeline.modelspec import (
    ModelSpec,
    check_digest,
    file_sha256,
    load_spec,
    missing_weights_error,
)

_FEW = 5

# The one piece of global mutable state in the package: a per-process model cache,
# so a Dask worker builds each model once and keeps it for every task it runs.
# Keyed by (spec path, sha256 of the weights, device); guarded by _MODELS_LOCK,
# which is held while a model loads, so threads of one worker never load twice.
_MODELS: dict[tuple[str, str, str, bool, bool], tuple[ModelSpec, nn.Module]] = {}
_MODELS_LOCK = threading.Lock()


def build_model(spec: ModelSpec, *, device: str = "cpu") -> nn.Module:
    """The network a spec describes, with its weights loaded (strict), in eval mode, on ``device``.

    Raises:
        ModelSpecError: the weights file is missing or does not match ``spec.sha256``;
            the architecture is unknown or its import path does not resolve.
        ModelError: the factory fails, the weights are not a plain state dict, or they
            do not fit the network (missing, unexpected or mis-shaped tensors).
    """
    data = _read_weights(spec)
    check_digest(spec, hashlib.sha256(data).hexdigest())
    return _assemble(spec, data, device)


def cached_model(spec_path: str, sha256: str, device: str, *, channels_last: bool = False,
                 compile: bool = False) -> tuple[ModelSpec, nn.Module]:
    """The spec and model for a task, built on first use in this process and kept.

    ``sha256`` is the weights' digest that the client computed while planning
    (:func:`pipeline.modelspec.verify_weights`); on first load the file is checked
    against it, so a worker never runs weights other than those planned. The spec
    is read once per key: edit a spec's YAML between runs in a fresh process.
    """
    key = (str(spec_path), sha256.strip().lower(), str(device), channels_last, compile)
    with _MODELS_LOCK:
        entry = _MODELS.get(key)
        if entry is None:
            spec = load_spec(spec_path)
            data = _read_weights(spec)
            digest = hashlib.sha256(data).hexdigest()
            check_digest(spec, digest)
            if digest != key[1]:
                raise ModelError(
                    f"{spec.source}: weights file {spec.weights} changed since the run was "
                    f"planned: its sha256 is {digest}, the task expects {key[1]}; plan the run "
                    "again"
                )
            module = _assemble(spec, data, device)
            if channels_last:
                # Module.to takes memory_format at runtime; torch's overloads omit it
                module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            if compile:
                # an OptimizedModule (an nn.Module), but typed as a plain callable
                module = torch.compile(module)  # type: ignore[assignment]
            entry = _MODELS[key] = (spec, module)
    return entry


def clear_model_cache() -> None:
    """Forget every cached model of this process (tests, or to free device memory)."""
    with _MODELS_LOCK:
        _MODELS.clear()


def save_weights(module: nn.Module, path: str | os.PathLike[str]) -> str:
    """Write ``module``'s state dict as ``.safetensors`` (atomically); return its sha256."""
    target = Path(path)
    if target.suffix != ".safetensors":
        raise ValueError(f"save_weights writes .safetensors files, got {str(target)!r}")
    # Each tensor gets its own contiguous CPU storage: safetensors refuses shared ones.
    tensors = {
        name: torch.clone(value.detach().cpu(), memory_format=torch.contiguous_format)
        for name, value in module.state_dict().items()
    }
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return file_sha256(target)


# --------------------------------------------------------------------------- steps


def _read_weights(spec: ModelSpec) -> bytes:
    try:
        return spec.weights.read_bytes()
    except FileNotFoundError:
        raise missing_weights_error(spec) from None
    except OSError as exc:
        raise spec.error("weights", f"file {spec.weights} cannot be read ({exc})") from exc


def _assemble(spec: ModelSpec, data: bytes, device: str) -> nn.Module:
    module = _instantiate(spec)
    _load_state(spec, module, _state_dict(spec, data))
    module.eval()
    try:
        return module.to(torch.device(device))
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise ModelError(
            f"{spec.source}: cannot move model {spec.name} to device {device!r}: {exc}"
        ) from exc


def _factory(spec: ModelSpec) -> Callable[..., Any]:
    if spec.is_import_path:
        return _import_factory(spec)
    try:
        models = importlib.import_module("pipeline.models")
    except ModuleNotFoundError as exc:
        if exc.name != "pipeline.models":
            raise
        raise ModelError(
            f"{spec.source}: architecture {spec.architecture} is a built-in name, but this "
            "installation has no built-in architectures (pipeline.models is missing); give an "
            "import path package.module:factory instead"
        ) from exc
    known: Mapping[str, Callable[..., Any]] = models.ARCHITECTURES
    if spec.architecture not in known:
        raise spec.error(
            "architecture",
            f"{spec.architecture!r} is not a built-in architecture "
            f"(known: {', '.join(sorted(known))}); for your own network give an import path "
            "package.module:factory",
        )
    return known[spec.architecture]


def _import_factory(spec: ModelSpec) -> Callable[..., Any]:
    module_name, _, attribute = spec.architecture.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # importing runs the user's code: any error is theirs to see
        raise spec.error(
            "architecture",
            f"{spec.architecture}: cannot import module {module_name} "
            f"({type(exc).__name__}: {exc}); is it installed on every worker?",
        ) from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise spec.error(
                "architecture", f"{spec.architecture}: {module_name} has no attribute {attribute}"
            ) from None
    if not callable(target):
        raise spec.error(
            "architecture",
            f"{spec.architecture}: {attribute} is a {type(target).__name__}, not a callable",
        )
    return target


def _instantiate(spec: ModelSpec) -> nn.Module:
    factory = _factory(spec)
    kwargs = spec.arguments.thaw()
    try:
        module = factory(**kwargs)
    except Exception as exc:  # the factory is user code: report any failure with context
        raise ModelError(
            f"{spec.source}: architecture {spec.architecture} failed with arguments {kwargs}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(module, nn.Module):
        raise ModelError(
            f"{spec.source}: architecture {spec.architecture} returned a "
            f"{type(module).__name__}, not a torch.nn.Module"
        )
    return module


def _state_dict(spec: ModelSpec, data: bytes) -> Mapping[str, torch.Tensor]:
    name = spec.weights.name
    if spec.weights.suffix.lower() == ".safetensors":
        try:
            return safetensors.torch.load(data)
        except safetensors.SafetensorError as exc:
            raise ModelError(
                f"{spec.source}: weights {name} is not a valid safetensors file ({exc})"
            ) from exc
    try:
        # weights_only=True: tensors and plain containers only, never arbitrary pickle.
        with warnings.catch_warnings():  # torch's advice on legacy files: not ours to print
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "WeightsUnpickler" not in str(exc):
            raise ModelError(
                f"{spec.source}: weights {name} is not a PyTorch file ({exc})"
            ) from exc
        raise ModelError(
            f"{spec.source}: weights {name} is not a plain state dict: "
            f"torch.load(weights_only=True) refuses it ({_unpickler_reason(exc)}). Pickled "
            "modules and other objects are never loaded; save module.state_dict() instead, "
            "or write .safetensors with pipeline.model.save_weights"
        ) from exc
    except (RuntimeError, EOFError, ValueError) as exc:
        raise ModelError(f"{spec.source}: weights {name} is not a PyTorch file ({exc})") from exc
    if not isinstance(state, Mapping):
        raise ModelError(
            f"{spec.source}: weights {name} holds a {type(state).__name__}, not a state dict "
            "(a mapping of parameter names to tensors)"
        )
    others = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise ModelError(
            f"{spec.source}: weights {name} is not a plain state dict: {len(others)} entries are "
            f"not tensors ({_few(others)}); if it is a training checkpoint, save its model's "
            "state_dict() on its own"
        )
    return state


def _unpickler_reason(exc: pickle.UnpicklingError) -> str:
    """The first sentence of torch's WeightsUnpickler complaint, without its allowlist advice."""
    for line in str(exc).splitlines():
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].split(". ", 1)[0].strip()
            return reason or "unsupported content"
    return "unsupported content"


def _load_state(spec: ModelSpec, module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"{spec.source}: weights {spec.weights.name} do not fit architecture "
            f"{spec.architecture}: {_mismatch(module, state) or exc}"
        ) from exc


def _mismatch(module: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} is {tuple(state[k].shape)}, the network needs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} with another shape ({_few(shapes)})")
    return "; ".join(parts)


def _few(items: list[str]) -> str:
    shown = ", ".join(items[:_FEW])
    return shown + (f", ... {len(items) - _FEW} more" if len(items) > _FEW else "")
