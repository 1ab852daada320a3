"""The automatic tile size: best estimated throughput within the memory budget."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from pipeline.plan import choose_tile_size
from pipeline.receptive import ReceptiveField

FIELD = ReceptiveField(size=(65, 65), stride=(1, 1), offset=(-32, -32), align=(8, 8))


def test_bigger_tiles_until_workers_would_idle() -> None:
    choice = choose_tile_size([(2048, 2048)], FIELD, workers=2, memory_of=lambda t: t * t,
                              budget=10**12)
    assert choice.size == 1024  # 4 tiles keep 2 workers busy; one 2048 tile would idle one
    assert "efficiency 1.00" in choice.reason


def test_the_memory_budget_caps_the_tile() -> None:
    choice = choose_tile_size([(20000, 20000)], FIELD, workers=2,
                              memory_of=lambda t: 100 * t * t, budget=100 * 1600**2)
    assert choice.size == 1536
    with pytest.raises(ConfigError, match="memory budget"):
        choose_tile_size([(20000, 20000)], FIELD, workers=2, memory_of=lambda t: 10**12,
                         budget=10**6)


def test_small_scenes_get_one_tile_each() -> None:
    choice = choose_tile_size([(300, 300), (300, 300)], FIELD, workers=2,
                              memory_of=lambda t: t, budget=10**9)
    assert choice.size == 304


def test_the_smallest_tile_within_the_tolerance_wins() -> None:
    # A 3 px field (halos aligned to 8 px): past 1024 px tiles bigger ones
    # buy under 3 %, so the smallest near-best one is taken.
    field = ReceptiveField(size=(3, 3), stride=(1, 1), offset=(-1, -1), align=(8, 8))
    choice = choose_tile_size([(8192, 8192)], field, workers=1, memory_of=lambda t: t * t,
                              budget=10**12)
    assert choice.size == 1024  # 8 px halos: 768 px tiles compute 3.9 % more, 1024 px 2.8 %
    assert "within 3% of the best" in choice.reason


def test_measured_window_speed_can_beat_a_smaller_halo_overhead() -> None:
    # Windows past 1100 px run at half speed (caches): 1024 px tiles win over 2048,
    # although 2048 px tiles compute fewer halo pixels.
    def speed(tile: int) -> float:
        return 2e7 if tile + 64 <= 1100 else 1e7

    choice = choose_tile_size([(8192, 8192)], FIELD, workers=2, memory_of=lambda t: t * t,
                              budget=10**12, speed_of=speed)
    assert choice.size == 1024
    assert "windows at 20.00 Mpx/s measured" in choice.reason
    without = choose_tile_size([(8192, 8192)], FIELD, workers=2, memory_of=lambda t: t * t,
                               budget=10**12)
    assert without.size > 1024
