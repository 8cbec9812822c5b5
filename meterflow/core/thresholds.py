"""The rules' limits: the stateless rules' bounds (:class:`Rules`) and the stateful rules'
thresholds (:class:`DetectionRules`), each field declared with its environment variable.

:mod:`meterflow.core.config` reads them from the environment; the simulator shapes the
faults it injects from the same values, so that each one trips its rule, and its
rules-sized episodes too (field-sized ones know nothing of them).
"""

from __future__ import annotations

from dataclasses import dataclass

from meterflow.core.contract import METER_SPECS, MeterType
from meterflow.core.variables import variable

_METRIC_BOUNDS: dict[str, float] = {
    name: bound for spec in METER_SPECS.values() for name, bound in spec.default_bounds.items()
}
_TYPES = tuple(str(kind) for kind in MeterType)


@dataclass(frozen=True)
class Rules:
    """Tunable limits of the stateless rules."""

    max_message_bytes: int = variable(
        "METERFLOW_MAX_MESSAGE_BYTES", "Larger messages are dead-lettered", 16_384, minimum=64
    )
    future_tolerance_s: float = variable(
        "METERFLOW_FUTURE_TOLERANCE_SECONDS",
        "How far past ingestion time a timestamp may be before FUTURE_TIMESTAMP",
        300.0,
        minimum=0,
    )
    #: Physical upper bound per reading of each metric (its meter type's unit).
    bounds: dict[str, float] = variable(
        "METERFLOW_MAX_{key}",
        "Upper physical bound of `{key}` per reading, in its meter type's unit",
        default_factory=lambda: dict(_METRIC_BOUNDS),
        minimum=0,
        keys=tuple(_METRIC_BOUNDS),
    )


def _per_type(electricity: float, water: float, gas: float) -> dict[MeterType, float]:
    return {MeterType.ELECTRICITY: electricity, MeterType.WATER: water, MeterType.GAS: gas}


def _hours(raw: str) -> tuple[int, int]:
    """``start-end`` hours of the day, e.g. ``2-4``."""
    start, _, end = raw.partition("-")
    try:
        return int(start), int(end)
    except ValueError:
        raise ValueError("must be two hours, start-end (e.g. 2-4)") from None


@dataclass(frozen=True)
class DetectionRules:
    """Thresholds of the stateful rules (:data:`~meterflow.core.contract.STATEFUL_FAULTS`).

    The stateful detector applies them per meter; the simulator's rules-sized episodes are
    shaped from them, so that each trips its rule and normal traffic trips none.
    Levels are per reading in each type's unit (kWh, L, m3); flows in L/h.
    """

    #: STUCK: this many readings in a row with the same non-zero value, i.e. for this many
    #: intervals (the meter's ``interval_seconds``) of time.
    stuck_readings: int = variable(
        "METERFLOW_STUCK_READINGS",
        "STUCK: readings in a row (and intervals of time) with the same value",
        8,
        minimum=2,
    )
    #: ... and a value above this level. Three decimals quantise tiny readings (a small
    #: flat in summer uses ~0.001 m3 of gas in 15 minutes at night) to a handful of
    #: values, so long runs of one of them are normal; above these levels consecutive normal
    #: readings seldom agree and eight in a row never do.
    stuck_min: dict[MeterType, float] = variable(
        "METERFLOW_STUCK_MIN_{key}",
        "STUCK: only a value above this counts ({key}, per reading)",
        default_factory=lambda: _per_type(0.02, 0.5, 0.02),
        minimum=0,
        keys=_TYPES,
    )
    #: SPIKE: a reading above this many times the meter's baseline: the highest good
    #: reading at its hour of day on each of the last 7 days (the median of its recent
    #: good readings until it has a day's), so ordinary daily peaks are not spikes ...
    spike_factor: float = variable(
        "METERFLOW_SPIKE_FACTOR",
        "SPIKE: a reading above this many times the meter's baseline (the highest good "
        "reading at its hour of day on each of the last 7 days)",
        10.0,
        minimum=1,
    )
    #: ... and above this absolute level, so tiny meters do not alarm. Water is idle in
    #: many intervals, so its baseline is often 0 (at night, and by day while its history
    #: is short) and this level alone guards it: it is above the largest normal 15-minute
    #: use (a big household's morning peak, ~16 L/min x 15 min, x4 scale, noise).
    spike_min: dict[MeterType, float] = variable(
        "METERFLOW_SPIKE_MIN_{key}",
        "SPIKE: and above this level ({key}, per reading)",
        default_factory=lambda: _per_type(1.0, 250.0, 1.0),
        minimum=0,
        keys=_TYPES,
    )
    #: A baseline needs at least this much of a meter's history; the simulator injects no
    #: episode in a meter's first this-long (nor within this long after another episode).
    baseline_history_s: float = variable(
        "METERFLOW_BASELINE_HISTORY_SECONDS",
        "SPIKE: history a meter needs before it has a baseline",
        86_400.0,
        minimum=0,
    )
    #: LEAK (water only): the night window, hours of the local day (METERFLOW_TIMEZONE), from
    #: the first hour inclusive to the second.
    leak_night_hours: tuple[int, int] = variable(
        "METERFLOW_LEAK_NIGHT_HOURS",
        "LEAK: the night window, hours of the local day (METERFLOW_TIMEZONE), start-end",
        (2, 4),
        parse=_hours,
        shown="2-4",
    )
    #: LEAK: a minimum flow over the night window's readings above this, in L/h, is a
    #: leak. A household is idle most of 02:00-04:00, so its minimum night flow is 0; a
    #: dripping tap wastes ~0.6 L/h (15 L a day), a leaking toilet 8-17 L/h (200-400 L a
    #: day). 6 L/h (144 L a day, 40% of a household's use) catches a leaking toilet or
    #: worse and stays clear of a dripping tap and of the meter's resolution.
    leak_min_night_flow: float = variable(
        "METERFLOW_LEAK_MIN_NIGHT_FLOW",
        "LEAK: a night's minimum flow above this (L/h) is a leak",
        6.0,
        minimum=0,
    )
    leak_dry_window_s: float = variable(
        "METERFLOW_LEAK_DRY_SECONDS",
        "LEAK: no zero-usage interval for this long is continuous flow",
        86_400.0,
        minimum=1,
    )
    nodata_intervals: int = variable(
        "METERFLOW_NODATA_INTERVALS",
        "NO_DATA: no reading for this many of the meter's intervals",
        4,
        minimum=1,
    )

    @property
    def leak_night_start_hour(self) -> int:
        return self.leak_night_hours[0]

    @property
    def leak_night_end_hour(self) -> int:
        return self.leak_night_hours[1]

    def __post_init__(self) -> None:
        if self.stuck_readings < 2 or self.nodata_intervals < 1:
            raise ValueError("stuck_readings must be at least 2 and nodata_intervals at least 1")
        if self.spike_factor <= 1:
            raise ValueError("spike_factor must be above 1")
        if not 0 <= self.leak_night_start_hour < self.leak_night_end_hour <= 24:
            raise ValueError("the leak night window must be hours 0-24, start before end")
        levels = (*self.stuck_min.values(), *self.spike_min.values(), self.leak_min_night_flow)
        if min(levels) <= 0 or self.baseline_history_s < 0 or self.leak_dry_window_s <= 0:
            raise ValueError("detection levels and windows must be above 0")

    def stuck_duration_s(self, interval_s: float) -> float:
        """How long a STUCK value lasts before it is one: ``stuck_readings`` intervals."""
        return self.stuck_readings * interval_s

    def nodata_after_s(self, interval_s: float) -> float:
        """How long a meter reading every ``interval_s`` may be silent before NO_DATA."""
        return self.nodata_intervals * interval_s

    def in_leak_night(self, hour_of_day: float) -> bool:
        """Whether an instant ``hour_of_day`` hours after local midnight is in the night window."""
        return self.leak_night_start_hour <= hour_of_day < self.leak_night_end_hour
