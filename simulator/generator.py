"""Turn a fleet and a clock into contract messages, with faults injected at known rates.

Every injected fault is built so that :func:`meterflow.contract.evaluate` classifies it as
exactly the kind that was injected, and the :class:`Summary` counts each kind: a run's
summary is the ground truth the end-to-end tests compare the pipeline against.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np

from meterflow.contract import (
    METER_SPECS,
    SENTINEL_VALUE,
    STATELESS_FAULTS,
    TYPE_ORDER,
    DeadLetterReason,
    FaultCode,
    MeterType,
    Rules,
)
from simulator.fleet import Fleet, build_fleet
from simulator.load import consumption

Emit = Callable[[bytes | None, bytes], None]
Progress = Callable[["Summary"], None]

#: Malformed messages rotate through every dead-letter reason, one of each in turn.
MALFORMED_KINDS: tuple[DeadLetterReason, ...] = tuple(DeadLetterReason)
LEGACY_DEVICES = ("em1", "em2", "em3", "em4", "wm1", "wm2", "wm3", "wm4")


@dataclass(frozen=True)
class FaultRates:
    """Probability per reading of each injected fault, and of a malformed message."""

    rates: dict[FaultCode, float] = field(default_factory=dict)
    malformed: float = 0.0

    @classmethod
    def default(cls) -> FaultRates:
        return cls({code: 0.002 for code in STATELESS_FAULTS}, malformed=0.001)

    @classmethod
    def none(cls) -> FaultRates:
        return cls({}, 0.0)

    def __post_init__(self) -> None:
        unknown = set(self.rates) - set(STATELESS_FAULTS)
        if unknown:
            raise ValueError(f"cannot inject {sorted(unknown)}: only {list(STATELESS_FAULTS)}")
        if any(r < 0 for r in self.rates.values()) or self.malformed < 0:
            raise ValueError("fault rates must not be negative")
        if sum(self.rates.values()) + self.malformed > 0.5:
            raise ValueError("fault and malformed rates add up to more than 50% of readings")


@dataclass(frozen=True)
class SimulationConfig:
    meters: int = 100
    interval_s: float = 900.0
    mode: str = "backfill"  # backfill | live
    days: float = 1.0  # backfill: how many days before ``end``
    end: date | None = None  # backfill: last day is the one before ``end``; default today
    seed: int | None = None
    faults: FaultRates = field(default_factory=FaultRates.default)
    message_format: str = "contract"  # contract | legacy
    rate: float | None = None  # live: messages per second at most
    limit: int | None = None  # stop after this many messages
    duration_s: float | None = None  # live: stop after this long
    rules: Rules = field(default_factory=Rules)


@dataclass
class Summary:
    """What a run sent; ``sent == valid + sum(faults) + sum(malformed)`` always holds."""

    sent: int = 0
    valid: int = 0
    faults: Counter[FaultCode] = field(default_factory=Counter)
    malformed: Counter[DeadLetterReason] = field(default_factory=Counter)
    first_event: str | None = None
    last_event: str | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def rate(self) -> float:
        return self.sent / max(time.monotonic() - self.started, 1e-9)

    def consistent(self) -> bool:
        return self.sent == self.valid + sum(self.faults.values()) + sum(self.malformed.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "valid": self.valid,
            "faults": {str(k): v for k, v in sorted(self.faults.items())},
            "malformed": {str(k): v for k, v in sorted(self.malformed.items())},
            "first_event": self.first_event,
            "last_event": self.last_event,
        }


class _Formatter:
    """Pre-built message fragments per meter, so a message is a few string joins."""

    def __init__(self, fleet: Fleet) -> None:
        self.keys = [d.encode() for d in fleet.device_ids]
        self.heads = [f'{{"device_id": "{d}", "timestamp": "' for d in fleet.device_ids]
        self.mids = [
            f'", "meter_type": "{m.meter_type}", "{METER_SPECS[MeterType(m.meter_type)].metric}": '
            for m in fleet.meters
        ]
        self.bare_mids = [f'", "meter_type": "{m.meter_type}"' for m in fleet.meters]
        self.types = [TYPE_ORDER[t] for t in fleet.type_index.tolist()]
        self.water = [t is MeterType.WATER for t in self.types]

    def reading(self, i: int, stamp: str, value: float, flow: float) -> bytes:
        if self.water[i]:
            return f'{self.heads[i]}{stamp}{self.mids[i]}{value}, "flow_rate": {flow}}}'.encode()
        return f"{self.heads[i]}{stamp}{self.mids[i]}{value}}}".encode()

    def without_metric(self, i: int, stamp: str, flow: float) -> bytes:
        tail = f', "flow_rate": {flow}' if self.water[i] else ""
        return f"{self.heads[i]}{stamp}{self.bare_mids[i]}{tail}}}".encode()


def _malformed(kind: DeadLetterReason, device_id: str, stamp: str, rules: Rules) -> bytes:
    """A message that the contract dead-letters for exactly ``kind``."""
    base = {"device_id": device_id, "timestamp": stamp, "usage_kwh": 1.0}
    samples = {
        DeadLetterReason.EMPTY: b"",
        DeadLetterReason.NOT_JSON: f"device_id={device_id};usage=?".encode(),
        DeadLetterReason.NOT_OBJECT: json.dumps([device_id, stamp, 1.0]).encode(),
        DeadLetterReason.MISSING_FIELD: json.dumps(
            {"device_id": device_id, "usage_kwh": 1.0}
        ).encode(),
        DeadLetterReason.WRONG_TYPE: json.dumps({**base, "usage_kwh": "1.0"}).encode(),
        DeadLetterReason.BAD_TIMESTAMP: json.dumps(
            {**base, "timestamp": "27/05/2024 15:57"}
        ).encode(),
        DeadLetterReason.UNKNOWN_METER_TYPE: json.dumps({**base, "meter_type": "steam"}).encode(),
    }
    if kind is DeadLetterReason.OVERSIZE:
        return json.dumps({**base, "firmware_dump": "x" * rules.max_message_bytes}).encode()
    return samples[kind]


class _Injector:
    """Draws, per reading, nothing, a fault code or a malformed kind, at the configured rates."""

    def __init__(self, faults: FaultRates, rng: np.random.Generator) -> None:
        self.codes = [code for code in STATELESS_FAULTS if faults.rates.get(code, 0) > 0]
        self.edges = np.cumsum([faults.rates[c] for c in self.codes] + [faults.malformed])
        self.rng = rng
        self.next_malformed = 0

    def draw(self, count: int) -> np.ndarray:
        """0 = normal, k in 1..len(codes) = codes[k-1], len(codes)+1 = malformed."""
        if not len(self.edges) or self.edges[-1] == 0:
            return np.zeros(count, dtype=np.int8)
        picks = np.searchsorted(self.edges, self.rng.random(count), side="right") + 1
        return np.where(picks > len(self.edges), 0, picks).astype(np.int8)

    def malformed_kind(self) -> DeadLetterReason:
        kind = MALFORMED_KINDS[self.next_malformed % len(MALFORMED_KINDS)]
        self.next_malformed += 1
        return kind


def _emit_step(
    fleet: Fleet,
    formatter: _Formatter,
    injector: _Injector,
    config: SimulationConfig,
    at: datetime,
    emit: Emit,
    summary: Summary,
    rng: np.random.Generator,
) -> None:
    """One reading per meter, stamped ``at``, with faults drawn for this step."""
    values, flows = consumption(
        fleet.type_index, fleet.scale, at, config.interval_s, rng, config.rules
    )
    stamp = at.strftime("%Y-%m-%dT%H:%M:%SZ")
    picks = injector.draw(len(fleet))
    count = len(fleet) if config.limit is None else min(len(fleet), config.limit - summary.sent)
    reading, keys = formatter.reading, formatter.keys
    value_list, flow_list = values.tolist(), flows.tolist()
    if not picks[:count].any():  # the common case: a step without faults
        for i in range(count):
            emit(keys[i], reading(i, stamp, value_list[i], flow_list[i]))
        summary.valid += count
    else:
        for i in range(count):
            pick = int(picks[i])
            if pick == 0:
                emit(keys[i], reading(i, stamp, value_list[i], flow_list[i]))
                summary.valid += 1
            elif pick > len(injector.codes):
                kind = injector.malformed_kind()
                emit(keys[i], _malformed(kind, fleet.device_ids[i], stamp, config.rules))
                summary.malformed[kind] += 1
            else:
                code = injector.codes[pick - 1]
                emit(
                    keys[i], _faulty(formatter, i, code, stamp, value_list[i], flow_list[i], config)
                )
                summary.faults[code] += 1
    summary.sent += count
    summary.first_event = summary.first_event or stamp
    summary.last_event = stamp


def _faulty(
    formatter: _Formatter,
    i: int,
    code: FaultCode,
    stamp: str,
    value: float,
    flow: float,
    config: SimulationConfig,
) -> bytes:
    """A reading that the contract classifies as exactly ``code``."""
    if code is FaultCode.MISSING_METRIC:
        return formatter.without_metric(i, stamp, flow)
    if code is FaultCode.SENTINEL:
        return formatter.reading(i, stamp, SENTINEL_VALUE, flow)
    if code is FaultCode.NEGATIVE:
        return formatter.reading(i, stamp, -round(value + 1.5, 3), flow)
    if code is FaultCode.OUT_OF_RANGE:
        bound = config.rules.bounds[METER_SPECS[formatter.types[i]].metric]
        return formatter.reading(i, stamp, round(bound * 2 + value, 3), flow)
    # FUTURE_TIMESTAMP: two days ahead of the wall clock, far past any tolerance.
    ahead = datetime.now(UTC) + timedelta(days=2, seconds=config.rules.future_tolerance_s)
    return formatter.reading(i, ahead.strftime("%Y-%m-%dT%H:%M:%SZ"), value, flow)


def backfill_times(config: SimulationConfig) -> list[datetime]:
    """Every interval start of the ``days`` before ``end`` (default: before today, UTC).

    Stamps run from ``D 00:00`` to the last interval before midnight, so each day's lake
    partition holds exactly ``86400 / interval`` readings per meter.
    """
    end_day = config.end or datetime.now(UTC).date()
    end = datetime(end_day.year, end_day.month, end_day.day, tzinfo=UTC)
    steps = max(1, int(config.days * 86_400 // config.interval_s))
    start = end - timedelta(seconds=config.interval_s * steps)
    return [start + timedelta(seconds=config.interval_s * k) for k in range(steps)]


def simulate(
    config: SimulationConfig,
    emit: Emit,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Progress | None = None,
    fleet: Fleet | None = None,
    summary: Summary | None = None,
) -> Summary:
    """Run the configured mode; return what was sent. Stops early when ``should_stop()``.

    Pass ``summary`` to keep the counts of a run that an exception (Ctrl-C) cuts short.
    """
    summary = summary if summary is not None else Summary()
    if config.message_format == "legacy":
        return _legacy(config, emit, should_stop, progress, summary)
    fleet = fleet or build_fleet(config.meters, config.seed)
    rng = np.random.default_rng(config.seed)
    formatter, injector = _Formatter(fleet), _Injector(config.faults, rng)
    if config.mode == "backfill":
        for at in backfill_times(config):
            if should_stop() or _done(config, summary):
                break
            _emit_step(fleet, formatter, injector, config, at, emit, summary, rng)
            if progress:
                progress(summary)
        return summary
    if config.mode != "live":
        raise ValueError(f"unknown mode {config.mode!r}: backfill or live")
    per_step = len(fleet)
    pause = max(config.interval_s, per_step / config.rate if config.rate else 0.0)
    while not should_stop() and not _done(config, summary):
        tick = time.monotonic()
        _emit_step(fleet, formatter, injector, config, datetime.now(UTC), emit, summary, rng)
        if progress:
            progress(summary)
        while time.monotonic() - tick < pause and not should_stop() and not _done(config, summary):
            time.sleep(min(0.2, pause))
    return summary


def _done(config: SimulationConfig, summary: Summary) -> bool:
    if config.limit is not None and summary.sent >= config.limit:
        return True
    return config.duration_s is not None and time.monotonic() - summary.started >= config.duration_s


def _legacy(
    config: SimulationConfig,
    emit: Emit,
    should_stop: Callable[[], bool],
    progress: Progress | None,
    summary: Summary,
) -> Summary:
    """The prototype's exact messages: em1..em4 and wm1..wm4, integers, -1 as the fault."""
    rng = np.random.default_rng(config.seed)
    sentinel_rate = config.faults.rates.get(FaultCode.SENTINEL, 0.0)
    times = backfill_times(config) if config.mode == "backfill" else None
    step = 0
    while not should_stop() and not _done(config, summary):
        if times is not None and step >= len(times):
            break
        tick = time.monotonic()
        at = times[step] if times is not None else datetime.now(UTC)
        for offset, device in enumerate(LEGACY_DEVICES):
            if _done(config, summary):
                break
            stamp = (at + timedelta(seconds=offset % 4)).strftime("%Y-%m-%dT%H:%M:%SZ")
            faulty = rng.random() < sentinel_rate
            if device.startswith("em"):
                fields = {"usage_kwh": -1 if faulty else int(rng.integers(0, 21))}
            else:
                usage = -1 if faulty else int(rng.integers(0, 31))
                fields = {"usage": usage, "flow_rate": int(rng.integers(0, 11))}
            emit(
                device.encode(),
                json.dumps({"device_id": device, "timestamp": stamp, **fields}).encode(),
            )
            summary.sent += 1
            if faulty:
                summary.faults[FaultCode.SENTINEL] += 1
            else:
                summary.valid += 1
            summary.first_event = summary.first_event or stamp
            summary.last_event = stamp
        step += 1
        if progress:
            progress(summary)
        if times is None:
            while time.monotonic() - tick < config.interval_s and not should_stop():
                time.sleep(min(0.2, config.interval_s))
    return summary
