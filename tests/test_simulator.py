"""Simulator: reproducible, shaped like real load, and honest about what it injects."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from datetime import UTC, date, datetime

import numpy as np
import pytest

from meterflow.contract import (
    METER_SPECS,
    STATELESS_FAULTS,
    TYPE_ORDER,
    DeadLetter,
    DeadLetterReason,
    FaultCode,
    MeterType,
    Rules,
    evaluate,
)
from simulator.cli import parse_fault_rate, parse_interval
from simulator.fleet import build_fleet, read_registry, write_registry
from simulator.generator import FaultRates, SimulationConfig, simulate
from simulator.load import consumption

END = date(2024, 6, 3)  # a Monday: the day before is a Sunday


def run(config: SimulationConfig) -> tuple[list[tuple[bytes | None, bytes]], object]:
    sent: list[tuple[bytes | None, bytes]] = []
    summary = simulate(config, lambda key, value: sent.append((key, value)))
    return sent, summary


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    config = SimulationConfig(meters=40, days=0.25, end=END, seed=11)
    first, _ = run(config)
    again, _ = run(config)
    other, _ = run(SimulationConfig(meters=40, days=0.25, end=END, seed=12))
    assert first == again
    assert first != other
    assert len(first) == 40 * 24  # 6 hours at 15 minutes


def test_every_injected_fault_is_classified_as_injected() -> None:
    faults = FaultRates({code: 0.01 for code in STATELESS_FAULTS}, malformed=0.02)
    sent, summary = run(SimulationConfig(meters=300, days=1, end=END, seed=5, faults=faults))
    assert summary.consistent()
    assert summary.sent == len(sent) == 300 * 96
    now = int(time.time() * 1_000_000)
    found: Counter[object] = Counter()
    for _, value in sent:
        outcome = evaluate(value, now)
        found[outcome.reason if isinstance(outcome, DeadLetter) else outcome.fault_code] += 1
    assert found[None] == summary.valid
    for code in STATELESS_FAULTS:
        assert found[code] == summary.faults[code] > 0, code
    for reason in DeadLetterReason:
        assert found[reason] == summary.malformed[reason] > 0, reason


def test_keys_are_device_ids_and_messages_follow_the_contract() -> None:
    sent, _ = run(SimulationConfig(meters=30, days=0.1, end=END, seed=1, faults=FaultRates.none()))
    for key, value in sent:
        message = json.loads(value)
        assert key == message["device_id"].encode()
        spec = METER_SPECS[MeterType(message["meter_type"])]
        assert message["device_id"].startswith(spec.id_prefix)
        assert spec.metric in message
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:00Z", message["timestamp"])


def test_backfill_covers_whole_days_before_the_end_date() -> None:
    sent, summary = run(
        SimulationConfig(meters=2, days=2, end=END, seed=1, faults=FaultRates.none())
    )
    stamps = sorted({json.loads(v)["timestamp"] for _, v in sent})
    assert stamps[0] == "2024-06-01T00:00:00Z" and stamps[-1] == "2024-06-02T23:45:00Z"
    assert len(stamps) == 2 * 96
    assert (summary.first_event, summary.last_event) == (stamps[0], stamps[-1])


def _mean(meter_type: MeterType, at: datetime, interval_s: float = 900) -> float:
    """Average consumption of many average households of one type at ``at``."""
    index = np.full(5000, TYPE_ORDER.index(meter_type), dtype=np.int8)
    values, _ = consumption(index, np.ones(5000), at, interval_s, np.random.default_rng(0))
    return float(values.mean())


def test_daily_and_weekly_shapes() -> None:
    monday = datetime(2024, 6, 3, tzinfo=UTC)
    night, evening = monday.replace(hour=3), monday.replace(hour=19, minute=30)
    assert _mean(MeterType.ELECTRICITY, evening) > 3 * _mean(MeterType.ELECTRICITY, night)
    assert _mean(MeterType.WATER, night) < 0.05 * _mean(MeterType.WATER, monday.replace(hour=8))
    # Weekend mornings start later than weekday ones.
    sunday_7am = datetime(2024, 6, 2, 7, 30, tzinfo=UTC)
    assert _mean(MeterType.WATER, monday.replace(hour=7, minute=30)) > 1.5 * _mean(
        MeterType.WATER, sunday_7am
    )
    # Gas heats in winter.
    january = datetime(2024, 1, 15, 19, tzinfo=UTC)
    assert _mean(MeterType.GAS, january) > 2 * _mean(MeterType.GAS, evening)


def test_values_scale_with_interval_and_stay_in_bounds() -> None:
    at = datetime(2024, 6, 3, 19, tzinfo=UTC)
    quarter = _mean(MeterType.ELECTRICITY, at, 900)
    hour = _mean(MeterType.ELECTRICITY, at, 3600)
    assert hour == pytest.approx(4 * quarter, rel=0.1)
    fleet = build_fleet(500, seed=3)
    values, flows = consumption(fleet.type_index, fleet.scale, at, 3600, np.random.default_rng(1))
    bounds = np.array([Rules().bounds[METER_SPECS[t].metric] for t in TYPE_ORDER])[fleet.type_index]
    assert (values > 0).all() and (values < bounds).all()
    assert (flows > 0).all() and (flows < Rules().bounds["flow_rate"]).all()


def test_fleet_mix_metadata_and_registry_roundtrip(tmp_path) -> None:
    fleet = build_fleet(1000, seed=9)
    share = Counter(m.meter_type for m in fleet.meters)
    assert 0.4 < share["electricity"] / 1000 < 0.65
    assert share["water"] > 200 and share["gas"] > 100
    assert len({m.device_id for m in fleet.meters}) == 1000
    assert len({m.district for m in fleet.meters}) == 8
    assert build_fleet(1000, seed=9).meters == fleet.meters
    path = write_registry(fleet, str(tmp_path / "lake"))
    table = read_registry(str(tmp_path / "lake"))
    assert path.name == "meters.parquet" and table.num_rows == 1000
    assert table.column("device_id").to_pylist() == [m.device_id for m in fleet.meters]
    assert {"household_id", "district", "installed_on", "address"} <= set(table.column_names)


def test_legacy_format_is_the_prototypes() -> None:
    faults = FaultRates({FaultCode.SENTINEL: 0.1})
    sent, summary = run(
        SimulationConfig(
            mode="backfill", days=1, end=END, seed=2, message_format="legacy", faults=faults
        )
    )
    electricity = re.compile(
        r'\{"device_id": "em[1-4]", "timestamp": "[0-9T:-]+Z", "usage_kwh": -?\d+\}'
    )
    water = re.compile(
        r'\{"device_id": "wm[1-4]", "timestamp": "[0-9T:-]+Z", "usage": -?\d+, "flow_rate": \d+\}'
    )
    for key, value in sent:
        text = value.decode()
        assert electricity.fullmatch(text) or water.fullmatch(text), text
        assert key.decode() == json.loads(text)["device_id"]
    sentinels = sum(1 for _, v in sent if b": -1" in v)
    assert sentinels == summary.faults[FaultCode.SENTINEL] > 0
    assert {k for k, _ in sent} == {f"{p}{i}".encode() for p in ("em", "wm") for i in range(1, 5)}


def test_live_mode_honours_rate_and_stops_cleanly() -> None:
    stop = threading.Event()
    sent: list[bytes] = []
    config = SimulationConfig(meters=50, interval_s=0.2, mode="live", rate=500, seed=1)
    thread = threading.Thread(
        target=simulate, args=(config, lambda k, v: sent.append(v), stop.is_set)
    )
    started = time.monotonic()
    thread.start()
    time.sleep(1.0)
    stop.set()
    thread.join(timeout=5)
    elapsed = time.monotonic() - started
    assert not thread.is_alive()
    assert 0 < len(sent) <= 500 * elapsed + 50  # at most one step over the cap
    now = datetime.now(UTC)
    stamp = datetime.fromisoformat(json.loads(sent[-1])["timestamp"])
    assert abs((now - stamp).total_seconds()) < 5


def test_limit_stops_mid_step() -> None:
    sent, summary = run(SimulationConfig(meters=100, days=1, end=END, seed=1, limit=250))
    assert len(sent) == summary.sent == 250 and summary.consistent()


@pytest.mark.parametrize(
    ("text", "seconds"), [("900", 900), ("15m", 900), ("30s", 30), ("1h", 3600)]
)
def test_interval_parsing(text: str, seconds: float) -> None:
    assert parse_interval(text) == seconds


def test_bad_fault_rates_are_refused_with_the_reason() -> None:
    with pytest.raises(Exception, match="KIND=RATE"):
        parse_fault_rate("LEAKY=0.1")
    with pytest.raises(ValueError, match="cannot inject"):
        FaultRates({FaultCode.LEAK: 0.1})
    with pytest.raises(ValueError, match="50%"):
        FaultRates({FaultCode.SENTINEL: 0.6})
