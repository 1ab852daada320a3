"""The run plan: which scenes, which tiles, where outputs go. Pure: no I/O, no Dask."""

from __future__ import annotations

import hashlib
import math
import os
import re
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.grid import Tile, TileGrid
from pipeline.overviews import COG_BLOCKSIZE, overview_factors, tile_levels
from pipeline.receptive import Halo, ReceptiveField, align_up
from pipeline.scene import SceneInfo

#: Characters kept in output names: Unicode letters and digits, ``_``, ``.`` and ``-``.
_UNSAFE = re.compile(r"[^\w.\-]+")
#: Longest stem, in UTF-8 bytes: ``STEM.zarr`` and the journal's ``STEM.json`` must fit in
#: the 255 bytes most file systems allow a name.
MAX_STEM_BYTES = 200


@dataclass(frozen=True)
class Outputs:
    """Where one scene's outputs go, inside the output directory."""

    stem: str
    store: Path
    cog: Path


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def output_stem(scene: str | Path) -> str:
    """A safe output name from a scene's file name.

    Unicode letters and digits (NFC-normalised), ``_``, ``.`` and ``-`` are kept;
    any other run of characters becomes ``_``; a leading dot is dropped, so a name
    never escapes the output directory or hides; a name too long for a file system
    is cut and given a digest of the whole name.
    """
    name = unicodedata.normalize("NFC", Path(scene).stem)
    stem = _UNSAFE.sub("_", name).lstrip(".") or "scene"
    if len(stem.encode("utf-8", "surrogateescape")) > MAX_STEM_BYTES:
        cut = stem.encode("utf-8", "surrogateescape")[:MAX_STEM_BYTES - 9]
        stem = cut.decode("utf-8", "ignore") + "-" + _digest(name)
    return stem


def outputs_for(scene: str | Path, out_dir: Path) -> Outputs:
    """Outputs of one scene named by :func:`output_stem`, always inside ``out_dir``."""
    stem = output_stem(scene)
    return Outputs(stem, out_dir / f"{stem}.zarr", out_dir / f"{stem}.tif")


def name_outputs(scenes: list[str], out_dir: Path,
                 owners: Mapping[str, str] | None = None) -> list[Outputs]:
    """Outputs for every scene of a run, no two alike.

    Scenes whose names give the same stem (compared without case, as on
    case-insensitive file systems) are told apart deterministically: the scene that
    ``owners`` (stem -> scene path, from the output folder's journal) says has the
    stem already keeps it, else the first in the order of absolute paths; each other
    one gets ``-`` and 8 hexadecimal digits of the sha256 of its absolute path. A
    scene whose stem belongs to another file that still exists (an earlier run's) gets
    the suffix too, even alone: it never takes over that file's outputs.
    """
    owners = owners or {}
    stems = [output_stem(s) for s in scenes]
    groups: dict[str, list[int]] = {}
    for k, stem in enumerate(stems):
        groups.setdefault(stem.casefold(), []).append(k)
    for members in groups.values():
        ordered = sorted(members, key=lambda k: (
            os.path.abspath(scenes[k]) != owners.get(stems[k]), os.path.abspath(scenes[k])))
        owner = owners.get(stems[ordered[0]])
        taken = owner is not None and owner != os.path.abspath(scenes[ordered[0]]) \
            and os.path.exists(owner)
        for k in ordered if taken else ordered[1:]:
            stems[k] = f"{stems[k]}-{_digest(os.path.abspath(scenes[k]))}"
    return [Outputs(stem, out_dir / f"{stem}.zarr", out_dir / f"{stem}.tif") for stem in stems]


@dataclass(frozen=True)
class ScenePlan:
    """One scene to label: its header, tile grid and outputs."""

    info: SceneInfo
    grid: TileGrid
    outputs: Outputs

    def batches(self, size: int,
                skip: frozenset[tuple[int, int]] = frozenset()) -> Iterator[tuple[Tile, ...]]:
        """Tiles in row-major runs of ``size``, leaving out ``skip``; runs never cross a row.

        Made one run at a time: a scene of a million tiles is never held in memory.
        Tiles in one run mostly share their window shape, so they go through the network
        as one batch.
        """
        rows, cols = self.grid.grid_shape
        for i in range(rows):
            run: list[Tile] = []
            for j in range(cols):
                if (i, j) in skip:
                    continue
                run.append(self.grid.tile(i, j))
                if len(run) == size:
                    yield tuple(run)
                    run = []
            if run:
                yield tuple(run)

    def overview_levels(self, blocksize: int = COG_BLOCKSIZE) -> int:
        """How many of the COG's overview levels the tiles build themselves."""
        shape = self.info.shape
        return tile_levels(shape, self.grid.tile_shape, len(overview_factors(shape, blocksize)))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one inference task holds at its peak, roughly."""

    window_input: int
    activations: int
    weights: int

    @property
    def total(self) -> int:
        return self.window_input + self.activations + self.weights


def describe(plans: list[ScenePlan], field: ReceptiveField, memory: MemoryEstimate,
             batch_size: int, choice: TileChoice, method: str = "analysed",
             halo: Halo | None = None) -> str:
    """The dry-run text: tiles, halo, overhead and memory, per scene and in total.
    ``method``: how the field is known (analysed, probed, or declared: a halo declared
    for a model with global context); ``halo``: the one the tiles use (default: the
    field's), shown when no scene is planned."""
    halo = plans[0].grid.halo if plans else (halo or field.halo())
    geometry = (f"receptive field {field.size[0]}x{field.size[1]} px ({method}), stride "
                f"{field.stride[0]}, windows aligned to {field.align[0]} px")
    if method == "declared":
        geometry = ("receptive field: not finite (global context), halo declared; "
                    f"stride {field.stride[0]}")
    lines = [
        f"tile size {choice.size} px ({choice.reason})",
        geometry,
        f"halo before {halo.before[0]}x{halo.before[1]} px, after {halo.after[0]}x{halo.after[1]} "
        "px (rows x cols)",
        f"memory per inference task ~{memory.total / 2**20:.0f} MiB "
        f"(input {memory.window_input / 2**20:.0f}, activations {memory.activations / 2**20:.0f}, "
        f"weights {memory.weights / 2**20:.0f}) with batch size {batch_size}",
    ]
    total_tiles = total_px = computed = 0
    for plan in plans:
        grid = plan.grid
        rows, cols = grid.scene_shape
        lines.append(
            f"{plan.outputs.stem}: {cols}x{rows} px (width x height), {len(grid)} tiles "
            f"({grid.grid_shape[1]}x{grid.grid_shape[0]} of "
            f"{grid.tile_shape[1]}x{grid.tile_shape[0]} px), overhead {grid.overhead:.3f} -> "
            f"{plan.outputs.store.name}, {plan.outputs.cog.name}"
        )
        total_tiles += len(grid)
        total_px += rows * cols
        computed += grid.computed_pixels
    if plans:
        lines.append(
            f"total: {len(plans)} scenes, {total_tiles} tiles, {total_px / 1e6:.1f} Mpx, "
            f"overhead {computed / total_px:.3f} (pixels computed / pixels output)"
        )
    return "\n".join(lines)


#: Tile sizes the automatic choice considers (rounded up to the field's ``align``).
TILE_CANDIDATES = (256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


@dataclass(frozen=True)
class TileChoice:
    """The tile size a run uses, and why."""

    size: int
    reason: str


#: The automatic choice takes the smallest tile whose estimated throughput is within this
#: fraction of the best: the estimate is rough, and smaller tiles need less memory and
#: leave more tasks to balance.
TILE_TOLERANCE = 0.03


def candidate_sizes(shapes: list[tuple[int, int]], field: ReceptiveField) -> list[int]:
    """The tile sizes the automatic choice considers for scenes of ``shapes`` (at least
    one): :data:`TILE_CANDIDATES` aligned to the field, none beyond the largest scene."""
    largest = max(max(shape) for shape in shapes)
    return sorted({min(align_up(c, max(field.align)), align_up(largest, max(field.align)))
                   for c in TILE_CANDIDATES})


def choose_tile_size(shapes: list[tuple[int, int]], field: ReceptiveField, workers: int,
                     memory_of: Callable[[int], int], budget: int,
                     speed_of: Callable[[int], float] | None = None) -> TileChoice:
    """The smallest tile size within :data:`TILE_TOLERANCE` of the best estimated
    throughput, among those whose task memory fits ``budget``.

    Throughput is estimated as parallel efficiency (all ``workers`` busy:
    ``tiles / (workers * ceil(tiles / workers))``) times the model's speed on the
    tile's windows (``speed_of(tile)``, pixels per second; the same for every size
    when not given) over halo overhead (pixels computed per pixel output): bigger
    tiles cut the overhead until there are too few of them to keep every worker
    busy, a task no longer fits, or, on CPUs, windows outgrow the caches and run
    slower per pixel. ``memory_of(tile)`` estimates one task's peak bytes.
    """
    if not shapes:
        return TileChoice(TILE_CANDIDATES[0], "no scene to plan")
    sizes = candidate_sizes(shapes, field)
    scored: list[tuple[float, int, str]] = []
    for size in sizes:
        need = memory_of(size)
        if need > budget:
            continue
        grids = [TileGrid.build(shape, shape, field, size) for shape in shapes]
        tiles = sum(len(g) for g in grids)
        overhead = sum(g.computed_pixels for g in grids) / sum(r * c for r, c in shapes)
        efficiency = tiles / (workers * math.ceil(tiles / workers))
        speed = speed_of(size) if speed_of else 1.0
        measured = f", windows at {speed / 1e6:.2f} Mpx/s measured" if speed_of else ""
        scored.append((efficiency * speed / overhead, size, (
            f"{need / 2**20:.0f} MiB needed of {budget / 2**20:.0f} MiB per task: "
            f"{tiles} tiles for {workers} workers (efficiency {efficiency:.2f}), "
            f"halo overhead {overhead:.3f}{measured}")))
    if not scored:
        smallest = sizes[0]
        raise ConfigError(
            f"even {smallest} px tiles need {memory_of(smallest) / 2**20:.0f} MiB per task, over "
            f"the memory budget of {budget / 2**20:.0f} MiB; raise --memory-budget or lower "
            "--batch-size"
        )
    top = max(score for score, _, _ in scored)
    score, size, detail = next(s for s in scored if s[0] >= top * (1 - TILE_TOLERANCE))
    return TileChoice(size, (
        f"auto: smallest tile within {TILE_TOLERANCE:.0%} of the best estimated throughput "
        f"({score / top:.3f} of it) among those fitting the memory budget; {detail}"))
