"""``meterflow run``'s simulated fleet: a backfill up to now, then live readings with episodes.

:func:`background_simulation` writes the fleet's registry and returns the work that
``meterflow.local.run`` runs in a thread; the work raises when it fails, so the run can
stop and say why instead of going on without readings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace

from meterflow.core.config import Settings
from meterflow.core.contract import FaultCode
from meterflow.core.logs import get_logger
from meterflow.core.timestamps import SECONDS_PER_DAY
from simulator.episodes import default_ground_truth_path, write_ground_truth
from simulator.faults import EpisodeRates
from simulator.fleet import build_fleet, write_registry
from simulator.generator import Simulation, SimulationConfig, StopSignal, Summary, simulate
from simulator.registers import (
    DEFAULT_GAPS_PER_METER_DAY,
    DEFAULT_REPEAT_SHARE,
    DEFAULT_SHARES,
    default_truth_path,
    write_truth,
)
from simulator.sink import Sink

log = get_logger("simulator.background")


def background_simulation(
    settings: Settings,
    sink: Sink,
    stop: StopSignal,
    meters: int,
    interval_s: float,
    seed: int | None,
    backfill_days: float = 0,
    episodes: Mapping[FaultCode, float] | None = None,
) -> Callable[[], Summary]:
    """``meterflow run``'s fleet: writes its registry now, returns the work for a thread.

    The work sends a live fleet with the default faults, registers, gaps and repeats
    (:mod:`simulator.registers`) into ``sink`` until ``stop`` is set, and raises if it
    fails (the caller says so and flushes). With ``backfill_days`` the fleet first
    backfills that many days before today 00:00 UTC and today up to now, and the live
    readings go on from there on the same grid, with the registers where the backfill left
    them: the daily DAG gets whole days, the detector sees no silence but the injected
    gaps (no NO_DATA per meter at every start), and the backfilled history is the baseline
    a live SPIKE needs. ``episodes`` (per meter-day) are injected from the first live
    readings on. Their ground truth, and the daily consumption truth, are written beside
    the registry when the work ends.
    """
    config = SimulationConfig(
        meters=meters,
        interval_s=interval_s,
        mode="live",
        seed=seed,
        rules=settings.rules,
        episodes=EpisodeRates(episodes or {}),
        episode_warmup_s=0.0,
        shares=DEFAULT_SHARES,
        gaps_per_meter_day=DEFAULT_GAPS_PER_METER_DAY,
        repeat_share=DEFAULT_REPEAT_SHARE,
        # Gaps shorter than a silence: a NO_DATA here is an episode, in the ground truth.
        max_gap=max(1, settings.detection.nodata_intervals - 2),
        timezone=settings.timezone,
    )
    fleet = build_fleet(meters, seed, shares=config.shares)
    Simulation(config, fleet)  # a configuration that cannot run fails here, not in a thread
    write_registry(fleet, settings.registry_path, config.interval_s)

    def run() -> Summary:
        live = config
        summary = Summary()
        if backfill_days:
            backfill = backfill_until_now(config, backfill_days)
            done = simulate(backfill, sink.emit, stop, fleet=fleet)
            log.info("simulator=backfilled days=%g sent=%d", backfill.days, done.sent)
            summary.truth = done.truth  # the live run adds to the backfill's days
            history_s = backfill.days * SECONDS_PER_DAY
            # The backfill's last reading is stamped until_s (it ends its interval): the
            # live run's first one reports the interval after it.
            assert backfill.until_s is not None
            since = backfill.until_s + config.interval_s
            live = replace(config, since_s=since, history_s=history_s)
        try:
            Simulation(live, fleet).run(sink.emit, stop, summary=summary)
        finally:
            log.info(
                "simulator=stopped %s", " ".join(f"{k}={v}" for k, v in summary.as_dict().items())
            )
            if summary.truth is not None:
                where = write_truth(summary.truth, default_truth_path(settings.registry_path))
                log.info(
                    "simulator=consumption-truth days=%d path=%s", len(summary.truth.days), where
                )
            if live.episodes.active:
                path = default_ground_truth_path(settings.registry_path)
                where = write_ground_truth(summary.episodes, path)
                log.info("simulator=ground-truth episodes=%d path=%s", len(summary.episodes), where)
        return summary

    return run


def backfill_until_now(live: SimulationConfig, days_before_today: float) -> SimulationConfig:
    """A backfill of ``live``'s fleet from ``days_before_today`` before today 00:00 UTC up
    to now, on the grid of intervals from midnight, without episodes: a live run from its
    ``until_s`` continues it with no gap."""
    now = time.time()
    midnight = now - now % SECONDS_PER_DAY
    interval = live.interval_s
    until = midnight + (now - midnight) // interval * interval
    return replace(
        live,
        mode="backfill",
        days=days_before_today + (until - midnight) / SECONDS_PER_DAY,
        until_s=until,
        episodes=EpisodeRates.none(),
        episode_warmup_s=None,
    )
