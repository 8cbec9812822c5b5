"""The stateful rules on real household recordings (tests/data/real): a false-alarm guard.

The excerpts are two weeks each of the UCI household's minutes (winter 2007, summer
2008), replayed through the replay parser into the rules (``simulator/false_alarms.py``).
They hold no fault, only ordinary use, and the rules open nothing on them at 1-minute or
15-minute readings: over all four years (138,352 15-minute readings) SPIKE opens none and
STUCK one, a logger that repeated one value for two hours (a real fault). The median
baseline that came before opened 4 SPIKEs in the winter excerpt (30 per 10,000 readings;
17.9 on the four years), so a bound of zero per excerpt is both what real data gives and
what catches that regression. The same data with a real fault written in must still trip the rule.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from helpers import ROOT

from meterflow.core.contract import FaultCode, MeterType
from meterflow.core.thresholds import DetectionRules
from meterflow.stream.detection.rules import Meter, Observed
from simulator.false_alarms import RULES, measure, readings

DAY_AT_15_MIN = 96


def excerpts() -> list[Path]:
    return sorted((ROOT / "tests" / "data" / "real").glob("*.gz"))


@pytest.fixture(scope="module", params=[60, 900], ids=["1min", "15min"])
def real(request: pytest.FixtureRequest) -> list[tuple[str, int, MeterType, list[Observed]]]:
    interval = int(request.param)
    return [(path.name, interval, *readings(path, interval)) for path in excerpts()]


def test_the_excerpts_replay_as_two_weeks_of_one_meter() -> None:
    assert [p.name for p in excerpts()] == ["uci-2007-winter.txt.gz", "uci-2008-summer.txt.gz"]
    for path in excerpts():
        meter_type, minutes = readings(path, 60)
        assert meter_type is MeterType.ELECTRICITY
        assert len(minutes) == 14 * 1440
        assert sum(r.value is None for r in minutes) <= 1  # the recording's own gaps
        assert 0 < max(r.value or 0 for r in minutes) < 0.2  # kWh a minute: under 12 kW


def test_no_rule_opens_on_ordinary_use(
    real: list[tuple[str, int, MeterType, list[Observed]]],
) -> None:
    for name, interval, meter_type, observed in real:
        counts = measure(Meter(name, meter_type, interval, DetectionRules()), observed)
        opened = {code: c.openings for code, c in counts.items() if c.openings}
        assert opened == {}, (name, interval, opened)
        assert set(counts) == set(RULES)


def test_real_faults_written_into_the_recording_still_open() -> None:
    """A tenfold-and-more jump at a quiet hour and a frozen register, on real history."""
    name, interval, meter_type, observed = readings_at_15(0)  # winter
    faulty = list(observed)
    at = 5 * DAY_AT_15_MIN + 12  # day 6, 03:00: the house is idle
    week_high = max(r.value or 0 for r in observed[: at + 1])
    faulty[at] = replace_value(faulty[at], round(3 * week_high, 3))  # 3x the fortnight's peak
    stuck = 9 * DAY_AT_15_MIN + 40  # day 10, 10:00
    for i in range(stuck, stuck + DetectionRules().stuck_readings):
        faulty[i] = replace_value(faulty[i], 0.321)
    counts = measure(Meter(name, meter_type, interval, DetectionRules()), faulty)
    assert counts[FaultCode.SPIKE].openings == 1
    assert counts[FaultCode.STUCK].openings == 1
    assert counts[FaultCode.NO_DATA].openings == 0


def replace_value(reading: Observed, value: float) -> Observed:
    return Observed(reading.event_us, value, False)


def test_the_factor_is_still_the_rule() -> None:
    """With a looser factor the same real data does alarm: the guard measures something."""
    _, _, meter_type, observed = readings_at_15(0)
    loose = replace(DetectionRules(), spike_factor=1.5)
    counts = measure(Meter("em", meter_type, 900, loose), observed)
    assert counts[FaultCode.SPIKE].openings > 0


def readings_at_15(index: int) -> tuple[str, int, MeterType, list[Observed]]:
    path = excerpts()[index]
    return (path.name, 900, *readings(path, 900))
