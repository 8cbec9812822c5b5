"""When a day's lake partition is complete: the question the daily DAG's sensor asks.

The stream's watermark answers it, but only for the readings it was computed from: the
readings topic's generation it was written for, and the offsets the stream had read
(docs/architecture.md, "The low watermark"). :func:`partition_complete` decides from plain
values; :func:`day_readiness` gathers them (the lake's watermark document, the topic's
current id from Kafka) for ``LakePartitionCompleteSensor``.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from meterflow.clients import kafka
from meterflow.core.lake import StreamWatermark, read_stream_watermark
from meterflow.core.logs import get_logger
from meterflow.core.timestamps import day_bounds

log = get_logger("meterflow.batch.readiness")

#: How long one poke waits for Kafka to describe the readings topic.
KAFKA_TIMEOUT_S = 10.0


def _unusable(stream: StreamWatermark, topic: str, generation: str) -> str | None:
    """Why the stream's watermark does not speak for ``topic``'s ``generation`` now."""
    if stream.written_at is None:
        return "no stream watermark yet"
    if (stream.topic, stream.generation) != (topic, generation):
        written_for = (
            f"{stream.topic} generation {stream.generation}"
            if stream.generation
            else "an older meterflow's lake (no generation)"
        )
        return (
            f"the stream's watermark is for {written_for}; {topic} is now generation "
            f"{generation} (a new broker or a recreated topic), which the stream has yet to read"
        )
    if not stream.confirmed:
        return "the stream has (re)started and not committed since"
    unread = stream.unread()
    if unread:
        ranges = ", ".join(f"{topic}[{p}] {a}..{b - 1}" for p, (a, b) in unread.items())
        return f"the stream has not read {ranges} yet"
    return None


def partition_complete(
    day: date,
    stream: StreamWatermark,
    topic: str,
    generation: str | None,
    now: datetime,
    interval_s: int,
    grace_s: int,
    zone_name: str,
) -> tuple[bool, str]:
    """Whether ``day`` (a local date in ``zone_name``) can be aggregated, and why.

    Complete when the stream's low watermark has moved one reading interval past the
    day's end (its local midnight, whose reading closes the day), and that watermark is
    for ``generation``, the readings topic's current id (None: Kafka did not say, so
    nothing is trusted), written by a commit since the stream started, with every offset
    the broker was seen to hold read. The grace period after
    the day's end stands in for the watermark only when no stream has written one for a
    whole grace period (none runs, or it stopped): a stream that has started, or is still
    catching up on the day, as during a backfill, is waited for.
    """
    end = day_bounds(day, zone_name)[1]
    if generation is None:
        return False, (
            f"waiting: Kafka did not say which generation of {topic} is current, so the "
            "stream's watermark cannot be trusted (is Kafka up?)"
        )
    unusable = _unusable(stream, topic, generation)
    watermark = stream.watermark
    if (
        unusable is None
        and watermark is not None
        and watermark >= end + timedelta(seconds=interval_s)
    ):
        return True, f"stream watermark {watermark.isoformat()} is past {end.isoformat()}"
    written_at = stream.written_at
    stream_live = written_at is not None and now - written_at < timedelta(seconds=grace_s)
    if now >= end + timedelta(seconds=grace_s) and not stream_live:
        why = "no stream watermark" if written_at is None else "the stream is stopped"
        return True, f"grace period of {grace_s}s after {end.isoformat()} has passed ({why})"
    if unusable is None:
        seen = watermark.isoformat() if watermark else "none yet"
        unusable = f"stream watermark {seen}"
    return False, f"waiting: {unusable}, day ends {end.isoformat()}"


def current_generation(bootstrap_servers: kafka.Cluster, topic: str) -> str | None:
    """``topic``'s Kafka id now, or None (logged with Kafka's reason) when Kafka does not say."""
    try:
        return kafka.topic_ids(bootstrap_servers, [topic], timeout=KAFKA_TIMEOUT_S)[topic]
    except kafka.KafkaUnavailableError as exc:
        log.warning("readiness=waiting topic=%s reason=kafka-unavailable error=%s", topic, exc)
        return None


def day_readiness(
    lake_path: str,
    bootstrap_servers: kafka.Cluster,
    topic: str,
    day: date,
    interval_s: int,
    grace_s: int,
    zone_name: str,
) -> tuple[bool, str]:
    """:func:`partition_complete` for ``day`` with the lake's watermark and Kafka's topic id."""
    return partition_complete(
        day,
        read_stream_watermark(lake_path),
        topic,
        current_generation(bootstrap_servers, topic),
        datetime.now(UTC),
        interval_s,
        grace_s,
        zone_name,
    )
