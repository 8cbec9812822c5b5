"""The ``meterflow`` command: one entry point for every native workflow.

Each subcommand prints where its Kafka is, reports progress on long work and exits
non-zero with a one-line reason on failure (configuration, unreachable services, ...).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from meterflow import __version__
from meterflow.broker import BrokerError, kafka_for
from meterflow.config import VARIABLES, ConfigError, Settings
from meterflow.kafka import KafkaUnavailableError, ProducerSink
from meterflow.logs import get_logger, setup_logging

log = get_logger("meterflow.cli")


def _reset_stale_checkpoint(settings: Settings) -> None:
    """A freshly started local broker is empty: offsets in an old checkpoint mean nothing.

    Keeping them would make the job wait for offsets that will be reused by new data and
    skip it; the old checkpoint is moved aside (the lake it wrote stays as it is).
    """
    checkpoint = Path(settings.checkpoint_path) / "streaming"
    if checkpoint.exists():
        stale = checkpoint.with_name(f"streaming.stale-{time.strftime('%Y%m%dT%H%M%S')}")
        shutil.move(str(checkpoint), stale)
        log.warning("checkpoint=reset reason=fresh-local-broker moved_to=%s", stale)


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
    from simulator.cli import run_simulate

    return _into_readings_topic(settings, "simulator", run_simulate, args)


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from simulator.cli import run_replay

    return _into_readings_topic(settings, f"replay of {args.file}", run_replay, args)


def cmd_stream(args: argparse.Namespace, settings: Settings) -> int:
    from jobs.streaming_job import run

    with kafka_for(settings, start_local=False) as (live, _):
        try:
            totals = run(live, available_now=args.available_now)
        finally:
            _stop_spark()
    print(_totals_line(totals))
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """The main job natively: Kafka, the simulator feeding it live, and the speed layer."""
    from jobs.streaming_job import run
    from simulator.cli import start_background_simulation

    with kafka_for(settings) as (live, broker):
        if broker is not None:
            _reset_stale_checkpoint(live)
        print(
            f"meterflow {__version__}: Kafka {live.bootstrap_servers}, lake {live.lake_path}, "
            f"{args.meters} simulated meters every {args.interval}; Ctrl-C stops",
            file=sys.stderr,
        )
        stop = threading.Event()
        sink = ProducerSink(live.bootstrap_servers, live.topic_readings)
        simulation = (
            None
            if args.no_simulator
            else start_background_simulation(
                live, sink, stop, meters=args.meters, interval=args.interval, seed=args.seed
            )
        )
        try:
            totals = run(live, available_now=False)
        finally:
            stop.set()
            if simulation is not None:
                simulation.join(timeout=30)
            sink.close(30)
            _stop_spark()
    print(_totals_line(totals))
    return 0


def _stop_spark() -> None:
    from pyspark.sql import SparkSession

    session = SparkSession.getActiveSession()
    if session is not None:
        session.stop()


def _totals_line(totals: dict[str, int]) -> str:
    ok = totals["read"] == totals["valid"] + totals["abnormal"] + totals["deadletter"]
    return (
        f"read {totals['read']:,} = valid {totals['valid']:,} + abnormal {totals['abnormal']:,}"
        f" + dead-lettered {totals['deadletter']:,} ({'reconciled' if ok else 'MISMATCH'})"
    )


def build_parser() -> argparse.ArgumentParser:
    from simulator.cli import add_replay_arguments, add_simulate_arguments

    parser = argparse.ArgumentParser(
        prog="meterflow", description="Smart-meter data platform (native workflows)."
    )
    parser.add_argument("--version", action="version", version=f"meterflow {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(handler=handler)
        return command

    run = add("run", cmd_run, "Start Kafka (if needed), the simulator and the speed layer")
    run.add_argument("--meters", type=int, default=300, help="simulated meters (default 300)")
    run.add_argument("--interval", default="10s", help="reading interval (default 10s)")
    run.add_argument("--seed", type=int, default=None, help="make the simulated fleet reproducible")
    run.add_argument("--no-simulator", action="store_true", help="only consume what arrives")

    stream = add("stream", cmd_stream, "Run the Spark streaming job (speed layer)")
    stream.add_argument(
        "--available-now", action="store_true", help="process what is in Kafka now, then exit"
    )
    add_simulate_arguments(add("simulate", cmd_simulate, "Simulate a fleet of meters into Kafka"))
    add_replay_arguments(add("replay", cmd_replay, "Replay a UCI or AMPds2 recording into Kafka"))
    add("broker", cmd_broker, "Run a local Kafka-protocol broker in the foreground")
    add("topics", cmd_topics, "Create the topics on the configured Kafka")
    config = add("config", cmd_config, "List the environment variables and their defaults")
    config.add_argument("--markdown", action="store_true", help="as a Markdown table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    # SIGTERM (docker stop, kill) shuts down exactly like Ctrl-C: flush, stop, summarise.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        settings = Settings.from_env()
        return args.handler(args, settings)
    except (ConfigError, KafkaUnavailableError, BrokerError) as exc:
        print(f"meterflow {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"meterflow {args.command}: stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
