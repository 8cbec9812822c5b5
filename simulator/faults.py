"""Fault injection: which readings to corrupt, and how, so the contract names exactly that fault.

Each stateless :class:`~meterflow.core.contract.FaultCode` has its own rate per reading, and
malformed messages have one rate; malformed messages rotate through every
:class:`~meterflow.core.contract.DeadLetterReason` in turn. Every corruption here is built so
that :func:`meterflow.core.classifier.evaluate` classifies it as the injected kind and nothing
else (the rules' precedence is taken into account), which is what lets a run's summary
serve as the ground truth of an end-to-end test.

Stateful faults (:data:`~meterflow.core.contract.STATEFUL_FAULTS`) are episodes over a
meter's history rather than one bad reading: :class:`EpisodeRates` gives how many start
per meter and day, :func:`plan_episodes` sizes them (from the detector's
:class:`~meterflow.core.thresholds.DetectionRules`, so that each trips its rule, or from
field-like ranges that know nothing of the rules), and :mod:`simulator.episodes` injects
them and records each one, with its size, as ground truth.
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
from simulator.load import DECIMALS, HEADROOM, idle_probability

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
#: What episodes are sized from (``SimulationConfig.episode_sizes``): the detection rules,
#: so that each one trips its rule, or field-like ranges that know nothing of the rules,
#: so that a benchmark can measure recall by fault size.
RULES_SIZES, FIELD_SIZES = "rules", "field"
EPISODE_SIZES = (RULES_SIZES, FIELD_SIZES)

# Rules sizes.
#: STUCK: the span's length in readings (inclusive), at least 1.5x the rule's count.
STUCK_READINGS = (12, 48)
#: NO_DATA: the silent span's length in intervals, at least 2x the rule's count.
SILENT_READINGS = (8, 96)
#: LEAK: how long a leak lasts, in hours; at least the dry window plus 6 h, so that
#: "no idle interval for 24 h" holds for a while and a whole night window is inside.
LEAK_HOURS = (30.0, 54.0)
#: LEAK: the added flow, drawn between these multiples of the night-flow threshold ...
LEAK_FLOW_TIMES = (3.0, 8.0)
#: ... wavering by this share either side per reading (both sizes): a real leak does, and
#: a constant added to idle intervals would repeat one value for hours and look STUCK.
LEAK_JITTER = 0.1
#: SPIKE: the spike is this many times the meter's typical level (3x the rule's factor) ...
SPIKE_TIMES = 30.0
#: ... and at least this many times the type's minimum spike ...
SPIKE_FLOOR = 2.0
#: ... and at most this share of the stateless bound (both sizes: above it, it would be
#: OUT_OF_RANGE) ...
BOUND_SHARE = 0.9
#: ... and, capped there, still this many times the rule's factor above the typical level
#: (and 1.5x the type's minimum), or it is not injected.
SPIKE_MARGIN = 2.0
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

# Field sizes: each drawn log-uniform between these ends (in the field most faults are
# small and a few are large), with no floor or margin, so some fall below what a rule sees.
#: STUCK: how long a register stays frozen, in seconds (30 minutes to 2 days) ...
FIELD_STUCK_S = (30 * 60.0, 48 * 3600.0)
#: ... shown as at least this many equal readings (one alone repeats nothing).
STUCK_LEAST_READINGS = 2
#: NO_DATA: how long a meter is silent, in seconds (15 minutes to 3 days).
FIELD_SILENT_S = (15 * 60.0, 3 * SECONDS_PER_DAY)
#: LEAK: the added flow in L/h, a dripping tap to a running toilet and more ...
FIELD_LEAK_FLOW = (0.5, 50.0)
#: ... lasting this many hours (uniform): over a day, as a leak does until someone looks.
FIELD_LEAK_HOURS = (30.0, 78.0)
#: SPIKE: the spike's factor over the meter's typical level for its hour.
FIELD_SPIKE_TIMES = (2.0, 100.0)


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
    """The episodes of one run, sized for its interval: from the detection rules or from
    field-like ranges (:data:`EPISODE_SIZES`), and how each is drawn.

    Lengths are in readings; the per-reading start chances are ``rate x interval / day``,
    in :data:`STATEFUL_FAULTS` order.
    """

    start_chance: tuple[float, ...]
    sizes: str
    #: The meter types a SPIKE can be on. Rules sizes: those whose rule can fire at all (a
    #: reading above ``spike_min`` that is within the stateless bounds; not water at 10 s
    #: readings, whose flow bound caps a reading far below it). Field sizes: every type.
    spike_types: frozenset[MeterType]
    #: STUCK and NO_DATA lengths: rules sizes, whole readings (inclusive); field sizes, the
    #: ends of a log-uniform range of readings, rounded when drawn.
    stuck_readings: tuple[float, float]
    silent_readings: tuple[float, float]
    leak_readings: tuple[int, int]
    leak_flow: tuple[float, float]  # L/h; field sizes: log-uniform
    #: A spike's factor over the typical level: rules sizes, fixed (both ends alike);
    #: field sizes, log-uniform.
    spike_range: tuple[float, float]
    #: Readings a water STUCK or NO_DATA span may last (:data:`WATER_SPAN_MAX_S`), which
    #: also keeps out of the leak night window; below the shortest span (readings over
    #: 100 minutes apart) water meters get neither. None (field sizes): no such limit.
    water_span_max: int | None
    quiet_readings: int  # warm-up and gap between a meter's episodes
    stuck_floor: dict[MeterType, float]
    spike_floor: dict[MeterType, float]
    spike_cap: dict[MeterType, float]  # strictly below the stateless bounds
    #: A spike the cap leaves below ``spike_least_times`` x the typical level, or below the
    #: type's ``spike_least``, is not injected.
    spike_least_times: float
    spike_least: dict[MeterType, float]

    @property
    def field_sized(self) -> bool:
        return self.sizes == FIELD_SIZES

    def length(self, code: FaultCode, rng: np.random.Generator) -> int:
        """A ``code`` episode's length in readings (rules sizes: drawn as they always were)."""
        if code is FaultCode.SPIKE:
            return 1
        if code is FaultCode.LEAK:
            return int(rng.integers(self.leak_readings[0], self.leak_readings[1] + 1))
        if code is FaultCode.STUCK:
            span, least = self.stuck_readings, STUCK_LEAST_READINGS
        else:
            span, least = self.silent_readings, 1
        if self.field_sized:
            return max(least, round(_log_uniform(rng, span)))
        return int(rng.integers(int(span[0]), int(span[1]) + 1))

    def added_flow(self, rng: np.random.Generator) -> float:
        """A LEAK's added flow in L/h."""
        if self.field_sized:
            return round(_log_uniform(rng, self.leak_flow), DECIMALS)
        return round(float(rng.uniform(*self.leak_flow)), DECIMALS)

    def spike_times(self, rng: np.random.Generator) -> float:
        """A SPIKE's factor over the typical level (rules sizes: fixed, nothing drawn)."""
        return _log_uniform(rng, self.spike_range) if self.field_sized else self.spike_range[0]


def _log_uniform(rng: np.random.Generator, span: tuple[float, float]) -> float:
    return float(np.exp(rng.uniform(math.log(span[0]), math.log(span[1]))))


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
    episodes: EpisodeRates,
    detection: DetectionRules,
    rules: Rules,
    interval_s: float,
    sizes: str = RULES_SIZES,
) -> EpisodeShapes:
    """Size the episodes (``sizes``: :data:`EPISODE_SIZES`); ValueError says why not.

    Rules sizes make each episode trip its rule and nothing else. Field sizes come from
    the ``FIELD_*`` ranges and are only kept valid to the stateless rules (below the
    bounds); the warm-up and the quiet gap between a meter's episodes are the rules' in
    both. Only kinds with a rate above 0 are checked: a run asks for what it can get.
    """
    problems: list[str] = []
    chances = tuple(episodes.rate(code) * interval_s / SECONDS_PER_DAY for code in STATEFUL_FAULTS)
    if sum(chances) > 1:
        problems.append(f"episode rates add up to over one start per {interval_s:g} s reading")
    water_metric, flow_metric = METER_SPECS[MeterType.WATER].metric, "flow_rate"
    spike_cap = {t: BOUND_SHARE * rules.bounds[METER_SPECS[t].metric] for t in METER_SPECS}
    spike_cap[MeterType.WATER] = min(
        spike_cap[MeterType.WATER], BOUND_SHARE * rules.bounds[flow_metric] * interval_s / 60
    )
    if sizes == FIELD_SIZES:
        shapes = _field_shapes(chances, spike_cap, detection, interval_s)
    else:
        shapes = _rules_shapes(chances, spike_cap, episodes, detection, interval_s, problems)
    if episodes.rate(FaultCode.LEAK) > 0:
        # Normal readings stay below HEADROOM x bound; with the leak, below BOUND_SHARE x.
        leak_added = shapes.leak_flow[1] * interval_s / 3600.0 * (1 + LEAK_JITTER)
        room = BOUND_SHARE - HEADROOM
        if leak_added >= room * min(
            rules.bounds[water_metric], rules.bounds[flow_metric] * interval_s / 60
        ):
            problems.append("a LEAK would push water readings near the stateless bounds")
    if problems:
        raise ValueError("; ".join(problems))
    return shapes


def _field_shapes(
    chances: tuple[float, ...],
    spike_cap: dict[MeterType, float],
    detection: DetectionRules,
    interval_s: float,
) -> EpisodeShapes:
    """Field sizes: the ``FIELD_*`` ranges in this interval's readings, no floors."""
    nothing = dict.fromkeys(METER_SPECS, 0.0)
    return EpisodeShapes(
        start_chance=chances,
        sizes=FIELD_SIZES,
        spike_types=frozenset(METER_SPECS),
        stuck_readings=(FIELD_STUCK_S[0] / interval_s, FIELD_STUCK_S[1] / interval_s),
        silent_readings=(FIELD_SILENT_S[0] / interval_s, FIELD_SILENT_S[1] / interval_s),
        leak_readings=(
            _readings(FIELD_LEAK_HOURS[0] * 3600, interval_s),
            _readings(FIELD_LEAK_HOURS[1] * 3600, interval_s),
        ),
        leak_flow=FIELD_LEAK_FLOW,
        spike_range=FIELD_SPIKE_TIMES,
        water_span_max=None,
        quiet_readings=max(1, _readings(detection.baseline_history_s, interval_s)),
        stuck_floor=nothing,
        spike_floor=nothing,
        spike_cap=spike_cap,
        spike_least_times=1.0,  # a spike the cap brings down to the typical level is none
        spike_least=nothing,
    )


def _rules_shapes(
    chances: tuple[float, ...],
    spike_cap: dict[MeterType, float],
    episodes: EpisodeRates,
    detection: DetectionRules,
    interval_s: float,
    problems: list[str],
) -> EpisodeShapes:
    """Rules sizes: each episode trips its rule and nothing else; ``problems`` says where
    the rules and the interval leave no such episode."""
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
        dry, night = _dry_chances(interval_s, detection)
        if max(dry, night) > LEAK_FALSE_ALARM_CHANCE:
            problems.append(
                f"LEAK rules are not clean at {interval_s:g} s readings: a normal water meter "
                f"shows no idle interval in a dry window (chance {dry:.1e} a day) or none in "
                f"the night window ({night:.1e}); use shorter intervals"
            )
    return EpisodeShapes(
        start_chance=chances,
        sizes=RULES_SIZES,
        spike_types=spike_types,
        stuck_readings=(stuck_low, max(STUCK_READINGS[1], stuck_low)),
        silent_readings=(silent_low, max(SILENT_READINGS[1], silent_low)),
        leak_readings=(
            _readings(leak_hours[0] * 3600, interval_s),
            _readings(leak_hours[1] * 3600, interval_s),
        ),
        leak_flow=leak_flow,
        spike_range=(SPIKE_TIMES, SPIKE_TIMES),
        water_span_max=int(WATER_SPAN_MAX_S // interval_s),
        quiet_readings=max(1, _readings(detection.baseline_history_s, interval_s)),
        stuck_floor={t: STUCK_FLOOR * level for t, level in detection.stuck_min.items()},
        spike_floor=spike_floor,
        spike_cap=spike_cap,
        spike_least_times=SPIKE_MARGIN * detection.spike_factor,
        spike_least={t: 1.5 * level for t, level in detection.spike_min.items()},
    )
