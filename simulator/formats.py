"""How a fleet's readings become messages: the contract's layout or the prototype's, and a
time step's messages with the injected faults written in.

:class:`ContractFormat` builds a reading from pre-built fragments, one f-string each (no
``json.dumps``); :class:`LegacyFormat` writes the prototype's messages byte for byte. A
:class:`Step` remembers which positions were corrupted, and how, so the generator counts
what really went out (:mod:`simulator.generator`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from meterflow.core.contract import (
    METER_SPECS,
    PREFIX_TO_TYPE,
    STATELESS_FAULTS,
    TYPE_ORDER,
    FaultCode,
    MeterType,
)
from meterflow.core.messages import DeadLetterReason
from meterflow.core.thresholds import Rules
from simulator.episodes import Episode
from simulator.faults import (
    MALFORMED,
    FaultDraws,
    corrupt_value,
    future_timestamp,
    malformed_message,
)
from simulator.fleet import Fleet
from simulator.load import HEADROOM
from simulator.registers import REGISTER

#: The prototype's meters and its integer ranges (inclusive) per metric.
LEGACY_DEVICES = ("em1", "em2", "em3", "em4", "wm1", "wm2", "wm3", "wm4")
LEGACY_HIGHEST = {"usage_kwh": 20, "usage": 30, "flow_rate": 10}

Injected = FaultCode | DeadLetterReason


class MessageFormat(Protocol):
    """How a fleet's readings are written: the contract's layout or the prototype's."""

    device_ids: list[str]
    keys: list[bytes]
    metrics: list[str]
    bounds: list[float]

    def messages(
        self,
        stamp: str | Sequence[str],
        usage: list[Any],
        flow: list[Any],
        registers: Mapping[int, float] | None = None,
    ) -> list[bytes]:
        """The step's readings: one ``stamp`` for all, or one each (clocks that jitter)."""
        ...

    def reading(self, i: int, stamp: str, value: Any, flow: Any) -> bytes:
        """Meter ``i``'s reading; ``value`` None leaves its metric out."""
        ...


class ContractFormat:
    """Messages from pre-built fragments: a reading is one f-string, no ``json.dumps``.

    The bytes are :class:`~meterflow.core.messages.ReadingMessage` in ``json.dumps``'s
    layout (tests/unit/test_simulator.py decodes them into it and compares).
    """

    def __init__(self, fleet: Fleet, rules: Rules) -> None:
        self.device_ids = fleet.device_ids
        self.keys = [d.encode() for d in self.device_ids]
        types = [m.meter_type for m in fleet.meters]
        self.metrics = [METER_SPECS[t].metric for t in types]
        self.bounds = [rules.bounds[metric] for metric in self.metrics]
        self.heads = [f'{{"device_id": "{d}", "timestamp": "' for d in self.device_ids]
        self.tails = [f'", "meter_type": "{t}"' for t in types]
        self.mids = [f'{tail}, "{m}": ' for tail, m in zip(self.tails, self.metrics, strict=True)]
        self.water = fleet.slices[MeterType.WATER]
        self.runs = [(fleet.slices[t], t is MeterType.WATER) for t in TYPE_ORDER]
        # A register meter's fields after the stamp, up to its register's value.
        self.register_mids = [
            f"{self.tails[i] if m.reports == REGISTER else self.mids[i] + '{usage}'}, "
            f'"{METER_SPECS[m.meter_type].register}": '
            for i, m in enumerate(fleet.meters)
        ]

    def messages(
        self,
        stamp: str | Sequence[str],
        usage: list[float],
        flow: list[float],
        registers: Mapping[int, float] | None = None,
    ) -> list[bytes]:
        """The step's readings; ``registers`` (meter position: value) for register meters."""
        if registers or not isinstance(stamp, str):
            return self._one_by_one(stamp, usage, flow, registers or {})
        out: list[bytes] = []
        for run, water in self.runs:
            heads, mids, values = self.heads[run], self.mids[run], usage[run]
            if water:
                out += [
                    f'{h}{stamp}{m}{v}, "flow_rate": {f}}}'.encode()
                    for h, m, v, f in zip(heads, mids, values, flow[run], strict=True)
                ]
            else:
                out += [
                    f"{h}{stamp}{m}{v}}}".encode()
                    for h, m, v in zip(heads, mids, values, strict=True)
                ]
        return out

    def _one_by_one(
        self,
        stamp: str | Sequence[str],
        usage: list[float],
        flow: list[float],
        registers: Mapping[int, float],
    ) -> list[bytes]:
        """Meter by meter: for registers, or a stamp each."""
        out: list[bytes] = []
        water = self.water
        stamps = [stamp] * len(self.heads) if isinstance(stamp, str) else stamp
        for i, head in enumerate(self.heads):
            register = registers.get(i)
            if register is None:
                body = f"{self.mids[i]}{usage[i]}"
            else:
                body = f"{self.register_mids[i].format(usage=usage[i])}{register}"
            rate = f', "flow_rate": {flow[i]}' if water.start <= i < water.stop else ""
            out.append(f"{head}{stamps[i]}{body}{rate}}}".encode())
        return out

    def reading(self, i: int, stamp: str, value: float | None, flow: float) -> bytes:
        """A reading without a register (faults are injected into usage readings)."""
        body = self.tails[i] if value is None else f"{self.mids[i]}{value}"
        rate = f', "flow_rate": {flow}' if self.water.start <= i < self.water.stop else ""
        return f"{self.heads[i]}{stamp}{body}{rate}}}".encode()


class LegacyFormat:
    """The prototype's messages, written by ``json.dumps`` exactly as it wrote them."""

    def __init__(self, rules: Rules) -> None:
        self.device_ids = list(LEGACY_DEVICES)
        self.keys = [d.encode() for d in self.device_ids]
        types = [PREFIX_TO_TYPE[d[:2]] for d in self.device_ids]
        self.metrics = [METER_SPECS[t].metric for t in types]
        self.bounds = [rules.bounds[metric] for metric in self.metrics]
        self.water = [t is MeterType.WATER for t in types]

    def messages(
        self,
        stamp: str | Sequence[str],
        usage: list[int],
        flow: list[int],
        registers: Mapping[int, float] | None = None,
    ) -> list[bytes]:
        stamps = [stamp] * len(self.device_ids) if isinstance(stamp, str) else stamp
        return [self.reading(i, stamps[i], usage[i], flow[i]) for i in range(len(stamps))]

    def reading(self, i: int, stamp: str, value: int | None, flow: int) -> bytes:
        message: dict[str, Any] = {"device_id": self.device_ids[i], "timestamp": stamp}
        if value is not None:
            message[self.metrics[i]] = value
        if self.water[i]:
            message["flow_rate"] = flow
        return json.dumps(message).encode()


class LegacyValues:
    """Uniform integers in the prototype's ranges (0 included), kept below the bounds."""

    def __init__(self, metrics: list[str], rules: Rules) -> None:
        self.highest = np.array(
            [min(LEGACY_HIGHEST[m], int(rules.bounds[m] * HEADROOM)) for m in metrics]
        )
        self.flow_highest = min(
            LEGACY_HIGHEST["flow_rate"], int(rules.bounds["flow_rate"] * HEADROOM)
        )

    def sample(
        self,
        starts_s: np.ndarray,
        _interval_s: float,
        rng: np.random.Generator,
        _idle_rng: np.random.Generator | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The prototype's values; its water is never idle (0 is just another integer)."""
        shape = (len(starts_s), len(self.highest))
        usage = rng.integers(0, self.highest + 1, shape)
        flow = rng.integers(0, self.flow_highest + 1, shape)
        return usage, flow


@dataclass
class Step:
    """One time step's messages and which of them were corrupted, by position.

    ``silent`` are positions whose meter sends nothing (a NO_DATA episode, a gap);
    ``cells`` the positions in an episode, with it, so the ground truth records what really
    went out. The last positions re-send the ``repeated`` ones. ``truth`` is the interval's
    start and what every meter really consumed in it. ``stamp`` is the step's time; with
    clocks that jitter, ``clocks`` holds each position's own stamp, as its message has it.
    """

    stamp: str
    keys: list[bytes]
    messages: list[bytes]
    injected: list[tuple[int, Injected]]
    silent: frozenset[int] = frozenset()
    cells: list[tuple[int, Episode]] = field(default_factory=list)
    repeated: list[int] = field(default_factory=list)
    truth: tuple[float, np.ndarray] | None = None
    clocks: list[str] | None = None

    def stamp_of(self, position: int) -> str:
        """The timestamp the message at ``position`` carries."""
        return self.stamp if self.clocks is None else self.clocks[position]

    @property
    def repeats(self) -> int:
        return len(self.repeated)

    def repeat(self, positions: list[int]) -> None:
        """Send the readings at ``positions`` again after the others."""
        self.keys = [*self.keys, *(self.keys[i] for i in positions)]
        self.messages = [*self.messages, *(self.messages[i] for i in positions)]
        self.repeated = [*self.repeated, *positions]

    def part(self, positions: Sequence[int], with_truth: bool = False) -> Step:
        """The readings at ``positions`` (and their repeats) as a step of their own, with
        this one's stamp: what a late radio sends after the others (``with_truth``: the
        part that carries the step's consumption truth)."""
        index = {position: k for k, position in enumerate(positions)}
        repeated = [position for position in self.repeated if position in index]
        sent = [*positions, *repeated]
        return Step(
            self.stamp,
            [self.keys[i] for i in sent],
            [self.messages[i] for i in sent],
            [(index[i], kind) for i, kind in self.injected if i in index],
            frozenset(index[i] for i in self.silent if i in index),
            [(index[i], episode) for i, episode in self.cells if i in index],
            [index[i] for i in repeated],
            self.truth if with_truth else None,
            None if self.clocks is None else [self.clocks[i] for i in positions],
        )

    def slots_for(self, wanted: int) -> int:
        """How many positions hold the first ``wanted`` messages to send."""
        if not self.silent:
            return wanted
        if wanted >= len(self.keys) - len(self.silent):  # the silent ones too, all of them
            return len(self.keys)
        if wanted <= 0:
            return 0
        sent = 0
        for i in range(len(self.keys)):
            if i not in self.silent:
                sent += 1
                if sent == wanted:
                    return i + 1
        return len(self.keys)


def build_step(
    fmt: MessageFormat,
    stamp: str,
    usage: list[Any],
    flow: list[Any],
    codes: np.ndarray,
    draws: FaultDraws,
    rules: Rules,
    registers: Mapping[int, float] | None = None,
    stamps: Sequence[str] | None = None,
) -> Step:
    """The step ``stamp``'s messages with its faults written in; ``stamps``: each meter's
    own stamp instead (a jittering clock)."""
    messages = fmt.messages(stamp if stamps is None else stamps, usage, flow, registers)
    injected: list[tuple[int, Injected]] = []
    for i in np.flatnonzero(codes).tolist():
        code = int(codes[i])
        kind: Injected
        at = stamp if stamps is None else stamps[i]
        if code == MALFORMED:
            kind = draws.next_malformed_kind()
            messages[i] = malformed_message(kind, fmt.device_ids[i], at, fmt.metrics[i], rules)
        else:
            kind = STATELESS_FAULTS[code - 1]
            messages[i] = _faulty(fmt, i, kind, at, usage[i], flow[i])
        injected.append((i, kind))
    return Step(
        stamp, fmt.keys, messages, injected, clocks=None if stamps is None else list(stamps)
    )


def _faulty(
    fmt: MessageFormat, i: int, code: FaultCode, stamp: str, value: Any, flow: Any
) -> bytes:
    """Meter ``i``'s reading with fault ``code``, which the contract classifies as ``code``."""
    if code is FaultCode.MISSING_METRIC:
        return fmt.reading(i, stamp, None, flow)
    if code is FaultCode.FUTURE_TIMESTAMP:
        return fmt.reading(i, future_timestamp(stamp), value, flow)
    return fmt.reading(i, stamp, corrupt_value(code, value, fmt.bounds[i]), flow)
