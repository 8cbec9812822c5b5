"""The speed layer end to end: broker -> Spark streaming job -> lake + iot-abnormal + DLQ."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, date, datetime

from helpers import ROOT, send
from pyspark.sql import SparkSession

from meterflow.clients import kafka
from meterflow.core import messages, timestamps
from meterflow.core.config import Settings
from meterflow.core.contract import STATELESS_FAULTS, FaultCode
from meterflow.core.events import event_id
from meterflow.core.lake import LAKE_COLUMNS, read_watermark, readings_path
from meterflow.stream.supervisor import run
from simulator.generator import FaultRates, SimulationConfig, simulate


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
    send(settings, [good(0), *garbage, good(2, -1)], key=b"em1")

    totals = run(settings, available_now=True, spark=spark)

    assert totals == {
        "read": 7,
        "valid": 1,
        "abnormal": 1,
        "deadletter": 5,
        "skipped": 0,
        "lost": 0,
    }
    letters = kafka.read_to_end(settings.bootstrap_servers, settings.topic_deadletter)
    assert sorted(m.value() for m in letters) == sorted(garbage)
    by_offset = {int(headers(m)[messages.DLQ_HEADER_OFFSET]): m for m in letters}
    assert set(by_offset) == {1, 2, 3, 4, 5}
    assert by_offset[1].value() == garbage[0]
    assert headers(by_offset[1])[messages.DLQ_HEADER_REASON] == "NOT_JSON"
    assert headers(by_offset[3])[messages.DLQ_HEADER_REASON] == "NOT_OBJECT"
    assert headers(by_offset[5])[messages.DLQ_HEADER_REASON] == "MISSING_FIELD"
    assert headers(by_offset[5])[messages.DLQ_HEADER_TOPIC] == settings.topic_readings
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
    send(settings, [good(i, -1 if i % 10 == 0 else 2.0) for i in range(300)], key=b"em1")
    first = run(settings, available_now=True, spark=spark)
    send(settings, [good(i, -1 if i % 10 == 0 else 2.0) for i in range(300, 500)], key=b"em1")
    second = run(settings, available_now=True, spark=spark)
    third = run(settings, available_now=True, spark=spark)  # nothing new: nothing written

    assert (first["read"], second["read"], third["read"]) == (300, 200, 0)
    rows = (
        lake(spark, settings)
        .select("source_partition", "source_offset", "source_generation", "fault_code")
        .collect()
    )
    coordinates = Counter((r.source_partition, r.source_offset) for r in rows)
    assert len(rows) == 500 and max(coordinates.values()) == 1
    events = kafka.read_to_end(settings.bootstrap_servers, settings.topic_abnormal)
    ids = Counter(json.loads(m.value())["event_id"] for m in events)
    lake_abnormal = {
        event_id(settings.topic_readings, r.source_generation, r.source_partition, r.source_offset)
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
    register = b'{"device_id": "em2", "timestamp": "2024-05-27T12:00:00Z", "register_kwh": 99.5}'
    send(settings, [water, future, register], key=b"em1")
    run(settings, available_now=True, spark=spark)
    rows = {r.device_id: r for r in lake(spark, settings).collect()}
    assert rows["wm1"].meter_type == "water" and rows["wm1"].unit == "L"
    assert (rows["wm1"].consumption, rows["wm1"].flow_rate) == (18.0, 5.0)
    assert rows["wm1"].register is None
    # A register-only reading is valid, and the lake keeps its register.
    assert (rows["em2"].fault_code, rows["em2"].consumption, rows["em2"].register) == (
        None,
        None,
        99.5,
    )
    assert str(rows["wm1"].date) == "2024-05-27"
    # A timestamp from the future is filed under the day it arrived, not in 2099.
    assert rows["gm1"].fault_code == "FUTURE_TIMESTAMP"
    assert rows["gm1"].date == rows["gm1"].ingest_time.date()
    # The watermark follows event time; a reading stamped in the future does not move it.
    watermark = read_watermark(settings.lake_path)
    assert watermark == datetime(2024, 5, 27, 23, 59, 59, tzinfo=UTC)


def test_status_updates_follow_each_meters_latest_reading(
    spark: SparkSession, make_settings
) -> None:
    settings = make_settings(partitions=1)

    def em(device: str, minute: int, value: float) -> bytes:
        stamp = f"2024-05-27T10:{minute:02d}:00Z"
        return json.dumps({"device_id": device, "timestamp": stamp, "usage_kwh": value}).encode()

    # em1 ends on two faults in a row; em2 recovered; em3 never failed. Sent out of order.
    send(
        settings,
        [em("em1", 3, -1), em("em1", 1, 2.0), em("em1", 2, -1), em("em1", 0, -1)],
        key=b"em1",
    )
    send(settings, [em("em2", 0, -1), em("em2", 5, 3.5)], key=b"em2")
    send(settings, [em("em3", 7, 1.0), b"not json"], key=b"em3")
    run(settings, available_now=True, spark=spark)

    updates = [
        json.loads(m.value())
        for m in kafka.read_to_end(settings.bootstrap_servers, settings.topic_status)
    ]
    status = {u["device_id"]: u for u in updates}
    assert len(updates) == len(status) == 3
    assert status["em1"] | {"last_seen": None} == {
        "device_id": "em1",
        "meter_type": "electricity",
        "last_seen": None,
        "last_value": -1.0,
        "last_fault_code": "SENTINEL",
        "readings": 4,
        "faults": 3,
        "trailing_faults": 2,
    }
    assert status["em1"]["last_seen"] == "2024-05-27T10:03:00Z"
    assert (status["em2"]["last_fault_code"], status["em2"]["trailing_faults"]) == (None, 0)
    assert (status["em2"]["last_value"], status["em2"]["faults"]) == (3.5, 1)
    assert (status["em3"]["readings"], status["em3"]["faults"]) == (1, 0)


def test_with_detection_on_each_meter_gets_a_digest_of_its_readings(
    spark: SparkSession, make_settings
) -> None:
    """METERFLOW_DETECTION=on: the tasks publish each meter's readings on iot-meter-digest."""
    settings = make_settings(partitions=1, METERFLOW_DETECTION="on")
    assert settings.topic_digest in settings.topics

    def em(device: str, minute: int, value: float) -> bytes:
        stamp = f"2024-05-27T10:{minute:02d}:00Z"
        return json.dumps({"device_id": device, "timestamp": stamp, "usage_kwh": value}).encode()

    send(
        settings, [em("em1", 2, 0.5), em("em1", 0, -1), em("em1", 1, 0.7), b"not json"], key=b"em1"
    )
    send(settings, [em("em2", 4, 2.5)], key=b"em2")
    run(settings, available_now=True, spark=spark)

    digests = [
        messages.decode(m.value(), messages.ReadingDigest)
        for m in kafka.read_to_end(settings.bootstrap_servers, settings.topic_digest)
    ]
    # With detection on a task reads a whole partition: one digest per meter and batch,
    # in event-time order, holding each of its readings once.
    assert sorted(d.device_id for d in digests) == ["em1", "em2"]
    readings: dict[str, list[tuple[int, float | None, bool]]] = {}
    for digest in digests:
        assert digest.event_us == sorted(digest.event_us)
        assert digest.meter_type == "electricity"
        readings.setdefault(digest.device_id, []).extend(
            zip(digest.event_us, digest.values, digest.faulty, strict=True)
        )
    start = timestamps.parse_timestamp_us("2024-05-27T10:00:00Z")
    assert readings["em1"] == [
        (start, -1.0, True),
        (start + 60_000_000, 0.7, False),
        (start + 120_000_000, 0.5, False),
    ]
    assert readings["em2"] == [(start + 240_000_000, 2.5, False)]
    assert set(readings) == {"em1", "em2"}  # the dead letter has no meter


def test_simulated_fleet_end_to_end_counts_match_exactly(
    spark: SparkSession, make_settings
) -> None:
    """Simulator -> broker -> job -> lake + iot-abnormal + iot-deadletter, all counts equal."""
    settings = make_settings(partitions=3)
    faults = FaultRates({code: 0.01 for code in STATELESS_FAULTS}, malformed=0.01)
    config = SimulationConfig(
        meters=120, days=1, end=date(2024, 6, 3), seed=21, faults=faults, rules=settings.rules
    )
    sink = kafka.ProducerSink(settings.bootstrap_servers, settings.topic_readings)
    summary = simulate(config, sink.emit)
    assert sink.close() == 0 and summary.consistent()

    totals = run(settings, available_now=True, spark=spark)

    assert totals == {
        "read": summary.sent,
        "valid": summary.valid,
        "abnormal": sum(summary.faults.values()),
        "deadletter": sum(summary.malformed.values()),
        "skipped": 0,
        "lost": 0,
    }
    frame = lake(spark, settings)
    by_fault = {r.fault_code: r["count"] for r in frame.groupBy("fault_code").count().collect()}
    assert by_fault.pop(None) == summary.valid
    assert by_fault == {str(code): n for code, n in summary.faults.items()}
    days = {
        str(r.date) for r in frame.filter("fault_code IS NULL").select("date").distinct().collect()
    }
    assert days == {"2024-06-02"}

    events = [
        json.loads(m.value())
        for m in kafka.read_to_end(settings.bootstrap_servers, settings.topic_abnormal)
    ]
    assert Counter(e["fault_code"] for e in events) == {
        str(c): n for c, n in summary.faults.items()
    }
    assert len({e["event_id"] for e in events}) == len(events)
    letters = kafka.read_to_end(settings.bootstrap_servers, settings.topic_deadletter)
    reasons = Counter(headers(m)[messages.DLQ_HEADER_REASON] for m in letters)
    assert reasons == {str(r): n for r, n in summary.malformed.items()}


def test_prototype_stream_end_to_end(spark: SparkSession, make_settings) -> None:
    """The prototype's em1..em4 / wm1..wm4 messages, -1 as the fault, through the job."""
    settings = make_settings(partitions=2)
    config = SimulationConfig(
        days=0.5,
        end=date(2024, 5, 28),
        seed=4,
        message_format="legacy",
        faults=FaultRates({FaultCode.SENTINEL: 0.05}),
    )
    sent: list[bytes] = []
    sink = kafka.ProducerSink(settings.bootstrap_servers, settings.topic_readings)

    def emit(key: bytes | None, value: bytes) -> None:
        sent.append(value)
        sink.emit(key, value)

    summary = simulate(config, emit)
    assert sink.close() == 0

    totals = run(settings, available_now=True, spark=spark)

    sentinels = summary.faults[FaultCode.SENTINEL]
    assert sentinels > 0 and totals["abnormal"] == sentinels
    assert totals == {
        "read": len(sent),
        "valid": len(sent) - sentinels,
        "abnormal": sentinels,
        "deadletter": 0,
        "skipped": 0,
        "lost": 0,
    }
    rows = lake(spark, settings).collect()
    assert {r.device_id for r in rows} == {f"{p}{i}" for p in ("em", "wm") for i in range(1, 5)}
    assert {r.meter_type for r in rows if r.device_id.startswith("wm")} == {"water"}
    assert {r.fault_code for r in rows if r.fault_code} == {"SENTINEL"}


def test_spark_submit_conf_wins_over_the_session_defaults(tmp_path) -> None:
    """compose gives the streaming job `--conf spark.python.worker.reuse=false`; get_spark's
    own default (true) must not undo it. Options it was not given keep the defaults, and
    its Python workers fork from meterflow's daemon, whose imports are frozen out of the
    garbage collector's reach."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "show_conf.py"
    script.write_text(
        "from meterflow.spark.session import get_spark\n"
        "context = get_spark('conf-check').sparkContext\n"
        "conf = context.getConf()\n"
        "print('reuse=' + conf.get('spark.python.worker.reuse'))\n"
        "print('daemon=' + conf.get('spark.python.daemon.module'))\n"
        "frozen = context.parallelize([0], 1).map(lambda _: __import__('gc').get_freeze_count())\n"
        "print(f'frozen={frozen.first()}')\n"
    )
    spark_submit = Path(sys.executable).with_name("spark-submit")
    done = subprocess.run(
        [str(spark_submit), "--master", "local[1]", "--conf", "spark.python.worker.reuse=false",
         "--conf", "spark.ui.enabled=false", str(script)],
        capture_output=True, text=True, timeout=180, check=False,
        cwd=ROOT,
        env={**os.environ, "PYSPARK_PYTHON": sys.executable},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reuse=false" in done.stdout
    assert "daemon=meterflow.spark.daemon" in done.stdout
    frozen = int(done.stdout.split("frozen=")[1].split()[0])
    assert frozen > 10_000, done.stdout  # pandas, pyarrow and pyspark's objects
