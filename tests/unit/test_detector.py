"""The stateful processor (meterflow.stream.detection.processor) through Spark's own
in-memory tester (TwsTester): its state, its NO_DATA timer in both time modes, its output
rows; and the digests it reads, as the stream's tasks write them. No JVM."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import msgspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from helpers import kafka_records
from pyspark.sql.streaming.tws_tester import TwsTester

from meterflow.core import messages, thresholds
from meterflow.core.contract import FaultCode
from meterflow.core.thresholds import DetectionRules
from meterflow.core.timestamps import parse_timestamp_us
from meterflow.stream.classify import classify_batch, reading_digests
from meterflow.stream.detection import processor as processor_module
from meterflow.stream.detection.processor import (
    EVENT_TIME,
    PROCESSING_TIME,
    Bucket,
    Delta,
    Head,
    MeterDetector,
    merged_state,
)
from meterflow.stream.detection.profiles import MeterProfile, load_profiles
from meterflow.stream.detection.rules import CLEAR, OPEN, MeterState

T0 = parse_timestamp_us("2024-05-27T00:00:00Z")
STEP = 900
RULES = DetectionRules()
BUCKET = 7  # the grouping key: a bucket of meters (which one does not matter here)
PROFILE = MeterProfile(STEP, None)


def at(i: int) -> int:
    return T0 + i * STEP * 1_000_000


def digest(
    *readings: tuple[int, float | None] | tuple[int, float | None, bool], device: str = "em1"
) -> pd.DataFrame:
    """One digest row of ``device``, as :func:`digest_rows` gives the processor."""
    full = [(*r, False)[:3] for r in readings]
    encoded = messages.encode(
        messages.ReadingDigest(
            device_id=device,
            meter_type="electricity",
            event_us=[at(i) for i, _, _ in full],
            values=[v for _, v, _ in full],
            faulty=[f for _, _, f in full],
        )
    )
    return pd.DataFrame(
        {
            "device_id": [device],
            "event_time": [pd.Timestamp(at(full[-1][0]), unit="us", tz="UTC")],
            "value": [encoded],
        }
    )


def detector(
    mode: str, ttl_ms: int = 3_600_000, profiles: dict[str, MeterProfile] | None = None
) -> MeterDetector:
    """em1 reads every STEP (the registry says so); other meters every 60 s by default."""
    return MeterDetector(RULES, profiles or {"em1": PROFILE}, 60, mode, ttl_ms=ttl_ms)


def changes(frame: pd.DataFrame) -> list[tuple[str, str]]:
    if frame is None or len(frame) == 0:
        return []
    return list(zip(frame["fault_code"], frame["action"], strict=True))


def event_time_tester(
    ttl_ms: int = 3_600_000, profiles: dict[str, MeterProfile] | None = None
) -> TwsTester:
    return TwsTester(
        detector(EVENT_TIME, ttl_ms, profiles),
        timeMode=EVENT_TIME,
        eventTimeExtractor=lambda row: row["event_time"].value // 1_000_000,
    )


def stored_state(tester: TwsTester) -> bytes | None:
    """The bucket's whole committed state: its snapshot with its deltas applied."""
    head = tester.peekValueState("head", BUCKET)
    if head is None:
        return None
    base = tester.peekValueState("bucket", BUCKET)
    deltas = {k[0]: bytes(v[0]) for k, v in tester.peekMapState("deltas", BUCKET).items()}
    seen = Head(*head)
    return merged_state(base and bytes(base[0]), deltas, seen.base_seq, seen.seq)


def stored_meters(tester: TwsTester) -> dict[str, MeterState]:
    state = stored_state(tester)
    assert state is not None
    meters = msgspec.msgpack.decode(state, type=Bucket).meters
    return {d: msgspec.msgpack.decode(raw, type=MeterState) for d, raw in meters.items()}


def test_no_data_on_the_clock_in_processing_time() -> None:
    tester = TwsTester(detector(PROCESSING_TIME), timeMode=PROCESSING_TIME)
    tester.setProcessingTime(1_000)
    assert changes(tester.testInPandas(BUCKET, digest((0, 0.4), (1, 0.5)))) == []
    silent_ms = RULES.nodata_intervals * STEP * 1_000
    assert changes(tester.setProcessingTime(1_000 + silent_ms - 1)) == []
    opened = tester.setProcessingTime(1_000 + silent_ms)
    assert changes(opened) == [(str(FaultCode.NO_DATA), OPEN)]
    assert opened["start_us"].tolist() == [at(2)]  # the first missing reading
    assert changes(tester.setProcessingTime(1_000 + 10 * silent_ms)) == []  # open once
    cleared = tester.testInPandas(BUCKET, digest((30, 0.6)))
    assert changes(cleared) == [(str(FaultCode.NO_DATA), CLEAR)]
    assert cleared["start_us"].tolist() == [at(2)]


def test_a_restarted_detector_does_not_take_its_own_downtime_for_silence() -> None:
    """Live, a detector that was down longer than a meter's NO_DATA window finds its timers
    due at once; the meters get their whole window again from the restart."""
    processor = detector(PROCESSING_TIME)
    tester = TwsTester(processor, timeMode=PROCESSING_TIME)
    tester.setProcessingTime(1_000)
    tester.testInPandas(BUCKET, digest((0, 0.4), (1, 0.5)))
    silent_ms = RULES.nodata_intervals * STEP * 1_000
    processor.started_ms = restart_ms = 1_000 + 3 * silent_ms  # what a new start passes
    assert changes(tester.setProcessingTime(restart_ms + 1)) == []  # the old timer fired
    assert changes(tester.setProcessingTime(restart_ms + silent_ms - 1)) == []
    opened = tester.setProcessingTime(restart_ms + silent_ms)  # still silent: now it is
    assert changes(opened) == [(str(FaultCode.NO_DATA), OPEN)]
    assert opened["start_us"].tolist() == [at(2)]


def test_no_data_against_the_watermark_in_event_time() -> None:
    tester = event_time_tester()
    tester.testInPandas(BUCKET, digest(*((i, 0.4 + i / 100) for i in range(3))))
    due_ms = at(2 + RULES.nodata_intervals) // 1000
    assert changes(tester.setWatermark(due_ms - 1)) == []
    assert changes(tester.setWatermark(due_ms)) == [(str(FaultCode.NO_DATA), OPEN)]


def test_a_watermark_far_past_the_deadline_opens_no_data_at_the_deadline() -> None:
    """A catch-up moves the watermark in big steps: the episode is the same whatever the
    steps (stamped when the silence became NO_DATA, not when the batch saw it)."""
    tester = event_time_tester()
    tester.testInPandas(BUCKET, digest(*((i, 0.4 + i / 100) for i in range(3))))
    due_us = at(2 + RULES.nodata_intervals)
    opened = tester.setWatermark(at(2 + 10 * RULES.nodata_intervals) // 1000)
    assert changes(opened) == [(str(FaultCode.NO_DATA), OPEN)]
    assert opened["at_us"].tolist() == [due_us] and opened["start_us"].tolist() == [at(3)]


def test_stuck_through_the_processor_keeps_the_meters_state() -> None:
    tester = TwsTester(detector(PROCESSING_TIME), timeMode=PROCESSING_TIME)
    tester.setProcessingTime(1_000)
    readings = [(i, 0.25 + i / 100) for i in range(5)]
    readings += [(i, 0.777) for i in range(5, 5 + RULES.stuck_readings)]
    out = tester.testInPandas(BUCKET, digest(*readings))
    assert changes(out) == [(str(FaultCode.STUCK), OPEN)]
    assert out["meter_type"].tolist() == ["electricity"]
    assert stored_meters(tester)["em1"].stuck_open == at(5)
    assert list(tester.handle.listTimers()) == [
        Head(*tester.peekValueState("head", BUCKET)).timer_ms
    ]
    # A faulty reading (any stateless fault) neither clears nor extends the run.
    assert changes(tester.testInPandas(BUCKET, digest((13, -1.0, True)))) == []
    cleared = tester.testInPandas(BUCKET, digest((14, 0.3)))
    assert changes(cleared) == [(str(FaultCode.STUCK), CLEAR)]


def test_a_meter_silent_again_is_detected_again_and_a_gone_one_is_forgotten() -> None:
    day_ms = 24 * 3_600_000
    tester = event_time_tester(ttl_ms=day_ms)
    tester.testInPandas(BUCKET, digest((0, 0.4), (1, 0.5)))
    opened = tester.setWatermark(at(1 + RULES.nodata_intervals) // 1000)
    assert changes(opened) == [(str(FaultCode.NO_DATA), OPEN)]
    assert changes(tester.testInPandas(BUCKET, digest((20, 0.6)))) == [
        (str(FaultCode.NO_DATA), CLEAR)
    ]
    # The forget timer armed while silent moved back to the new deadline: silence again opens.
    again = tester.setWatermark(at(20 + RULES.nodata_intervals) // 1000)
    assert list(zip(again["action"], again["start_us"], strict=True)) == [(OPEN, at(21))]
    assert tester.peekValueState("bucket", BUCKET) is not None
    assert changes(tester.setWatermark(at(20) // 1000 + day_ms)) == []  # silent for the TTL
    assert stored_state(tester) is None  # its only meter forgotten, and the bucket with it
    assert tester.peekValueState("bucket", BUCKET) is None
    assert tester.peekMapState("deltas", BUCKET) == {}


def test_a_bucket_carried_over_continues_its_meters_runs_and_silences() -> None:
    """A fresh checkpoint's initial state (a previous checkpoint's buckets): the STUCK run
    goes on where it was, and the NO_DATA timer is armed again in the new checkpoint."""
    before = event_time_tester()
    run_start = [(i, 0.25 + i / 100) for i in range(5)] + [(i, 0.777) for i in range(5, 9)]
    assert changes(before.testInPandas(BUCKET, digest(*run_start))) == []  # 4 of 8 repeats
    carried = pd.DataFrame({"bucket": [BUCKET], "state": [stored_state(before)]})

    after = TwsTester(
        detector(EVENT_TIME),
        initialStatePandas=[(BUCKET, carried)],
        timeMode=EVENT_TIME,
        eventTimeExtractor=lambda row: row["event_time"].value // 1_000_000,
    )
    due_ms = at(8 + RULES.nodata_intervals) // 1000
    assert list(after.handle.listTimers()) == [due_ms]  # armed again, for the carried meter
    rest = [(i, 0.777) for i in range(9, 5 + RULES.stuck_readings)]
    opened = after.testInPandas(BUCKET, digest(*rest))
    assert changes(opened) == [(str(FaultCode.STUCK), OPEN)]
    assert opened["start_us"].tolist() == [at(5)]  # the run began before the carry-over
    fresh = event_time_tester()  # without the carried state: only 4 repeats, nothing opens
    assert changes(fresh.testInPandas(BUCKET, digest(*rest))) == []


def registry_profiles(tmp_path: Path, **overrides: list[Any]) -> dict[str, MeterProfile]:
    """The profiles of a registry of em1..emN, every STEP, with ``overrides`` columns."""
    count = len(next(iter(overrides.values())))
    devices = [f"em{n}" for n in range(1, count + 1)]
    table = pa.table({"device_id": devices, "interval_seconds": [STEP] * count, **overrides})
    (tmp_path / "registry").mkdir()
    pq.write_table(table, tmp_path / "registry" / "meters.parquet")
    return load_profiles(str(tmp_path / "registry"), RULES)


def device_changes(frame: pd.DataFrame) -> list[tuple[str, str, str]]:
    if frame is None or len(frame) == 0:
        return []
    return list(zip(frame["device_id"], frame["fault_code"], frame["action"], strict=True))


def test_a_meters_own_stuck_count_from_the_registry(tmp_path: Path) -> None:
    profiles = registry_profiles(tmp_path, stuck_readings=[3, None])
    tester = TwsTester(detector(PROCESSING_TIME, profiles=profiles), timeMode=PROCESSING_TIME)
    tester.setProcessingTime(1_000)
    readings = [(i, 0.25 + i / 100) for i in range(5)] + [(i, 0.777) for i in range(5, 8)]
    both = pd.concat([digest(*readings, device="em1"), digest(*readings, device="em2")])
    stuck = str(FaultCode.STUCK)
    assert device_changes(tester.testInPandas(BUCKET, both)) == [("em1", stuck, OPEN)]
    more = [(i, 0.777) for i in range(8, 5 + RULES.stuck_readings)]  # em2's eighth repeat
    assert device_changes(tester.testInPandas(BUCKET, digest(*more, device="em2"))) == [
        ("em2", stuck, OPEN)
    ]


def test_a_meters_own_silence_from_the_registry(tmp_path: Path) -> None:
    """em1 has the defaults; em2 is silent after 2 intervals; em3 reads every 2 STEPs."""
    profiles = registry_profiles(tmp_path, nodata_intervals=[None, 2, None])
    profiles["em3"] = MeterProfile(2 * STEP, None)
    tester = event_time_tester(profiles=profiles)
    readings = [(i, 0.4 + i / 100) for i in range(3)]
    tester.testInPandas(BUCKET, pd.concat([digest(*readings, device=d) for d in profiles]))
    no_data = str(FaultCode.NO_DATA)
    assert device_changes(tester.setWatermark(at(2 + 2) // 1000 - 1)) == []
    assert device_changes(tester.setWatermark(at(2 + 2) // 1000)) == [("em2", no_data, OPEN)]
    due = RULES.nodata_intervals
    assert device_changes(tester.setWatermark(at(2 + due) // 1000)) == [("em1", no_data, OPEN)]
    assert device_changes(tester.setWatermark(at(2 + 2 * due) // 1000 - 1)) == []
    opened = tester.setWatermark(at(2 + 2 * due) // 1000)
    assert device_changes(opened) == [("em3", no_data, OPEN)]
    assert opened["start_us"].tolist() == [at(2 + 2)]  # em3's first missing reading


def test_the_streams_digests_reach_the_detector_as_sent() -> None:
    """Classified records -> reading_digests (the tasks) -> the processor (the detector)."""
    now_us = at(10)
    values = [
        b'{"device_id": "em1", "timestamp": "2024-05-27T00:15:00Z", "usage_kwh": -1}',
        b'{"device_id": "em1", "timestamp": "2024-05-27T00:00:00Z", "usage_kwh": 0.4}',
        b'{"device_id": "em1", "timestamp": "2124-05-27T00:15:00Z", "usage_kwh": 0.4}',
        b'{"device_id": "gm1", "timestamp": "2024-05-27T00:00:00Z"}',
        b"not json",
    ]
    batch = kafka_records(list(values), now_us)
    classified = pa.Table.from_batches([classify_batch(batch, thresholds.Rules()).classified])
    digests = reading_digests(classified)
    assert [key for key, _ in digests] == [b"em1", b"gm1"]
    em1, gm1 = (messages.decode(value, messages.ReadingDigest) for _, value in digests)
    # In event-time order; the century-ahead clock and the dead letter left out.
    assert em1.event_us == [at(0), at(1)]
    assert em1.values == [0.4, -1.0] and em1.faulty == [False, True]
    assert gm1.values == [None] and gm1.faulty == [True]  # MISSING_METRIC
    # The processor decodes them as sent: each meter's state ends at its latest reading.
    tester = TwsTester(detector(PROCESSING_TIME), timeMode=PROCESSING_TIME)
    tester.setProcessingTime(1_000)
    rows = pd.DataFrame({"device_id": ["em1", "gm1"], "value": [v for _, v in digests]})
    assert changes(tester.testInPandas(BUCKET, rows)) == []
    meters = stored_meters(tester)
    assert (meters["em1"].last_us, meters["gm1"].last_us) == (at(1), at(0))
    assert (meters["em1"].meter_type, meters["gm1"].meter_type) == ("electricity", "gas")


def test_water_flow_travels_in_the_digest_and_decides_stuck(tmp_path: Path) -> None:
    """A water meter's flow_rate reaches the detector: the same usage with a flow that
    agrees is a flow (no STUCK), with a flow of 0 a frozen register (STUCK). A constant
    load from the registry repeats without STUCK."""

    def water(device: str, flow: float) -> bytes:
        return b"".join(
            b'{"device_id": "%s", "timestamp": "2024-05-27T%02d:%02d:00Z", "usage": 2.0, '
            b'"flow_rate": %s}\n' % (device.encode(), i // 4, i % 4 * 15, str(flow).encode())
            for i in range(1, 13)
        )

    lines = (water("wm1", round(2.0 / 15, 3)) + water("wm2", 0.0)).splitlines()
    lines += [
        b'{"device_id": "em1", "timestamp": "2024-05-27T%02d:%02d:00Z", "usage_kwh": 0.5}'
        % (i // 4, i % 4 * 15)
        for i in range(1, 13)
    ]
    batch = kafka_records(lines, at(200))
    classified = pa.Table.from_batches([classify_batch(batch, thresholds.Rules()).classified])
    decoded = {
        key: messages.decode(value, messages.ReadingDigest)
        for key, value in reading_digests(classified)
    }
    assert decoded[b"wm1"].flows == [0.133] * 12 and decoded[b"wm2"].flows == [0.0] * 12
    assert decoded[b"em1"].flows is None  # only water sends a flow

    (tmp_path / "registry").mkdir()
    pq.write_table(
        pa.table(
            {
                "device_id": ["em1", "wm1", "wm2"],
                "interval_seconds": [STEP] * 3,
                "constant_load": [True, None, None],
            }
        ),
        tmp_path / "registry" / "meters.parquet",
    )
    profiles = load_profiles(str(tmp_path / "registry"), RULES)
    assert profiles["em1"].constant_load and not profiles["wm1"].constant_load
    tester = TwsTester(detector(PROCESSING_TIME, profiles=profiles), timeMode=PROCESSING_TIME)
    tester.setProcessingTime(1_000)
    rows = pd.DataFrame(
        {
            "device_id": [k.decode() for k in decoded],
            "value": [v for _, v in reading_digests(classified)],
        }
    )
    assert device_changes(tester.testInPandas(BUCKET, rows)) == [
        ("wm2", str(FaultCode.STUCK), OPEN)
    ]


def test_a_new_digest_topic_carries_the_state_over_and_a_new_clock_starts_afresh(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    """The checkpoint is per digest-topic id and clock. A fresh one starts from the newest
    committed checkpoint of its clock; one of the other clock is not carried over, which
    the log says."""
    from meterflow.stream.detection import query as detection

    topic_id = ["AaItG3tnf0KuPuo7aC8Mcw"]
    monkeypatch.setattr(detection.kafka, "topic_ids", lambda _b, ts: {t: topic_id[0] for t in ts})

    def plan(clock: str) -> detection.DetectionPlan:
        with caplog.at_level("WARNING", logger="meterflow.stream.detection"):
            planned = detection.plan_detection("b", "digest", str(tmp_path), clock)
        commits = Path(planned.checkpoint) / "commits"
        commits.mkdir(parents=True, exist_ok=True)  # what the query would write
        (commits / "0").write_text("v1")
        starts.append(planned.checkpoint)
        os.utime(commits / "0", (1_700_000_000 + len(starts),) * 2)  # one second per start
        return planned

    starts: list[str] = []

    first = plan("event")
    assert first.checkpoint == f"{tmp_path}/detector/event/digest-{topic_id[0]}"
    assert first.previous is None and caplog.records == []  # the first start ever
    assert plan("event") == first  # a restart: its own state, nothing carried
    topic_id[0] = "Bb/c+d"  # the topic was recreated
    recreated = plan("event")
    assert recreated.checkpoint.endswith("/detector/event/digest-Bb_c-d")
    assert recreated.previous == first.checkpoint and caplog.records == []
    assert plan("event").previous is None  # it committed: a restart of its own
    topic_id[0] = "Cc"
    other_clock = plan("processing")
    assert other_clock.checkpoint.endswith("/detector/processing/digest-Cc")
    assert other_clock.previous is None
    assert "reason=clock-changed" in caplog.records[-1].getMessage()
    topic_id[0] = "Dd"
    newest = plan("event")  # the newest committed checkpoint of the clock
    assert newest.previous == recreated.checkpoint


def learn(tester: TwsTester, meters: int, first: int) -> None:
    """One batch of two readings from each of ``meters`` meters, from interval ``first``."""
    readings = [(first, 0.4), (first + 1, 0.5)]
    tester.testInPandas(
        BUCKET, pd.concat([digest(*readings, device=f"em{m}") for m in range(meters)])
    )


def test_a_batch_writes_the_meters_it_heard_from_not_the_bucket() -> None:
    """The state of a bucket is a snapshot and deltas (docs/architecture.md, "Stateful
    detection"): a batch that hears from one meter of a hundred writes that meter alone,
    and the snapshot is taken again only once the deltas since outweigh it."""
    tester = event_time_tester()
    learn(tester, 100, 0)
    snapshot = tester.peekValueState("bucket", BUCKET)
    assert snapshot is not None and len(stored_meters(tester)) == 100
    tester.testInPandas(BUCKET, digest((2, 0.6), device="em7"))
    deltas = tester.peekMapState("deltas", BUCKET)
    head = Head(*tester.peekValueState("head", BUCKET))
    latest = msgspec.msgpack.decode(deltas[(head.seq,)][0], type=Delta)
    assert list(latest.meters) == ["em7"]
    assert tester.peekValueState("bucket", BUCKET) == snapshot  # not rewritten
    assert stored_meters(tester)["em7"].last_us == at(2)
    for i in range(3, 300):  # one meter at a time, until the deltas outweigh the snapshot
        tester.testInPandas(BUCKET, digest((i, 0.6 + i / 1000), device="em7"))
        if tester.peekValueState("bucket", BUCKET) != snapshot:
            break
    head = Head(*tester.peekValueState("head", BUCKET))
    assert head.base_seq == head.seq and 3 < i < 300
    assert (
        msgspec.msgpack.decode(tester.peekValueState("bucket", BUCKET)[0], type=Bucket).token
        == head.token
    )
    assert stored_meters(tester)["em7"].last_us == at(i)


def test_a_worker_uses_its_copy_only_if_it_is_the_committed_state() -> None:
    """Spark hands a bucket to any of its Python workers: a worker's copy that another
    worker's batches left behind catches up through their deltas, and a copy of a batch
    that never committed (same sequence number, another token) is read again."""
    reference, tester = event_time_tester(), event_time_tester()
    for t in (reference, tester):
        learn(t, 20, 0)
    copies = processor_module._COPIES
    (stale_key,) = [k for k in copies if k[0] == tester.processor.instance]
    stale = copy.deepcopy(copies[stale_key])
    for i in range(2, 2 + RULES.stuck_readings + 1):
        for t in (reference, tester):
            t.testInPandas(BUCKET, digest((i, 0.777), device="em1"))
        if i == 4:
            copies[stale_key] = copy.deepcopy(stale)  # this worker missed batches 2-4
    assert stored_meters(tester) == stored_meters(reference)
    assert stored_meters(tester)["em1"].stuck_open == at(2)
    # A copy from an attempt that failed: the committed sequence number, another token.
    head = Head(*tester.peekValueState("head", BUCKET))
    copies[stale_key] = processor_module._Copy(head.seq, head.token ^ 1, {}, {}, {})
    after = 2 + RULES.stuck_readings + 1
    cleared = tester.testInPandas(BUCKET, digest((after, 0.3), device="em1"))
    assert changes(cleared) == [(str(FaultCode.STUCK), CLEAR)]
    assert len(stored_meters(tester)) == 20


def test_a_bucket_written_before_the_delta_layout_is_read_and_continued() -> None:
    """A checkpoint of the former layout (the whole bucket in one value with its timer, no
    head) goes on where it was."""
    processor = detector(EVENT_TIME)
    tester = TwsTester(
        processor,
        timeMode=EVENT_TIME,
        eventTimeExtractor=lambda row: row["event_time"].value // 1_000_000,
    )
    state = MeterState(
        last_us=at(8), first_us=at(0), run_value=0.777, run_count=4, run_start_us=at(5)
    )
    state.meter_type = "electricity"
    old = msgspec.msgpack.encode([{"em1": state}, {"em1": 5}, 123])  # meters, arrived, timer
    tester.updateValueState("bucket", BUCKET, (old,))
    rest = [(i, 0.777) for i in range(9, 5 + RULES.stuck_readings)]
    opened = tester.testInPandas(BUCKET, digest(*rest))
    assert changes(opened) == [(str(FaultCode.STUCK), OPEN)]
    assert opened["start_us"].tolist() == [at(5)]
    assert stored_meters(tester)["em1"].run_count == RULES.stuck_readings
