"""Stateful fault episodes (stuck meters, spikes, leaks, silent spans) and their ground truth.

An episode is a span of one meter's readings that one stateful rule
(:data:`~meterflow.core.contract.STATEFUL_FAULTS`, thresholds in
:class:`~meterflow.core.thresholds.DetectionRules`) should flag, sized by
:func:`simulator.faults.plan_episodes` in one of two ways (``SimulationConfig.episode_sizes``).

**Rules sizes** (the library's default) make every episode trip its rule, and nothing else:

* ``STUCK``: 12-48 readings repeating one non-zero value (the meter's reading at the
  span's start, at least twice the type's ``stuck_min``);
* ``SPIKE``: one reading 30x the meter's typical level for its hour of day (the highest
  over the last week), at least twice the type's ``spike_min``, below 90% of the
  stateless bounds, after at least ``baseline_history_s`` of normal readings;
* ``LEAK`` (water meters): 30-54 h of an added flow of 3-8x the night threshold, wavering
  +-10% per reading, so no interval is idle and the night minimum is far above the
  threshold; the reading after it is idle (the repair), so the leak visibly ends;
* ``NO_DATA``: 8-96 intervals in which the meter sends nothing at all.

Water STUCK and NO_DATA spans stay out of the leak night window (they start after it when
they would touch it) and last at most 20 h, so neither looks like nor hides a leak.

**Field sizes** are drawn log-uniform from field-like ranges that know nothing of the
rules (no floors, no margins), so some episodes are too small for any rule, as in the
field, and a benchmark can measure recall by size:

* ``STUCK``: frozen for 30 minutes to 48 hours (whole readings, at least 2), at whatever
  the meter read when it froze, 0 or tiny included;
* ``SPIKE``: 2x to 100x the typical level, capped below 90% of the stateless bounds;
* ``LEAK``: 0.5 to 50 L/h for 30-78 h, +-10% per reading, then the repair;
* ``NO_DATA``: silent for 15 minutes to 3 days.

Water spans are neither capped nor moved out of the night window.

In both, a STUCK is a frozen register: the span's readings repeat its first one, and a
water meter's ``flow_rate`` goes on reporting the real flow of each interval, so the
repeats disagree with it (a steady usage that its flow agrees with is a physical flow).

Scheduling: every reading of a free meter starts an episode with its kind's chance; the
episode begins at the *next* reading, so the reading before it is known and, like the
reading after it and the span itself, kept free of stateless faults. A meter is free from
a warm-up into the run (by default ``baseline_history_s``, so every episode has a normal
day before it) and again ``baseline_history_s`` after an episode's last reading, so
episodes never overlap. A SPIKE also waits until the meter has ``baseline_history_s`` of
history (a backfill before the run counts), as the rule does for its baseline. A backfill
starts no episode that would not end (with a reading after it) before the backfill does.
Register-only meters get only silences, constant loads (:mod:`simulator.load`) no STUCK or
SPIKE. Candidate starts come from one generator, one uniform per reading (so blocking
steps differently gives the same episodes), shapes from a second one.

The ground truth is recorded as messages go out (:class:`Episode`): a run cut short
records what the stream really holds and marks the episode incomplete. Each episode's
``size`` is what a recall-by-size measure bins on: a LEAK's added flow (L/h), a STUCK's or
NO_DATA's planned duration (seconds: readings x interval), a SPIKE's factor over the
typical level.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from meterflow.core.contract import STATEFUL_FAULTS, FaultCode, MeterType
from meterflow.core.lake import filesystem_for, write_atomically
from meterflow.core.thresholds import DetectionRules
from meterflow.core.timestamps import SECONDS_PER_DAY, parse_timestamp_us
from simulator.faults import (
    LEAK_JITTER,
    SPIKE_LOOKBACK_DAYS,
    EpisodeShapes,
)
from simulator.load import DECIMALS, LoadModel

GROUND_TRUTH_FILE = "ground_truth.parquet"
GROUND_TRUTH_SCHEMA = pa.schema(
    [
        ("device_id", pa.string()),
        ("meter_type", pa.string()),
        ("fault_code", pa.string()),
        # Event time of the first and last affected reading (NO_DATA: missing one).
        ("start", pa.timestamp("us", tz="UTC")),
        ("end", pa.timestamp("us", tz="UTC")),
        ("readings", pa.int32()),  # affected (NO_DATA: missing) readings
        # STUCK: the repeated value; SPIKE: the spike; LEAK: the added flow in L/h.
        ("value", pa.float64()),
        # LEAK: the added flow in L/h; STUCK, NO_DATA: the planned duration in seconds;
        # SPIKE: the factor over the meter's typical level.
        ("size", pa.float64()),
        ("complete", pa.bool_()),  # false when the run stopped inside the episode
    ]
)
_STUCK = STATEFUL_FAULTS.index(FaultCode.STUCK)
_SPIKE = STATEFUL_FAULTS.index(FaultCode.SPIKE)
_LEAK = STATEFUL_FAULTS.index(FaultCode.LEAK)
_NO_DATA = STATEFUL_FAULTS.index(FaultCode.NO_DATA)
#: Rules sizes keep these water spans short and out of the leak night window.
_WATER_SPANS = (FaultCode.STUCK, FaultCode.NO_DATA)


@dataclass
class Episode:
    """One injected episode, as the stream holds it: filled in as its readings go out."""

    device_id: str
    meter_type: MeterType
    code: FaultCode
    planned: int  # readings the episode was to affect
    value: float | None = None
    size: float | None = None  # as GROUND_TRUTH_SCHEMA says
    start: str | None = None
    end: str | None = None
    readings: int = 0

    @property
    def complete(self) -> bool:
        return self.readings == self.planned

    def record(self, stamp: str) -> None:
        """One more affected (or, for NO_DATA, withheld) reading, stamped ``stamp``."""
        if self.start is None:
            self.start = stamp
        self.end = stamp
        self.readings += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "meter_type": str(self.meter_type),
            "fault_code": str(self.code),
            "start": self.start,
            "end": self.end,
            "readings": self.readings,
            "value": self.value,
            "size": self.size,
            "complete": self.complete,
        }


@dataclass
class _Active:
    """An accepted episode and where it lies, in absolute steps of the run."""

    episode: Episode
    column: int
    first: int
    last: int  # inclusive
    jitter: np.ndarray | None = None  # LEAK: the added flow's factor per reading
    times: float = 0.0  # SPIKE: the factor over the typical level it is drawn at
    cancelled: bool = False


@dataclass
class BlockEpisodes:
    """What episodes did to a block of steps, per step: withheld meters and affected cells."""

    silent: list[frozenset[int]]
    cells: list[list[tuple[int, Episode]]] = field(default_factory=list)


class EpisodeInjector:
    """Schedules a run's episodes and writes them into its blocks of readings, in order."""

    def __init__(
        self,
        shapes: EpisodeShapes,
        detection: DetectionRules,
        model: LoadModel,
        device_ids: list[str],
        meter_types: list[MeterType],
        interval_s: float,
        total_steps: int | None,
        candidates: np.random.Generator,
        params: np.random.Generator,
        warmup_steps: int | None = None,
        history_steps: int = 0,
        register_only: np.ndarray | None = None,
        constant_loads: np.ndarray | None = None,
    ) -> None:
        """``warmup_steps``: a meter's first episode starts after this many readings
        (default ``shapes.quiet_readings``); ``history_steps``: readings every meter sent
        before the run (a SPIKE waits until ``quiet_readings`` are behind it);
        ``register_only``: positions that send no usage, so only a silence shows on them;
        ``constant_loads``: positions that repeat one value by nature, so no STUCK or
        SPIKE is injected on them."""
        self.shapes, self.detection, self.model = shapes, detection, model
        self.device_ids, self.meter_types = device_ids, meter_types
        self.interval_s, self.total_steps = interval_s, total_steps
        self.candidates, self.params = candidates, params
        self.water = np.array([t is MeterType.WATER for t in meter_types])
        chance = np.tile(np.array(shapes.start_chance), (len(device_ids), 1))
        chance[~self.water, _LEAK] = 0.0
        spiky = np.array([t in shapes.spike_types for t in meter_types])
        chance[~spiky, _SPIKE] = 0.0
        if shapes.water_span_max is not None:
            if shapes.water_span_max < shapes.stuck_readings[0]:
                chance[self.water, _STUCK] = 0.0
            if shapes.water_span_max < shapes.silent_readings[0]:
                chance[self.water, _NO_DATA] = 0.0
        if register_only is not None:
            chance[np.ix_(register_only, np.array([_STUCK, _SPIKE, _LEAK]))] = 0.0
        if constant_loads is not None:
            chance[np.ix_(constant_loads, np.array([_STUCK, _SPIKE]))] = 0.0
        self.edges = np.cumsum(chance, axis=1)
        self.total = self.edges[:, -1].copy()
        warmup = shapes.quiet_readings if warmup_steps is None else max(1, warmup_steps)
        self.free_from = np.full(len(device_ids), warmup, dtype=np.int64)
        self.spike_from = shapes.quiet_readings - history_steps  # first step with a baseline
        self.active: list[_Active] = []
        self.step = 0  # absolute index of the next block's first step

    def inject(
        self,
        starts_s: np.ndarray,
        stamps_s: np.ndarray,
        usage: np.ndarray,
        flow: np.ndarray,
        codes: np.ndarray,
    ) -> BlockEpisodes:
        """Start episodes in the next block and apply every live one to it, in place.

        ``starts_s`` are the readings' interval starts, ``stamps_s`` their event times;
        ``usage``, ``flow`` and the stateless ``codes`` are ``[steps, meters]``.
        """
        steps = len(starts_s)
        first = self.step
        self.step += steps
        draws = self.candidates.random(usage.shape)
        rows, columns = np.nonzero(draws < self.total)
        for row, column in zip(rows.tolist(), columns.tolist(), strict=True):
            if first + row >= self.free_from[column]:
                kind = int(np.searchsorted(self.edges[column], draws[row, column], side="right"))
                self._start(kind, column, first + row, float(stamps_s[row]))
        block = BlockEpisodes([frozenset()] * steps, [[] for _ in range(steps)])
        silent: dict[int, set[int]] = {}
        for active in self.active:
            self._apply(active, first, starts_s, usage, flow, codes, block, silent)
        for row, columns_off in silent.items():
            block.silent[row] = frozenset(columns_off)
        self.active = [a for a in self.active if not a.cancelled and a.last + 1 >= self.step]
        return block

    def _start(self, kind: int, column: int, draw: int, stamp_s: float) -> None:
        """An episode of ``kind`` on meter ``column`` from the reading after step ``draw``."""
        code, shapes, rng = STATEFUL_FAULTS[kind], self.shapes, self.params
        length = shapes.length(code, rng)
        first = draw + 1
        span_max = shapes.water_span_max
        if span_max is not None and self.water[column] and code in _WATER_SPANS:
            length = min(length, span_max)
            first += self._night_delay(stamp_s + self.interval_s, length)
        episode = Episode(self.device_ids[column], self.meter_types[column], code, length)
        active = _Active(episode, column, first, first + length - 1)
        if code is FaultCode.LEAK:
            episode.value = episode.size = shapes.added_flow(rng)
            active.jitter = rng.uniform(1 - LEAK_JITTER, 1 + LEAK_JITTER, length)
        elif code is FaultCode.SPIKE:
            active.times = shapes.spike_times(rng)  # the size is what the cap leaves of it
            if first < self.spike_from:
                return  # the rule has no baseline yet: the meter stays free
        else:
            episode.size = length * self.interval_s
        if self.total_steps is not None and active.last + 1 >= self.total_steps:
            return  # would not end, with a normal reading after it, before the backfill does
        self.free_from[column] = active.last + 2 + shapes.quiet_readings
        self.active.append(active)

    def _night_delay(self, first_s: float, length: int) -> int:
        """Steps to wait so a span from ``first_s`` of ``length`` misses the night window."""
        for j in range(length):
            moment = first_s + j * self.interval_s
            day_start = moment - moment % SECONDS_PER_DAY
            if self.detection.in_leak_night((moment - day_start) / 3600.0):
                window_end = day_start + self.detection.leak_night_end_hour * 3600.0
                return math.ceil((window_end - first_s) / self.interval_s - 1e-9)
        return 0

    def _apply(
        self,
        active: _Active,
        first: int,
        starts_s: np.ndarray,
        usage: np.ndarray,
        flow: np.ndarray,
        codes: np.ndarray,
        block: BlockEpisodes,
        silent: dict[int, set[int]],
    ) -> None:
        end = first + len(starts_s) - 1
        column, episode = active.column, active.episode
        guard_from, guard_to = max(active.first - 1, first), min(active.last + 1, end)
        if guard_from > guard_to:
            return
        codes[guard_from - first : guard_to - first + 1, column] = 0  # no stateless faults
        if episode.code is FaultCode.LEAK and guard_to == active.last + 1:
            # The repair: water off for an interval, so "no idle interval for a day" ends
            # with the leak instead of lingering until the household next pauses.
            usage[guard_to - first, column] = flow[guard_to - first, column] = 0.0
        span_from, span_to = max(active.first, first), min(active.last, end)
        if span_from > span_to:
            return
        rows = slice(span_from - first, span_to - first + 1)
        minutes = self.interval_s / 60.0
        code = episode.code
        if code is FaultCode.STUCK:
            if episode.value is None:  # the span starts in this block: freeze its reading
                floor = self.shapes.stuck_floor[episode.meter_type]
                reading = float(usage[rows.start, column])
                episode.value = round(max(reading, floor), DECIMALS)
            usage[rows, column] = episode.value  # the flow stays the real one: a frozen register
        elif code is FaultCode.SPIKE:
            sized = self._spike(float(starts_s[rows.start]), column, active.times)
            if sized is None:
                active.cancelled = True
                return
            spike, episode.size = sized
            episode.value = spike
            usage[rows, column] = spike
            flow[rows, column] = round(spike / minutes, DECIMALS)
        elif code is FaultCode.LEAK:
            assert active.jitter is not None and episode.value is not None
            offset = span_from - active.first
            factor = active.jitter[offset : offset + span_to - span_from + 1]
            added = episode.value * (self.interval_s / 3600.0) * factor
            usage[rows, column] = np.round(usage[rows, column] + added, DECIMALS)
            flow[rows, column] = np.round(usage[rows, column] / minutes, DECIMALS)
        else:
            for row in range(rows.start, rows.stop):
                silent.setdefault(row, set()).add(column)
        for row in range(rows.start, rows.stop):
            block.cells[row].append((column, episode))

    def _spike(self, start_s: float, column: int, times: float) -> tuple[float, float] | None:
        """The spike, ``times`` the typical level but below the cap, and the factor it is
        over the typical level; None when the cap leaves too little of it."""
        interval = self.interval_s
        hour = start_s - start_s % 3600.0
        offsets = np.arange(0.0, 3600.0, interval) if interval < 3600 else np.zeros(1)
        days = np.arange(SPIKE_LOOKBACK_DAYS + 1) * float(SECONDS_PER_DAY)
        same_hour = (hour + offsets[None, :] - days[:, None]).ravel()
        day_before = start_s - SECONDS_PER_DAY + np.arange(0.0, SECONDS_PER_DAY, interval)
        moments = np.concatenate([same_hour, day_before])
        levels = self.model.typical(moments, interval, np.full(len(moments), column))
        typical = max(float(levels[: len(same_hour)].max()), float(levels[len(same_hour) :].mean()))
        meter_type = self.meter_types[column]
        shapes = self.shapes
        spike = min(
            max(times * typical, shapes.spike_floor[meter_type]), shapes.spike_cap[meter_type]
        )
        spike = math.floor(spike * 10**DECIMALS) / 10**DECIMALS
        lowest = max(shapes.spike_least_times * typical, shapes.spike_least[meter_type])
        return (spike, spike / typical) if spike >= lowest else None


def default_ground_truth_path(registry_dir: str) -> str:
    """Where ``meterflow simulate`` records episodes unless told: beside the registry."""
    return f"{registry_dir.rstrip('/')}/{GROUND_TRUTH_FILE}"


def ground_truth_table(episodes: Sequence[Episode]) -> pa.Table:
    """The episodes as :data:`GROUND_TRUTH_SCHEMA` rows, in the order they started."""
    recorded = [e for e in episodes if e.start is not None and e.end is not None]
    columns: dict[str, list[Any]] = {name: [] for name in GROUND_TRUTH_SCHEMA.names}
    for episode in recorded:
        row = episode.as_dict()
        row["start"] = parse_timestamp_us(row["start"])
        row["end"] = parse_timestamp_us(row["end"])
        for name, values in columns.items():
            values.append(row[name])
    return pa.table(
        {name: pa.array(values, type=GROUND_TRUTH_SCHEMA.field(name).type)
         for name, values in columns.items()},
        schema=GROUND_TRUTH_SCHEMA,
    )  # fmt: skip


def write_ground_truth(episodes: Sequence[Episode], path: str) -> str:
    """Write the episodes to ``path``: JSON lines if it ends ``.jsonl``, else Parquet.

    Written whole or not at all (a temporary file, then a rename); returns the path.
    """
    filesystem, target = filesystem_for(path)
    if target.endswith(".jsonl"):
        lines = [json.dumps(e.as_dict()) for e in episodes if e.start is not None]
        data = "".join(f"{line}\n" for line in lines).encode()
    else:
        buffer = pa.BufferOutputStream()
        pq.write_table(ground_truth_table(episodes), buffer)
        data = buffer.getvalue().to_pybytes()
    write_atomically(filesystem, target, data)
    return target
