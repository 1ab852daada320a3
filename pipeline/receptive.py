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
    def of(cls, value: "Halo | int | tuple[int, int]") -> "Halo":
        """A halo from an int (all sides), a ``(rows, cols)`` pair or a Halo."""
        if isinstance(value, Halo):
            return value
        if isinstance(value, int):
            return cls((value, value), (value, value))
        rows, cols = value
        return cls((int(rows), int(cols)), (int(rows), int(cols)))

    def shrink(self, step: Pair) -> "Halo":
        """This halo less ``step`` on every side (floored at zero)."""
        return Halo(
            tuple(max(0, b - s) for b, s in zip(self.before, step)),  # type: ignore[arg-type]
            tuple(max(0, a - s) for a, s in zip(self.after, step)),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class ReceptiveField:
    """Size, stride and offset of the input region one output pixel depends on.

    All fields are ``(rows, cols)`` pairs of ints, in input pixels. Output
    pixel ``(i, j)`` depends only on input rows ``offset[0] + i * stride[0]``
    to ``offset[0] + i * stride[0] + size[0] - 1`` (and likewise for columns).
    ``align`` is the grid that window edges must sit on, a multiple of
    ``stride``.
    """

    size: Pair
    stride: Pair
    offset: Pair
    align: Pair

    def __post_init__(self) -> None:
        for name in ("size", "stride", "offset", "align"):
            value = getattr(self, name)
            if len(value) != 2 or not all(isinstance(v, int) for v in value):
                raise GeometryError(f"ReceptiveField.{name} must be two ints, got {value!r}")
        if min(self.size) < 1 or min(self.stride) < 1:
            raise GeometryError(f"size and stride must be positive: {self}")
        if any(a % s for a, s in zip(self.align, self.stride)):
            raise GeometryError(f"align {self.align} must be a multiple of stride {self.stride}")

    def required_halo(self) -> Halo:
        """The exact pixels an output cell needs beyond its own ``stride`` cell."""
        before = tuple(max(0, -o) for o in self.offset)
        after = tuple(max(0, o + z - s) for o, z, s in zip(self.offset, self.size, self.stride))
        return Halo(before, after)  # type: ignore[arg-type]

    def halo(self) -> Halo:
        """The derived halo: :meth:`required_halo` rounded up to ``align``."""
        need = self.required_halo()
        return Halo(
            tuple(align_up(v, a) for v, a in zip(need.before, self.align)),  # type: ignore[arg-type]
            tuple(align_up(v, a) for v, a in zip(need.after, self.align)),  # type: ignore[arg-type]
        )
