"""Simulator rate in backfill mode, on one core, against a naive generator in the same run.

Three figures: the simulator into a list (generation alone), the simulator into Kafka (what
``meterflow simulate --mode backfill`` does), and a baseline that builds the same messages
the obvious way (``json.dumps`` of a dict per reading, Python ``random`` per value).
Target (issue #2): at least 200,000 readings/s on one core.

    python -m bench.simulator_rate [--readings 2000000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.common import local_broker, timed, write_results
from meterflow.clients import kafka
from simulator.faults import FaultRates
from simulator.fleet import Fleet, build_fleet
from simulator.generator import Emit, SimulationConfig, simulate

TARGET_PER_S = 200_000
METERS = 10_000


def naive_messages(fleet: Fleet, steps: int, limit: int, emit: Emit) -> int:
    """The straightforward generator: a dict and json.dumps per reading."""
    rng = random.Random(1)
    start = datetime(2024, 6, 1, tzinfo=UTC)
    sent = 0
    for step in range(steps):
        stamp = (start + timedelta(minutes=15 * step)).strftime("%Y-%m-%dT%H:%M:%SZ")
        for meter in fleet.meters:
            if sent >= limit:
                return sent
            message: dict[str, object] = {
                "device_id": meter.device_id,
                "timestamp": stamp,
                "meter_type": meter.meter_type,
            }
            message["value"] = round(rng.lognormvariate(0, 0.25) * meter.scale, 3)
            emit(meter.device_id.encode(), json.dumps(message).encode())
            sent += 1
    return sent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=2_000_000)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="meterflow-bench-sim-"))
    with local_broker(workdir) as bootstrap:  # started first: it keeps both cores
        kafka.ensure_topics(bootstrap, ["bench-sim"], 4)
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the target says
        return _measure(args.readings, bootstrap)


def _measure(readings: int, bootstrap: str) -> int:
    fleet = build_fleet(METERS, seed=3)
    steps = -(-readings // METERS)
    config = SimulationConfig(
        meters=METERS,
        days=steps * 900 / 86_400,
        seed=3,
        faults=FaultRates.default(),
        limit=readings,
    )

    def discard(key: bytes | None, value: bytes) -> None:
        pass

    with timed() as naive:
        naive_sent = naive_messages(fleet, steps, readings, discard)
    with timed() as memory:
        summary = simulate(config, discard, fleet=fleet)
    sink = kafka.ProducerSink(bootstrap, "bench-sim")
    with timed() as to_kafka:
        kafka_summary = simulate(config, sink.emit, fleet=fleet)
        undelivered = sink.close(120)

    naive_rate = naive_sent / naive["seconds"]
    memory_rate = summary.sent / memory["seconds"]
    kafka_rate = kafka_summary.sent / to_kafka["seconds"]
    results = {
        "readings": summary.sent,
        "meters": METERS,
        "naive_readings_per_s": naive_rate,
        "simulator_readings_per_s": memory_rate,
        "simulator_to_kafka_readings_per_s": kafka_rate,
        "ratio_simulator_over_naive": memory_rate / naive_rate,
        "undelivered": undelivered,
        "target_readings_per_s": TARGET_PER_S,
        "target_met": kafka_rate >= TARGET_PER_S,
        "faults": summary.as_dict()["faults"],
        "malformed": summary.as_dict()["malformed"],
    }
    write_results("simulator_rate", results)
    return 0 if undelivered == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
