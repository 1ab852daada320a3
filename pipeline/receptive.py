"""Receptive fields as value objects: pure arithmetic, no torch.

A dense-prediction network maps output pixel ``j`` (per axis) to the input
pixels ``offset + j * stride ... offset + j * stride + size - 1``. Those three
integers, per axis, are all the tiling code needs, plus ``align``: the step
that window edges must sit on so every inner feature map of a window lines up
with the whole image's (the least common multiple of the inner strides; the
"max stride" of the FCN paper's Table 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import GeometryError

Pair = tuple[int, int]


def align_up(value: int, step: int) -> int:
    """Smallest multiple of ``step`` that is >= ``value``."""
    return -(-value // step) * step


def align_down(value: int, step: int) -> int:
    """Largest multiple of ``step`` that is <= ``value``."""
    return (value // step) * step


@dataclass(frozen=True)
class Halo:
    """Input pixels read around a tile: ``before`` and ``after`` it, ``(rows, cols)``."""

    before: Pair
    after: Pair

    def __post_init__(self) -> None:
        if min(*self.before, *self.after) < 0:
            raise GeometryError(f"halo must not be negative, got {self}")

    @classmethod
    def of(cls, value: Halo | int | tuple[int, int]) -> Halo:
        """A halo from an int (all sides), a ``(rows, cols)`` pair or a Halo."""
        if isinstance(value, Halo):
            return value
        if isinstance(value, int):
            return cls((value, value), (value, value))
        rows, cols = value
        return cls((int(rows), int(cols)), (int(rows), int(cols)))

    def shrink(self, step: Pair) -> Halo:
        """This halo less ``step`` on every side (floored at zero)."""
        b, a = self.before, self.after
        return Halo(
            (max(0, b[0] - step[0]), max(0, b[1] - step[1])),
            (max(0, a[0] - step[0]), max(0, a[1] - step[1])),
        )


Reach = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ReceptiveField:
    """Size, stride and offset of the input region one output pixel depends on.

    ``size``, ``stride``, ``offset`` and ``align`` are ``(rows, cols)`` pairs
    of ints, in input pixels. Output pixel ``(i, j)`` depends only on input
    rows ``offset[0] + i * stride[0]`` to ``offset[0] + i * stride[0] +
    size[0] - 1`` (likewise for columns). ``align`` is the grid that window
    edges must sit on, a multiple of ``stride``.

    ``reach`` refines this per axis and per output phase: output cell ``j``
    needs a window reaching ``reach[axis][j % phases][0]`` input pixels before
    its own cell (``j * stride``) and ``[1]`` pixels after it, where
    ``phases = align // stride``. Networks that upsample inside (FCN-8s) need
    less before a cell at one phase than at another; tiles cut on the
    ``align`` grid use exactly what their edge cells need. When not given it
    is derived from ``size`` and ``offset`` alone.
    """

    size: Pair
    stride: Pair
    offset: Pair
    align: Pair
    reach: tuple[Reach, Reach] | None = None

    def __post_init__(self) -> None:
        for name in ("size", "stride", "offset", "align"):
            value = getattr(self, name)
            if len(value) != 2 or not all(isinstance(v, int) for v in value):
                raise GeometryError(f"ReceptiveField.{name} must be two ints, got {value!r}")
        if min(self.size) < 1 or min(self.stride) < 1:
            raise GeometryError(f"size and stride must be positive: {self}")
        if any(a % s for a, s in zip(self.align, self.stride)):
            raise GeometryError(f"align {self.align} must be a multiple of stride {self.stride}")
        if self.reach is None:
            derived = tuple(
                ((max(0, -o), max(0, o + z - s)),)
                for o, z, s in zip(self.offset, self.size, self.stride)
            )
            object.__setattr__(self, "reach", derived)
        else:
            for k in (0, 1):
                phases = self.align[k] // self.stride[k]
                if len(self.reach[k]) not in (1, phases):
                    raise GeometryError(
                        f"reach along axis {k} has {len(self.reach[k])} phases; expected {phases}"
                    )

    @classmethod
    def pointwise(cls, stride: Pair = (1, 1)) -> ReceptiveField:
        """The field of a model whose own field is not derived (it has global context):
        each output cell sees its ``stride`` cell only, so the halo around a tile is the
        one declared for it."""
        return cls(size=stride, stride=stride, offset=(0, 0), align=stride)

    @property
    def phase_reach(self) -> tuple[Reach, Reach]:
        """``reach`` with its default filled in."""
        assert self.reach is not None
        return self.reach

    def required_halo(self) -> Halo:
        """The most any output cell needs beyond its own ``stride`` cell."""
        reach = self.phase_reach
        before = (max(b for b, _ in reach[0]), max(b for b, _ in reach[1]))
        after = (max(a for _, a in reach[0]), max(a for _, a in reach[1]))
        return Halo(before, after)

    def halo(self) -> Halo:
        """The derived halo of a tile cut on the ``align`` grid, rounded up to ``align``.

        Such a tile starts at phase 0 and ends at the last phase, so this is
        what its first and last cells need, on the stride grid.
        """
        reach = self.phase_reach
        align = self.align
        return Halo(
            (align_up(reach[0][0][0], align[0]), align_up(reach[1][0][0], align[1])),
            (align_up(reach[0][-1][1], align[0]), align_up(reach[1][-1][1], align[1])),
        )
