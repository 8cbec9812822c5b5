"""The simulator's core: a fleet and a clock in, keyed contract messages out, and a true count.

:func:`simulate` runs one of two modes:

* ``backfill``: ``days`` of past readings ending at ``end`` (default: the start of today,
  UTC) or at the moment ``until_s``, every meter every ``interval_s``, in event-time order
  and as fast as the ``emit`` callable takes them. A reading stamped ``t`` reports the
  interval that ends at ``t`` (the contract's convention: the 00:00 reading closes the day
  before), so each day holds exactly ``86400 / interval`` readings a meter. A ``rate``
  cap (messages per second) slows it down to protect a shared broker.
* ``live``: every ``interval_s`` each meter reports the interval that just ended, stamped
  with the current time. When the fleet cannot report within one interval at the rate
  cap, readings come less often: the cap wins. From ``since_s``, a moment in the past
  (where a backfill ended), the steps up to now go out at once first, on the same grid,
  so the meters show no gap between the two.

and one of two formats: ``contract`` (a Faker fleet, ``meter_type`` and three-decimal
values) or ``legacy`` (the prototype's eight meters ``em1..em4``, ``wm1..wm4`` with
integer values and no ``meter_type``, byte for byte as ``json.dumps`` wrote them), both
written by :mod:`simulator.formats`.

Faults are injected at the configured rates (:mod:`simulator.faults`) and every emitted
message is counted in the :class:`Summary` under the outcome the contract will give it.
Stateful episodes (stuck, spike, leak, silent; :mod:`simulator.episodes`) are injected at
their rates per meter-day, sized from the detection rules or from field-like ranges, and
recorded in ``Summary.episodes`` as ground truth. Healthy meters can behave like real
ones: clocks that jitter and radios that deliver late (:mod:`simulator.delivery`),
constant loads and night use (:mod:`simulator.load`).
The same seed and configuration (and ``end`` date) give byte-identical streams; with no
episodes asked for, the stream is the one this module gave before episodes existed.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import numpy as np

from meterflow.core.contract import (
    FaultCode,
    MeterType,
    Status,
)
from meterflow.core.messages import DeadLetterReason
from meterflow.core.thresholds import DetectionRules, Rules
from meterflow.core.timestamps import SECONDS_PER_DAY
from simulator.delivery import ClockJitter, LateRadios
from simulator.episodes import Episode, EpisodeInjector
from simulator.faults import (
    EPISODE_SIZES,
    RULES_SIZES,
    EpisodeRates,
    EpisodeShapes,
    FaultDraws,
    FaultRates,
    check_future_shift,
    plan_episodes,
)
from simulator.fleet import DEFAULT_MIX, Fleet, build_fleet
from simulator.formats import (
    ContractFormat,
    LegacyFormat,
    LegacyValues,
    MessageFormat,
    Step,
    build_step,
)
from simulator.load import DECIMALS, LoadModel
from simulator.registers import (
    GAP_MAX,
    NO_REGISTERS,
    USAGE,
    ConsumptionTruth,
    Defects,
    ReadingShares,
    Registers,
)

Emit = Callable[[bytes, bytes], None]
StopSignal = Callable[[], bool] | threading.Event

MODES = ("backfill", "live")
FORMATS = ("contract", "legacy")
#: Readings computed per numpy call in a backfill (time steps x meters): big enough to
#: amortise the call, small enough to stay in cache-friendly memory.
BLOCK_CELLS = 1 << 18
#: A rate cap is enforced in slices of this many seconds' worth of messages.
PACE_SLICE_S = 0.05
#: How often a stop request given as a callable is looked at during a wait.
POLL_S = 0.1


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate; by default a one-day backfill of 100 meters with a few faults."""

    meters: int = 100
    interval_s: float = 900.0
    mode: str = "backfill"
    days: float = 1.0  # backfill: how many days before ``end``
    end: date | None = None  # backfill: readings stop at 00:00 UTC of this day; default today
    #: backfill: readings stop at this moment (epoch seconds, e.g. now) instead of ``end``.
    until_s: float | None = None
    #: live: the first reading's stamp (epoch seconds, in the past): the readings from there
    #: up to now go out at once, then one every interval on the same grid.
    since_s: float | None = None
    seed: int | None = None
    faults: FaultRates = field(default_factory=FaultRates.default)
    message_format: str = "contract"
    rate: float | None = None  # at most this many messages per second
    limit: int | None = None  # stop after this many messages
    duration_s: float | None = None  # stop after this many seconds
    mix: Mapping[MeterType, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    rules: Rules = field(default_factory=Rules)
    #: Stateful episodes per meter-day (none by default) and the rules they must trip.
    episodes: EpisodeRates = field(default_factory=EpisodeRates.none)
    detection: DetectionRules = field(default_factory=DetectionRules)
    #: How long into the run a meter's first episode may start; default the detection
    #: rules' ``baseline_history_s``, so that every episode has a normal day before it ...
    episode_warmup_s: float | None = None
    #: ... and how long every meter has been reporting before this run (a backfill just
    #: sent): it counts towards the history that a SPIKE's baseline needs.
    history_s: float = 0.0
    #: Which meters report registers (:mod:`simulator.registers`; none by default) ...
    shares: ReadingShares = NO_REGISTERS
    #: ... gaps started per meter-day, the share of readings sent twice ...
    gaps_per_meter_day: float = 0.0
    repeat_share: float = 0.0
    max_gap: int = GAP_MAX  # readings
    #: ... and the zone whose local days the consumption truth is added up in.
    timezone: str = "UTC"
    #: What episodes are sized from: "rules" (every one trips its rule) or "field"
    #: (field-like ranges, so some are too small for any rule; :mod:`simulator.episodes`).
    episode_sizes: str = RULES_SIZES
    #: Healthy meters that behave like real ones (:mod:`simulator.delivery`): timestamps
    #: off by up to this many whole seconds either way (below half the interval) ...
    clock_jitter_s: float = 0.0
    #: ... this share of the meters delivering every reading late, each by its own whole
    #: number of intervals up to ``late_max_s`` ...
    late_share: float = 0.0
    late_max_s: float = 0.0
    #: ... and this share of the electricity meters on a constant load (:mod:`simulator.load`).
    constant_load_share: float = 0.0

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.mode not in MODES:
            problems.append(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.message_format not in FORMATS:
            problems.append(f"format {self.message_format!r} is not one of {', '.join(FORMATS)}")
        if self.message_format == "legacy" and self.episodes.active:
            problems.append("stateful episodes need the contract format's fleet")
        if self.meters < 1:
            problems.append("meters must be at least 1")
        if self.interval_s < 1 or not float(self.interval_s).is_integer():
            problems.append("the interval must be whole seconds (so are the timestamps)")
        if self.days <= 0:
            problems.append("days must be above 0")
        if self.until_s is not None and (self.mode != "backfill" or self.end is not None):
            problems.append("until_s is a backfill's end, instead of an end date")
        if self.since_s is not None and self.mode != "live":
            problems.append("since_s is where a live run starts")
        if (self.episode_warmup_s or 0) < 0 or self.history_s < 0:
            problems.append("the episodes' warm-up and the history must not be negative")
        if self.rate is not None and self.rate <= 0:
            problems.append("the rate must be above 0")
        if self.limit is not None and self.limit < 0:
            problems.append("the count must not be negative")
        if self.duration_s is not None and self.duration_s <= 0:
            problems.append("the duration must be above 0")
        if self.gaps_per_meter_day < 0 or not 0 <= self.repeat_share <= 1 or self.max_gap < 1:
            problems.append(
                "the gap rate must not be negative, the repeat share must be 0-1, "
                "and a gap at least one reading long"
            )
        if self.message_format == "legacy" and (
            self.shares.active or self.gaps_per_meter_day or self.repeat_share
        ):
            problems.append("registers, gaps and repeats need the contract format's fleet")
        problems += self._field_problems()
        if problems:
            raise ValueError("; ".join(problems))

    def _field_problems(self) -> list[str]:
        """What is wrong with the options that make a run field-like: the episode sizes
        and the healthy meters' behaviours."""
        problems: list[str] = []
        if self.episode_sizes not in EPISODE_SIZES:
            sizes = ", ".join(EPISODE_SIZES)
            problems.append(f"episode sizes {self.episode_sizes!r} are not one of {sizes}")
        if not 0 <= self.clock_jitter_s < self.interval_s / 2:
            problems.append(
                "the clock jitter must be 0 or above and below half the interval "
                "(or a meter's timestamps would go out of order)"
            )
        elif self.clock_jitter_s > self.rules.future_tolerance_s:
            problems.append(
                "the clock jitter must not exceed the future tolerance "
                f"({self.rules.future_tolerance_s:g} s), or live readings would be "
                "FUTURE_TIMESTAMP faults"
            )
        if not 0 <= self.late_share <= 1 or self.late_max_s < 0:
            problems.append("the late share must be 0-1 and the late maximum not negative")
        elif self.late_share and self.late_max_s < self.interval_s:
            problems.append("late meters need a late maximum of at least one interval")
        if not 0 <= self.constant_load_share <= 1:
            problems.append("the constant-load share must be 0-1")
        if self.message_format == "legacy" and (
            self.clock_jitter_s or self.late_share or self.constant_load_share
        ):
            problems.append(
                "clock jitter, late meters and constant loads need the contract format's fleet"
            )
        return problems


@dataclass
class Summary:
    """What a run emitted, by the outcome the contract gives each message.

    ``sent == valid + sum(faults.values()) + sum(malformed.values())`` always holds
    (:meth:`consistent`), also for a run cut short. ``first_event``/``last_event`` are the
    stamps of the earliest and latest time step sent (injected future timestamps and a
    clock's jitter aside).

    Stateful episodes do not change that sum: stuck, spike and leak readings are valid
    readings to the stateless rules (counted in ``valid``), and a silent meter's readings
    are not sent at all (counted in ``missing``, not in ``sent``). ``episodes`` is the
    ground truth: every injected episode, as far as the run got, in the order their first
    readings went out (the order they began, unless a late radio held one back).
    """

    sent: int = 0
    valid: int = 0
    faults: Counter[FaultCode] = field(default_factory=Counter)
    malformed: Counter[DeadLetterReason] = field(default_factory=Counter)
    first_event: str | None = None
    last_event: str | None = None
    elapsed_s: float = 0.0
    missing: int = 0
    episodes: list[Episode] = field(default_factory=list)
    repeated: int = 0  # readings sent a second time (counted in ``sent`` and ``valid``)
    truth: ConsumptionTruth | None = None

    @property
    def abnormal(self) -> int:
        return sum(self.faults.values())

    @property
    def deadletter(self) -> int:
        return sum(self.malformed.values())

    @property
    def rate(self) -> float:
        """Messages per second over the run so far."""
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def episode_counts(self) -> Counter[FaultCode]:
        """Injected episodes by the stateful code that should flag them."""
        return Counter(episode.code for episode in self.episodes)

    def consistent(self) -> bool:
        return self.sent == self.valid + self.abnormal + self.deadletter

    def expected_outcomes(self) -> dict[Status, int]:
        """How many messages the pipeline must find valid, abnormal and dead-lettered."""
        return {
            Status.VALID: self.valid,
            Status.ABNORMAL: self.abnormal,
            Status.DEADLETTER: self.deadletter,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "valid": self.valid,
            "faults": {str(k): v for k, v in sorted(self.faults.items())},
            "malformed": {str(k): v for k, v in sorted(self.malformed.items())},
            "first_event": self.first_event,
            "last_event": self.last_event,
            "elapsed_s": round(self.elapsed_s, 3),
            "missing": self.missing,
            "repeated": self.repeated,
            "episodes": {str(k): v for k, v in sorted(self.episode_counts.items())},
        }


Progress = Callable[[Summary], None]


def _emit(step: Step, first: int, stop: int, emit: Emit, summary: Summary) -> None:
    """Emit messages ``first:stop`` of a step and count exactly those that went out."""
    done = first  # positions before this one are sent (or silent)
    silent = sorted(i for i in step.silent if first <= i < stop) if step.silent else []
    try:
        for cut in (*silent, stop):  # the runs between silent positions
            for key, message in zip(step.keys[done:cut], step.messages[done:cut], strict=True):
                emit(key, message)
                done += 1
            done = min(cut + 1, stop)
    finally:
        _count(summary, step, first, done)


def _count(summary: Summary, step: Step, first: int, stop: int) -> None:
    injected = 0
    for i, kind in step.injected:
        if first <= i < stop:
            injected += 1
            if isinstance(kind, FaultCode):
                summary.faults[kind] += 1
            else:
                summary.malformed[kind] += 1
    missing = sum(first <= i < stop for i in step.silent) if step.silent else 0
    if step.repeats:
        summary.repeated += max(0, stop - max(first, len(step.keys) - step.repeats))
    if first == 0 and step.truth is not None and summary.truth is not None:
        summary.truth.add(*step.truth)
    for i, episode in step.cells:
        if first <= i < stop:
            if not episode.readings:
                summary.episodes.append(episode)
            episode.record(step.stamp_of(i))
    sent = stop - first - missing
    summary.sent += sent
    summary.valid += sent - injected
    summary.missing += missing
    if sent > 0:  # a late radio's step goes out after later ones
        summary.first_event = min(summary.first_event or step.stamp, step.stamp)
        summary.last_event = max(summary.last_event or step.stamp, step.stamp)


def format_stamp(epoch_s: float) -> str:
    """Epoch seconds to the contract's timestamp, whole seconds, ``Z`` for UTC."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


def backfill_starts(config: SimulationConfig) -> np.ndarray:
    """Epoch seconds of every interval in the ``days`` before ``end`` 00:00 UTC (or before
    ``until_s``), oldest first."""
    today = datetime.now(UTC).date()
    if config.until_s is not None:
        if config.until_s > time.time():
            raise ValueError(f"backfill ends at {format_stamp(config.until_s)}, in the future")
        end_s = config.until_s
    else:
        end = config.end or today
        if end > today:
            raise ValueError(f"backfill ends {end}, after today ({today}): use --mode live")
        end_s = datetime(end.year, end.month, end.day, tzinfo=UTC).timestamp()
    # The epsilon: days computed as seconds / 86400 give those seconds back, whole steps.
    steps = math.floor(config.days * SECONDS_PER_DAY / config.interval_s + 1e-9)
    if steps < 1:
        raise ValueError(f"{config.days:g} days hold no interval of {config.interval_s:g} s")
    return end_s - config.interval_s * np.arange(steps, 0, -1, dtype=np.float64)


class Stopper:
    """A stop request, from a callable or an Event, and sleeps that end as soon as it comes."""

    def __init__(self, should_stop: StopSignal | None) -> None:
        if isinstance(should_stop, threading.Event):
            self.event: threading.Event | None = should_stop
            self.requested: Callable[[], bool] = should_stop.is_set
        else:
            self.event = None
            self.requested = should_stop or (lambda: False)

    def wait_until(self, moment: float) -> None:
        """Sleep until ``moment`` (``time.monotonic``) unless a stop is requested first."""
        while not self.requested() and (left := moment - time.monotonic()) > 0:
            if self.event is not None:
                self.event.wait(left)
            else:
                time.sleep(min(left, POLL_S))


class _Run:
    """State shared by the modes: stop signal, limits, clocks and the running summary."""

    def __init__(
        self,
        config: SimulationConfig,
        emit: Emit,
        should_stop: StopSignal | None,
        progress: Progress | None,
        summary: Summary,
    ) -> None:
        self.config, self.emit, self.progress, self.summary = config, emit, progress, summary
        self.stopper = Stopper(should_stop)
        self.started = time.monotonic()
        self.deadline = None if config.duration_s is None else self.started + config.duration_s
        self.late: LateRadios | None = None

    def finished(self) -> bool:
        limit = self.config.limit
        return (
            self.stopper.requested()
            or (limit is not None and self.summary.sent >= limit)
            or (self.deadline is not None and time.monotonic() >= self.deadline)
        )

    def room(self, wanted: int) -> int:
        """How many of ``wanted`` messages the count limit still allows."""
        limit = self.config.limit
        return wanted if limit is None else max(0, min(wanted, limit - self.summary.sent))

    def wait_until(self, moment: float) -> None:
        """Sleep until ``moment``, the deadline or a stop request, whichever comes first."""
        self.stopper.wait_until(moment if self.deadline is None else min(moment, self.deadline))

    def tick(self) -> None:
        self.summary.elapsed_s = time.monotonic() - self.started
        if self.progress is not None:
            self.progress(self.summary)


class _StepMaker:
    """Readings for a block of time steps: values and fault draws in one numpy call each."""

    def __init__(
        self,
        simulation: Simulation,
        values_rng: np.random.Generator,
        draws: FaultDraws,
        idle_rng: np.random.Generator,
        episodes: EpisodeInjector | None,
        defects: Defects | None = None,
        jitter: ClockJitter | None = None,
    ) -> None:
        self.simulation, self.values_rng, self.draws = simulation, values_rng, draws
        self.idle_rng, self.episodes, self.defects = idle_rng, episodes, defects
        self.jitter = jitter

    def __call__(
        self, starts: np.ndarray, stamps: list[str], stamps_s: np.ndarray | None = None
    ) -> list[Step]:
        """Steps for intervals ``starts``; ``stamps_s`` are their event times (default the
        starts)."""
        simulation = self.simulation
        config, fmt, model = simulation.config, simulation.fmt, simulation.model
        usage, flow = model.sample(starts, config.interval_s, self.values_rng, self.idle_rng)
        codes = self.draws.draw(usage.shape)
        ends = starts if stamps_s is None else stamps_s
        registers = simulation.registers
        sent_registers: np.ndarray | None = None
        if registers is not None and isinstance(model, LoadModel):
            sent_registers = registers.at(ends)
            columns = registers.columns
            usage[:, columns] = registers.usage(ends, sent_registers)
            flow[:, columns] = np.clip(
                np.round(usage[:, columns] / (config.interval_s / 60.0), DECIMALS),
                0.0,
                model.flow_cap,
            )
            codes[:, registers.only] = 0  # faults are drawn on usage readings
        truth = usage.copy() if simulation.truth_wanted else None
        block = None
        if self.episodes is not None:
            block = self.episodes.inject(starts, ends, usage, flow, codes)
        steps: list[Step] = []
        for k, row in enumerate(zip(stamps, usage.tolist(), flow.tolist(), codes, strict=True)):
            values = None
            if sent_registers is not None and registers is not None:
                positions = registers.columns.tolist()
                values = dict(zip(positions, sent_registers[k].tolist(), strict=True))
            clocks = None if self.jitter is None else self._jittered(float(ends[k]))
            step = build_step(fmt, *row, self.draws, config.rules, values, clocks)
            if block is not None:
                step.silent = block.silent[k]
                step.cells = block.cells[k]
            if truth is not None:
                step.truth = (float(starts[k]), truth[k])
            if self.defects is not None:
                busy = {i for i, _ in step.injected} | {i for i, _ in step.cells} | step.silent
                withheld, repeated = self.defects.step(busy)
                step.silent = step.silent | withheld
                step.repeat(repeated)
            steps.append(step)
        return steps

    def _jittered(self, stamp_s: float) -> list[str]:
        """Each meter's stamp for a step at ``stamp_s``, as its jittering clock has it."""
        assert self.jitter is not None
        offsets = self.jitter.offsets().tolist()
        stamps = {offset: format_stamp(stamp_s + offset) for offset in set(offsets)}
        return [stamps[offset] for offset in offsets]


class Simulation:
    """A checked, prepared run: the fleet's formats built, the backfill's steps laid out.

    Preparing raises ValueError for a configuration that cannot run (e.g. a backfill
    ending in the future), before anything is sent. :meth:`run` can be called again and,
    with a seed, sends the same stream again.
    """

    def __init__(self, config: SimulationConfig, fleet: Fleet | None = None) -> None:
        self.config = config
        self.fmt: MessageFormat
        self.model: LoadModel | LegacyValues
        if config.message_format == "legacy":
            self.fmt = LegacyFormat(config.rules)
            self.model = LegacyValues(self.fmt.metrics, config.rules)
        else:
            fleet = (
                fleet
                if fleet is not None
                else build_fleet(
                    config.meters,
                    config.seed,
                    config.mix,
                    config.shares,
                    config.constant_load_share,
                )
            )
            self.fmt = ContractFormat(fleet, config.rules)
            self.model = LoadModel(
                fleet.type_index, fleet.scale, config.rules, [m.constant for m in fleet.meters]
            )
        self.starts = backfill_starts(config) if config.mode == "backfill" else None
        self.registers: Registers | None = None
        self.truth_wanted = fleet is not None
        if fleet is not None and any(m.reports != USAGE for m in fleet.meters):
            # The run's first stamp, counting the history sent before it (a backfill that
            # a live run continues: both place the rollovers alike).
            if self.starts is not None:
                first_stamp = float(self.starts[0]) + config.interval_s
            else:
                since = config.since_s if config.since_s is not None else time.time()
                first_stamp = since - config.history_s
            reports = np.array([m.reports for m in fleet.meters])
            self.registers = Registers(
                reports,
                fleet.type_index,
                fleet.scale,
                np.array([m.near_rollover for m in fleet.meters]),
                config.interval_s,
                first_stamp,
                config.seed,
            )
        if self.starts is not None and config.faults.rates.get(FaultCode.FUTURE_TIMESTAMP, 0):
            check_future_shift(format_stamp(self.starts[0]))
        self.fleet = fleet
        self.shapes: EpisodeShapes | None = None
        if config.episodes.active:
            self.shapes = plan_episodes(
                config.episodes,
                config.detection,
                config.rules,
                config.interval_s,
                config.episode_sizes,
            )

    def run(
        self,
        emit: Emit,
        should_stop: StopSignal | None = None,
        progress: Progress | None = None,
        summary: Summary | None = None,
    ) -> Summary:
        """See :func:`simulate`."""
        summary = summary if summary is not None else Summary()
        # Children 0 and 1 are what they were before idle water and episodes: adding
        # children leaves them, so electricity and gas keep their values bit for bit.
        values_seed, faults_seed, idle_seed, candidates_seed, params_seed = np.random.SeedSequence(
            self.config.seed
        ).spawn(5)
        episodes = None
        config = self.config
        if self.shapes is not None:
            assert self.fleet is not None and isinstance(self.model, LoadModel)
            episodes = EpisodeInjector(
                self.shapes,
                self.config.detection,
                self.model,
                self.fleet.device_ids,
                [m.meter_type for m in self.fleet.meters],
                self.config.interval_s,
                None if self.starts is None else len(self.starts),
                np.random.default_rng(candidates_seed),
                np.random.default_rng(params_seed),
                warmup_steps=None
                if config.episode_warmup_s is None
                else math.ceil(config.episode_warmup_s / config.interval_s),
                history_steps=math.floor(config.history_s / config.interval_s),
                register_only=None if self.registers is None else self.registers.only,
                constant_loads=self.model.constant,
            )
        defects = None
        if config.gaps_per_meter_day or config.repeat_share:
            defects = Defects(
                config.gaps_per_meter_day,
                config.repeat_share,
                config.interval_s,
                len(self.fmt.keys),
                self._rng(3),
                config.max_gap,
            )
        if self.fleet is not None and summary.truth is None:
            summary.truth = ConsumptionTruth(self.fleet.device_ids, config.timezone)
        meters = len(self.fmt.keys)
        jitter = None
        if int(config.clock_jitter_s):
            jitter = ClockJitter(config.clock_jitter_s, meters, self._rng(4))
        make_steps = _StepMaker(
            self,
            np.random.default_rng(values_seed),
            FaultDraws(self.config.faults, np.random.default_rng(faults_seed)),
            np.random.default_rng(idle_seed),
            episodes,
            defects,
            jitter,
        )
        run = _Run(self.config, emit, should_stop, progress, summary)
        if config.late_share:
            run.late = LateRadios(
                config.late_share, config.late_max_s, config.interval_s, meters, self._rng(5)
            )
        try:
            if self.starts is None:
                _live(run, make_steps, meters)
            else:
                _backfill(run, make_steps, self.starts, meters)
        finally:
            summary.elapsed_s = time.monotonic() - run.started
        return summary

    def _rng(self, stream: int) -> np.random.Generator:
        """A generator of its own for one optional part of the run (a seed's ``stream``)."""
        seed = self.config.seed
        return np.random.default_rng(None if seed is None else [seed, stream])


def simulate(
    config: SimulationConfig,
    emit: Emit,
    should_stop: StopSignal | None = None,
    progress: Progress | None = None,
    *,
    fleet: Fleet | None = None,
    summary: Summary | None = None,
) -> Summary:
    """Run ``config`` into ``emit(key, value)`` until done, the limits or ``should_stop``.

    ``should_stop`` is a callable or a :class:`threading.Event` (an event also wakes the
    live mode's waits at once). ``progress(summary)`` is called after every time step.
    ``fleet`` replaces the one ``config.meters`` and ``config.seed`` would build (e.g. one
    read from the registry). Pass ``summary`` to keep the counts if ``emit`` raises.
    """
    return Simulation(config, fleet).run(emit, should_stop, progress, summary)


def _backfill(run: _Run, make_steps: _StepMaker, starts: np.ndarray, meters: int) -> None:
    """Every step in event-time order, as fast as ``emit`` goes (or the rate cap allows)."""
    block = max(1, BLOCK_CELLS // meters)
    for first in range(0, len(starts), block):
        chunk = starts[first : first + block]
        ends = chunk + run.config.interval_s  # each reading is stamped with its interval's end
        for step in make_steps(chunk, [format_stamp(s) for s in ends.tolist()], ends):
            if run.finished():
                return
            _deliver(run, step)
            run.tick()
    if run.late is not None:  # the end: what late radios still hold goes out too
        for part in run.late.release():
            if run.finished():
                return
            _send(run, part)
        run.tick()


def _live(run: _Run, make_steps: _StepMaker, meters: int) -> None:
    """One step per interval, stamped now, reporting the interval that just ended."""
    if run.config.since_s is not None:
        _live_since(run, make_steps, meters, int(run.config.since_s))
        return
    interval = run.config.interval_s
    next_tick = time.monotonic()
    while not run.finished():
        now_s = int(time.time())
        (step,) = make_steps(
            np.array([now_s - interval]), [format_stamp(now_s)], np.array([float(now_s)])
        )
        _deliver(run, step)
        run.tick()
        if run.finished():
            return
        next_tick = max(next_tick + interval, time.monotonic())
        run.wait_until(next_tick)


def _live_since(run: _Run, make_steps: _StepMaker, meters: int, stamp: int) -> None:
    """Live steps stamped ``stamp`` and every interval after: those up to now at once (a
    catch-up), each later one when its stamp comes. No step is skipped, so a meter's
    readings keep their grid from a backfill into the live run."""
    interval = int(run.config.interval_s)
    while not run.finished():
        ahead = stamp - time.time()
        if ahead > 0:
            run.wait_until(time.monotonic() + ahead)
            if run.finished():
                return
        (step,) = make_steps(
            np.array([float(stamp - interval)]), [format_stamp(stamp)], np.array([float(stamp)])
        )
        _deliver(run, step)
        run.tick()
        stamp += interval


def _deliver(run: _Run, step: Step) -> None:
    """Send a step as the head-end receives it: late radios' readings held back, those
    held for this step sent after it."""
    if run.late is None:
        _send(run, step)
        return
    for part in run.late.due(step):
        if run.finished():
            return
        _send(run, part)


def _send(run: _Run, step: Step) -> None:
    """Emit a step, in slices spaced to the rate cap when there is one."""
    wanted = step.slots_for(run.room(len(step.keys) - len(step.silent)))
    rate = run.config.rate
    if rate is None or wanted == 0:  # nothing to pace; a step's truth is counted all the same
        _emit(step, 0, wanted, run.emit, run.summary)
        return
    per_slice = max(1, int(rate * PACE_SLICE_S))
    started = time.monotonic()
    for first in range(0, wanted, per_slice):
        _emit(step, first, min(wanted, first + per_slice), run.emit, run.summary)
        run.wait_until(started + (first + per_slice) / rate)
        if run.finished():
            return
