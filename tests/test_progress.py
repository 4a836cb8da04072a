"""EpochTicker: throttled in-epoch progress lines, exact text under a fake clock."""

from __future__ import annotations

import pytest

from rwray.train.progress import EpochTicker, format_duration


class FakeClock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_line_at_most_every_every_s_with_rate_and_eta():
    clock = FakeClock(100.0)
    ticker = EpochTicker(2, total_steps=400, batch_size_global=256, every_s=30.0, clock=clock)
    clock.t = 100.5
    assert ticker.step(0) is None
    clock.t = 129.9
    assert ticker.step(118) is None
    clock.t = 130.0  # 120 steps x 256 samples in 30 s = 1,024/s; 280 steps left at 4 steps/s = 70 s
    assert ticker.step(119) == "  epoch 3: step 120/400  1,024 samples/s  ETA 1m10s"
    clock.t = 159.9  # 29.9 s after the last line, not after a 30 s grid point
    assert ticker.step(238) is None
    clock.t = 160.0  # 240 steps in 60 s: still 1,024/s; 160 left at 4/s = 40 s
    assert ticker.step(239) == "  epoch 3: step 240/400  1,024 samples/s  ETA 40s"


def test_unknown_total_has_no_total_and_no_eta():
    clock = FakeClock(0.0)
    ticker = EpochTicker(0, total_steps=None, batch_size_global=32, every_s=10.0, clock=clock)
    clock.t = 12.5  # 50 x 32 / 12.5 = 128/s
    assert ticker.step(49) == "  epoch 1: step 50  128 samples/s"


def test_thousands_separators_and_the_last_step():
    clock = FakeClock(0.0)
    ticker = EpochTicker(9, total_steps=1000, batch_size_global=4096, every_s=1.0, clock=clock)
    clock.t = 2.0  # 1000 x 4096 / 2 = 2,048,000/s; nothing left
    assert ticker.step(999) == "  epoch 10: step 1000/1000  2,048,000 samples/s  ETA 0s"


def test_every_s_zero_reports_every_step_and_omits_the_rate_before_time_passes():
    clock = FakeClock(5.0)
    ticker = EpochTicker(0, total_steps=10, batch_size_global=8, every_s=0.0, clock=clock)
    assert ticker.step(0) == "  epoch 1: step 1/10"
    clock.t = 6.0  # 2 x 8 / 1 s = 16/s; 8 left at 2 steps/s = 4 s
    assert ticker.step(1) == "  epoch 1: step 2/10  16 samples/s  ETA 4s"


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.4, "59s"), (59.6, "1m00s"), (80, "1m20s"),
                                           (3599, "59m59s"), (3600, "1h00m"), (7530, "2h05m"), (-3, "0s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
