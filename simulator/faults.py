"""Fault injection: which readings to corrupt, and how, so the contract names exactly that fault.

Each stateless :class:`~meterflow.core.contract.FaultCode` has its own rate per reading, and
malformed messages have one rate; malformed messages rotate through every
:class:`~meterflow.core.contract.DeadLetterReason` in turn. Every corruption here is built so
that :func:`meterflow.core.contract.evaluate` classifies it as the injected kind and nothing
else (the rules' precedence is taken into account), which is what lets a run's summary
serve as the ground truth of an end-to-end test.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

from meterflow.core.contract import (
    SENTINEL_VALUE,
    STATELESS_FAULTS,
    FaultCode,
    Rules,
    format_timestamp_us,
    parse_timestamp_us,
)
from meterflow.core.messages import DeadLetterReason

#: Malformed messages cycle through every reason, one of each in turn.
MALFORMED_KINDS: tuple[DeadLetterReason, ...] = tuple(DeadLetterReason)
#: A future timestamp is the reading's own time plus a century: a meter clock gone wrong,
#: far past any tolerance, and a pure function of the reading so seeded runs stay identical.
FUTURE_SHIFT = timedelta(days=36_525)
DEFAULT_FAULT_RATE = 0.002
DEFAULT_MALFORMED_RATE = 0.001
#: Draw code of a reading left alone; ``k`` in ``1..5`` is ``STATELESS_FAULTS[k - 1]``.
NORMAL = 0
MALFORMED = len(STATELESS_FAULTS) + 1


@dataclass(frozen=True)
class FaultRates:
    """Probability per reading of each injected fault kind, and of a malformed message."""

    rates: Mapping[FaultCode, float] = field(default_factory=dict)
    malformed: float = 0.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.rates) - set(STATELESS_FAULTS))
        if unknown:
            kinds = ", ".join(STATELESS_FAULTS)
            raise ValueError(f"cannot inject {', '.join(unknown)}: only {kinds}")
        if not all(0 <= rate <= 1 for rate in (*self.rates.values(), self.malformed)):
            raise ValueError("fault rates must be between 0 and 1")
        if self.total > 1:
            raise ValueError(f"fault and malformed rates add up to {self.total:g}, over 1")

    @classmethod
    def default(cls) -> FaultRates:
        """A little of everything, as a live fleet might show."""
        return cls(dict.fromkeys(STATELESS_FAULTS, DEFAULT_FAULT_RATE), DEFAULT_MALFORMED_RATE)

    @classmethod
    def none(cls) -> FaultRates:
        return cls({}, 0.0)

    @property
    def total(self) -> float:
        return sum(self.rates.values()) + self.malformed


def parse_rate_table(text: str) -> dict[FaultCode, float]:
    """``"SENTINEL=0.01,NEGATIVE=0.002"`` (kinds case-insensitive) to a rate table."""
    table: dict[FaultCode, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        try:
            code, rate = FaultCode(name.strip().upper()), float(value)
        except ValueError:
            code = None
        if code not in STATELESS_FAULTS:
            kinds = ", ".join(STATELESS_FAULTS)
            raise ValueError(f"{item!r} is not KIND=RATE with KIND one of {kinds}")
        table[code] = rate
    return table


class FaultDraws:
    """Draws, per reading, whether to leave it, corrupt it (which fault) or garble it.

    Codes are :data:`NORMAL`, ``k`` for ``STATELESS_FAULTS[k - 1]`` and :data:`MALFORMED`.
    """

    def __init__(self, rates: FaultRates, rng: np.random.Generator) -> None:
        self.rng = rng
        self.active = rates.total > 0
        per_code = [rates.rates.get(code, 0.0) for code in STATELESS_FAULTS]
        self.edges = np.cumsum([*per_code, rates.malformed])
        self._malformed_turn = 0

    def draw(self, shape: tuple[int, ...]) -> np.ndarray:
        """One code per reading (int8); with no rates, no random numbers are used."""
        if not self.active:
            return np.zeros(shape, dtype=np.int8)
        picks = np.searchsorted(self.edges, self.rng.random(shape), side="right") + 1
        return np.where(picks > MALFORMED, NORMAL, picks).astype(np.int8)

    def next_malformed_kind(self) -> DeadLetterReason:
        kind = MALFORMED_KINDS[self._malformed_turn % len(MALFORMED_KINDS)]
        self._malformed_turn += 1
        return kind


def corrupt_value(code: FaultCode, value: float, bound: float) -> float:
    """The metric value a ``code`` fault reports instead of ``value`` (``value >= 0``).

    Integer in, integer out (the prototype's format sends integers). ``MISSING_METRIC`` and
    ``FUTURE_TIMESTAMP`` leave the value alone: they drop the field or move the timestamp.
    """
    if code is FaultCode.SENTINEL:
        return SENTINEL_VALUE
    if code is FaultCode.NEGATIVE:  # at most -2: never the sentinel, never zero
        return round(-(value + 2), 3)
    if code is FaultCode.OUT_OF_RANGE:
        doubled = 2 * bound + value
        return int(doubled) if isinstance(value, int) else round(doubled, 3)
    return value


def future_timestamp(stamp: str) -> str:
    """``stamp`` moved :data:`FUTURE_SHIFT` ahead, in the contract's timestamp form."""
    shift_us = int(FUTURE_SHIFT.total_seconds()) * 1_000_000
    return format_timestamp_us(parse_timestamp_us(stamp) + shift_us)


def check_future_shift(earliest_stamp: str) -> None:
    """Refuse a run whose future timestamps would not be ahead (readings a century old)."""
    ahead = datetime.fromisoformat(future_timestamp(earliest_stamp))
    if ahead < datetime.now(UTC) + timedelta(days=1):
        raise ValueError(
            f"readings from {earliest_stamp} are too old to inject FUTURE_TIMESTAMP faults"
        )


def malformed_message(
    kind: DeadLetterReason, device_id: str, stamp: str, metric: str, rules: Rules
) -> bytes:
    """Bytes that the contract dead-letters for ``kind``, looking like a real meter's mistake."""
    reading = {"device_id": device_id, "timestamp": stamp, metric: 1.0}
    if kind is DeadLetterReason.EMPTY:
        return b""
    if kind is DeadLetterReason.OVERSIZE:  # a firmware dump appended to a reading
        return json.dumps({**reading, "debug": "0" * rules.max_message_bytes}).encode()
    if kind is DeadLetterReason.NOT_JSON:  # cut off halfway, as by a dropped connection
        whole = json.dumps(reading).encode()
        return whole[: len(whole) // 2]
    if kind is DeadLetterReason.NOT_OBJECT:
        return json.dumps(list(reading.values())).encode()
    if kind is DeadLetterReason.MISSING_FIELD:
        return json.dumps({"device_id": device_id, metric: 1.0}).encode()
    if kind is DeadLetterReason.WRONG_TYPE:
        return json.dumps({**reading, metric: "1.0"}).encode()
    if kind is DeadLetterReason.BAD_TIMESTAMP:
        local = datetime.fromisoformat(stamp).strftime("%d/%m/%Y %H:%M:%S")
        return json.dumps({**reading, "timestamp": local}).encode()
    if kind is DeadLetterReason.UNKNOWN_METER_TYPE:
        return json.dumps({**reading, "meter_type": "steam"}).encode()
    raise ValueError(f"no malformed message for {kind}")
