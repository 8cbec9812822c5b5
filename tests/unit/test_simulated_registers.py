"""The simulator's registers, gaps and repeats, checked through the VEE against its truth.

A simulated day is classified as the stream classifies it and validated as the daily job
validates it (:func:`meterflow.batch.vee.validate_day`); the validated consumption must
be the simulator's truth wherever the readings carry it (docs/architecture.md, "Validated
consumption").
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from helpers import MemorySink, kafka_records

from meterflow.batch import vee
from meterflow.core.lake import TIMESTAMP
from meterflow.core.thresholds import Rules
from meterflow.stream.classify import classify_batch
from simulator.faults import FaultRates
from simulator.generator import Simulation, SimulationConfig, simulate
from simulator.registers import BOTH, DEFAULT_SHARES, REGISTER, USAGE, ReadingShares

END = date(2024, 6, 3)
DAY = END - timedelta(days=1)  # the second day: the first gives the registers a start
INTERVAL = 900
MIDNIGHT = f"{DAY}T00:00:00Z"
SHARES = ReadingShares(register_only=0.3, both=0.3, near_rollover=0.5)


def simulated(config: SimulationConfig):
    sink = MemorySink()
    summary = simulate(config, sink.emit)
    return sink.messages, summary


def lake_rows(messages: list[tuple[bytes, bytes]]) -> pa.Table:
    """The messages as the stream files them: classified, in Kafka order."""
    ingest = int(datetime(2024, 6, 3, 1, tzinfo=UTC).timestamp() * 1_000_000)
    batch = kafka_records([value for _, value in messages], ingest)
    return pa.Table.from_batches([classify_batch(batch, Rules()).classified])


def test_register_meters_report_what_their_share_says_and_keep_counting() -> None:
    config = SimulationConfig(
        meters=300, days=2, end=END, seed=3, shares=DEFAULT_SHARES, faults=FaultRates.none()
    )
    messages, summary = simulated(config)
    fleet = Simulation(config).fleet
    assert fleet is not None
    reports = Counter(m.reports for m in fleet.meters)
    assert 0.12 < reports[REGISTER] / 300 < 0.28 and reports[BOTH] > 0 and reports[USAGE] > 0
    assert not any(m.reports == BOTH for m in fleet.meters if m.meter_type == "water")
    kind_of = {m.device_id: m.reports for m in fleet.meters}
    last: dict[str, float] = {}
    for _, value in messages:
        fields = json.loads(value)
        names = {name.split("_")[0] for name in fields if name.startswith(("usage", "register"))}
        expected = {USAGE: {"usage"}, REGISTER: {"register"}, BOTH: {"usage", "register"}}
        assert names == expected[kind_of[fields["device_id"]]]
        register = next((v for k, v in fields.items() if k.startswith("register")), None)
        if register is not None:
            previous = last.get(fields["device_id"])
            near = next(m for m in fleet.meters if m.device_id == fields["device_id"])
            # A register only goes down when it rolls over.
            assert previous is None or register >= previous or near.near_rollover
            last[fields["device_id"]] = register
    # The same seed gives the same registers, on any run of the same days.
    again, _ = simulated(config)
    assert again == messages
    assert summary.consistent() and summary.sent == len(messages)


def test_a_restarted_simulator_continues_every_register() -> None:
    """Registers are functions of time: a live run after a backfill continues them."""
    config = SimulationConfig(
        meters=60, days=1, end=END, seed=5, shares=SHARES, faults=FaultRates.none()
    )
    first, _ = simulated(config)
    second, _ = simulated(replace(config, end=END + timedelta(days=1)))
    registers: dict[tuple[str, str], float] = {}
    for _, value in first + second:
        fields = json.loads(value)
        for name, number in fields.items():
            if name.startswith("register"):
                registers.setdefault((fields["device_id"], fields["timestamp"]), number)
                assert registers[(fields["device_id"], fields["timestamp"])] == number


@pytest.mark.parametrize("seed", [1, 2])
def test_a_simulated_day_validates_to_the_simulators_truth(seed: int) -> None:
    config = SimulationConfig(
        meters=240,
        days=2,
        end=END,
        seed=seed,
        shares=SHARES,
        gaps_per_meter_day=1.0,
        repeat_share=0.02,
        faults=FaultRates.none(),
    )
    messages, summary = simulated(config)
    fleet = Simulation(config).fleet
    assert fleet is not None and summary.truth is not None
    rows = lake_rows(messages)
    assert pc.all(pc.equal(rows["status"], "valid")).as_py()
    day_rows = rows.filter(pc.equal(rows["date"], pa.scalar(DAY, pa.date32())))
    before = rows.filter(pc.less(rows["date"], pa.scalar(DAY, pa.date32())))
    with_register = before.filter(pc.is_valid(before["register"]))
    latest = with_register.group_by("device_id").aggregate([("event_time", "max")])
    starts = latest.rename_columns(["device_id", "event_time"]).join(
        with_register.select(["device_id", "event_time", "register"]),
        ["device_id", "event_time"],
    )
    meters = pa.table(
        {
            "device_id": fleet.device_ids,
            "interval_seconds": [INTERVAL] * len(fleet),
            "register_digits": [m.register_digits for m in fleet.meters],
            "register_reset_at": pa.nulls(len(fleet), TIMESTAMP),
        }
    )
    start_us = int(datetime(DAY.year, DAY.month, DAY.day, tzinfo=UTC).timestamp() * 1e6)
    profile = pa.table({"device_id": pa.array([], pa.string()), "hour": [], "value": []})
    validated = vee.validate_day(
        day_rows, meters, starts, profile, vee.Day(start_us, start_us + 86_400_000_000, "UTC")
    )

    counted = pc.is_in(validated["quality"], pa.array([vee.MEASURED, vee.ESTIMATED]))
    consumption = (
        validated.filter(counted).group_by("device_id").aggregate([("value", "sum")])
    ).to_pydict()
    found = dict(zip(consumption["device_id"], consumption["value_sum"], strict=True))
    truth = summary.truth.table().filter(pc.equal(summary.truth.table()["date"], DAY))
    true = dict(zip(*truth.select(["device_id", "consumption"]).to_pydict().values(), strict=True))

    # Which stamps each meter's readings of the day (and the midnight before) carried.
    stamps: dict[str, set[str]] = {}
    for _, value in messages:
        fields = json.loads(value)
        stamps.setdefault(fields["device_id"], set()).add(fields["timestamp"])
    day_stamps = {
        (datetime.fromtimestamp(start_us / 1e6 + INTERVAL * k, UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
        for k in range(1, 97)
    }
    last_stamp = max(day_stamps)
    exact, rolled, spread = 0, 0, 0
    for meter in fleet.meters:
        sent = stamps[meter.device_id]
        whole = day_stamps <= sent and MIDNIGHT in sent
        carries_register = meter.reports != USAGE and MIDNIGHT in sent and last_stamp in sent
        if whole or carries_register:
            # Every interval sent, or a register at both ends: the day's total is exact.
            assert found[meter.device_id] == pytest.approx(true[meter.device_id], abs=1e-6), (
                meter.device_id,
                meter.reports,
            )
            exact += 1
            spread += carries_register and not whole
            rolled += meter.near_rollover and carries_register
    assert exact > 100 and spread > 10 and rolled > 10  # the cases were exercised

    # Every repeat of a day's reading is counted once, as a duplicate.
    distinct = day_rows.group_by(["device_id", "event_time"]).aggregate([]).num_rows
    repeats_of_day = day_rows.num_rows - distinct
    assert summary.repeated > 0
    assert pc.sum(validated["duplicates"]).as_py() == repeats_of_day > 0
    # Gaps were withheld and then estimated.
    assert summary.missing > 0
    assert pc.sum(pc.equal(validated["method"], "linear")).as_py() > 0
    assert pc.sum(pc.equal(validated["method"], "register_spread")).as_py() > 0
