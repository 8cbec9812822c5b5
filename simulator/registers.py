"""What real head-ends deliver besides interval usage: cumulative registers, gaps and
repeated readings, and the true consumption per meter and day to check the VEE against.

**Registers.** A share of the fleet reports a cumulative register only (as most electricity
and gas meters do), a share reports usage and register. A register is a function of time
alone, ``offset + scale x mean rate x shape integral + noise``, taken modulo
``10 ** register_digits``: a simulator restarted next week continues every register where
it was, with no reset, and the consumption of any interval is the difference of two
registers. It follows the type's daily and weekly shape, not the season, and its noise
(``u(t) - u(t - interval)`` of a hash of the meter and the instant) never makes an interval
negative. Water meters with both report no usage of their own (their usage would never be
0, which a household without a leak has at night), so "both" means electricity and gas.
A share of the register meters is set to roll over during the run's second UTC day.

**Defects.** Gaps are runs of 1 to :data:`GAP_MAX` readings that never arrive (a radio that
missed them), started at a rate per meter-day; a repeated reading is sent again, byte for
byte, after its step (a head-end that re-sends). Neither touches a faulty reading or an
episode's.

**Truth.** :class:`ConsumptionTruth` adds up, per meter and local day (the interval's start
decides, as for the VEE), what each meter really consumed: the load model's draw, or the
register's difference, before faults, gaps and episodes change what is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from meterflow.core.contract import TYPE_ORDER, MeterType
from meterflow.core.lake import filesystem_for, write_atomically
from meterflow.core.timestamps import SECONDS_PER_DAY, local_days
from simulator.load import DECIMALS, MEAN_PER_HOUR, mean_hours_since_epoch, weekly_integral

USAGE, REGISTER, BOTH = "usage", "register", "both"
#: Register digits per type: the register rolls over at ``10 ** digits`` of the unit.
DIGITS: dict[MeterType, int] = {
    MeterType.ELECTRICITY: 6,  # kWh
    MeterType.WATER: 8,  # L
    MeterType.GAS: 5,  # m3
}
#: Registers count from here (the fleet's first installations).
REGISTER_EPOCH_S = datetime(2015, 1, 1, tzinfo=UTC).timestamp()
#: The noise's amplitude, as a share of the smallest interval's expected consumption.
NOISE_SHARE = 0.4
GAP_MAX = 10
TRUTH_FILE = "consumption_truth.parquet"
TRUTH_SCHEMA = pa.schema(
    [
        ("device_id", pa.string()),
        ("date", pa.date32()),
        ("consumption", pa.float64()),
        ("intervals", pa.int32()),
    ]
)
_EPOCH_DAY = date(1970, 1, 1)


@dataclass(frozen=True)
class ReadingShares:
    """How the fleet reports: shares of register-only meters and of meters with both
    (electricity and gas), and the share of register meters near rollover."""

    register_only: float = 0.0
    both: float = 0.0
    near_rollover: float = 0.0

    def __post_init__(self) -> None:
        shares = (self.register_only, self.both, self.near_rollover)
        if min(shares) < 0 or self.register_only + self.both > 1 or self.near_rollover > 1:
            raise ValueError("register shares must be 0-1, and register-only plus both at most 1")

    @property
    def active(self) -> bool:
        return self.register_only + self.both > 0


NO_REGISTERS = ReadingShares()
#: What ``meterflow simulate`` and ``meterflow run`` send unless told.
DEFAULT_SHARES = ReadingShares(register_only=0.2, both=0.2, near_rollover=0.05)
DEFAULT_GAPS_PER_METER_DAY = 0.05
DEFAULT_REPEAT_SHARE = 0.001


def assign_reports(
    types: Sequence[MeterType], shares: ReadingShares, seed: int | None
) -> tuple[list[str], list[bool]]:
    """Per meter, what it reports (:data:`USAGE`, :data:`REGISTER` or :data:`BOTH`) and
    whether its register is near rollover; drawn from its own generator, so the rest of
    a seeded fleet stays what it was."""
    rng = np.random.default_rng(None if seed is None else [seed, 1])
    draw = rng.random(len(types))
    near = rng.random(len(types)) < shares.near_rollover
    reports: list[str] = []
    for value, meter_type in zip(draw.tolist(), types, strict=True):
        if value < shares.register_only:
            reports.append(REGISTER)
        elif value < shares.register_only + shares.both and meter_type is not MeterType.WATER:
            reports.append(BOTH)
        else:
            reports.append(USAGE)
    return reports, [bool(n) and r != USAGE for n, r in zip(near.tolist(), reports, strict=True)]


def _smallest_interval_hours(type_position: int, interval_s: float) -> float:
    """The least mean-rate hours any interval of this length holds in the week."""
    table = weekly_integral(TYPE_ORDER[type_position])
    minutes = np.arange(len(table) - 1, dtype=np.float64)
    span = interval_s / 60.0
    after = np.interp(np.mod(minutes + span, len(table) - 1), np.arange(len(table)), table)
    whole_weeks, _ = divmod(minutes + span, len(table) - 1)
    step = after + whole_weeks * table[-1] - table[:-1]
    return float(step.min())


def _uniform(keys: np.ndarray, stamps_s: np.ndarray) -> np.ndarray:
    """A uniform in [0, 1) per (meter key, whole-second instant): splitmix64 of both."""
    with np.errstate(over="ignore"):
        x = keys[None, :] ^ (
            stamps_s.astype(np.int64).astype(np.uint64)[:, None] * np.uint64(0x9E3779B97F4A7C15)
        )
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    uniform: np.ndarray = (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return uniform


class Registers:
    """The registers of a fleet's register meters, as functions of time: ``columns`` are
    their positions in the fleet, ``only`` those of meters that send no usage."""

    def __init__(
        self,
        reports: np.ndarray,
        type_index: np.ndarray,
        scale: np.ndarray,
        near_rollover: np.ndarray,
        interval_s: float,
        first_stamp_s: float,
        seed: int | None,
    ) -> None:
        columns = np.flatnonzero(reports != USAGE)
        self.columns, self.only = columns, np.flatnonzero(reports == REGISTER)
        self.interval_s = interval_s
        self.types = np.asarray(type_index, dtype=np.intp)[columns]
        self.wrap = np.array([10.0 ** DIGITS[TYPE_ORDER[t]] for t in self.types])
        mean = np.array([MEAN_PER_HOUR[t] for t in TYPE_ORDER])
        self.rate = np.asarray(scale, dtype=np.float64)[columns] * mean[self.types]
        smallest = np.array(
            [_smallest_interval_hours(k, interval_s) for k in range(len(TYPE_ORDER))]
        )
        self.noise = NOISE_SHARE * self.rate * smallest[self.types]
        rng = np.random.default_rng(None if seed is None else [seed, 2])
        self.keys = rng.integers(1, np.iinfo(np.int64).max, len(columns)).astype(np.uint64)
        self.offset = rng.uniform(0.0, 0.5, len(columns)) * self.wrap
        near = np.asarray(near_rollover, dtype=bool)[columns]
        if near.any():
            # Rolls over at a random moment of the UTC day after the run's first, so that
            # the day before gives the register a start.
            midnight = first_stamp_s - first_stamp_s % SECONDS_PER_DAY + SECONDS_PER_DAY
            moment = midnight + rng.uniform(0, SECONDS_PER_DAY, len(columns))
            counted = self._counted(moment[None, :])[0]
            self.offset = np.where(near, np.mod(-counted, self.wrap), self.offset)

    def _counted(self, stamps_s: np.ndarray) -> np.ndarray:
        """``[steps, meters]`` units counted since the register epoch, noise aside."""
        hours = np.stack(
            [
                mean_hours_since_epoch(k, stamps_s)
                - mean_hours_since_epoch(k, np.array(REGISTER_EPOCH_S))
                for k in range(len(TYPE_ORDER))
            ]
        )  # [type, steps, meters] or [type, steps, 1]
        picked = np.take_along_axis(
            hours, np.broadcast_to(self.types, hours.shape[1:])[None], axis=0
        )[0]
        counted: np.ndarray = picked * self.rate
        return counted

    def at(self, stamps_s: np.ndarray) -> np.ndarray:
        """``[steps, meters]`` registers at ``stamps_s`` (a reading's stamp), as sent."""
        stamps = np.asarray(stamps_s, dtype=np.float64).reshape(-1)
        counted = self._counted(np.broadcast_to(stamps[:, None], (len(stamps), len(self.types))))
        raw = self.offset + counted + self.noise * _uniform(self.keys, stamps)
        value = np.round(np.mod(raw, self.wrap), DECIMALS)
        registers: np.ndarray = np.where(value >= self.wrap, 0.0, value)
        return registers

    def usage(self, stamps_s: np.ndarray, now: np.ndarray | None = None) -> np.ndarray:
        """``[steps, meters]`` consumption of the intervals ending at ``stamps_s``: the
        difference of the sent registers, across a rollover."""
        stamps = np.asarray(stamps_s, dtype=np.float64).reshape(-1)
        now = self.at(stamps) if now is None else now
        difference = np.round(now - self.at(stamps - self.interval_s), DECIMALS)
        usage: np.ndarray = np.round(
            np.where(difference < 0, difference + self.wrap, difference), DECIMALS
        )
        return usage


class Defects:
    """Gaps and repeated readings, drawn per step for every meter."""

    def __init__(
        self,
        gaps_per_meter_day: float,
        repeat_share: float,
        interval_s: float,
        meters: int,
        rng: np.random.Generator,
        max_gap: int = GAP_MAX,
    ) -> None:
        self.gap_chance = min(1.0, gaps_per_meter_day * interval_s / SECONDS_PER_DAY)
        self.repeat_share = repeat_share
        self.max_gap = max(1, max_gap)
        self.rng = rng
        self.left = np.zeros(meters, dtype=np.int64)

    def step(self, busy: set[int]) -> tuple[frozenset[int], list[int]]:
        """One step's withheld positions and repeated ones; ``busy`` positions (a fault's,
        an episode's) are sent as they are."""
        meters = len(self.left)
        starting = (self.rng.random(meters) < self.gap_chance) & (self.left == 0)
        lengths = self.rng.integers(1, self.max_gap + 1, meters)
        self.left = np.where(starting, lengths, self.left)
        withheld = set(np.flatnonzero(self.left > 0).tolist()) - busy
        self.left = np.maximum(self.left - 1, 0)
        repeated = [
            i
            for i in np.flatnonzero(self.rng.random(meters) < self.repeat_share).tolist()
            if i not in busy and i not in withheld
        ]
        return frozenset(withheld), repeated


class ConsumptionTruth:
    """What each meter really consumed, per local day of its intervals' starts."""

    def __init__(self, device_ids: Sequence[str], zone_name: str) -> None:
        self.device_ids = list(device_ids)
        self.zone_name = zone_name
        self.days: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def add(self, start_s: float, usage: np.ndarray) -> None:
        """One interval, starting at ``start_s``, of every meter."""
        (day,) = local_days(np.array([int(start_s * 1_000_000)], dtype=np.int64), self.zone_name)
        if int(day) not in self.days:
            meters = len(self.device_ids)
            self.days[int(day)] = (np.zeros(meters), np.zeros(meters, dtype=np.int32))
        total, count = self.days[int(day)]
        total += usage
        count += 1

    def table(self) -> pa.Table:
        """One row per meter and day, days in order."""
        ids = pa.array(self.device_ids, pa.string())
        parts = [
            pa.table(
                {
                    "device_id": ids,
                    "date": pa.array([_EPOCH_DAY + timedelta(days=day)] * len(ids), pa.date32()),
                    "consumption": pa.array(np.round(total, DECIMALS)),
                    "intervals": pa.array(count),
                },
                schema=TRUTH_SCHEMA,
            )
            for day, (total, count) in sorted(self.days.items())
        ]
        return pa.concat_tables(parts) if parts else TRUTH_SCHEMA.empty_table()


def default_truth_path(registry_dir: str) -> str:
    """Where the daily consumption truth goes unless told: beside the registry."""
    return f"{registry_dir.rstrip('/')}/{TRUTH_FILE}"


def write_truth(truth: ConsumptionTruth, path: str) -> str:
    """The truth as Parquet at ``path``, whole or not at all; returns the path."""
    filesystem, target = filesystem_for(path)
    buffer = pa.BufferOutputStream()
    pq.write_table(truth.table(), buffer)
    write_atomically(filesystem, target, buffer.getvalue().to_pybytes())
    return target
