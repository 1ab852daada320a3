"""Networks as the prediction core runs them: one interface over each runtime (back end).

A :class:`Network` takes a batch of normalised windows, ``(N, C, H, W)`` float32 numpy,
and returns a torch tensor: class scores ``(N, K, H', W')`` or, for a network whose
graph already picks the class, labels ``(N, H', W')``. What it takes and gives is its
:class:`NetworkSignature`, known before any pixel runs. Back ends:

- ``torch``: a :class:`torch.nn.Module` (:class:`TorchNetwork`), with autocast and
  channels_last on the device it lives on.
- ``onnx``: an ONNX graph run by ONNX Runtime (:class:`OnnxNetwork`) on its CPU or CUDA
  execution provider; the graph's inputs and outputs give its signature
  (:func:`onnx_signature`), checked against the spec (:func:`check_signature`) before
  anything runs.

Importing this module loads neither torch nor ONNX Runtime nor onnx: each is imported
where it is used, so :mod:`pipeline.preflight` can check an ONNX graph before torch loads,
and an installation without the ``onnx`` extra runs torch models as before.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pipeline.errors import ModelError
from pipeline.modelspec import LABELS, ONNX, OUTPUTS, SCORES, ModelSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

#: What to install for each ONNX Runtime flavour.
ONNX_INSTALL = "pip install 'fcn-pipeline[onnx]'"
ONNX_CUDA_INSTALL = "pip install 'fcn-pipeline[onnx-cuda]'"
#: The largest fixed input window, px a side, a graph may declare: its receptive field is
#: probed on a few such windows in memory before the memory budget can be checked.
MAX_WINDOW = 4096
#: Input dtypes a network may take: the float32 windows are cast to them.
INPUT_DTYPES = ("float32", "float16", "float64")

# ONNX Runtime's tensor type names -> numpy dtype names (bfloat16 has none in numpy).
_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(bfloat16)": "bfloat16", "tensor(int8)": "int8", "tensor(int16)": "int16",
    "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16", "tensor(uint32)": "uint32", "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}
_CUDA = re.compile(r"cuda(?::(\d+))?")


@dataclass(frozen=True)
class NetworkSignature:
    """What a network takes and gives, read from it before any pixel runs.

    ``channels``: input channels (None when the network does not say);
    ``window``: the one input ``(rows, cols)`` in px it accepts, None when any size runs;
    ``output``: :data:`SCORES` or :data:`LABELS`; ``classes``: K of the scores when the
    network says it statically (None otherwise); ``input_name``/``output_name``: the
    graph's tensor names where the runtime has names; ``input_dtype``: numpy dtype name
    of what the network takes; ``batch``: the number of windows the graph runs at once
    when it fixes it (None: any; :meth:`Network.forward` still takes any ``N``).
    """

    backend: str
    channels: int | None
    window: tuple[int, int] | None
    output: str
    classes: int | None
    input_name: str | None = None
    output_name: str | None = None
    input_dtype: str = "float32"
    batch: int | None = None


class Network(Protocol):
    """A loaded network on one device; see the module docstring."""

    @property
    def signature(self) -> NetworkSignature: ...

    @property
    def device(self) -> str: ...

    def forward(self, batch: np.ndarray) -> torch.Tensor:
        """``(N, C, H, W)`` float32 -> scores ``(N, K, H', W')`` (a float dtype) or labels
        ``(N, H', W')`` (an integer dtype), on :attr:`device`."""
        ...


# --------------------------------------------------------------------------- torch


class TorchNetwork:
    """A torch module in eval mode as a :class:`Network`.

    ``autocast``: the dtype of torch's automatic mixed precision (None: off);
    ``channels_last``: batches are laid out NHWC in memory (faster convolutions on GPUs);
    ``channels``: the input channels, when known (:func:`input_channels`); ``output``:
    what the module returns, :data:`SCORES` or :data:`LABELS`.
    A batch is copied to the module's device through pinned memory on CUDA.
    """

    def __init__(self, module: nn.Module, *, autocast: torch.dtype | None = None,
                 channels_last: bool = False, channels: int | None = None,
                 output: str = SCORES) -> None:
        self.module = module
        self.autocast = autocast
        self.channels_last = channels_last
        self._device = _device_of(module)
        self._signature = NetworkSignature("torch", channels, None, output, None)

    @property
    def signature(self) -> NetworkSignature:
        return self._signature

    @property
    def device(self) -> str:
        return str(self._device)

    def forward(self, batch: np.ndarray) -> torch.Tensor:
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(batch))
        cuda = self._device.type == "cuda"
        if cuda:
            tensor = tensor.pin_memory()
        tensor = tensor.to(self._device, non_blocking=cuda)
        if self.channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(self._device.type, dtype=self.autocast,
                                  enabled=self.autocast is not None)
        with torch.inference_mode(), autocast:
            return self.module(tensor)


def _device_of(module: nn.Module) -> torch.device:
    import torch

    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


class _FirstConvolution(Exception):
    """Raised by a hook to stop a probing forward pass at the model's first convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.channels = channels


def input_channels(model: nn.Module, channels: int = 3) -> int | None:
    """The input channels of the first convolution ``model`` applies to its input, or None
    when it has none or it cannot be found without running the model on data.

    Found on the meta device (no pixel computed) by a forward pass on a
    ``(1, channels, 64, 64)`` input stopped at the first convolution called, so a model
    that cannot take ``channels`` still tells what it takes.
    """
    import torch
    from torch import nn
    from torch.func import functional_call

    convolutions = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convolutions:
        return None

    def stop(module: nn.Module, args: tuple[object, ...]) -> None:
        raise _FirstConvolution(int(module.in_channels))  # type: ignore[arg-type]  # a conv

    handles = [m.register_forward_pre_hook(stop) for m in convolutions]
    state = {k: v.to("meta") for k, v in model.state_dict(keep_vars=True).items()}
    x = torch.empty((1, channels, 64, 64), device="meta")
    try:
        with torch.no_grad():
            functional_call(model, state, (x,), strict=False)
    except _FirstConvolution as found:
        return found.channels
    except Exception:  # user models fail in many ways on meta tensors: then unknown
        return None
    finally:
        for handle in handles:
            handle.remove()
    return None


# --------------------------------------------------------------------------- ONNX Runtime


def _onnxruntime(source: str) -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ModelError(f"{source} is an ONNX graph, which needs ONNX Runtime: "
                         f"{ONNX_INSTALL}") from None
    return onnxruntime


def _providers(ort: Any, device: str, source: str) -> list[Any]:
    """ONNX Runtime's execution providers for a torch-style device name."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    found = _CUDA.fullmatch(device)
    if found is None:
        raise ModelError(f"{source}: device {device!r} is not one ONNX Runtime runs on; "
                         "use cpu, cuda or cuda:N")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ModelError(f"{source}: this ONNX Runtime ({ort.__version__}) has no CUDA "
                         f"execution provider for device {device}; {ONNX_CUDA_INSTALL} "
                         "(in place of onnxruntime)")
    # CPU after CUDA: the operators the CUDA provider lacks run on the CPU
    return [("CUDAExecutionProvider", {"device_id": int(found.group(1) or 0)}),
            "CPUExecutionProvider"]


def onnx_session(data: bytes, *, device: str = "cpu", threads: int = 1, optimize: bool = True,
                 source: str = "ONNX model") -> Any:
    """An ONNX Runtime ``InferenceSession`` of the graph ``data`` on ``device``.

    Args:
        data: The serialised ONNX model (the bytes the caller checked).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        threads: Intra-op threads (inter-op: 1).
        optimize: Apply ONNX Runtime's graph optimisations (off for a quick look at the
            graph's inputs and outputs).
        source: What error messages call the graph.

    Raises:
        ModelError: one line: ONNX Runtime is not installed, has no CUDA execution
            provider for a CUDA device (or could not start it), or cannot load ``data``.
    """
    ort = _onnxruntime(source)
    providers = _providers(ort, device, source)
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its warnings are not for our users
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(data, sess_options=options, providers=providers)
    except Exception as exc:  # ONNX Runtime's own exception types, one per failure
        raise ModelError(f"{source} cannot be loaded by ONNX Runtime {ort.__version__}: "
                         f"{_first_line(exc)}") from None
    if device != "cpu" and "CUDAExecutionProvider" not in session.get_providers():
        raise ModelError(f"{source}: ONNX Runtime could not start its CUDA execution provider "
                         f"on {device} (are the CUDA and cuDNN libraries it needs installed?)")
    return session


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


@dataclass(frozen=True)
class _Tensor:
    name: str
    dtype: str
    shape: tuple[int | str | None, ...] | None  # None: rank unknown

    @property
    def text(self) -> str:
        dims = "?" if self.shape is None else ", ".join(str(d) for d in self.shape)
        return f"{self.name} {self.dtype} ({dims})"


def _tensors(args: Sequence[Any]) -> list[_Tensor]:
    return [_Tensor(a.name, _ORT_DTYPES.get(a.type, a.type),
                    None if a.shape is None else tuple(a.shape)) for a in args]


def _static(dim: int | str | None) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _pick(found: list[_Tensor], name: str | None, what: str, source: str) -> _Tensor:
    names = ", ".join(t.text for t in found)
    if name is not None:
        for tensor in found:
            if tensor.name == name:
                return tensor
        raise ModelError(f"{source}: onnx.{what} {name!r} is not an {what} of the graph "
                         f"(its {what}s: {names})")
    if len(found) != 1:
        raise ModelError(f"{source}: the graph has {len(found)} {what}s ({names}); name the "
                         f"one to use in the spec: onnx: {{{what}: NAME}}")
    return found[0]


def onnx_signature(session: Any, *, input_name: str | None = None,
                   output_name: str | None = None, output: str | None = None,
                   source: str = "ONNX model") -> NetworkSignature:
    """What an ONNX graph takes and gives, from an ONNX Runtime session's inputs and outputs.

    The input must be float, of rank 4 ``(N, C, H, W)`` with a static ``C``; static ``H``
    and ``W`` fix the window (both, or neither), a static ``N`` the batch. The output is
    scores (rank 4, float; ``K`` when static) or labels (rank 3, integer; or rank 4
    integer with dim 1 of 1).

    Args:
        session: An ``onnxruntime.InferenceSession`` (:func:`onnx_session`).
        input_name: The input to feed (the spec's ``onnx.input``); None: the only one.
        output_name: The output to read (``onnx.output``); None: the only one.
        output: The declared layout (the spec's ``output``), checked against the graph
            where its output says; needed where it does not.
        source: What error messages call the graph.

    Raises:
        ModelError: one line naming the tensors: several inputs or outputs and no name
            picking one, a name the graph lacks, another input the graph needs, an input
            that is not a float ``(N, C, H, W)`` with a static ``C`` (and ``H``, ``W`` at
            most :data:`MAX_WINDOW` where static), an output neither
            layout fits or that contradicts ``output``.
    """
    inputs = _tensors(session.get_inputs())
    picked = _pick(inputs, input_name, "input", source)
    others = [t.text for t in inputs if t is not picked]
    if others:
        raise ModelError(f"{source}: the graph also needs the inputs {', '.join(others)}, and "
                         f"fcn-pipeline feeds only {picked.name}; export it with one input")
    shape = picked.shape
    if (shape is None or len(shape) != 4 or not picked.dtype.startswith(("float", "bfloat"))):
        raise ModelError(f"{source}: input {picked.text} is not a float batch of images "
                         "(N, C, H, W)")
    channels = _static(shape[1])
    if channels is None:
        raise ModelError(f"{source}: input {picked.text} does not fix its channels (dim 1); "
                         "export it with a static channel count")
    rows, cols = _static(shape[2]), _static(shape[3])
    if (rows is None) != (cols is None):
        raise ModelError(f"{source}: input {picked.text} fixes one spatial dim only; export "
                         "it with both H and W fixed, or both dynamic")
    window = (rows, cols) if rows is not None and cols is not None else None
    if window is not None and max(window) > MAX_WINDOW:
        raise ModelError(f"{source}: input {picked.text} fixes its windows to {cols}x{rows} px "
                         f"(width x height), more than the {MAX_WINDOW} px a side this tool "
                         "runs; export it with dynamic or smaller H and W")
    out = _pick(_tensors(session.get_outputs()), output_name, "output", source)
    layout, classes = _layout(out, output, source)
    return NetworkSignature("onnx", channels, window, layout, classes, picked.name, out.name,
                            picked.dtype, _static(shape[0]))


def _layout(out: _Tensor, declared: str | None, source: str) -> tuple[str, int | None]:
    """(layout, classes) of an output, checked against the declared layout."""
    shape = out.shape
    integer = out.dtype.startswith(("int", "uint"))
    floating = out.dtype.startswith(("float", "bfloat"))
    detected: str | None = None
    if shape is not None and len(shape) == 4 and floating:
        detected = SCORES
    elif shape is not None and integer and (
            len(shape) == 3 or (len(shape) == 4 and shape[1] == 1)):
        detected = LABELS
    elif shape is not None or not (integer or floating):
        raise ModelError(f"{source}: output {out.text} is neither class scores (N, K, H, W), "
                         "float, nor labels (N, H, W), integer")
    if declared is not None and detected is not None and declared != detected:
        raise ModelError(f"{source}: the spec declares output: {declared}, but the graph's "
                         f"output {out.text} holds {detected}; fix output in the spec")
    layout = detected or declared
    if layout is None:  # rank unknown: only the dtype speaks
        raise ModelError(f"{source}: output {out.text} has no known rank; declare what it "
                         f"holds in the spec: output: {' or '.join(OUTPUTS)}")
    if (layout == SCORES and not floating) or (layout == LABELS and not integer):
        raise ModelError(f"{source}: output {out.text} cannot hold {layout} "
                         f"({'float' if layout == SCORES else 'integer'} values)")
    classes = _static(shape[1]) if layout == SCORES and shape is not None else None
    return layout, classes


class OnnxNetwork:
    """An ONNX graph run by ONNX Runtime, as a :class:`Network`.

    Built from the model's bytes (those the caller checked against the spec's sha256;
    the file is not read again). ``device``: ``cpu`` (CPUExecutionProvider), ``cuda`` or
    ``cuda:N`` (CUDAExecutionProvider on device N, the CPU for the operators it lacks);
    ``threads``: ONNX Runtime's intra-op threads (inter-op: 1). The other arguments as
    :func:`onnx_signature`.

    :meth:`forward` returns tensors on the CPU whatever the device: ONNX Runtime hands
    back numpy arrays, wrapped without a copy by :func:`torch.from_numpy`; scores are
    float32, labels the graph's integer dtype.

    Raises:
        ModelError: as :func:`onnx_session` and :func:`onnx_signature`.
    """

    def __init__(self, data: bytes, *, device: str = "cpu", threads: int = 1,
                 input_name: str | None = None, output_name: str | None = None,
                 output: str | None = None, source: str = "ONNX model") -> None:
        self.session = onnx_session(data, device=device, threads=threads, source=source)
        self._device = device
        self._signature = onnx_signature(self.session, input_name=input_name,
                                         output_name=output_name, output=output, source=source)

    @property
    def signature(self) -> NetworkSignature:
        return self._signature

    @property
    def device(self) -> str:
        return self._device

    def forward(self, batch: np.ndarray) -> torch.Tensor:
        """``(N, C, H, W)`` float32 (cast to the graph's input dtype) -> scores
        ``(N, K, H', W')`` float32 or labels ``(N, H', W')`` integer, on the CPU.

        A graph that fixes its batch runs the windows that many at a time (the last
        group padded with zeros, whose outputs are dropped).
        """
        import torch

        sig = self._signature
        x = np.ascontiguousarray(batch, dtype=np.dtype(sig.input_dtype))
        size = sig.batch or len(x)
        parts = []
        for start in range(0, len(x), max(size, 1)):
            group = x[start:start + size]
            short = size - len(group)
            if short:
                group = np.concatenate([group, np.zeros((short, *group.shape[1:]), group.dtype)])
            y = self.session.run([sig.output_name], {sig.input_name: group})[0]
            parts.append(y[:len(y) - short])
        y = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if sig.output == LABELS and y.ndim == 4:
            y = y[:, 0]
        elif sig.output == SCORES:
            y = y.astype(np.float32, copy=False)
        return torch.from_numpy(np.ascontiguousarray(y))


def check_onnx(spec: ModelSpec, data: bytes) -> NetworkSignature:
    """The signature of a spec's ONNX graph (``data``: its checked bytes), checked against
    the spec (:func:`check_signature`); the graph is loaded on the CPU, unoptimised, and
    nothing runs. Cheap enough for checks before a run (no torch).

    Raises:
        ModelError: as :func:`onnx_session`, :func:`onnx_signature` and
            :func:`check_signature`.
    """
    source = spec_source(spec)
    session = onnx_session(data, optimize=False, source=source)
    signature = onnx_signature(session, input_name=spec.onnx_input,
                               output_name=spec.onnx_output, output=spec.output, source=source)
    check_signature(spec, signature)
    return signature


def spec_source(spec: ModelSpec) -> str:
    """How error messages name a spec's network: the spec file and its weights."""
    return f"{spec.source}: weights {spec.weights.name}"


def check_signature(spec: ModelSpec, signature: NetworkSignature) -> None:
    """Check that a network fits its spec: as many input channels as ``bands``, as many
    class scores as ``classes`` (where the network says), an input dtype the windows can
    be cast to.

    Raises:
        ModelError: one line naming the spec, the figures and the fix.
    """
    bands = len(spec.bands)
    if signature.channels is not None and signature.channels != bands:
        raise ModelError(
            f"{spec.source}: the model takes {signature.channels} input channels but bands "
            f"lists {bands} ({list(spec.bands)}); list {signature.channels} scene bands in bands")
    classes = len(spec.classes)
    if signature.output == SCORES and signature.classes is not None \
            and signature.classes != classes:
        raise ModelError(
            f"{spec.source}: the model gives {signature.classes} class scores but classes lists "
            f"{classes} ({', '.join(c.name for c in spec.classes)}); list {signature.classes} "
            "classes in classes")
    if signature.input_dtype not in INPUT_DTYPES:
        raise ModelError(
            f"{spec.source}: the model takes {signature.input_dtype} input, which fcn-pipeline "
            f"does not feed ({', '.join(INPUT_DTYPES)}); export it with a float32 input")


def check_precision(spec: ModelSpec, precision: str) -> None:
    """Check that ``compute.precision`` suits the spec's back end: an ONNX graph runs in
    the dtypes it was exported with, so it takes ``fp32`` (no autocast) only.

    Raises:
        ModelError: one line naming the spec and the setting.
    """
    if spec.backend == ONNX and precision != "fp32":
        raise ModelError(
            f"{spec.source}: compute.precision {precision} applies to PyTorch models; the ONNX "
            f"graph {spec.weights.name} runs in the dtypes it was exported with (export it in "
            "float16 for half precision): set precision fp32")


def onnx_memory(model_bytes: bytes, input_shape: tuple[int, int, int], batch: int = 1, *,
                input_name: str | None = None) -> tuple[int, int]:
    """An estimate of the memory an ONNX graph needs for one forward pass.

    onnx's shape inference runs on a copy of the graph whose input is fixed to
    ``(1, *input_shape)``; the activations are the largest inputs-plus-outputs of any
    node (weights aside) times ``batch``, as nodes run one after another; the weights
    are the initializers' bytes. It is an estimate: ONNX Runtime's arena, fused kernels
    and workspaces differ, and a tensor whose shape inference cannot resolve counts 0.

    Args:
        model_bytes: The serialised ONNX model.
        input_shape: ``(C, H, W)`` of one window, px.
        batch: Windows per forward pass.
        input_name: The graph input to fix (None: the only one that is not a weight).

    Returns:
        ``(activation_bytes, weight_bytes)``.

    Raises:
        ModelError: onnx is not installed, or cannot read ``model_bytes``.
    """
    try:
        import onnx
        from onnx import helper, shape_inference
    except ImportError:
        raise ModelError(f"an ONNX graph's memory estimate needs onnx: {ONNX_INSTALL}") from None
    try:
        model = onnx.load_from_string(model_bytes)
    except Exception as exc:  # protobuf's decode errors
        raise ModelError(f"not an ONNX graph onnx can read: {_first_line(exc)}") from None
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights
              and (input_name is None or i.name == input_name)]
    if len(inputs) != 1:
        raise ModelError(f"an ONNX graph with {len(inputs)} image inputs has no memory estimate")
    dims = inputs[0].type.tensor_type.shape.dim
    for dim, size in zip(dims, (1, *input_shape)):
        dim.ClearField("dim_param")
        dim.dim_value = size
    inferred = shape_inference.infer_shapes(model, data_prop=True).graph
    sizes: dict[str, int] = {}
    for info in (*inferred.input, *inferred.value_info, *inferred.output):
        tensor = info.type.tensor_type
        if not tensor.HasField("shape") or not tensor.elem_type:
            continue
        shape = [d.dim_value if d.HasField("dim_value") else 0 for d in tensor.shape.dim]
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize
        sizes[info.name] = math.prod(shape) * itemsize
    peak = max((sum(sizes.get(name, 0) for name in (*node.input, *node.output)
                    if name not in weights) for node in inferred.node), default=0)
    weight_bytes = sum(math.prod(t.dims) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                       for t in weights.values())
    return peak * batch, weight_bytes
