"""Turn a fixed-size patch classifier into a fully convolutional network.

The FCN paper's first move: a classifier's fully connected layers are
convolutions whose kernels cover their whole input. The first ``Linear`` after
the flatten becomes a ``Conv2d`` with a kernel the size of the feature map it
was trained on; every later ``Linear`` becomes a 1x1 ``Conv2d``. Weights are
reshaped, not retrained, so on a training-size input the result equals the
classifier, and on a larger input output ``(i, j)`` is the classifier applied
to the crop at ``(i * stride, j * stride)``.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
from torch import fx, nn

from pipeline.errors import ModelAnalysisError

_ELEMENTWISE_AFTER_FLATTEN = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Identity,
    nn.Dropout, nn.Hardswish, nn.ReLU6,
)


def _is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], nn.Flatten)
    if node.op == "call_function":
        return node.target is torch.flatten
    if node.op == "call_method":
        return node.target in ("flatten", "view", "reshape")
    return False


def _feature_shape(classifier: nn.Module, flatten_input: fx.Node, input_size: tuple[int, int],
                   channels: int, gm: fx.GraphModule) -> tuple[int, int, int]:
    """Shape (C, h, w) of the tensor that the classifier flattens."""
    class _Reached(Exception):
        def __init__(self, shape: tuple[int, ...]) -> None:
            self.shape = shape

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n is flatten_input:
                raise _Reached(tuple(out.shape))  # nothing after the flatten needs to run
            return out

    param = next(classifier.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    recorder = _Recorder(gm)
    recorder.extra_traceback = False  # the stop is deliberate: no traceback decoration
    try:
        with torch.no_grad():
            recorder.run(torch.zeros(1, channels, *input_size, dtype=dtype))
    except _Reached as reached:
        shape = reached.shape
    else:  # pragma: no cover - the flatten input is always computed
        raise ModelAnalysisError("the classifier never computed its flatten input")
    if len(shape) != 4:
        raise ModelAnalysisError(
            f"the classifier flattens a tensor of shape {shape}; "
            "convolutionalize needs (N, C, H, W)"
        )
    return shape[1], shape[2], shape[3]


def _in_channels(classifier: nn.Module) -> int:
    for module in classifier.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise ModelAnalysisError("the classifier has no Conv2d layer to take its input channels from")


def _linear_to_conv(linear: nn.Linear, kernel: tuple[int, int], channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, linear.out_features, kernel, bias=linear.bias is not None)
    conv = conv.to(dtype=linear.weight.dtype, device=linear.weight.device)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.reshape(linear.out_features, channels, *kernel))
        if linear.bias is not None and conv.bias is not None:  # both or neither
            conv.bias.copy_(linear.bias)
    return conv


def _batchnorm1d_to_2d(bn: nn.BatchNorm1d) -> nn.BatchNorm2d:
    """The same normalisation over the channels of a 4-D tensor (dtype and device kept)."""
    new = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    reference = next(iter(bn.state_dict().values()), None)
    if reference is not None:
        new = new.to(device=reference.device, dtype=reference.dtype)
    new.load_state_dict(bn.state_dict())
    return new.train(bn.training)


def convolutionalize(
    classifier: nn.Module, input_size: int | tuple[int, int]
) -> fx.GraphModule:
    """A fully convolutional copy of ``classifier``, trained on ``input_size`` patches.

    The classifier must be conv/pool features, then a flatten, then ``Linear``
    layers with element-wise layers (ReLU, Dropout, BatchNorm1d, ...) between
    them. The original module is left untouched. On a training-size input the
    result has shape ``(N, classes, 1, 1)`` and equals the classifier.
    """
    size = (input_size, input_size) if isinstance(input_size, int) else (
        input_size[0], input_size[1]
    )
    try:
        gm = fx.symbolic_trace(copy.deepcopy(classifier))
    except Exception as exc:  # tracing failures come in many types
        raise ModelAnalysisError(
            f"cannot trace {type(classifier).__name__} with torch.fx: {exc}"
        ) from exc
    modules = dict(gm.named_modules())
    flattens = [n for n in gm.graph.nodes if _is_flatten(n, modules)]
    if len(flattens) != 1:
        raise ModelAnalysisError(
            f"{type(classifier).__name__} must flatten exactly once before its Linear layers, "
            f"found {len(flattens)} flatten operations"
        )
    flatten = flattens[0]
    source = flatten.args[0]
    assert isinstance(source, fx.Node)
    channels, h, w = _feature_shape(classifier, source, size, _in_channels(classifier), gm)

    first = True
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not _after(node, flatten):
            continue
        module = modules[str(node.target)]
        if isinstance(module, nn.Linear):
            if first:
                if module.in_features != channels * h * w:
                    raise ModelAnalysisError(
                        f"Linear '{node.target}' takes {module.in_features} features but the "
                        f"flattened feature map is {channels}x{h}x{w} at input size {size}"
                    )
                conv = _linear_to_conv(module, (h, w), channels)
                first = False
            else:
                conv = _linear_to_conv(module, (1, 1), module.in_features)
            _replace(gm, str(node.target), conv)
        elif isinstance(module, nn.BatchNorm1d):
            _replace(gm, str(node.target), _batchnorm1d_to_2d(module))
        elif not isinstance(module, _ELEMENTWISE_AFTER_FLATTEN):
            raise ModelAnalysisError(
                f"module '{node.target}' ({type(module).__name__}) after the flatten is neither "
                "Linear nor element-wise; convolutionalize cannot convert it"
            )
    for node in gm.graph.nodes:
        if _after(node, flatten) and node.op in ("call_function", "call_method") \
                and node.target not in (operator.add, torch.relu, "relu", torch.nn.functional.relu):
            raise ModelAnalysisError(
                f"operation '{node.name}' ({node.target}) after the flatten cannot be "
                "convolutionalized"
            )
    if first:
        raise ModelAnalysisError(
            f"{type(classifier).__name__} has no Linear layer after its flatten"
        )
    flatten.replace_all_uses_with(source)
    gm.graph.erase_node(flatten)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.train(classifier.training)


def _after(node: fx.Node, flatten: fx.Node) -> bool:
    """Whether ``node`` comes after ``flatten`` in the graph's order."""
    current = flatten.next
    while current.op != "root":
        if current is node:
            return True
        current = current.next
    return False


def _replace(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, leaf, module)
