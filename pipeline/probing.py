"""Receptive field of an ONNX graph, found by probing the real runtime.

An ONNX graph cannot be traced like a torch module, so its field is measured
with ONNX Runtime (CPU execution provider) instead, in five steps:

1. **Stride** from output shapes: the real model on zeros at two input
   lengths (or at its fixed window).
2. **Extent** on a *probe copy* of the graph: Conv/ConvTranspose/Gemm/MatMul
   weights made 1, their biases 0, BatchNormalization the identity, float
   constants added to data 0 and multiplied 1, ``Sub``/``Mul``/``Div`` of two
   data tensors made ``Add``, ``Neg`` the identity, ``Clip`` unbounded above,
   and a label output (``ArgMax`` over channels) read as its scores. Every
   operation is then non-decreasing in its inputs and no sum can cancel, so a
   positive impulse on a zero image changes exactly the outputs that
   structurally depend on that pixel (from 0 to a positive value, or to
   infinity when the sums overflow float32; weights of 1 never underflow).
   One impulse at the centre of a 32, 64, ..., 1024 pixel square tells how far
   the field reaches. An output that changes at every pixel of two squares in
   a row, where the graph has an operation that mixes all positions (``GlobalAveragePool``,
   ``ReduceMean`` over spatial axes, ``InstanceNormalization``,
   ``GroupNormalization``, ``Softmax`` over a spatial axis, ``MatMul`` of
   reshaped data), or at the largest square, is global context:
   :class:`ModelAnalysisError`.
3. **Alignment** on the real model and a random image: ``align`` (per axis) is
   the smallest multiple of the stride, up to 64, for which shifting the input
   by ``align`` shifts the interior of the output by ``align / stride``.
4. **Length-dependent padding** on the real model: when appending ``d <
   align`` pixels to the input changes outputs far from its end, the padding
   depends on the input length (TensorFlow/Keras ``"same"`` padding: a stride-2
   layer pads one pixel more before an odd length than an even one). Windows
   of such a model reproduce the whole scene's output only when their length is
   congruent to the scene's modulo ``align``: :meth:`TileGrid.congruent` moves
   the inner window ends of a :class:`TileGrid` onto that grid
   (``size_dependent_padding``).
5. **Per-phase reach** on the probe copy: one impulse at each position of one
   ``align`` period; output cell ``j`` of phase ``j % (align / stride)``
   depends on the input pixels whose impulses changed it, translated back by
   whole periods. For a length-dependent model, measured at several lengths
   and its largest reach used for every phase.

Then the guarantee, a **cross-check** on the real model: a random scene of an
odd and of an even length per axis, cut into tiles of two sizes exactly as
:meth:`TileGrid.build` does (and :meth:`TileGrid.congruent` where needed), each
window run alone and cropped, equals the whole-scene output within
``1e-4 * max(1, max |output|)`` (labels: exactly). A model with a fixed input
window (static height and width) is probed inside that window, and its
cross-check compares windows at aligned offsets of a larger image on the cells
whose field both contain. A label output is probed and cross-checked through
the scores its ``ArgMax`` takes: labels follow them pixel by pixel, and
comparing labels alone would hide shifts that change no label.

Cost, for a model with stride ``s``, alignment ``a`` (both at most 64) and a
field reaching ``E`` pixels from a cell: 2 forward passes of one image for the
stride; one pass of 2 images per extent square tried (up to about ``4 E``
pixels a side); on images of about ``2 E + 192`` pixels a side, ``2 a / s``
passes for the alignment, at most ``2 log2 a + 2`` for the padding test and
``a`` images (in batches of 8; 5 times as many for a length-dependent model)
for the reach; then 2 whole scenes of about ``7 E + a`` pixels a side and
their windows (about 60 of about ``4 E`` pixels a side) for the cross-check.
The zoo's small networks take 0.1 to 0.4 s on one CPU core.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import ModelAnalysisError
from pipeline.grid import TileGrid
from pipeline.receptive import ReceptiveField, align_down, align_up

Pair = tuple[int, int]

MAX_ALIGN = 64
"""The largest alignment looked for, per axis, in input pixels."""

MAX_PROBE = 1024
"""The largest square the extent probe runs the probe copy on, in pixels."""

TOLERANCE = 1e-4
"""Tiled scores may differ from whole-scene scores by this much, times ``max(1, max |y|)``."""

_BATCH = 8
_GLOBAL_OPS = {
    "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "InstanceNormalization",
    "GroupNormalization",
}
_REDUCTIONS = {
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSumExp", "ReduceSumSquare",
}


@dataclass(frozen=True)
class ProbedField:
    """What probing an ONNX graph found.

    ``field`` is the receptive field in input pixels. ``size_dependent_padding``
    says that the graph pads according to the input length (TensorFlow "same"
    padding): every window's length must be congruent to the scene's modulo
    ``field.align`` (see :meth:`pipeline.grid.TileGrid.congruent`). ``window`` is the fixed
    input ``(rows, cols)`` of a graph with static spatial dims, else None.
    ``checked`` says in one line what the cross-check compared.
    """

    field: ReceptiveField
    size_dependent_padding: bool
    window: Pair | None
    checked: str


@dataclass(frozen=True)
class _Runner:
    """One ONNX Runtime session: ``(N, C, H, W)`` float32 in, ``(N, K, H', W')`` out."""

    session: Any
    input_name: str
    output_name: str
    channels: int

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        try:
            (out,) = self.session.run([self.output_name], {self.input_name: batch})
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelAnalysisError(
                f"the ONNX model does not run on an input of shape {batch.shape}: {exc}"
            ) from exc
        out = np.asarray(out)
        if out.ndim == 3:
            out = out[:, None]
        if out.ndim != 4 or out.shape[0] != batch.shape[0]:
            raise ModelAnalysisError(
                f"the ONNX model's output {self.output_name!r} has shape {out.shape} for an "
                f"input of {batch.shape}; expected (N, K, H, W) scores or (N, H, W) labels"
            )
        return out

    def batched(self, batch: np.ndarray) -> np.ndarray:
        return np.concatenate([self(batch[i:i + _BATCH]) for i in range(0, len(batch), _BATCH)])

    def image(self, shape: Pair, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).random((1, self.channels, *shape), dtype=np.float32)


def probe_onnx(model: bytes, *, input_name: str | None = None,
               output_name: str | None = None) -> ProbedField:
    """The receptive field of an ONNX dense-prediction model, probed and cross-checked.

    Args:
        model: The serialized ONNX model (``.onnx`` file bytes), one input
            ``(N, C, H, W)`` float32 and an output ``(N, K, H', W')`` of scores
            or ``(N, H', W')`` of labels, ``H' = H / stride``.
        input_name: The input to probe; default: the graph's only input.
        output_name: The output to probe; default: the graph's first output.

    Returns:
        A :class:`ProbedField`; see the module docstring for how it is found
        and what it costs.

    Raises:
        ModelAnalysisError: The bytes are not an ONNX model, the names are not
            in the graph, the model does not run on the probe sizes, has global
            context (the message names the kind and the nodes), is not
            translation-equivariant, or the cross-check found a tiled output
            that differs from the whole-scene output.
    """
    graph = _load(model)
    x_name, channels, window = _input(graph, input_name)
    y_name = output_name or graph.graph.output[0].name
    if y_name not in {o.name for o in graph.graph.output}:
        raise ModelAnalysisError(f"the ONNX model has no output {y_name!r}")
    scores = _scores_of_labels(graph, y_name)
    real_bytes = model if scores == y_name else _with_output(graph, scores).SerializeToString()
    real = _Runner(_session(real_bytes), x_name, scores, channels)
    copy = _Runner(_session(_with_output(_probe_copy(graph, x_name), scores).SerializeToString()),
                   x_name, scores, channels)
    stride = _stride(real, window)
    extent = _extent(copy, stride, window, _global_hints(graph, x_name))
    align = _align(real, stride, extent, window)
    margin = (extent[0] + align[0], extent[1] + align[1])
    dependent = window is None and _length_dependent(real, stride, align, margin)
    field = _field(copy, stride, align, extent, window, dependent)
    checked = (_check_window(real, field, window) if window is not None
               else _check_tiles(real, field, dependent))
    return ProbedField(field, dependent, window, checked)


def _load(model: bytes) -> Any:
    import onnx

    try:
        return onnx.load_model_from_string(model)
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors
        raise ModelAnalysisError(f"not an ONNX model: {exc}") from exc


def _session(model: bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelAnalysisError(f"ONNX Runtime cannot load the model: {exc}") from exc


def _input(graph: Any, name: str | None) -> tuple[str, int, Pair | None]:
    """The probed input's name, channel count and fixed ``(H, W)`` (None when dynamic)."""
    initializers = {t.name for t in graph.graph.initializer}
    inputs = [i for i in graph.graph.input if i.name not in initializers]
    if name is None:
        if len(inputs) != 1:
            raise ModelAnalysisError(
                f"the ONNX model has {len(inputs)} inputs; name the image input")
        chosen = inputs[0]
    else:
        found = [i for i in inputs if i.name == name]
        if not found:
            raise ModelAnalysisError(f"the ONNX model has no input {name!r}")
        chosen = found[0]
    dims = chosen.type.tensor_type.shape.dim
    if len(dims) != 4 or not dims[1].HasField("dim_value"):
        raise ModelAnalysisError(
            f"input {chosen.name!r} must be (N, C, H, W) with a fixed channel count")
    spatial = [d.dim_value if d.HasField("dim_value") else None for d in dims[2:]]
    if spatial[0] is not None and spatial[1] is not None:
        return chosen.name, dims[1].dim_value, (spatial[0], spatial[1])
    if spatial[0] is not None or spatial[1] is not None:
        raise ModelAnalysisError(f"input {chosen.name!r} fixes one spatial dim but not the other")
    return chosen.name, dims[1].dim_value, None


def _constants(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    for node in graph.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _data_flow(graph: Any, source: str) -> set[str]:
    """Tensors whose values depend on the values of ``source`` (not only on its shape)."""
    data = {source}
    for node in graph.graph.node:
        if node.op_type in ("Shape", "Size"):
            continue
        if any(i in data for i in node.input):
            data.update(node.output)
    return data


def _probe_copy(graph: Any, x_name: str) -> Any:
    """The probe copy described in the module docstring."""
    import onnx
    from onnx import numpy_helper

    copy = onnx.ModelProto()
    copy.CopyFrom(graph)
    constants = _constants(copy)
    data = _data_flow(copy, x_name)
    added: list[Any] = []
    nodes: list[Any] = []

    def set_input(node: Any, index: int, value: float) -> None:
        if index >= len(node.input) or node.input[index] not in constants:
            return
        old = constants[node.input[index]]
        if old.dtype.kind != "f":
            return
        name = f"{node.input[index]}__probe{len(added)}"
        added.append(numpy_helper.from_array(np.full(old.shape, value, old.dtype), name))
        node.input[index] = name

    for node in copy.graph.node:
        op = node.op_type
        nodes.append(node)
        if op in ("Conv", "ConvTranspose", "Gemm"):
            set_input(node, 1, 1.0)
            set_input(node, 2, 0.0)
        elif op == "BatchNormalization":
            for index, value in ((1, 1.0), (2, 0.0), (3, 0.0), (4, 1.0)):
                set_input(node, index, value)
        elif op == "MatMul":
            set_input(node, 0, 1.0)
            set_input(node, 1, 1.0)
        elif op in ("Add", "Sub", "Mul", "Div") and any(i in data for i in node.input):
            if all(i in data for i in node.input[:2]):
                node.op_type = "Add"
            else:
                neutral = 0.0 if op in ("Add", "Sub") else 1.0
                set_input(node, 0, neutral)
                set_input(node, 1, neutral)
        elif op in ("InstanceNormalization", "GroupNormalization"):
            nodes[-1:] = _mean_plus(node)
        elif op == "Neg":
            node.op_type = "Identity"
        elif op == "Clip" and len(node.input) > 2:
            node.input[2] = ""
        elif op == "Clip":
            kept = [a for a in node.attribute if a.name != "max"]
            del node.attribute[:]
            node.attribute.extend(kept)
    copy.graph.initializer.extend(added)
    kept = [type(n)() for n in nodes]
    for new, old in zip(kept, nodes):
        new.CopyFrom(old)
    del copy.graph.node[:]
    copy.graph.node.extend(kept)
    return copy


def _with_output(graph: Any, name: str) -> Any:
    """``graph``, or a copy of it that also outputs the float tensor ``name``."""
    import onnx
    from onnx import helper

    if name in {o.name for o in graph.graph.output}:
        return graph
    copy = onnx.ModelProto()
    copy.CopyFrom(graph)
    copy.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return copy


def _mean_plus(node: Any) -> list[Any]:
    """``x + mean over space of x`` for a spatial normalisation ``node``: monotone, and every
    output still depends on every input position."""
    from onnx import helper

    x, y = node.input[0], node.output[0]
    mean = f"{y}__probe_mean"
    return [helper.make_node("GlobalAveragePool", [x], [mean]),
            helper.make_node("Add", [x, mean], [y], name=node.name)]


def _scores_of_labels(graph: Any, y_name: str) -> str:
    """The scores an ``ArgMax`` over channels (then casts) turns into ``y_name``; else it."""
    producers = {o: n for n in graph.graph.node for o in n.output}
    name = y_name
    while name in producers and producers[name].op_type in ("Cast", "Identity", "Squeeze",
                                                            "Unsqueeze"):
        name = producers[name].input[0]
    node = producers.get(name)
    if node is not None and node.op_type == "ArgMax":
        return str(node.input[0])
    return y_name


def _global_hints(graph: Any, x_name: str) -> list[str]:
    """Nodes whose operation mixes all spatial positions, as ``"OpType 'name'"``."""
    constants = _constants(graph)
    data = _data_flow(graph, x_name)
    producers = {o: n.op_type for n in graph.graph.node for o in n.output}
    hints = []
    for node in graph.graph.node:
        op = node.op_type
        attrs = {a.name: a for a in node.attribute}
        label = f"{op} {node.name!r}"
        if op in _GLOBAL_OPS:
            hints.append(label)
        elif op in _REDUCTIONS:
            axes = list(attrs["axes"].ints) if "axes" in attrs else (
                list(constants[node.input[1]].ravel()) if len(node.input) > 1
                and node.input[1] in constants else [])
            if not axes or any(a not in (0, 1) for a in axes):
                hints.append(f"{label} over axes {axes or 'all'}")
        elif op in ("Softmax", "LogSoftmax"):
            axis = attrs["axis"].i if "axis" in attrs else -1
            if axis not in (1, -3):
                hints.append(f"{label} over axis {axis}")
        elif op == "MatMul" and all(i in data for i in node.input) and any(
                producers.get(i) in ("Reshape", "Flatten", "Transpose") for i in node.input):
            hints.append(f"{label} after Reshape")
    return hints


def _stride(real: _Runner, window: Pair | None) -> Pair:
    """Input pixels per output cell, per axis, from output shapes."""
    sizes = [window] if window else [(128, 128), (256, 256)]
    outs = [real(np.zeros((1, real.channels, *s), np.float32)).shape[2:] for s in sizes]
    stride = []
    for k in (0, 1):
        grow_in = sizes[-1][k] - (0 if window else sizes[0][k])
        grow_out = outs[-1][k] - (0 if window else outs[0][k])
        if grow_out < 1 or grow_in % grow_out:
            raise ModelAnalysisError(
                f"the ONNX model's output does not scale as the input over a whole stride: "
                f"{sizes} pixels give {outs} cells (the output must be at the input's "
                "resolution or an integer stride coarser)")
        stride.append(grow_in // grow_out)
    for k in (0, 1):
        if outs[0][k] * stride[k] != sizes[0][k]:
            raise ModelAnalysisError(
                f"the ONNX model gives {tuple(outs[0])} cells for a {sizes[0]} px input at "
                f"stride {tuple(stride)}: its output does not cover the input (unpadded "
                "convolutions crop the borders?); pad in the model so that every pixel gets "
                "an output")
    return stride[0], stride[1]


def _changed(runner: _Runner, batch: np.ndarray) -> np.ndarray:
    """``(N, H', W')`` True where the output of each impulse image differs from a zero image's."""
    outs = runner.batched(np.concatenate([np.zeros_like(batch[:1]), batch]))
    base, hit = outs[:1], outs[1:]
    if not np.isfinite(base).all():
        raise ModelAnalysisError(
            "the ONNX model's probe copy gives non-finite outputs on a zero image (a log or "
            "division of the input?), so its receptive field cannot be probed; declare a halo")
    return (hit != base).any(axis=1)


def _extent(copy: _Runner, stride: Pair, window: Pair | None, hints: list[str]) -> Pair:
    """How far, in input pixels, an impulse changes outputs, per axis."""
    sizes = [window] if window else [(s, s) for s in (32, 64, 128, 256, 512, MAX_PROBE)]
    everywhere = False
    for size in sizes:
        at = (size[0] // 2, size[1] // 2)
        impulse = np.zeros((1, copy.channels, *size), np.float32)
        impulse[0, :, at[0], at[1]] = 1.0
        changed = _changed(copy, impulse)[0]
        rows, cols = np.nonzero(changed.any(1))[0], np.nonzero(changed.any(0))[0]
        if len(rows) == 0:
            raise ModelAnalysisError(
                "the ONNX model's output does not depend on its input (a constant output?)")
        if changed.all() and ((hints and everywhere) or window or size == sizes[-1]):
            _refuse_global(stride, at, size, hints)
        everywhere = bool(changed.all())
        inside = rows[0] > 0 and cols[0] > 0 and rows[-1] < changed.shape[0] - 1 and (
            cols[-1] < changed.shape[1] - 1)
        if inside:
            return (max(at[0] - int(rows[0]) * stride[0], (int(rows[-1]) + 1) * stride[0] - at[0]),
                    max(at[1] - int(cols[0]) * stride[1], (int(cols[-1]) + 1) * stride[1] - at[1]))
        if window is not None:
            raise ModelAnalysisError(
                f"the receptive field of the ONNX model does not fit in its fixed input window "
                f"{window[0]}x{window[1]}: an impulse at its centre changes outputs at its edges; "
                "declare a halo")
    raise ModelAnalysisError(
        f"the receptive field of the ONNX model reaches more than {MAX_PROBE // 2} pixels; "
        "declare a halo")


def _refuse_global(stride: Pair, at: Pair, size: Pair, hints: list[str]) -> None:
    nodes = f" (nodes: {', '.join(hints[:4])})" if hints else ""
    raise ModelAnalysisError(
        f"global context: output at (0, 0) changes when input pixel {at} of a "
        f"{size[0]}x{size[1]} input changes, {at[0]} rows and {at[1]} columns away (squeeze-and-"
        f"excitation, GroupNorm/InstanceNorm, attention or global pooling?){nodes}; declare a "
        "halo to run it approximately")


def _close(a: np.ndarray, b: np.ndarray) -> tuple[bool, float]:
    """Whether ``a`` equals ``b`` within the tolerance, and their largest difference."""
    if a.shape != b.shape:
        return False, math.inf
    if a.size == 0:
        return True, 0.0
    if a.dtype.kind != "f":
        return bool((a == b).all()), float((a != b).sum())
    diff = float(np.abs(a.astype(np.float64) - b).max())
    scale = max(1.0, float(np.abs(b).max()))
    return diff <= TOLERANCE * scale, diff


def _interior(n_out: int, stride: int, margin: int) -> slice:
    lo = -(-margin // stride)
    return slice(lo, max(lo, n_out - lo))


def _shifted(real: _Runner, axis: int, shift: int, size: Pair) -> tuple[np.ndarray, np.ndarray]:
    grown = (size[0] + shift * (axis == 0), size[1] + shift * (axis == 1))
    image = real.image(grown, seed=11)
    first = real(image[:, :, :size[0], :size[1]])
    second = real(np.ascontiguousarray(image[:, :, -size[0]:, -size[1]:]))
    return first, second


def _align(real: _Runner, stride: Pair, extent: Pair, window: Pair | None) -> Pair:
    """The smallest input shift, per axis, that shifts the output by whole cells.

    Compared on the cells whose field lies inside both inputs: at most
    ``extent + shift`` pixels from any cell, when ``shift`` is the alignment.
    """
    size = window or (align_up(2 * extent[0] + 3 * MAX_ALIGN, 64),
                      align_up(2 * extent[1] + 3 * MAX_ALIGN, 64))
    align = []
    for k in (0, 1):
        for shift in range(stride[k], MAX_ALIGN + 1, stride[k]):
            first, second = _shifted(real, k, shift, size)
            margin = (extent[0] + shift, extent[1] + shift)
            cut = [_interior(first.shape[2 + j], stride[j], margin[j]) for j in (0, 1)]
            moved = list(cut)
            moved[k] = slice(cut[k].start - shift // stride[k], cut[k].stop - shift // stride[k])
            if min(c.stop - c.start for c in cut) < 1:
                break
            if _close(second[:, :, moved[0], moved[1]], first[:, :, cut[0], cut[1]])[0]:
                align.append(shift)
                break
        if len(align) == k:
            raise ModelAnalysisError(
                f"shifting the input by up to {shift} pixels along axis {k} never shifts the "
                "ONNX model's output alike: it is not translation-equivariant (positional "
                "encodings or coordinates?), or its field does not fit its fixed window twice; "
                "declare a halo")
    return align[0], align[1]


def _length_dependent(real: _Runner, stride: Pair, align: Pair, margin: Pair) -> bool:
    """Whether appending fewer than ``align`` pixels changes outputs far from the end."""
    size = (align_up(2 * margin[0] + 64, 64), align_up(2 * margin[1] + 64, 64))
    image = real.image((size[0] + max(align), size[1] + max(align)), seed=12)
    whole = real(image[:, :, :size[0], :size[1]])
    cut = [_interior(whole.shape[2 + k], stride[k], margin[k]) for k in (0, 1)]
    steps = sorted({d for k in (0, 1) for d in (*_powers(align[k]), align[k] - 1) if d > 0})
    for d in steps:
        longer = real(np.ascontiguousarray(image[:, :, :size[0] + d, :size[1] + d]))
        if not _close(longer[:, :, cut[0], cut[1]], whole[:, :, cut[0], cut[1]])[0]:
            return True
    return False


def _powers(limit: int) -> Iterable[int]:
    d = 1
    while d < limit:
        yield d
        d *= 2


def _field(copy: _Runner, stride: Pair, align: Pair, extent: Pair, window: Pair | None,
           dependent: bool) -> ReceptiveField:
    """Size, offset and per-phase reach from impulses at every phase of one ``align`` period."""
    if window is None:
        start = (align_up(extent[0] + align[0], align[0]), align_up(extent[1] + align[1], align[1]))
        base = (start[0] + 2 * align[0] + extent[0], start[1] + 2 * align[1] + extent[1])
    else:
        start = (align_down((window[0] - align[0]) // 2, align[0]),
                 align_down((window[1] - align[1]) // 2, align[1]))
        base = window
        if min(start[k] - extent[k] for k in (0, 1)) < 0 or min(
                window[k] - start[k] - align[k] - extent[k] for k in (0, 1)) < 0:
            raise ModelAnalysisError(
                f"the fixed input window {window[0]}x{window[1]} of the ONNX model is too small "
                f"to probe a field reaching {extent} pixels at every phase of {align}")
    grows = [(0, 0)]
    if dependent:
        grows = [(r * align[0] // 4, r * align[1] // 4) for r in range(4)] + [(1, 1)]
    found: list[list[list[int]]] = [[], []]
    count = max(align)
    for grow in sorted(set(grows)):
        size = (base[0] + grow[0], base[1] + grow[1])
        batch = np.zeros((count, copy.channels, *size), np.float32)
        for i in range(count):
            batch[i, :, start[0] + i % align[0], start[1] + i % align[1]] = 1.0
        changed = _changed(copy, batch)
        for i in range(count):
            for k in (0, 1):
                cells = np.nonzero(changed[i].any(1 - k))[0]
                found[k].append(_normalised(cells, start[k] + i % align[k], stride[k], align[k]))
    axes = [_axis(found[k], stride[k], align[k], dependent) for k in (0, 1)]
    return ReceptiveField(
        size=(axes[0][0], axes[1][0]), stride=stride, offset=(axes[0][1], axes[1][1]),
        align=align, reach=(axes[0][2], axes[1][2]))


def _normalised(cells: np.ndarray, pixel: int, stride: int, align: int) -> list[int]:
    """``(phase, pixel)`` pairs, flattened: each changed cell moved to the first period."""
    phases = align // stride
    out = []
    for j in cells.tolist():
        out += [j % phases, pixel - (j // phases) * align]
    return out


def _axis(found: list[list[int]], stride: int, align: int,
          dependent: bool) -> tuple[int, int, tuple[tuple[int, int], ...]]:
    phases = align // stride
    lo: dict[int, int] = {}
    hi: dict[int, int] = {}
    for pairs in found:
        for phase, pixel in zip(pairs[::2], pairs[1::2]):
            lo[phase] = min(lo.get(phase, pixel), pixel)
            hi[phase] = max(hi.get(phase, pixel), pixel)
    if not lo:
        raise ModelAnalysisError("no output of the ONNX model depends on a probed pixel")
    reach = [(max(0, p * stride - lo[p]), max(0, hi[p] + 1 - (p + 1) * stride)) if p in lo
             else (0, 0) for p in range(phases)]
    if dependent or len(set(reach)) == 1:
        reach = [(max(b for b, _ in reach), max(a for _, a in reach))]
    first = min(lo[p] - p * stride for p in lo)
    last = max(hi[p] - p * stride for p in hi)
    if dependent:
        first = min(first, -reach[0][0])
        last = max(last, stride - 1 + reach[0][1])
    return last - first + 1, first, tuple(reach)


def _check_tiles(real: _Runner, field: ReceptiveField, dependent: bool) -> str:
    """Tiled equals whole on scenes of odd and even lengths, or ModelAnalysisError."""
    halo = field.halo()
    tile = [align_up(max(16, halo.before[k] + halo.after[k]), field.align[k]) for k in (0, 1)]
    n = [3 * tile[k] + halo.before[k] + field.align[k] + 1 for k in (0, 1)]
    scenes = [(n[0] | 1, n[1] + (n[1] & 1)), (n[0] + (n[0] & 1), n[1] | 1)]
    tiles = [(tile[0], tile[1]), (tile[0] + field.stride[0], tile[1] + field.stride[1])]
    worst, windows = 0.0, 0
    for seed, scene in enumerate(scenes):
        image = real.image(scene, seed=20 + seed)
        whole = real(image)[0]
        for size in tiles:
            grid = TileGrid.build(scene, whole.shape[1:], field, size)
            if dependent:
                grid = grid.congruent()
            for cell in grid:
                rows, cols = cell.window.slices()
                out = real(np.ascontiguousarray(image[:, :, rows, cols]))[0]
                crop_rows, crop_cols = cell.crop.slices()
                core_rows, core_cols = cell.core.slices()
                ok, diff = _close(out[:, crop_rows, crop_cols], whole[:, core_rows, core_cols])
                windows += 1
                worst = max(worst, diff)
                if not ok:
                    raise ModelAnalysisError(
                        f"cross-check failed: on a {scene[0]}x{scene[1]} scene with tiles of "
                        f"{size}, the window {cell.window.origin}+{cell.window.shape} gives "
                        f"outputs that differ from the whole scene's by {diff:.3g} on core "
                        f"{cell.core.origin}+{cell.core.shape}; the probed field {field} is "
                        "wrong for this model (data-dependent shapes or values?); declare a halo")
    return (f"tiled == whole (max abs difference {worst:.2g}) on scenes "
            f"{' and '.join(f'{r}x{c}' for r, c in scenes)}, tiles {tiles[0]} and {tiles[1]}, "
            f"{windows} windows")


def _check_window(real: _Runner, field: ReceptiveField, window: Pair) -> str:
    """Windows at aligned offsets agree on the cells whose field both contain."""
    need = field.required_halo()
    image = real.image((window[0] + 3 * field.align[0], window[1] + 3 * field.align[1]), seed=30)
    ref = real(np.ascontiguousarray(image[:, :, :window[0], :window[1]]))[0]
    offsets = [(field.align[0], 0), (0, field.align[1]),
               (3 * field.align[0], 2 * field.align[1])]
    worst, cells = 0.0, 0
    for off in offsets:
        out = real(np.ascontiguousarray(
            image[:, :, off[0]:off[0] + window[0], off[1]:off[1] + window[1]]))[0]
        spans = []
        for k in (0, 1):
            s = field.stride[k]
            lo = -(-(off[k] + need.before[k]) // s)
            hi = (window[k] - need.after[k]) // s
            spans.append((lo, hi, off[k] // s))
        if any(lo >= hi for lo, hi, _ in spans):
            raise ModelAnalysisError(
                f"the fixed window {window[0]}x{window[1]} leaves no output cell whose field "
                f"(halo {need}) lies inside two windows {field.align} apart")
        (r0, r1, dr), (c0, c1, dc) = spans
        ok, diff = _close(out[:, r0 - dr:r1 - dr, c0 - dc:c1 - dc], ref[:, r0:r1, c0:c1])
        worst, cells = max(worst, diff), cells + (r1 - r0) * (c1 - c0)
        if not ok:
            raise ModelAnalysisError(
                f"cross-check failed: fixed windows {off} pixels apart differ by {diff:.3g} on "
                f"the cells whose probed field {field} both contain; declare a halo")
    return (f"fixed {window[0]}x{window[1]} windows at offsets {offsets} agree with the window "
            f"at (0, 0) on {cells} shared cells (max abs difference {worst:.2g})")
