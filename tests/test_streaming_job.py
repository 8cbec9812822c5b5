"""The speed layer end to end: broker -> Spark streaming job -> lake + iot-abnormal + DLQ."""

from __future__ import annotations

import json
from collections import Counter

from pyspark.sql import SparkSession

from jobs.streaming_job import run
from meterflow import contract, kafka
from meterflow.config import Settings
from meterflow.lake import LAKE_COLUMNS, readings_path


def send(settings: Settings, messages: list[bytes | None], key: bytes = b"em1") -> None:
    producer = kafka.producer(settings.bootstrap_servers)
    for value in messages:
        producer.produce(settings.topic_readings, value, key)
    assert producer.flush(30) == 0


def lake(spark: SparkSession, settings: Settings):
    return spark.read.parquet(readings_path(settings.lake_path))


def headers(message) -> dict[str, str]:
    return {k: v.decode() for k, v in (message.headers() or [])}


def good(i: int, value: float = 1.5) -> bytes:
    return json.dumps(
        {
            "device_id": f"em{i % 7}",
            "timestamp": f"2024-05-27T10:{i % 60:02d}:00Z",
            "usage_kwh": value,
        }
    ).encode()


def test_dead_letters_keep_raw_bytes_reason_and_source(spark: SparkSession, make_settings) -> None:
    settings = make_settings(partitions=1)
    garbage = [b"\x00\xffbinary", b"{not json", b"[]", good(1)[:-1], b'{"device_id": "em1"}']
    send(settings, [good(0), *garbage, good(2, -1)])

    totals = run(settings, available_now=True, spark=spark)

    assert totals == {"read": 7, "valid": 1, "abnormal": 1, "deadletter": 5}
    letters = kafka.read_all(settings.bootstrap_servers, settings.topic_deadletter)
    assert sorted(m.value() for m in letters) == sorted(garbage)
    by_offset = {int(headers(m)[contract.DLQ_HEADER_OFFSET]): m for m in letters}
    assert set(by_offset) == {1, 2, 3, 4, 5}
    assert by_offset[1].value() == garbage[0]
    assert headers(by_offset[1])[contract.DLQ_HEADER_REASON] == "NOT_JSON"
    assert headers(by_offset[3])[contract.DLQ_HEADER_REASON] == "NOT_OBJECT"
    assert headers(by_offset[5])[contract.DLQ_HEADER_REASON] == "MISSING_FIELD"
    assert headers(by_offset[5])[contract.DLQ_HEADER_TOPIC] == settings.topic_readings
    assert all(m.key() == b"em1" for m in letters)
    # The lake holds readings only: the dead letters are not there.
    rows = lake(spark, settings).collect()
    assert sorted(r.source_offset for r in rows) == [0, 6]
    assert tuple(lake(spark, settings).columns) == (
        *(c for c in LAKE_COLUMNS if c != "date"),
        "date",
    )


def test_restart_neither_loses_nor_duplicates(spark: SparkSession, make_settings) -> None:
    settings = make_settings(partitions=2)
    send(settings, [good(i, -1 if i % 10 == 0 else 2.0) for i in range(300)])
    first = run(settings, available_now=True, spark=spark)
    send(settings, [good(i, -1 if i % 10 == 0 else 2.0) for i in range(300, 500)])
    second = run(settings, available_now=True, spark=spark)
    third = run(settings, available_now=True, spark=spark)  # nothing new: nothing written

    assert (first["read"], second["read"], third["read"]) == (300, 200, 0)
    rows = lake(spark, settings).select("source_partition", "source_offset", "fault_code").collect()
    coordinates = Counter((r.source_partition, r.source_offset) for r in rows)
    assert len(rows) == 500 and max(coordinates.values()) == 1
    events = kafka.read_all(settings.bootstrap_servers, settings.topic_abnormal)
    ids = Counter(json.loads(m.value())["event_id"] for m in events)
    lake_abnormal = {
        contract.event_id(settings.topic_readings, r.source_partition, r.source_offset)
        for r in rows
        if r.fault_code is not None
    }
    assert len(lake_abnormal) == 50
    assert set(ids) == lake_abnormal and max(ids.values()) == 1


def test_lake_rows_are_typed_and_partitioned_by_day(spark: SparkSession, make_settings) -> None:
    settings = make_settings(partitions=1)
    water = (
        b'{"device_id": "wm1", "timestamp": "2024-05-27T23:59:59Z", "usage": 18, "flow_rate": 5}'
    )
    future = b'{"device_id": "gm1", "timestamp": "2099-01-01T00:00:00Z", "usage_m3": 1}'
    send(settings, [water, future])
    run(settings, available_now=True, spark=spark)
    rows = {r.device_id: r for r in lake(spark, settings).collect()}
    assert rows["wm1"].meter_type == "water" and rows["wm1"].unit == "L"
    assert (rows["wm1"].consumption, rows["wm1"].flow_rate) == (18.0, 5.0)
    assert str(rows["wm1"].date) == "2024-05-27"
    # A timestamp from the future is filed under the day it arrived, not in 2099.
    assert rows["gm1"].fault_code == "FUTURE_TIMESTAMP"
    assert rows["gm1"].date == rows["gm1"].ingest_time.date()
