"""``meterflow simulate`` and ``meterflow replay``: arguments, progress, summary, shutdown."""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time
from datetime import date
from pathlib import Path
from typing import Protocol

from meterflow.config import Settings
from meterflow.contract import STATELESS_FAULTS, FaultCode, MeterType
from simulator.fleet import build_fleet, write_registry
from simulator.generator import FaultRates, SimulationConfig, Summary, simulate
from simulator.replay import ReplayError, ReplaySummary, replay


class Sink(Protocol):
    """Where messages go (a Kafka producer in the CLI, a list in tests)."""

    def emit(self, key: bytes | None, value: bytes) -> None: ...

    def flush(self, timeout: float) -> int:
        """Wait for delivery; return the number of messages not delivered."""
        ...


def parse_interval(text: str) -> float:
    """``900``, ``15m``, ``30s``, ``1h`` to seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an interval like 900, 30s, 15m or 1h")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def parse_fault_rate(text: str) -> tuple[FaultCode, float]:
    name, _, value = text.partition("=")
    try:
        code = FaultCode(name.strip().upper())
        rate = float(value)
    except ValueError:
        kinds = ", ".join(str(c) for c in STATELESS_FAULTS)
        raise argparse.ArgumentTypeError(
            f"{text!r} is not KIND=RATE with KIND in {kinds}"
        ) from None
    return code, rate


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--meters", type=int, default=100, help="fleet size (default 100)")
    parser.add_argument("--mode", choices=("live", "backfill"), default="live")
    parser.add_argument("--days", type=float, default=1.0, help="backfill: days before --end-date")
    parser.add_argument(
        "--end-date",
        type=date.fromisoformat,
        default=None,
        help="backfill: YYYY-MM-DD (default today)",
    )
    parser.add_argument(
        "--interval", type=parse_interval, default=900.0, help="reading interval (900, 15m, 30s)"
    )
    parser.add_argument(
        "--rate", type=float, default=None, help="live: at most this many messages/s"
    )
    parser.add_argument("--count", type=int, default=None, help="stop after this many messages")
    parser.add_argument(
        "--duration", type=parse_interval, default=None, help="live: stop after this long"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="reproducible fleet, values and faults"
    )
    parser.add_argument(
        "--format", dest="message_format", choices=("contract", "legacy"), default="contract"
    )
    parser.add_argument(
        "--fault-rate",
        type=parse_fault_rate,
        action="append",
        default=None,
        metavar="KIND=RATE",
        help="rate of one fault kind, e.g. SENTINEL=0.01 (repeatable; default 0.002 each)",
    )
    parser.add_argument(
        "--malformed-rate",
        type=float,
        default=None,
        help="share of malformed messages (default 0.001)",
    )
    parser.add_argument("--no-faults", action="store_true", help="inject nothing")
    parser.add_argument(
        "--no-registry", action="store_true", help="do not write the fleet registry"
    )


def _fault_rates(args: argparse.Namespace) -> FaultRates:
    if args.no_faults:
        return FaultRates.none()
    default = FaultRates.default()
    rates = dict(args.fault_rate) if args.fault_rate else dict(default.rates)
    malformed = default.malformed if args.malformed_rate is None else args.malformed_rate
    return FaultRates(rates, malformed)


class ProgressLine:
    """One updating line on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, every: float | None = None) -> None:
        self.tty = sys.stderr.isatty()
        self.every = every if every is not None else (0.5 if self.tty else 5.0)
        self.last = 0.0

    def show(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        if self.tty:
            print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def _summary_text(summary: Summary, undelivered: int) -> str:
    faults = ", ".join(f"{k} {v:,}" for k, v in sorted(summary.faults.items())) or "none"
    malformed = ", ".join(f"{k} {v:,}" for k, v in sorted(summary.malformed.items())) or "none"
    return (
        f"sent {summary.sent:,} messages ({summary.rate:,.0f}/s): valid {summary.valid:,}\n"
        f"  faults injected: {faults}\n"
        f"  malformed: {malformed}\n"
        f"  event time: {summary.first_event} .. {summary.last_event}"
        + (f"\n  UNDELIVERED: {undelivered:,}" if undelivered else "")
    )


def run_simulate(args: argparse.Namespace, settings: Settings, sink: Sink) -> int:
    """Simulate until done or interrupted (Ctrl-C/SIGTERM), flush, print the summary."""
    config = SimulationConfig(
        meters=args.meters,
        interval_s=args.interval,
        mode=args.mode,
        days=args.days,
        end=args.end_date,
        seed=args.seed,
        faults=_fault_rates(args),
        message_format=args.message_format,
        rate=args.rate,
        limit=args.count,
        duration_s=args.duration,
        rules=settings.rules,
    )
    fleet = None
    if config.message_format == "contract":
        fleet = build_fleet(config.meters, config.seed)
        if not args.no_registry:
            print(f"fleet registry: {write_registry(fleet, settings.lake_path)}", file=sys.stderr)
    line = ProgressLine()
    stop = threading.Event()

    def progress(summary: Summary) -> None:
        line.show(
            f"sent {summary.sent:,} ({summary.rate:,.0f}/s), "
            f"faults {sum(summary.faults.values()):,}, "
            f"malformed {sum(summary.malformed.values()):,}, at {summary.last_event}"
        )

    summary = Summary()
    try:
        simulate(config, sink.emit, stop.is_set, progress, fleet, summary)
    except KeyboardInterrupt:
        stop.set()
        print("\ninterrupted: flushing what was sent", file=sys.stderr)
    finally:
        line.done()
    undelivered = sink.flush(60)
    print(_summary_text(summary, undelivered))
    if undelivered:
        print(f"meterflow simulate: {undelivered} messages were not delivered", file=sys.stderr)
        return 1
    return 0


def start_background_simulation(
    settings: Settings,
    sink: Sink,
    stop: threading.Event,
    meters: int,
    interval: str,
    seed: int | None,
) -> threading.Thread:
    """A live fleet feeding Kafka from a thread, for ``meterflow run``."""
    fleet = build_fleet(meters, seed)
    write_registry(fleet, settings.lake_path)
    config = SimulationConfig(
        meters=meters,
        interval_s=parse_interval(interval),
        mode="live",
        seed=seed,
        rules=settings.rules,
    )
    thread = threading.Thread(
        target=simulate,
        args=(config, sink.emit, stop.is_set, None, fleet),
        name="simulator",
        daemon=True,
    )
    thread.start()
    return thread


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file", type=Path, help="UCI household_power_consumption.txt or an AMPds2 CSV"
    )
    parser.add_argument("--device-id", default=None, help="default: type prefix + file name")
    parser.add_argument("--meter-type", type=MeterType, choices=list(MeterType), default=None)
    parser.add_argument(
        "--speedup", type=float, default=0.0, help="N times real time; 0 = as fast as possible"
    )
    parser.add_argument(
        "--rebase", action="store_true", help="shift timestamps so the first row is now"
    )
    parser.add_argument("--count", type=int, default=None, help="stop after this many rows")


def run_replay(args: argparse.Namespace, settings: Settings, sink: Sink) -> int:
    if not args.file.is_file():
        print(f"meterflow replay: {args.file} does not exist", file=sys.stderr)
        return 2
    line = ProgressLine()
    stop = threading.Event()
    summary = ReplaySummary()
    try:
        replay(
            args.file,
            sink.emit,
            device_id=args.device_id,
            meter_type=args.meter_type,
            speedup=args.speedup,
            rebase=args.rebase,
            limit=args.count,
            should_stop=stop.is_set,
            progress=lambda s: line.show(
                f"sent {s.sent:,} rows, {s.missing_values:,} missing values"
            ),
            summary=summary,
        )
    except ReplayError as exc:
        print(f"meterflow replay: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        stop.set()
        print("\ninterrupted: flushing what was sent", file=sys.stderr)
    finally:
        line.done()
    undelivered = sink.flush(60)
    print(
        f"replayed {args.file.name}: {summary.rows:,} rows, sent {summary.sent:,}, "
        f"missing values {summary.missing_values:,} (sent without the metric), "
        f"bad rows {summary.bad_rows:,}"
        + (f" (lines {', '.join(map(str, summary.bad_lines))})" if summary.bad_lines else "")
    )
    return 1 if undelivered else 0
