"""The simulator: reproducible, shaped like real load, and honest about what it injects."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import MemorySink, wait_for

from meterflow.core.classifier import DeadLetter, Reading, classify, evaluate, status_of
from meterflow.core.config import Settings
from meterflow.core.contract import (
    METER_SPECS,
    SENTINEL_VALUE,
    STATELESS_FAULTS,
    TYPE_ORDER,
    FaultCode,
    MeterType,
    Status,
)
from meterflow.core.messages import DeadLetterReason
from meterflow.core.thresholds import Rules
from meterflow.core.timestamps import parse_timestamp_us, reading_days
from simulator.cli import (
    add_simulate_arguments,
    config_from_args,
    parse_seconds,
    run_simulate,
)
from simulator.faults import FaultRates
from simulator.fleet import build_fleet, read_registry, write_registry
from simulator.generator import SimulationConfig, Summary, backfill_starts, simulate
from simulator.load import WATER_IDLE_15MIN, LoadModel, expected_consumption, idle_probability

END = date(2024, 6, 3)  # a Monday: the two days before are a weekend
ALL_FAULTS = FaultRates(dict.fromkeys(STATELESS_FAULTS, 0.01), malformed=0.02)
STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def run(config: SimulationConfig) -> tuple[list[tuple[bytes, bytes]], Summary]:
    sink = MemorySink()
    summary = simulate(config, sink.emit)
    return sink.messages, summary


def now_us() -> int:
    return int(time.time() * 1_000_000)


def at(*fields: int) -> float:
    return datetime(*fields, tzinfo=UTC).timestamp()


# --- reproducibility and the contract --------------------------------------------------


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not() -> None:
    config = SimulationConfig(meters=60, days=0.5, end=END, seed=11, faults=ALL_FAULTS)
    first, summary = run(config)
    again, _ = run(config)
    other, _ = run(SimulationConfig(meters=60, days=0.5, end=END, seed=12, faults=ALL_FAULTS))
    assert len(first) == 60 * 48 == summary.sent
    assert summary.abnormal > 0 and summary.deadletter > 0  # faults are part of the stream
    assert first == again
    assert first != other


def test_every_message_is_classified_as_the_summary_says() -> None:
    messages, summary = run(
        SimulationConfig(meters=300, days=1, end=END, seed=5, faults=ALL_FAULTS)
    )
    assert summary.sent == len(messages) == 300 * 96
    assert summary.consistent()
    found: Counter[object] = Counter()
    statuses: Counter[Status] = Counter()
    reference = now_us()
    for _, value in messages:
        outcome = evaluate(value, reference)
        statuses[status_of(outcome)] += 1
        found[outcome.reason if isinstance(outcome, DeadLetter) else outcome.fault_code] += 1
    assert found[None] == summary.valid
    for code in STATELESS_FAULTS:
        assert found[code] == summary.faults[code] > 0, code
    for reason in DeadLetterReason:
        assert found[reason] == summary.malformed[reason] > 0, reason
    assert statuses == summary.expected_outcomes()


def test_messages_are_keyed_contract_readings() -> None:
    messages, _ = run(
        SimulationConfig(meters=30, days=0.1, end=END, seed=1, faults=FaultRates.none())
    )
    for key, value in messages:
        fields = json.loads(value)
        meter_type = MeterType(fields["meter_type"])
        spec = METER_SPECS[meter_type]
        assert key == fields["device_id"].encode()
        assert re.fullmatch(rf"{spec.id_prefix}\d{{6}}", fields["device_id"])
        assert STAMP.fullmatch(fields["timestamp"])
        expected_keys = ["device_id", "timestamp", "meter_type", spec.metric, *spec.extra_metrics]
        assert list(fields) == expected_keys
        assert fields[spec.metric] == round(fields[spec.metric], 3) >= 0
        assert fields[spec.metric] > 0 or meter_type is MeterType.WATER  # idle water reads 0
        assert value == json.dumps(fields).encode()  # the f-string layout is json.dumps's


def test_backfill_covers_whole_days_in_event_time_order() -> None:
    messages, summary = run(
        SimulationConfig(meters=5, days=2, end=END, seed=1, faults=FaultRates.none())
    )
    stamps = [json.loads(value)["timestamp"] for _, value in messages]
    assert stamps == sorted(stamps)
    # Each reading ends its interval: the day's first is at 00:15, its last at the next 00:00.
    micros = np.array([parse_timestamp_us(stamp) for stamp in stamps], dtype=np.int64)
    per_day = Counter(reading_days(micros, "UTC").tolist())
    june_1 = (date(2024, 6, 1) - date(1970, 1, 1)).days
    assert per_day == {june_1: 5 * 96, june_1 + 1: 5 * 96}
    assert (summary.first_event, summary.last_event) == (stamps[0], stamps[-1])
    assert (stamps[0], stamps[-1]) == ("2024-06-01T00:15:00Z", "2024-06-03T00:00:00Z")


def digest(messages: list[tuple[bytes, bytes]]) -> str:
    hashed = hashlib.sha256()
    for key, value in messages:
        hashed.update(key + b"\0" + value + b"\n")
    return hashed.hexdigest()


def outline(messages: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Per message its key, stamp and outcome: where faults are, not the values."""
    result = classify([v for _, v in messages], [2_000_000_000_000_000] * len(messages))
    rows = []
    for i, (key, value) in enumerate(messages):
        letter = result.dead_letters.get(i)
        tag = str(letter) if letter is not None else str(result.fault_code(i))
        try:
            fields = json.loads(value)
        except ValueError:
            fields = None
        stamp = fields.get("timestamp") if isinstance(fields, dict) else None
        rows.append((key, f"{stamp}|{tag}".encode()))
    return rows


#: Digests of streams computed with the code before issue 12 (stateful episodes, idle
#: water). Electricity and gas, and every message's key, stamp and outcome, must not move;
#: only water values did, on purpose (idle intervals). Since readings are stamped with
#: their interval's end (the contract's convention), every stamp is one interval later:
#: :func:`stamped_at_starts` moves them back before the digest.
BEFORE_EPISODES = {
    "electricity and gas": "d7a70d0a368992f1ffbe7b680a5b3f27584521c43fdbd137ce682bf98fe81567",
    "mixed, without water": "c567113f92bd11632ad1e8667e3c21d622f597bb06eb26115c3fec168a29dc01",
    "mixed, outline": "6d9c48ff14e69430cf48419c8be6f6c786cebc83101e052d4a1c0565b6a625de",
    "legacy": "8b5dcbd41b6a0606529b990bd2f2ef0ecdf4b1e028b83cacd516c8c841a8d91c",
}
#: The mixed stream with idle water (computed when it was introduced).
WITH_IDLE_WATER = "0ae6f9b36251668c4b800380ad480dd2a679ac5143c0ab6b1efb03f895a1a985"


#: The stamp layouts the simulator writes (the contract's, and a malformed one's), in quotes.
_STAMP_LAYOUTS = {
    rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ": "%Y-%m-%dT%H:%M:%SZ",
    rb"\d\d/\d\d/\d{4} \d\d:\d\d:\d\d": "%d/%m/%Y %H:%M:%S",
}


def stamped_at_starts(
    messages: list[tuple[bytes, bytes]], interval_s: int = 900
) -> list[tuple[bytes, bytes]]:
    """The messages with every stamp one interval earlier, byte for byte otherwise."""

    def earlier(layout: str) -> Callable[[re.Match[bytes]], bytes]:
        def shift(match: re.Match[bytes]) -> bytes:
            moment = datetime.strptime(match.group(1).decode(), layout)
            return b'"' + (moment - timedelta(seconds=interval_s)).strftime(layout).encode() + b'"'

        return shift

    shifted = []
    for key, value in messages:
        text = value
        for pattern, layout in _STAMP_LAYOUTS.items():
            text = re.sub(b'"(' + pattern + b')"', earlier(layout), text)
        shifted.append((key, text))
    return shifted


def test_without_episodes_the_stream_is_the_one_before_them() -> None:
    config = SimulationConfig(meters=40, days=2, end=END, seed=21, faults=ALL_FAULTS)
    no_water = {MeterType.ELECTRICITY: 0.6, MeterType.GAS: 0.4}
    dry_only = stamped_at_starts(run(replace(config, mix=no_water))[0])
    assert digest(dry_only) == BEFORE_EPISODES["electricity and gas"]
    mixed = stamped_at_starts(run(config)[0])
    dry = [(key, value) for key, value in mixed if not key.startswith(b"wm")]
    assert digest(dry) == BEFORE_EPISODES["mixed, without water"]
    assert digest(outline(mixed)) == BEFORE_EPISODES["mixed, outline"]
    assert digest(mixed) == WITH_IDLE_WATER
    legacy = SimulationConfig(
        days=1,
        end=END,
        seed=2,
        message_format="legacy",
        faults=FaultRates({FaultCode.SENTINEL: 0.1}),
    )
    assert digest(stamped_at_starts(run(legacy)[0])) == BEFORE_EPISODES["legacy"]


def test_a_backfill_ending_after_today_is_refused_before_sending() -> None:
    tomorrow = datetime.now(UTC).date() + timedelta(days=1)
    sink = MemorySink()
    with pytest.raises(ValueError, match="after today"):
        simulate(SimulationConfig(meters=3, end=tomorrow), sink.emit)
    assert sink.messages == []


# --- load shapes --------------------------------------------------------------------------


def test_daily_weekly_and_seasonal_shapes() -> None:
    def mean(meter_type: MeterType, start: float) -> float:
        return float(expected_consumption([start], 900)[0, TYPE_ORDER.index(meter_type)])

    monday, saturday = at(2024, 6, 3), at(2024, 6, 1)
    electricity, water, gas = MeterType.ELECTRICITY, MeterType.WATER, MeterType.GAS
    assert mean(electricity, monday + 19.5 * 3600) > 3 * mean(electricity, monday + 3 * 3600)
    assert mean(water, monday + 3 * 3600) < 0.05 * mean(water, monday + 7.5 * 3600)
    # Weekend mornings start later; weekend middays use more.
    assert mean(water, saturday + 7 * 3600) < 0.5 * mean(water, monday + 7 * 3600)
    assert mean(electricity, saturday + 12 * 3600) > 1.2 * mean(electricity, monday + 12 * 3600)
    # Gas heats in winter; morning and evening are its peaks.
    assert mean(gas, at(2024, 1, 15, 19)) > 2 * mean(gas, at(2024, 7, 15, 19))
    assert mean(gas, monday + 7 * 3600) > 2 * mean(gas, monday + 14 * 3600)


def test_simulated_readings_follow_the_daily_cycle() -> None:
    messages, _ = run(
        SimulationConfig(meters=200, days=7, end=END, seed=3, faults=FaultRates.none())
    )
    by_hour: dict[tuple[str, int], list[float]] = defaultdict(list)
    for _, value in messages:
        fields = json.loads(value)
        metric = METER_SPECS[MeterType(fields["meter_type"])].metric
        by_hour[fields["meter_type"], int(fields["timestamp"][11:13])].append(fields[metric])
    average = {key: sum(v) / len(v) for key, v in by_hour.items()}
    assert average["electricity", 3] < 0.5 * average["electricity", 19]
    assert average["water", 3] < 0.05 * average["water", 7]
    assert average["gas", 3] < 0.5 * average["gas", 7]


def test_consumption_scales_with_the_interval() -> None:
    start = at(2024, 6, 3, 18)
    hour = expected_consumption([start], 3600)[0]
    quarters = expected_consumption([start + k * 900 for k in range(4)], 900).sum(axis=0)
    assert hour == pytest.approx(quarters, rel=1e-5)  # the season (mid-interval) moves a hair
    assert hour == pytest.approx(4 * expected_consumption([start + 1350], 900)[0], rel=0.15)


def test_normal_readings_stay_valid_even_where_the_model_would_overflow() -> None:
    tight = Rules(bounds={**Rules().bounds, "usage_kwh": 1.0, "flow_rate": 0.5})
    fleet = build_fleet(2000, seed=4)
    model = LoadModel(fleet.type_index, fleet.scale, tight)
    for interval in (60, 86_400):
        usage, flow = model.sample([at(2024, 1, 15, 18)], interval, np.random.default_rng(0))
        bounds = np.array([tight.bounds[METER_SPECS[t].metric] for t in TYPE_ORDER])
        water = fleet.type_index == TYPE_ORDER.index(MeterType.WATER)  # idle intervals read 0
        assert (usage[:, ~water] > 0).all() and (usage[:, water] >= 0).all()
        assert (usage < bounds[fleet.type_index]).all()
        assert (flow[:, ~water] > 0).all() and (flow[:, water] >= 0).all() and (flow < 0.5).all()
        assert (usage != SENTINEL_VALUE).all()
    messages, summary = run(
        SimulationConfig(
            meters=300,
            days=2,
            interval_s=86_400,
            end=END,
            seed=2,
            faults=FaultRates.none(),
            rules=tight,
        )
    )
    assert summary.valid == len(messages) == 600
    outcomes = [evaluate(value, now_us(), tight) for _, value in messages]
    assert all(isinstance(o, Reading) and o.fault_code is None for o in outcomes)


def test_water_idles_mostly_at_night_and_uses_as_much_as_before() -> None:
    water_only = {MeterType.WATER: 1.0}
    config = SimulationConfig(
        meters=150, days=7, end=END, seed=12, faults=FaultRates.none(), mix=water_only
    )
    messages, _ = run(config)
    idle: dict[int, list[bool]] = defaultdict(list)
    per_day: Counter[str] = Counter()
    for _, value in messages:
        fields = json.loads(value)
        assert (fields["usage"] == 0) is (fields["flow_rate"] == 0)
        start = datetime.fromisoformat(fields["timestamp"]) - timedelta(minutes=15)
        idle[start.hour].append(fields["usage"] == 0)  # the hour the interval starts in
        per_day[str(start.date())] += fields["usage"]
    share = {hour: sum(flags) / len(flags) for hour, flags in idle.items()}
    assert min(share[hour] for hour in range(1, 5)) > 0.8
    assert max(share[hour] for hour in range(7, 21)) < 0.45
    # The expectation per interval is unchanged: each day's total is what the shapes say.
    starts = backfill_starts(config)
    expected = expected_consumption(starts, 900)[:, TYPE_ORDER.index(MeterType.WATER)]
    scale = sum(m.scale for m in build_fleet(150, seed=12, mix=water_only).meters)
    for day, first in zip(sorted(per_day), range(0, len(starts), 96), strict=True):
        assert per_day[day] == pytest.approx(scale * expected[first : first + 96].sum(), rel=0.03)


def test_idle_chance_follows_the_interval() -> None:
    quarters = idle_probability([at(2024, 6, 3, hour) for hour in range(24)], 900)
    assert quarters == pytest.approx(WATER_IDLE_15MIN)
    assert idle_probability([at(2024, 6, 3, 3)], 3600)[0] == pytest.approx(0.93**4)
    assert idle_probability([at(2024, 6, 3, 19)], 60)[0] > 0.85  # a minute mostly is idle
    assert idle_probability([at(2024, 6, 3)], 86_400)[0] < 1e-12  # a day never is


def test_water_flow_agrees_with_usage() -> None:
    fleet = build_fleet(500, seed=8)
    model = LoadModel(fleet.type_index, fleet.scale, Rules())
    usage, flow = model.sample([at(2024, 6, 3, 8)], 900, np.random.default_rng(1))
    water = fleet.slices[MeterType.WATER]
    assert usage[0, water] == pytest.approx(flow[0, water] * 15, abs=0.0075 + 1e-9)


# --- fleet and registry -------------------------------------------------------------------


def test_fleet_mix_ids_metadata_and_reproducibility() -> None:
    fleet = build_fleet(1000, seed=9)
    counts = Counter(m.meter_type for m in fleet.meters)
    assert counts == {MeterType.ELECTRICITY: 500, MeterType.WATER: 300, MeterType.GAS: 200}
    assert len({m.device_id for m in fleet.meters}) == 1000
    assert {m.device_id for m in fleet.meters if m.meter_type is MeterType.GAS} == {
        f"gm{n:06d}" for n in range(1, 201)
    }
    assert len({m.district for m in fleet.meters}) == 8
    assert len({m.city for m in fleet.meters}) == 1
    households = defaultdict(set)
    for meter in fleet.meters:
        households[meter.household_id].add((meter.owner, meter.address, meter.scale))
    assert len(households) == 500 and all(len(v) == 1 for v in households.values())
    assert build_fleet(1000, seed=9).meters == fleet.meters
    assert build_fleet(1000, seed=10).meters != fleet.meters
    custom = build_fleet(10, seed=1, mix={MeterType.GAS: 1.0})
    assert {m.device_id[:2] for m in custom.meters} == {"gm"}


def test_registry_roundtrip(tmp_path: Path) -> None:
    fleet = build_fleet(50, seed=6)
    settings = Settings.from_env({"METERFLOW_DATA_DIR": str(tmp_path)})
    path = write_registry(fleet, settings.registry_path)
    assert Path(path) == tmp_path / "lake" / "registry" / "meters.parquet"
    assert os.listdir(Path(path).parent) == ["meters.parquet"]  # no temp file left behind
    assert read_registry(settings.registry_path).meters == fleet.meters
    table = pq.read_table(path)
    assert str(table.schema.field("installed_on").type) == "date32[day]"
    assert table.column("meter_type").to_pylist()[0] == "electricity"
    write_registry(build_fleet(20, seed=7), settings.registry_path)  # replaced whole
    assert len(read_registry(settings.registry_path)) == 20


# --- the prototype's format ---------------------------------------------------------------

ELECTRICITY = re.compile(
    r'\{"device_id": "em[1-4]", "timestamp": "[0-9T:-]+Z", "usage_kwh": -?\d+\}'
)
WATER = re.compile(
    r'\{"device_id": "wm[1-4]", "timestamp": "[0-9T:-]+Z", "usage": -?\d+, "flow_rate": \d+\}'
)


def test_legacy_format_is_the_prototypes_byte_for_byte() -> None:
    config = SimulationConfig(
        days=1,
        end=END,
        seed=2,
        message_format="legacy",
        faults=FaultRates({FaultCode.SENTINEL: 0.1}),
    )
    messages, summary = run(config)
    assert len(messages) == 8 * 96
    for key, value in messages:
        text = value.decode()
        assert ELECTRICITY.fullmatch(text) or WATER.fullmatch(text), text
        fields = json.loads(text)
        assert key == fields["device_id"].encode()
        assert value == json.dumps(fields).encode()
        assert all(
            isinstance(v, int) for k, v in fields.items() if k not in ("device_id", "timestamp")
        )
    values = [
        v for _, m in messages for k, v in json.loads(m).items() if k in ("usage_kwh", "usage")
    ]
    assert summary.faults[FaultCode.SENTINEL] == values.count(SENTINEL_VALUE) > 0
    assert min(v for v in values if v != SENTINEL_VALUE) == 0 and max(values) <= 30
    assert {key for key, _ in messages} == {
        f"{p}{i}".encode() for p in ("em", "wm") for i in range(1, 5)
    }
    assert run(config)[0] == messages


# --- stopping -------------------------------------------------------------------------------


def test_live_mode_honours_the_rate_cap_and_stops_at_once() -> None:
    stop = threading.Event()
    sink = MemorySink()
    config = SimulationConfig(meters=200, interval_s=1, mode="live", rate=400, seed=1)
    thread = threading.Thread(target=simulate, args=(config, sink.emit, stop))
    started = time.monotonic()
    thread.start()
    # Stopped in its second step: the first (200 meters) went out at the cap, on the clock.
    wait_for(lambda: len(sink.messages) > 200, 10, "the second live step")
    stop.set()
    thread.join(timeout=2)
    elapsed = time.monotonic() - started
    assert not thread.is_alive()
    assert 200 <= len(sink.messages) <= 400 * elapsed + 20
    stamp = datetime.fromisoformat(json.loads(sink.messages[-1][1])["timestamp"])
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 5


def test_should_stop_ends_a_backfill_with_a_consistent_summary() -> None:
    sink = MemorySink()
    summary = simulate(
        SimulationConfig(meters=100, days=1, end=END, seed=1, faults=ALL_FAULTS),
        sink.emit,
        should_stop=lambda: len(sink.messages) >= 1000,
    )
    assert summary.sent == len(sink.messages) == 1000  # stops between steps of 100
    assert summary.consistent()


def test_a_failing_emit_leaves_exact_counts() -> None:
    sent: list[bytes] = []

    def emit(_key: bytes, value: bytes) -> None:
        if len(sent) == 1234:
            raise RuntimeError("broker gone")
        sent.append(value)

    summary = Summary()
    with pytest.raises(RuntimeError):
        simulate(
            SimulationConfig(meters=100, days=1, end=END, seed=1, faults=ALL_FAULTS),
            emit,
            summary=summary,
        )
    assert summary.sent == 1234 and summary.consistent()


def test_count_limit_stops_mid_step() -> None:
    messages, summary = run(SimulationConfig(meters=100, days=1, end=END, seed=1, limit=250))
    assert len(messages) == summary.sent == 250 and summary.consistent()


# --- the command --------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    ("text", "seconds"), [("900", 900), ("15m", 900), ("30s", 30), ("1h", 3600)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_seconds(text) == seconds


def test_fault_options_build_the_rate_table() -> None:
    rules = Rules()
    default = config_from_args(parse(), rules).faults
    assert default == FaultRates.default()
    only = config_from_args(parse("--fault-rates", "none", "--fault-rate", "sentinel=0.05"), rules)
    assert only.faults.rates == {FaultCode.SENTINEL: 0.05}
    table = config_from_args(
        parse("--fault-rates", "NEGATIVE=0.1,OUT_OF_RANGE=0.2", "--malformed-rate", "0"), rules
    )
    assert table.faults == FaultRates({FaultCode.NEGATIVE: 0.1, FaultCode.OUT_OF_RANGE: 0.2}, 0.0)


def test_bad_options_are_refused_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--fault-rate", "LEAK=0.1")  # stateful: the simulator cannot inject it
    assert "KIND=RATE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("--interval", "soon")
    assert "duration like" in capsys.readouterr().err


def test_run_simulate_reports_a_bad_run_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings.from_env({"METERFLOW_DATA_DIR": str(tmp_path)})
    sink = MemorySink()
    tomorrow = (datetime.now(UTC).date() + timedelta(days=1)).isoformat()
    code = run_simulate(parse("--mode", "backfill", "--end-date", tomorrow), settings, sink)
    err = capsys.readouterr().err
    assert code == 2 and sink.messages == []
    assert err.count("\n") == 1 and "after today" in err


def test_sigterm_stops_run_simulate_cleanly_and_flushes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings.from_env({"METERFLOW_DATA_DIR": str(tmp_path)})
    sink = MemorySink()
    args = parse(
        "--meters", "50", "--interval", "1", "--seed", "3", "--fault-rates", "SENTINEL=0.2"
    )
    handler_before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(0.6, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        code = run_simulate(args, settings, sink)
    finally:
        timer.cancel()
    captured = capsys.readouterr()
    assert code == 0 and sink.flushes == 1
    assert "stopped by SIGTERM" in captured.err
    sent = int(re.search(r"sent ([\d,]+) messages", captured.out).group(1).replace(",", ""))
    assert sent == len(sink.messages) > 0
    sentinels = sum(b'": -1' in value for _, value in sink.messages)
    assert f"SENTINEL {sentinels:,}" in captured.out
    assert "sent = valid + faults + malformed: yes" in captured.out
    registry = read_registry(settings.registry_path)
    assert set(registry.device_ids) == {key.decode() for key, _ in sink.messages}
    assert signal.getsignal(signal.SIGTERM) is handler_before


def test_run_simulate_fails_when_messages_are_not_delivered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class LossySink(MemorySink):
        def flush(self, timeout: float) -> int:
            return 7

    settings = Settings.from_env({"METERFLOW_DATA_DIR": str(tmp_path)})
    args = parse("--mode", "backfill", "--end-date", "2024-06-03", "--meters", "4", "--no-registry")
    code = run_simulate(args, settings, LossySink())
    assert code == 1
    assert "7 messages were not delivered" in capsys.readouterr().err
    assert not (tmp_path / "lake").exists()
