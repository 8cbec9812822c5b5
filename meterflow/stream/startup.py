"""What the stream checks before its query starts: paths, the topic's generation, the ledger
and the checkpoint, reconciled into a :class:`StreamPlan`.

The ledger is the truth (docs/architecture.md, "Exactly once into the lake"): a new topic
generation is accepted only when the ledger holds what the old one was seen to have, and a
checkpoint ahead of the ledger is discarded, so the query always starts where the lake ends.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

import pyarrow.fs as pafs

from meterflow.clients import kafka
from meterflow.core import lake
from meterflow.core.config import Settings
from meterflow.core.errors import ConfigError
from meterflow.core.ledger import GENERATION, LOSS, Ledger, Range
from meterflow.core.logs import get_logger
from meterflow.stream import dataloss

log = get_logger(__name__)


def check_writable(settings: Settings) -> None:
    """One line naming the variable when a path the stream writes is not writable, or its
    disk is full (:class:`~meterflow.core.errors.DiskFullError`)."""
    for name, path in (
        ("METERFLOW_DATA_DIR", str(settings.data_dir)),  # the others default to inside it
        ("LAKE_PATH", settings.lake_path),
        ("CHECKPOINT_PATH", settings.checkpoint_path),
    ):
        try:
            with lake.full_as_error(name, path):
                lake.ensure_writable(path)
        except OSError as exc:
            raise ConfigError(
                f"{name}={path} is not writable ({lake.os_reason(exc)}): choose another path "
                "or fix its permissions"
            ) from None


def refuse_legacy_lake(lake_path: str) -> None:
    """A lake of meterflow 0.1 (Spark's file sink) would hide the ledger's files from readers."""
    legacy = posixpath.join(lake.readings_path(lake_path), "_spark_metadata")
    fs, path = lake.filesystem_for(legacy)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        raise ConfigError(
            f"{legacy} exists: this lake was written by meterflow 0.1, whose file-sink log "
            "hides newer files from readers. Start with an empty LAKE_PATH and CHECKPOINT_PATH"
        )


def checkpoint_ends(checkpoint: str) -> dict[int, int] | None:
    """Per partition, where the checkpoint's last committed batch ended (None: no checkpoint).

    Spark's offset log holds, per batch, a version line, a metadata line and one line per
    source with that source's offsets (``{"topic": {"partition": offset}}`` for Kafka).
    """
    fs, root = lake.filesystem_for(checkpoint)
    commits = fs.get_file_info(
        pafs.FileSelector(posixpath.join(root, "commits"), allow_not_found=True)
    )
    done = [int(i.base_name) for i in commits if i.base_name.isdigit()]
    if not done:
        return None
    with fs.open_input_stream(posixpath.join(root, "offsets", str(max(done)))) as stream:
        lines = stream.read().decode().splitlines()
    offsets = json.loads(lines[2])
    return {int(p): int(o) for parts in offsets.values() for p, o in parts.items()}


@dataclass(frozen=True)
class StreamPlan:
    """Where this start reads from: the topic's generation, checkpoint and first offsets."""

    generation: str
    checkpoint: str
    starting_offsets: str


def plan_start(settings: Settings, ledger: Ledger, accept_data_loss: bool) -> StreamPlan:
    """Reconcile the broker, the ledger and the checkpoint before the query starts.

    * A new topic generation (the topic was recreated, or the broker came back empty) is
      accepted silently only when the ledger holds everything the old one was seen to
      have; otherwise the unread ranges are a :class:`DataLossError` unless accepted.
    * The checkpoint lives per generation. One that is ahead of the ledger (the lake or
      its ledger were replaced) would skip offsets: it is discarded, and the query starts
      where the ledger ends.
    """
    topic = settings.topic_readings
    generation = kafka.topic_ids(settings.kafka, [topic])[topic]
    _accept_generation(ledger, topic, generation, accept_data_loss)
    root = settings.checkpoint_path.rstrip("/")
    checkpoint = posixpath.join(root, "streaming", generation_dir(topic, generation))
    ends = ledger.ends(topic, generation)
    read_to = checkpoint_ends(checkpoint)
    if read_to is not None and any(end > ends.get(p, 0) for p, end in read_to.items()):
        log.warning(
            "checkpoint=discarded reason=ahead-of-ledger checkpoint=%s ledger=%s path=%s",
            read_to,
            ends,
            checkpoint,
        )
        lake.delete_dir(checkpoint)
    if not ends:
        return StreamPlan(generation, checkpoint, settings.starting_offsets)
    client = kafka.consumer(settings.kafka)
    try:
        partitions = [p for _, p in kafka.topic_partitions(client, [topic])]
    finally:
        client.close()
    default = -2 if settings.starting_offsets == "earliest" else -1
    starting = {topic: {str(p): ends.get(p, default) for p in partitions}}
    return StreamPlan(generation, checkpoint, json.dumps(starting))


def _accept_generation(ledger: Ledger, topic: str, generation: str, accept_loss: bool) -> None:
    """Record a new generation of ``topic`` in the ledger, and what its predecessor lost."""
    known = ledger.generations.get(topic, [])
    if not known or generation in known:
        return
    previous = known[-1]
    unread = ledger.unread(topic, previous)
    if unread and not accept_loss:
        raise dataloss.never_read(topic, generation, previous, unread)
    if unread:
        ledger.commit(
            LOSS,
            [Range(topic, previous, p, a, b) for p, (a, b) in sorted(unread.items())],
            note="topic replaced before these offsets were read (accepted)",
        )
    ledger.commit(
        GENERATION,
        [Range(topic, generation, -1, 0, 0)],
        note=f"{topic} generation {previous} -> {generation}",
    )
    log.warning(
        "generation=new topic=%s previous=%s id=%s lost=%s",
        topic,
        previous,
        generation,
        dataloss.ranges_text(unread, topic) or "none",
    )


def generation_dir(topic: str, generation: str) -> str:
    """The directory name of a checkpoint of one topic generation: ``topic-id``."""
    # Topic ids are base64: '/' and '+' would nest or escape in a path.
    return f"{topic}-{generation.replace('/', '_').replace('+', '-')}"
