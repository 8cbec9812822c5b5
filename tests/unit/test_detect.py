"""The stateful rules (meterflow.stream.detection.rules) on a handful of readings, without Spark."""

from __future__ import annotations

import copy

import msgspec
import pytest

from meterflow.core.contract import FaultCode, MeterType
from meterflow.core.thresholds import DetectionRules
from meterflow.core.timestamps import LocalClock, parse_timestamp_us
from meterflow.stream.detection.rules import (
    CLEAR,
    OPEN,
    Meter,
    MeterState,
    Observed,
    deadline,
    expire,
    observe,
)

T0 = parse_timestamp_us("2024-05-27T00:00:00Z")
STEP = 900  # seconds
RULES = DetectionRules()
POWER = Meter("em1", MeterType.ELECTRICITY, STEP, RULES)
WATER = Meter("wm1", MeterType.WATER, STEP, RULES)


def at(i: int) -> int:
    return T0 + i * STEP * 1_000_000


def normal(i: int) -> float:
    """A plausible 15-minute electricity reading that never repeats."""
    return round(0.2 + 0.05 * ((i * 7) % 11) + 0.001 * (i % 13), 3)


def feed(meter: Meter, state: MeterState, values: dict[int, float | None]) -> list:
    return observe(meter, state, [Observed(at(i), v) for i, v in values.items()])


def codes(detections: list, action: str = OPEN) -> list[FaultCode]:
    return [d.code for d in detections if d.action == action]


def test_stuck_opens_after_n_repeats_and_clears_on_a_new_value() -> None:
    state = MeterState()
    assert feed(POWER, state, {i: normal(i) for i in range(10)}) == []
    stuck = {i: 0.731 for i in range(10, 10 + RULES.stuck_readings - 1)}
    assert feed(POWER, state, stuck) == []  # one short of N
    opened = feed(POWER, state, {10 + RULES.stuck_readings - 1: 0.731})
    assert codes(opened) == [FaultCode.STUCK]
    assert opened[0].start_us == at(10)  # the episode starts at the run's first reading
    assert feed(POWER, state, {18: 0.731}) == []  # still stuck: nothing new
    cleared = feed(POWER, state, {19: 0.5})
    assert codes(cleared, CLEAR) == [FaultCode.STUCK]
    assert cleared[0].episode_id == opened[0].episode_id


def test_no_stuck_for_tiny_values_gaps_or_late_readings() -> None:
    state = MeterState()
    assert feed(POWER, state, {i: 0.001 for i in range(20)}) == []  # below stuck_min
    gappy = MeterState()
    run = {i * 3: 0.9 for i in range(20)}  # a reading every 3 intervals: not consecutive
    assert feed(POWER, gappy, run) == []
    late = MeterState()
    feed(POWER, late, {i: normal(i) for i in range(40, 50)})
    # Readings of the past, all the same value, arrive after newer ones: no run.
    assert feed(POWER, late, {i: 0.9 for i in range(20, 40)}) == []


def test_spike_needs_history_a_floor_and_the_factor() -> None:
    state = MeterState()
    day = 96
    assert feed(POWER, state, {0: 0.3, 1: 30.0}) == []  # no history yet
    feed(POWER, state, {i: normal(i) for i in range(2, day + 10)})
    assert feed(POWER, state, {day + 10: 0.95}) == []  # > 10x? no: below the 1 kWh floor
    spike = feed(POWER, state, {day + 11: 12.0})
    assert codes(spike) == [FaultCode.SPIKE]
    assert spike[0].start_us == at(day + 11)
    back = feed(POWER, state, {day + 12: normal(day + 12)})
    assert codes(back, CLEAR) == [FaultCode.SPIKE]
    # The spike stayed out of the baseline: the same jump spikes again.
    assert codes(feed(POWER, state, {day + 13: 12.0})) == [FaultCode.SPIKE]


def test_leak_is_continuous_flow_or_a_high_night_minimum_and_a_zero_clears_it() -> None:
    intermittent = MeterState()
    values = {i: (0.0 if i % 4 == 0 else 20.0 + 0.1 * (i % 3)) for i in range(3 * 96)}
    assert feed(WATER, intermittent, values) == []  # idle intervals every hour: no leak

    leaking = MeterState()
    # 2 L every 15 minutes (8 L/h) all night, never idle: both rules hold.
    opened = feed(
        WATER,
        leaking,
        {i: 2.0 + 0.01 * (i % 5) + (20.0 if i % 8 == 0 else 0.0) for i in range(120)},
    )
    assert codes(opened) == [FaultCode.LEAK]
    assert codes(feed(WATER, leaking, {120: 0.0}), CLEAR) == [FaultCode.LEAK]

    dribble = MeterState()  # 0.5 L a quarter (2 L/h) at night: under the threshold
    night = {i: (0.5 if 8 <= i % 96 < 16 else 10.0 + 0.37 * (i % 7)) for i in range(90)}
    night.update({i: 0.0 for i in range(20, 90, 6)})
    assert feed(WATER, dribble, night) == []


def test_no_data_opens_at_the_deadline_once_and_any_reading_clears_it() -> None:
    state = MeterState()
    feed(POWER, state, {0: 0.4, 1: 0.5})
    due = deadline(POWER, state)
    assert due == at(1) + RULES.nodata_intervals * STEP * 1_000_000
    assert expire(POWER, state, due - 1) == []
    opened = expire(POWER, state, due)
    assert codes(opened) == [FaultCode.NO_DATA] and opened[0].start_us == at(2)
    assert expire(POWER, state, due + 10**9) == []  # already open
    cleared = feed(POWER, state, {9: 0.4})
    assert codes(cleared, CLEAR) == [FaultCode.NO_DATA]
    assert cleared[0].episode_id == opened[0].episode_id


def test_a_silence_inside_one_batch_is_an_episode_whatever_the_batch_sizes() -> None:
    """A catch-up can bring both ends of a silence at once: no timer fires in between."""
    values = {i: normal(i) for i in [*range(10), *range(10 + RULES.nodata_intervals, 30)]}
    whole = feed(POWER, MeterState(), values)
    assert [(d.code, d.action, d.start_us) for d in whole] == [
        (FaultCode.NO_DATA, OPEN, at(10)),
        (FaultCode.NO_DATA, CLEAR, at(10)),
    ]
    assert whole[0].at_us == at(9) + RULES.nodata_intervals * STEP * 1_000_000  # its deadline
    one_by_one: list = []
    state = MeterState()
    for i, value in values.items():
        one_by_one += feed(POWER, state, {i: value})
    assert one_by_one == whole
    shorter = {i: normal(i) for i in [*range(10), *range(10 + RULES.nodata_intervals - 1, 30)]}
    assert feed(POWER, MeterState(), shorter) == []  # one interval short of the deadline


def test_a_retried_batch_gives_the_same_episode_ids() -> None:
    state = MeterState()
    feed(POWER, state, {i: normal(i) for i in range(100)})
    batch = {i: 0.8 for i in range(100, 112)}
    first = feed(POWER, copy.deepcopy(state), batch)
    again = feed(
        POWER, msgspec.msgpack.decode(msgspec.msgpack.encode(state), type=MeterState), batch
    )
    assert [d.episode_id for d in first] == [d.episode_id for d in again] != []


@pytest.mark.parametrize("meter", [POWER, WATER])
def test_state_stays_small(meter: Meter) -> None:
    state = MeterState()
    for day in range(30):
        feed(meter, state, {day * 96 + i: normal(i) for i in range(96)})
    assert len(msgspec.msgpack.encode(state)) < 2_500


def test_the_leak_night_is_local_time() -> None:
    """Paris in May is UTC+2: its 02:00-04:00 night is 00:00-02:00 UTC."""
    values = {i: 3.0 + 0.01 * i for i in range(8)}  # 12 L/h or more, 00:00-02:00 UTC
    values.update({i: 0.0 if i % 4 == 2 else 5.0 for i in range(8, 96)})  # idle now and then
    paris = Meter("wm1", MeterType.WATER, STEP, RULES, LocalClock("Europe/Paris"))
    opened = feed(paris, MeterState(), values)
    assert codes(opened) == [FaultCode.LEAK] and "night minimum flow 12" in opened[0].reason
    # The same readings judged on UTC's night (02:00-04:00 UTC) see idle intervals.
    assert feed(WATER, MeterState(), values) == []
