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


@dataclass(frozen=True)
class _Axis:
    """Element ``q`` depends on input pixels in ``[lo + q*stride, hi + q*stride]``."""

    lo: Fraction
    hi: Fraction
    stride: Fraction

    def then(self, c: Fraction, e: Fraction, t: Fraction) -> "_Axis":
        """Compose with an op whose output ``o`` reads input indices ``[c + o*t, e + o*t]``."""
        stride = self.stride * t
        lo = self.lo + self.stride * c
        hi = self.hi + self.stride * e
        # Keep "index -1 lies left of the window" true even after crops, so a
        # later layer's padding of this tensor is always seen as an edge effect.
        lo = min(lo, stride - 1)
        return _Axis(lo, hi, stride)


@dataclass(frozen=True)
class _Field:
    rows: _Axis
    cols: _Axis

    def then(self, rows: tuple[Fraction, Fraction, Fraction],
             cols: tuple[Fraction, Fraction, Fraction]) -> "_Field":
        return _Field(self.rows.then(*rows), self.cols.then(*cols))


class _Scalar:
    """A traced value that is not a spatial tensor (a size, a constant)."""


_SCALAR = _Scalar()
_IDENTITY = (Fraction(0), Fraction(0), Fraction(1))
Step = tuple[Fraction, Fraction, Fraction]

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
        return tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))  # type: ignore[return-value]
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
            raise ModelAnalysisError(f"{where} has scale factor {f}; only integer factors are exact")
        sf = int(f)
        if mode == "nearest":
            steps.append((Fraction(-(sf - 1), sf), Fraction(0), Fraction(1, sf)))
        elif mode in ("bilinear", "linear", "nearest-exact", "bicubic"):
            reach = 2 if mode == "bicubic" else 1
            centre = Fraction(1, 2 * sf) - Fraction(1, 2)
            steps.append((centre - reach - 1, centre + reach, Fraction(1, sf)))
        else:
            raise ModelAnalysisError(f"{where} uses interpolation mode {mode!r}, which is not supported")
    return steps[0], steps[1]


def _pad_steps(pad: Any, mode: str, where: str) -> tuple[Step, Step]:
    if mode == "circular":
        raise ModelAnalysisError(f"{where} pads circularly, so scene edges wrap around")
    pad = list(pad) + [0] * (4 - len(pad))
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
        return tuple(_transposed_step(k[i], s[i], p[i], d[i]) for i in (0, 1))  # type: ignore[return-value]
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
    def __init__(self, gm: fx.GraphModule, name: str) -> None:
        self.gm = gm
        self.name = name
        self.modules = dict(gm.named_modules())
        self.values: dict[fx.Node, _Field | _Scalar | tuple[Any, ...]] = {}
        self.strides: list[tuple[Fraction, Fraction]] = []

    def field(self, value: Any) -> _Field | _Scalar:
        if isinstance(value, fx.Node):
            got = self.values[value]
            return got if isinstance(got, (_Field, _Scalar)) else _SCALAR
        return _SCALAR

    def merge(self, values: list[Any], where: str) -> _Field | _Scalar:
        fields = [f for f in (self.field(v) for v in values) if isinstance(f, _Field)]
        if not fields:
            return _SCALAR
        first = fields[0]
        for other in fields[1:]:
            if (other.rows.stride, other.cols.stride) != (first.rows.stride, first.cols.stride):
                raise ModelAnalysisError(
                    f"{where} combines tensors at different strides "
                    f"({first.rows.stride}, {first.cols.stride}) and "
                    f"({other.rows.stride}, {other.cols.stride}): they are not aligned pixel grids"
                )
        return _Field(
            _Axis(min(f.rows.lo for f in fields), max(f.rows.hi for f in fields), first.rows.stride),
            _Axis(min(f.cols.lo for f in fields), max(f.cols.hi for f in fields), first.cols.stride),
        )

    def step(self, node: fx.Node, steps: tuple[Step, Step] | None) -> _Field | _Scalar:
        source = self.field(node.args[0])
        if not isinstance(source, _Field):
            return _SCALAR
        return source if steps is None else source.then(*steps)

    def run(self) -> _Field:
        output: _Field | None = None
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                value: Any = (
                    _Field(_Axis(Fraction(0), Fraction(0), Fraction(1)),
                           _Axis(Fraction(0), Fraction(0), Fraction(1)))
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
                result = self.field(node.args[0])
                if not isinstance(result, _Field):
                    raise ModelAnalysisError(
                        f"{self.name} does not return a single spatial tensor"
                    )
                output = result
                continue
            else:  # pragma: no cover - fx has no other ops
                raise ModelAnalysisError(f"unknown graph op {node.op}")
            self.values[node] = value
            if isinstance(value, _Field):
                self.strides.append((value.rows.stride, value.cols.stride))
        assert output is not None
        return output

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
            fields = [self.field(t) for t in tensors]  # type: ignore[union-attr]
            if dim not in (0, 1, -3, -4) and any(isinstance(f, _Field) for f in fields):
                raise ModelAnalysisError(f"{where} concatenates along spatial dim {dim}")
            return self.merge(list(tensors), where)  # type: ignore[arg-type]
        if target in (F.interpolate, F.upsample):
            mode = _arg(node, 3, "mode", "nearest")
            steps = _upsample_steps(_arg(node, 2, "scale_factor"), mode,
                                    _arg(node, 4, "align_corners"), where)
            if _arg(node, 1, "size") is not None:
                raise ModelAnalysisError(f"{where} resizes to a size, which depends on the input")
            return self.step(node, steps)
        if target is F.pad:
            return self.step(node, _pad_steps(_arg(node, 1, "pad"), _arg(node, 2, "mode", "constant"), where))
        if target in (F.max_pool2d, torch.max_pool2d):
            k = _arg(node, 1, "kernel_size")
            return self.step(node, _conv_like(k, _arg(node, 2, "stride") or k,
                                              _arg(node, 3, "padding", 0), _arg(node, 4, "dilation", 1)))
        if target in (F.avg_pool2d, torch.avg_pool2d):
            k = _arg(node, 1, "kernel_size")
            return self.step(node, _conv_like(k, _arg(node, 2, "stride") or k, _arg(node, 3, "padding", 0)))
        if target in (torch.softmax, F.softmax, F.log_softmax, torch.log_softmax, torch.argmax):
            if not _dim_is_channel(_arg(node, 1, "dim")):
                raise ModelAnalysisError(f"{where} reduces over a dim other than the channels")
            return self.merge([node.args[0]], where)
        if target in (getattr,):
            return _SCALAR
        if all(not isinstance(self.field(a), _Field) for a in node.args):
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
        if not isinstance(self.field(node.args[0]), _Field):
            return _SCALAR
        raise ModelAnalysisError(
            f"{where} reshapes or mixes spatial positions, so its receptive field is not known"
        )

    def getitem(self, node: fx.Node, where: str) -> Any:
        source = self.field(node.args[0])
        if not isinstance(source, _Field):
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
        return source.then(steps[0], steps[1])

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


def receptive_field(model: nn.Module) -> ReceptiveField:
    """The receptive field of a dense-prediction network's output.

    The model is traced with ``torch.fx``; every layer's geometry is composed
    along the graph. Raises :class:`ModelAnalysisError` naming the module for
    an operation that has no finite, translation-invariant receptive field.
    """
    name = type(model).__name__
    analyzer = _Analyzer(_trace(model), name)
    out = analyzer.run()
    sizes, strides, offsets, aligns = [], [], [], []
    for k, axis in enumerate((out.rows, out.cols)):
        stride = _to_int(axis.stride, "stride (output finer than the input)", name)
        lo, hi = math.ceil(axis.lo), math.floor(axis.hi)
        sizes.append(hi - lo + 1)
        strides.append(stride)
        offsets.append(lo)
        align = 1
        for pair in analyzer.strides:
            align = math.lcm(align, pair[k].numerator)
        aligns.append(math.lcm(align, stride))
    return ReceptiveField(tuple(sizes), tuple(strides), tuple(offsets), tuple(aligns))  # type: ignore[arg-type]


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

