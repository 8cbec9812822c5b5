"""The stateful detector in real Spark: transformWithState on RocksDB, checkpointed, with
event-time NO_DATA timers; restarted in the middle of a STUCK run and of a silent span, it
loses no episode change and repeats none."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession

from meterflow.core.contract import DetectionRules, format_timestamp_us, parse_timestamp_us
from meterflow.stream.detector import DIGEST_DDL, EVENT_TIME, detect_faults

T0 = parse_timestamp_us("2024-05-27T00:00:00Z")
STEP = 900
SCHEMA = (
    "device_id string, meter_type string, event_time timestamp, consumption double, faulty boolean"
)


def write(inbox: Path, name: str, rows: list[tuple[str, int, float]]) -> None:
    """One digest per meter (as the stream's tasks publish them), in a new file."""
    by_device: dict[str, list[tuple[int, float]]] = {}
    for device, i, value in rows:
        by_device.setdefault(device, []).append((T0 + i * STEP * 1_000_000, value))
    lines = [
        json.dumps(
            {
                "device_id": device,
                "meter_type": "electricity",
                "event_time": format_timestamp_us(readings[-1][0]),
                "event_us": [us for us, _ in readings],
                "values": [value for _, value in readings],
                "faulty": [False] * len(readings),
            }
        )
        for device, readings in by_device.items()
    ]
    (inbox / f"{name}.json").write_text("\n".join(lines) + "\n")


def run_once(spark: SparkSession, inbox: Path, checkpoint: Path, out: list[dict]) -> None:
    """One start of the detector: everything in the inbox, then stop (a restart each time)."""
    digests = spark.readStream.schema(DIGEST_DDL).json(str(inbox))
    changes = detect_faults(
        digests, DetectionRules(), {}, STEP, EVENT_TIME, watermark_delay="0 seconds"
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


def normal(i: int) -> float:
    return round(0.2 + 0.05 * ((i * 7) % 11) + 0.001 * (i % 13), 3)


def test_restarts_in_a_stuck_run_and_a_silent_span_lose_and_repeat_nothing(
    spark: SparkSession, tmp_path: Path
) -> None:
    inbox, checkpoint = tmp_path / "inbox", tmp_path / "checkpoint"
    inbox.mkdir()
    out: list[dict] = []
    # em1 turns stuck at reading 10; em2 reports until reading 13, then falls silent.
    write(
        inbox,
        "a",
        [("em1", i, normal(i)) for i in range(10)] + [("em2", i, normal(i)) for i in range(14)],
    )
    write(inbox, "b", [("em1", i, 0.777) for i in range(10, 14)])
    run_once(spark, inbox, checkpoint, out)
    assert out == []  # four of eight repeats: nothing yet

    write(inbox, "c", [("em1", i, 0.777) for i in range(14, 24)])  # restart mid-run
    run_once(spark, inbox, checkpoint, out)
    write(inbox, "d", [("em1", i, 0.777) for i in range(24, 26)])  # restart mid-silence
    run_once(spark, inbox, checkpoint, out)
    write(inbox, "e", [("em1", 26, 0.5), ("em2", 26, normal(26))])  # both recover
    run_once(spark, inbox, checkpoint, out)

    seen = Counter((r["device_id"], r["fault_code"], r["action"], r["start_us"]) for r in out)
    at = lambda i: T0 + i * STEP * 1_000_000  # noqa: E731
    assert seen == {
        ("em1", "STUCK", "open", at(10)): 1,
        ("em1", "STUCK", "clear", at(10)): 1,
        ("em2", "NO_DATA", "open", at(14)): 1,
        ("em2", "NO_DATA", "clear", at(14)): 1,
    }
