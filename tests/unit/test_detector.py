"""The stateful processor (meterflow.stream.detector) through Spark's own in-memory tester
(TwsTester): its state, its NO_DATA timer in both time modes, its output rows. No JVM."""

from __future__ import annotations

from pyspark.sql import Row
from pyspark.sql.streaming.tws_tester import TwsTester

from meterflow.core.contract import DetectionRules, FaultCode, parse_timestamp_us
from meterflow.stream.detect import CLEAR, OPEN, decode_state
from meterflow.stream.detector import EVENT_TIME, PROCESSING_TIME, MeterDetector

T0 = parse_timestamp_us("2024-05-27T00:00:00Z")
STEP = 900
RULES = DetectionRules()


def reading(i: int, value: float | None, faulty: bool = False) -> Row:
    return Row(
        device_id="em1",
        meter_type="electricity",
        event_time=None,
        consumption=value,
        faulty=faulty,
        event_us=T0 + i * STEP * 1_000_000,
    )


def detector(mode: str) -> MeterDetector:
    return MeterDetector(RULES, {"em1": STEP}, 60, mode, ttl_ms=3_600_000)


def changes(rows: list[Row]) -> list[tuple[str, str]]:
    return [(r["fault_code"], r["action"]) for r in rows]


def test_no_data_on_the_clock_in_processing_time() -> None:
    tester = TwsTester(detector(PROCESSING_TIME), timeMode=PROCESSING_TIME)
    tester.setProcessingTime(1_000)
    assert tester.test("em1", [reading(0, 0.4), reading(1, 0.5)]) == []
    silent_ms = RULES.nodata_intervals * STEP * 1_000
    assert tester.setProcessingTime(1_000 + silent_ms - 1) == []
    opened = tester.setProcessingTime(1_000 + silent_ms)
    assert changes(opened) == [(str(FaultCode.NO_DATA), OPEN)]
    assert opened[0]["start_us"] == T0 + 2 * STEP * 1_000_000  # the first missing reading
    assert tester.setProcessingTime(1_000 + 10 * silent_ms) == []  # open once
    cleared = tester.test("em1", [reading(30, 0.6)])
    assert changes(cleared) == [(str(FaultCode.NO_DATA), CLEAR)]
    assert cleared[0]["start_us"] == opened[0]["start_us"]


def test_no_data_against_the_watermark_in_event_time() -> None:
    tester = TwsTester(
        detector(EVENT_TIME),
        timeMode=EVENT_TIME,
        eventTimeExtractor=lambda r: r["event_us"] // 1000,
    )
    tester.test("em1", [reading(i, 0.4 + i / 100) for i in range(3)])
    due_ms = (T0 + (2 + RULES.nodata_intervals) * STEP * 1_000_000) // 1000
    assert tester.setWatermark(due_ms - 1) == []
    assert changes(tester.setWatermark(due_ms)) == [(str(FaultCode.NO_DATA), OPEN)]


def test_stuck_through_the_processor_keeps_one_state_value() -> None:
    tester = TwsTester(detector(PROCESSING_TIME), timeMode=PROCESSING_TIME)
    tester.setProcessingTime(1_000)
    rows = [reading(i, 0.25 + i / 100) for i in range(5)]
    rows += [reading(i, 0.777) for i in range(5, 5 + RULES.stuck_readings)]
    out = tester.test("em1", rows)
    assert changes(out) == [(str(FaultCode.STUCK), OPEN)]
    assert out[0]["meter_type"] == "electricity"
    stored = tester.peekValueState("meter", "em1")
    assert stored is not None
    state = decode_state(bytes(stored[0]))
    assert state.stuck_open == T0 + 5 * STEP * 1_000_000 and state.timer_us > 0
    # A faulty reading (any stateless fault) neither clears nor extends the run.
    assert tester.test("em1", [reading(20, -1.0, faulty=True)]) == []
    assert changes(tester.test("em1", [reading(21, 0.3)])) == [(str(FaultCode.STUCK), CLEAR)]


def test_a_meter_silent_again_is_detected_again_and_a_gone_one_is_forgotten() -> None:
    day_ms = 24 * 3_600_000
    processor = MeterDetector(RULES, {"em1": STEP}, 60, EVENT_TIME, ttl_ms=day_ms)
    tester = TwsTester(
        processor, timeMode=EVENT_TIME, eventTimeExtractor=lambda r: r["event_us"] // 1000
    )
    to_ms = lambda i: (T0 + i * STEP * 1_000_000) // 1000  # noqa: E731
    tester.test("em1", [reading(0, 0.4), reading(1, 0.5)])
    assert changes(tester.setWatermark(to_ms(1 + RULES.nodata_intervals))) == [
        (str(FaultCode.NO_DATA), OPEN)
    ]
    assert changes(tester.test("em1", [reading(20, 0.6)])) == [(str(FaultCode.NO_DATA), CLEAR)]
    # The forget timer armed while silent moved back to the new deadline: silence again opens.
    again = tester.setWatermark(to_ms(20 + RULES.nodata_intervals))
    assert [(r["action"], r["start_us"]) for r in again] == [(OPEN, T0 + 21 * STEP * 1_000_000)]
    assert tester.peekValueState("meter", "em1") is not None
    assert tester.setWatermark(to_ms(20) + day_ms) == []  # silent for the TTL: forgotten
    assert tester.peekValueState("meter", "em1") is None


def test_detection_input_keeps_readings_and_drops_what_would_move_time_wrongly() -> None:
    import pyarrow as pa

    from meterflow.core.contract import Rules
    from meterflow.stream.detector import INPUT_COLUMNS, detection_input

    now_us = T0 + 10 * STEP * 1_000_000
    values = [
        b'{"device_id": "em1", "timestamp": "2024-05-27T00:00:00Z", "usage_kwh": 0.4}',
        b'{"device_id": "em1", "timestamp": "2024-05-27T00:15:00Z", "usage_kwh": -1}',
        b'{"device_id": "em1", "timestamp": "2124-05-27T00:15:00Z", "usage_kwh": 0.4}',
        b"not json",
    ]
    batch = pa.RecordBatch.from_pydict(
        {
            "key": [b"em1"] * 4,
            "value": values,
            "topic": ["iot-meter"] * 4,
            "partition": [0] * 4,
            "offset": list(range(4)),
            "timestamp": pa.array([now_us] * 4, pa.timestamp("us", "UTC")),
        }
    )
    (out,) = list(detection_input(iter([batch]), Rules()))
    assert out.schema.names == list(INPUT_COLUMNS)
    assert out.column("faulty").to_pylist() == [False, True]  # the SENTINEL reading
    assert out.column("consumption").to_pylist() == [0.4, -1.0]
