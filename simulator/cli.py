"""``meterflow simulate`` and ``meterflow replay``: arguments, progress, shutdown, summary.

``meterflow.cli`` owns the command and the Kafka producer; this module owns what the two
commands do with a :class:`~simulator.sink.Sink`::

    add_simulate_arguments(subparser)
    ...
    return run_simulate(args, settings, sink)  # 0 ok, 1 failed while sending, 2 bad input

SIGINT and SIGTERM stop a run cleanly: the current time step finishes, the sink is
flushed and the summary printed (a second signal gives up at once). Progress goes to
stderr (one updating line on a terminal, a plain line every few seconds otherwise), the
summary to stdout, and a failure ends in one line on stderr saying why.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any, TextIO

from meterflow.core.config import Settings
from meterflow.core.contract import STATEFUL_FAULTS, STATELESS_FAULTS, FaultCode, MeterType
from meterflow.core.logs import get_logger
from meterflow.core.messages import DeadLetterReason
from meterflow.core.signals import signals_handled
from meterflow.core.thresholds import Rules
from meterflow.core.timestamps import SECONDS_PER_DAY
from simulator.episodes import default_ground_truth_path, write_ground_truth
from simulator.faults import (
    DEFAULT_EPISODE_RATE,
    DEFAULT_FAULT_RATE,
    DEFAULT_MALFORMED_RATE,
    DEMO_EPISODE_RATES,
    EPISODE_SIZES,
    FIELD_SIZES,
    EpisodeRates,
    FaultRates,
    parse_rate_table,
)
from simulator.fleet import DEFAULT_MIX, build_fleet, write_registry
from simulator.generator import FORMATS, MODES, Simulation, SimulationConfig, Summary
from simulator.registers import (
    DEFAULT_GAPS_PER_METER_DAY,
    DEFAULT_REPEAT_SHARE,
    DEFAULT_SHARES,
    GAP_MAX,
    ReadingShares,
    default_truth_path,
    write_truth,
)
from simulator.replay import ReplayError, ReplaySummary, replay
from simulator.sink import Sink

log = get_logger("simulator.cli")

#: How long the final flush may wait for the broker before messages count as undelivered.
FLUSH_TIMEOUT_S = 60.0
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": SECONDS_PER_DAY}
#: ``--late-max``: a late radio's readings arrive within the hour.
DEFAULT_LATE_MAX_S = 3600.0


def parse_seconds(text: str) -> float:
    """``900``, ``30s``, ``15m``, ``1h`` or ``1d`` to seconds (above 0)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 900, 30s, 15m or 1h")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_fault_rates(text: str) -> dict[FaultCode, float]:
    """``--fault-rates``: ``default``, ``none`` or ``KIND=RATE,...`` (unlisted kinds: 0)."""
    choice = text.strip().lower()
    if choice == "default":
        return dict(FaultRates.default().rates)
    if choice == "none":
        return {}
    try:
        return parse_rate_table(text)
    except ValueError as exc:
        if any(str(code) in text.upper() for code in STATEFUL_FAULTS):
            exc = ValueError(f"{exc} (stateful kinds: --episode-rate KIND=RATE per meter-day)")
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_fault_rate(text: str) -> tuple[FaultCode, float]:
    """One ``--fault-rate KIND=RATE``."""
    table = parse_fault_rates(text)
    if len(table) != 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not one KIND=RATE")
    return next(iter(table.items()))


def parse_episode_rates(text: str) -> dict[FaultCode, float]:
    """``--episode-rates``: ``default``, ``none`` or ``KIND=RATE,...`` per meter-day."""
    choice = text.strip().lower()
    if choice == "default":
        return dict(EpisodeRates.default().rates)
    if choice == "none":
        return {}
    try:
        return parse_rate_table(text, STATEFUL_FAULTS)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_demo_episode_rates(text: str) -> dict[FaultCode, float]:
    """``meterflow run --episodes``: ``demo`` (:data:`DEMO_EPISODE_RATES`), ``none`` or
    ``KIND=RATE,...`` per meter-day."""
    if text.strip().lower() == "demo":
        return dict(DEMO_EPISODE_RATES)
    return parse_episode_rates(text)


def parse_episode_rate(text: str) -> tuple[FaultCode, float]:
    """One ``--episode-rate KIND=RATE``."""
    table = parse_episode_rates(text)
    if len(table) != 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not one KIND=RATE")
    return next(iter(table.items()))


def parse_mix(text: str) -> dict[MeterType, float]:
    """``electricity=0.5,water=0.3,gas=0.2`` (types left out get no meters)."""
    mix: dict[MeterType, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, share = item.partition("=")
        try:
            mix[MeterType(name.strip().lower())] = float(share)
        except ValueError:
            types = ", ".join(MeterType)
            raise argparse.ArgumentTypeError(
                f"{item!r} is not TYPE=SHARE, TYPE in {types}"
            ) from None
    return mix


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--meters", type=int, default=100, help="fleet size (default 100)")
    parser.add_argument(
        "--mode", choices=MODES, default="live", help="live (default) or backfill of past days"
    )
    parser.add_argument(
        "--days", type=float, default=1.0, help="backfill: days before --end-date (default 1)"
    )
    parser.add_argument(
        "--end-date",
        type=date.fromisoformat,
        default=None,
        metavar="YYYY-MM-DD",
        help="backfill: stop at 00:00 UTC of this day (default today)",
    )
    parser.add_argument(
        "--interval", type=parse_seconds, default=900.0, help="reading interval (default 15m)"
    )
    parser.add_argument("--rate", type=float, default=None, help="at most this many messages/s")
    parser.add_argument("--count", type=int, default=None, help="stop after this many messages")
    parser.add_argument(
        "--duration", type=parse_seconds, default=None, help="stop after this long (e.g. 10m)"
    )
    parser.add_argument("--seed", type=int, default=None, help="reproducible fleet and stream")
    parser.add_argument(
        "--format",
        dest="message_format",
        choices=FORMATS,
        default="contract",
        help="legacy: the prototype's em1..em4/wm1..wm4 messages",
    )
    parser.add_argument(
        "--mix",
        type=parse_mix,
        default=dict(DEFAULT_MIX),
        metavar="TYPE=SHARE,...",
        help="meter types' shares (default electricity=0.5,water=0.3,gas=0.2)",
    )
    parser.add_argument(
        "--fault-rates",
        type=parse_fault_rates,
        default=None,
        metavar="default|none|KIND=RATE,...",
        help=f"the whole fault table (default: {DEFAULT_FAULT_RATE:g} for each kind)",
    )
    parser.add_argument(
        "--fault-rate",
        type=parse_fault_rate,
        action="append",
        default=[],
        metavar="KIND=RATE",
        help=f"set one kind's rate on top of the table (repeatable); KIND: "
        f"{', '.join(STATELESS_FAULTS)}",
    )
    parser.add_argument(
        "--malformed-rate",
        type=float,
        default=DEFAULT_MALFORMED_RATE,
        help=f"share of malformed messages (default {DEFAULT_MALFORMED_RATE:g})",
    )
    parser.add_argument(
        "--episode-rates",
        type=parse_episode_rates,
        default={},
        metavar="default|none|KIND=RATE,...",
        help="stateful fault episodes started per meter and day (LEAK: per water meter-day), "
        f"KIND: {', '.join(STATEFUL_FAULTS)} (default none; 'default': "
        f"{DEFAULT_EPISODE_RATE:g} each): STUCK repeats one value, SPIKE is one reading "
        "above the meter's typical level, LEAK adds a flow for over a day, NO_DATA sends "
        "nothing; sized by --episode-sizes. Episodes never overlap each other or a "
        "stateless fault",
    )
    parser.add_argument(
        "--episode-rate",
        type=parse_episode_rate,
        action="append",
        default=[],
        metavar="KIND=RATE",
        help="set one episode kind's rate on top of --episode-rates (repeatable)",
    )
    parser.add_argument(
        "--episode-sizes",
        choices=EPISODE_SIZES,
        default=FIELD_SIZES,
        help="field (default): sizes drawn log-uniform from field-like ranges that know "
        "nothing of the detection thresholds, so some episodes are too small for any rule "
        "(STUCK 30 min-48 h, SPIKE 2-100x the typical level, LEAK 0.5-50 L/h for 30-78 h, "
        "NO_DATA 15 min-3 days); rules: sized from the thresholds so that each trips its "
        "rule (STUCK 12-48 readings, SPIKE 30x, LEAK 3-8x the night threshold for 30-54 h, "
        "NO_DATA 8-96 intervals)",
    )
    parser.add_argument(
        "--ground-truth",
        default=None,
        metavar="PATH",
        help="write every injected episode (device_id, meter_type, fault_code, start, end: "
        "event times of the first and last affected or missing reading, readings, value, "
        "size, complete) to PATH when the run ends: JSON lines if PATH ends .jsonl, else Parquet "
        "(default with episodes: LAKE_PATH/registry/ground_truth.parquet)",
    )
    parser.add_argument(
        "--register-share",
        type=float,
        default=DEFAULT_SHARES.register_only,
        help="share of meters that send a cumulative register only "
        f"(default {DEFAULT_SHARES.register_only:g})",
    )
    parser.add_argument(
        "--both-share",
        type=float,
        default=DEFAULT_SHARES.both,
        help="share of electricity and gas meters that send usage and a register "
        f"(default {DEFAULT_SHARES.both:g})",
    )
    parser.add_argument(
        "--rollover-share",
        type=float,
        default=DEFAULT_SHARES.near_rollover,
        help="share of register meters whose register rolls over on the run's second UTC "
        f"day (default {DEFAULT_SHARES.near_rollover:g})",
    )
    parser.add_argument(
        "--gap-rate",
        type=float,
        default=DEFAULT_GAPS_PER_METER_DAY,
        help=f"gaps of 1-{GAP_MAX} readings that never arrive, per meter-day "
        f"(default {DEFAULT_GAPS_PER_METER_DAY:g})",
    )
    parser.add_argument(
        "--repeat-share",
        type=float,
        default=DEFAULT_REPEAT_SHARE,
        help=f"share of readings sent twice (default {DEFAULT_REPEAT_SHARE:g})",
    )
    parser.add_argument(
        "--clock-jitter",
        type=parse_seconds,
        default=0.0,
        metavar="SECONDS",
        help="move each reading's timestamp by a random whole number of seconds up to this "
        "either way, as a meter's clock does (below half the interval; default 0)",
    )
    parser.add_argument(
        "--late-share",
        type=float,
        default=0.0,
        help="share of meters whose radio delivers every reading late, in order, by a whole "
        "number of intervals of their own up to --late-max (default 0)",
    )
    parser.add_argument(
        "--late-max",
        type=parse_seconds,
        default=DEFAULT_LATE_MAX_S,
        metavar="SECONDS",
        help=f"the latest a late meter's readings arrive (default {DEFAULT_LATE_MAX_S:g} s)",
    )
    parser.add_argument(
        "--constant-load-share",
        type=float,
        default=0.0,
        help="share of electricity meters on a constant load, a pump (the same every "
        "interval) or street lighting (the same from 18:00 to 06:00 UTC, 0 by day); the "
        "registry marks them constant_load (default 0)",
    )
    parser.add_argument(
        "--consumption-truth",
        default=None,
        metavar="PATH",
        help="write what each meter really consumed per local day (device_id, date, "
        "consumption, intervals) to PATH as Parquet when the run ends "
        "(default: LAKE_PATH/registry/consumption_truth.parquet, unless --no-registry)",
    )
    parser.add_argument(
        "--registry",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write the fleet registry to LAKE_PATH/registry (default yes)",
    )


def config_from_args(
    args: argparse.Namespace, rules: Rules, timezone: str = "UTC"
) -> SimulationConfig:
    """The run ``meterflow simulate`` arguments describe; ValueError names a bad one."""
    table = FaultRates.default().rates if args.fault_rates is None else args.fault_rates
    table = {**table, **dict(args.fault_rate)}
    return SimulationConfig(
        meters=args.meters,
        interval_s=args.interval,
        mode=args.mode,
        days=args.days,
        end=args.end_date,
        seed=args.seed,
        faults=FaultRates(table, args.malformed_rate),
        message_format=args.message_format,
        rate=args.rate,
        limit=args.count,
        duration_s=args.duration,
        mix=args.mix,
        rules=rules,
        episodes=EpisodeRates({**args.episode_rates, **dict(args.episode_rate)}),
        **defects_from_args(args),
        timezone=timezone,
        episode_sizes=args.episode_sizes,
        clock_jitter_s=args.clock_jitter,
        late_share=args.late_share,
        late_max_s=args.late_max,
        constant_load_share=args.constant_load_share,
    )


def defects_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The registers, gaps and repeats a legacy-format run leaves out."""
    if args.message_format == "legacy":
        return {}
    return {
        "shares": ReadingShares(args.register_share, args.both_share, args.rollover_share),
        "gaps_per_meter_day": args.gap_rate,
        "repeat_share": args.repeat_share,
    }


class ProgressLine:
    """Progress on stderr: one line rewritten in place on a terminal, plain lines otherwise."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = 0.25 if self.tty else 5.0
        self.last = time.monotonic()
        self.shown = False

    def show(self, text: str) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        self.last, self.shown = now, True
        if self.tty:
            self.stream.write(f"\r\033[K{text}")
        else:
            self.stream.write(f"{text}\n")
        self.stream.flush()

    def close(self) -> None:
        """End the rewritten line so what follows starts on its own."""
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()


class SignalStop:
    """The first SIGINT/SIGTERM asks the run to stop; a second one gives up at once."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.received: str | None = None

    def _handle(self, signum: int, _frame: object) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        self.event.set()

    @contextmanager
    def installed(self) -> Iterator[SignalStop]:
        """Handle the signals while the block runs (only the main thread can); then restore."""
        with signals_handled(self._handle):
            yield self


def _kinds(counts: Mapping[FaultCode, int] | Mapping[DeadLetterReason, int]) -> str:
    return ", ".join(f"{kind} {n:,}" for kind, n in sorted(counts.items()) if n) or "none"


def summary_text(summary: Summary, undelivered: int) -> str:
    """The final report: every count the pipeline's own totals can be checked against."""
    lines = [
        f"sent {summary.sent:,} messages in {summary.elapsed_s:.1f} s "
        f"({summary.rate:,.0f}/s), event time {summary.first_event} .. {summary.last_event}",
        f"  valid      {summary.valid:,}",
        f"  faults     {summary.abnormal:,} ({_kinds(summary.faults)})",
        f"  malformed  {summary.deadletter:,} ({_kinds(summary.malformed)})",
        f"  sent = valid + faults + malformed: {'yes' if summary.consistent() else 'NO'}",
    ]
    if summary.missing or summary.repeated:
        lines.append(
            f"  withheld   {summary.missing:,} (gaps and silences, not sent); "
            f"repeated {summary.repeated:,} (sent twice, counted valid)"
        )
    if summary.episodes:
        lines.append(
            f"  episodes   {len(summary.episodes):,} ({_kinds(summary.episode_counts)}), "
            f"{summary.missing:,} readings withheld (NO_DATA, not sent)"
        )
    lines.append(f"  undelivered {undelivered:,}")
    return "\n".join(lines)


def _progress_text(summary: Summary) -> str:
    return (
        f"{summary.elapsed_s:7.1f} s  sent {summary.sent:,} ({summary.rate:,.0f}/s)  "
        f"valid {summary.valid:,}  faults {summary.abnormal:,}  "
        f"malformed {summary.deadletter:,}  at {summary.last_event}"
    )


def _fail(command: str, reason: str, code: int) -> int:
    print(f"meterflow {command}: {' '.join(reason.split())}", file=sys.stderr)
    return code


def _drive(
    command: str, sink: Sink, work: Callable[[threading.Event, ProgressLine], object]
) -> tuple[tuple[str, int] | None, int]:
    """Run ``work`` under the signal handlers, then flush: ``(failure, undelivered)``.

    A sink failure is reported after flushing what went out; a :class:`ReplayError` is a
    usage error (the file is not a recording).
    """
    failure: tuple[str, int] | None = None
    progress = ProgressLine()
    with SignalStop().installed() as stop:
        try:
            work(stop.event, progress)
        except ReplayError as exc:
            failure = (str(exc), EXIT_USAGE)
        except Exception as exc:
            log.debug("%s=failed", command, exc_info=True)
            failure = (f"sending failed: {exc}", EXIT_FAILED)
        finally:
            progress.close()
        undelivered = sink.flush(FLUSH_TIMEOUT_S)
    if stop.received:
        print(f"stopped by {stop.received}", file=sys.stderr)
    return failure, undelivered


def run_simulate(args: argparse.Namespace, settings: Settings, sink: Sink) -> int:
    """Simulate into ``sink`` until done or signalled, flush, print the summary; exit code."""
    try:
        config = config_from_args(args, settings.rules, settings.timezone)
        fleet = None
        if config.message_format == "contract":
            fleet = build_fleet(
                config.meters, config.seed, config.mix, config.shares, config.constant_load_share
            )
        simulation = Simulation(config, fleet)
        if fleet is not None and args.registry:
            where = write_registry(fleet, settings.registry_path, config.interval_s)
            print(f"fleet registry: {len(fleet):,} meters in {where}", file=sys.stderr)
    except ValueError as exc:
        return _fail("simulate", str(exc), EXIT_USAGE)
    except OSError as exc:
        return _fail("simulate", f"cannot write the fleet registry: {exc}", EXIT_FAILED)

    summary = Summary()
    failure, undelivered = _drive(
        "simulate",
        sink,
        lambda stop, progress: simulation.run(
            sink.emit, stop, lambda s: progress.show(_progress_text(s)), summary
        ),
    )
    print(summary_text(summary, undelivered))
    if config.episodes.active or args.ground_truth:
        path = args.ground_truth or default_ground_truth_path(settings.registry_path)
        try:
            where = write_ground_truth(summary.episodes, path)
        except OSError as exc:
            failure = failure or (f"cannot write the ground truth: {exc}", EXIT_FAILED)
        else:
            print(f"ground truth: {len(summary.episodes):,} episodes in {where}", file=sys.stderr)
    if summary.truth is not None and (args.consumption_truth or args.registry):
        path = args.consumption_truth or default_truth_path(settings.registry_path)
        try:
            where = write_truth(summary.truth, path)
        except OSError as exc:
            failure = failure or (f"cannot write the consumption truth: {exc}", EXIT_FAILED)
        else:
            print(
                f"consumption truth: {len(summary.truth.days):,} days in {where}", file=sys.stderr
            )
    if failure is not None:
        return _fail("simulate", *failure)
    if undelivered:
        return _fail(
            "simulate", f"{undelivered:,} messages were not delivered to Kafka", EXIT_FAILED
        )
    return EXIT_OK


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file", type=Path, help="UCI household_power_consumption.txt or an AMPds2 CSV export"
    )
    parser.add_argument(
        "--device-id", default=None, help="default: the type's prefix and the file name"
    )
    parser.add_argument(
        "--meter-type",
        type=MeterType,
        choices=list(MeterType),
        default=None,
        help="default: from the header, or for counter files from the name (gas/water)",
    )
    parser.add_argument(
        "--speedup",
        type=float,
        default=0.0,
        help="play N times faster than recorded; 0 (default) = as fast as possible",
    )
    parser.add_argument(
        "--rebase", action="store_true", help="move the first row to now, the rest alike"
    )
    parser.add_argument("--count", type=int, default=None, help="stop after this many messages")


def replay_summary_text(path: Path, summary: ReplaySummary, undelivered: int) -> str:
    lines = [
        f"replayed {path.name}: {summary.rows:,} rows, sent {summary.sent:,} in "
        f"{summary.elapsed_s:.1f} s, event time {summary.first_event} .. {summary.last_event}",
        f"  missing values {summary.missing_values:,} (sent without the metric)",
        f"  baseline rows  {summary.baseline_rows:,} (first counter value, not sent)",
        f"  bad rows       {summary.bad_rows:,}",
        *(f"    line {line_no}: {reason}" for line_no, reason in summary.bad_lines),
        f"  undelivered    {undelivered:,}",
    ]
    return "\n".join(lines)


def run_replay(args: argparse.Namespace, settings: Settings, sink: Sink) -> int:
    """Replay ``args.file`` into ``sink``; same signals, progress and exit codes as simulate."""
    if args.speedup < 0:
        return _fail("replay", "--speedup must be 0 (as fast as possible) or above", EXIT_USAGE)
    summary = ReplaySummary()
    failure, undelivered = _drive(
        "replay",
        sink,
        lambda stop, progress: replay(
            args.file,
            sink.emit,
            device_id=args.device_id,
            meter_type=args.meter_type,
            speedup=args.speedup,
            rebase=args.rebase,
            limit=args.count,
            should_stop=stop,
            progress=lambda s: progress.show(
                f"{s.elapsed_s:7.1f} s  rows {s.rows:,}  sent {s.sent:,}  "
                f"missing {s.missing_values:,}  bad {s.bad_rows:,}  at {s.last_event}"
            ),
            summary=summary,
        ),
    )
    if failure is not None and failure[1] == EXIT_USAGE:
        return _fail("replay", *failure)
    print(replay_summary_text(args.file, summary, undelivered))
    if failure is not None:
        return _fail("replay", *failure)
    if undelivered:
        return _fail("replay", f"{undelivered:,} messages were not delivered to Kafka", EXIT_FAILED)
    return EXIT_OK
