"""The stateful detector in real Spark: transformWithState on RocksDB, checkpointed, with
event-time NO_DATA timers; restarted in the middle of a STUCK run and of a silent span, it
loses no episode change and repeats none. A meter's own threshold from the registry reaches
Spark's Python workers with the processor."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from helpers import log_records
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from meterflow.core import messages
from meterflow.core.thresholds import DetectionRules
from meterflow.core.timestamps import parse_timestamp_us
from meterflow.stream.detection.processor import EVENT_TIME, detect_faults, digest_rows
from meterflow.stream.detection.profiles import MeterProfile, load_profiles
from meterflow.stream.detection.query import carried_state

T0 = parse_timestamp_us("2024-05-27T00:00:00Z")
STEP = 900


def write(inbox: Path, name: str, rows: list[tuple[str, int, float]]) -> None:
    """One digest per meter, as the stream's tasks publish them (Kafka key and value), in a
    new file."""
    by_device: dict[str, list[tuple[int, float]]] = {}
    for device, i, value in rows:
        by_device.setdefault(device, []).append((T0 + i * STEP * 1_000_000, value))
    lines = [
        json.dumps(
            {
                "key": device,
                "value": messages.encode(
                    messages.ReadingDigest(
                        device_id=device,
                        meter_type="electricity",
                        event_us=[us for us, _ in readings],
                        values=[value for _, value in readings],
                        faulty=[False] * len(readings),
                    )
                ).decode(),
            }
        )
        for device, readings in by_device.items()
    ]
    (inbox / f"{name}.json").write_text("\n".join(lines) + "\n")


def run_once(
    spark: SparkSession,
    inbox: Path,
    checkpoint: Path,
    out: list[dict],
    profiles: dict[str, MeterProfile],
) -> None:
    """One start of the detector: everything in the inbox, then stop (a restart each time)."""
    records = spark.readStream.schema("key string, value string").json(str(inbox))
    digests = digest_rows(
        records.select(F.col("key").cast("binary"), F.col("value").cast("binary"))
    )
    changes = detect_faults(
        digests, DetectionRules(), profiles, STEP, EVENT_TIME, watermark_delay="0 seconds"
    )

    def collect(frame: DataFrame, _batch: int) -> None:
        out.extend(row.asDict() for row in frame.collect())

    query = (
        changes.writeStream.foreachBatch(collect)
        .option("checkpointLocation", str(checkpoint))
        .trigger(availableNow=True)
        .start()
    )
    query.awaitTermination(120)
    assert query.exception() is None


def at(i: int) -> int:
    return T0 + i * STEP * 1_000_000


def key(change: dict) -> tuple[str, str, str, int]:
    return (change["device_id"], change["fault_code"], change["action"], change["start_us"])


def normal(i: int) -> float:
    return round(0.2 + 0.05 * ((i * 7) % 11) + 0.001 * (i % 13), 3)


def test_restarts_in_a_stuck_run_and_a_silent_span_lose_and_repeat_nothing(
    spark: SparkSession, tmp_path: Path
) -> None:
    inbox, checkpoint, registry = tmp_path / "inbox", tmp_path / "checkpoint", tmp_path / "reg"
    inbox.mkdir()
    registry.mkdir()
    # em3 is stuck after 3 repeats (the registry says so), em1 and em2 after the default 8.
    pq.write_table(
        pa.table({"device_id": ["em1", "em2", "em3"], "stuck_readings": [None, None, 3]}),
        registry / "meters.parquet",
    )
    profiles = load_profiles(str(registry), DetectionRules())
    out: list[dict] = []

    def em3(readings: range) -> list[tuple[str, int, float]]:
        """Three repeats from reading 10, then normal again: in step with em1."""
        return [("em3", i, 0.777 if 10 <= i < 13 else normal(i)) for i in readings]

    # em1 turns stuck at reading 10; em2 reports until reading 13, then falls silent.
    write(
        inbox,
        "a",
        [("em1", i, normal(i)) for i in range(10)]
        + [("em2", i, normal(i)) for i in range(14)]
        + em3(range(14)),
    )
    write(inbox, "b", [("em1", i, 0.777) for i in range(10, 14)])
    run_once(spark, inbox, checkpoint, out, profiles)
    em3_stuck = [("em3", "STUCK", "open", at(10)), ("em3", "STUCK", "clear", at(10))]
    assert [key(r) for r in out] == em3_stuck  # em1: four of eight repeats, nothing yet

    write(inbox, "c", [("em1", i, 0.777) for i in range(14, 24)] + em3(range(14, 24)))
    run_once(spark, inbox, checkpoint, out, profiles)  # restart mid-run
    write(inbox, "d", [("em1", i, 0.777) for i in range(24, 26)] + em3(range(24, 26)))
    run_once(spark, inbox, checkpoint, out, profiles)  # restart mid-silence
    write(inbox, "e", [("em1", 26, 0.5), ("em2", 26, normal(26)), ("em3", 26, normal(26))])
    run_once(spark, inbox, checkpoint, out, profiles)  # em1 and em2 recover

    assert Counter(key(r) for r in out) == {
        ("em1", "STUCK", "open", at(10)): 1,
        ("em1", "STUCK", "clear", at(10)): 1,
        ("em2", "NO_DATA", "open", at(14)): 1,
        ("em2", "NO_DATA", "clear", at(14)): 1,
        ("em3", "STUCK", "open", at(10)): 1,
        ("em3", "STUCK", "clear", at(10)): 1,
    }
    # Each batch's state commit wrote a changelog of what changed, not a snapshot of the
    # whole store (meterflow.spark.session): the restarts above recovered from them.
    assert list((checkpoint / "state").rglob("*.changelog"))


def test_a_previous_state_that_cannot_be_read_is_a_fresh_start_and_one_warning(
    spark: SparkSession, tmp_path: Path
) -> None:
    broken = tmp_path / "checkpoint"
    (broken / "commits").mkdir(parents=True)
    (broken / "commits" / "0").write_text("v1")  # committed, but no state behind it
    with log_records("meterflow.stream.detection") as records:
        assert carried_state(spark, str(broken)) is None
    lines = [record.getMessage() for record in records]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith(
        f"detector=fresh-state reason=previous-state-unreadable from={broken} error="
    )
