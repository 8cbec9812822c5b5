"""Healthy meters that behave like real ones: clocks that jitter, radios that deliver late,
constant loads and night use. None of it is a fault, so none of it may cost a reading or
change what the summary and the truths say.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import MemorySink

from meterflow.core import registry
from meterflow.core.contract import FaultCode, MeterType
from meterflow.core.thresholds import Rules
from simulator.cli import add_simulate_arguments, config_from_args
from simulator.faults import EpisodeRates, FaultRates
from simulator.fleet import write_registry
from simulator.generator import Simulation, SimulationConfig, Summary, simulate
from simulator.load import CONSTANT_KWH_PER_15MIN
from simulator.registers import DEFAULT_SHARES

END = date(2024, 6, 3)
INTERVAL = 900
EPISODES = EpisodeRates(
    {FaultCode.STUCK: 0.6, FaultCode.SPIKE: 0.6, FaultCode.LEAK: 2.0, FaultCode.NO_DATA: 0.6}
)
#: Three days of a mixed fleet with episodes, registers, gaps and repeats, but no
#: stateless faults (their stamps and dead letters would blur a message's time step).
BASE = SimulationConfig(
    meters=40,
    days=3,
    end=END,
    seed=5,
    faults=FaultRates.none(),
    episodes=EPISODES,
    shares=DEFAULT_SHARES,
    gaps_per_meter_day=1.0,
    repeat_share=0.01,
)


def run(config: SimulationConfig) -> tuple[list[tuple[bytes, bytes]], Summary]:
    sink = MemorySink()
    summary = simulate(config, sink.emit)
    return sink.messages, summary


def epoch_s(stamp: str) -> int:
    return int(datetime.fromisoformat(stamp).timestamp())


def counts(summary: Summary) -> dict[str, object]:
    """What the summary says of the stream, its timing aside."""
    return {k: v for k, v in summary.as_dict().items() if k != "elapsed_s"}


# --- clocks that jitter ---------------------------------------------------------------------


def test_a_jittering_clock_moves_stamps_a_little_and_nothing_else() -> None:
    plain, plain_summary = run(BASE)
    jittered, summary = run(replace(BASE, clock_jitter_s=60))
    assert counts(summary) == counts(plain_summary) and summary.consistent()
    offsets: Counter[int] = Counter()
    last: dict[str, int] = {}
    for (key, sent), (_, before) in zip(jittered, plain, strict=True):
        moved, original = json.loads(sent), json.loads(before)
        offset = epoch_s(moved.pop("timestamp")) - epoch_s(original.pop("timestamp"))
        assert moved == original  # the same reading, values and all
        offsets[offset] += 1
        # In order per meter (a repeat is sent again as it was, so not after itself).
        at = epoch_s(json.loads(sent)["timestamp"])
        assert at >= last.get(key.decode(), 0)
        last[key.decode()] = at
    assert min(offsets) == -60 and max(offsets) == 60 and len(offsets) > 100
    # The ground truth has the stamps as sent: a detector's openings carry those.
    sent_stamps = {(key.decode(), json.loads(sent)["timestamp"]) for key, sent in jittered}
    assert len(summary.episodes) == len(plain_summary.episodes) > 0
    for episode, plain_episode in zip(summary.episodes, plain_summary.episodes, strict=True):
        moved, original = episode.as_dict(), plain_episode.as_dict()
        for end in ("start", "end"):
            assert abs(epoch_s(moved.pop(end)) - epoch_s(original.pop(end))) <= 60
        assert moved == original
        if episode.code is not FaultCode.NO_DATA:  # a silence's stamps were never sent
            assert (episode.device_id, episode.start) in sent_stamps


def test_a_clock_jitter_is_refused_where_it_would_reorder_or_look_future() -> None:
    with pytest.raises(ValueError, match="below half the interval"):
        SimulationConfig(interval_s=60, clock_jitter_s=30)
    with pytest.raises(ValueError, match="future tolerance"):
        SimulationConfig(clock_jitter_s=120, rules=Rules(future_tolerance_s=60))
    with pytest.raises(ValueError, match="contract format"):
        SimulationConfig(message_format="legacy", clock_jitter_s=10)


# --- radios that deliver late ---------------------------------------------------------------


def delays_in(messages: list[tuple[bytes, bytes]]) -> dict[str, list[int]]:
    """Per meter, how many steps after its own each reading went out: the newest stamp
    sent by then (an on-time meter's) minus the reading's, in intervals."""
    newest = 0
    delays: dict[str, list[int]] = defaultdict(list)
    for key, value in messages:
        at = epoch_s(json.loads(value)["timestamp"])
        newest = max(newest, at)
        delays[key.decode()].append((newest - at) // INTERVAL)
    return delays


def test_late_radios_send_every_reading_in_order_whole_steps_late() -> None:
    plain, plain_summary = run(BASE)
    late, summary = run(replace(BASE, late_share=0.3, late_max_s=3600))
    # None lost, none sent twice: the same messages, in another order.
    assert sorted(late) == sorted(plain)
    assert counts(summary) == counts(plain_summary) and summary.consistent()
    assert summary.sent == len(late)
    assert summary.truth is not None and plain_summary.truth is not None
    assert summary.truth.table().equals(plain_summary.truth.table())

    def ground_truth(of: Summary) -> list[dict[str, object]]:
        return sorted(
            (e.as_dict() for e in of.episodes), key=lambda e: (str(e["start"]), e["device_id"])
        )

    assert ground_truth(summary) == ground_truth(plain_summary)
    # Each meter's readings in the order it read them.
    for device in {key for key, _ in plain}:
        assert [v for k, v in late if k == device] == [v for k, v in plain if k == device]
    # A late meter's readings go out a fixed whole number of steps late (1 to 4: an
    # hour at most), except the last ones, which the backfill sends at its end.
    last = max(epoch_s(json.loads(v)["timestamp"]) for _, v in plain)
    fixed = {}
    for device, delays in delays_in(late).items():
        stamps = [epoch_s(json.loads(v)["timestamp"]) for k, v in late if k.decode() == device]
        steady = {d for d, at in zip(delays, stamps, strict=True) if at + 4 * INTERVAL <= last}
        assert len(steady) == 1, (device, steady)
        fixed[device] = steady.pop()
    assert set(fixed.values()) <= {0, 1, 2, 3, 4} and len(set(fixed.values())) > 2
    assert 0.15 < sum(d > 0 for d in fixed.values()) / len(fixed) < 0.45
    # Stamps are the readings' own: the run's span is the plain one's.
    assert (summary.first_event, summary.last_event) == (
        plain_summary.first_event,
        plain_summary.last_event,
    )


def test_a_late_run_stopped_early_counts_exactly_what_went_out() -> None:
    config = replace(BASE, late_share=0.5, late_max_s=7200)
    messages, summary = run(replace(config, limit=2500))
    assert summary.sent == len(messages) == 2500 and summary.consistent()
    with pytest.raises(ValueError, match="at least one interval"):
        SimulationConfig(late_share=0.1, late_max_s=600)


# --- constant loads -------------------------------------------------------------------------


def test_constant_loads_repeat_one_value_and_the_registry_says_so(tmp_path: Path) -> None:
    config = replace(BASE, days=2, constant_load_share=0.5)
    messages, summary = run(config)
    fleet = Simulation(config).fleet
    assert fleet is not None and summary.truth is not None
    constant = {m.device_id: m.constant for m in fleet.meters if m.constant is not None}
    electricity = [m for m in fleet.meters if m.meter_type is MeterType.ELECTRICITY]
    assert 0.25 < len(constant) / len(electricity) < 0.75
    assert {m.reports for m in fleet.meters if m.constant is not None} == {"usage"}
    assert {load.street_light for load in constant.values()} == {True, False}
    readings: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for key, value in messages:
        fields = json.loads(value)
        if key.decode() in constant:
            start = datetime.fromisoformat(fields["timestamp"]) - timedelta(seconds=INTERVAL)
            readings[key.decode()].append((start.hour, fields["usage_kwh"]))
    for device, load in constant.items():
        assert CONSTANT_KWH_PER_15MIN[0] <= load.kwh_per_15min <= CONSTANT_KWH_PER_15MIN[1]
        values = {value for _, value in readings[device]}
        if load.street_light:  # on from 18:00 to 06:00 UTC, off by day
            assert values == {load.kwh_per_15min, 0.0}
            night = {*range(18, 24), *range(6)}
            assert all((value > 0) is (hour in night) for hour, value in readings[device])
        else:
            assert values == {load.kwh_per_15min}
    # No STUCK or SPIKE is injected on them; the consumption truth is their constant.
    assert summary.episode_counts[FaultCode.STUCK] and summary.episode_counts[FaultCode.SPIKE]
    assert not any(
        e.device_id in constant
        for e in summary.episodes
        if e.code in (FaultCode.STUCK, FaultCode.SPIKE)
    )
    table = summary.truth.table()
    for row in table.to_pylist():
        load = constant.get(row["device_id"])
        if load is not None:
            on = 48 if load.street_light else 96
            assert row["consumption"] == pytest.approx(load.kwh_per_15min * on)
    # The registry marks them, and only them, as constant loads.
    path = write_registry(fleet, str(tmp_path), INTERVAL)
    marked = pq.read_table(path).to_pydict()
    flags = dict(zip(marked["device_id"], marked[registry.CONSTANT_LOAD], strict=True))
    assert {device for device, flag in flags.items() if flag} == set(constant)
    assert pq.read_table(path).schema.field(registry.CONSTANT_LOAD).type == "bool"


def test_without_constant_loads_the_fleet_is_the_one_before() -> None:
    plain = Simulation(BASE).fleet
    other = Simulation(replace(BASE, constant_load_share=0.3)).fleet
    assert plain is not None and other is not None
    assert all(m.constant is None for m in plain.meters)
    for before, after in zip(plain.meters, other.meters, strict=True):
        if after.constant is None:
            assert after == before


# --- water at night -------------------------------------------------------------------------


def test_healthy_water_meters_use_some_water_at_night_now_and_then() -> None:
    """Between 02:00 and 04:00 a household is mostly idle, but not always: single uses
    (a flush), never the continuous flow of a leak."""
    config = SimulationConfig(
        meters=60, days=7, end=END, seed=2, faults=FaultRates.none(), mix={MeterType.WATER: 1.0}
    )
    messages, _ = run(config)
    night: dict[tuple[str, str], list[float]] = defaultdict(list)
    for key, value in messages:
        fields = json.loads(value)
        start = datetime.fromisoformat(fields["timestamp"]) - timedelta(seconds=INTERVAL)
        if 2 <= start.hour < 4:
            night[key.decode(), str(start.date())].append(fields["usage"])
    used = [sum(v > 0 for v in values) for values in night.values()]
    assert 0.3 < sum(n > 0 for n in used) / len(used) < 0.7  # about half the nights
    assert max(used) < 8  # never every interval of the window
    shares = sum(used) / (8 * len(used))
    assert 0.04 < shares < 0.12


# --- the command ----------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    return parser.parse_args(argv)


def test_the_command_sets_the_healthy_behaviours() -> None:
    rules = Rules()
    default = config_from_args(parse(), rules)
    assert (default.clock_jitter_s, default.late_share, default.constant_load_share) == (0, 0, 0)
    config = config_from_args(
        parse(
            *("--clock-jitter", "1m", "--late-share", "0.1", "--late-max", "2h"),
            *("--constant-load-share", "0.05"),
        ),
        rules,
    )
    assert config.clock_jitter_s == 60 and config.late_share == 0.1
    assert config.late_max_s == 7200 and config.constant_load_share == 0.05
    assert config_from_args(parse("--late-share", "0.1"), rules).late_max_s == 3600
    with pytest.raises(ValueError, match="half the interval"):
        config_from_args(parse("--interval", "60", "--clock-jitter", "30"), rules)


def test_late_radios_hold_live_readings_back_too() -> None:
    """Live, the held readings go out with later steps; a stopped run leaves them unsent
    and uncounted."""
    now = datetime.now(UTC).timestamp()
    config = SimulationConfig(
        meters=30,
        interval_s=2,
        mode="live",
        since_s=now - 100,  # 50 steps to catch up on at once
        seed=1,
        faults=FaultRates.none(),
        late_share=0.5,
        late_max_s=10,
        limit=400,
    )
    messages, summary = run(config)
    assert summary.sent == len(messages) == 400 and summary.consistent()
    for device, delays in delays_in(messages).items():
        assert len(set(delays)) == 1 and delays[0] <= 5, device
