"""The ``meterflow`` command: one entry point for every native workflow.

Each subcommand prints where its Kafka is, reports progress on long work and exits
non-zero with a one-line reason on failure (configuration, unreachable services, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

from meterflow import __version__
from meterflow.clients.kafka import ProducerSink
from meterflow.core.bundled import import_simulator
from meterflow.core.config import VARIABLES, Settings
from meterflow.core.errors import MeterflowError
from meterflow.core.logs import get_logger, setup_logging
from meterflow.core.signals import signals_handled
from meterflow.local.broker import kafka_for

if TYPE_CHECKING:  # imported where used: the command starts without Spark
    from meterflow.stream.commit import LakeCommitter

log = get_logger("meterflow.cli")
#: A subcommand: its parsed arguments and the settings in, the exit code out.
Handler = Callable[[argparse.Namespace, Settings], int]


def cmd_broker(args: argparse.Namespace, settings: Settings) -> int:
    """Run a local broker in the foreground so other terminals can share it."""
    if settings.bootstrap_servers:
        print(f"KAFKA_BOOTSTRAP_SERVERS={settings.bootstrap_servers} is set: nothing to start")
        return 0
    with kafka_for(settings) as (live, broker):
        where = "started" if broker else "already running"
        print(f"Kafka-protocol broker {where} at {live.bootstrap_servers} (Ctrl-C stops it)")
        print(f"export KAFKA_BOOTSTRAP_SERVERS={live.bootstrap_servers}")
        if broker is None:
            return 0
        while broker.process is not None and broker.process.poll() is None:
            time.sleep(0.5)
        print(f"broker exited; see {broker.log_path}", file=sys.stderr)
        return 1


def cmd_topics(args: argparse.Namespace, settings: Settings) -> int:
    with kafka_for(settings, start_local=False) as (live, _):
        print(f"topics {', '.join(live.topics)} ready on {live.bootstrap_servers}")
    return 0


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    """Print every variable with its default and meaning (the README table's source)."""
    if args.markdown:
        print("| Variable | Default | Meaning |\n|---|---|---|")
        for v in VARIABLES:
            print(f"| `{v.name}` | `{v.default}` | {v.meaning} |")
        return 0
    for v in VARIABLES:
        print(f"{v.name}={v.default!s:<12} # {v.meaning}")
    return 0


def cmd_provision_metabase(args: argparse.Namespace, settings: Settings) -> int:
    """Set up Metabase: admin, the MongoDB database and the "Smart meters" dashboard."""
    from meterflow.dashboards.metabase import MetabaseSettings, provision

    result = provision(MetabaseSettings.from_env())
    print(f"dashboard ready at {result['dashboard_url']}")
    return 0


def cmd_init_mongo(args: argparse.Namespace, settings: Settings) -> int:
    """Indexes (TTL included) and the fleet registry in MongoDB; safe to run again."""
    from meterflow.clients.mongo import database
    from meterflow.local.mongo import mongo_for
    from meterflow.serving.indexes import init_mongo, summary_lines

    with mongo_for(settings) as (live, _):
        try:
            report = init_mongo(
                database(live),
                live.abnormal_ttl_days,
                args.registry or live.registry_path,
                required=args.registry is not None,
            )
        except FileNotFoundError as exc:
            print(f"meterflow init-mongo: {exc}", file=sys.stderr)
            return 2
    for line in summary_lines(report):
        print(line)
    return 0


def cmd_sink(args: argparse.Namespace, settings: Settings) -> int:
    """Abnormal events and meter status from Kafka into MongoDB until Ctrl-C or SIGTERM."""
    from meterflow.clients.mongo import database
    from meterflow.local.mongo import mongo_for
    from meterflow.serving.indexes import ensure_indexes
    from meterflow.serving.sink import Sink

    stop = threading.Event()
    with (
        signals_handled(lambda *_: stop.set()),
        kafka_for(settings, start_local=False) as (live, _),
        mongo_for(live) as (live, _),
    ):
        db = database(live)
        ensure_indexes(db, live.abnormal_ttl_days)
        print(
            f"sink: {live.topic_abnormal}, {live.topic_status} on {live.bootstrap_servers} "
            f"-> MongoDB database {live.mongo_db}; Ctrl-C stops",
            file=sys.stderr,
        )
        stats = Sink(live, db).run(stop.is_set)
    print(
        f"consumed {stats.consumed:,} = written {stats.written:,} + duplicates "
        f"{stats.duplicates:,} + dead-lettered {stats.dead_lettered:,} "
        f"({'reconciled' if stats.reconciled else 'MISMATCH'}); {stats.batches} batches, "
        f"{stats.retries} retries"
    )
    return 0


def cmd_batch(args: argparse.Namespace, settings: Settings) -> int:
    """The daily batch job for one day, in this process with a local Spark."""
    from meterflow.batch.daily import APP_NAME, run
    from meterflow.spark.session import get_spark

    try:
        spark = get_spark(APP_NAME, settings.spark_master)
        report = run(spark, settings.lake_path, args.date, settings.reading_interval_seconds)
    finally:
        _stop_spark()
    print(report.to_json())
    return 0


def cmd_load(args: argparse.Namespace, settings: Settings) -> int:
    """Publish one day's batch views to MongoDB (replacing the day)."""
    from meterflow.clients.mongo import database
    from meterflow.local.mongo import mongo_for
    from meterflow.serving.loader import publish_day

    with mongo_for(settings) as (live, _):
        report = publish_day(live.views_path, args.date, database(live))
    print(f"{report.day} {report.status}: upserted {report.upserted}, deleted {report.deleted}")
    return 0


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    """Check one published day against its views and the lake; exit 1 if they disagree."""
    from meterflow.clients.mongo import database
    from meterflow.local.mongo import mongo_for
    from meterflow.serving.checks import CheckFailed, check_day

    with mongo_for(settings) as (live, _):
        try:
            report = check_day(live.lake_path, args.date, database(live))
        except CheckFailed as exc:
            print(f"meterflow check: FAILED: {exc}", file=sys.stderr)
            return exc.exit_code
    print(f"{report.day} {report.status}: passed; lake {report.lake_counts}")
    for note in report.notes:
        print(note)
    return 0


def _into_readings_topic(
    settings: Settings, what: str, produce: Callable[..., int], args: argparse.Namespace
) -> int:
    """Run a producer command (simulate, replay) against the readings topic, then flush."""
    with kafka_for(settings, start_local=False) as (live, _):
        print(f"{what} -> {live.topic_readings} on {live.bootstrap_servers}", file=sys.stderr)
        sink = ProducerSink(live.bootstrap_servers, live.topic_readings)
        try:
            return produce(args, live, sink)
        finally:
            sink.close()


def cmd_simulate(args: argparse.Namespace, settings: Settings) -> int:
    import_simulator()
    from simulator.cli import run_simulate

    return _into_readings_topic(settings, "simulator", run_simulate, args)


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    import_simulator()
    from simulator.cli import run_replay

    return _into_readings_topic(settings, f"replay of {args.file}", run_replay, args)


def cmd_stream(args: argparse.Namespace, settings: Settings) -> int:
    from meterflow.stream.startup import check_writable
    from meterflow.stream.supervisor import run

    check_writable(settings)  # before any broker or Spark: one line naming the variable
    stop = threading.Event()
    with kafka_for(settings, start_local=False) as (live, _):
        try:
            totals = run(
                live,
                available_now=args.available_now,
                accept_data_loss=args.accept_data_loss,
                stop=stop,
                on_signal=lambda *_: stop.set(),
            )
        finally:
            _stop_spark()
    print(_totals_line(totals))
    return 0


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    """Pre-flight of ``docker compose up``: one line per problem, with its remedy."""
    from meterflow import compose_check

    env_file = Path(args.env_file)
    if not env_file.exists():
        print(f"meterflow doctor: {env_file} is missing: cp .env.example .env", file=sys.stderr)
        return 1
    values = compose_check.read_env_file(env_file)
    compose_file = Path(args.compose_file)
    if not compose_file.exists():
        print(
            f"meterflow doctor: {compose_file} is missing: run it in the repository",
            file=sys.stderr,
        )
        return 1
    problems = compose_check.env_problems(values) + compose_check.port_problems(values)
    docker, notes = compose_check.docker_problems(
        compose_file, compose_check.memory_limits(compose_file)
    )
    for note in notes:
        print(f"note: {note}")
    for problem in problems + docker:
        print(f"problem: {problem}", file=sys.stderr)
    if problems or docker:
        print(
            f"meterflow doctor: {len(problems + docker)} problem(s) in {env_file}", file=sys.stderr
        )
        return 1
    print(f"compose pre-flight: {env_file} and host ports OK")
    return 0


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    """Prove from the lake's ledger that every offset has exactly one outcome."""
    from meterflow.local.service import port_open
    from meterflow.stream.reconcile import reconcile

    if not settings.bootstrap_servers and port_open(settings.local_broker_port):
        settings = settings.with_bootstrap(f"127.0.0.1:{settings.local_broker_port}")
    report = reconcile(
        settings.lake_path,
        settings.topic_readings,
        settings.bootstrap_servers,
        scan_lake_files=args.scan_lake,
    )
    for line in report.lines:
        print(line)
    if not report.ok:
        print(f"meterflow reconcile: {report.problem}", file=sys.stderr)
        return 1
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """The platform natively: Kafka, MongoDB, the simulator, the speed layer and the sink.

    With ``--airflow`` the simulator first backfills yesterday and Airflow (standalone)
    runs the DAGs, so the daily views of a complete day appear in MongoDB. Ctrl-C drains in
    order (:class:`_Drain`): nothing the simulator sent is left unread in the local broker.
    """
    from meterflow.clients.mongo import database, redacted
    from meterflow.local.mongo import mongo_for
    from meterflow.serving.indexes import init_mongo
    from meterflow.stream.supervisor import run

    if "METERFLOW_DETECTION" not in os.environ:  # the whole platform, as compose runs it
        settings = dataclasses.replace(settings, detection_on=True)
    import_simulator()
    from simulator.cli import start_background_simulation

    with kafka_for(settings) as (live, broker), mongo_for(live) as (live, _):
        print(
            f"meterflow {__version__}: Kafka {live.bootstrap_servers}, MongoDB "
            f"{redacted(live.mongo_uri)} (database {live.mongo_db}), lake {live.lake_path}, "
            f"{args.meters} simulated meters every {args.interval}; Ctrl-C stops",
            file=sys.stderr,
        )
        drain = _Drain(live)
        producer = ProducerSink(live.bootstrap_servers, live.topic_readings)
        if not args.no_simulator:
            drain.simulator = start_background_simulation(
                live,
                producer,
                drain.stop_simulator,
                meters=args.meters,
                interval=args.interval,
                seed=args.seed,
                backfill_days=1 if args.airflow else 0,
            )
        drain.producer = producer
        # Indexes, and the registry the simulator wrote.
        init_mongo(database(live), live.abnormal_ttl_days, live.registry_path)
        drain.sink = _start_sink(live, drain.stop_sink)
        if args.airflow:  # the stream is starting: the daily DAG waits for its watermark
            from meterflow.core import lake

            lake.write_watermark(live.lake_path, lake.read_watermark(live.lake_path))
        airflow = _start_airflow(live) if args.airflow else None
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
        finally:
            drain.finish()
            _stop_spark()
            if airflow is not None:
                _stop_process_group(airflow)
    print(_totals_line(totals))
    return 0


class _Drain:
    """Stops ``meterflow run`` in dependency order so nothing is left unread.

    The first Ctrl-C stops the simulator and flushes its producer, lets the stream run
    until the lake's ledger has every offset of the readings topic, then lets the sink run
    until its group has committed everything on the abnormal and status topics; only then
    does the local broker (which keeps data in memory) stop. A second Ctrl-C stops at once.
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
        self._thread: threading.Thread | None = None

    def watch(self, committer: LakeCommitter) -> None:
        self.committer = committer

    def on_signal(self, *_: object) -> None:
        if self._thread is None:
            print("meterflow run: draining (Ctrl-C again stops at once)", file=sys.stderr)
            self._thread = threading.Thread(target=self._drain, name="drain", daemon=True)
            self._thread.start()
        else:
            self.stop_stream.set()
            self.stop_sink.set()

    def _drain(self) -> None:

        self.stop_simulator.set()
        if self.simulator is not None:
            self.simulator.join(timeout=60)
        if self.producer is not None:
            self.producer.flush(30)
        topic = self.settings.topic_readings
        ends = _topic_ends(self.settings.bootstrap_servers, topic)
        caught_up = _wait_for(
            lambda: (
                self.committer is not None
                and all(
                    self.committer.ledger.ends(topic, self.committer.generation).get(p, 0) >= end
                    for p, end in ends.items()
                    if end > 0
                )
            ),
            self.timeout,
        )
        log.info("drain=stream caught_up=%s readings_end=%s", str(caught_up).lower(), ends)
        self.stop_stream.set()

    def finish(self) -> None:
        """After the stream: let the sink catch up, then stop it and the producer."""
        from meterflow.clients import kafka

        self.stop_simulator.set()
        if self._thread is not None and not self.stop_sink.is_set():
            topics = (self.settings.topic_abnormal, self.settings.topic_status)
            ends = {t: _topic_ends(self.settings.bootstrap_servers, t) for t in topics}
            caught_up = _wait_for(
                lambda: kafka.group_caught_up(
                    self.settings.bootstrap_servers, self.settings.sink_group, ends
                ),
                self.timeout,
            )
            log.info("drain=sink caught_up=%s", str(caught_up).lower())
        self.stop_sink.set()
        for worker in (self.simulator, self.sink):
            if worker is not None:
                worker.join(timeout=60)
        if self.producer is not None:
            self.producer.close(30)


def _topic_ends(bootstrap: str, topic: str) -> dict[int, int]:
    from meterflow.clients import kafka

    client = kafka.consumer(bootstrap)
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


def _start_sink(settings: Settings, stop: threading.Event) -> threading.Thread:
    """``meterflow sink`` in a thread of ``meterflow run`` (stops, flushed, with ``stop``)."""
    from meterflow.clients.mongo import database
    from meterflow.serving.sink import Sink

    def consume() -> None:
        try:
            Sink(settings, database(settings)).run(stop.is_set)  # logs its own summary
        except Exception:
            log.exception("sink=failed")

    thread = threading.Thread(target=consume, name="sink", daemon=True)
    thread.start()
    return thread


def _start_airflow(settings: Settings) -> subprocess.Popen[bytes]:
    from datetime import UTC, datetime, timedelta

    from meterflow.local.airflow import API_PORT, start_standalone

    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    process = start_standalone(settings, yesterday)
    print(
        f"Airflow standalone starting: http://localhost:{API_PORT} (user admin, password in "
        f"{settings.data_dir / 'airflow'}/simple_auth_manager_passwords.json.generated; "
        f"log {settings.data_dir / 'logs' / 'airflow.log'})",
        file=sys.stderr,
    )
    return process


def _stop_process_group(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    import os

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _stop_spark() -> None:
    from pyspark.sql import SparkSession

    session = SparkSession.getActiveSession()
    if session is not None:
        session.stop()


def _totals_line(totals: dict[str, int]) -> str:
    """This run's counts; whether the lake as a whole reconciles is ``meterflow reconcile``."""
    line = (
        f"this run: read {totals['read']:,} = valid {totals['valid']:,} + abnormal "
        f"{totals['abnormal']:,} + dead-lettered {totals['deadletter']:,}"
    )
    if totals.get("skipped"):
        line += f"; {totals['skipped']:,} already in the lake"
    if totals.get("lost"):
        line += f"; {totals['lost']:,} offsets recorded as lost"
    for action in ("open", "clear"):
        counts = {k.split("_", 1)[1]: n for k, n in totals.items() if k.startswith(f"{action}_")}
        if counts:
            each = ", ".join(f"{code} {n:,}" for code, n in sorted(counts.items()))
            verb = "opened" if action == "open" else "cleared"
            line += f"; episodes {verb}: {each}"
    return line + " (the whole lake: meterflow reconcile)"


def build_parser() -> argparse.ArgumentParser:
    # The simulator is imported from where meterflow.core.bundled finds it: the checkout's
    # simulator/, or the copy inside an installed wheel.
    import_simulator()
    from simulator.cli import add_replay_arguments, add_simulate_arguments

    parser = argparse.ArgumentParser(
        prog="meterflow", description="Smart-meter data platform (native workflows)."
    )
    parser.add_argument("--version", action="version", version=f"meterflow {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(handler=handler)
        return command

    run = add(
        "run", cmd_run, "Start Kafka and MongoDB (if needed), the simulator, speed layer and sink"
    )
    run.add_argument("--meters", type=int, default=300, help="simulated meters (default 300)")
    run.add_argument("--interval", default="10s", help="reading interval (default 10s)")
    run.add_argument("--seed", type=int, default=None, help="make the simulated fleet reproducible")
    run.add_argument("--no-simulator", action="store_true", help="only consume what arrives")
    run.add_argument(
        "--airflow",
        action="store_true",
        help="also backfill yesterday and run Airflow standalone with the DAGs",
    )

    stream = add("stream", cmd_stream, "Run the Spark streaming job (speed layer)")
    stream.add_argument(
        "--available-now", action="store_true", help="process what is in Kafka now, then exit"
    )
    stream.add_argument(
        "--accept-data-loss",
        action="store_true",
        help="record offsets gone from Kafka as lost in the ledger and continue",
    )
    doctor = add("doctor", cmd_doctor, "Check .env, host ports and Docker before compose up")
    doctor.add_argument("--compose", action="store_true", help="the compose set-up (default)")
    doctor.add_argument("--env-file", default=".env", help="the compose .env (default ./.env)")
    doctor.add_argument(
        "--compose-file", default="docker-compose.yml", help="default ./docker-compose.yml"
    )
    reconcile = add(
        "reconcile",
        cmd_reconcile,
        "Check the lake's ledger: every Kafka offset has exactly one outcome, across runs",
    )
    reconcile.add_argument(
        "--scan-lake",
        action="store_true",
        help="also read every lake file and count its rows per offset (slow on big lakes)",
    )
    add_simulate_arguments(add("simulate", cmd_simulate, "Simulate a fleet of meters into Kafka"))
    add_replay_arguments(add("replay", cmd_replay, "Replay a UCI or AMPds2 recording into Kafka"))
    add("broker", cmd_broker, "Run a local Kafka-protocol broker in the foreground")
    add("topics", cmd_topics, "Create the topics on the configured Kafka")
    add("sink", cmd_sink, "Write abnormal events and meter status from Kafka to MongoDB")
    init_mongo = add("init-mongo", cmd_init_mongo, "Create MongoDB indexes and load the registry")
    init_mongo.add_argument(
        "--registry", default=None, help="registry Parquet file or directory (default: the lake's)"
    )
    for name, handler, text in (
        ("batch", cmd_batch, "Run the daily batch job for one day (local Spark)"),
        ("load", cmd_load, "Publish one day's batch views to MongoDB"),
        ("check", cmd_check, "Check one published day against its views and the lake"),
    ):
        add(name, handler, text).add_argument(
            "--date", required=True, type=date.fromisoformat, help="the day, YYYY-MM-DD"
        )
    config = add("config", cmd_config, "List the environment variables and their defaults")
    config.add_argument("--markdown", action="store_true", help="as a Markdown table")
    add(
        "provision-metabase",
        cmd_provision_metabase,
        "Set up Metabase: admin, MongoDB database, Smart meters dashboard",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    # SIGTERM (docker stop, kill) shuts down exactly like Ctrl-C: flush, stop, summarise.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        settings = Settings.from_env()
        handler: Handler = args.handler
        return handler(args, settings)
    except MeterflowError as exc:
        print(f"meterflow {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"meterflow {args.command}: stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
