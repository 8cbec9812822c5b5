"""``meterflow run``: the whole platform natively, in one process, stopped in order.

Kafka and MongoDB (started here unless configured), the simulator and the sink in
threads, the speed layer in the main thread and, with ``--airflow``, Airflow standalone as
a child process. Ctrl-C drains in order (:class:`Drain`): nothing the simulator sent is
left unread in the local broker. A worker thread that dies (the sink, the simulator)
stops the run the same way, without waiting for the dead worker, and the run's result
names it, so the command ends with one line saying what died and why, not a stream that
runs on without its sink or its readings (docs/architecture.md, "meterflow run").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from meterflow import __version__
from meterflow.clients.kafka import ProducerSink
from meterflow.core.config import Settings
from meterflow.core.contract import STATEFUL_FAULTS, FaultCode
from meterflow.core.errors import ConfigError, MeterflowError
from meterflow.core.kafka_security import KafkaCluster
from meterflow.core.logs import get_logger
from meterflow.local.broker import kafka_for

if TYPE_CHECKING:  # imported where used: the command starts without Spark
    from meterflow.stream.commit import LakeCommitter

log = get_logger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """What ``meterflow run``'s arguments ask for."""

    meters: int = 300
    interval_s: float = 10.0
    seed: int | None = None
    simulator: bool = True
    airflow: bool = False
    #: Stateful episodes injected per meter-day (none: an empty table).
    episodes: Mapping[FaultCode, float] = field(default_factory=dict)


@dataclass
class RunResult:
    """The stream's totals, and why the run stopped if a worker died (else None).

    No totals when the stream failed while a dead worker's run was stopping: the worker
    is the cause to name (the stream's own error is in the log).
    """

    totals: dict[str, int] | None
    failure: str | None = None


def run_platform(settings: Settings, options: RunOptions) -> RunResult:
    """Start everything, run the speed layer until Ctrl-C or a dead worker, stop in order."""
    from meterflow.clients.mongo import database, redacted
    from meterflow.local.mongo import mongo_for
    from meterflow.serving.indexes import init_mongo
    from meterflow.spark.session import stop_active_session
    from meterflow.stream.supervisor import run
    from simulator.background import background_simulation

    with kafka_for(settings) as (live, broker), mongo_for(live) as (live, _):
        print(
            f"meterflow {__version__}: Kafka {live.bootstrap_servers}, MongoDB "
            f"{redacted(live.mongo_uri)} (database {live.mongo_db}), lake {live.lake_path}, "
            f"{options.meters} simulated meters every {options.interval_s:g} s; Ctrl-C stops",
            file=sys.stderr,
        )
        drain = Drain(live)
        drain.producer = ProducerSink(live.kafka, live.topic_readings)
        if options.simulator:
            try:
                simulation = background_simulation(
                    live,
                    drain.producer,
                    drain.stop_simulator,
                    meters=options.meters,
                    interval_s=options.interval_s,
                    seed=options.seed,
                    backfill_days=1 if options.airflow else 0,
                    episodes=options.episodes,
                )
            except ValueError as exc:
                raise ConfigError(f"cannot simulate that fleet: {exc}") from None
            if any(options.episodes.values()):
                print(episodes_note(options.episodes, options.airflow), file=sys.stderr)
            drain.simulator = start_worker("simulator", simulation, drain)
        # Indexes, and the registry the simulator wrote.
        init_mongo(database(live), live.abnormal_ttl_days, live.registry_path)
        drain.sink = _start_sink(live, drain)
        if options.airflow:  # the stream is starting: the daily DAG waits for its watermark
            from meterflow.core import lake

            lake.watermark_started(live.lake_path)
        airflow = _start_airflow(live) if options.airflow else None
        totals: dict[str, int] | None = None
        try:
            # A local broker started here is new: its topics are a new generation, and
            # the previous run drained its own broker before stopping.
            totals = run(
                live,
                accept_data_loss=broker is not None,
                stop=drain.stop_stream,
                on_committer=drain.watch,
                on_signal=drain.on_signal,
            )
        except MeterflowError:
            if drain.failure is None:
                raise
        finally:
            drain.finish()
            stop_active_session()
            if airflow is not None:
                _stop_process_group(airflow)
    return RunResult(totals, drain.failure)


def episodes_note(rates: Mapping[FaultCode, float], backfilled: bool) -> str:
    """The line that says which episodes ``meterflow run`` injects and when they show."""
    when = {
        FaultCode.STUCK: "within minutes",
        FaultCode.NO_DATA: "within minutes",
        FaultCode.SPIKE: "within minutes (the backfill is its baseline)"
        if backfilled
        else "after a day, its baseline (--airflow backfills one)",
        FaultCode.LEAK: "after a night",
    }
    kinds = [code for code in STATEFUL_FAULTS if rates.get(code)]
    table = ", ".join(f"{code}={rates[code]:g}" for code in kinds)
    shows = "; ".join(f"{code} {when[code]}" for code in kinds)
    return (
        f"meterflow run: injecting stateful episodes per meter-day {table} (LEAK: per "
        f"water meter); they open: {shows}; --episodes none turns them off"
    )


def start_worker(name: str, work: Callable[[], object], drain: Drain) -> threading.Thread:
    """Run ``work`` in a thread; if it raises, the run stops and says so (:meth:`Drain.failed`)."""

    def target() -> None:
        try:
            work()
        except Exception as exc:
            drain.failed(name, exc)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def _start_sink(settings: Settings, drain: Drain) -> threading.Thread:
    """``meterflow sink`` in a thread of ``meterflow run`` (stops, flushed, with the drain)."""
    from meterflow.clients.mongo import database
    from meterflow.serving.sink import Sink

    def consume() -> None:
        Sink(settings, database(settings)).run(drain.stop_sink.is_set)  # logs its own summary

    return start_worker("sink", consume, drain)


class Drain:
    """Stops ``meterflow run`` in dependency order so nothing is left unread.

    The first Ctrl-C stops the simulator and flushes its producer, lets the stream run
    until the lake's ledger has every offset of the readings topic, then lets the sink run
    until its group has committed everything on the abnormal and status topics; only then
    does the local broker (which keeps data in memory) stop. A second Ctrl-C stops at once.
    A worker that dies starts the same drain; what waits for that worker is skipped.
    """

    def __init__(self, settings: Settings, timeout: float = 120.0) -> None:
        self.settings = settings
        self.timeout = timeout
        self.stop_simulator = threading.Event()
        self.stop_stream = threading.Event()
        self.stop_sink = threading.Event()
        self.simulator: threading.Thread | None = None
        self.sink: threading.Thread | None = None
        self.producer: ProducerSink | None = None
        self.committer: LakeCommitter | None = None
        #: The first worker that died, and why: the run's one-line failure.
        self.failure: str | None = None
        self.dead: set[str] = set()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def watch(self, committer: LakeCommitter) -> None:
        self.committer = committer

    def on_signal(self, *_: object) -> None:
        if self._start():
            print("meterflow run: draining (Ctrl-C again stops at once)", file=sys.stderr)
        else:
            self.stop_stream.set()
            self.stop_sink.set()

    def failed(self, worker: str, error: Exception) -> None:
        """``worker`` died of ``error``: record why and stop the run as Ctrl-C does."""
        reason = f"{type(error).__name__}: {' '.join(str(error).split())}".rstrip(": ")
        log.error("run=worker-failed worker=%s error=%r", worker, reason)
        log.debug("worker=%s traceback", worker, exc_info=error)
        with self._lock:
            self.dead.add(worker)
            if self.failure is None:
                self.failure = (
                    f"the {worker} stopped: {reason}; the run stopped with it: fix that "
                    "and run again (details in the log above)"
                )
        self._start()

    def _start(self) -> bool:
        """Start draining, unless a drain already is; whether this call started it."""
        with self._lock:
            if self._thread is not None:
                return False
            self._thread = threading.Thread(target=self._drain, name="drain", daemon=True)
        self._thread.start()
        return True

    def _drain(self) -> None:
        try:
            self.stop_simulator.set()
            if self.simulator is not None:
                self.simulator.join(timeout=60)
            if self.producer is not None:
                self.producer.flush(30)
            topic = self.settings.topic_readings
            ends = _topic_ends(self.settings.kafka, topic)
            caught_up = _wait_for(lambda: self._stream_has(topic, ends), self.timeout)
            log.info("drain=stream caught_up=%s readings_end=%s", str(caught_up).lower(), ends)
        except Exception as exc:  # Kafka gone, say: stop the stream all the same
            log.warning("drain=stream caught_up=false error=%r", str(exc))
        finally:
            self.stop_stream.set()

    def _stream_has(self, topic: str, ends: Mapping[int, int]) -> bool:
        committer = self.committer
        if committer is None:
            return False
        done = committer.ledger.ends(topic, committer.generation)
        return all(done.get(p, 0) >= end for p, end in ends.items() if end > 0)

    def finish(self) -> None:
        """After the stream: let a live sink catch up, then stop it and the producer."""
        from meterflow.clients import kafka

        self.stop_simulator.set()
        draining = self._thread is not None and not self.stop_sink.is_set()
        if draining and "sink" not in self.dead:
            topics = (self.settings.topic_abnormal, self.settings.topic_status)
            ends = {t: _topic_ends(self.settings.kafka, t) for t in topics}
            caught_up = _wait_for(
                lambda: kafka.group_caught_up(self.settings.kafka, self.settings.sink_group, ends),
                self.timeout,
            )
            log.info("drain=sink caught_up=%s", str(caught_up).lower())
        self.stop_sink.set()
        for worker in (self.simulator, self.sink):
            if worker is not None:
                worker.join(timeout=60)
        if self.producer is not None:
            self.producer.close(30)


def _topic_ends(cluster: KafkaCluster, topic: str) -> dict[int, int]:
    from meterflow.clients import kafka

    client = kafka.consumer(cluster)
    try:
        found = kafka.partition_ends(client, kafka.topic_partitions(client, [topic]))
    finally:
        client.close()
    return {p: end for (_, p), end in found.items()}


def _wait_for(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.5)
    return False


def _start_airflow(settings: Settings) -> subprocess.Popen[bytes]:
    from datetime import timedelta

    from meterflow.core.timestamps import today
    from meterflow.local.airflow import API_PORT, start_standalone

    yesterday = today(settings.timezone) - timedelta(days=1)
    process = start_standalone(settings, yesterday)
    print(
        f"Airflow standalone starting: http://localhost:{API_PORT} (user admin, password in "
        f"{settings.data_dir / 'airflow'}/simple_auth_manager_passwords.json.generated; "
        f"log {settings.data_dir / 'logs' / 'airflow.log'})",
        file=sys.stderr,
    )
    return process


def _stop_process_group(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
