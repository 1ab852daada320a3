"""Receptive-field analysis of a torch module, by tracing its graph with torch.fx.

Every tensor in the traced graph gets, per axis, an affine dependency
interval: element ``q`` depends at most on input pixels in
``[lo + q * stride, hi + q * stride]`` (exact fractions, so transposed
convolutions and upsampling give fractional strides). Each operation maps its
output index ``o`` to input indices ``[c + o * t, e + o * t]``; composing that
with the input's interval gives the output's. Branches merge by taking the
hull, so skips (FCN-16s/8s) and concatenations (U-Net) are covered.

The result is conservative: an output pixel never depends on a pixel outside
the reported field. :func:`probe_receptive_field` measures the true support
empirically, to cross-check.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from pipeline.errors import ModelAnalysisError
from pipeline.receptive import ReceptiveField

Step = tuple[Fraction, Fraction, Fraction]
Steps = tuple[Step, Step]


@dataclass(frozen=True)
class _Tensor:
    """A spatial tensor of the graph: its stride and what it is computed from.

    ``deps`` lists ``(node, steps)``: per axis, output index ``o`` of this
    tensor reads indices ``[c + o*t, e + o*t]`` of ``node``.
    """

    stride: tuple[Fraction, Fraction]
    deps: tuple[tuple[fx.Node | None, Steps], ...]


class _Scalar:
    """A traced value that is not a spatial tensor (a size, a constant)."""


_SCALAR = _Scalar()
_IDENTITY: Steps = ((Fraction(0), Fraction(0), Fraction(1)),) * 2

_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.LocalResponseNorm,
    nn.Softmax2d, nn.BatchNorm2d,
)
_ELEMENTWISE_FUNCTIONS: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.sigmoid, torch.tanh,
    torch.clamp, torch.exp, torch.log, F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu,
    F.sigmoid, F.tanh, F.hardswish, F.dropout, F.dropout2d, F.mish,
}
_ELEMENTWISE_METHODS = {
    "relu", "sigmoid", "tanh", "contiguous", "float", "double", "half", "to", "clone",
    "detach", "add", "sub", "mul", "div", "clamp", "exp", "neg", "type_as",
}
_CHANNEL_REDUCTIONS = {"softmax", "log_softmax", "argmax", "amax", "mean", "sum", "max"}


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[1]))
    return (int(value), int(value))


def _window_step(kernel: int, stride: int, padding: int, dilation: int) -> Step:
    return (Fraction(-padding), Fraction(-padding + dilation * (kernel - 1)), Fraction(stride))


def _conv_like(kernel: Any, stride: Any, padding: Any, dilation: Any = 1) -> tuple[Step, Step]:
    k, s, p, d = _pair(kernel), _pair(stride), _pair(padding), _pair(dilation)
    return (_window_step(k[0], s[0], p[0], d[0]), _window_step(k[1], s[1], p[1], d[1]))


def _conv_padding(conv: nn.Conv2d, name: str) -> tuple[int, int]:
    if conv.padding_mode == "circular":
        raise ModelAnalysisError(
            f"module '{name}' ({type(conv).__name__}) pads circularly: edges wrap around the "
            "scene, so no finite halo is exact"
        )
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        k, d = conv.kernel_size, conv.dilation
        return (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
    return _pair(conv.padding)


def _transposed_step(kernel: int, stride: int, padding: int, dilation: int) -> Step:
    return (
        Fraction(padding - dilation * (kernel - 1), stride),
        Fraction(padding, stride),
        Fraction(1, stride),
    )


def _upsample_steps(scale: Any, mode: str, align_corners: Any, where: str) -> tuple[Step, Step]:
    if align_corners:
        raise ModelAnalysisError(
            f"{where} interpolates with align_corners=True, whose sampling grid depends on the "
            "input size; use align_corners=False"
        )
    if scale is None:
        raise ModelAnalysisError(
            f"{where} resizes to a fixed size, which depends on the input size; "
            "use an integer scale_factor"
        )
    factors = scale if isinstance(scale, (tuple, list)) else (scale, scale)
    steps = []
    for f in factors:
        if float(f) != int(f) or int(f) < 1:
            raise ModelAnalysisError(
                f"{where} has scale factor {f}; only integer factors are exact"
            )
        sf = int(f)
        if mode == "nearest":
            steps.append((Fraction(-(sf - 1), sf), Fraction(0), Fraction(1, sf)))
        elif mode in ("bilinear", "linear", "nearest-exact", "bicubic"):
            reach = 2 if mode == "bicubic" else 1
            centre = Fraction(1, 2 * sf) - Fraction(1, 2)
            steps.append((centre - reach, centre + reach, Fraction(1, sf)))
        else:
            raise ModelAnalysisError(
                f"{where} uses interpolation mode {mode!r}, which is not supported"
            )
    return steps[0], steps[1]


def _pad_steps(pad: Any, mode: str, where: str) -> tuple[Step, Step]:
    if mode == "circular":
        raise ModelAnalysisError(f"{where} pads circularly, so scene edges wrap around")
    pad = list(pad) + [0] * (4 - len(pad))
    if not all(isinstance(p, int) for p in pad):
        raise ModelAnalysisError(
            f"{where} pads by amounts computed from the input's size (TensorFlow-style "
            "\"same\" padding), which differ between a window and the whole scene; export "
            "the model to ONNX, whose receptive field is probed on the runtime, or pad by "
            "constants")
    left, top = int(pad[0]), int(pad[2])
    return ((Fraction(-top), Fraction(-top), Fraction(1)),
            (Fraction(-left), Fraction(-left), Fraction(1)))


def _module_steps(module: nn.Module, name: str) -> tuple[Step, Step] | None:
    """Per-axis steps of a leaf module, ``None`` for element-wise modules."""
    where = f"module '{name}' ({type(module).__name__})"
    if isinstance(module, nn.BatchNorm2d) and module.training:
        raise ModelAnalysisError(
            f"{where} is in training mode and normalises over the whole batch and image; "
            "call model.eval() first"
        )
    if isinstance(module, _ELEMENTWISE_MODULES):
        return None
    if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
        if module.dim not in (1, -3):
            raise ModelAnalysisError(f"{where} normalises over dim {module.dim}, not the channels")
        return None
    if isinstance(module, nn.Conv2d):
        return _conv_like(module.kernel_size, module.stride, _conv_padding(module, name),
                          module.dilation)
    if isinstance(module, nn.ConvTranspose2d):
        k, s, p, d = (_pair(v) for v in (module.kernel_size, module.stride, module.padding,
                                          module.dilation))
        return (_transposed_step(k[0], s[0], p[0], d[0]), _transposed_step(k[1], s[1], p[1], d[1]))
    if isinstance(module, nn.MaxPool2d):
        return _conv_like(module.kernel_size, module.stride or module.kernel_size, module.padding,
                          module.dilation)
    if isinstance(module, nn.AvgPool2d):
        return _conv_like(module.kernel_size, module.stride or module.kernel_size, module.padding)
    if isinstance(module, nn.Upsample):
        return _upsample_steps(module.scale_factor, module.mode, module.align_corners, where)
    if isinstance(module, nn.PixelShuffle):
        r = module.upscale_factor
        step = (Fraction(-(r - 1), r), Fraction(0), Fraction(1, r))
        return step, step
    if isinstance(module, nn.PixelUnshuffle):
        r = module.downscale_factor
        step = (Fraction(0), Fraction(r - 1), Fraction(r))
        return step, step
    if isinstance(module, nn.CircularPad2d):
        raise ModelAnalysisError(f"{where} pads circularly, so scene edges wrap around")
    if isinstance(module, (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
                           nn.ReplicationPad2d)):
        return _pad_steps(module.padding, "constant", where)
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        raise ModelAnalysisError(
            f"{where} pools to a fixed size, so every output depends on the whole input "
            "(global pooling has no finite receptive field)"
        )
    if isinstance(module, (nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)):
        raise ModelAnalysisError(
            f"{where} normalises over the spatial dimensions, so every output depends on the "
            "whole input"
        )
    if isinstance(module, (nn.MultiheadAttention, nn.Linear, nn.Flatten, nn.Unflatten)):
        raise ModelAnalysisError(
            f"{where} mixes spatial positions globally (attention, flatten or fully connected "
            "layers); convolutionalize a classifier first"
        )
    raise ModelAnalysisError(f"{where} is not a layer whose receptive field is known")


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _dim_is_channel(dim: Any) -> bool:
    return dim in (1, -3)


class _Analyzer:
    """Walks the traced graph once, recording each tensor's stride and inputs."""

    def __init__(self, gm: fx.GraphModule, name: str) -> None:
        self.gm = gm
        self.name = name
        self.modules = dict(gm.named_modules())
        self.values: dict[fx.Node, _Tensor | _Scalar] = {}
        self.output: fx.Node | None = None

    def tensor(self, value: Any) -> _Tensor | None:
        if isinstance(value, fx.Node):
            got = self.values.get(value)
            return got if isinstance(got, _Tensor) else None
        return None

    def merge(self, values: list[Any], where: str) -> _Tensor | _Scalar:
        """An element-wise combination: the hull of its tensor arguments."""
        found = [(v, t) for v in values if (t := self.tensor(v)) is not None]
        if not found:
            return _SCALAR
        nodes = [v for v, _ in found]
        stride = found[0][1].stride
        for _, other in found[1:]:
            other_stride = other.stride
            if other_stride != stride:
                raise ModelAnalysisError(
                    f"{where} combines tensors at different strides {tuple(map(str, stride))} "
                    f"and {tuple(map(str, other_stride))}: they are not aligned pixel grids"
                )
        return _Tensor(stride, tuple((n, _IDENTITY) for n in nodes))

    def step(self, node: fx.Node, steps: Steps | None) -> _Tensor | _Scalar:
        source = node.args[0]
        tensor = self.tensor(source)
        if tensor is None or not isinstance(source, fx.Node):  # a tensor is always a Node
            return _SCALAR
        if steps is None:
            steps = _IDENTITY
        stride = (tensor.stride[0] * steps[0][2], tensor.stride[1] * steps[1][2])
        return _Tensor(stride, ((source, steps),))

    def run(self) -> fx.Node:
        """Analyse every node; return the node whose tensor the model returns."""
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                value: _Tensor | _Scalar = (
                    _Tensor((Fraction(1), Fraction(1)), ((None, _IDENTITY),))
                    if not self.values else _SCALAR
                )
            elif node.op == "get_attr":
                value = self.constant(node)
            elif node.op == "call_module":
                module = self.modules[str(node.target)]
                value = self.step(node, _module_steps(module, str(node.target)))
            elif node.op == "call_function":
                value = self.function(node)
            elif node.op == "call_method":
                value = self.method(node)
            elif node.op == "output":
                result = node.args[0]
                if self.tensor(result) is None:
                    raise ModelAnalysisError(f"{self.name} does not return a single spatial tensor")
                return result
            else:  # pragma: no cover - fx has no other ops
                raise ModelAnalysisError(f"unknown graph op {node.op}")
            self.values[node] = value
        raise ModelAnalysisError(f"{self.name} has no output")  # pragma: no cover

    def needs(
        self, output: fx.Node, axis: int, index: int
    ) -> dict[fx.Node | None, tuple[int, int]]:
        """Indices of every tensor that output element ``index`` depends on, along one axis.

        Integer intervals propagated backwards through the graph; the entry for
        ``None`` is the input image.
        """
        need: dict[fx.Node | None, tuple[int, int]] = {output: (index, index)}
        for node in reversed(list(self.gm.graph.nodes)):
            if node not in need:
                continue
            tensor = self.tensor(node)
            if tensor is None:
                continue
            lo, hi = need[node]
            for source, steps in tensor.deps:
                c, e, t = steps[axis]
                src_lo, src_hi = math.ceil(c + lo * t), math.floor(e + hi * t)
                if src_lo > src_hi:  # e.g. a transposed-conv phase that no input reaches
                    continue
                if source in need:
                    old = need[source]
                    src_lo, src_hi = min(old[0], src_lo), max(old[1], src_hi)
                need[source] = (src_lo, src_hi)
        return need

    def constant(self, node: fx.Node) -> _Scalar:
        tensor = _get_attr(self.gm, str(node.target))
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= 3 and (
            tensor.shape[-1] > 1 or tensor.shape[-2] > 1
        ):
            raise ModelAnalysisError(
                f"attribute '{node.target}' is a fixed spatial tensor {tuple(tensor.shape)} "
                "(a positional embedding?): its values depend on absolute position"
            )
        return _SCALAR

    def function(self, node: fx.Node) -> Any:
        target = node.target
        where = f"operation '{node.name}' ({getattr(target, '__name__', target)})"
        if target is operator.getitem:
            return self.getitem(node, where)
        if target in _ELEMENTWISE_FUNCTIONS:
            return self.merge(list(node.args) + list(node.kwargs.values()), where)
        if target is torch.cat or target is torch.concat:
            dim = _arg(node, 1, "dim", 0)
            tensors = node.args[0]
            assert isinstance(tensors, (list, tuple))  # torch.cat takes a sequence of tensors
            if dim not in (0, 1, -3, -4) and any(self.tensor(t) is not None for t in tensors):
                raise ModelAnalysisError(f"{where} concatenates along spatial dim {dim}")
            return self.merge(list(tensors), where)
        if target in (F.interpolate, F.upsample):
            mode = _arg(node, 3, "mode", "nearest")
            steps = _upsample_steps(_arg(node, 2, "scale_factor"), mode,
                                    _arg(node, 4, "align_corners"), where)
            if _arg(node, 1, "size") is not None:
                raise ModelAnalysisError(f"{where} resizes to a size, which depends on the input")
            return self.step(node, steps)
        if target is F.pad:
            pad = _pad_steps(_arg(node, 1, "pad"), _arg(node, 2, "mode", "constant"), where)
            return self.step(node, pad)
        if target in (F.max_pool2d, torch.max_pool2d):
            k = _arg(node, 1, "kernel_size")
            return self.step(node, _conv_like(k, _arg(node, 2, "stride") or k,
                                              _arg(node, 3, "padding", 0),
                                              _arg(node, 4, "dilation", 1)))
        if target is F.avg_pool2d:
            k = _arg(node, 1, "kernel_size")
            return self.step(node, _conv_like(k, _arg(node, 2, "stride") or k,
                                              _arg(node, 3, "padding", 0)))
        if target in (torch.softmax, F.softmax, F.log_softmax, torch.log_softmax, torch.argmax):
            if not _dim_is_channel(_arg(node, 1, "dim")):
                raise ModelAnalysisError(f"{where} reduces over a dim other than the channels")
            return self.merge([node.args[0]], where)
        if target in (getattr,):
            return _SCALAR
        if all(self.tensor(a) is None for a in node.args):
            return _SCALAR
        raise ModelAnalysisError(f"{where} is not an operation whose receptive field is known")

    def method(self, node: fx.Node) -> Any:
        name = str(node.target)
        where = f"operation '{node.name}' (.{name})"
        if name in ("size", "dim", "numel"):
            return _SCALAR
        if name in _ELEMENTWISE_METHODS:
            return self.merge(list(node.args), where)
        if name in _CHANNEL_REDUCTIONS:
            if not _dim_is_channel(_arg(node, 1, "dim")):
                raise ModelAnalysisError(f"{where} reduces over a dim other than the channels")
            return self.merge([node.args[0]], where)
        if self.tensor(node.args[0]) is None:
            return _SCALAR
        raise ModelAnalysisError(
            f"{where} reshapes or mixes spatial positions, so its receptive field is not known"
        )

    def getitem(self, node: fx.Node, where: str) -> Any:
        if self.tensor(node.args[0]) is None:
            return _SCALAR
        index = node.args[1]
        items = list(index) if isinstance(index, tuple) else [index]
        if Ellipsis in items:
            at = items.index(Ellipsis)
            items = items[:at] + [slice(None)] * (4 - (len(items) - 1)) + items[at + 1:]
        items += [slice(None)] * (4 - len(items))
        if len(items) != 4 or any(i is None for i in items):
            raise ModelAnalysisError(f"{where} indexes a 4-D tensor with {index!r}")
        steps = []
        for item in items[2:]:
            if not isinstance(item, slice):
                raise ModelAnalysisError(f"{where} picks single rows or columns: not a crop")
            steps.append(self.crop_step(item, where))
        return self.step(node, (steps[0], steps[1]))

    def crop_step(self, item: slice, where: str) -> Step:
        if item.step not in (None, 1):
            raise ModelAnalysisError(f"{where} slices with step {item.step}")
        start = 0 if item.start is None else item.start
        if not isinstance(start, int) or start < 0:
            raise ModelAnalysisError(
                f"{where} crops from a start that depends on the input size ({start}); "
                "crop offsets must be constants"
            )
        stop = item.stop
        if isinstance(stop, int) and stop >= 0:
            raise ModelAnalysisError(
                f"{where} crops to a fixed stop {stop}, which depends on absolute position"
            )
        return (Fraction(start), Fraction(start), Fraction(1))


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _trace(model: nn.Module) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule):
        return model
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises several types for untraceable code
        raise ModelAnalysisError(
            f"cannot trace {type(model).__name__} with torch.fx (data-dependent control flow or "
            f"shapes?): {exc}"
        ) from exc


def _to_int(value: Fraction, what: str, name: str) -> int:
    if value.denominator != 1:
        raise ModelAnalysisError(f"{name} has a fractional output {what} {value}")
    return int(value)


def _input_channels(gm: fx.GraphModule) -> int:
    for module in gm.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            return module.in_channels
    return 1


def _extents(analyzer: _Analyzer, tensors: dict[fx.Node, _Tensor], align: list[int],
             span: int) -> dict[fx.Node, tuple[Fraction, Fraction]]:
    """For each tensor, how many elements it has beyond ``L / stride`` on an input of ``L``.

    Shapes come from running the graph on meta tensors (no pixel computed, no
    weight copied) at two window lengths on the ``align`` grid; the smaller
    excess of the two is kept.
    """
    gm = analyzer.gm
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    nodes = [n for n in gm.graph.nodes if n in tensors]
    for node in gm.graph.nodes:
        if node.op == "output":
            graph.output(tuple(env[n] for n in nodes))
            break
        env[node] = graph.node_copy(node, lambda n: env[n])
    shapes_gm = fx.GraphModule(gm, graph)
    state = {k: v.to("meta") for k, v in gm.state_dict(keep_vars=True).items()}
    channels = _input_channels(gm)
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    excess: dict[fx.Node, tuple[Fraction, Fraction]] = {}
    for grow in (0, 1):
        size = [math.ceil((4 * span + 64) / a) * a + grow * a for a in align]
        x = torch.empty((1, channels, *size), device="meta", dtype=dtype)
        try:
            with torch.no_grad():
                outs = torch.func.functional_call(shapes_gm, state, (x,), strict=False)
        except Exception as exc:  # shape errors of user code come in many types
            raise ModelAnalysisError(
                f"cannot run {analyzer.name} on a {size[0]}x{size[1]} input to measure its "
                f"feature map sizes: {exc}"
            ) from exc
        for node, out in zip(nodes, outs):
            got = tuple(Fraction(int(out.shape[-2 + k])) - size[k] / tensors[node].stride[k]
                        for k in (0, 1))
            old = excess.get(node, got)
            excess[node] = (min(old[0], got[0]), min(old[1], got[1]))
    return excess


def receptive_field(model: nn.Module) -> ReceptiveField:
    """The receptive field of a dense-prediction network's output.

    The model is traced with ``torch.fx``; every layer's geometry is composed
    along the graph. Raises :class:`ModelAnalysisError` naming the module for
    an operation that has no finite, translation-invariant receptive field.
    """
    name = type(model).__name__
    analyzer = _Analyzer(_trace(model), name)
    output = analyzer.run()
    out_tensor = analyzer.tensor(output)
    assert out_tensor is not None  # run() checked that the output is a spatial tensor
    out_stride = out_tensor.stride
    tensors = {n: v for n, v in analyzer.values.items() if isinstance(v, _Tensor)}
    aligns = []
    for k in (0, 1):
        align = _to_int(out_stride[k], "stride (output finer than the input)", name)
        for tensor in tensors.values():
            align = math.lcm(align, tensor.stride[k].numerator)
        aligns.append(align)
    needs = [[analyzer.needs(output, k, phase)
              for phase in range(aligns[k] // int(out_stride[k]))] for k in (0, 1)]
    span = max(hi - lo + 1 for k in (0, 1) for need in needs[k] for lo, hi in [need[None]])
    extra = _extents(analyzer, tensors, aligns, span)
    sizes, strides, offsets, reaches = [], [], [], []
    for k in (0, 1):
        stride = int(out_stride[k])
        first, last, reach = [], [], []
        for phase, need in enumerate(needs[k]):
            lo, hi = need[None]
            first.append(lo - phase * stride)
            last.append(hi - phase * stride)
            # The window must start at or before every needed element of every
            # tensor (element 0 of a window's tensor is whole-scene element
            # w0 / s) and be long enough that the window's tensor still has the
            # last needed element (it has L / s + extra elements).
            before = phase * stride - lo
            after = hi + 1 - (phase + 1) * stride
            for node, (t_lo, t_hi) in need.items():
                if node is None:
                    continue
                s_t = tensors[node].stride[k]
                before = max(before, phase * stride - math.floor(t_lo * s_t))
                after = max(after, math.ceil((t_hi + 1 - extra[node][k]) * s_t)
                            - (phase + 1) * stride)
            reach.append((max(0, before), max(0, after)))
        offsets.append(min(first))
        sizes.append(max(last) - min(first) + 1)
        strides.append(stride)
        reaches.append(tuple(reach))
    return ReceptiveField(
        size=(sizes[0], sizes[1]), stride=(strides[0], strides[1]),
        offset=(offsets[0], offsets[1]), align=(aligns[0], aligns[1]),
        reach=(reaches[0], reaches[1]),
    )


def _probe_copy(model: nn.Module) -> nn.Module:
    """A float64 copy with positive weights and non-selective pools."""
    probe = copy.deepcopy(model).double().eval()

    def swap(parent: nn.Module) -> None:
        for child_name, child in parent.named_children():
            if isinstance(child, nn.MaxPool2d) and _pair(child.dilation) == (1, 1):
                setattr(parent, child_name, nn.AvgPool2d(
                    child.kernel_size, child.stride, child.padding, ceil_mode=child.ceil_mode))
            else:
                swap(child)

    swap(probe)
    with torch.no_grad():
        for module in probe.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
            for pname, param in module.named_parameters(recurse=False):
                if pname == "bias":
                    param.fill_(0.1)
                else:
                    param.copy_(param.abs() + 0.01)
    return probe


def probe_receptive_field(
    model: nn.Module, input_shape: tuple[int, int, int], at: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Measure which input pixels output pixel ``at`` depends on.

    Runs a copy of the model with positive weights, positive input and
    max-pools made average-pools (so every tap matters), back-propagates from
    one output pixel and returns the support of the input gradient as
    ``((first_row, last_row), (first_col, last_col))``.
    """
    probe = _probe_copy(model)
    x = torch.ones((1, *input_shape), dtype=torch.float64, requires_grad=True)
    y = probe(x)
    y[0, :, at[0], at[1]].sum().backward()
    assert x.grad is not None
    support = x.grad[0].abs().sum(0) > 0
    rows = torch.nonzero(support.any(1)).flatten()
    cols = torch.nonzero(support.any(0)).flatten()
    if len(rows) == 0:
        raise ModelAnalysisError(f"output {at} depends on no input pixel")
    return (int(rows[0]), int(rows[-1])), (int(cols[0]), int(cols[-1]))

