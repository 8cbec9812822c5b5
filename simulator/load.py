"""Load shapes: what a household consumes in an interval, by type, hour, weekday and season.

Each type has an hourly shape for weekdays and one for weekends (multipliers of its mean
rate, interpolated between hour centres and normalised so a week averages 1). Their
integral over the week is tabulated per minute, so the consumption in *any* interval is a
difference of two table look-ups: it scales with the interval's length and stays right
for intervals that straddle hours or days. Gas follows a heating season, electricity and
water move a little with the year. A meter's reading is that expectation times its
household's scale and a lognormal noise with mean 1.

Water is used in bursts (a tap, a flush, a shower), so many water intervals see none at
all: draws start at random with a rate that depends on the hour of day (rare at night),
an interval is idle with the probability that none starts in it, and a used interval
carries the expectation divided by the chance of use. The expectation per interval is
unchanged; a household's minimum night flow is 0, as it is for a home without a leak. The
night is not dry either: 7-15% of the 15-minute intervals between 01:00 and 05:00 see some
use (a flush, a glass of water), drawn interval by interval (about half of the nights have
some between 02:00 and 04:00), so a healthy meter shows the occasional night use that a
leak rule must tell from a leak's continuous flow.

Some electricity meters are on a constant load (:class:`ConstantLoad`, a share of them
when asked): a pump that draws the same every interval, or street lighting that draws it
from 18:00 to 06:00 UTC and nothing by day. Their readings repeat one value by nature; the
registry says so (``constant_load``), and no STUCK or SPIKE is injected on them.

Times are UTC and the simulated city lives on UTC. Everything is vectorised: one call
computes a block of time steps for the whole fleet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from meterflow.core.contract import METER_SPECS, TYPE_ORDER, MeterType
from meterflow.core.thresholds import Rules
from meterflow.core.timestamps import SECONDS_PER_DAY

#: Mean consumption per hour of a median household, in each type's unit (kWh, L, m3).
MEAN_PER_HOUR: dict[MeterType, float] = {
    MeterType.ELECTRICITY: 0.45,  # ~3,900 kWh a year
    MeterType.WATER: 15.0,  # ~360 L a day
    MeterType.GAS: 0.12,  # ~1,050 m3 a year
}
#: Seasonal swing: ``1 + amplitude * cos(days since mid-January)``; gas heats in winter.
SEASON_AMPLITUDE: dict[MeterType, float] = {
    MeterType.ELECTRICITY: 0.12,
    MeterType.WATER: -0.1,  # gardens and showers: a little more in summer
    MeterType.GAS: 0.7,  # x1.7 in mid-January, x0.3 (hot water only) in mid-July
}
NOISE_SIGMA = 0.25
#: Readings have three decimals; the smallest reading is one unit of the last decimal.
DECIMALS = 3
SMALLEST: float = 10**-DECIMALS
#: Normal readings stay below this share of the contract's bound, never near a fault.
HEADROOM = 0.5

# Hourly shapes, 00h to 23h (multipliers of the type's mean rate before normalisation).
# fmt: off
WEEKDAY_SHAPE: dict[MeterType, tuple[float, ...]] = {
    MeterType.ELECTRICITY: (0.45, 0.40, 0.38, 0.37, 0.38, 0.45, 0.80, 1.30, 1.35, 1.00, 0.85, 0.85,
                            0.90, 0.85, 0.80, 0.85, 1.00, 1.40, 1.90, 2.00, 1.85, 1.60, 1.10, 0.70),
    MeterType.WATER: (0.04, 0.02, 0.02, 0.02, 0.03, 0.15, 1.60, 3.00, 2.40, 1.20, 0.80, 0.80,
                      1.00, 0.80, 0.70, 0.80, 1.00, 1.30, 1.80, 2.00, 1.60, 1.20, 0.60, 0.20),
    MeterType.GAS: (0.30, 0.25, 0.25, 0.25, 0.35, 0.90, 2.00, 2.20, 1.60, 0.90, 0.70, 0.70,
                    0.80, 0.70, 0.70, 0.80, 1.10, 1.70, 1.90, 1.80, 1.60, 1.30, 0.80, 0.45),
}
WEEKEND_SHAPE: dict[MeterType, tuple[float, ...]] = {
    MeterType.ELECTRICITY: (0.50, 0.45, 0.40, 0.38, 0.38, 0.40, 0.50, 0.70, 1.10, 1.40, 1.40, 1.30,
                            1.35, 1.20, 1.10, 1.10, 1.20, 1.50, 1.85, 1.90, 1.80, 1.60, 1.20, 0.80),
    MeterType.WATER: (0.06, 0.03, 0.02, 0.02, 0.02, 0.04, 0.30, 0.90, 2.20, 2.60, 1.80, 1.30,
                      1.20, 1.00, 0.90, 1.00, 1.10, 1.30, 1.70, 1.80, 1.50, 1.20, 0.70, 0.30),
    MeterType.GAS: (0.35, 0.30, 0.25, 0.25, 0.30, 0.40, 0.90, 1.50, 1.90, 1.70, 1.30, 1.00,
                    1.00, 0.90, 0.90, 1.00, 1.20, 1.70, 1.90, 1.80, 1.60, 1.30, 0.90, 0.50),
}
#: Chance that a 15-minute water interval starting in each hour (00h to 23h, UTC) has no
#: use at all: 0.85-0.93 between 01:00 and 05:00, 0.2-0.4 by day. Other interval lengths
#: follow from the implied rate of draws (constant within an hour): a day is never idle,
#: a minute mostly is.
WATER_IDLE_15MIN: tuple[float, ...] = (0.70, 0.85, 0.92, 0.93, 0.90, 0.65, 0.35, 0.20,
                                       0.20, 0.30, 0.35, 0.35, 0.30, 0.35, 0.40, 0.35,
                                       0.30, 0.25, 0.20, 0.20, 0.25, 0.30, 0.35, 0.50)
# fmt: on
IDLE_REFERENCE_S = 900.0

#: A constant load draws this much per 15 minutes while on (kWh, uniform per meter) ...
CONSTANT_KWH_PER_15MIN = (0.05, 2.0)
CONSTANT_REFERENCE_S = 900.0
#: ... and is street lighting (on between these UTC hours, dusk to dawn) with this chance,
#: else a pump (always on).
STREET_LIGHT_HOURS = (18, 6)
STREET_LIGHT_SHARE = 0.5

MINUTES_PER_WEEK = 7 * 24 * 60
#: 1970-01-01 was a Thursday: the epoch is this many minutes after a Monday 00:00.
EPOCH_AFTER_MONDAY_MIN = 3 * 24 * 60
DAYS_PER_YEAR = 365.2425
MID_JANUARY_DAY = 14  # day of year (from 0) of the heating peak


def weekly_integral(meter_type: MeterType) -> np.ndarray:
    """Cumulative mean-normalised load per minute of the week (Monday 00:00 = 0), in hours.

    Entry ``k`` is the consumption from Monday 00:00 to minute ``k`` in units of "hours at
    the mean rate", so a whole week integrates to 168.
    """
    week = np.array(WEEKDAY_SHAPE[meter_type] * 5 + WEEKEND_SHAPE[meter_type] * 2)
    hour_centres = np.arange(len(week)) * 60.0 + 30.0
    per_minute = np.interp(
        np.arange(MINUTES_PER_WEEK) + 0.5, hour_centres, week, period=MINUTES_PER_WEEK
    )
    per_minute /= per_minute.mean()
    return np.concatenate(([0.0], np.cumsum(per_minute) / 60.0))


_INTEGRALS = np.stack([weekly_integral(t) for t in TYPE_ORDER])  # [type, minute]
_MINUTE_KNOTS = np.arange(MINUTES_PER_WEEK + 1, dtype=np.float64)
_HOURS_PER_WEEK = MINUTES_PER_WEEK / 60.0
_MEAN = np.array([MEAN_PER_HOUR[t] for t in TYPE_ORDER])
_SEASON = np.array([SEASON_AMPLITUDE[t] for t in TYPE_ORDER])


def mean_hours_since_epoch(type_position: int, epoch_s: np.ndarray) -> np.ndarray:
    """The shape's integral from the epoch's Monday to ``epoch_s``, in mean-rate hours."""
    minutes = epoch_s / 60.0 + EPOCH_AFTER_MONDAY_MIN
    weeks, into_week = np.divmod(minutes, MINUTES_PER_WEEK)
    hours: np.ndarray = weeks * _HOURS_PER_WEEK + np.interp(
        into_week, _MINUTE_KNOTS, _INTEGRALS[type_position]
    )
    return hours


def expected_consumption(starts_s: np.ndarray, interval_s: float) -> np.ndarray:
    """What a median household of each type consumes in ``[start, start + interval)``.

    ``starts_s`` are epoch seconds (UTC); the result is ``[len(starts_s), len(TYPE_ORDER)]``
    in each type's unit. The season is taken at the interval's middle.
    """
    starts = np.asarray(starts_s, dtype=np.float64).reshape(-1)
    ends = starts + interval_s
    days = (starts + interval_s / 2) / SECONDS_PER_DAY
    angle = 2 * math.pi * (np.mod(days, DAYS_PER_YEAR) - MID_JANUARY_DAY) / DAYS_PER_YEAR
    season = 1.0 + np.outer(np.cos(angle), _SEASON)
    shape_hours = np.column_stack(
        [
            mean_hours_since_epoch(k, ends) - mean_hours_since_epoch(k, starts)
            for k in range(len(TYPE_ORDER))
        ]
    )
    consumption: np.ndarray = shape_hours * season * _MEAN
    return consumption


def _idle_draws_per_day() -> np.ndarray:
    """Cumulative expected water draws from 00:00 to each whole hour (25 knots)."""
    per_hour = -np.log(np.array(WATER_IDLE_15MIN)) * (3600.0 / IDLE_REFERENCE_S)
    return np.concatenate(([0.0], np.cumsum(per_hour)))


_DRAWS_CUMULATIVE = _idle_draws_per_day()
_DRAWS_PER_DAY = float(_DRAWS_CUMULATIVE[-1])
_HOUR_KNOTS = np.arange(25, dtype=np.float64)


def _draws_since_epoch(epoch_s: np.ndarray) -> np.ndarray:
    days, hour = np.divmod(epoch_s / 3600.0, 24.0)
    draws: np.ndarray = days * _DRAWS_PER_DAY + np.interp(hour, _HOUR_KNOTS, _DRAWS_CUMULATIVE)
    return draws


def idle_probability(starts_s: np.ndarray, interval_s: float) -> np.ndarray:
    """Chance that a water meter uses nothing in ``[start, start + interval)``, per start.

    Draws start as a Poisson process whose rate is constant within an hour, so the chance
    is ``exp(-expected draws)``: :data:`WATER_IDLE_15MIN` for a quarter within one hour.
    """
    starts = np.asarray(starts_s, dtype=np.float64).reshape(-1)
    expected_draws = _draws_since_epoch(starts + interval_s) - _draws_since_epoch(starts)
    idle: np.ndarray = np.exp(-expected_draws)
    return idle


@dataclass(frozen=True)
class ConstantLoad:
    """An electricity meter on one constant load: it repeats one value by nature."""

    kwh_per_15min: float  # while on
    street_light: bool  # on from 18:00 to 06:00 UTC only; else a pump, always on


def assign_constant_loads(
    types: Sequence[MeterType], share: float, seed: int | None
) -> list[ConstantLoad | None]:
    """Per meter, its constant load or None: ``share`` of the electricity meters, drawn
    from a generator of their own, so the rest of a seeded fleet stays what it was."""
    rng = np.random.default_rng(None if seed is None else [seed, 6])
    picked = rng.random(len(types)) < share
    kwh = rng.uniform(*CONSTANT_KWH_PER_15MIN, len(types))
    lights = rng.random(len(types)) < STREET_LIGHT_SHARE
    return [
        ConstantLoad(round(float(k), DECIMALS), bool(light))
        if chosen and meter_type is MeterType.ELECTRICITY
        else None
        for chosen, k, light, meter_type in zip(
            picked.tolist(), kwh.tolist(), lights.tolist(), types, strict=True
        )
    ]


def _lit_seconds(epoch_s: np.ndarray) -> np.ndarray:
    """Seconds street lights have been on from the epoch to ``epoch_s``."""
    on_at, off_at = (hour * 3600.0 for hour in STREET_LIGHT_HOURS)
    days, into_day = np.divmod(epoch_s, float(SECONDS_PER_DAY))
    lit: np.ndarray = (
        days * (SECONDS_PER_DAY - (on_at - off_at))
        + np.minimum(into_day, off_at)
        + np.maximum(into_day - on_at, 0.0)
    )
    return lit


def _cap(bound: float) -> float:
    """The largest normal reading for a bound: ``HEADROOM`` of it, down to the decimals."""
    cap = math.floor(bound * HEADROOM / SMALLEST) * SMALLEST
    if cap < SMALLEST:
        raise ValueError(f"bound {bound:g} is too small to simulate normal readings below it")
    return round(cap, DECIMALS)


class LoadModel:
    """Readings of a fleet: expectation x household scale x noise, kept inside the bounds.

    Values are rounded to :data:`DECIMALS` and clipped to ``[SMALLEST, HEADROOM x bound]``,
    so a normal reading is never -1, negative or out of range: the contract classifies it
    valid whatever the noise draws. Only water is ever 0 (an idle interval, flow 0 too),
    and street lighting by day. ``constant`` gives each meter's constant load, if any.
    """

    def __init__(
        self,
        type_index: np.ndarray,
        scale: np.ndarray,
        rules: Rules,
        constant: Sequence[ConstantLoad | None] = (),
    ) -> None:
        self.type_index = np.asarray(type_index, dtype=np.intp)
        self.scale = np.asarray(scale, dtype=np.float64)
        caps = [_cap(rules.bounds[METER_SPECS[t].metric]) for t in TYPE_ORDER]
        self.caps = np.array(caps)[self.type_index]
        loads = [(i, load) for i, load in enumerate(constant) if load is not None]
        #: The constant loads' positions, what they draw while on, and which are lights.
        self.constant = np.array([i for i, _ in loads], dtype=np.intp)
        self.constant_kwh = np.array([load.kwh_per_15min for _, load in loads])
        self.street_light = np.array([load.street_light for _, load in loads], dtype=bool)
        self.flow_cap = _cap(rules.bounds["flow_rate"])
        water = np.flatnonzero(self.type_index == TYPE_ORDER.index(MeterType.WATER))
        #: The water columns: a slice (a view, no copy) when contiguous, as in a Fleet.
        self.water: slice | np.ndarray = (
            slice(int(water[0]), int(water[-1]) + 1)
            if len(water) and water[-1] - water[0] + 1 == len(water)
            else water
        )
        self.water_count = len(water)

    def sample(
        self,
        starts_s: np.ndarray,
        interval_s: float,
        rng: np.random.Generator,
        idle_rng: np.random.Generator | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Consumption ``[steps, meters]`` in each interval, and the average water flow.

        The flow (L/min) is the interval's usage over its minutes, so the two agree; it is
        computed for every meter and only water messages carry it. Which water intervals
        are idle is drawn from ``idle_rng`` (default ``rng``, after the noise): a separate
        generator leaves the other types' values exactly what they were without idling.
        """
        expected = expected_consumption(starts_s, interval_s)[:, self.type_index]
        noise = rng.lognormal(-(NOISE_SIGMA**2) / 2, NOISE_SIGMA, expected.shape)
        raw = expected * self.scale * noise
        idle = None
        if self.water_count:
            chance = idle_probability(starts_s, interval_s)[:, None]
            draws = (rng if idle_rng is None else idle_rng).random((len(raw), self.water_count))
            idle = draws < chance
            raw[:, self.water] /= 1.0 - chance  # used intervals carry the idle ones' share
        usage = np.clip(np.round(raw, DECIMALS), SMALLEST, self.caps)
        if len(self.constant):
            usage[:, self.constant] = self._constant(starts_s, interval_s)
        flow = np.clip(np.round(usage / (interval_s / 60.0), DECIMALS), SMALLEST, self.flow_cap)
        if idle is not None:
            usage[:, self.water] = np.where(idle, 0.0, usage[:, self.water])
            flow[:, self.water] = np.where(idle, 0.0, flow[:, self.water])
        return usage, flow

    def _constant(self, starts_s: np.ndarray, interval_s: float) -> np.ndarray:
        """The constant loads' readings ``[steps, loads]``: the same every interval while
        on (a light on for part of a long interval reads that part of it)."""
        starts = np.asarray(starts_s, dtype=np.float64).reshape(-1)
        lit = (_lit_seconds(starts + interval_s) - _lit_seconds(starts)) / interval_s
        on = np.where(self.street_light[None, :], lit[:, None], 1.0)
        value = self.constant_kwh * (interval_s / CONSTANT_REFERENCE_S) * on
        lowest = np.where(self.street_light, 0.0, SMALLEST)  # a pump never reads 0
        constant: np.ndarray = np.clip(np.round(value, DECIMALS), lowest, self.caps[self.constant])
        return constant

    def typical(self, starts_s: np.ndarray, interval_s: float, meters: np.ndarray) -> np.ndarray:
        """What meter ``meters[k]`` reads in ``[starts_s[k], +interval)`` when it reads at all.

        The expectation times the household's scale, divided for water by the chance the
        interval is used: the level a used interval is noise around.
        """
        starts = np.asarray(starts_s, dtype=np.float64).reshape(-1)
        columns = np.asarray(meters, dtype=np.intp).reshape(-1)
        types = self.type_index[columns]
        level = expected_consumption(starts, interval_s)[np.arange(len(starts)), types]
        wet = np.where(
            types == TYPE_ORDER.index(MeterType.WATER), idle_probability(starts, interval_s), 0.0
        )
        typical: np.ndarray = level * self.scale[columns] / (1.0 - wet)
        return typical
