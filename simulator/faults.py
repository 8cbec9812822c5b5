"""Fault injection: which readings to corrupt, and how, so the contract names exactly that fault.

Each stateless :class:`~meterflow.core.contract.FaultCode` has its own rate per reading, and
malformed messages have one rate; malformed messages rotate through every
:class:`~meterflow.core.contract.DeadLetterReason` in turn. Every corruption here is built so
that :func:`meterflow.core.classifier.evaluate` classifies it as the injected kind and nothing
else (the rules' precedence is taken into account), which is what lets a run's summary
serve as the ground truth of an end-to-end test.

Stateful faults (:data:`~meterflow.core.contract.STATEFUL_FAULTS`) are episodes over a
meter's history rather than one bad reading: :class:`EpisodeRates` gives how many start
per meter and day, :func:`plan_episodes` checks and sizes them against the detector's
:class:`~meterflow.core.thresholds.DetectionRules`, and :mod:`simulator.episodes` injects
them and records each one as ground truth.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

from meterflow.core.contract import (
    METER_SPECS,
    SENTINEL_VALUE,
    STATEFUL_FAULTS,
    STATELESS_FAULTS,
    FaultCode,
    MeterType,
)
from meterflow.core.messages import DeadLetterReason
from meterflow.core.thresholds import DetectionRules, Rules
from meterflow.core.timestamps import SECONDS_PER_DAY, format_timestamp_us, parse_timestamp_us
from simulator.load import HEADROOM, idle_probability

#: Malformed messages cycle through every reason, one of each in turn.
MALFORMED_KINDS: tuple[DeadLetterReason, ...] = tuple(DeadLetterReason)
#: A future timestamp is the reading's own time plus a century: a meter clock gone wrong,
#: far past any tolerance, and a pure function of the reading so seeded runs stay identical.
FUTURE_SHIFT = timedelta(days=36_525)
DEFAULT_FAULT_RATE = 0.002
DEFAULT_MALFORMED_RATE = 0.001
#: Draw code of a reading left alone; ``k`` in ``1..5`` is ``STATELESS_FAULTS[k - 1]``.
NORMAL = 0
MALFORMED = len(STATELESS_FAULTS) + 1


@dataclass(frozen=True)
class FaultRates:
    """Probability per reading of each injected fault kind, and of a malformed message."""

    rates: Mapping[FaultCode, float] = field(default_factory=dict)
    malformed: float = 0.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.rates) - set(STATELESS_FAULTS))
        if unknown:
            kinds = ", ".join(STATELESS_FAULTS)
            raise ValueError(f"cannot inject {', '.join(unknown)}: only {kinds}")
        if not all(0 <= rate <= 1 for rate in (*self.rates.values(), self.malformed)):
            raise ValueError("fault rates must be between 0 and 1")
        if self.total > 1:
            raise ValueError(f"fault and malformed rates add up to {self.total:g}, over 1")

    @classmethod
    def default(cls) -> FaultRates:
        """A little of everything, as a live fleet might show."""
        return cls(dict.fromkeys(STATELESS_FAULTS, DEFAULT_FAULT_RATE), DEFAULT_MALFORMED_RATE)

    @classmethod
    def none(cls) -> FaultRates:
        return cls({}, 0.0)

    @property
    def total(self) -> float:
        return sum(self.rates.values()) + self.malformed


def parse_rate_table(
    text: str, kinds: tuple[FaultCode, ...] = STATELESS_FAULTS
) -> dict[FaultCode, float]:
    """``"SENTINEL=0.01,NEGATIVE=0.002"`` (kinds case-insensitive) to a rate table."""
    table: dict[FaultCode, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        try:
            code, rate = FaultCode(name.strip().upper()), float(value)
        except ValueError:
            code = None
        if code not in kinds:
            raise ValueError(f"{item!r} is not KIND=RATE with KIND one of {', '.join(kinds)}")
        table[code] = rate
    return table


class FaultDraws:
    """Draws, per reading, whether to leave it, corrupt it (which fault) or garble it.

    Codes are :data:`NORMAL`, ``k`` for ``STATELESS_FAULTS[k - 1]`` and :data:`MALFORMED`.
    """

    def __init__(self, rates: FaultRates, rng: np.random.Generator) -> None:
        self.rng = rng
        self.active = rates.total > 0
        per_code = [rates.rates.get(code, 0.0) for code in STATELESS_FAULTS]
        self.edges = np.cumsum([*per_code, rates.malformed])
        self._malformed_turn = 0

    def draw(self, shape: tuple[int, ...]) -> np.ndarray:
        """One code per reading (int8); with no rates, no random numbers are used."""
        if not self.active:
            return np.zeros(shape, dtype=np.int8)
        picks = np.searchsorted(self.edges, self.rng.random(shape), side="right") + 1
        return np.where(picks > MALFORMED, NORMAL, picks).astype(np.int8)

    def next_malformed_kind(self) -> DeadLetterReason:
        kind = MALFORMED_KINDS[self._malformed_turn % len(MALFORMED_KINDS)]
        self._malformed_turn += 1
        return kind


def corrupt_value(code: FaultCode, value: float, bound: float) -> float:
    """The metric value a ``code`` fault reports instead of ``value`` (``value >= 0``).

    Integer in, integer out (the prototype's format sends integers). ``MISSING_METRIC`` and
    ``FUTURE_TIMESTAMP`` leave the value alone: they drop the field or move the timestamp.
    """
    if code is FaultCode.SENTINEL:
        return SENTINEL_VALUE
    if code is FaultCode.NEGATIVE:  # at most -2: never the sentinel, never zero
        return round(-(value + 2), 3)
    if code is FaultCode.OUT_OF_RANGE:
        doubled = 2 * bound + value
        return int(doubled) if isinstance(value, int) else round(doubled, 3)
    return value


def future_timestamp(stamp: str) -> str:
    """``stamp`` moved :data:`FUTURE_SHIFT` ahead, in the contract's timestamp form."""
    shift_us = int(FUTURE_SHIFT.total_seconds()) * 1_000_000
    return format_timestamp_us(parse_timestamp_us(stamp) + shift_us)


def check_future_shift(earliest_stamp: str) -> None:
    """Refuse a run whose future timestamps would not be ahead (readings a century old)."""
    ahead = datetime.fromisoformat(future_timestamp(earliest_stamp))
    if ahead < datetime.now(UTC) + timedelta(days=1):
        raise ValueError(
            f"readings from {earliest_stamp} are too old to inject FUTURE_TIMESTAMP faults"
        )


def malformed_message(
    kind: DeadLetterReason, device_id: str, stamp: str, metric: str, rules: Rules
) -> bytes:
    """Bytes that the contract dead-letters for ``kind``, looking like a real meter's mistake."""
    reading = {"device_id": device_id, "timestamp": stamp, metric: 1.0}
    if kind is DeadLetterReason.EMPTY:
        return b""
    if kind is DeadLetterReason.OVERSIZE:  # a firmware dump appended to a reading
        return json.dumps({**reading, "debug": "0" * rules.max_message_bytes}).encode()
    if kind is DeadLetterReason.NOT_JSON:  # cut off halfway, as by a dropped connection
        whole = json.dumps(reading).encode()
        return whole[: len(whole) // 2]
    if kind is DeadLetterReason.NOT_OBJECT:
        return json.dumps(list(reading.values())).encode()
    if kind is DeadLetterReason.MISSING_FIELD:
        return json.dumps({"device_id": device_id, metric: 1.0}).encode()
    if kind is DeadLetterReason.WRONG_TYPE:
        return json.dumps({**reading, metric: "1.0"}).encode()
    if kind is DeadLetterReason.BAD_TIMESTAMP:
        local = datetime.fromisoformat(stamp).strftime("%d/%m/%Y %H:%M:%S")
        return json.dumps({**reading, "timestamp": local}).encode()
    if kind is DeadLetterReason.UNKNOWN_METER_TYPE:
        return json.dumps({**reading, "meter_type": "steam"}).encode()
    raise ValueError(f"no malformed message for {kind}")


# --- stateful episodes ------------------------------------------------------------------

#: ``--episode-rates default``: episodes starting per meter and day, of each kind.
DEFAULT_EPISODE_RATE = 0.05
#: ``meterflow run``'s episodes per meter-day (LEAK: per water meter-day): with 300 meters,
#: each of STUCK, SPIKE and NO_DATA starts somewhere about once a minute while most meters
#: are free, so a demo shows them within minutes; a leak needs a night or a day to show.
DEMO_EPISODE_RATES: dict[FaultCode, float] = {
    FaultCode.STUCK: 4.0,
    FaultCode.SPIKE: 4.0,
    FaultCode.LEAK: 1.0,
    FaultCode.NO_DATA: 4.0,
}
#: STUCK: the span's length in readings (inclusive), at least 1.5x the rule's count.
STUCK_READINGS = (12, 48)
#: NO_DATA: the silent span's length in intervals, at least 2x the rule's count.
SILENT_READINGS = (8, 96)
#: LEAK: how long a leak lasts, in hours; at least the dry window plus 6 h, so that
#: "no idle interval for 24 h" holds for a while and a whole night window is inside.
LEAK_HOURS = (30.0, 54.0)
#: LEAK: the added flow, drawn between these multiples of the night-flow threshold ...
LEAK_FLOW_TIMES = (3.0, 8.0)
#: ... wavering by this share either side per reading: a real leak does, and a constant
#: added to idle intervals would repeat one value for hours and look STUCK.
LEAK_JITTER = 0.1
#: SPIKE: the spike is this many times the meter's typical level (3x the rule's factor) ...
SPIKE_TIMES = 30.0
#: ... and at least this many times the type's minimum spike ...
SPIKE_FLOOR = 2.0
#: ... and at most this share of the stateless bound (or it would be OUT_OF_RANGE).
BOUND_SHARE = 0.9
#: SPIKE: the typical level is the highest over the spike's hour of day, on its own day
#: and on each of this many days before (a weekday's baseline serves a Sunday spike).
SPIKE_LOOKBACK_DAYS = 7
#: STUCK: a stuck value is at least this many times the type's ``stuck_min``.
STUCK_FLOOR = 2.0
#: Water STUCK and NO_DATA spans stay out of the leak night window and this short, so
#: they can neither look like continuous flow nor hide a night's idle intervals.
WATER_SPAN_MAX_S = 20 * 3600.0
#: A leak rule must not trip on normal water traffic: the chance that a normal meter shows
#: no idle interval in a dry window, or uses water in every night-window interval, must
#: stay below this (at 15-minute readings both are below 1e-8).
LEAK_FALSE_ALARM_CHANCE = 1e-6


@dataclass(frozen=True)
class EpisodeRates:
    """Stateful episodes starting per meter and day, per kind of :data:`STATEFUL_FAULTS`.

    LEAK counts per water meter-day (only water meters leak). A rate is the chance per day
    of a *free* meter: one is not free in its first day, during an episode and for a day
    after it, so a run holds fewer episodes than rate x meter-days (the ground truth says
    how many). All 0 by default: no random number is drawn for episodes and the stream is
    what it was without them.
    """

    rates: Mapping[FaultCode, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.rates) - set(STATEFUL_FAULTS))
        if unknown:
            kinds = ", ".join(STATEFUL_FAULTS)
            raise ValueError(f"no episodes of {', '.join(unknown)}: only {kinds}")
        if any(rate < 0 or not math.isfinite(rate) for rate in self.rates.values()):
            raise ValueError("episode rates must be 0 or above (episodes per meter-day)")

    @classmethod
    def default(cls) -> EpisodeRates:
        return cls(dict.fromkeys(STATEFUL_FAULTS, DEFAULT_EPISODE_RATE))

    @classmethod
    def none(cls) -> EpisodeRates:
        return cls({})

    @property
    def active(self) -> bool:
        return any(rate > 0 for rate in self.rates.values())

    def rate(self, code: FaultCode) -> float:
        return self.rates.get(code, 0.0)


@dataclass(frozen=True)
class EpisodeShapes:
    """The episodes of one run, sized for its interval and the detection rules.

    Lengths are in readings (inclusive ranges); the per-reading start chances are
    ``rate x interval / day``, in :data:`STATEFUL_FAULTS` order.
    """

    start_chance: tuple[float, ...]
    #: The meter types a SPIKE can be on: those whose rule can fire at all (a reading
    #: above ``spike_min`` that is within the stateless bounds; not water at 10 s readings,
    #: whose flow bound caps a reading far below it).
    spike_types: frozenset[MeterType]
    stuck_readings: tuple[int, int]
    silent_readings: tuple[int, int]
    leak_readings: tuple[int, int]
    leak_flow: tuple[float, float]  # L/h
    #: Readings a water STUCK or NO_DATA span may last (:data:`WATER_SPAN_MAX_S`); below
    #: the shortest span (readings over 100 minutes apart) water meters get neither.
    water_span_max: int
    quiet_readings: int  # warm-up and gap between a meter's episodes
    stuck_floor: dict[MeterType, float]
    spike_floor: dict[MeterType, float]
    spike_cap: dict[MeterType, float]  # strictly below the stateless bounds


def _readings(seconds: float, interval_s: float) -> int:
    return math.ceil(seconds / interval_s - 1e-9)


def _dry_chances(interval_s: float, detection: DetectionRules) -> tuple[float, float]:
    """A normal water meter's worst chance per day of no idle interval in the dry window,
    and of using water in every reading of the night window."""
    day = np.arange(0.0, 2 * SECONDS_PER_DAY, interval_s)
    used = 1.0 - idle_probability(day, interval_s)
    per_window = _readings(detection.leak_dry_window_s, interval_s)
    logs = np.log(np.maximum(used, 1e-300))
    # Every window's sum from running sums: a convolution takes minutes at 1 s readings.
    running = np.concatenate(([0.0], np.cumsum(logs)))
    windows = (running[per_window:] - running[:-per_window])[: len(day) // 2 + 1]
    hours = day % SECONDS_PER_DAY / 3600.0
    night = (hours >= detection.leak_night_start_hour) & (hours < detection.leak_night_end_hour)
    night_used = float(np.exp(logs[: len(day) // 2][night[: len(day) // 2]].sum()))
    return float(np.exp(windows.max())), night_used if night.any() else 1.0


def plan_episodes(
    episodes: EpisodeRates, detection: DetectionRules, rules: Rules, interval_s: float
) -> EpisodeShapes:
    """Size the episodes so each trips its rule and nothing else; ValueError says why not.

    Only kinds with a rate above 0 are checked: a run asks for what it can get.
    """
    problems: list[str] = []
    chances = tuple(episodes.rate(code) * interval_s / SECONDS_PER_DAY for code in STATEFUL_FAULTS)
    if sum(chances) > 1:
        problems.append(f"episode rates add up to over one start per {interval_s:g} s reading")
    stuck_low = max(STUCK_READINGS[0], math.ceil(1.5 * detection.stuck_readings))
    silent_low = max(SILENT_READINGS[0], 2 * detection.nodata_intervals)
    leak_hours = (max(LEAK_HOURS[0], detection.leak_dry_window_s / 3600 + 6), LEAK_HOURS[1])
    leak_hours = (leak_hours[0], max(leak_hours))
    threshold = detection.leak_min_night_flow
    interval_h = interval_s / 3600.0
    # Added to a used interval, the leak must stay under a quarter of the minimum spike.
    leak_flow = (
        LEAK_FLOW_TIMES[0] * threshold,
        min(LEAK_FLOW_TIMES[1] * threshold, detection.spike_min[MeterType.WATER] / 4 / interval_h),
    )
    water_metric, flow_metric = METER_SPECS[MeterType.WATER].metric, "flow_rate"
    spike_cap = {t: BOUND_SHARE * rules.bounds[METER_SPECS[t].metric] for t in METER_SPECS}
    spike_cap[MeterType.WATER] = min(
        spike_cap[MeterType.WATER], BOUND_SHARE * rules.bounds[flow_metric] * interval_s / 60
    )
    spike_floor = {t: SPIKE_FLOOR * level for t, level in detection.spike_min.items()}
    spike_types = frozenset(
        t for t in METER_SPECS if detection.spike_min[t] < spike_cap[t] / BOUND_SHARE
    )
    if episodes.rate(FaultCode.SPIKE) > 0:
        low = [str(t) for t in METER_SPECS if t in spike_types and spike_floor[t] >= spike_cap[t]]
        if low:
            problems.append(
                f"a SPIKE on {', '.join(low)} meters cannot be {SPIKE_FLOOR:g}x the minimum "
                "spike and below the stateless bounds"
            )
        elif not spike_types:
            problems.append(f"no meter type can show a SPIKE at {interval_s:g} s readings")
    if episodes.rate(FaultCode.LEAK) > 0:
        if leak_flow[0] > leak_flow[1]:
            problems.append(
                f"a LEAK of {leak_flow[0]:g} L/h (3x the night threshold) adds more than a "
                f"quarter of the minimum water spike to a {interval_s:g} s reading"
            )
        # Normal readings stay below HEADROOM x bound; with the leak, below BOUND_SHARE x.
        leak_added = leak_flow[1] * interval_h * (1 + LEAK_JITTER)
        room = BOUND_SHARE - HEADROOM
        if leak_added >= room * min(
            rules.bounds[water_metric], rules.bounds[flow_metric] * interval_s / 60
        ):
            problems.append("a LEAK would push water readings near the stateless bounds")
        dry, night = _dry_chances(interval_s, detection)
        if max(dry, night) > LEAK_FALSE_ALARM_CHANCE:
            problems.append(
                f"LEAK rules are not clean at {interval_s:g} s readings: a normal water meter "
                f"shows no idle interval in a dry window (chance {dry:.1e} a day) or none in "
                f"the night window ({night:.1e}); use shorter intervals"
            )
    if problems:
        raise ValueError("; ".join(problems))
    return EpisodeShapes(
        start_chance=chances,
        spike_types=spike_types,
        stuck_readings=(stuck_low, max(STUCK_READINGS[1], stuck_low)),
        silent_readings=(silent_low, max(SILENT_READINGS[1], silent_low)),
        leak_readings=(
            _readings(leak_hours[0] * 3600, interval_s),
            _readings(leak_hours[1] * 3600, interval_s),
        ),
        leak_flow=leak_flow,
        water_span_max=int(WATER_SPAN_MAX_S // interval_s),
        quiet_readings=max(1, _readings(detection.baseline_history_s, interval_s)),
        stuck_floor={t: STUCK_FLOOR * level for t, level in detection.stuck_min.items()},
        spike_floor=spike_floor,
        spike_cap=spike_cap,
    )
