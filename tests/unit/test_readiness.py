"""When a day's lake partition is complete: the stream's watermark document and the decision
the daily DAG's sensor takes from it (docs/architecture.md, "The low watermark")."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import pytest

from meterflow.batch import readiness
from meterflow.batch.readiness import partition_complete
from meterflow.core import lake
from meterflow.core.lake import StreamWatermark

TOPIC = "iot-meter"
G1, G2 = "generation-one", "generation-two"
DAY = date(2024, 6, 2)
INTERVAL, GRACE = 900, 7200


def stream(
    watermark: datetime | None,
    written_at: datetime | None,
    generation: str = G1,
    **fields: object,
) -> StreamWatermark:
    """A document a stream on ``generation`` wrote at ``written_at``, caught up, confirmed."""
    state = StreamWatermark(
        watermark=watermark,
        topic=TOPIC,
        generation=generation,
        offsets={0: 100, 1: 80},
        seen={0: 100, 1: 80},
        confirmed=True,
        written_at=written_at,
    )
    return replace(state, **fields)


def at(day: int, hour: int = 0, minute: int = 0, month: int = 6) -> datetime:
    return datetime(2024, month, day, hour, minute, tzinfo=UTC)


# What the sensor decided before the generation mattered, on the topic's current generation.
@pytest.mark.parametrize(
    ("watermark", "written_at", "now", "expected"),
    [
        (None, None, at(3, 1), False),  # no watermark, within grace
        (None, None, at(3, 2), True),  # grace (2 h) has passed
        (at(3, 0, 10), at(3, 0, 11), at(3, 0, 11), False),
        (at(3, 0, 15), at(3, 0, 16), at(3, 0, 16), True),
        # A live stream backfilling the day: its watermark decides, not the grace period.
        (at(2, 8, 15), at(30, 9, 0, month=11), at(30, 9, 1, month=11), False),
        # A stream that has just started and committed nothing yet: wait for it.
        (None, at(30, 9, 0, month=11), at(30, 9, 1, month=11), False),
        # A stream stopped for longer than the grace period: the grace period decides.
        (at(2, 8, 15), at(2, 8, 20), at(3, 3, 0), True),
    ],
)
def test_partition_is_complete_after_watermark_or_grace(
    watermark: datetime | None, written_at: datetime | None, now: datetime, expected: bool
) -> None:
    document = stream(watermark, written_at) if written_at else StreamWatermark()
    done, why = partition_complete(DAY, document, TOPIC, G1, now, INTERVAL, GRACE, "UTC")
    assert done is expected, why


def test_a_watermark_of_the_old_topic_waits_for_the_new_ones_backfill(tmp_path: Path) -> None:
    """Issue: after a plain run, `meterflow run --airflow` on a new broker published
    yesterday as no_data: the sensor trusted the watermark the previous run had left,
    while yesterday was still being backfilled into the new topic."""
    lake_path = str(tmp_path / "lake")
    midnight = datetime.combine(date.today(), time(), tzinfo=UTC)
    yesterday = midnight.date() - timedelta(days=1)
    # The previous run read G1 up to this morning, then stopped.
    lake.advance_watermark(lake_path, TOPIC, G1, midnight + timedelta(hours=8), {}, {0: 5}, {})

    def decide() -> tuple[bool, str]:
        document = lake.read_stream_watermark(lake_path)
        now = datetime.now(UTC)
        return partition_complete(yesterday, document, TOPIC, G2, now, INTERVAL, GRACE, "UTC")

    lake.watermark_started(lake_path)  # meterflow run --airflow, before the stream starts
    done, why = decide()
    assert not done and f"is for {TOPIC} generation {G1}" in why, why

    lake.watermark_started(lake_path, TOPIC, G2)  # the stream starts on the new broker
    assert lake.read_watermark(lake_path) is None
    done, why = decide()
    assert not done and why.endswith(f"not committed since, day ends {midnight.isoformat()}"), why

    # The backfill of yesterday is being read: the watermark moves through the day.
    for hours in (-16, -0.25, 0.1):
        offsets = {0: 1000}
        watermark = midnight + timedelta(hours=hours)
        lake.advance_watermark(lake_path, TOPIC, G2, watermark, {}, offsets, offsets)
        assert not decide()[0], watermark

    # One interval past midnight on every partition: yesterday is complete.
    watermark = midnight + timedelta(seconds=INTERVAL)
    lake.advance_watermark(lake_path, TOPIC, G2, watermark, {}, {0: 2000}, {0: 2000})
    done, why = decide()
    assert done and why.startswith(f"stream watermark {watermark.isoformat()}"), why


def test_a_watermark_without_the_readings_it_speaks_for_waits() -> None:
    now = at(3, 9)
    past = at(3, 8)

    def decide(document: StreamWatermark, generation: str | None = G1) -> tuple[bool, str]:
        return partition_complete(DAY, document, TOPIC, generation, now, INTERVAL, GRACE, "UTC")

    assert decide(stream(past, now))[0]
    # Offsets the broker was seen to hold that the lake does not (a throttled catch-up).
    done, why = decide(stream(past, now, seen={0: 100, 1: 95}))
    assert not done and f"has not read {TOPIC}[1] 80..94" in why, why
    # Restarted on the same topic: the kept value counts once a commit confirms it.
    done, why = decide(stream(past, now, confirmed=False))
    assert not done and "(re)started" in why, why
    # Another topic's document, or one of a meterflow before generations.
    assert not decide(stream(past, now, topic="other-topic"))[0]
    done, why = decide(stream(past, now, topic=None, generation=None))
    assert not done and "older meterflow" in why, why
    # Kafka does not answer: nothing is trusted, not even the grace period.
    stopped = stream(past, at(2, 8), generation=G2)
    done, why = decide(stopped, None)
    assert not done and "is Kafka up?" in why, why
    assert decide(stopped, G1)[0]  # once Kafka answers: the stream is stopped, grace applies


def test_the_watermark_never_moves_back_within_a_generation(tmp_path: Path) -> None:
    lake_path = str(tmp_path / "lake")
    lake.advance_watermark(lake_path, TOPIC, G1, at(3, 8), {}, {0: 10}, {})
    kept = lake.advance_watermark(lake_path, TOPIC, G1, at(3, 7), {}, {0: 12}, {0: 12})
    assert (kept.watermark, kept.offsets, kept.seen) == (at(3, 8), {0: 12}, {0: 12})
    restarted = lake.watermark_started(lake_path, TOPIC, G1)
    assert (restarted.watermark, restarted.offsets, restarted.confirmed) == (
        at(3, 8),
        {0: 12},
        False,
    )
    assert lake.read_stream_watermark(lake_path) == restarted
    # A new generation starts from its own readings, lower or not.
    assert lake.watermark_started(lake_path, TOPIC, G2).watermark is None
    fresh = lake.advance_watermark(lake_path, TOPIC, G2, at(2, 1), {}, {0: 3}, {})
    assert (fresh.watermark, fresh.generation, fresh.confirmed) == (at(2, 1), G2, True)
    assert lake.read_stream_watermark(lake_path) == fresh


def test_a_document_of_an_older_version_is_read_but_never_counts(tmp_path: Path) -> None:
    lake_path = str(tmp_path / "lake")
    path = Path(lake.watermark_path(lake_path))
    path.parent.mkdir(parents=True)
    written = at(3, 8, 1)
    path.write_text(
        json.dumps(
            {"watermark": at(3, 8).isoformat(), "partitions": {}, "written_at": written.isoformat()}
        )
    )
    document = lake.read_stream_watermark(lake_path)
    assert (document.watermark, document.written_at, document.generation) == (
        at(3, 8),
        written,
        None,
    )
    assert not partition_complete(DAY, document, TOPIC, G1, at(3, 9), INTERVAL, GRACE, "UTC")[0]


def test_kafka_away_is_waited_for_with_one_log_line(
    tmp_path: Path, free_port: int, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    monkeypatch.setattr(readiness, "KAFKA_TIMEOUT_S", 1.0)
    lake_path = str(tmp_path / "lake")
    lake.advance_watermark(lake_path, TOPIC, G1, datetime.now(UTC), {}, {0: 1}, {})
    with caplog.at_level(logging.WARNING, logger="meterflow.batch.readiness"):
        done, why = readiness.day_readiness(
            lake_path,
            f"127.0.0.1:{free_port}",
            TOPIC,
            date.today() - timedelta(days=2),
            900,
            1,
            "UTC",
        )
    assert not done and "is Kafka up?" in why, why
    lines = [r.getMessage() for r in caplog.records if "readiness=waiting" in r.getMessage()]
    assert len(lines) == 1 and "reason=kafka-unavailable" in lines[0], lines


def test_a_local_day_ends_at_its_local_midnight() -> None:
    """June 2 in Paris (UTC+2) ends at 22:00 UTC: its closing reading comes hours earlier."""
    document = stream(at(2, 22, 15), at(2, 22, 16))
    now = at(2, 22, 16)
    done, why = partition_complete(DAY, document, TOPIC, G1, now, INTERVAL, GRACE, "Europe/Paris")
    assert done and "2024-06-02T22:00:00+00:00" in why, why
    assert not partition_complete(DAY, document, TOPIC, G1, now, INTERVAL, GRACE, "UTC")[0]
    # A watermark on the local midnight itself has not seen the reading after it yet.
    early = stream(at(2, 22, 0), at(2, 22, 1))
    assert not partition_complete(DAY, early, TOPIC, G1, now, INTERVAL, GRACE, "Europe/Paris")[0]
