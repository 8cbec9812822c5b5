"""``meterflow reconcile``: what the lake's ledger proves, checked against Kafka and the lake.

"reconciled" is printed only when, across every run the ledger recorded, each partition's
committed offsets are contiguous from the first committed one (recorded losses count as
decided) and no offset has two outcomes. With ``--scan-lake`` the lake's files are read as
well, and every committed offset must be there exactly once (readings or dead letters).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from meterflow.clients import kafka
from meterflow.core import lake
from meterflow.core.ledger import Ledger, PartitionAudit, audit

_IDENTITY = ("source_topic", "source_generation", "source_partition", "source_offset")


@dataclass
class ReconcileReport:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    audits: list[PartitionAudit] = field(default_factory=list)
    lake_rows: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def problem(self) -> str:
        return "; ".join(self.problems[:3]) + (" ..." if len(self.problems) > 3 else "")


def _broker_offsets(
    bootstrap_servers: kafka.Cluster, topic: str
) -> tuple[str, dict[int, tuple[int, int]]] | None:
    """The topic's generation and (first, end) per partition, or None if Kafka is away."""
    try:
        generation = kafka.topic_ids(bootstrap_servers, [topic], timeout=5)[topic]
        client = kafka.consumer(bootstrap_servers)
        try:
            lows: dict[tuple[str, int], int] = {}
            ends = kafka.partition_ends(
                client, kafka.topic_partitions(client, [topic], timeout=5), lows=lows
            )
        finally:
            client.close()
    except kafka.KafkaUnavailableError:
        return None
    return generation, {p: (lows[(t, p)], end) for (t, p), end in ends.items()}


def scan_lake(lake_path: str) -> pa.Table:
    """Rows per source offset in ``readings/`` and ``deadletter/`` (identity, count)."""
    tables = []
    for root in (lake.readings_path(lake_path), lake.deadletter_path(lake_path)):
        fs, path = lake.filesystem_for(root)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            continue
        dataset = ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
        if "source_generation" not in dataset.schema.names:
            continue
        tables.append(dataset.to_table(columns=list(_IDENTITY)))
    if not tables:
        return pa.table({**{n: [] for n in _IDENTITY}, "rows": pa.array([], pa.int64())})
    table = pa.concat_tables(tables, promote_options="default")
    return (
        table.group_by(list(_IDENTITY))
        .aggregate([([], "count_all")])
        .rename_columns([*_IDENTITY, "rows"])
    )


def reconcile(
    lake_path: str, topic: str, cluster: kafka.Cluster, scan_lake_files: bool = False
) -> ReconcileReport:
    """Audit the ledger of the lake at ``lake_path``; the readings ``topic`` is compared with
    what Kafka at ``cluster`` holds (not compared when its servers are empty)."""
    bootstrap_servers = kafka.cluster_of(cluster).bootstrap
    report = ReconcileReport()
    ledger = Ledger.load(lake_path)
    report.audits = list(audit(ledger))
    broker = _broker_offsets(cluster, topic) if bootstrap_servers else None
    current, offsets = broker if broker else (None, {})
    if not report.audits:
        report.lines.append(f"the ledger at {lake_path} has no commits yet")
    for a in report.audits:
        line = (
            f"{a.topic}[{a.partition}] generation {a.generation}: offsets {a.first}..{a.end - 1}"
            f" = valid {a.valid:,} + abnormal {a.abnormal:,} + dead-lettered {a.deadletter:,}"
            if a.first is not None and a.end is not None
            else f"{a.topic}[{a.partition}] generation {a.generation}: nothing committed"
        )
        for start, end, note in a.lost:
            line += f"; lost {start}..{end - 1} ({note})"
        if a.empty_offsets:
            line += f"; {a.empty_offsets} offsets without a record"
        if a.topic == topic and a.generation == current and a.partition in offsets:
            first, end = offsets[a.partition]
            a.broker_start, a.broker_end = first, end
            a.unread = max(0, end - (a.end or 0))
            line += f"; broker {first}..{end - 1}, {a.unread:,} not read yet"
        report.lines.append(line)
        for start, end in a.gaps:
            report.problems.append(
                f"{a.topic}[{a.partition}] ({a.generation}) offsets {start}..{end - 1} have no "
                "outcome and no recorded loss"
            )
        for start, end in a.double:
            report.problems.append(
                f"{a.topic}[{a.partition}] ({a.generation}) offsets {start}..{end - 1} were "
                "committed twice"
            )
    seen = {a.partition for a in report.audits if a.generation == current}
    for partition, (first, end) in sorted(offsets.items()):
        if partition not in seen and end > first:
            report.lines.append(
                f"{topic}[{partition}] generation {current}: {end - first:,} offsets on the "
                "broker, none committed yet"
            )
    if broker is None and bootstrap_servers:
        report.lines.append(f"Kafka at {bootstrap_servers} not reachable: not compared")
    if scan_lake_files:
        _check_lake(lake_path, report)
    committed = sum(a.committed for a in report.audits)
    lost = sum(end - start for a in report.audits for start, end, _ in a.lost)
    generations = len({(a.topic, a.generation) for a in report.audits})
    if report.ok:
        report.lines.append(
            f"reconciled: {committed:,} offsets in {generations} generation(s) and "
            f"{len(report.audits)} partition(s), each with exactly one outcome (valid "
            f"{sum(a.valid for a in report.audits):,}, abnormal "
            f"{sum(a.abnormal for a in report.audits):,}, dead-lettered "
            f"{sum(a.deadletter for a in report.audits):,}), contiguous from the first "
            f"committed one; {lost:,} recorded as lost"
            + (f"; lake files hold {report.lake_rows:,} rows" if scan_lake_files else "")
        )
    return report


def _check_lake(lake_path: str, report: ReconcileReport) -> None:
    """Every committed offset in the lake's files exactly once, and nothing else."""
    rows = scan_lake(lake_path)
    report.lake_rows = int(pc.sum(rows["rows"]).as_py() or 0)
    duplicated = rows.filter(pc.greater(rows["rows"], 1))
    if duplicated.num_rows:
        first = duplicated.slice(0, 1).to_pylist()[0]
        report.problems.append(
            f"{duplicated.num_rows} offsets appear more than once in the lake (first: "
            f"{first['source_topic']}[{first['source_partition']}] offset "
            f"{first['source_offset']})"
        )
    per_partition: dict[tuple[str, str, int], int] = defaultdict(int)
    for row in rows.group_by(list(_IDENTITY[:3])).aggregate([("rows", "count")]).to_pylist():
        per_partition[(row["source_topic"], row["source_generation"], row["source_partition"])] = (
            row["rows_count"]
        )
    retired: dict[tuple[str, str, int], int] = defaultdict(int)
    for days in lake.read_retired(lake_path).values():
        for counts in days.values():
            for name, rows in counts.items():
                topic, generation, partition = name.rsplit("|", 2)
                retired[(topic, generation, int(partition))] += rows
    for a in report.audits:
        key = (a.topic, a.generation, a.partition)
        found = per_partition.pop(key, 0) + retired.get(key, 0)
        if found != a.committed:
            report.problems.append(
                f"{a.topic}[{a.partition}] ({a.generation}): the ledger committed "
                f"{a.committed:,} offsets, the lake's files hold {found:,} (retention "
                f"included)"
            )
    for (t, g, p), found in sorted(per_partition.items()):
        report.problems.append(f"{t}[{p}] ({g}): {found:,} offsets in the lake, none committed")
