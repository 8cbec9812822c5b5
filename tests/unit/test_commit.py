"""A micro-batch's commit, the parts that need no Spark (docs/architecture.md, "Exactly once
into the lake" and "The low watermark"): the tasks' summaries merged per partition, the
offsets Kafka deleted before they were read, and the low watermark from the ledger's
partition states and the clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

from meterflow.core import lake
from meterflow.core.ledger import Ledger, PartitionState
from meterflow.stream.commit import (
    Watermark,
    advance_watermark,
    find_gaps,
    low_watermark,
    merge_summaries,
)
from meterflow.stream.tasks import Tally, summary_row

NOW = datetime(2024, 5, 28, 12, 0, tzinfo=UTC)
IDLE_S = 120.0


def summary(partition: int, first: int, last: int, **counts: object) -> SimpleNamespace:
    """One task's summary row for one partition, as the tasks return it."""
    return SimpleNamespace(**summary_row(partition=partition, first=first, last=last, **counts))


def us(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def state(newest: datetime | None, data_at: datetime | None) -> PartitionState:
    return PartitionState(
        max_event_us=None if newest is None else us(newest),
        last_data_at=None if data_at is None else data_at.isoformat(),
    )


def test_a_partition_split_over_tasks_merges_into_one_tally() -> None:
    rows = [
        summary(0, 10, 19, valid=9, abnormal=1, max_event_us=5, files='["a.parquet"]'),
        summary(0, 0, 9, valid=8, deadletter=2, max_event_us=7, unpublished=1),
        summary(1, -1, -1, skipped=4),  # everything already in the ledger
    ]
    outcome = merge_summaries(rows)
    zero, one = outcome.tallies[0], outcome.tallies[1]
    assert (zero.first, zero.last, zero.valid, zero.abnormal, zero.deadletter) == (0, 19, 17, 1, 2)
    assert zero.max_event_us == 7
    assert (one.first, one.skipped) == (-1, 4)
    assert outcome.files == ["a.parquet"] and outcome.unpublished == 1
    ranges = outcome.ranges("t", "g")
    assert [(r.partition, r.start, r.end, r.valid) for r in ranges] == [(0, 0, 20, 17)]
    counts = outcome.counts({0: (3, 5)})
    assert counts == {
        "read": 20,
        "valid": 17,
        "abnormal": 1,
        "deadletter": 2,
        "skipped": 4,
        "lost": 2,
        "unpublished": 1,
    }


def test_a_gap_is_what_lies_between_the_ledgers_end_and_the_batch() -> None:
    tallies = {0: Tally(first=50, last=60), 1: Tally(first=10, last=12), 2: Tally(first=0)}
    tallies[3] = Tally(first=-1, skipped=3)
    ends = {0: 40, 1: 10, 3: 7}  # partition 2 is new to the ledger: nothing is missing
    assert find_gaps(tallies, ends) == {0: (40, 50)}


def test_the_low_watermark_is_the_oldest_of_the_partitions_still_bringing_data() -> None:
    states = {
        0: state(NOW - timedelta(hours=2), NOW - timedelta(seconds=10)),
        1: state(NOW - timedelta(hours=1), NOW - timedelta(seconds=5)),
        2: state(NOW - timedelta(hours=5), NOW - timedelta(seconds=IDLE_S + 1)),  # idle
        3: state(None, None),  # no reading yet
    }
    watermark = low_watermark(states, NOW, IDLE_S)
    assert watermark is not None
    assert watermark.low == NOW - timedelta(hours=2)
    assert watermark.partitions == {
        "0": (NOW - timedelta(hours=2)).isoformat(),
        "1": (NOW - timedelta(hours=1)).isoformat(),
        "2": (NOW - timedelta(hours=5)).isoformat(),
    }


def test_when_every_partition_is_idle_the_newest_counts_and_never_after_now() -> None:
    idle = NOW - timedelta(seconds=IDLE_S + 1)
    states = {0: state(NOW - timedelta(hours=3), idle), 1: state(NOW - timedelta(hours=1), idle)}
    assert low_watermark(states, NOW, IDLE_S) == Watermark(
        NOW - timedelta(hours=1),
        {"0": (NOW - timedelta(hours=3)).isoformat(), "1": (NOW - timedelta(hours=1)).isoformat()},
    )
    future = {0: state(NOW + timedelta(days=1), NOW)}
    assert low_watermark(future, NOW, IDLE_S).low == NOW  # type: ignore[union-attr]
    assert low_watermark({0: state(None, NOW)}, NOW, IDLE_S) is None


def test_the_watermark_written_names_its_generation_and_never_moves_backwards(
    tmp_path: Path,
) -> None:
    lake_path = str(tmp_path / "lake")
    ledger = Ledger.load(lake_path)
    advance_watermark(lake_path, "meter", "gen1", Watermark(NOW, {"0": NOW.isoformat()}), ledger)
    earlier = Watermark(NOW - timedelta(hours=1), {"0": "earlier"})
    advance_watermark(lake_path, "meter", "gen1", earlier, ledger)
    assert lake.read_watermark(lake_path) == NOW
    written = lake.read_stream_watermark(lake_path)
    assert (written.topic, written.generation, written.confirmed) == ("meter", "gen1", True)
    later = NOW + timedelta(minutes=5)
    advance_watermark(
        lake_path, "meter", "gen1", Watermark(later, {"0": later.isoformat()}), ledger
    )
    assert lake.read_watermark(lake_path) == later


def test_a_watermark_that_cannot_be_written_is_a_warning_not_a_stop(tmp_path: Path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with caplog.at_level("WARNING", logger="meterflow.stream.commit"):
        advance_watermark(
            str(blocker), "meter", "gen1", Watermark(NOW, {}), Ledger.load(str(tmp_path / "lake"))
        )
    assert "watermark=unwritten" in caplog.text
