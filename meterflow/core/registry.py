"""The fleet registry's contract: each column once, with its Arrow type and what a value must be.

The registry (``LAKE_PATH/registry/meters.parquet``) is written by the simulator and by
``meterflow registry import``, and read by the batch layer, the detector's per-meter
profiles and MongoDB's ``meters``. Every writer validates against :data:`COLUMNS` and
every reader takes the types from it, so a registry one side accepts is one the others can
use. :func:`validate` works column-wise (pyarrow.compute), then names each bad row once.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from meterflow.core import lake
from meterflow.core.contract import MeterType
from meterflow.core.errors import MeterflowError
from meterflow.core.timestamps import SECONDS_PER_DAY


class RegistryError(MeterflowError):
    """A registry file that cannot be read at all (not CSV or Parquet, a malformed line)."""


@dataclass(frozen=True)
class Bound:
    """What a numeric column's values must be: whole or not, above (or at least) ``low``,
    at most ``high``, dividing ``divides``. NaN and infinities never pass."""

    whole: bool
    low: float
    inclusive: bool = True
    high: float | None = None
    divides: int | None = None

    def allows(self, value: float) -> bool:
        """One value (the detector's check, meter by meter)."""
        if not math.isfinite(value) or not (
            value >= self.low if self.inclusive else value > self.low
        ):
            return False
        if self.high is not None and value > self.high:
            return False
        if self.whole and not float(value).is_integer():
            return False
        return self.divides is None or self.divides % int(value) == 0

    def refused(self, values: pa.Array) -> pa.Array:
        """Column-wise :meth:`allows`: True where a value is refused (null: never)."""
        values = pc.cast(values, pa.float64())
        low = pc.greater_equal if self.inclusive else pc.greater
        good = pc.and_(pc.is_finite(values), low(values, self.low))
        if self.high is not None:
            good = pc.and_(good, pc.less_equal(values, self.high))
        if self.whole:
            good = pc.and_(good, pc.equal(pc.floor(values), values))
        if self.divides is not None:
            ratio = pc.divide(float(self.divides), pc.if_else(good, values, 1.0))
            good = pc.and_(good, pc.equal(ratio, pc.floor(ratio)))
        return pc.fill_null(pc.invert(good), False)

    def describe(self) -> str:
        """``a whole number at least 1 that divides 86400``: what a refusal says."""
        text = f"{'a whole number' if self.whole else 'a number'} "
        if self.high is not None:
            text += f"from {self.low:g} to {self.high:g}"
        else:
            text += f"{'at least' if self.inclusive else 'above'} {self.low:g}"
        if self.divides is not None:
            text += f" that divides {self.divides}"
        return text


@dataclass(frozen=True)
class Column:
    """One registry column: name, Arrow type, whether every row needs it, and its bound;
    ``override``: one of the detector's per-meter thresholds."""

    name: str
    type: pa.DataType
    doc: str
    required: bool = False
    bound: Bound | None = None
    override: bool = False


STRING, INT, FLOAT, BOOL = pa.string(), pa.int32(), pa.float64(), pa.bool_()
INTERVAL = "interval_seconds"
#: A meter that legitimately repeats one value (street lighting, a pump): no STUCK, and on
#: water no LEAK (docs/architecture.md, "Stateful detection").
CONSTANT_LOAD = "constant_load"
#: Each column meterflow knows, in the order a registry keeps them.
COLUMNS: tuple[Column, ...] = (
    Column("device_id", STRING, "the meter's id as its readings carry it; unique", True),
    Column("meter_type", STRING, f"one of {', '.join(MeterType)}", True),
    Column("household_id", STRING, "metadata (the simulator's household)"),
    Column("owner", STRING, "metadata"),
    Column("address", STRING, "metadata"),
    Column("district", STRING, "the daily views group meters by it"),
    Column("city", STRING, "metadata"),
    Column("installed_on", pa.date32(), "YYYY-MM-DD; the daily check expects the meter from then"),
    Column("latitude", FLOAT, "metadata"),
    Column("longitude", FLOAT, "metadata"),
    Column("scale", FLOAT, "metadata (the simulator's consumption scale)"),
    Column(
        INTERVAL,
        INT,
        "seconds between readings: whole intervals per day for the daily completeness",
        bound=Bound(whole=True, low=1, divides=SECONDS_PER_DAY),
    ),
    Column(
        "register_digits",
        INT,
        "the register rolls over at 10**digits in the meter's unit",
        bound=Bound(whole=True, low=1, high=15),
    ),
    Column(
        "register_reset_at",
        lake.TIMESTAMP,
        "ISO 8601 with an offset or Z: a meter exchange; the new register starts after it",
    ),
    Column(
        CONSTANT_LOAD,
        BOOL,
        "true for a constant load (street lighting, a pump): repeats are not STUCK, and a "
        "steady water flow is not a LEAK",
    ),
    # The detector's per-meter overrides, named like the DetectionRules field each replaces,
    # with the bounds DetectionRules itself holds its values to.
    *(
        Column(name, kind, "a detection threshold of this meter", bound=bound, override=True)
        for name, kind, bound in (
            ("stuck_readings", INT, Bound(whole=True, low=2)),
            ("stuck_min", FLOAT, Bound(whole=False, low=0, inclusive=False)),
            ("spike_factor", FLOAT, Bound(whole=False, low=1, inclusive=False)),
            ("spike_min", FLOAT, Bound(whole=False, low=0, inclusive=False)),
            ("leak_min_night_flow", FLOAT, Bound(whole=False, low=0, inclusive=False)),
            ("nodata_intervals", INT, Bound(whole=True, low=1)),
        )
    ),
)
BY_NAME: dict[str, Column] = {c.name: c for c in COLUMNS}
SCHEMA = pa.schema([(c.name, c.type) for c in COLUMNS])
REQUIRED: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.required)
#: The detection overrides (the interval aside): :mod:`meterflow.stream.detection.profiles`.
OVERRIDES: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.override)
#: What the detector reads of each meter, with the bound it holds each value to.
PROFILE_BOUNDS: dict[str, Bound] = {
    n: b for n in (INTERVAL, *OVERRIDES) if (b := BY_NAME[n].bound) is not None
}
REGISTER = ("register_digits", "register_reset_at")


def schema_of(names: Sequence[str]) -> pa.Schema:
    """The declared fields of ``names``, in that order (the simulator's columns, say)."""
    return pa.schema([SCHEMA.field(name) for name in names])


def unknown_columns(table: pa.Table) -> list[str]:
    """Columns meterflow does not read: kept as metadata, named so a typo shows."""
    return [name for name in table.column_names if name not in BY_NAME]


# -- reading a file an operator wrote -------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A registry file as read: its table (CSV: every column a string) and, for CSV, each
    row's line in the file, so problems name the line an editor shows."""

    path: str
    table: pa.Table
    lines: Sequence[int] | None = None


def read_file(path: str) -> Source:
    """A CSV (``.csv``) or Parquet (``.parquet``) registry file, unconverted."""
    suffix = PurePosixPath(path).suffix.lower()
    filesystem, inner = lake.filesystem_for(path)
    if filesystem.get_file_info(inner).type != pafs.FileType.File:
        raise RegistryError(f"{path}: no such file")
    try:
        if suffix == ".parquet":
            return Source(path, pq.read_table(inner, filesystem=filesystem))
        if suffix == ".csv":
            with filesystem.open_input_stream(inner) as stream:
                return _read_csv(path, stream.read())
    except (pa.ArrowInvalid, OSError) as exc:
        reason = " ".join(str(exc).split())
        raise RegistryError(f"{path}: cannot be read as {suffix[1:]}: {reason}") from None
    raise RegistryError(
        f"{path}: a registry is a .csv or .parquet file, not {suffix or 'no suffix'}"
    )


def _read_csv(path: str, data: bytes) -> Source:
    """Every column as a string, so a bad value is a problem of its row, not of the file.

    One row is one line (quoted newlines are not read); blank lines are skipped but
    counted, so the line numbers stay the file's. A row with the wrong number of fields
    makes the file unreadable.
    """
    header = data.split(b"\n", 1)[0].decode("utf-8-sig", "replace").strip("\r")
    names = next(csv.reader([header]), [])
    malformed: list[str] = []

    def invalid(row: Any) -> str:
        malformed.append(
            f"line {row.number}: {row.actual_columns} fields where the header has "
            f"{row.expected_columns}"
        )
        return "skip"

    table = pacsv.read_csv(
        pa.BufferReader(data),
        read_options=pacsv.ReadOptions(use_threads=False),
        parse_options=pacsv.ParseOptions(invalid_row_handler=invalid),
        convert_options=pacsv.ConvertOptions(
            column_types=dict.fromkeys(names, pa.string()),
            strings_can_be_null=True,
            null_values=[""],
        ),
    )
    if malformed:
        raise RegistryError(f"{path}: {len(malformed)} malformed row(s), the first {malformed[0]}")
    lines = [n for n, text in enumerate(data.split(b"\n"), start=1) if n > 1 and text.strip(b"\r")]
    return Source(path, table, lines[: table.num_rows])


# -- validation ------------------------------------------------------------------------------

_NUMBER = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$|^\s*(nan|NaN|NAN)\s*$"


def _to_type(values: pa.ChunkedArray, column: Column) -> tuple[pa.Array, pa.Array | None, str]:
    """``values`` as ``column.type``: the converted array (null where refused), where the
    conversion refused a value (None: nowhere), and what a refused value should be."""
    target = column.type
    array = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if array.type == target:
        return array, None, ""
    if pa.types.is_null(array.type):
        return pa.nulls(len(array), target), None, ""
    if pa.types.is_integer(target) or pa.types.is_floating(target):
        what = "must be a number"
        if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
            bad = pc.invert(pc.fill_null(pc.match_substring_regex(array, _NUMBER), True))
            array = pc.cast(pc.utf8_trim_whitespace(pc.if_else(bad, None, array)), pa.float64())
        elif pa.types.is_integer(array.type) or pa.types.is_floating(array.type):
            bad = None
        else:
            return (
                pa.nulls(len(array), target),
                pc.is_valid(array),
                f"{what} (column of {array.type})",
            )
        if pa.types.is_integer(target):
            # Whole and in range is the bound's to say; here only what an int32 can hold.
            as_float = pc.cast(array, pa.float64())
            fits = pc.and_(
                pc.equal(pc.floor(as_float), as_float), pc.less_equal(pc.abs(as_float), 2**31 - 1)
            )
            array = pc.cast(pc.if_else(pc.fill_null(fits, False), as_float, None), target)
        else:
            array = pc.cast(array, target)
        return array, bad, what
    if pa.types.is_string(target):
        return pc.cast(array, target), None, ""
    if pa.types.is_boolean(target):
        return _flags(array)
    if target == pa.date32():
        return _parse(array, target, "must be a date YYYY-MM-DD", _date)
    return _parse(array, target, "must be an ISO 8601 time with an offset or Z", _instant)


#: What a CSV may write for a boolean column, case aside.
TRUE_WORDS = ("true", "yes", "1")
FALSE_WORDS = ("false", "no", "0")


def _flags(array: pa.Array) -> tuple[pa.Array, pa.Array | None, str]:
    """A boolean column: true/false, yes/no or 1/0 (any case) from a CSV; numbers 1 and 0."""
    what = "must be true or false"
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        words = pc.utf8_lower(pc.utf8_trim_whitespace(array))
        true = pc.is_in(words, pa.array(TRUE_WORDS))
        false = pc.is_in(words, pa.array(FALSE_WORDS))
    elif pa.types.is_integer(array.type) or pa.types.is_floating(array.type):
        true, false = pc.equal(array, 1), pc.equal(array, 0)
    else:
        return (
            pa.nulls(len(array), pa.bool_()),
            pc.is_valid(array),
            f"{what} (column of {array.type})",
        )
    known = pc.or_(true, false)
    bad = pc.and_(pc.is_valid(array), pc.invert(pc.fill_null(known, False)))
    return pc.if_else(known, true, pa.scalar(None, pa.bool_())), bad, what


def _date(text: str) -> date:
    return date.fromisoformat(text.strip())


def _instant(text: str) -> datetime:
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        raise ValueError("no offset")
    return moment


def _parse(
    array: pa.Array, target: pa.DataType, what: str, parse: Callable[[str], Any]
) -> tuple[pa.Array, pa.Array | None, str]:
    """Dates and times: Arrow's cast when every value passes, else row by row."""
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        try:
            return pc.cast(array, target), None, what
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return (
                pa.nulls(len(array), target),
                pc.is_valid(array),
                f"{what} (column of {array.type})",
            )
    try:  # Arrow, like _instant, refuses a time without an offset
        return pc.cast(pc.utf8_trim_whitespace(array), target), None, what
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    parsed: list[Any] = []
    refused: list[bool] = []
    for text in array.to_pylist():
        try:
            parsed.append(None if text is None else parse(text))
            refused.append(False)
        except ValueError:
            parsed.append(None)
            refused.append(True)
    return pa.array(parsed, target), pa.array(refused), what


def _value(value: Any) -> str:
    """As the file has it; quoted only where blanks would not show."""
    text = str(value)
    return repr(text) if not text or text != text.strip() else text


#: One check: its column, where it refuses a row, and what it says of that row.
_Check = tuple[str, pa.Array, str | Callable[[int], str]]


def validate(table: pa.Table, lines: Sequence[int] | None = None) -> tuple[pa.Table, list[str]]:
    """The registry of ``table``'s good rows in the declared types, and one line per bad row.

    Each problem reads ``line N: <column> <what is wrong> (value ...)`` (``row N``, from 1,
    without ``lines``); a row's problems share its line. A missing required column is one
    line of its own. Unknown columns are kept as they are.
    """
    missing = [
        f"{name}: the required column is missing (the header has {', '.join(table.column_names)})"
        for name in REQUIRED
        if name not in table.column_names
    ]
    if missing:
        return table.slice(0, 0), missing

    def label(index: int) -> str:
        return f"line {lines[index]}" if lines is not None else f"row {index + 1}"

    converted, checks = _checked(table, label)
    any_bad = pa.array([False] * table.num_rows, pa.bool_())
    by_row: dict[int, list[str]] = {}
    order = list(BY_NAME)
    for name, mask, what in sorted(checks, key=lambda check: order.index(check[0])):
        where = pc.indices_nonzero(mask).to_pylist()
        if not where:
            continue
        any_bad = pc.or_(any_bad, mask)
        for index, value in zip(where, table[name].take(where).to_pylist(), strict=True):
            text = f"{name} {what if isinstance(what, str) else what(index)}"
            by_row.setdefault(index, []).append(
                text if value is None else f"{text} (value {_value(value)})"
            )
    problems = [f"{label(i)}: {'; '.join(texts)}" for i, texts in sorted(by_row.items())]
    unknown = unknown_columns(table)
    clean = pa.table(
        [*converted.values(), *(table[n] for n in unknown)], names=[*converted, *unknown]
    )
    return clean.filter(pc.invert(any_bad)), problems


def _checked(
    table: pa.Table, label: Callable[[int], str]
) -> tuple[dict[str, pa.Array], list[_Check]]:
    """The known columns in their declared types, and every check, each column-wise."""
    checks: list[_Check] = []
    converted: dict[str, pa.Array] = {}
    for column in COLUMNS:
        if column.name not in table.column_names:
            continue
        raw = table[column.name]
        array, bad, what = _to_type(raw, column)
        if bad is not None:
            checks.append((column.name, pc.fill_null(bad, False), what))
        if pa.types.is_integer(column.type):  # 3.5, or beyond an int32, became null
            lost = pc.and_(pc.is_valid(raw), pc.is_null(array))
            lost = lost if bad is None else pc.and_(lost, pc.invert(pc.fill_null(bad, False)))
            bound = column.bound.describe() if column.bound else "a whole number"
            checks.append((column.name, lost, f"must be {bound}"))
        if column.bound is not None:
            refused = column.bound.refused(array)
            checks.append((column.name, refused, f"must be {column.bound.describe()}"))
        converted[column.name] = array
    ids, types = converted["device_id"], converted["meter_type"]
    blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(ids), ""), True)
    checks.append(("device_id", blank, "is missing"))
    checks.append(("meter_type", pc.is_null(types), "is missing"))
    known = pc.is_in(types, pa.array([str(t) for t in MeterType]))
    checks.append(
        (
            "meter_type",
            pc.and_(pc.is_valid(types), pc.invert(known)),
            f"must be one of {', '.join(MeterType)}",
        )
    )
    counts = pc.value_counts(pc.drop_null(ids))
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        mask, first = _repeats(ids, repeated)
        checks.append(("device_id", mask, lambda i: f"repeats {label(first[i])}"))
    return converted, checks


def _repeats(ids: pa.Array, repeated: pa.Array) -> tuple[pa.Array, dict[int, int]]:
    """True on each row whose id an earlier row has, and that earlier row's index."""
    where = pc.indices_nonzero(pc.is_in(ids, repeated)).to_pylist()
    seen: dict[str, int] = {}
    first: dict[int, int] = {}
    for index, value in zip(where, ids.take(where).to_pylist(), strict=True):
        if value in seen:
            first[index] = seen[value]
        else:
            seen[value] = index
    mask = pc.is_in(pa.array(range(len(ids))), pa.array(list(first), pa.int64()))
    return mask, first


# -- the lake's registry ---------------------------------------------------------------------


def write(table: pa.Table, registry_dir: str) -> str:
    """Replace ``<registry_dir>/meters.parquet`` by ``table`` whole (a validated table:
    :func:`validate`'s first result); returns the file's path."""
    filesystem, root = lake.filesystem_for(registry_dir)
    target = lake.registry_parquet(root)
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    lake.write_atomically(filesystem, target, buffer.getvalue().to_pybytes())
    return target


def exists(registry: str) -> bool:
    """Whether the registry (directory or file) has its Parquet file."""
    filesystem, inner = lake.filesystem_for(lake.registry_parquet(registry))
    return bool(filesystem.get_file_info(inner).type == pafs.FileType.File)


def read(registry: str, columns: Sequence[str] | None = None) -> pa.Table:
    """The registry (directory or file) as written; with ``columns``, those in the declared
    types, and as nulls where an older registry lacks one."""
    filesystem, inner = lake.filesystem_for(lake.registry_parquet(registry))
    table = pq.read_table(inner, filesystem=filesystem)
    if columns is None:
        return table
    return pa.table(
        {
            name: table[name].cast(BY_NAME[name].type)
            if name in table.column_names
            else pa.nulls(table.num_rows, BY_NAME[name].type)
            for name in columns
        }
    )


def stamp(registry: str) -> tuple[int, ...] | None:
    """The registry file's identity: one stat, None if absent.

    :func:`write` renames a new file in, so a local file gets a new inode (two writes within
    the clock's tick may share a modification time); elsewhere its modification time and
    size tell. The stream notices a re-import by it without reading the file."""
    filesystem, inner = lake.filesystem_for(lake.registry_parquet(registry))
    if isinstance(filesystem, pafs.LocalFileSystem):
        try:
            found = os.stat(inner)
        except FileNotFoundError:
            return None
        return (found.st_ino, found.st_mtime_ns, found.st_size)
    info = filesystem.get_file_info(inner)
    if info.type != pafs.FileType.File:
        return None
    return (info.mtime_ns or 0, info.size or 0)
