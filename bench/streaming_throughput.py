"""Streaming throughput: N readings through the Spark speed layer vs a plain Python loop.

Both consume the same topic on the same broker, apply the same rules
(:mod:`meterflow.stream.classify`), publish abnormal events and dead letters, and write the lake
as Parquet. Two Spark figures:

* the running job, as deployed: the query is up (started and warmed with a small batch)
  when the simulator produces the readings; the clock runs from the first produced
  reading to the commit of the last one, production included (end to end). Target
  (issue #2): at least 100,000 readings/s on a 2-core machine;
* cold catch-up: a new query on a preloaded topic with ``availableNow``, query start and
  the first micro-batch's warm-up included.

    python -m bench.streaming_throughput [--readings 2000000] [--partitions 4]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

from bench.baseline import run_baseline
from bench.common import local_broker, timed, write_results
from meterflow.clients import kafka
from meterflow.core.config import Settings
from meterflow.core.lake import LAKE_SCHEMA, readings_path, spark_ddl
from meterflow.core.logs import setup_logging
from simulator.faults import FaultRates
from simulator.generator import SimulationConfig, simulate

TARGET_PER_S = 100_000


def fill_topic(settings: Settings, readings: int, seed: int) -> dict:
    """Backfill a fleet into the readings topic with the simulator's default fault mix."""
    meters = 10_000
    interval_s = 900
    steps = -(-readings // meters)
    config = SimulationConfig(
        meters=meters,
        interval_s=interval_s,
        mode="backfill",
        days=steps * interval_s / 86_400,
        seed=seed,
        faults=FaultRates.default(),
        limit=readings,
        rules=settings.rules,
    )
    sink = kafka.ProducerSink(settings.bootstrap_servers, settings.topic_readings)
    summary = simulate(config, sink.emit)
    if sink.flush(120):
        raise SystemExit("bench: the broker did not acknowledge every reading")
    return summary.as_dict()


WARMUP_READINGS = 20_000


def _wait_for(committer: dict, read: int, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while "job" not in committer or committer["job"].totals["read"] < read:
        if time.monotonic() > deadline:
            done = committer["job"].totals["read"] if "job" in committer else 0
            raise SystemExit(f"bench: the job read {done:,} of {read:,}")
        time.sleep(0.05)


def running_job(spark, settings: Settings, readings: int, seed: int) -> dict:
    """The job as deployed: already running when the readings arrive.

    Query start and a small warm-up batch happen first (a long-running job pays them
    once); then ``readings`` are produced by the simulator while the job runs, and the
    clock stops when the job has committed the last of them. Production is inside the
    measured time and competes for the same two cores.
    """
    from meterflow.stream.supervisor import run

    stop = threading.Event()
    committer: dict = {}
    worker = threading.Thread(
        target=run,
        kwargs={
            "settings": settings,
            "spark": spark,
            "stop": stop,
            "on_committer": lambda c: committer.update(job=c),
        },
        daemon=True,
    )
    with timed() as start:
        worker.start()
        fill_topic(settings, WARMUP_READINGS, seed + 1)
        _wait_for(committer, WARMUP_READINGS)
    with timed() as job:
        with timed() as produce:
            summary = fill_topic(settings, readings, seed)
        _wait_for(committer, WARMUP_READINGS + summary["sent"])
    stop.set()
    worker.join(120)
    batches = committer["job"].timings[1:]
    return {
        "seconds": job["seconds"],
        "readings_per_s": summary["sent"] / job["seconds"],
        "produce_seconds": produce["seconds"],
        "start_and_warmup_seconds": start["seconds"],
        "micro_batches": len(batches),
        "summary": summary,
        "totals": dict(committer["job"].totals),
    }


def cold_catch_up(spark, settings: Settings) -> dict:
    """A fresh lake and query working off everything already in the topic."""
    from meterflow.stream.supervisor import run

    committer: dict = {}
    with timed() as job:
        totals = run(
            settings,
            available_now=True,
            spark=spark,
            on_committer=lambda c: committer.update(job=c),
        )
    later = committer["job"].timings[1:]
    steady = sum(r for r, _ in later) / max(sum(t for _, t in later), 1e-9)
    return {
        "seconds": job["seconds"],
        "readings_per_s": totals["read"] / job["seconds"],
        "steady_state_readings_per_s": steady,
        "micro_batches": committer["job"].timings,
        **totals,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=2_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--batch", type=int, default=1_000_000, help="readings per micro-batch")
    args = parser.parse_args()
    setup_logging("WARNING")
    workdir = Path(tempfile.mkdtemp(prefix="meterflow-bench-"))
    try:
        with local_broker(workdir) as bootstrap:
            env = {
                "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                "METERFLOW_KAFKA_PARTITIONS": str(args.partitions),
                "METERFLOW_KAFKA_SOURCE": "python",
                "METERFLOW_MAX_OFFSETS_PER_TRIGGER": str(args.batch),
                "METERFLOW_TRIGGER_SECONDS": "1",
            }

            def settings_for(name: str) -> Settings:
                settings = Settings.from_env(
                    {
                        **env,
                        "METERFLOW_DATA_DIR": str(workdir / name),
                        "METERFLOW_TOPIC_READINGS": f"bench-{name}-readings",
                        "METERFLOW_TOPIC_ABNORMAL": f"bench-{name}-abnormal",
                        "METERFLOW_TOPIC_DEADLETTER": f"bench-{name}-deadletter",
                        "METERFLOW_TOPIC_STATUS": f"bench-{name}-status",
                    }
                )
                kafka.ensure_topics(bootstrap, settings.topics, args.partitions)
                return settings

            preloaded, live = settings_for("preloaded"), settings_for("live")
            with timed() as produce:
                summary = fill_topic(preloaded, args.readings, args.seed)
            print(f"produced {summary['sent']:,} readings in {produce['seconds']:.1f} s")
            with timed() as base:
                baseline = run_baseline(preloaded, str(workdir / "baseline-lake"))
            print(f"baseline: {baseline.read:,} readings in {base['seconds']:.1f} s")

            from meterflow.spark.session import get_spark
            from meterflow.stream.supervisor import stream_spark_conf

            with timed() as session:
                spark = get_spark(
                    "meterflow-bench",
                    "local[*]",
                    **{"spark.ui.enabled": "false", **stream_spark_conf(live.checkpoint_path)},
                )
            cold = cold_catch_up(spark, preloaded)
            print(f"spark, cold catch-up: {cold['read']:,} readings in {cold['seconds']:.1f} s")
            warm = running_job(spark, live, args.readings, args.seed)
            print(f"spark, running job: {args.readings:,} readings in {warm['seconds']:.1f} s")
            lake_rows = {
                name: spark.read.schema(spark_ddl(LAKE_SCHEMA))
                .parquet(readings_path(s.lake_path))
                .count()
                for name, s in (("cold", preloaded), ("running", live))
            }
            spark.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    expected = summary["sent"]
    warm_totals = warm["totals"]
    checks = {
        "cold_read_all": cold["read"] == expected,
        "running_read_all": warm_totals["read"] == expected + WARMUP_READINGS,
        "baseline_read_all": baseline.read == expected,
        "same_counts": (cold["valid"], cold["abnormal"], cold["deadletter"])
        == (baseline.valid, baseline.abnormal, baseline.deadletter),
        "lake_rows_match": lake_rows["cold"] == cold["valid"] + cold["abnormal"]
        and lake_rows["running"] == warm_totals["valid"] + warm_totals["abnormal"],
    }
    warm_rate = warm["readings_per_s"]
    base_rate = baseline.read / base["seconds"]
    results = {
        "readings": expected,
        "partitions": args.partitions,
        "spark_running_job": warm,
        "spark_cold_catch_up": {**cold, "session_start_s": session["seconds"]},
        "baseline": {
            "seconds": base["seconds"],
            "readings_per_s": base_rate,
            "read": baseline.read,
            "valid": baseline.valid,
            "abnormal": baseline.abnormal,
            "deadletter": baseline.deadletter,
        },
        "produce": {"seconds": produce["seconds"], "readings_per_s": expected / produce["seconds"]},
        "ratio_spark_over_baseline": warm_rate / base_rate,
        "target_readings_per_s": TARGET_PER_S,
        "target_met": warm_rate >= TARGET_PER_S,
        "checks": checks,
    }
    write_results("streaming_throughput", results)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
