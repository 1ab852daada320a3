"""Figures for ``fcn-pipeline inspect``: receptive field, halo and overhead per model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.analysis import receptive_field
from pipeline.grid import interior_overhead
from pipeline.receptive import Halo, ReceptiveField


@dataclass(frozen=True)
class InspectRow:
    """One model's geometry and its interior-tile overhead per tile size."""

    name: str
    field: ReceptiveField
    halo: Halo
    coarse: ReceptiveField | None
    overheads: tuple[float, ...]


def _build(name: str, trust_code: bool) -> nn.Module:
    from pipeline import models

    if name in models.ARCHITECTURES:
        with torch.device("meta"):
            return models.build(name).eval()
    from pipeline.model import build_model
    from pipeline.modelspec import load_spec

    return build_model(load_spec(name), trust_code=trust_code)


def inspect_rows(names: tuple[str, ...], tile_sizes: tuple[int, ...], *,
                 trust_code: bool = False) -> list[InspectRow]:
    """Analyse each model (all built-ins when ``names`` is empty); ``trust_code`` lets a
    spec's import path run (see :func:`pipeline.model.build_model`).

    Raises:
        PipelineError: a spec, its weights or its network cannot be used (one line).
    """
    from pipeline import models

    rows = []
    for name in names or tuple(models.ARCHITECTURES):
        module = _build(name, trust_code)
        field = receptive_field(module)
        coarse = None
        features, head = getattr(module, "features", None), getattr(module, "head", None)
        if isinstance(features, nn.Module) and isinstance(head, nn.Module):
            coarse = receptive_field(nn.Sequential(features, head))
        rows.append(InspectRow(name, field, field.halo(), coarse,
                               tuple(interior_overhead(field, t) for t in tile_sizes)))
    return rows


def render_table(rows: list[InspectRow], tile_sizes: tuple[int, ...]) -> str:
    """A fixed-width table of the rows."""
    head = (f"{'model':<14} {'RF':>5} {'stride':>6} {'coarse RF/stride':>16} {'align':>5} "
            f"{'halo':>9} " + " ".join(f"{'ovh@' + str(t):>9}" for t in tile_sizes))
    lines = [head, "-" * len(head)]
    for row in rows:
        coarse = f"{row.coarse.size[0]}/{row.coarse.stride[0]}" if row.coarse else "-"
        halo = f"{row.halo.before[0]}/{row.halo.after[0]}"
        lines.append(
            f"{row.name:<14} {row.field.size[0]:>5} {row.field.stride[0]:>6} {coarse:>16} "
            f"{row.field.align[0]:>5} {halo:>9} "
            + " ".join(f"{o:>9.3f}" for o in row.overheads)
        )
    lines.append("RF: receptive field (px) of the dense output; coarse: the classic FCN "
                 "(features + head, FCN paper Table 1); halo: px before/after a tile; "
                 "ovh: pixels computed / pixels output for an interior tile.")
    return "\n".join(lines)


def rows_as_json(rows: list[InspectRow], tile_sizes: tuple[int, ...]) -> list[dict[str, object]]:
    """The rows as plain values (``fcn-pipeline inspect --json``); sizes in px, ``(rows, cols)``."""
    return [
        {
            "model": row.name,
            "receptive_field": list(row.field.size), "stride": list(row.field.stride),
            "offset": list(row.field.offset), "align": list(row.field.align),
            "halo": {"before": list(row.halo.before), "after": list(row.halo.after)},
            "coarse": None if row.coarse is None else {
                "receptive_field": list(row.coarse.size), "stride": list(row.coarse.stride)},
            "overhead": {str(t): o for t, o in zip(tile_sizes, row.overheads)},
        }
        for row in rows
    ]
