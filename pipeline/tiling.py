"""The tile size of a run, and what it rests on: the analysed model, the memory one task
needs, and the model's measured speed per window.

:func:`analyse_model` builds the network of a spec, checks that its first convolution
takes as many channels as the spec lists bands, and derives its receptive field.
:func:`choose_tiles` picks the tile size: as given, or automatically
(:func:`pipeline.plan.choose_tile_size`) among the sizes whose task fits the memory
budget, from window speeds measured once per output folder on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from dataclasses import field as dataclass_field
from pathlib import Path

import numpy as np
import torch

from pipeline.analysis import receptive_field
from pipeline.cluster import default_workers
from pipeline.config import RunConfig
from pipeline.errors import ModelAnalysisError, ModelError, SceneLimitError
from pipeline.exactness import ANALYSED, DECLARED, PROBED, Exactness, exact
from pipeline.grid import TileGrid, fixed_tile_size
from pipeline.inference import (
    activation_bytes,
    output_shape,
    weight_bytes,
    window_speeds,
)
from pipeline.journal import earlier_tile_sizes, fingerprint, load_window_speeds
from pipeline.limits import cpu_budget, window_bytes, window_problem
from pipeline.model import build_model, load_network
from pipeline.modelspec import LABELS, ONNX, SCORES, ModelSpec, read_weights
from pipeline.networks import Network, TorchNetwork, input_channels, onnx_memory
from pipeline.plan import (
    TILE_CANDIDATES,
    MemoryEstimate,
    ScenePlan,
    TileChoice,
    candidate_sizes,
    choose_tile_size,
)
from pipeline.probing import probe_onnx
from pipeline.receptive import Halo, ReceptiveField, align_up
from pipeline.scene import SceneInfo


@dataclass(frozen=True)
class AnalysedModel:
    """A spec's network, built and analysed: what planning a run needs of the model.

    ``field``: the receptive field (derived), or a pixel-wise field at the output's
    stride when the halo is declared; ``method``: how the field is known
    (:data:`pipeline.exactness.ANALYSED`, ``PROBED`` or ``DECLARED``); ``declared``:
    the halo the tiles use when it is not the field's own (declared for a model with
    global context, or a larger one asked of an exact model); ``module``: the torch
    module of a torch network, else None.
    """

    spec: ModelSpec
    sha256: str
    field: ReceptiveField
    network: Network
    method: str = ANALYSED
    declared: Halo | None = None
    module: torch.nn.Module | None = None
    #: The ONNX graph's bytes (its memory is estimated from them), else None.
    graph: bytes | None = None
    #: Windows must be congruent to the scene's length modulo ``align``: the network's
    #: padding depends on its input's length (:meth:`pipeline.grid.TileGrid.congruent`).
    congruent: bool = False
    #: ``(C, H, W, batch)`` -> (activation, weight) bytes of an ONNX graph, kept: shape
    #: inference of a real graph takes a good fraction of a second, and planning asks
    #: for the same windows again.
    _graph_memory: dict[tuple[int, ...], tuple[int, int]] = dataclass_field(
        default_factory=dict, compare=False, repr=False)
    #: Why the analysis refused to derive the field, when a declared halo stands in.
    refused: str | None = None

    @property
    def exact(self) -> bool:
        """Tiles equal one prediction over the whole scene."""
        return self.method != DECLARED

    @property
    def halo(self) -> Halo:
        """The halo around every tile."""
        return self.declared if self.declared is not None else self.field.halo()

    @property
    def window(self) -> tuple[int, int] | None:
        """The one input ``(rows, cols)`` the network takes, or None."""
        return self.network.signature.window

    def grid(self, shape: tuple[int, int], tile: int) -> TileGrid:
        """The tiles of a scene of ``shape`` (output at the scene's resolution)."""
        grid = TileGrid.build(shape, shape, self.field, tile, self.declared, window=self.window)
        return grid.congruent() if self.congruent else grid

    def exactness(self) -> Exactness:
        """The record of an exact tiling; a declared halo's is measured per scene."""
        return exact(self.method, self.halo)


def _declared_halo(spec: ModelSpec, halo: tuple[int, int] | None) -> Halo | None:
    """The halo declared by ``--halo`` (``tiling.halo``), else by the spec, else None."""
    pair = halo if halo is not None else spec.halo
    return None if pair is None else Halo.of((int(pair[0]), int(pair[1])))


def analyse_model(spec: ModelSpec, sha256: str, *, trust_code: bool = False,
                  halo: tuple[int, int] | None = None) -> AnalysedModel:
    """Build ``spec``'s network (weights ``sha256``) and derive its receptive field.

    ``trust_code``: the run trusts the spec's code (see :func:`pipeline.model.build_model`).
    ``halo``: a declared halo ``(rows, cols)`` px (``--halo``), over the spec's ``halo``.
    A model whose field is derived is tiled exactly (a declared halo larger than the
    derived one is used, a smaller one is not); a model the analysis refuses runs only
    with a declared halo, its deviation measured per scene (:mod:`pipeline.exactness`).

    Raises:
        ModelError: the network's first convolution takes another number of channels
            than the spec lists bands, or it cannot be built.
        ModelAnalysisError: its receptive field cannot be derived and no halo is
            declared; the line gives the analysis's reason and how to declare one.
    """
    declared = _declared_halo(spec, halo)
    if spec.backend == ONNX:
        return _analyse_graph(spec, sha256, declared)
    module = build_model(spec, trust_code=trust_code)
    channels = input_channels(module, len(spec.bands))
    if channels is not None and channels != len(spec.bands):
        raise ModelError(
            f"{spec.source}: the model takes {channels} input channels but bands lists "
            f"{len(spec.bands)} ({list(spec.bands)}); list {channels} scene bands in bands")
    _check_layout(spec, output_shape(module, (len(spec.bands), 64, 64)))
    network = TorchNetwork(module, channels=channels, output=spec.output or SCORES)
    try:
        field = receptive_field(module)
    except ModelAnalysisError as exc:
        if declared is None:
            raise _needs_halo(spec, exc) from exc
        field = _pointwise(output_shape(module, (len(spec.bands), 256, 256)), (256, 256))
        return AnalysedModel(spec, sha256, field, network, DECLARED, declared, module,
                             refused=str(exc))
    return AnalysedModel(spec, sha256, field, network, ANALYSED,
                         _larger(declared, field), module)


def _analyse_graph(spec: ModelSpec, sha256: str, declared: Halo | None) -> AnalysedModel:
    """An ONNX spec: its network (checked against the spec) and its field, probed on the
    runtime (:func:`pipeline.probing.probe_onnx`), or pixel-wise under a declared halo."""
    graph = read_weights(spec)
    network = load_network(spec)
    try:
        probed = probe_onnx(graph, input_name=spec.onnx_input, output_name=spec.onnx_output)
    except ModelAnalysisError as exc:
        if declared is None:
            raise _needs_halo(spec, exc) from exc
        shape = network.signature.window or (64, 64)
        out = network.forward(np.zeros((1, len(spec.bands), *shape), np.float32)).shape
        scores = out[1:] if len(out) == 4 else (1, *out[1:])
        return AnalysedModel(spec, sha256, _pointwise(tuple(scores), shape), network, DECLARED,
                             declared, graph=graph, refused=str(exc))
    return AnalysedModel(spec, sha256, probed.field, network, PROBED,
                         _larger(declared, probed.field), graph=graph,
                         congruent=probed.size_dependent_padding)


def _check_layout(spec: ModelSpec, out: tuple[int, ...]) -> None:
    """Raise :class:`ModelError` when a torch network's output, ``out`` for one image,
    is not the layout the spec declares (``(K, H, W)`` scores, ``(H, W)`` labels)."""
    found = {3: SCORES, 2: LABELS}.get(len(out))
    if spec.output is not None and found is not None and found != spec.output:
        raise spec.error("output", f"declares {spec.output} but the network gives {found} "
                                   f"(shape {tuple(out)} per image)")


def _needs_halo(spec: ModelSpec, exc: ModelAnalysisError) -> ModelAnalysisError:
    """The analysis's refusal, and how to run the model anyway, said once."""
    reason = str(exc).strip()
    for advice in ("; declare a halo to run it approximately", "; declare a halo"):
        if reason.endswith(advice):
            reason = reason[: -len(advice)]
            break
    return ModelAnalysisError(
        f"{spec.source}: {reason}; no halo makes this model's tiles exact: declare one "
        "(--halo PX or halo: in the spec) to run it with its deviation from one-window "
        "prediction measured and reported")


def _pointwise(out: tuple[int, ...], shape: tuple[int, int]) -> ReceptiveField:
    """A pixel-wise field at the stride an output of ``out`` for ``shape`` implies.

    Raises:
        ModelError: the output is not the input divided by an integer stride.
    """
    if len(out) != 3 or any(n % m for n, m in zip(shape, out[1:])):
        raise ModelError(f"the model gives an output of {tuple(out)} for a {shape} input; "
                         "expected (classes, H, W) at an integer stride")
    return ReceptiveField.pointwise((shape[0] // out[1], shape[1] // out[2]))


def _larger(declared: Halo | None, field: ReceptiveField) -> Halo | None:
    """A declared halo an exact model uses: only where it exceeds the derived one."""
    if declared is None:
        return None
    derived = field.halo()
    if all(d >= f for d, f in zip((*declared.before, *declared.after),
                                  (*derived.before, *derived.after))):
        return declared if declared != derived else None
    return None


def check_output_shape(info: SceneInfo, model: AnalysedModel) -> None:
    """Raise :class:`ModelError` unless the model's output has the scene's size."""
    if model.module is not None:
        shape = output_shape(model.module, (len(model.spec.bands), *info.shape))
        rows, cols = shape[1], shape[2]
    else:
        rows, cols = (n // s for n, s in zip(info.shape, model.field.stride))
    if (rows, cols) != info.shape:
        raise ModelError(
            f"{model.spec.source}: the model gives a {cols}x{rows} (width x height) "
            f"output for the {info.shape[1]}x{info.shape[0]} scene {Path(info.path).name}; label "
            "maps need an output at the scene's resolution (upsample in the model)"
        )


def task_memory(model: AnalysedModel, scenes: Sequence[SceneInfo], window: tuple[int, int],
                batch_size: int) -> MemoryEstimate:
    """Peak bytes of one inference task on windows of ``window`` pixels of the most
    demanding of ``scenes``: the windows as read from its file (its dtype and layout,
    :func:`pipeline.limits.window_bytes`), the network's activations and its weights."""
    channels = len(model.spec.bands)
    rows, cols = window
    classes = len(model.spec.classes)
    return MemoryEstimate(
        window_input=max((window_bytes(info, channels, classes, window, batch_size)
                          for info in scenes), default=0),
        activations=_activations(model, (channels, rows, cols), batch_size),
        weights=_weights(model),
    )


def _activations(model: AnalysedModel, shape: tuple[int, int, int], batch_size: int) -> int:
    """Peak activation bytes of one forward pass over ``batch_size`` windows of ``shape``."""
    if model.module is not None:
        return activation_bytes(model.module, shape, batch_size)
    return _graph_memory(model, shape, batch_size)[0]


def _weights(model: AnalysedModel) -> int:
    """Bytes of the network's weights."""
    if model.module is not None:
        return weight_bytes(model.module)
    return _graph_memory(model, (len(model.spec.bands), 64, 64), 1)[1]


def _graph_memory(model: AnalysedModel, shape: tuple[int, int, int],
                  batch_size: int) -> tuple[int, int]:
    """An ONNX graph's activation and weight bytes (:func:`onnx_memory`), once per shape;
    (0, 0) without a graph."""
    if model.graph is None:
        return (0, 0)
    key = (*shape, batch_size)
    if key not in model._graph_memory:
        model._graph_memory[key] = onnx_memory(model.graph, shape, batch_size,
                                               input_name=model.spec.onnx_input)
    return model._graph_memory[key]


def default_budget(config: RunConfig, device: str) -> int:
    """A safe share of a worker's memory: 60 % of the GPU; on CPUs
    :func:`pipeline.limits.cpu_budget`."""
    if config.memory_budget:
        return config.memory_budget
    if device == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory * 0.6)
    return cpu_budget(config)


def fitting_task(info: SceneInfo, model: AnalysedModel, window: tuple[int, int],
                 batch_size: int, budget: int,
                 network: MemoryEstimate | None = None) -> MemoryEstimate:
    """One task's memory on ``window`` px windows of ``info`` (``network``: the
    activations and weights of that window when already known), checked against
    ``budget``.

    Raises:
        SceneLimitError: it needs more than ``budget``; the line names the scene, the
            bytes, the budget and the settings that change them.
    """
    bands, classes = len(model.spec.bands), len(model.spec.classes)
    network = network or task_memory(model, [], window, batch_size)
    need = replace(network, window_input=window_bytes(info, bands, classes, window, batch_size))
    problem = window_problem(info, bands, need.total, window, batch_size, budget)
    if problem:
        raise SceneLimitError(problem)
    return need


def check_task_memory(plans: Sequence[ScenePlan], model: AnalysedModel, config: RunConfig,
                      device: str, tile: int) -> MemoryEstimate:
    """Check that one task on each scene's largest window fits the memory budget
    (:func:`default_budget`); return the estimate of the most demanding one (of a
    ``tile`` px window when there is no plan).

    Raises:
        SceneLimitError: a scene's task needs more than the budget (:func:`fitting_task`).
    """
    budget = default_budget(config, device)
    network: dict[tuple[int, int], MemoryEstimate] = {}
    worst: MemoryEstimate | None = None
    for plan in plans:
        window = plan.grid.max_window_shape
        if window not in network:  # activations and weights depend on the window alone
            network[window] = task_memory(model, [], window, config.batch_size)
        need = fitting_task(plan.info, model, window, config.batch_size, budget,
                            network[window])
        if worst is None or need.total > worst.total:
            worst = need
    return worst or task_memory(model, [], (tile, tile), config.batch_size)


@dataclass(frozen=True)
class Tiling:
    """The tile choice and, where they were measured now, the window speeds behind it."""

    choice: TileChoice
    speeds_key: str | None = None
    measured: dict[tuple[int, int], float] | None = None


def _speed_lookup(speeds: dict[tuple[int, int], float]) -> Callable[[tuple[int, int]], float]:
    """Speed of a window: as measured, else that of the largest measured window not
    bigger (beyond the measured sizes the last speed is assumed to hold)."""
    ordered = sorted(speeds, key=lambda s: s[0] * s[1])

    def speed(window: tuple[int, int]) -> float:
        if window in speeds:
            return speeds[window]
        smaller = [s for s in ordered if s[0] * s[1] <= window[0] * window[1]]
        return speeds[smaller[-1] if smaller else ordered[0]]

    return speed


def choose_tiles(infos: list[SceneInfo], config: RunConfig, model: AnalysedModel,
                 device: str, out_dir: Path, stems: list[str] | None = None) -> Tiling:
    """The tile size for ``infos``: ``config.tile_size``; else, automatically, the size the
    outputs or unfinished work of ``stems`` in ``out_dir`` were made with (one size, still
    within the memory budget: reruns and resumes plan the same tiles, whatever a new
    measurement would say); else the best estimate (window speeds from ``out_dir``'s
    journal, or measured now on a CPU and returned to be kept)."""
    if model.window is not None:
        rows, cols = model.window
        fixed = fixed_tile_size(model.window, model.field, model.declared)
        return Tiling(TileChoice(fixed[0], f"fixed: the network takes only {cols}x{rows} px "
                                          f"windows, less the halo"))
    if config.tile_size is not None:
        return Tiling(TileChoice(config.tile_size, "as given"))
    workers = config.workers or default_workers(config.threads_per_worker, device == "cuda")
    field = model.field
    halo = model.halo
    budget = default_budget(config, device)

    # a window never exceeds the largest scene (windows are clamped to their scene)
    sides_of_scenes = [max((i.shape[k] for i in infos), default=0) for k in (0, 1)]

    def window(tile: int) -> tuple[int, int]:
        sides = []
        for k in (0, 1):
            side = align_up(tile + halo.before[k] + halo.after[k], field.align[k])
            most = sides_of_scenes[k]
            sides.append(min(side, align_up(most, field.align[k])) if most else side)
        return (sides[0], sides[1])

    def memory_of(tile: int) -> int:
        return task_memory(model, infos, window(tile), config.batch_size).total

    earlier = earlier_tile_sizes(out_dir, stems or [])
    if len(earlier) == 1 and (need := memory_of(size := next(iter(earlier)))) <= budget:
        return Tiling(TileChoice(size, f"auto: the size the earlier work in {out_dir} was made "
                                       f"with ({need / 2**20:.0f} MiB needed of "
                                       f"{budget / 2**20:.0f} MiB per task)"))
    shapes = [i.shape for i in infos]
    if shapes:  # a scene whose windows fit at no size is named, not only the budget
        smallest = window(candidate_sizes(shapes, field)[0])
        network = task_memory(model, [], smallest, config.batch_size)
        for info in infos:
            fitting_task(info, model, smallest, config.batch_size, budget, network)
    if device != "cpu" or not shapes:
        # GPUs run bigger windows no slower per pixel; the client may not even have one.
        return Tiling(choose_tile_size(shapes, field, workers, memory_of, budget))
    key = fingerprint({"model_sha256": model.sha256, "device": device,
                       "threads_per_worker": config.threads_per_worker})
    speeds = load_window_speeds(out_dir, key)
    measured = None
    if speeds is None:
        largest = max(max(s) for s in shapes)
        windows = [window(t) for t in TILE_CANDIDATES
                   if t <= align_up(largest, max(field.align)) and memory_of(t) <= budget]
        speeds = measured = window_speeds(model.network, len(model.spec.bands),
                                          windows or [window(TILE_CANDIDATES[0])],
                                          config.threads_per_worker)
    lookup = _speed_lookup(speeds)
    choice = choose_tile_size(shapes, field, workers, memory_of, budget,
                              speed_of=lambda tile: lookup(window(tile)))
    return Tiling(choice, key, measured)
