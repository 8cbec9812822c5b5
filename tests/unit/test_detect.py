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


# -- one diagnosis per fault (docs/architecture.md, "One diagnosis per fault") -------------


def water_readings(first: int, last: int, usage: float, flow: float | None) -> list[Observed]:
    """Readings ``first`` to ``last`` of a water meter, each ``usage`` litres with ``flow``."""
    return [Observed(at(i), usage, False, flow) for i in range(first, last + 1)]


def household(i: int) -> float:
    """Water use with idle intervals (0) between uses."""
    return 0.0 if i % 3 else round(5.0 + (i * 7) % 11, 3)


def water_day_before() -> MeterState:
    """A water meter with a normal day behind it (idle intervals, flows that agree)."""
    state = MeterState()
    day = [Observed(at(i), household(i), False, household(i) / 15) for i in range(96)]
    assert observe(WATER, state, day) == []
    return state


def test_a_steady_leak_whose_flow_agrees_is_leak_only() -> None:
    """8 L/h of leak: 2 L every 15 minutes and a flow of 2/15 L/min, over a night and a day."""
    state = water_day_before()
    leak = water_readings(96, 96 + 40 * 4, 2.0, 2.0 / 15)
    found = observe(WATER, state, leak)
    assert codes(found) == [FaultCode.LEAK]  # the night's minimum, 8 L/h, above 6
    assert codes(found, CLEAR) == []


def test_a_frozen_water_register_is_stuck_only() -> None:
    """The usage repeats while the flow says otherwise (0 here: nothing runs): STUCK, and
    the frozen value is no flow for LEAK, even over two days without a zero."""
    state = water_day_before()
    frozen = water_readings(96, 96 + 48 * 4, 2.0, 0.0)
    found = observe(WATER, state, frozen)
    assert codes(found) == [FaultCode.STUCK]
    after = observe(
        WATER,
        state,
        [
            Observed(at(96 + 48 * 4 + i), household(i), False, household(i) / 15)
            for i in range(1, 8)
        ],
    )
    assert codes(after, CLEAR) == [FaultCode.STUCK]
    assert codes(after) == []  # the frozen span counted for no "dry window"


def test_a_frozen_value_that_agrees_with_the_real_flow_now_and_then_is_one_stuck() -> None:
    """The frozen 0.63 L equals a trickle of 0.042 L/min now and then: by chance, which
    neither delays nor splits the episode; the true reading it froze at starts it."""
    state = water_day_before()
    flows = [0.042, 0.0, 0.0, 0.042, 0.1, 0.0, 0.042, 0.3, 0.0, 0.0]  # the real ones
    frozen = [Observed(at(96 + i), 0.63, False, flow) for i, flow in enumerate(flows)]
    found = observe(WATER, state, frozen)
    assert [(d.code, d.action, d.start_us) for d in found] == [(FaultCode.STUCK, OPEN, at(96))]


def test_without_a_flow_reading_a_leak_supersedes_stuck() -> None:
    """A water meter that sends no flow_rate: the steady value is STUCK first, until LEAK's
    night says it is a flow; STUCK then clears, saying so, and does not open again."""
    state = water_day_before()
    found = observe(WATER, state, water_readings(96, 96 + 40 * 4, 2.0, None))
    assert codes(found) == [FaultCode.STUCK, FaultCode.LEAK]
    cleared = [d for d in found if d.action == CLEAR]
    assert [(d.code, d.reason) for d in cleared] == [
        (FaultCode.STUCK, "superseded by LEAK: a steady flow, not a stuck meter")
    ]
    assert cleared[0].at_us == next(d.at_us for d in found if d.code is FaultCode.LEAK)


@pytest.mark.parametrize("meter_type", [MeterType.ELECTRICITY, MeterType.GAS])
def test_repeats_are_stuck_on_power_and_gas_unless_a_constant_load(meter_type: MeterType) -> None:
    repeats = {i: 0.5 for i in range(20, 60)}
    ordinary = Meter("m", meter_type, STEP, RULES)
    state = MeterState()
    feed(ordinary, state, {i: normal(i) for i in range(20)})
    assert codes(feed(ordinary, state, repeats)) == [FaultCode.STUCK]
    pump = Meter("m", meter_type, STEP, RULES, constant_load=True)
    state = MeterState()
    feed(pump, state, {i: normal(i) for i in range(20)})
    assert feed(pump, state, repeats) == []


def test_a_constant_water_load_is_neither_stuck_nor_leaking() -> None:
    """A declared constant load (a cooling tower's make-up water): steady day and night."""
    tower = Meter("wm1", MeterType.WATER, STEP, RULES, constant_load=True)
    state = MeterState()
    steady = water_readings(0, 3 * 96, 2.0, None)
    assert observe(tower, state, steady) == []
