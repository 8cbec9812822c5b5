"""How a fleet's readings become messages: the contract's layout or the prototype's, and a
time step's messages with the injected faults written in.

:class:`ContractFormat` builds a reading from pre-built fragments, one f-string each (no
``json.dumps``); :class:`LegacyFormat` writes the prototype's messages byte for byte. A
:class:`Step` remembers which positions were corrupted, and how, so the generator counts
what really went out (:mod:`simulator.generator`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
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
        stamp: str,
        usage: list[Any],
        flow: list[Any],
        registers: Mapping[int, float] | None = None,
    ) -> list[bytes]: ...

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
        stamp: str,
        usage: list[float],
        flow: list[float],
        registers: Mapping[int, float] | None = None,
    ) -> list[bytes]:
        """The step's readings; ``registers`` (meter position: value) for register meters."""
        if registers:
            return self._with_registers(stamp, usage, flow, registers)
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

    def _with_registers(
        self, stamp: str, usage: list[float], flow: list[float], registers: Mapping[int, float]
    ) -> list[bytes]:
        out: list[bytes] = []
        water = self.water
        for i, head in enumerate(self.heads):
            register = registers.get(i)
            if register is None:
                body = f"{self.mids[i]}{usage[i]}"
            else:
                body = f"{self.register_mids[i].format(usage=usage[i])}{register}"
            rate = f', "flow_rate": {flow[i]}' if water.start <= i < water.stop else ""
            out.append(f"{head}{stamp}{body}{rate}}}".encode())
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
        stamp: str,
        usage: list[int],
        flow: list[int],
        registers: Mapping[int, float] | None = None,
    ) -> list[bytes]:
        return [self.reading(i, stamp, usage[i], flow[i]) for i in range(len(self.device_ids))]

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
    went out. The last ``repeats`` positions re-send earlier ones. ``truth`` is the
    interval's start and what every meter really consumed in it.
    """

    stamp: str
    keys: list[bytes]
    messages: list[bytes]
    injected: list[tuple[int, Injected]]
    silent: frozenset[int] = frozenset()
    cells: list[tuple[int, Episode]] = field(default_factory=list)
    repeats: int = 0
    truth: tuple[float, np.ndarray] | None = None

    def repeat(self, positions: list[int]) -> None:
        """Send the readings at ``positions`` again after the others."""
        self.keys = [*self.keys, *(self.keys[i] for i in positions)]
        self.messages = [*self.messages, *(self.messages[i] for i in positions)]
        self.repeats += len(positions)

    def slots_for(self, wanted: int) -> int:
        """How many positions hold the first ``wanted`` messages to send."""
        if not self.silent or wanted <= 0:
            return wanted
        if wanted >= len(self.keys) - len(self.silent):
            return len(self.keys)
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
) -> Step:
    messages = fmt.messages(stamp, usage, flow, registers)
    injected: list[tuple[int, Injected]] = []
    for i in np.flatnonzero(codes).tolist():
        code = int(codes[i])
        kind: Injected
        if code == MALFORMED:
            kind = draws.next_malformed_kind()
            messages[i] = malformed_message(kind, fmt.device_ids[i], stamp, fmt.metrics[i], rules)
        else:
            kind = STATELESS_FAULTS[code - 1]
            messages[i] = _faulty(fmt, i, kind, stamp, usage[i], flow[i])
        injected.append((i, kind))
    return Step(stamp, fmt.keys, messages, injected)


def _faulty(
    fmt: MessageFormat, i: int, code: FaultCode, stamp: str, value: Any, flow: Any
) -> bytes:
    """Meter ``i``'s reading with fault ``code``, which the contract classifies as ``code``."""
    if code is FaultCode.MISSING_METRIC:
        return fmt.reading(i, stamp, None, flow)
    if code is FaultCode.FUTURE_TIMESTAMP:
        return fmt.reading(i, future_timestamp(stamp), value, flow)
    return fmt.reading(i, stamp, corrupt_value(code, value, fmt.bounds[i]), flow)
