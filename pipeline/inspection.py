"""Figures for ``fcn-pipeline inspect``: what a model takes and gives, its receptive field,
halo and overhead per tile size, for built-in architectures and any model spec.

A spec is analysed by :func:`pipeline.tiling.analyse_model`, as ``run`` analyses it, so
both agree: the field analysed (torch), probed (ONNX) or, under a declared halo, stood in
for. A model whose field cannot be derived and that has no declared halo is a finding
here, not an error: its report says why (global context) and that a halo must be
declared. Built-in architectures are built on the meta device (no weights, no pixel).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.analysis import receptive_field
from pipeline.errors import ModelAnalysisError
from pipeline.exactness import ANALYSED, DECLARED
from pipeline.grid import fixed_tile_size, interior_overhead
from pipeline.inference import activation_bytes, output_shape, weight_bytes
from pipeline.modelspec import LABELS, ONNX, SCORES, ModelSpec
from pipeline.networks import Network, TorchNetwork, input_channels, onnx_memory
from pipeline.receptive import Halo, ReceptiveField, align_up

Pair = tuple[int, int]
#: Dims of a shape: an int when fixed, None when any size runs (batch, H, W).
Shape = tuple[int | None, ...]
WIDTH = 100
_HALO_HINT = "declare a halo (--halo PX, or halo: in the spec)"


@dataclass(frozen=True)
class TileFigures:
    """One tile size of a model: its window (input px), the interior overhead (pixels
    computed / pixels output) and the memory of one forward pass over one window
    (activations + weights, bytes; None when not estimated)."""

    tile: Pair
    window: Pair
    overhead: float
    memory: int | None


@dataclass(frozen=True)
class InspectRow:
    """One model as ``inspect`` reports it.

    ``input_shape`` ``(N, C, H, W)`` and ``output_shape`` ``(N, K, H', W')`` (scores) or
    ``(N, H', W')`` (labels), None where any size runs; ``method``: how the field is
    known (``analysed``, ``probed``, ``declared``), None when it is not; ``field``: the
    receptive field (None when the analysis refused it); ``halo``: the halo tiles use
    (None: none known); ``refused``: why the analysis refused the field (shortened);
    ``window``: the one input ``(rows, cols)`` the network takes; ``congruent``: its
    padding depends on the input length; ``tiles``: one entry per tile size asked, or
    the one fixed tile of a fixed window.
    """

    name: str
    source: str | None
    backend: str
    input_shape: Shape
    input_dtype: str
    output_shape: Shape
    output: str
    channels: int | None
    method: str | None
    field: ReceptiveField | None
    stride: Pair | None
    halo: Halo | None
    refused: str | None
    window: Pair | None
    congruent: bool
    coarse: ReceptiveField | None
    tiles: tuple[TileFigures, ...]
    #: The halo is a declared one (over a derived field: larger than the field's own).
    declared: bool = False

    @property
    def fixed(self) -> bool:
        """The network takes one input size: its tile is fixed."""
        return self.window is not None


def inspect_rows(names: tuple[str, ...], tile_sizes: tuple[int, ...], *,
                 trust_code: bool = False,
                 halo: tuple[int, int] | None = None) -> list[InspectRow]:
    """Report each model (all built-ins when ``names`` is empty): a built-in architecture
    name, ``demo``, a spec file (YAML, or a STAC Item with the MLM extension).

    Args:
        names: Models to report.
        tile_sizes: Core tile sizes (px) of the overhead and memory figures.
        trust_code: A spec's import path may run (see :func:`pipeline.model.build_model`).
        halo: A declared halo ``(rows, cols)`` px for the specs (as ``run --halo``).

    Raises:
        PipelineError: a spec, its weights or its network cannot be used (one line); a
            global-context model is reported, not raised.
    """
    from pipeline import models

    rows = []
    for name in names or tuple(models.ARCHITECTURES):
        if name in models.ARCHITECTURES and not Path(name).is_file():
            rows.append(_builtin_row(name, tile_sizes))
        else:
            rows.append(_spec_row(name, tile_sizes, trust_code, halo))
    return rows


def _builtin_row(name: str, tile_sizes: Sequence[int]) -> InspectRow:
    from pipeline import models

    with torch.device("meta"):
        module = models.build(name).eval()
    field = receptive_field(module)
    channels = input_channels(module)
    out = output_shape(module, (channels or 3, 256, 256))
    return _torch_row(name, None, module, channels, ANALYSED, field, field.halo(), None, out,
                      tile_sizes)


def _torch_row(name: str, source: str | None, module: nn.Module, channels: int | None,
               method: str | None, field: ReceptiveField | None, halo: Halo | None,
               refused: str | None, out: tuple[int, ...], tile_sizes: Sequence[int],
               stride: Pair | None = None) -> InspectRow:
    """A torch module's row; ``out``: its output shape for one input, without N."""
    layout = SCORES if len(out) == 3 else LABELS
    output: Shape = (None, out[0], None, None) if layout == SCORES else (None, None, None)
    coarse = None
    features, head = getattr(module, "features", None), getattr(module, "head", None)
    if field is not None and isinstance(features, nn.Module) and isinstance(head, nn.Module):
        coarse = receptive_field(nn.Sequential(features, head))
    stride = stride or (field.stride if field is not None else None)
    tiles = _tiles(field, halo, stride, None, tile_sizes,
                   lambda shape: activation_bytes(module, shape) + weight_bytes(module),
                   channels or 3)
    return InspectRow(name, source, "torch", (None, channels, None, None), "float32", output,
                      layout, channels, method, field, stride, halo, refused, None, False,
                      coarse, tiles)


def _spec_row(name: str, tile_sizes: Sequence[int], trust_code: bool,
              halo: tuple[int, int] | None) -> InspectRow:
    """A spec's row, analysed as ``run`` analyses it (:func:`pipeline.tiling.analyse_model`)."""
    from pipeline.architectures import resolve_architecture
    from pipeline.model import load_network
    from pipeline.modelspec import load_spec, read_weights, verify_weights
    from pipeline.tiling import analyse_model

    spec = load_spec(name)
    if spec.backend != ONNX:  # as run's checks: the factory is decided before the weights
        resolve_architecture(spec, trust_code=trust_code)
    digest = verify_weights(spec)
    try:
        model = analyse_model(spec, digest, trust_code=trust_code, halo=halo)
    except ModelAnalysisError as exc:  # no field and no declared halo: reported
        reason = _shortened(str(exc.__cause__ or exc))
        network = load_network(spec, trust_code=trust_code)
        graph = read_weights(spec) if spec.backend == ONNX else None
        return _network_row(name, spec, network, graph, None, None, None, reason, False,
                            tile_sizes)
    refused = _shortened(model.refused) if model.refused else None
    field = model.field if model.method != DECLARED else None
    row = _network_row(name, spec, model.network, model.graph, model.method, field,
                       model.halo, refused, model.congruent, tile_sizes,
                       stride=model.field.stride)
    return replace(row, declared=model.declared is not None)


def _network_row(name: str, spec: ModelSpec, network: Network, graph: bytes | None,
                 method: str | None, field: ReceptiveField | None, halo: Halo | None,
                 refused: str | None, congruent: bool, tile_sizes: Sequence[int],
                 stride: Pair | None = None) -> InspectRow:
    source = spec.source
    bands = len(spec.bands)
    if isinstance(network, TorchNetwork):
        module = network.module
        channels = network.signature.channels or bands
        out = output_shape(module, (channels, 256, 256))
        if stride is None and len(out) >= 2 and out[-2] and 256 % out[-2] == 0:
            stride = (256 // out[-2], 256 // out[-1])
        return _torch_row(name, source, module, channels, method, field, halo, refused, out,
                          tile_sizes, stride)
    sig = network.signature
    window = sig.window
    channels = sig.channels or bands
    spatial: Shape = (None, None)
    if window is not None and stride is not None:
        spatial = (window[0] // stride[0], window[1] // stride[1])
    elif window is not None:
        spatial = window
    classes = sig.classes or len(spec.classes)
    output: Shape = (sig.batch, classes, *spatial) if sig.output == SCORES \
        else (sig.batch, *spatial)
    assert graph is not None

    def memory(shape: tuple[int, int, int]) -> int:
        activations, weights = onnx_memory(graph, shape, 1, input_name=spec.onnx_input)
        return activations + weights

    tiles = _tiles(field, halo, stride, window, tile_sizes, memory, channels)
    return InspectRow(name, source, "onnx", (sig.batch, channels, *(window or (None, None))),
                      sig.input_dtype, output, sig.output, channels, method, field, stride,
                      halo, refused, window, congruent, None, tiles)


def _tiles(field: ReceptiveField | None, halo: Halo | None, stride: Pair | None,
           window: Pair | None, tile_sizes: Sequence[int], memory: Any,
           channels: int) -> tuple[TileFigures, ...]:
    """Overhead and memory per tile size (one fixed tile for a fixed window); none
    without a halo (the windows are not known)."""
    if halo is None:
        return ()
    geometry = field or ReceptiveField.pointwise(stride or (1, 1))
    if window is not None:
        tile = fixed_tile_size(window, geometry, halo)
        return (TileFigures(tile, window, window[0] * window[1] / (tile[0] * tile[1]),
                            _estimate(memory, (channels, *window))),)
    figures = []
    for size in tile_sizes:
        shape = tuple(align_up(size + halo.before[k] + halo.after[k], geometry.align[k])
                      for k in (0, 1))
        figures.append(TileFigures((size, size), (shape[0], shape[1]),
                                   interior_overhead(geometry, size, halo),
                                   _estimate(memory, (channels, shape[0], shape[1]))))
    return tuple(figures)


def _estimate(memory: Any, shape: tuple[int, int, int]) -> int | None:
    """The memory estimate, or None where it cannot be made cheaply."""
    try:
        return int(memory(shape))
    except Exception:  # an estimate, not a check: meta tensors or shape inference may fail
        return None


def _shortened(reason: str) -> str:
    """The analysis's reason up to its advice, led by "global context"."""
    head = reason.split("; ", 1)[0].strip()
    return head if head.startswith("global context") else f"global context: {head}"


# --------------------------------------------------------------------------- rendering


def _shape_text(shape: Shape) -> str:
    """``(N, C, H, W)`` with N for any batch and "any" for a dynamic H or W."""
    head = "N" if shape[0] is None else str(shape[0])
    return "(" + ", ".join([head, *("any" if d is None else str(d) for d in shape[1:])]) + ")"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f} MiB" if value >= 2**20 \
        else f"{value / 2**10:.0f} KiB"


def _px(pair: Pair) -> str:
    return f"{pair[0]}x{pair[1]}"


def _label(row: InspectRow) -> str:
    """A spec's file stem, or the name as given."""
    return Path(row.name).stem if row.source else row.name


def _field_word(row: InspectRow) -> str:
    return row.method or "global"


def render_table(rows: list[InspectRow], tile_sizes: tuple[int, ...]) -> str:
    """A fixed-width table (one row per model), then a block per spec with its shapes,
    field, halo, window, padding and the window, overhead and memory per tile size."""
    width = max([14, *(len(_label(row)) for row in rows)])
    head = (f"{'model':<{width}} {'back':<5} {'field':<8} {'RF':>5} {'stride':>6} "
            f"{'coarse RF/s':>11} {'align':>5} {'halo':>9} "
            + " ".join(f"{'ovh@' + str(t):>8}" for t in tile_sizes))
    lines = [head, "-" * len(head)]
    for row in rows:
        coarse = f"{row.coarse.size[0]}/{row.coarse.stride[0]}" if row.coarse else "-"
        rf = str(row.field.size[0]) if row.field else "-"
        stride = str(row.stride[0]) if row.stride else "-"
        align = str(row.field.align[0]) if row.field else "-"
        halo = f"{row.halo.before[0]}/{row.halo.after[0]}" if row.halo else "-"
        overheads = {t.tile[0]: t.overhead for t in row.tiles} if not row.fixed else {}
        lines.append(
            f"{_label(row):<{width}} {row.backend:<5} {_field_word(row):<8} {rf:>5} {stride:>6} "
            f"{coarse:>11} {align:>5} {halo:>9} "
            + " ".join(f"{overheads[t]:>8.3f}" if t in overheads else f"{'-':>8}"
                       for t in tile_sizes))
    lines += textwrap.wrap(
        "field: how the receptive field is known (analysed torch graph, probed on ONNX "
        "Runtime, declared halo; global: global context, no halo known); RF: receptive field "
        "(px) of the dense output; coarse: the classic FCN (features + head, FCN paper "
        "Table 1); halo: px before/after a tile; ovh: pixels computed / pixels output for an "
        "interior tile.", WIDTH)
    for row in rows:
        if row.source:
            lines += ["", *_block(row)]
    return "\n".join(lines)


def _line(key: str, text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=f"  {key:<10} ",
                         subsequent_indent=" " * 13) or [f"  {key}"]


def _block(row: InspectRow) -> list[str]:
    """The details of one spec, lines of at most :data:`WIDTH` characters."""
    out = [f"{_label(row)}: {row.source}", *_line("back end", row.backend)]
    out += _line("input", f"{_shape_text(row.input_shape)} {row.input_dtype}, "
                          f"{row.channels} channels")
    what = (f"scores {_shape_text(row.output_shape)}, {row.output_shape[1]} classes"
            if row.output == SCORES else f"labels {_shape_text(row.output_shape)}")
    out += _line("output", what)
    if row.field is not None:
        f = row.field
        out += _line("field", f"{row.method}: {_px(f.size)} px, stride {_px(f.stride)}, "
                              f"offset {f.offset[0]},{f.offset[1]}, align {_px(f.align)}")
    elif row.refused and row.halo is not None:
        out += _line("field", f"{row.refused}; halo declared, deviation measured per scene")
    elif row.refused:
        out += _line("field", f"{row.refused}; {_HALO_HINT}")
    if row.halo is not None:
        h = row.halo
        how = row.method if not row.declared else "declared" if row.field is None \
            else f"declared, larger than the {row.method} field's"
        out += _line("halo", f"rows {h.before[0]}/{h.after[0]}, cols {h.before[1]}/"
                             f"{h.after[1]} px before/after a tile ({how})")
    else:
        out += _line("halo", f"none known: {_HALO_HINT}")
    if row.window is not None:
        out += _line("window", f"{_px(row.window)} px fixed (the graph's static H, W); scene "
                               "edges padded, padding never labelled")
    if row.congruent:
        align = row.field.align if row.field else (1, 1)
        out += _line("padding", "depends on the input length (TensorFlow \"same\"): windows "
                                f"congruent to the scene's size modulo {_px(align)}")
    for i, t in enumerate(row.tiles):
        key = "tiles" if i == 0 else ""
        fixed = " (fixed)" if row.fixed else ""
        out += _line(key, f"{_px(t.tile)} px{fixed}: window {_px(t.window)}, overhead "
                          f"{t.overhead:.3f}, {_mib(t.memory)} per window")
    return out


def rows_as_json(rows: list[InspectRow], tile_sizes: tuple[int, ...]) -> list[dict[str, object]]:
    """The rows as plain values (``fcn-pipeline inspect --json``); sizes in px, ``(rows, cols)``;
    a dim any size runs is null."""
    return [_row_json(row, tile_sizes) for row in rows]


def _row_json(row: InspectRow, tile_sizes: tuple[int, ...]) -> dict[str, object]:
    f = row.field
    by_tile = {t.tile[0]: t for t in row.tiles} if not row.fixed else {}
    fixed = row.tiles[0] if row.fixed and row.tiles else None
    return {
        "model": row.name, "source": row.source, "backend": row.backend,
        "input": {"shape": list(row.input_shape), "dtype": row.input_dtype,
                  "channels": row.channels},
        "output": {"layout": row.output, "shape": list(row.output_shape)},
        "method": row.method,
        "global_context": row.refused,
        "receptive_field": list(f.size) if f else None,
        "stride": list(row.stride) if row.stride else None,
        "offset": list(f.offset) if f else None, "align": list(f.align) if f else None,
        "halo": None if row.halo is None else {"before": list(row.halo.before),
                                               "after": list(row.halo.after)},
        "halo_declared": row.declared,
        "window": list(row.window) if row.window else None,
        "length_dependent_padding": row.congruent,
        "coarse": None if row.coarse is None else {
            "receptive_field": list(row.coarse.size), "stride": list(row.coarse.stride)},
        "overhead": {str(t): by_tile[t].overhead if t in by_tile else None for t in tile_sizes},
        "memory_bytes": {str(t): by_tile[t].memory if t in by_tile else None
                         for t in tile_sizes},
        "fixed_tile": None if fixed is None else {
            "tile": list(fixed.tile), "window": list(fixed.window),
            "overhead": fixed.overhead, "memory_bytes": fixed.memory},
    }
