"""Stateful fault detection per meter: STUCK, SPIKE, LEAK and NO_DATA, as plain Python.

The Spark operator (:mod:`meterflow.stream.detection.processor`) keeps one :class:`MeterState` per
meter in its state store and hands each micro-batch's readings of that meter, with the
state, to :func:`observe`; a NO_DATA timer calls :func:`expire`. Both return the new state
and the :class:`Detection` changes to publish. Keeping the rules here, free of Spark,
lets them be tested on a handful of readings and measured without a cluster.

Each fault is an *episode* with a start (the event time of its first affected reading, or
of the first missing one for NO_DATA). An episode opens once its rule holds and clears on
its own condition; its id is ``device|code|start``, so a batch retried after a crash, or
replayed after a restart from the checkpoint, publishes the same ids again.

Readings that arrive out of order (event time not after the latest seen) are late: they
take no part in STUCK runs, SPIKE baselines or LEAK windows, so they cannot raise a false
alarm. State per meter is bounded: a few scalars, a ring of daily highs per hour of day
and one overall ring (see :data:`HOUR_RING` and :data:`RECENT_RING`).

One diagnosis per fault (docs/architecture.md, "One diagnosis per fault"): a repeated
non-zero value is STUCK's signature, except where it is physically possible. On water, a
run of one value whose ``flow_rate`` mostly agrees with its usage (usage = flow x interval
minutes) is a flow, owned by LEAK, never STUCK. A run whose flow mostly disagrees is a
frozen register, owned by STUCK: while STUCK is open it is no evidence of flow for LEAK. A
water meter that sends no flow is ambiguous: STUCK may open, and a LEAK opening on the
same meter supersedes it (STUCK clears, saying so). A meter the registry declares a
constant load (street lighting, a pump) gets no STUCK, and on water no LEAK.

SPIKE's baseline is the *highest* good value at the reading's hour of day over the last
week (one high per day), not a median: a household's use at a given hour is mostly idle
with a cooking or laundry peak on some days, so ten times the median idle level is
crossed by ordinary use: on real household recordings a median baseline opened SPIKEs on
ordinary appliance use, where the weekly high opens none (``bench/detection_real.py``
measures it; docs/benchmarks.md has the figures). A real spike, a meter
jump or a unit error, is tens to thousands of times the usual level, so it still stands
``spike_factor`` (10) times above the week's high.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import itemgetter
from statistics import median
from typing import NamedTuple

import msgspec

from meterflow.core.contract import FaultCode, MeterType
from meterflow.core.thresholds import DetectionRules
from meterflow.core.timestamps import LocalClock

#: Days kept per hour of day: the hour's highest good value on each of the last 7 days
#: with one (the same week the simulator's ``SPIKE_LOOKBACK_DAYS`` shapes spikes from).
HOUR_RING = 7
#: Good non-zero values kept overall: the baseline until the hour has a day's high.
RECENT_RING = 48
#: Days an hour's ring needs before it is the baseline: one, since SPIKE waits for
#: ``baseline_history_s`` (a day) anyway, and the overall ring's median, the fallback, is
#: what ordinary peaks cross (a fresh meter's first weeks open more false SPIKEs the
#: longer it waits for the hour's ring: ``bench/detection_real.py``'s fresh windows).
HOUR_MIN_VALUES = 1
#: Values the overall ring needs before SPIKE can fire at all.
RECENT_MIN_VALUES = 12
_HOUR_US = 3_600_000_000
_DAY_US = 24 * _HOUR_US
OPEN = "open"
CLEAR = "clear"


class MeterState(msgspec.Struct, array_like=True):
    """What the detector remembers about one meter between micro-batches.

    Kept, msgpack-encoded, inside its bucket's state value
    (:mod:`meterflow.stream.detection.processor`).
    ``*_open`` hold the open episode's start (event microseconds) or 0.
    """

    last_us: int = 0  # latest event time seen
    first_us: int = 0  # first event time seen: LEAK needs a day of history
    run_value: float = math.nan  # the repeated value of the current run
    run_count: int = 0
    run_start_us: int = 0
    stuck_open: int = 0
    spike_open: int = 0
    recent: list[float] = msgspec.field(default_factory=list)
    hours: list[list[float]] = msgspec.field(default_factory=lambda: [[] for _ in range(24)])
    last_zero_us: int = 0  # latest zero-usage interval (water)
    night: int = -1  # day number of the night being watched (water)
    night_min: float = math.inf  # smallest flow (units an hour) seen in that night
    night_readings: int = 0
    leak_open: int = 0
    silent_open: int = 0
    meter_type: str = ""  # as the meter's readings name it
    #: Per hour of day, the day number (UTC) of its ring's newest high. Last, with a
    #: default, so a state encoded before it existed still decodes.
    hour_days: list[int] = msgspec.field(default_factory=lambda: [-1] * 24)
    #: Readings of the current run whose flow explains their usage (water).
    run_flowing: int = 0


class Observed(NamedTuple):
    """One reading as the detector sees it; ``faulty`` is any stateless fault, ``flow`` the
    water meter's ``flow_rate`` (L/min) when it sends one.

    A tuple, not a dataclass: a catch-up builds hundreds of thousands a batch.
    """

    event_us: int
    value: float | None
    faulty: bool = False
    flow: float | None = None


#: How far usage and flow x minutes may differ and still be one flow: the contract's
#: readings carry three decimals, so a flow rounded to 0.001 L/min is off by up to
#: 0.0005 x minutes; 0.5% covers a meter that rounds its flow coarser. Wider, a frozen
#: value would now and then agree with a household's real flow by chance.
FLOW_AGREES_LITRES = 0.01
FLOW_AGREES_SHARE = 0.005


@dataclass(frozen=True)
class Detection:
    """An episode opening or clearing: what the operator publishes."""

    device_id: str
    code: FaultCode
    action: str  # OPEN or CLEAR
    start_us: int
    at_us: int  # event time of the reading (or timer) that decided it
    value: float | None
    reason: str

    @property
    def episode_id(self) -> str:
        return episode_id(self.device_id, self.code, self.start_us)


def episode_id(device_id: str, code: FaultCode, start_us: int) -> str:
    return f"{device_id}|{code}|{start_us}"


@dataclass(frozen=True)
class Meter:
    """What the detector needs to know about a meter (from the registry)."""

    device_id: str
    meter_type: MeterType
    interval_s: int
    rules: DetectionRules
    #: Local wall-clock time (METERFLOW_TIMEZONE) for the hour-of-day rules: a household's
    #: day and the LEAK rule's night follow local time, not UTC.
    clock: LocalClock = field(default_factory=LocalClock)
    #: The registry says it legitimately repeats one value: no STUCK (on water, no LEAK).
    constant_load: bool = False


def _baseline(state: MeterState, hour: int) -> float | None:
    """The hour's highest good value of the last week, else the recent values' median."""
    ring = state.hours[hour]
    if len(ring) >= HOUR_MIN_VALUES:
        return max(ring)
    if len(state.recent) >= RECENT_MIN_VALUES:
        return median(state.recent)
    return None


def _remember(state: MeterState, event_us: int, hour: int, value: float) -> None:
    """Keep a good non-zero value for the baselines (bounded rings): one high per day."""
    ring = state.hours[hour]
    day = event_us // _DAY_US
    if ring and state.hour_days[hour] == day:
        ring[-1] = max(ring[-1], value)
    else:
        ring.append(value)
        state.hour_days[hour] = day
        if len(ring) > HOUR_RING:
            del ring[0]
    state.recent.append(value)
    if len(state.recent) > RECENT_RING:
        del state.recent[0]


def flow_explains(usage: float, flow: float | None, interval_s: int) -> bool | None:
    """Whether a water reading's flow (L/min) accounts for its usage over the interval;
    None when it sends no flow."""
    if flow is None or not math.isfinite(flow):
        return None
    expected = flow * interval_s / 60.0
    return abs(usage - expected) <= max(FLOW_AGREES_LITRES, FLOW_AGREES_SHARE * abs(usage))


def observe(
    meter: Meter,
    state: MeterState,
    readings: Iterable[tuple[int, float | None, bool, float | None]],
) -> list[Detection]:
    """Apply a batch of one meter's readings (any order) to ``state``; the changes.

    A reading is an :class:`Observed` or a plain ``(event_us, value, faulty, flow)``
    tuple: a catch-up hands over millions, and a plain tuple costs a fraction of a
    NamedTuple's Python-level constructor.
    """
    out: list[Detection] = []
    interval_us = meter.interval_s * 1_000_000
    silence_us = meter.rules.nodata_intervals * interval_us  # see deadline()
    water = meter.meter_type is MeterType.WATER
    for event_us, value, faulty, flow in sorted(readings, key=_event_time):
        if event_us <= state.last_us:
            continue  # late or repeated: no part in any rule
        gap_us = event_us - state.last_us if state.last_us else 0
        state.first_us = state.first_us or event_us
        if water and state.last_us and gap_us > silence_us:
            _unknown_flow_until(state, event_us - interval_us)  # a silence shows no flow
        if state.silent_open:
            out.append(
                _clear(
                    meter, FaultCode.NO_DATA, state.silent_open, event_us, value, "reporting again"
                )
            )
            state.silent_open = 0
        elif state.last_us and gap_us > silence_us:
            # A silence no timer saw: both its ends came in one batch (a catch-up, a replay,
            # a detector that was down). It opened at its deadline and ends now, whatever
            # the batch sizes were.
            out += expire(meter, state, deadline(meter, state))
            out.append(
                _clear(
                    meter, FaultCode.NO_DATA, state.silent_open, event_us, value, "reporting again"
                )
            )
            state.silent_open = 0
        state.last_us = event_us
        if faulty or value is None or not math.isfinite(value):
            state.run_count = state.run_flowing = 0  # a faulty reading: no stuck register
            continue
        explained = flow_explains(value, flow, meter.interval_s) if water else False
        if explained is None and state.leak_open:
            explained = True  # no flow sent, a leak open: its steady value is that flow
        if not meter.constant_load:
            _stuck(meter, state, event_us, value, gap_us, interval_us, explained, out)
        _spike(meter, state, event_us, value, out)
        if water and not meter.constant_load and not (state.stuck_open and explained is not None):
            # A frozen register's repeats are no flow: STUCK owns them. Without a flow
            # reading LEAK still looks, and supersedes STUCK if it opens.
            _leak(meter, state, event_us, value, out)
    return out


def _stuck(
    meter: Meter,
    state: MeterState,
    event_us: int,
    value: float,
    gap_us: int,
    interval_us: int,
    explained: bool | None,
    out: list[Detection],
) -> None:
    rules = meter.rules
    if value == state.run_value and gap_us <= 2 * interval_us:
        state.run_count += 1
        state.run_flowing += bool(explained)
    elif value == state.run_value and state.stuck_open:
        pass  # the same value after a gap: still stuck, only a new value clears it
    else:
        if state.stuck_open:
            out.append(
                _clear(meter, FaultCode.STUCK, state.stuck_open, event_us, value, "value changed")
            )
            state.stuck_open = 0
            if meter.meter_type is MeterType.WATER:
                _unknown_flow_until(state, event_us - interval_us)
        state.run_value, state.run_count, state.run_start_us = value, 1, event_us
        state.run_flowing = int(bool(explained))
    # N readings span N-1 intervals, less half of one: a meter's clock jitters.
    spanned_us = (rules.stuck_readings - 1) * interval_us - interval_us // 2
    long_enough = event_us - state.run_start_us >= spanned_us
    # A run whose flow explains most of its readings is a steady flow, LEAK's; a frozen
    # register's value agrees with the real flow of an interval only now and then.
    flowing = 2 * state.run_flowing > state.run_count
    if (
        not state.stuck_open
        and not flowing
        and value > rules.stuck_min.get(meter.meter_type, 0.0)
        and state.run_count >= rules.stuck_readings
        and long_enough
    ):
        state.stuck_open = state.run_start_us
        out.append(
            Detection(
                meter.device_id,
                FaultCode.STUCK,
                OPEN,
                state.run_start_us,
                event_us,
                value,
                f"value {value:g} repeated {state.run_count} times "
                f"over {(event_us - state.run_start_us) / 60e6:.0f} min",
            )
        )


def _spike(
    meter: Meter, state: MeterState, event_us: int, value: float, out: list[Detection]
) -> None:
    rules = meter.rules
    hour = meter.clock(event_us) % _DAY_US // _HOUR_US
    if state.spike_open:
        out.append(
            _clear(meter, FaultCode.SPIKE, state.spike_open, event_us, value, "back to normal")
        )
        state.spike_open = 0
    # The floor first: most readings are below it, and then no median is needed.
    baseline = None
    if value >= rules.spike_min.get(meter.meter_type, 0.0) and (
        event_us - state.first_us >= rules.baseline_history_s * 1_000_000
    ):
        baseline = _baseline(state, hour)
    if baseline is not None and value > rules.spike_factor * baseline:
        state.spike_open = event_us
        out.append(
            Detection(
                meter.device_id,
                FaultCode.SPIKE,
                OPEN,
                event_us,
                event_us,
                value,
                f"{value:g} is {value / baseline:.0f} times the baseline {baseline:g}",
            )
        )
        return  # a spike stays out of the baseline
    if value > 0 and state.run_count <= 1:  # a stuck register's repeats are no baseline
        _remember(state, event_us, hour, value)


def _leak(
    meter: Meter, state: MeterState, event_us: int, value: float, out: list[Detection]
) -> None:
    rules = meter.rules
    now = event_us
    local = meter.clock(now)
    hour = local % _DAY_US // _HOUR_US
    day = local // _DAY_US
    if rules.leak_night_start_hour <= hour < rules.leak_night_end_hour:
        if state.night != day:
            state.night, state.night_min, state.night_readings = day, math.inf, 0
        flow = value * 3600 / meter.interval_s  # L/h, from the interval's usage
        state.night_min = min(state.night_min, flow)
        state.night_readings += 1
    # A night is judged once, by the first reading after its window, open leak or not.
    high_night, night_min = False, state.night_min
    if state.night == day and hour >= rules.leak_night_end_hour:
        high_night = state.night_readings > 0 and state.night_min > rules.leak_min_night_flow
        night_min, state.night = state.night_min, -1
    if value == 0:
        state.last_zero_us = now
        if state.leak_open:
            out.append(
                _clear(
                    meter, FaultCode.LEAK, state.leak_open, event_us, value, "a zero-flow interval"
                )
            )
            state.leak_open = 0
        return
    if state.leak_open:
        return
    since = max(state.last_zero_us, state.first_us)
    continuous = now - since >= rules.leak_dry_window_s * 1_000_000
    if continuous or high_night:
        # The flow began after the latest idle interval (or with the meter's first reading).
        start = state.last_zero_us + meter.interval_s * 1_000_000 if state.last_zero_us else since
        state.leak_open = start
        why = (
            f"no zero-flow interval for {(now - since) / 3.6e9:.0f} h"
            if continuous
            else f"night minimum flow {night_min:g} L/h above {rules.leak_min_night_flow:g}"
        )
        if state.stuck_open:  # a meter without a flow reading: the steady value was a flow
            state.run_value, state.run_count, state.run_flowing = math.nan, 0, 0
            out.append(
                _clear(
                    meter,
                    FaultCode.STUCK,
                    state.stuck_open,
                    event_us,
                    value,
                    "superseded by LEAK: a steady flow, not a stuck meter",
                )
            )
            state.stuck_open = 0
        out.append(Detection(meter.device_id, FaultCode.LEAK, OPEN, start, now, value, why))


def _unknown_flow_until(state: MeterState, until_us: int) -> None:
    """LEAK's windows start again after a span that says nothing of the flow (a silence, a
    frozen register): its "no zero-flow interval" and its night would count the span."""
    state.last_zero_us, state.night = max(state.last_zero_us, until_us), -1


_event_time = itemgetter(0)


def deadline(meter: Meter, state: MeterState) -> int:
    """When silence since the latest reading becomes NO_DATA (event microseconds)."""
    return state.last_us + meter.rules.nodata_intervals * meter.interval_s * 1_000_000


def expire(meter: Meter, state: MeterState, now_us: int) -> list[Detection]:
    """A NO_DATA timer fired at ``now_us`` (watermark or clock): open if still silent."""
    if state.silent_open or not state.last_us or now_us < deadline(meter, state):
        return []
    start = state.last_us + meter.interval_s * 1_000_000  # the first reading that is missing
    state.silent_open = start
    missed = (now_us - state.last_us) // (meter.interval_s * 1_000_000)
    return [
        Detection(
            meter.device_id,
            FaultCode.NO_DATA,
            OPEN,
            start,
            now_us,
            None,
            f"no reading for {missed} intervals of {meter.interval_s} s",
        )
    ]


def _clear(
    meter: Meter, code: FaultCode, start_us: int, at_us: int, value: float | None, why: str
) -> Detection:
    return Detection(meter.device_id, code, CLEAR, start_us, at_us, value, why)
