"""Field-sized episodes: drawn from field-like ranges that know nothing of the detection
rules, so a benchmark can measure recall by fault size; and what both sizes record.

Rules sizes (every episode trips its rule) are tests/unit/test_episodes.py's.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from dataclasses import replace
from datetime import date, datetime, timedelta

import pytest
from helpers import MemorySink

from meterflow.core.contract import FaultCode, MeterType
from meterflow.core.thresholds import DetectionRules, Rules
from simulator.cli import add_simulate_arguments, config_from_args
from simulator.episodes import GROUND_TRUTH_SCHEMA, Episode, ground_truth_table
from simulator.faults import (
    FIELD_LEAK_FLOW,
    FIELD_SILENT_S,
    FIELD_SPIKE_TIMES,
    FIELD_STUCK_S,
    SPIKE_MARGIN,
    EpisodeRates,
    FaultRates,
    plan_episodes,
)
from simulator.generator import SimulationConfig, Summary, simulate

END = date(2024, 6, 3)
INTERVAL = 900
RULES = DetectionRules()
MANY = EpisodeRates(
    {FaultCode.STUCK: 0.6, FaultCode.SPIKE: 0.6, FaultCode.LEAK: 2.0, FaultCode.NO_DATA: 0.6}
)
FIELD = SimulationConfig(
    meters=60,
    days=7,
    end=END,
    seed=3,
    faults=FaultRates.default(),
    episodes=MANY,
    episode_sizes="field",
)

Readings = dict[str, dict[str, dict[str, float]]]  # device -> stamp -> fields


def run(config: SimulationConfig) -> tuple[Readings, Summary]:
    """Every JSON object the run sent, by meter and stamp (dead letters aside)."""
    sink = MemorySink()
    summary = simulate(config, sink.emit)
    readings: Readings = defaultdict(dict)
    for _, value in sink.messages:
        try:
            fields = json.loads(value)
        except ValueError:
            continue
        if isinstance(fields, dict) and isinstance(fields.get("timestamp"), str):
            readings[fields["device_id"]].setdefault(fields["timestamp"], fields)
    return readings, summary


def stamps_of(episode: Episode) -> list[str]:
    """The stamps of an episode's readings (NO_DATA: the missing ones)."""
    assert episode.start is not None
    start = datetime.fromisoformat(episode.start)
    return [
        f"{start + timedelta(seconds=k * INTERVAL):%Y-%m-%dT%H:%M:%SZ}"
        for k in range(episode.readings)
    ]


def by_code(summary: Summary) -> dict[FaultCode, list[Episode]]:
    found: dict[FaultCode, list[Episode]] = defaultdict(list)
    for episode in summary.episodes:
        found[episode.code].append(episode)
    return found


def test_field_sizes_fall_in_their_ranges_and_some_no_rule_can_see() -> None:
    _, summary = run(FIELD)
    episodes = by_code(summary)
    assert all(len(episodes[code]) >= 10 for code in MANY.rates), summary.episode_counts
    assert summary.consistent()
    for episode in summary.episodes:
        assert episode.complete and episode.size is not None
        if episode.code in (FaultCode.STUCK, FaultCode.NO_DATA):
            assert episode.size == episode.readings * INTERVAL
    stuck, silent = episodes[FaultCode.STUCK], episodes[FaultCode.NO_DATA]
    leaks, spikes = episodes[FaultCode.LEAK], episodes[FaultCode.SPIKE]
    # Durations are whole readings of their range (a stuck spell shows two at least).
    assert all(FIELD_STUCK_S[0] <= e.size <= FIELD_STUCK_S[1] for e in stuck)
    assert all(FIELD_SILENT_S[0] <= e.size <= FIELD_SILENT_S[1] for e in silent)
    assert all(
        FIELD_LEAK_FLOW[0] <= e.size <= FIELD_LEAK_FLOW[1] and e.value == e.size for e in leaks
    )
    # A spike is its factor over the typical level, or less where the bounds cap it.
    assert all(1 < e.size <= FIELD_SPIKE_TIMES[1] for e in spikes)
    # Log-uniform: silences of minutes and of days in one run.
    assert min(e.size for e in silent) < 2 * 3600 and max(e.size for e in silent) > 86_400
    # Not shaped to be seen: each kind has episodes below what its rule needs.
    assert any(e.value is not None and e.value <= RULES.stuck_min[e.meter_type] for e in stuck)
    assert any(e.readings < RULES.stuck_readings for e in stuck)
    assert any(e.readings < RULES.nodata_intervals for e in silent)
    assert any(e.size < RULES.leak_min_night_flow for e in leaks)
    assert any(e.size < RULES.spike_factor for e in spikes)
    # Water spans are neither kept under 20 hours nor out of the leak night window.
    water = [e for e in stuck + silent if e.meter_type is MeterType.WATER]
    assert any(e.size > 20 * 3600 for e in water)
    assert any(any(RULES.in_leak_night(int(s[11:13])) for s in stamps_of(e)) for e in water)


def test_the_stream_holds_each_field_episode_as_its_ground_truth_says() -> None:
    readings, summary = run(FIELD)
    for episode in summary.episodes:
        series = readings[episode.device_id]
        stamps = stamps_of(episode)
        assert stamps[0] == episode.start and stamps[-1] == episode.end
        if episode.code is FaultCode.NO_DATA:
            assert not any(stamp in series for stamp in stamps)
            continue
        metric = next(k for k in series[stamps[0]] if k.startswith("usage"))
        values = [series[stamp][metric] for stamp in stamps]
        if episode.code is FaultCode.STUCK:
            assert set(values) == {episode.value}  # 0 or tiny as the meter read it
        elif episode.code is FaultCode.SPIKE:
            assert values == [episode.value] and episode.value is not None
            assert episode.value < 0.9 * Rules().bounds[metric]
        else:
            assert min(values) > 0  # a leak leaves no idle interval, however small


@pytest.mark.parametrize("sizes", ["rules", "field"])
def test_a_water_stuck_register_keeps_reporting_the_real_flow(sizes: str) -> None:
    """A frozen register repeats its usage while ``flow_rate`` goes on reporting what the
    meter really sees: the flow of the same run without episodes."""
    config = replace(
        FIELD,
        meters=20,
        days=5,
        mix={MeterType.WATER: 1.0},
        faults=FaultRates.none(),
        episodes=EpisodeRates({FaultCode.STUCK: 1.0}),
        episode_sizes=sizes,
    )
    plain, _ = run(replace(config, episodes=EpisodeRates.none()))
    frozen, summary = run(config)
    stuck = [
        e for e in summary.episodes if e.code is FaultCode.STUCK and e.meter_type is MeterType.WATER
    ]
    assert len(stuck) >= 10
    disagree = 0
    for episode in stuck:
        for stamp in stamps_of(episode):
            sent, real = frozen[episode.device_id][stamp], plain[episode.device_id][stamp]
            assert sent["usage"] == episode.value
            assert sent["flow_rate"] == real["flow_rate"]
            disagree += not math.isclose(sent["usage"], real["flow_rate"] * 15, abs_tol=0.01)
    assert disagree > len(stuck)  # the repeats are not what the flow explains


def test_rules_sizes_record_their_size_too() -> None:
    _, summary = run(replace(FIELD, days=4, episode_sizes="rules"))
    episodes = by_code(summary)
    assert all(episodes[code] for code in MANY.rates)
    for episode in episodes[FaultCode.STUCK] + episodes[FaultCode.NO_DATA]:
        assert episode.size == episode.readings * INTERVAL
    assert all(e.size == e.value for e in episodes[FaultCode.LEAK])
    least = SPIKE_MARGIN * RULES.spike_factor
    assert all(e.size is not None and e.size >= least for e in episodes[FaultCode.SPIKE])


def test_the_ground_truth_has_a_size_column() -> None:
    episode = Episode("wm000001", MeterType.WATER, FaultCode.LEAK, 2, value=3.5, size=3.5)
    episode.record("2024-06-01T00:15:00Z")
    episode.record("2024-06-01T00:30:00Z")
    table = ground_truth_table([episode])
    assert table.schema == GROUND_TRUTH_SCHEMA
    assert GROUND_TRUTH_SCHEMA.field("size").type == "double"
    assert table.column("size").to_pylist() == [3.5] and episode.as_dict()["size"] == 3.5


def test_field_sizes_are_planned_without_the_rules_floors() -> None:
    field = plan_episodes(MANY, RULES, Rules(), INTERVAL, "field")
    assert field.stuck_readings == (2.0, 192.0) and field.silent_readings == (1.0, 288.0)
    assert field.water_span_max is None and set(field.stuck_floor.values()) == {0.0}
    assert field.spike_types == set(MeterType)
    # Stricter rules move rules sizes, not field sizes.
    strict = DetectionRules(stuck_readings=20, nodata_intervals=10, leak_min_night_flow=20)
    assert plan_episodes(MANY, strict, Rules(), INTERVAL, "field") == field
    assert plan_episodes(MANY, strict, Rules(), INTERVAL).stuck_readings[0] >= 30
    with pytest.raises(ValueError, match="episode sizes 'big'"):
        SimulationConfig(episode_sizes="big")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    return parser.parse_args(argv)


def test_the_command_sizes_episodes_from_the_field_unless_told() -> None:
    rules = Rules()
    assert config_from_args(parse(), rules).episode_sizes == "field"
    assert config_from_args(parse("--episode-sizes", "rules"), rules).episode_sizes == "rules"
    assert SimulationConfig().episode_sizes == "rules"  # the library's (meterflow run's)
