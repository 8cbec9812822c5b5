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

from dataclasses import dataclass

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
    count = meters.num_rows
    interval_us = _ints(meters["interval_seconds"], 0) * 1_000_000
    if count and interval_us.min() <= 0:
        raise ValueError("every meter needs its interval_seconds")
    per_meter = (day.end_us - day.start_us) // np.maximum(interval_us, 1)
    base = np.concatenate([[0], np.cumsum(per_meter)]).astype(np.int64)
    cells = int(base[-1])
    meter_of_cell = np.repeat(np.arange(count), per_meter)
    k_of_cell = np.arange(cells) - base[meter_of_cell]

    # -- 1. duplicates, first by ingest order -------------------------------------------
    index = pc.index_in(readings["device_id"], value_set=meters["device_id"])
    known = pc.is_valid(index)
    rows = readings.filter(known)
    meter = _ints(index.filter(known), 0)
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
    repeated = np.r_[False, (meter[1:] == meter[:-1]) & (event_us[1:] == event_us[:-1])]
    repeated_meter, repeated_us = meter[repeated], event_us[repeated]
    keep = order[~repeated]
    meter, event_us = meter[~repeated], event_us[~repeated]
    usage = _floats(rows["consumption"])[keep]
    register = _floats(rows["register"])[keep]
    # Fault codes as small ints (-1: none); the register flags follow the lake's codes.
    encoded = pc.dictionary_encode(rows["fault_code"].take(pa.array(keep))).combine_chunks()
    fault_names = [*encoded.dictionary.to_pylist(), REGISTER_RESET, REGISTER_MISMATCH]
    faults = _ints(encoded.indices, -1)

    # -- 2. each reading's interval ------------------------------------------------------
    step = interval_us[meter]
    k = (event_us - day.start_us + step - 1) // np.maximum(step, 1) - 1
    inside = (k >= 0) & (k < per_meter[meter])
    cell = base[meter] + k
    duplicates = np.zeros(cells, dtype=np.int64)
    repeated_step = interval_us[repeated_meter]
    repeated_k = (repeated_us - day.start_us + repeated_step - 1) // np.maximum(
        repeated_step, 1
    ) - 1
    counted = (repeated_k >= 0) & (repeated_k < per_meter[repeated_meter])
    np.add.at(duplicates, (base[repeated_meter] + repeated_k)[counted], 1)
    good = inside & (faults < 0)
    bad = inside & ~good

    value = np.full(cells, np.nan)
    quality = np.full(cells, _Q[MISSING], dtype=np.int8)
    method = np.full(cells, _NO_METHOD, dtype=np.int8)
    fault = np.full(cells, -1, dtype=np.int64)
    # The first rejected reading of an interval names its fault (assignment keeps the last).
    bad_cells = cell[bad]
    fault[bad_cells[::-1]] = faults[bad][::-1]

    with_usage = good & ~np.isnan(usage)
    has_usage = np.zeros(cells, dtype=bool)
    has_usage[cell[with_usage]] = True
    usage_sum = np.zeros(cells)
    np.add.at(usage_sum, cell[with_usage], usage[with_usage])
    value[has_usage] = usage_sum[has_usage]
    quality[has_usage] = _Q[MEASURED]
    method[has_usage] = _M["usage"]

    # -- 3. registers: the latest of each interval, differenced along the meter -----------
    with_register = good & ~np.isnan(register)
    point_register = np.full(cells, np.nan)
    point_time = np.zeros(cells, dtype=np.int64)
    point_register[cell[with_register]] = register[with_register]  # sorted: the latest wins
    point_time[cell[with_register]] = event_us[with_register]
    points = np.flatnonzero(~np.isnan(point_register))
    if len(points):
        _difference_registers(
            points,
            point_register,
            point_time,
            meter_of_cell,
            k_of_cell,
            base,
            starts,
            meters,
            interval_us,
            day,
            tolerance,
            (value, quality, method, fault, has_usage, usage_sum),
            (len(fault_names) - 2, len(fault_names) - 1),
        )

    # -- 4. gaps -------------------------------------------------------------------------
    _estimate_gaps(value, quality, method, meter_of_cell, base, max_linear)
    hours = local_hours(day.start_us + k_of_cell * interval_us[meter_of_cell], day.zone_name)
    _apply_profile(value, quality, method, meters, meter_of_cell, hours, profile)
    if edits is not None and edits.num_rows:
        _apply_edits(value, quality, method, meters, base, per_meter, interval_us, day, edits)
    rejected = (quality == _Q[MISSING]) & (fault >= 0)
    quality[rejected] = _Q[REJECTED]

    interval_start = day.start_us + k_of_cell * interval_us[meter_of_cell]
    intervals = pa.table(
        {
            "device_id": meters["device_id"].take(pa.array(meter_of_cell)),
            "interval_start": pa.array(interval_start, TIMESTAMP),
            "interval_end": pa.array(interval_start + interval_us[meter_of_cell], TIMESTAMP),
            "value": pa.array(value, pa.float64(), from_pandas=True),
            "quality": pa.array(np.array(QUALITIES, dtype=object)[quality], pa.string()),
            "method": pa.array(np.array([*METHODS, None], dtype=object)[method], pa.string()),
            "fault_code": pa.array(fault_names, pa.string()).take(
                pa.array(fault, pa.int64(), mask=fault < 0)
            ),
            "duplicates": pa.array(duplicates, pa.int64()),
        },
        schema=VALIDATED_SCHEMA,
    )
    return intervals


def _difference_registers(
    points: np.ndarray,
    point_register: np.ndarray,
    point_time: np.ndarray,
    meter_of_cell: np.ndarray,
    k_of_cell: np.ndarray,
    base: np.ndarray,
    starts: pa.Table,
    meters: pa.Table,
    interval_us: np.ndarray,
    day: Day,
    tolerance: float,
    grid: tuple[np.ndarray, ...],
    flags: tuple[int, int],
) -> None:
    """Turn register points into interval values on the grid (in place); ``flags`` are
    the fault codes of a reset and of a mismatch."""
    value, quality, method, fault, has_usage, usage_sum = grid
    reset_flag, mismatch_flag = flags
    meter = meter_of_cell[points]
    k = k_of_cell[points]
    current = point_register[points]
    time_now = point_time[points]
    # The previous point: the one before on the same meter, else the meter's start register.
    first = np.r_[True, meter[1:] != meter[:-1]]
    previous = np.r_[np.nan, current[:-1]]
    previous_k = np.r_[0, k[:-1]].astype(np.int64)
    previous_time = np.r_[0, time_now[:-1]].astype(np.int64)
    start_index = pc.index_in(meters["device_id"], value_set=starts["device_id"])
    start_of_meter = _ints(start_index, -1)
    has_start = start_of_meter >= 0
    start_register = np.full(len(meters), np.nan)
    start_time = np.zeros(len(meters), dtype=np.int64)
    if has_start.any():
        start_register[has_start] = _floats(starts["register"])[start_of_meter[has_start]]
        start_time[has_start] = _ints(starts["event_time"], 0)[start_of_meter[has_start]]
    step = interval_us[meter]
    start_k = (start_time[meter] - day.start_us + step - 1) // step - 1
    previous = np.where(first, start_register[meter], previous)
    previous_k = np.where(first, start_k, previous_k)
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
    reset = ~np.isnan(previous) & ~exchanged & ~usable
    reset_cells = points[reset]
    fault[reset_cells] = np.where(fault[reset_cells] < 0, reset_flag, fault[reset_cells])

    span = k - previous_k  # intervals the difference covers, >= 1
    single = usable & (span == 1)
    one = points[single]
    measured_usage = has_usage[one]
    # Usage wins; a register difference that disagrees with it flags the interval.
    disagree = np.abs(usage_sum[one] - difference[single]) > tolerance * np.maximum(
        1.0, np.maximum(np.abs(usage_sum[one]), np.abs(difference[single]))
    )
    flagged = one[measured_usage & disagree]
    fault[flagged] = np.where(fault[flagged] < 0, mismatch_flag, fault[flagged])
    register_only = one[~measured_usage]
    value[register_only] = difference[single][~measured_usage]
    quality[register_only] = _Q[MEASURED]
    method[register_only] = _M["register"]

    # Over several intervals: the day's part of the difference, spread over its intervals
    # that have no usage of their own.
    spread = usable & (span > 1)
    if not spread.any():
        return
    first_k = np.maximum(previous_k[spread] + 1, 0)
    lengths = (k[spread] - first_k + 1).astype(np.int64)
    share = difference[spread] * lengths / span[spread]
    span_cells = _ragged(base[meter[spread]] + first_k, lengths)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    used = np.bincount(owner, weights=np.where(has_usage[span_cells], usage_sum[span_cells], 0))
    empty = ~has_usage[span_cells]
    open_count = np.bincount(owner, weights=empty.astype(np.float64), minlength=len(lengths))
    rest = np.maximum(share - used, 0.0) / np.maximum(open_count, 1.0)
    targets = span_cells[empty]
    value[targets] = rest[owner[empty]]
    quality[targets] = _Q[ESTIMATED]
    method[targets] = _M["register_spread"]


def _estimate_gaps(
    value: np.ndarray,
    quality: np.ndarray,
    method: np.ndarray,
    meter_of_cell: np.ndarray,
    base: np.ndarray,
    max_linear: int,
) -> None:
    """Linear interpolation across gaps of at most ``max_linear`` intervals (in place)."""
    cells = len(value)
    if cells == 0:
        return
    index = np.arange(cells)
    filled = ~np.isnan(value)
    first = base[meter_of_cell]
    end = base[meter_of_cell + 1]
    left = np.maximum.accumulate(np.where(filled, index, first - 1))
    left = np.maximum(left, first - 1)  # never a cell of the meter before
    right = np.minimum.accumulate(np.where(filled, index, end)[::-1])[::-1]
    right = np.minimum(right, end)
    has_left, has_right = left >= first, right < end
    gap = ~filled & (right - left - 1 <= max_linear) & (has_left | has_right)
    left_value = np.where(has_left, value[np.clip(left, 0, cells - 1)], np.nan)
    right_value = np.where(has_right, value[np.clip(right, 0, cells - 1)], np.nan)
    weight = (index - left) / np.maximum(right - left, 1)
    both = has_left & has_right
    estimate = np.where(
        both,
        left_value + (right_value - left_value) * weight,
        np.where(has_left, left_value, right_value),
    )
    value[gap] = estimate[gap]
    quality[gap] = _Q[ESTIMATED]
    method[gap] = _M["linear"]


def _apply_profile(
    value: np.ndarray,
    quality: np.ndarray,
    method: np.ndarray,
    meters: pa.Table,
    meter_of_cell: np.ndarray,
    hours: np.ndarray,
    profile: pa.Table,
) -> None:
    """The meter's profile at the interval's local hour, for gaps still open (in place)."""
    open_cells = np.flatnonzero(np.isnan(value))
    if not len(open_cells) or profile.num_rows == 0:
        return
    profile_meter = _ints(pc.index_in(profile["device_id"], value_set=meters["device_id"]), -1)
    known = profile_meter >= 0
    table = np.full((len(meters), 24), np.nan)
    table[profile_meter[known], _ints(profile["hour"], 0)[known]] = _floats(profile["value"])[known]
    typical = table[meter_of_cell[open_cells], hours[open_cells]]
    found = open_cells[~np.isnan(typical)]
    value[found] = typical[~np.isnan(typical)]
    quality[found] = _Q[ESTIMATED]
    method[found] = _M["profile"]


def _apply_edits(
    value: np.ndarray,
    quality: np.ndarray,
    method: np.ndarray,
    meters: pa.Table,
    base: np.ndarray,
    per_meter: np.ndarray,
    interval_us: np.ndarray,
    day: Day,
    edits: pa.Table,
) -> None:
    """Each override on the interval it starts (in place); one off the grid is ignored."""
    meter = _ints(pc.index_in(edits["device_id"], value_set=meters["device_id"]), -1)
    known = meter >= 0
    meter = meter[known]
    offset = _ints(edits["interval_start"], 0)[known] - day.start_us
    step = interval_us[meter]
    k = offset // np.maximum(step, 1)
    on_grid = (offset % np.maximum(step, 1) == 0) & (k >= 0) & (k < per_meter[meter])
    cells = (base[meter] + k)[on_grid]
    value[cells] = _floats(edits["value"])[known][on_grid]
    quality[cells] = _Q[EDITED]
    method[cells] = _M["edit"]
