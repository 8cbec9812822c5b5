"""Validation and estimation of one day, per meter and expected interval (VEE).

A meter-data-management system validates and estimates before anything is billed; this
is that step for one local day (docs/architecture.md, "Validated consumption"). It is a
pure function of Arrow tables, vectorised in numpy over every meter at once, so the daily
job can run it on any set of meters (all of them, or one Spark partition's):

1. **Duplicates**: one reading per ``(device_id, event_time)``, the first by ingest order
   (ingest time, then Kafka partition and offset); the rest are counted.
2. **Intervals**: a meter's day has ``day_seconds / interval`` intervals; a reading ends
   the interval it measures (its timestamp rounded up to the grid).
3. **Usage** measures its interval. **Registers** are differenced in event-time order from
   the meter's last register before the day: a drop is a rollover when ``register_digits``
   explains it, else a reset (flagged, not counted); a meter exchange
   (``register_reset_at``) starts a new register. A difference over several intervals is
   spread over them, so the day's total stays exact; usage that disagrees with its
   register difference is flagged.
4. **Gaps** of up to ``max_linear`` intervals are interpolated linearly between their
   neighbours; longer ones take the meter's profile (its mean at that local hour on the
   same weekday of the last four weeks) where there is one, else stay missing.

Every interval ends with a quality (:data:`QUALITIES`), the method that gave its value,
and the fault code of a rejected reading or a register flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from meterflow.core.lake import TIMESTAMP
from meterflow.core.timestamps import local_hours

MEASURED, ESTIMATED, EDITED, MISSING, REJECTED = (
    "measured",
    "estimated",
    "edited",
    "missing",
    "rejected",
)
#: Every interval's quality, in this order (the int codes used inside).
QUALITIES: tuple[str, ...] = (MEASURED, ESTIMATED, EDITED, MISSING, REJECTED)
#: How an interval's value was found.
METHODS: tuple[str, ...] = ("usage", "register", "register_spread", "linear", "profile", "edit")
#: Register flags, beside the contract's fault codes of rejected readings.
REGISTER_RESET = "REGISTER_RESET"
REGISTER_MISMATCH = "REGISTER_MISMATCH"

#: The validated table: one row per meter and expected interval (``lake/validated/date=D/``).
VALIDATED_SCHEMA = pa.schema(
    [
        ("device_id", pa.string()),
        ("interval_start", TIMESTAMP),
        ("interval_end", TIMESTAMP),
        ("value", pa.float64()),
        ("quality", pa.string()),
        ("method", pa.string()),
        ("fault_code", pa.string()),
        # Readings dropped as repeats of one already counted in this interval.
        ("duplicates", pa.int64()),
    ]
)

_Q = {name: code for code, name in enumerate(QUALITIES)}
_M = {name: code for code, name in enumerate(METHODS)}
_NO_METHOD = -1


@dataclass(frozen=True)
class Day:
    """The local day being validated: its bounds (epoch microseconds) and zone."""

    start_us: int
    end_us: int
    zone_name: str


def _ints(column: pa.ChunkedArray | pa.Array, fill: int) -> np.ndarray:
    array = column.cast(pa.int64()) if not pa.types.is_integer(column.type) else column
    return np.asarray(pc.fill_null(array, fill).to_numpy(zero_copy_only=False), dtype=np.int64)


def _floats(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(
        pc.fill_null(column.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False),
        dtype=np.float64,
    )


def _ragged(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concat(arange(s, s + n) for s, n in zip(starts, lengths))``, without a loop."""
    total = int(lengths.sum())
    steps = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    cells: np.ndarray = np.repeat(starts, lengths) + steps
    return cells


def _run_starts(values: np.ndarray) -> np.ndarray:
    """Where each run of equal values begins (numpy leaves the winner of a repeated index in
    an assignment unspecified, so one value per cell is picked first)."""
    starts: np.ndarray = np.r_[True, values[1:] != values[:-1]] if len(values) else values > 0
    return starts


class _Grid:
    """Every meter's expected intervals of the day, one cell each, meter after meter, with
    what each cell holds so far (value, quality, method, fault code index; -1: none)."""

    def __init__(self, meters: pa.Table, day: Day) -> None:
        self.meters, self.day = meters, day
        self.interval_us = _ints(meters["interval_seconds"], 0) * 1_000_000
        if len(self.interval_us) and self.interval_us.min() <= 0:
            raise ValueError("every meter needs its interval_seconds")
        self.per_meter = (day.end_us - day.start_us) // self.interval_us
        self.base = np.concatenate([[0], np.cumsum(self.per_meter)]).astype(np.int64)
        cells = int(self.base[-1])
        self.meter_of_cell = np.repeat(np.arange(meters.num_rows), self.per_meter)
        self.k_of_cell = np.arange(cells) - self.base[self.meter_of_cell]
        self.start_us = day.start_us + self.k_of_cell * self.interval_us[self.meter_of_cell]
        self.value = np.full(cells, np.nan)
        self.quality = np.full(cells, _Q[MISSING], dtype=np.int8)
        self.method = np.full(cells, _NO_METHOD, dtype=np.int8)
        self.fault = np.full(cells, -1, dtype=np.int64)

    def meter_of(self, device_ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
        """Each device's meter index (-1: not one of the grid's meters)."""
        return _ints(pc.index_in(device_ids, value_set=self.meters["device_id"]), -1)

    def ending(self, event_us: np.ndarray, meter: np.ndarray) -> np.ndarray:
        """The index in its meter's day of the interval each instant ends (it may fall
        outside the day: see :meth:`inside`)."""
        step = self.interval_us[meter]
        k: np.ndarray = (event_us - self.day.start_us + step - 1) // step - 1
        return k

    def inside(self, k: np.ndarray, meter: np.ndarray) -> np.ndarray:
        inside: np.ndarray = (k >= 0) & (k < self.per_meter[meter])
        return inside

    def set(self, cells: np.ndarray, values: np.ndarray, quality: str, method: str) -> None:
        self.value[cells] = values
        self.quality[cells] = _Q[quality]
        self.method[cells] = _M[method]

    def flag(self, cells: np.ndarray, code: int) -> None:
        """Fault code ``code`` on ``cells`` that have none yet."""
        self.fault[cells] = np.where(self.fault[cells] < 0, code, self.fault[cells])


@dataclass
class _Readings:
    """The day's readings without repeats, in (meter, event time) order, on the grid."""

    cell: np.ndarray
    event_us: np.ndarray
    usage: np.ndarray
    register: np.ndarray
    good: np.ndarray  # on the grid and without a fault
    bad: np.ndarray  # on the grid, with a fault (index into fault_names)
    faults: np.ndarray
    fault_names: list[str] = field(default_factory=list)


def validate_day(
    readings: pa.Table,
    meters: pa.Table,
    starts: pa.Table,
    profile: pa.Table,
    day: Day,
    max_linear: int = 4,
    tolerance: float = 0.01,
    edits: pa.Table | None = None,
) -> pa.Table:
    """The day's intervals (:data:`VALIDATED_SCHEMA`) of every meter in ``meters``,
    validated and estimated.

    ``readings``: the day's lake rows (``device_id, event_time, consumption, register,
    fault_code, ingest_time, source_partition, source_offset``); rows of meters not in
    ``meters`` are ignored. ``meters``: ``device_id, interval_seconds`` (set for every
    meter), ``register_digits, register_reset_at``. ``starts``: per meter, its last good
    register before the day (``device_id, event_time, register``). ``profile``: per meter
    and local hour of day, a typical interval value (``device_id, hour, value``).
    ``tolerance``: how far usage and its register difference may differ, relative (with
    the same figure as an absolute floor, in the meter's unit). ``edits``: a person's
    values (``device_id, interval_start, value``; :mod:`meterflow.batch.edits`), which
    replace whatever the interval had, with quality ``edited``.
    """
    grid = _Grid(meters, day)
    duplicates = np.zeros(len(grid.value), dtype=np.int64)
    sent = _deduplicated(readings, grid, duplicates)
    # The first rejected reading of an interval names its fault.
    bad_cells = sent.cell[sent.bad]
    first = _run_starts(bad_cells)
    grid.fault[bad_cells[first]] = sent.faults[sent.bad][first]

    with_usage = sent.good & ~np.isnan(sent.usage)
    has_usage = np.zeros(len(grid.value), dtype=bool)
    has_usage[sent.cell[with_usage]] = True
    usage_sum = np.zeros(len(grid.value))
    np.add.at(usage_sum, sent.cell[with_usage], sent.usage[with_usage])
    grid.set(has_usage, usage_sum[has_usage], MEASURED, "usage")

    reset_flag, mismatch_flag = len(sent.fault_names) - 2, len(sent.fault_names) - 1
    _difference_registers(
        grid, sent, starts, tolerance, has_usage, usage_sum, reset_flag, mismatch_flag
    )
    _estimate_gaps(grid, max_linear)
    _apply_profile(grid, profile)
    if edits is not None and edits.num_rows:
        _apply_edits(grid, edits)
    rejected = (grid.quality == _Q[MISSING]) & (grid.fault >= 0)
    grid.quality[rejected] = _Q[REJECTED]

    fault = grid.fault
    return pa.table(
        {
            "device_id": meters["device_id"].take(pa.array(grid.meter_of_cell)),
            "interval_start": pa.array(grid.start_us, TIMESTAMP),
            "interval_end": pa.array(
                grid.start_us + grid.interval_us[grid.meter_of_cell], TIMESTAMP
            ),
            "value": pa.array(grid.value, pa.float64(), from_pandas=True),
            "quality": pa.array(np.array(QUALITIES, dtype=object)[grid.quality], pa.string()),
            "method": pa.array(np.array([*METHODS, None], dtype=object)[grid.method], pa.string()),
            "fault_code": pa.array(sent.fault_names, pa.string()).take(
                pa.array(fault, pa.int64(), mask=fault < 0)
            ),
            "duplicates": pa.array(duplicates, pa.int64()),
        },
        schema=VALIDATED_SCHEMA,
    )


def _deduplicated(readings: pa.Table, grid: _Grid, duplicates: np.ndarray) -> _Readings:
    """One reading per meter and event time, the first by ingest order (ingest time, then
    Kafka partition and offset); each repeat is counted on its interval in ``duplicates``."""
    meter = grid.meter_of(readings["device_id"])
    rows = readings.filter(pa.array(meter >= 0))
    meter = meter[meter >= 0]
    event_us = _ints(rows["event_time"], 0)
    order = np.lexsort(
        (
            _ints(rows["source_offset"], 0),
            _ints(rows["source_partition"], 0),
            _ints(rows["ingest_time"], np.iinfo(np.int64).max),
            event_us,
            meter,
        )
    )
    meter, event_us = meter[order], event_us[order]
    k = grid.ending(event_us, meter)
    inside = grid.inside(k, meter)
    cell = grid.base[meter] + k
    repeated = np.zeros(len(meter), dtype=bool)  # a task may hold meters but no reading
    repeated[1:] = (meter[1:] == meter[:-1]) & (event_us[1:] == event_us[:-1])
    np.add.at(duplicates, cell[repeated & inside], 1)
    kept = ~repeated
    keep = order[kept]
    # Fault codes as small ints (-1: none); the register flags follow the lake's codes.
    encoded = pc.dictionary_encode(rows["fault_code"].take(pa.array(keep))).combine_chunks()
    faults = _ints(encoded.indices, -1)
    inside = inside[kept]
    return _Readings(
        cell=cell[kept],
        event_us=event_us[kept],
        usage=_floats(rows["consumption"])[keep],
        register=_floats(rows["register"])[keep],
        good=inside & (faults < 0),
        bad=inside & (faults >= 0),
        faults=faults,
        fault_names=[*encoded.dictionary.to_pylist(), REGISTER_RESET, REGISTER_MISMATCH],
    )


def _difference_registers(
    grid: _Grid,
    sent: _Readings,
    starts: pa.Table,
    tolerance: float,
    has_usage: np.ndarray,
    usage_sum: np.ndarray,
    reset_flag: int,
    mismatch_flag: int,
) -> None:
    """The latest register of each interval, differenced along its meter from the meter's
    start register, into interval values (in place)."""
    with_register = sent.good & ~np.isnan(sent.register)
    point_register = np.full(len(grid.value), np.nan)
    point_time = np.zeros(len(grid.value), dtype=np.int64)
    cells = sent.cell[with_register]
    latest = _run_starts(cells[::-1])[::-1]  # the last reading of each interval
    point_register[cells[latest]] = sent.register[with_register][latest]
    point_time[cells[latest]] = sent.event_us[with_register][latest]
    points = np.flatnonzero(~np.isnan(point_register))
    if not len(points):
        return
    meters = grid.meters
    meter = grid.meter_of_cell[points]
    k = grid.k_of_cell[points]
    current = point_register[points]
    time_now = point_time[points]
    # The previous point: the one before on the same meter, else the meter's start register.
    first = np.r_[True, meter[1:] != meter[:-1]]
    previous = np.r_[np.nan, current[:-1]]
    previous_k = np.r_[0, k[:-1]].astype(np.int64)
    previous_time = np.r_[0, time_now[:-1]].astype(np.int64)
    start_of_meter = _ints(pc.index_in(meters["device_id"], value_set=starts["device_id"]), -1)
    has_start = start_of_meter >= 0
    start_register = np.full(len(meters), np.nan)
    start_time = np.zeros(len(meters), dtype=np.int64)
    if has_start.any():
        start_register[has_start] = _floats(starts["register"])[start_of_meter[has_start]]
        start_time[has_start] = _ints(starts["event_time"], 0)[start_of_meter[has_start]]
    previous = np.where(first, start_register[meter], previous)
    previous_k = np.where(first, grid.ending(start_time[meter], meter), previous_k)
    previous_time = np.where(first, start_time[meter], previous_time)

    # A meter exchange between the two points starts a new register: no difference.
    reset_at = _ints(meters["register_reset_at"].cast(pa.int64()), np.iinfo(np.int64).min)
    exchanged = (reset_at[meter] > previous_time) & (reset_at[meter] <= time_now)
    digits = _floats(meters["register_digits"])[meter]
    difference = current - previous
    wrap = np.where(np.isnan(digits), np.nan, 10.0 ** np.nan_to_num(digits))
    rolled = difference + wrap
    rollover = (difference < 0) & (rolled <= wrap / 2)
    difference = np.where(rollover, rolled, difference)
    usable = ~np.isnan(difference) & ~exchanged & (difference >= 0)
    grid.flag(points[~np.isnan(previous) & ~exchanged & ~usable], reset_flag)

    span = k - previous_k  # intervals the difference covers, >= 1
    single = usable & (span == 1)
    one = points[single]
    measured_usage = has_usage[one]
    # Usage wins; a register difference that disagrees with it flags the interval.
    disagree = np.abs(usage_sum[one] - difference[single]) > tolerance * np.maximum(
        1.0, np.maximum(np.abs(usage_sum[one]), np.abs(difference[single]))
    )
    grid.flag(one[measured_usage & disagree], mismatch_flag)
    grid.set(one[~measured_usage], difference[single][~measured_usage], MEASURED, "register")

    # Over several intervals: the day's part of the difference, spread over its intervals
    # that have no usage of their own.
    spread = usable & (span > 1)
    if not spread.any():
        return
    first_k = np.maximum(previous_k[spread] + 1, 0)
    lengths = (k[spread] - first_k + 1).astype(np.int64)
    share = difference[spread] * lengths / span[spread]
    span_cells = _ragged(grid.base[meter[spread]] + first_k, lengths)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    used = np.bincount(owner, weights=np.where(has_usage[span_cells], usage_sum[span_cells], 0))
    empty = ~has_usage[span_cells]
    open_count = np.bincount(owner, weights=empty.astype(np.float64), minlength=len(lengths))
    rest = np.maximum(share - used, 0.0) / np.maximum(open_count, 1.0)
    grid.set(span_cells[empty], rest[owner[empty]], ESTIMATED, "register_spread")


def _estimate_gaps(grid: _Grid, max_linear: int) -> None:
    """Linear interpolation across gaps of at most ``max_linear`` intervals (in place)."""
    value = grid.value
    cells = len(value)
    if cells == 0:
        return
    index = np.arange(cells)
    filled = ~np.isnan(value)
    first = grid.base[grid.meter_of_cell]
    end = grid.base[grid.meter_of_cell + 1]
    left = np.maximum.accumulate(np.where(filled, index, first - 1))
    left = np.maximum(left, first - 1)  # never a cell of the meter before
    right = np.minimum.accumulate(np.where(filled, index, end)[::-1])[::-1]
    right = np.minimum(right, end)
    has_left, has_right = left >= first, right < end
    gap = ~filled & (right - left - 1 <= max_linear) & (has_left | has_right)
    left_value = np.where(has_left, value[np.clip(left, 0, cells - 1)], np.nan)
    right_value = np.where(has_right, value[np.clip(right, 0, cells - 1)], np.nan)
    weight = (index - left) / np.maximum(right - left, 1)
    estimate = np.where(
        has_left & has_right,
        left_value + (right_value - left_value) * weight,
        np.where(has_left, left_value, right_value),
    )
    grid.set(gap, estimate[gap], ESTIMATED, "linear")


def _apply_profile(grid: _Grid, profile: pa.Table) -> None:
    """The meter's profile at the interval's local hour, for gaps still open (in place)."""
    open_cells = np.flatnonzero(np.isnan(grid.value))
    if not len(open_cells) or profile.num_rows == 0:
        return
    profile_meter = grid.meter_of(profile["device_id"])
    known = profile_meter >= 0
    table = np.full((grid.meters.num_rows, 24), np.nan)
    table[profile_meter[known], _ints(profile["hour"], 0)[known]] = _floats(profile["value"])[known]
    hours = local_hours(grid.start_us[open_cells], grid.day.zone_name)
    typical = table[grid.meter_of_cell[open_cells], hours]
    found = ~np.isnan(typical)
    grid.set(open_cells[found], typical[found], ESTIMATED, "profile")


def _apply_edits(grid: _Grid, edits: pa.Table) -> None:
    """Each override on the interval it starts (in place); one off the grid is ignored."""
    meter = grid.meter_of(edits["device_id"])
    known = meter >= 0
    meter = meter[known]
    offset = _ints(edits["interval_start"], 0)[known] - grid.day.start_us
    step = grid.interval_us[meter]
    k = offset // step
    on_grid = (offset % step == 0) & grid.inside(k, meter)
    cells = (grid.base[meter] + k)[on_grid]
    grid.set(cells, _floats(edits["value"])[known][on_grid], EDITED, "edit")
