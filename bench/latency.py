"""Alarm latency: a reading's produce to its abnormal event, MongoDB document and lake row.

The stream runs as ``meterflow run`` runs it (the Python Kafka source, the stateful stage
on, in processing time, unless ``--detection off``; the trigger is ``--trigger``) in this
process, beside the real sink
writing to MongoDB: ``MONGO_URI`` if set, else the local ``nx-27017`` stand-in (the results
name which). A producer offers each load (readings/s of a 10,000-meter fleet, one message
per meter in turn, a new value each round, 1% of them the meter's own fault signal, -1)
for ``--seconds`` after a warm-up, and the benchmark times, from each reading's produce
(its Kafka timestamp):

* (a) its abnormal event on ``iot-abnormal`` (every abnormal reading);
* (b) its document in MongoDB's ``abnormal_readings`` (a sample: about 20 a second,
  looked up by id every 50 ms);
* (c) its row being visible in the lake: the lake's ledger committing its offset (looked at
  every 100 ms).

Each load reports p50, p95, p99 and max, where each query's micro-batches spent their
time (Spark's progress reports: the mean of each phase over the load's batches), and how
many cores each part of the benchmark used meanwhile: Spark, the broker, MongoDB's stand-in
and this process (the offered load, the sink, the probes) share the machine. Before the
loads, the target load runs for each ``--tradeoffs`` pair, on topics of its own, the stream
restarted with that trigger and stateful stage: what a shorter or longer trigger costs and
gives. Target
(issue "Performance at city scale") at 10,000 readings/s on 2 cores: p99 produce ->
``iot-abnormal`` at most 2 s and produce -> MongoDB at most 3 s.

    python -m bench.latency [--loads 1000,10000,50000] [--seconds 120] [--trigger 1]
                            [--detection on|off] [--tradeoffs 0.5:on,5:on,1:off]
                            [--tradeoff-seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil  # type: ignore[import-untyped]

from bench.common import local_broker, write_results
from meterflow.clients import kafka
from meterflow.core import messages
from meterflow.core.config import Settings
from meterflow.core.events import event_id
from meterflow.core.ledger import Ledger
from meterflow.core.logs import setup_logging
from meterflow.core.timestamps import format_timestamp_us

TARGET_ABNORMAL_P99_S = 2.0
TARGET_MONGO_P99_S = 3.0
TARGET_LOAD = 10_000
METERS = 10_000
ABNORMAL_EVERY = 100  # one reading in a hundred is the meter's fault signal
MONGO_SAMPLES_PER_S = 20
WARMUP_S = 20.0


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    found = np.asarray(values)
    return {
        "p50": round(float(np.percentile(found, 50)), 3),
        "p95": round(float(np.percentile(found, 95)), 3),
        "p99": round(float(np.percentile(found, 99)), 3),
        "max": round(float(found.max()), 3),
    }


class Offered:
    """Produces readings at a fixed rate and keeps each one's produce time by offset."""

    def __init__(self, settings: Settings) -> None:
        self.topic = settings.topic_readings
        self.producer = kafka.producer(settings.kafka, **{"linger.ms": 5})
        self.produced_ms: dict[int, dict[int, int]] = {}  # partition -> offset -> ms
        self.abnormal: list[tuple[int, int]] = []  # (partition, offset) of fault signals
        self.failed = 0
        self.sent = 0

    def _delivered(self, error: Any, message: Any) -> None:
        if error is not None:
            self.failed += 1
            return
        partition, offset = message.partition(), message.offset()
        self.produced_ms.setdefault(partition, {})[offset] = message.timestamp()[1]
        if message.value().endswith(b'"usage_kwh": -1}'):
            self.abnormal.append((partition, offset))

    def offer(self, rate: int, seconds: float) -> None:
        """``rate`` readings a second for ``seconds``: every 10 ms, what is due by then."""
        started, first = time.monotonic(), self.sent
        while (elapsed := time.monotonic() - started) < seconds:
            stamp = format_timestamp_us(int(time.time() * 1e6))
            while self.sent - first < rate * elapsed:
                device = f"em{self.sent % METERS:05d}"
                # A new value each round of the fleet: nothing looks STUCK.
                value = -1 if self.sent % ABNORMAL_EVERY == 0 else 0.2 + self.sent // METERS % 9
                body = f'{{"device_id": "{device}", "timestamp": "{stamp}", "usage_kwh": {value}}}'
                try:
                    self.producer.produce(
                        self.topic, body.encode(), device.encode(), on_delivery=self._delivered
                    )
                except BufferError:  # the broker falls behind: what it takes is offered
                    self.producer.poll(0.05)
                    break
                self.sent += 1
            self.producer.poll(0)
            time.sleep(0.01)
        self.producer.flush(60)


def watch_events(
    settings: Settings, seen: dict[tuple[int, int], float], stop: threading.Event
) -> None:
    """Each abnormal event's arrival time on ``iot-abnormal``, by its source offset: from
    each partition's end as found now (assigned, no group to join first)."""
    from confluent_kafka import TopicPartition

    topic = settings.topic_abnormal
    consumer = kafka.consumer(settings.kafka, **{"enable.partition.eof": True})
    ends = kafka.partition_ends(consumer, kafka.topic_partitions(consumer, [topic]))
    consumer.assign([TopicPartition(topic, p, end) for (_, p), end in ends.items()])
    try:
        while not stop.is_set():
            for message in consumer.consume(1000, 0.05):
                if message.error() is not None:  # the end of a partition, for now
                    continue
                arrived = time.time()
                event = messages.decode(message.value(), messages.AbnormalEvent)
                if event.source is not None:
                    seen.setdefault((event.source.partition, event.source.offset), arrived)
    finally:
        consumer.close()


def watch_lake(
    lake_path: str, topic: str, visible: dict[int, list[tuple[int, float]]], stop: threading.Event
) -> None:
    """When each partition of ``topic`` saw its committed end move: ``visible[partition]``
    of (end, time)."""
    while not stop.is_set():
        try:
            ledger = Ledger.load(lake_path)
        except FileNotFoundError:  # not written yet, or compacted while listed
            time.sleep(0.1)
            continue
        now = time.time()
        for (read_from, _, partition), state in ledger.partitions.items():
            if read_from != topic:
                continue
            end = max((s.end for s in state.segments if not s.lost), default=0)
            known = visible.setdefault(partition, [])
            if not known or known[-1][0] < end:
                known.append((end, now))
        time.sleep(0.1)


def watch_mongo(
    db: Any,
    pending: Callable[[], list[tuple[str, int]]],
    found: dict[str, float],
    stop: threading.Event,
) -> None:
    """When each sampled event's document appears in ``abnormal_readings``."""
    collection = db["abnormal_readings"]
    while not stop.is_set():
        wanted = [i for i, _ in pending() if i not in found]
        if wanted:
            now = time.time()
            for document in collection.find({"_id": {"$in": wanted[:200]}}, {"_id": 1}):
                found.setdefault(document["_id"], now)
        time.sleep(0.05)


def batch_profile(queries: list[Any], since: float) -> dict[str, dict[str, Any]]:
    """Per streaming query, its micro-batches that started after ``since`` (epoch s): how
    many, their mean rows, and the mean milliseconds of each phase Spark reports
    (``latestOffset``: asking the source for its ends; ``addBatch``: the batch's tasks and,
    for the lake query, its ledger commit; ``walCommit``/``commitOffsets``: the checkpoint)."""
    profile: dict[str, dict[str, Any]] = {}
    for query in queries:
        batches = [
            p
            for p in query.recentProgress
            if p.numInputRows
            and datetime.fromisoformat(p.timestamp.replace("Z", "+00:00")).timestamp() >= since
        ]
        if not batches:
            continue
        phases = sorted({name for p in batches for name in p.durationMs})
        profile[query.name] = {
            "batches": len(batches),
            "rows_per_batch": round(sum(p.numInputRows for p in batches) / len(batches)),
            "mean_ms": {
                name: round(sum(p.durationMs.get(name, 0) for p in batches) / len(batches))
                for name in phases
            },
        }
    return profile


def _part(command: list[str], pid: int) -> str:
    """Which part of the benchmark a process is, by what it runs."""
    if pid == os.getpid():
        return "bench"
    if Path(command[0]).name == "java" or any("pyspark" in arg for arg in command):
        return "spark"  # the JVM, its Python workers and data source runners
    if any("tansu" in arg for arg in command):
        return "broker"
    if any("nx-27017" in arg for arg in command):
        return "mongodb"
    return "other"


#: A process's CPU seconds by (pid, start time), with its part; ``None`` holds the machine's.
CpuSnapshot = dict[tuple[int, float] | None, tuple[str, float]]


def cpu_seconds() -> CpuSnapshot:
    """CPU seconds used so far by each process and its reaped children, with its part of
    the benchmark: ``spark`` (the JVM and its Python workers), ``broker``, ``mongodb``
    (the stand-in, when local), ``bench`` (this process: the offered load, the sink and the
    probes) or ``other``; and the machine's, from the kernel's counters."""
    used: CpuSnapshot = {}
    for process in psutil.process_iter(["cmdline", "cpu_times", "create_time"]):
        command, times = process.info["cmdline"], process.info["cpu_times"]
        if not command or times is None:
            continue  # a kernel thread, or ended meanwhile
        spent = times.user + times.system + times.children_user + times.children_system
        key = (process.pid, process.info["create_time"])
        used[key] = (_part(command, process.pid), spent)
    total = psutil.cpu_times()
    used[None] = ("machine", sum(total) - total.idle - total.iowait - total.steal)
    return used


def cores_used(before: CpuSnapshot, after: CpuSnapshot, seconds: float) -> dict[str, float]:
    """Mean cores each part used between two :func:`cpu_seconds`, per process (one that
    ended meanwhile, such as an idle Python worker Spark stopped, takes its time with it);
    ``rest`` is what the processes' counters miss (an ended process's last seconds, the
    kernel)."""
    spent: dict[str, float] = {}
    for key, (part, seconds_after) in after.items():
        if key is not None:
            earlier = before.get(key, (part, 0.0))[1]
            spent[part] = spent.get(part, 0.0) + seconds_after - earlier
    cores = {part: round(used / seconds, 2) for part, used in spent.items()}
    machine = (after[None][1] - before[None][1]) / seconds
    cores["rest"] = round(max(0.0, machine - sum(spent.values()) / seconds), 2)
    return cores


def measure_load(
    settings: Settings,
    rate: int,
    seconds: float,
    generation: str,
    db: Any,
    queries: Callable[[], list[Any]] = list,
) -> dict[str, Any]:
    """One load: the producer offers it while the watchers time the three paths."""
    offered = Offered(settings)
    began = time.time()
    stop = threading.Event()
    events: dict[tuple[int, int], float] = {}
    visible: dict[int, list[tuple[int, float]]] = {}
    documents: dict[str, float] = {}
    sampled: list[tuple[str, int]] = []  # (event id, produce ms)

    def sample() -> list[tuple[str, int]]:
        step = max(1, rate // ABNORMAL_EVERY // MONGO_SAMPLES_PER_S)
        for partition, offset in offered.abnormal[len(sampled) * step :: step]:
            produced = offered.produced_ms[partition][offset]
            sampled.append(
                (event_id(settings.topic_readings, generation, partition, offset), produced)
            )
        return sampled

    watchers = [
        threading.Thread(target=watch_events, args=(settings, events, stop), daemon=True),
        threading.Thread(
            target=watch_lake,
            args=(settings.lake_path, settings.topic_readings, visible, stop),
            daemon=True,
        ),
        threading.Thread(target=watch_mongo, args=(db, sample, documents, stop), daemon=True),
    ]
    for watcher in watchers:
        watcher.start()
    cpu_before, offering = cpu_seconds(), time.monotonic()
    offered.offer(rate, seconds)
    cores = cores_used(cpu_before, cpu_seconds(), time.monotonic() - offering)
    last_produced = time.time()
    wanted = {(p, o) for p, o in offered.abnormal}
    deadline = last_produced + 120
    while time.time() < deadline:
        caught_up = wanted <= events.keys() and all(
            visible.get(p, [(0, 0.0)])[-1][0] > max(offsets)
            for p, offsets in offered.produced_ms.items()
        )
        if caught_up and all(i in documents for i, _ in sample()):
            break
        time.sleep(0.2)
    stop.set()
    for watcher in watchers:
        watcher.join(10)

    abnormal_s = [
        events[key] - offered.produced_ms[key[0]][key[1]] / 1e3
        for key in offered.abnormal
        if key in events
    ]
    mongo_s = [documents[i] - produced / 1e3 for i, produced in sampled if i in documents]
    lake_s: list[float] = []
    for partition, produced in offered.produced_ms.items():
        moves = visible.get(partition, [])
        ends = np.array([end for end, _ in moves])
        times = np.array([at for _, at in moves])
        offsets = np.fromiter(produced.keys(), dtype=np.int64)
        produced_s = np.fromiter(produced.values(), dtype=np.float64) / 1e3
        where = np.searchsorted(ends, offsets, side="right")  # first end past the offset
        seen = where < len(ends)
        lake_s += (times[where[seen]] - produced_s[seen]).tolist()
    abnormal, mongo, lake = _percentiles(abnormal_s), _percentiles(mongo_s), _percentiles(lake_s)
    return {
        "rate": rate,
        "offered": offered.sent,
        "offered_per_s": round(offered.sent / seconds),
        "failed_produces": offered.failed,
        "abnormal_events": len(offered.abnormal),
        "abnormal_seen": len(abnormal_s),
        "mongo_samples": len(sampled),
        "mongo_seen": len(mongo_s),
        "lake_seen": len(lake_s),
        **{f"abnormal_{k}_s": v for k, v in abnormal.items()},
        **{f"mongo_{k}_s": v for k, v in mongo.items()},
        **{f"lake_{k}_s": v for k, v in lake.items()},
        "cores_used": cores,
        "micro_batches": batch_profile(queries(), began),
    }


class Stream:
    """The stream of ``meterflow run`` in a thread of this process, on ``spark``, until
    :meth:`stop`; started again with other settings for each trade-off row."""

    def __init__(self, spark: Any, settings: Settings) -> None:
        from meterflow.stream.supervisor import run

        self.stopping = threading.Event()
        self.thread = threading.Thread(
            target=run,
            kwargs={"settings": settings, "spark": spark, "stop": self.stopping},
            daemon=True,
        )
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(120)


def parse_tradeoffs(text: str) -> list[tuple[float, str]]:
    """``"0.5:on,5:on,1:off"`` as (trigger seconds, detection) pairs."""
    pairs = [item.split(":") for item in text.split(",") if item]
    return [(float(trigger), detection) for trigger, detection in pairs]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", default="1000,10000,50000", help="readings/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=120.0, help="per load")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument(
        "--trigger", type=float, default=1.0, help="METERFLOW_TRIGGER_SECONDS of the stream"
    )
    parser.add_argument(
        "--detection", choices=("on", "off"), default="on", help="the stateful stage"
    )
    parser.add_argument(
        "--tradeoffs",
        default="0.5:on,5:on,1:off",
        help="trigger:detection pairs, each run at the target load before the loads",
    )
    parser.add_argument("--tradeoff-seconds", type=float, default=60.0, help="per trade-off")
    args = parser.parse_args()
    loads = [int(x) for x in args.loads.split(",")]
    tradeoffs = parse_tradeoffs(args.tradeoffs)
    setup_logging("WARNING")
    from meterflow.clients.mongo import database
    from meterflow.local.mongo import mongo_for
    from meterflow.local.service import free_port
    from meterflow.serving.sink import Sink
    from meterflow.spark.session import get_spark
    from meterflow.stream.supervisor import stream_spark_conf

    workdir = Path(tempfile.mkdtemp(prefix="meterflow-bench-latency-"))
    results: list[dict[str, Any]] = []
    traded: list[dict[str, Any]] = []
    try:
        with local_broker(workdir) as bootstrap:
            env = {
                "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                "METERFLOW_KAFKA_PARTITIONS": str(args.partitions),
                "METERFLOW_KAFKA_SOURCE": "python",
                "METERFLOW_DETECTION": args.detection,
                "METERFLOW_TRIGGER_SECONDS": str(args.trigger),
                "METERFLOW_DATA_DIR": str(workdir / "data"),
                "METERFLOW_LOCAL_MONGO_PORT": str(free_port()),
            }
            settings = Settings.from_env(env)
            kafka.ensure_topics(bootstrap, settings.topics, args.partitions)
            generation = kafka.topic_ids(bootstrap, [settings.topic_readings])[
                settings.topic_readings
            ]
            which = "MONGO_URI" if settings.mongo_uri else "nx-27017 stand-in (local)"
            with mongo_for(settings) as (settings, _):
                db = database(settings)
                spark = get_spark(
                    "bench-latency",
                    "local[*]",
                    **{"spark.ui.enabled": "false", **stream_spark_conf(settings.checkpoint_path)},
                )
                sink = Sink(settings, db, instance_id=False)
                sink_stopping = threading.Event()
                sinking = threading.Thread(
                    target=sink.run, args=(sink_stopping.is_set,), daemon=True
                )
                sinking.start()
                for n, (trigger, detection) in enumerate(tradeoffs, 1):
                    # First, and on topics of its own: a load past the stream's capacity
                    # leaves a backlog behind.
                    other = replace(
                        settings,
                        trigger_seconds=trigger,
                        detection_on=detection == "on",
                        topic_readings=f"{settings.topic_readings}-tradeoff-{n}",
                        topic_digest=f"{settings.topic_digest}-tradeoff-{n}",
                    )
                    kafka.ensure_topics(bootstrap, other.topics, args.partitions)
                    fresh = kafka.topic_ids(bootstrap, [other.topic_readings])
                    print(
                        f"trade-off: trigger {trigger:g} s, detection {detection}, "
                        f"{TARGET_LOAD:,} readings/s for {args.tradeoff_seconds:g} s ...",
                        flush=True,
                    )
                    stream = Stream(spark, other)
                    Offered(other).offer(loads[0], WARMUP_S)
                    found = measure_load(
                        other,
                        TARGET_LOAD,
                        args.tradeoff_seconds,
                        fresh[other.topic_readings],
                        db,
                        lambda: spark.streams.active,
                    )
                    print(json.dumps(found), flush=True)
                    traded.append({"trigger_s": trigger, "detection": detection, **found})
                    stream.stop()
                stream = Stream(spark, settings)
                print(f"warm-up: {WARMUP_S:g} s at {loads[0]:,} readings/s ...", flush=True)
                Offered(settings).offer(loads[0], WARMUP_S)
                for rate in loads:
                    print(f"load {rate:,} readings/s for {args.seconds:g} s ...", flush=True)
                    found = measure_load(
                        settings, rate, args.seconds, generation, db, lambda: spark.streams.active
                    )
                    print(json.dumps(found), flush=True)
                    results.append(found)
                stream.stop()
                sink_stopping.set()
                sinking.join(60)
                spark.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    at_target = next((r for r in results if r["rate"] == TARGET_LOAD), None)
    met = (
        at_target is not None
        and (at_target["abnormal_p99_s"] or 1e9) <= TARGET_ABNORMAL_P99_S
        and (at_target["mongo_p99_s"] or 1e9) <= TARGET_MONGO_P99_S
    )
    write_results(
        "latency",
        {
            "loads": results,
            "tradeoffs": traded,
            "seconds_per_load": args.seconds,
            "seconds_per_tradeoff": args.tradeoff_seconds,
            "trigger_s": settings.trigger_seconds,
            "detection": args.detection,
            "mongodb": which,
            "target_load": TARGET_LOAD,
            "target_abnormal_p99_s": TARGET_ABNORMAL_P99_S,
            "target_mongo_p99_s": TARGET_MONGO_P99_S,
            "target_met": met,
        },
    )
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
