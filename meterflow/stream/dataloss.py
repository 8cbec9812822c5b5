"""Offsets gone from Kafka before the stream read them: the one-line stops and the flag.

Three ways to lose offsets reach the stream (docs/architecture.md, "Generations and data
loss"): a topic recreated before its tail was read, offsets deleted from a partition
(retention, a broker that lost data), and a source that found them gone while reading.
Each stops the stream with a :class:`DataLossError` naming the ranges and :data:`ACCEPT`,
which records them in the ledger as lost and goes on.
"""

from __future__ import annotations

from meterflow.core.errors import DataLossError

#: The command-line flag of ``meterflow stream`` and the streaming job that accepts a loss.
ACCEPT = "--accept-data-loss"


def ranges_text(ranges: dict[int, tuple[int, int]], topic: str) -> str:
    """``topic[p] first..last`` for each partition's ``[start, end)``, in partition order."""
    return ", ".join(f"{topic}[{p}] {a}..{b - 1}" for p, (a, b) in sorted(ranges.items()))


def never_read(
    topic: str, generation: str, previous: str, unread: dict[int, tuple[int, int]]
) -> DataLossError:
    """The topic was replaced while the old generation still held unread offsets."""
    return DataLossError(
        f"{topic} is a new topic (id {generation}, was {previous}): "
        f"{ranges_text(unread, topic)} were never read and are gone; {ACCEPT} "
        "records them as lost and reads the new topic from its start"
    )


def deleted_before_read(topic: str, gaps: dict[int, tuple[int, int]]) -> DataLossError:
    """A micro-batch began after the ledger's end: the offsets between were deleted."""
    return DataLossError(
        f"{ranges_text(gaps, topic)} were deleted from Kafka before the stream read "
        f"them (retention, or a broker that lost data); {ACCEPT} records them as "
        "lost in the ledger and continues"
    )


def gone_from_source(detail: str) -> DataLossError:
    """The Kafka source found offsets gone while it read them (``detail`` names them)."""
    return DataLossError(f"{detail}; {ACCEPT} records what is gone in the ledger and continues")
