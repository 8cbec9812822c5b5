"""False alarms of the stateful rules on a real recording, replayed as a meter would send it.

Synthetic traffic is shaped from the rules' own thresholds, so it says little about how
often a real house trips them. Here a recording goes through the replay parser (as
``meterflow replay`` reads it), the contract's stateless checks, and then the rules of
:mod:`meterflow.stream.detection.rules`, in event-time order, one micro-batch at a time, with the
NO_DATA timer fired at each batch's end as a fleet's watermark would. A recording holds no
injected fault but does hold real events (a kettle, a holiday), so an opening is a false
alarm only if it is plainly normal use; the SPIKE openings are listed with their ratio to
the baseline to judge that (docs/architecture.md, "Stateful detection").

``python -m bench.detection_real`` reports it for the excerpts in ``tests/data/real``;
``tests/unit/test_detection_real.py`` holds the excerpts to zero openings per rule.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from meterflow.core.classifier import classify
from meterflow.core.contract import FaultCode, MeterType
from meterflow.core.thresholds import DetectionRules
from meterflow.core.timestamps import format_timestamp_us
from meterflow.stream.detection.rules import OPEN, Meter, MeterState, Observed, expire, observe
from simulator.replay import detect, replay

#: The recordings' own interval and the fleet's usual one.
INTERVALS_S = (60, 900)
#: Event time per micro-batch: a catch-up reads about this much of a meter at once.
BATCH_S = 3600
RULES = tuple(FaultCode(c) for c in ("STUCK", "SPIKE", "LEAK", "NO_DATA"))
TOP_SPIKES = 5
#: A long recording is also measured in fresh windows this long, each from an empty state:
#: a meter's first days, with little history, are when a baseline is weakest.
FRESH_DAYS = 14
_FAR_FUTURE_US = 2**62  # no replayed reading is in the future
_BASELINE = re.compile(r"the baseline (\S+)$")


def readings(path: Path, interval_s: int) -> tuple[MeterType, list[Observed]]:
    """The file's readings as a meter reporting every ``interval_s`` would send them.

    The replayed minutes are classified by the contract (a missing value is faulty), then
    summed per aligned interval: an interval with any faulty or missing minute is one
    faulty reading, as a meter that lost part of its interval would be flagged.
    """
    sent: list[bytes | None] = []
    replay(path, lambda _key, value: sent.append(value))
    batch = classify(sent, [_FAR_FUTURE_US] * len(sent))
    meter_type = detect(path).meter_type
    step_us = interval_s * 1_000_000
    sums: dict[int, float] = {}
    faulty: set[int] = set()
    for i, event_us in enumerate(batch.event_time_us.tolist()):
        start = event_us // step_us * step_us
        value = float(batch.consumption[i])
        if batch.fault_index[i] or math.isnan(value):
            faulty.add(start)
        sums[start] = sums.get(start, 0.0) + (0.0 if math.isnan(value) else value)
    out = [
        Observed(start, None, True) if start in faulty else Observed(start, round(total, 6))
        for start, total in sorted(sums.items())
    ]
    return meter_type, out


def batches(observed: list[Observed], batch_s: int) -> Iterator[tuple[int, list[Observed]]]:
    """Consecutive micro-batches of event time, empty ones too: the watermark still moves."""
    if not observed:
        return
    step_us = batch_s * 1_000_000
    end = observed[0].event_us // step_us * step_us + step_us
    chunk: list[Observed] = []
    for reading in observed:
        while reading.event_us >= end:
            yield end, chunk
            chunk, end = [], end + step_us
        chunk.append(reading)
    yield end, chunk


@dataclass
class RuleCount:
    """One rule's openings over a recording (and, for SPIKE, the largest ones)."""

    readings: int = 0
    openings: int = 0
    top: list[dict[str, float | str]] = field(default_factory=list)

    @property
    def per_10k(self) -> float:
        return round(self.openings * 10_000 / self.readings, 3) if self.readings else 0.0


def measure(
    meter: Meter, observed: list[Observed], batch_s: int = BATCH_S
) -> dict[FaultCode, RuleCount]:
    """Openings per rule over ``observed`` (sorted), fed in micro-batches with timers."""
    state = MeterState()
    counts = {code: RuleCount(readings=len(observed)) for code in RULES}
    spikes: list[dict[str, float | str]] = []
    last_us = observed[-1].event_us if observed else 0
    for end_us, chunk in batches(observed, batch_s):
        # The recording's end is no silence: the watermark stops at its last reading.
        changes = observe(meter, state, chunk) + expire(meter, state, min(end_us, last_us))
        for change in changes:
            if change.action != OPEN:
                continue
            counts[change.code].openings += 1
            if change.code is FaultCode.SPIKE and change.value is not None:
                found = _BASELINE.search(change.reason)
                baseline = float(found.group(1)) if found else math.nan
                spikes.append(
                    {
                        "at": format_timestamp_us(change.at_us),
                        "value": change.value,
                        "baseline": baseline,
                        "ratio": round(change.value / baseline, 1) if baseline else math.inf,
                    }
                )
    spikes.sort(key=lambda s: -float(s["ratio"]))
    counts[FaultCode.SPIKE].top = spikes[:TOP_SPIKES]
    return counts


def measure_file(path: Path, rules: DetectionRules | None = None) -> dict[str, object]:
    """Per interval, per rule: readings, openings, openings per 10,000 readings (and, for a
    recording longer than :data:`FRESH_DAYS`, the openings from fresh starts)."""
    per_interval: dict[str, object] = {}
    for interval_s in INTERVALS_S:
        meter_type, observed = readings(path, interval_s)
        meter = Meter(f"real-{path.name}", meter_type, interval_s, rules or DetectionRules())
        counts = measure(meter, observed)
        fresh = {code: 0 for code in RULES}
        windows = _windows(observed, FRESH_DAYS * 86_400_000_000)
        if len(windows) > 1:
            for window in windows:
                for code, count in measure(meter, window).items():
                    fresh[code] += count.openings
        per_interval[str(interval_s)] = {
            str(code): {
                "readings": c.readings,
                "openings": c.openings,
                "per_10k": c.per_10k,
                **({"fresh_starts": fresh[code]} if len(windows) > 1 else {}),
                **({"top": c.top} if code is FaultCode.SPIKE else {}),
            }
            for code, c in counts.items()
        }
    return per_interval


def _windows(observed: list[Observed], span_us: int) -> list[list[Observed]]:
    out: list[list[Observed]] = []
    for reading in observed:
        if not out or reading.event_us >= out[-1][0].event_us + span_us:
            out.append([])
        out[-1].append(reading)
    return out
