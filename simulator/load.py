"""Load shapes: what an average household draws at a given hour, day and season.

Profiles are hourly multipliers of a type's mean rate (per hour); the model interpolates
between hours, applies the weekday/weekend shape, the season (gas heating), the
household's scale and multiplicative noise. Everything is vectorised over the fleet.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np

from meterflow.contract import METER_SPECS, TYPE_ORDER, MeterType, Rules

#: Mean consumption per hour of an average household, in each type's unit.
MEAN_PER_HOUR = {MeterType.ELECTRICITY: 0.45, MeterType.WATER: 15.0, MeterType.GAS: 0.12}

_WEEKDAY = {
    # 00 .. 23 h
    MeterType.ELECTRICITY: [
        0.45,
        0.4,
        0.38,
        0.37,
        0.38,
        0.45,
        0.8,
        1.3,
        1.35,
        1.0,
        0.85,
        0.85,
        0.9,
        0.85,
        0.8,
        0.85,
        1.0,
        1.4,
        1.9,
        2.0,
        1.85,
        1.6,
        1.1,
        0.7,
    ],
    MeterType.WATER: [
        0.05,
        0.03,
        0.02,
        0.02,
        0.03,
        0.15,
        1.6,
        3.0,
        2.4,
        1.2,
        0.8,
        0.8,
        1.0,
        0.8,
        0.7,
        0.8,
        1.0,
        1.3,
        1.8,
        2.0,
        1.6,
        1.2,
        0.6,
        0.2,
    ],
    MeterType.GAS: [
        0.3,
        0.25,
        0.25,
        0.25,
        0.35,
        0.9,
        2.0,
        2.2,
        1.6,
        0.9,
        0.7,
        0.7,
        0.8,
        0.7,
        0.7,
        0.8,
        1.1,
        1.7,
        1.9,
        1.8,
        1.6,
        1.3,
        0.8,
        0.45,
    ],
}
_WEEKEND = {
    MeterType.ELECTRICITY: [
        0.5,
        0.45,
        0.4,
        0.38,
        0.38,
        0.4,
        0.5,
        0.7,
        1.1,
        1.4,
        1.4,
        1.3,
        1.35,
        1.2,
        1.1,
        1.1,
        1.2,
        1.5,
        1.85,
        1.9,
        1.8,
        1.6,
        1.2,
        0.8,
    ],
    MeterType.WATER: [
        0.08,
        0.04,
        0.03,
        0.02,
        0.02,
        0.04,
        0.3,
        0.9,
        2.2,
        2.6,
        1.8,
        1.3,
        1.2,
        1.0,
        0.9,
        1.0,
        1.1,
        1.3,
        1.7,
        1.8,
        1.5,
        1.2,
        0.7,
        0.3,
    ],
    MeterType.GAS: [
        0.35,
        0.3,
        0.25,
        0.25,
        0.3,
        0.4,
        0.9,
        1.5,
        1.9,
        1.7,
        1.3,
        1.0,
        1.0,
        0.9,
        0.9,
        1.0,
        1.2,
        1.7,
        1.9,
        1.8,
        1.6,
        1.3,
        0.9,
        0.5,
    ],
}
_PROFILES = np.array(
    [[_WEEKDAY[t] for t in TYPE_ORDER], [_WEEKEND[t] for t in TYPE_ORDER]]
)  # [weekend?, type, hour]
_MEAN = np.array([MEAN_PER_HOUR[t] for t in TYPE_ORDER])
#: Values stay below this share of the contract's bound, so normal readings are never faults.
_HEADROOM = 0.5
NOISE_SIGMA = 0.25


def profile_factor(type_index: np.ndarray, at: datetime) -> np.ndarray:
    """Hourly profile multiplier for each meter's type at ``at`` (UTC), interpolated."""
    hour = at.hour + at.minute / 60 + at.second / 3600
    low, frac = int(hour) % 24, hour - int(hour)
    shape = _PROFILES[1 if at.weekday() >= 5 else 0]
    return shape[type_index, low] * (1 - frac) + shape[type_index, (low + 1) % 24] * frac


def season_factor(type_index: np.ndarray, at: datetime) -> np.ndarray:
    """Gas heats in winter (x1.8 in mid-January, x0.4 in mid-July); the rest barely moves."""
    angle = 2 * math.pi * (at.timetuple().tm_yday - 15) / 365.25
    gas = 1.1 + 0.7 * math.cos(angle)
    other = 1.0 + 0.08 * math.cos(angle)
    return np.where(type_index == TYPE_ORDER.index(MeterType.GAS), gas, other)


def consumption(
    type_index: np.ndarray,
    scale: np.ndarray,
    at: datetime,
    interval_s: float,
    rng: np.random.Generator,
    rules: Rules | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Consumption in the interval ending at ``at`` and water flow rate (L/min), per meter."""
    rules = rules or Rules()
    middle = datetime.fromtimestamp(at.timestamp() - interval_s / 2, UTC)
    mean = (
        _MEAN[type_index] * profile_factor(type_index, middle) * season_factor(type_index, middle)
    )
    noise = rng.lognormal(-(NOISE_SIGMA**2) / 2, NOISE_SIGMA, len(type_index))
    values = mean * scale * noise * (interval_s / 3600)
    bounds = np.array([rules.bounds[METER_SPECS[t].metric] for t in TYPE_ORDER])[type_index]
    values = np.round(np.clip(values, 0.001, bounds * _HEADROOM), 3)
    # Water runs in bursts: the flow while running exceeds the interval's average.
    minutes = max(interval_s / 60, 1 / 60)
    burst = rng.uniform(1.5, 4.0, len(type_index))
    flow = np.round(
        np.clip(values / minutes * burst, 0.001, rules.bounds["flow_rate"] * _HEADROOM), 3
    )
    return values, flow
