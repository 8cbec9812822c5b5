"""The ``meterflow`` command: one entry point for every native workflow.

Each subcommand prints where its Kafka is, reports progress on long work and exits
non-zero with a one-line reason on failure (configuration, unreachable services, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from datetime import date, timedelta
from pathlib import Path

from meterflow import __version__
from meterflow.clients.kafka import ProducerSink
from meterflow.core import variables
from meterflow.core.config import Settings
from meterflow.core.errors import MeterflowError
from meterflow.core.logs import get_logger, setup_logging
from meterflow.core.signals import signals_handled
from meterflow.local.broker import kafka_for
from meterflow.local.service import LOOPBACK
from meterflow.local.spark_cluster import MASTER_PORT, MASTER_UI_PORT

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


def cmd_spark_cluster(args: argparse.Namespace, settings: Settings) -> int:
    """A Spark standalone master and workers in the foreground, until Ctrl-C or SIGTERM."""
    from meterflow.local.spark_cluster import ClusterPlan, spark_cluster

    plan = ClusterPlan(
        state_dir=Path(args.state_dir or settings.data_dir / "spark-cluster").absolute(),
        workers=args.workers,
        cores=args.cores,
        memory=args.memory,
        host=args.host,
        port=args.port,
        ui_port=args.ui_port,
        join=args.join,
    )
    stop = threading.Event()
    with signals_handled(lambda *_: stop.set()), spark_cluster(plan) as cluster:
        if cluster.master is not None:
            print(f"Spark master {cluster.master_url}, UI http://{plan.host}:{plan.ui_port}")
        for worker in cluster.workers:
            print(
                f"Spark worker of {plan.cores} core(s) and {plan.memory}, UI "
                f"http://{plan.host}:{worker.port}, logs {worker.log_path}"
            )
        print(f"export SPARK_MASTER={cluster.master_url}  (Ctrl-C stops the cluster)", flush=True)
        while not stop.wait(0.5):
            if (gone := cluster.stopped()) is not None:
                code = gone.process.returncode if gone.process else None
                print(
                    f"meterflow spark-cluster: {gone.name} exited with code {code}; see "
                    f"{gone.log_path}",
                    file=sys.stderr,
                )
                return 1
    print("Spark cluster stopped")
    return 0


def cmd_topics(args: argparse.Namespace, settings: Settings) -> int:
    with kafka_for(settings, start_local=False) as (live, _):
        print(f"topics {', '.join(live.topics)} ready on {live.bootstrap_servers}")
    return 0


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    """Print every variable with its default and meaning (docs/configuration.md's source)."""
    from meterflow.dashboards.metabase import MetabaseSettings
    from meterflow.serving.users import MongoUsersSettings

    entries = [
        *variables.table(Settings),
        *variables.table(MetabaseSettings),
        *variables.table(MongoUsersSettings),
    ]
    if args.markdown:
        print("| Variable | Default | Values | Meaning |\n|---|---|---|---|")
        for entry in entries:
            default = f"`{entry.default}`" if entry.default else "(empty)"
            print(f"| `{entry.name}` | {default} | {entry.kind} | {entry.doc} |")
        return 0
    for entry in entries:
        print(f"{entry.name}={entry.default!s:<12} # {entry.doc}")
    return 0


def cmd_provision_metabase(args: argparse.Namespace, settings: Settings) -> int:
    """Set up Metabase: admin, the MongoDB database and the "Smart meters" dashboard."""
    from meterflow.dashboards.metabase import MetabaseSettings, provision

    result = provision(MetabaseSettings.from_env(settings))
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


def cmd_mongo_users(_args: argparse.Namespace, settings: Settings) -> int:
    """The serving database's application and read-only users, as root; safe to run again."""
    from pymongo.errors import PyMongoError

    from meterflow.clients.mongo import client
    from meterflow.serving.users import MongoUsersSettings, ensure_users, wanted

    users = MongoUsersSettings.from_env()
    try:
        done = ensure_users(client(users.root_uri)[settings.mongo_db], wanted(users))
    except PyMongoError as exc:
        reason = " ".join(str(exc).split(", full error")[0].split())
        print(
            f"meterflow mongo-users: MongoDB refused the root user of MONGO_ROOT_URI ({reason}): "
            "check MONGO_ROOT_USERNAME and MONGO_ROOT_PASSWORD",
            file=sys.stderr,
        )
        return 1
    for user in wanted(users):
        print(f"user {user.name}: {done[user.name]}, {user.role} on {settings.mongo_db}")
    return 0


def cmd_registry_import(args: argparse.Namespace, settings: Settings) -> int:
    """Validate a CSV or Parquet fleet whole, then replace the lake's registry and ``meters``."""
    from meterflow.clients.mongo import database
    from meterflow.local.mongo import mongo_for
    from meterflow.serving.registry_import import (
        RegistryRejectedError,
        import_registry,
        summary_lines,
    )

    with mongo_for(settings) as (live, _):
        try:
            report = import_registry(database(live), args.file, live.registry_path)
        except RegistryRejectedError as exc:
            for line in exc.shown():
                print(line)
            print(f"meterflow registry import: {exc}", file=sys.stderr)
            return exc.exit_code
    for line in summary_lines(report):
        print(line)
    return 0


def cmd_edit(args: argparse.Namespace, settings: Settings) -> int:
    """Record a person's value for intervals (an audit trail), or list a meter's trail."""
    import getpass

    from meterflow.batch import edits

    if args.list:
        print("\n".join(edits.trail_lines(settings.lake_path, args.list)))
        return 0
    try:
        if args.file:
            wanted = edits.read_edit_file(args.file)
        elif args.device and args.start and args.value is not None:
            wanted = [edits.Edit(args.device, args.start, args.value, args.reason or "")]
        else:
            raise edits.EditRejectedError(
                "give DEVICE START VALUE --reason TEXT, --file CSV or --list DEVICE"
            )
        author = args.author or getpass.getuser()
        recorded = edits.record(settings.lake_path, wanted, author)
    except edits.EditRejectedError as exc:
        print(f"meterflow edit: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"recorded {recorded.rows.num_rows} edits by {author} in {recorded.path}")
    for day in edits.days_of(recorded.rows, settings.timezone):
        print(f"  applies when {day} runs again: meterflow batch --date {day}")
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
    from meterflow.batch.daily import APP_NAME, run, run_late
    from meterflow.batch.late import summary_lines
    from meterflow.core.timestamps import today
    from meterflow.spark.session import get_spark, stop_active_session

    common = (settings.reading_interval_seconds, settings.timezone, settings.linear_gap_intervals)
    try:
        spark = get_spark(APP_NAME, settings.spark_master)
        if args.since is None:
            reports = [run(spark, settings.lake_path, args.date, *common)]
        else:
            yesterday = today(settings.timezone) - timedelta(days=1)
            reports = run_late(spark, settings.lake_path, args.since, yesterday, *common)
    finally:
        stop_active_session()
    for report in reports:
        print(report.to_json())
    if args.since is not None:
        print("\n".join(summary_lines(reports, args.since)))
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
        sink = ProducerSink(live.kafka, live.topic_readings)
        try:
            return produce(args, live, sink)
        finally:
            sink.close()


def cmd_simulate(args: argparse.Namespace, settings: Settings) -> int:
    from simulator.cli import run_simulate

    return _into_readings_topic(settings, "simulator", run_simulate, args)


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from simulator.cli import run_replay

    return _into_readings_topic(settings, f"replay of {args.file}", run_replay, args)


def cmd_stream(args: argparse.Namespace, settings: Settings) -> int:
    from meterflow.spark.session import stop_active_session
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
            stop_active_session()
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
    # `docker compose --profile cluster` is COMPOSE_PROFILES=cluster, which .env may set.
    profiles = compose_check.profiles_on(
        os.environ.get("COMPOSE_PROFILES", values.get("COMPOSE_PROFILES", ""))
    )
    problems = (
        compose_check.env_problems(values)
        + compose_check.port_problems(values)
        + compose_check.cluster_problems(values, profiles)
    )
    docker, notes = compose_check.docker_problems(
        compose_file, compose_check.memory_limits(compose_file, profiles)
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
        settings.lake_path, settings.topic_readings, settings.kafka, scan_lake_files=args.scan_lake
    )
    for line in report.lines:
        print(line)
    if not report.ok:
        print(f"meterflow reconcile: {report.problem}", file=sys.stderr)
        return 1
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """The platform natively: Kafka, MongoDB, the simulator, the speed layer and the sink.

    With ``--airflow`` the simulator first backfills yesterday and today up to now, and
    Airflow (standalone) runs the DAGs, so the daily views of a whole day appear in
    MongoDB. :mod:`meterflow.local.run` starts and stops it all; a dead worker ends the
    run with one line and exit code 1.
    """
    from meterflow.local.run import RunOptions, run_platform

    if "METERFLOW_DETECTION" not in os.environ:  # the whole platform, as compose runs it
        settings = dataclasses.replace(settings, detection_on=True)
    options = RunOptions(
        meters=args.meters,
        interval_s=args.interval,
        seed=args.seed,
        simulator=not args.no_simulator,
        airflow=args.airflow,
        episodes=args.episodes,
    )
    result = run_platform(settings, options)
    if result.totals is not None:
        print(_totals_line(result.totals))
    if result.failure is not None:
        print(f"meterflow run: {result.failure}", file=sys.stderr)
        return 1
    return 0


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


def build_parser(
    prog: str = "meterflow", commands: Collection[str] | None = None
) -> argparse.ArgumentParser:
    """The ``meterflow`` command, or only its ``commands`` (``python -m simulator``: the
    simulator's two, with the very same arguments)."""
    from simulator.cli import (
        add_replay_arguments,
        add_simulate_arguments,
        parse_demo_episode_rates,
        parse_seconds,
    )
    from simulator.faults import DEMO_EPISODE_RATES

    about = "Smart-meter data platform (native workflows)."
    if commands is not None:
        about = f"meterflow's {' and '.join(commands)} commands."
    parser = argparse.ArgumentParser(prog=prog, description=about)
    parser.add_argument("--version", action="version", version=f"meterflow {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        if commands is not None and name not in commands:
            return argparse.ArgumentParser()  # built, never reachable
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(handler=handler)
        return command

    run = add(
        "run", cmd_run, "Start Kafka and MongoDB (if needed), the simulator, speed layer and sink"
    )
    run.add_argument("--meters", type=int, default=300, help="simulated meters (default 300)")
    run.add_argument(
        "--interval", type=parse_seconds, default=10.0, help="reading interval (default 10s)"
    )
    run.add_argument("--seed", type=int, default=None, help="make the simulated fleet reproducible")
    run.add_argument("--no-simulator", action="store_true", help="only consume what arrives")
    run.add_argument(
        "--airflow",
        action="store_true",
        help="also backfill yesterday and today up to now, and run Airflow standalone with "
        "the DAGs",
    )
    run.add_argument(
        "--episodes",
        type=parse_demo_episode_rates,
        default="demo",
        metavar="demo|none|KIND=RATE,...",
        help="stateful episodes the simulator injects per meter-day (demo, the default: "
        f"{', '.join(f'{k}={v:g}' for k, v in DEMO_EPISODE_RATES.items())}, enough to show "
        "within minutes; none: no episodes)",
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
    cluster = add(
        "spark-cluster",
        cmd_spark_cluster,
        "Run a Spark standalone master and workers (from the pyspark wheel) in the foreground",
    )
    cluster.add_argument("--workers", type=int, default=2, help="worker JVMs (default 2)")
    cluster.add_argument("--cores", type=int, default=1, help="cores per worker (default 1)")
    cluster.add_argument("--memory", default="2g", help="executor memory per worker (default 2g)")
    cluster.add_argument("--host", default=LOOPBACK, help="address the JVMs bind to")
    cluster.add_argument(
        "--port", type=int, default=MASTER_PORT, help=f"the master's port (default {MASTER_PORT})"
    )
    cluster.add_argument(
        "--ui-port",
        type=int,
        default=MASTER_UI_PORT,
        help=f"the master's web UI (default {MASTER_UI_PORT}); worker N's is this plus N",
    )
    cluster.add_argument(
        "--join", metavar="SPARK_URL", help="start only workers, joining this master"
    )
    cluster.add_argument(
        "--state-dir",
        help="logs and the workers' work directories (default DATA_DIR/spark-cluster)",
    )
    add("topics", cmd_topics, "Create the topics on the configured Kafka")
    add("sink", cmd_sink, "Write abnormal events and meter status from Kafka to MongoDB")
    init_mongo = add("init-mongo", cmd_init_mongo, "Create MongoDB indexes and load the registry")
    init_mongo.add_argument(
        "--registry", default=None, help="registry Parquet file or directory (default: the lake's)"
    )
    add("mongo-users", cmd_mongo_users, "Create or update the MongoDB users (as root)")
    edit = add("edit", cmd_edit, "Override intervals' values (kept in an audit trail)")
    edit.add_argument("device", nargs="?", help="the meter's device_id")
    edit.add_argument("start", nargs="?", help="the interval's start, ISO 8601")
    edit.add_argument("value", nargs="?", type=float, help="its value, in the meter's unit")
    edit.add_argument("--reason", help="why (required, kept in the trail)")
    edit.add_argument("--file", help="a CSV of device_id, interval_start, value, reason")
    edit.add_argument("--list", metavar="DEVICE", help="show a meter's trail of edits")
    edit.add_argument("--author", help="who edits (default: the user name)")
    registry = add("registry", cmd_registry_import, "The fleet registry: import your own fleet")
    registry_commands = registry.add_subparsers(dest="registry_command", metavar="COMMAND")
    registry_commands.required = True
    registry_import = registry_commands.add_parser(
        "import",
        help="validate a CSV or Parquet fleet, then replace the lake's registry and MongoDB's "
        "meters with it",
    )
    registry_import.add_argument("file", help="the fleet: a .csv or .parquet file")
    batch = add("batch", cmd_batch, "Run the daily batch job for one day (local Spark)")
    which = batch.add_mutually_exclusive_group(required=True)
    which.add_argument("--date", type=date.fromisoformat, help="the day, YYYY-MM-DD")
    which.add_argument(
        "--since",
        type=date.fromisoformat,
        help="run again every day since this one that received readings after it was published",
    )
    for name, handler, text in (
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


def main(
    argv: Sequence[str] | None = None,
    prog: str = "meterflow",
    commands: Collection[str] | None = None,
) -> int:
    """Run one command; ``prog`` and ``commands`` as :func:`build_parser` takes them."""
    parser = build_parser(prog, commands)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    # SIGTERM (docker stop, kill) shuts down exactly like Ctrl-C: flush, stop, summarise.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        settings = Settings.from_env()
        handler: Handler = args.handler
        return handler(args, settings)
    except MeterflowError as exc:
        command = " ".join(filter(None, (args.command, getattr(args, "registry_command", None))))
        print(f"{prog} {command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog} {args.command}: stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
