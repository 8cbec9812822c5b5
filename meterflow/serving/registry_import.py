"""``meterflow registry import FILE``: an operator's own fleet into the lake and MongoDB.

Every row is validated (:func:`meterflow.core.registry.validate`) before anything is
written, so a file with one bad row changes nothing. A good file replaces the lake's
registry whole, then ``meters`` through :func:`~meterflow.serving.indexes.load_registry`,
the code ``init-mongo`` uses; the stream notices the new file and reloads the detector's
per-meter profiles.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pymongo.database import Database

from meterflow.core import registry
from meterflow.core.errors import MeterflowError
from meterflow.core.logs import get_logger
from meterflow.serving.indexes import RegistryLoad, load_registry

log = get_logger(__name__)
#: Bad rows printed before "... and N more bad rows".
SHOWN_PROBLEMS = 100


class RegistryRejectedError(MeterflowError):
    """A registry file with bad rows (or none at all): nothing was written."""

    def __init__(self, path: str, problems: Sequence[str]) -> None:
        rows = [p for p in problems if p.startswith(("line ", "row "))]
        what = f"{len(rows)} bad row{'' if len(rows) == 1 else 's'}" if rows else problems[0]
        super().__init__(f"{path} not imported: {what}; fix the file and import it again")
        self.rows = rows

    def shown(self, limit: int = SHOWN_PROBLEMS) -> list[str]:
        """The bad rows to print: the first ``limit``, then how many more there are."""
        more = len(self.rows) - limit
        return self.rows[:limit] + ([f"... and {more} more bad rows"] if more > 0 else [])


@dataclass(frozen=True)
class ImportReport:
    """What an import wrote: the lake's file, what it holds, and what ``meters`` did."""

    source: str
    target: str
    per_type: dict[str, int]
    districts: int
    with_interval: int
    with_register: int
    with_overrides: int
    constant_loads: int
    unknown: list[str]
    load: RegistryLoad


def import_registry(db: Database[dict[str, Any]], source: str, registry_dir: str) -> ImportReport:
    """Validate ``source`` (CSV or Parquet) whole, then replace the lake's registry at
    ``registry_dir`` and ``meters``. A bad row raises :class:`RegistryRejectedError` first."""
    read = registry.read_file(source)
    table, problems = registry.validate(read.table, read.lines)
    if problems:
        log.warning("registry=rejected source=%s problems=%d", source, len(problems))
        raise RegistryRejectedError(source, problems)
    if table.num_rows == 0:
        raise RegistryRejectedError(source, ["the file has no meters"])
    target = registry.write(table, registry_dir)
    load = load_registry(db, registry_dir)
    report = ImportReport(
        source=source,
        target=target,
        per_type=dict(Counter(table["meter_type"].to_pylist())),
        districts=_count_distinct(table, "district"),
        with_interval=_count_valid(table, [registry.INTERVAL]),
        with_register=_count_valid(table, registry.REGISTER),
        with_overrides=_count_valid(table, registry.OVERRIDES),
        constant_loads=_count_true(table, registry.CONSTANT_LOAD),
        unknown=registry.unknown_columns(table),
        load=load,
    )
    log.info(
        "registry=imported source=%s target=%s meters=%d unknown_columns=%s",
        source,
        target,
        table.num_rows,
        ",".join(report.unknown) or "none",
    )
    return report


def _count_valid(table: pa.Table, names: Sequence[str]) -> int:
    """Rows with a value in any of ``names`` (columns the file lacks count as null)."""
    present = [pc.is_valid(table[n]) for n in names if n in table.column_names]
    if not present:
        return 0
    return int(pc.sum(reduce(pc.or_, present)).as_py() or 0)


def _count_true(table: pa.Table, name: str) -> int:
    if name not in table.column_names:
        return 0
    return int(pc.sum(pc.fill_null(table[name], False).cast(pa.int64())).as_py() or 0)


def _count_distinct(table: pa.Table, name: str) -> int:
    if name not in table.column_names:
        return 0
    return len(pc.unique(pc.drop_null(table[name])))


def summary_lines(report: ImportReport) -> list[str]:
    """What ``meterflow registry import`` prints."""
    load = report.load
    types = ", ".join(f"{kind} {n:,}" for kind, n in sorted(report.per_type.items()))
    lines = [
        f"imported {load.meters:,} meters from {report.source} into {report.target}: {types}",
        f"districts: {report.districts}; with interval_seconds: {report.with_interval:,}; "
        f"with a register: {report.with_register:,}; with detection overrides: "
        f"{report.with_overrides:,}; constant loads: {report.constant_loads:,}",
        f"MongoDB meters: {load.new:,} new, {load.updated:,} updated, {load.removed:,} removed",
    ]
    if report.unknown:
        lines.append(
            f"kept as metadata, not read by meterflow: {', '.join(report.unknown)} "
            "(a misspelt column name?)"
        )
    return lines
