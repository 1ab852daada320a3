"""Models from specs: build the network, load its checked weights, keep one per process.

:func:`load_network` gives the :class:`~pipeline.networks.Network` of any spec: a torch
module (below) or an ONNX graph run by ONNX Runtime (:class:`~pipeline.networks.OnnxNetwork`,
from the same checked bytes); :func:`cached_network` keeps one per worker process.

The weights file is read once into memory, hashed and checked against the spec's
``sha256`` *before* anything is deserialised or any factory imported or called,
then loaded from those same bytes, so the weights used are exactly the weights
checked. The factory is the one :func:`pipeline.architectures.resolve_architecture`
allows: a built-in, one an installed package registers, or an import path only when
the caller trusts the spec's code (``trust_code``). ``.safetensors`` files and
PyTorch state dicts (``.pt``/``.pth``, read by torch's restricted unpickler, which
builds tensors and plain containers only) are accepted; pickled modules or other
objects are refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import pickle
import re
import tempfile
import threading
import types
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from pipeline.architectures import IMPORT_PATH_KIND, refuse_standard_library, resolve_architecture
from pipeline.errors import ModelError
from pipeline.modelspec import (
    ONNX,
    SCORES,
    ModelSpec,
    check_digest,
    file_sha256,
    load_spec,
    read_weights,
)
from pipeline.networks import (
    Network,
    OnnxNetwork,
    TorchNetwork,
    check_precision,
    check_signature,
    input_channels,
    spec_source,
)

_FEW = 5

# The one piece of global mutable state in the package: a per-process network cache,
# so a Dask worker loads each network once and keeps it for every task it runs. Keyed by
# (spec path, sha256 of the weights, device, threads, precision, channels_last, compile,
# trust); guarded by _NETWORKS_LOCK, which is held while a network loads, so threads of
# one worker never load twice.
_NETWORKS: dict[tuple[str, str, str, int, str, bool, bool, bool], tuple[ModelSpec, Network]] = {}
_NETWORKS_LOCK = threading.Lock()
#: ``compute.precision`` -> torch's autocast dtype (fp32: no autocast).
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_model(spec: ModelSpec, *, device: str = "cpu", trust_code: bool = False) -> nn.Module:
    """The network a spec describes, with its weights loaded (strict), in eval mode, on ``device``.

    Args:
        spec: The model spec.
        device: A torch device name.
        trust_code: The caller trusts the spec's code: an import path
            ``package.module:factory`` may be imported and called (never one into the
            standard library). Without it only built-in and registered architectures run.

    Raises:
        ModelSpecError: the weights file is missing or does not match ``spec.sha256``
            (checked before any factory is imported); the architecture is unknown, an
            import path without ``trust_code``, leads into the standard library, or
            does not resolve.
        ModelError: the factory fails, the weights are not a plain state dict, or they
            do not fit the network (missing, unexpected or mis-shaped tensors).
    """
    if spec.backend == ONNX:
        raise spec.error("weights", f"{spec.weights.name} is an ONNX graph, not a torch module; "
                                    "load it with pipeline.model.load_network")
    data = read_weights(spec)
    check_digest(spec, hashlib.sha256(data).hexdigest())
    return _assemble(spec, data, device, trust_code)


def load_network(spec: ModelSpec, *, device: str = "cpu", threads: int = 1,
                 precision: str = "fp32", channels_last: bool = False, compile: bool = False,
                 trust_code: bool = False) -> Network:
    """The network a spec describes, on ``device``, its signature checked against the spec.

    The weights file is read once and checked against ``spec.sha256`` before anything is
    built from those bytes. A torch spec gives a :class:`~pipeline.networks.TorchNetwork`
    (:func:`build_model`); an ONNX spec an :class:`~pipeline.networks.OnnxNetwork`.

    Args:
        spec: The model spec.
        device: ``cpu``, ``cuda`` or ``cuda:N`` (any torch device name for torch).
        threads: ONNX Runtime's intra-op threads (torch's are the process's).
        precision: ``fp32``, ``bf16`` or ``fp16``: torch's autocast dtype; an ONNX graph
            runs in the dtypes it was exported with and takes ``fp32`` only.
        channels_last, compile: torch only (ignored for ONNX): NHWC memory layout,
            :func:`torch.compile`.
        trust_code: As :func:`build_model`.

    Raises:
        ModelSpecError: as :func:`build_model`.
        ModelError: as :func:`build_model`; the network's channels or classes do not fit
            the spec (:func:`pipeline.networks.check_signature`); ONNX Runtime is missing,
            lacks the CUDA execution provider, or cannot load the graph; a precision
            other than fp32 for an ONNX graph.
    """
    data = read_weights(spec)
    check_digest(spec, hashlib.sha256(data).hexdigest())
    return _network(spec, data, device, threads, precision, channels_last, compile, trust_code)


def _network(spec: ModelSpec, data: bytes, device: str, threads: int, precision: str,
             channels_last: bool, compile: bool, trust_code: bool) -> Network:
    """The network from ``data``, which the caller has checked against the spec's sha256."""
    if precision not in _AUTOCAST:
        raise ValueError(f"precision must be one of {', '.join(_AUTOCAST)}, got {precision!r}")
    network: Network
    if spec.backend == ONNX:
        check_precision(spec, precision)
        network = OnnxNetwork(data, device=device, threads=threads, input_name=spec.onnx_input,
                              output_name=spec.onnx_output, output=spec.output,
                              source=spec_source(spec))
    else:
        module = _assemble(spec, data, device, trust_code)
        channels = input_channels(module, len(spec.bands))
        if channels_last:
            # Module.to takes memory_format at runtime; torch's overloads omit it
            module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if compile:
            # an OptimizedModule (an nn.Module), but typed as a plain callable
            module = torch.compile(module)  # type: ignore[assignment]
        network = TorchNetwork(module, autocast=_AUTOCAST[precision],
                               channels_last=channels_last, channels=channels,
                               output=spec.output or SCORES)
    check_signature(spec, network.signature)
    return network


def cached_network(spec_path: str, sha256: str, device: str, *, threads: int = 1,
                   precision: str = "fp32", channels_last: bool = False, compile: bool = False,
                   trust_code: bool = False) -> tuple[ModelSpec, Network]:
    """The spec and network for a task, loaded on first use in this process and kept.

    ``sha256`` is the weights' digest that the client computed while planning
    (:func:`pipeline.modelspec.verify_weights`); on first load the file is checked
    against it, so a worker never runs weights other than those planned. The spec is
    read once per key: edit a spec's YAML between runs in a fresh process. The lock is
    held while a network loads, so threads of one worker never load it twice.
    ``trust_code`` is the client's decision (it travels in the task's model reference).
    Other arguments and errors as :func:`load_network`.
    """
    key = (str(spec_path), sha256.strip().lower(), str(device), threads, precision,
           channels_last, compile, trust_code)
    with _NETWORKS_LOCK:
        entry = _NETWORKS.get(key)
        if entry is None:
            spec = load_spec(spec_path)
            data = _planned_weights(spec, key[1])
            network = _network(spec, data, device, threads, precision, channels_last, compile,
                               trust_code)
            entry = _NETWORKS[key] = (spec, network)
    return entry


def _planned_weights(spec: ModelSpec, planned: str) -> bytes:
    """The weights' bytes, checked against the spec and against the digest planned."""
    data = read_weights(spec)
    digest = hashlib.sha256(data).hexdigest()
    check_digest(spec, digest)
    if digest != planned:
        raise ModelError(
            f"{spec.source}: weights file {spec.weights} changed since the run was "
            f"planned: its sha256 is {digest}, the task expects {planned}; plan the run again"
        )
    return data


def clear_model_cache() -> None:
    """Forget every cached network of this process (tests, or to free device memory)."""
    with _NETWORKS_LOCK:
        _NETWORKS.clear()


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


def _assemble(spec: ModelSpec, data: bytes, device: str, trust_code: bool) -> nn.Module:
    """The network with the weights ``data``, which the caller has checked against the
    spec's sha256: only then is the factory imported and called."""
    module = _instantiate(spec, trust_code)
    _load_state(spec, module, _state_dict(spec, data))
    module.eval()
    try:
        return module.to(torch.device(device))
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise ModelError(
            f"{spec.source}: cannot move model {spec.name} to device {device!r}: {exc}"
        ) from exc


def _factory(spec: ModelSpec, trust_code: bool) -> Callable[..., Any]:
    """Import the factory the spec names, once :func:`resolve_architecture` allowed it."""
    architecture = resolve_architecture(spec, trust_code=trust_code)
    name = spec.architecture
    if architecture.kind != IMPORT_PATH_KIND:
        name = f"{name} ({architecture.target}, {architecture.origin})"
    try:
        target: Any = importlib.import_module(architecture.module)
    except Exception as exc:  # importing runs the package's code: any error is theirs to see
        raise spec.error(
            "architecture",
            f"{name}: cannot import module {architecture.module} "
            f"({type(exc).__name__}: {exc}); is it installed on every worker?",
        ) from exc
    for part in architecture.attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise spec.error(
                "architecture",
                f"{name}: {architecture.module} has no attribute {architecture.attribute}",
            ) from None
        # an attribute that leads back into the standard library (mypkg:os.system)
        origin = target.__name__ if isinstance(target, types.ModuleType) else \
            getattr(target, "__module__", None)
        if isinstance(origin, str):
            refuse_standard_library(spec, origin, f"({architecture.target})")
    if not callable(target):
        raise spec.error(
            "architecture",
            f"{name}: {architecture.attribute} is a {type(target).__name__}, not a callable",
        )
    return target


def _instantiate(spec: ModelSpec, trust_code: bool) -> nn.Module:
    factory = _factory(spec, trust_code)
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
        # torch's restricted unpickler: tensors and plain containers only, never objects.
        with warnings.catch_warnings():  # torch's advice on legacy files: not ours to print
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # Not chained: torch's text advises loading the file unrestricted, which runs it.
        raise ModelError(_pickle_refusal(spec, exc)) from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise ModelError(
            f"{spec.source}: weights {name} is not a PyTorch file ({_torch_reason(exc)})"
        ) from None
    if not isinstance(state, Mapping):
        raise ModelError(
            f"{spec.source}: weights {name} holds a {type(state).__name__}, not a state dict "
            f"(a mapping of parameter names to tensors); {_convert(spec)}"
        )
    others = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise ModelError(
            f"{spec.source}: weights {name} is not a plain state dict: {len(others)} entries are "
            f"not tensors ({_few(others)}); if it is a training checkpoint, {_convert(spec)}"
        )
    return state


def _convert(spec: ModelSpec) -> str:
    """What to do with weights that are not a plain state dict: one line of Python that
    writes safetensors from the model object where it was trained, unpickling nothing."""
    target = f"{spec.weights.stem}.safetensors"
    return (f"convert it where the model was trained: safetensors.torch.save_file("
            f"model.state_dict(), {target!r}), then set weights: {target} in the spec")


_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")


def _pickle_refusal(spec: ModelSpec, exc: pickle.UnpicklingError) -> str:
    """Why torch's restricted unpickler refused the weights, in our words only."""
    name = spec.weights.name
    found = _GLOBAL.search(str(exc))
    if found is None:
        return (f"{spec.source}: weights {name} is not a PyTorch state dict (its pickle cannot "
                f"be read as tensors and plain containers: damaged, or not one); {_convert(spec)}")
    return (f"{spec.source}: weights {name} is a pickle that refers to {found.group(1)} (a "
            "pickled module or other object, not a state dict of tensors); it is never "
            f"unpickled here, as unpickling can run any code: {_convert(spec)}")


def _torch_reason(exc: BaseException) -> str:
    """The first line of torch's complaint, unless it is advice on how to load the file
    unrestricted."""
    lines = str(exc).strip().splitlines()
    first = lines[0].strip() if lines else ""
    if not first or "weights_only" in first or "safe_globals" in first:
        return type(exc).__name__
    return first


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
