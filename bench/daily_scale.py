"""The daily job's scale curve: 1x, 3x and 10x a 100,000-meter day, Spark against DuckDB.

Each size is bench/daily_batch.py's generated lake (same generator, cached under
``data/bench/daily_batch``) with 100,000, 300,000 or 1,000,000 meters: about 9.7 M, 29 M
and 97 M readings on D. Per size, each engine runs in a process of its own, so that its
peak memory is its own, on the same files:

- Spark (``local[*]``): the job as the DAG runs it, :func:`meterflow.batch.daily.run`
  (validation, then the views, written to the lake), warm: the JVM's first job is the day
  before (not timed), then D is timed.
- DuckDB: the same validation in SQL (bench/vee_sql.py) and the same views, written to
  Parquet as Spark writes its own, timed after the files are in the page cache.

Memory is the peak of the summed RSS of the engine's process tree (the JVM, its Python
workers), sampled every 0.2 s. The largest size also runs on a native standalone cluster
(:mod:`meterflow.local.spark_cluster`: a master and two workers of one core, each its own
JVM): the driver in the child process, the executors in the workers; its memory adds the
cluster's JVMs and their children, and it is compared with DuckDB's run of that size.
After each Spark run DuckDB checks that both engines validated the same intervals
(quality, method, fault code and value), outside the timings.

    python -m bench.daily_scale [--scales 1,3,10] [--cluster-scale 10]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import timed, write_results
from bench.daily_batch import (
    DAY,
    DUCKDB_METERS,
    DUCKDB_TYPES,
    INTERVAL_S,
    OTHER_DAY,
    ZONE,
    prepare,
)
from bench.memory import tree_memory
from bench.vee_sql import MACROS, vee_query
from meterflow.batch.validation import validated_path
from meterflow.batch.views import UNKNOWN_DISTRICT
from meterflow.core import lake
from meterflow.local.service import free_port

BASE_METERS = 100_000
TARGET_RATIO = 3.0
MIB = 2**20
SAMPLE_S = 0.2
#: Heaps: the local driver runs every task; on the cluster each worker's executor does.
LOCAL_DRIVER_MEMORY = "8g"
CLUSTER_DRIVER_MEMORY = "2g"
CLUSTER_EXECUTOR_MEMORY = "6g"


# -- the engines, each run as ``python -m bench.daily_scale --engine ...`` ------------------


def spark_engine(lake_path: str, master: str) -> dict[str, float]:
    from meterflow.batch.daily import run
    from meterflow.spark.session import get_spark

    conf = {"spark.ui.enabled": "false"}
    if master.startswith("local"):
        conf["spark.driver.memory"] = LOCAL_DRIVER_MEMORY
    else:
        conf["spark.driver.memory"] = CLUSTER_DRIVER_MEMORY
        conf["spark.executor.memory"] = CLUSTER_EXECUTOR_MEMORY
    spark = get_spark("bench-daily-scale", master, **conf)
    linear = 4
    with timed() as startup:
        run(spark, lake_path, OTHER_DAY, INTERVAL_S, ZONE, linear)
    with timed() as job:
        report = run(spark, lake_path, DAY, INTERVAL_S, ZONE, linear)
    spark.stop()
    return {
        "seconds": job["seconds"],
        "startup_job_seconds": startup["seconds"],
        "readings": report.readings,
    }


def duckdb_engine(lake_path: str, out: Path) -> dict[str, float]:
    import duckdb

    out.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute(f"SET threads = {os.cpu_count() or 2}")
    con.execute("SET TimeZone = 'UTC'")
    con.execute(MACROS)
    validate = vee_query(lake_path, DAY, INTERVAL_S, ZONE)
    meters = DUCKDB_METERS.format(
        unknown=UNKNOWN_DISTRICT,
        readings=lake.readings_path(lake_path),
        registry=lake.registry_file(lake_path),
        day=DAY,
    )
    # Stamped as the job writes them (bench/vee_sql.py computes in epoch microseconds).
    stamped = f"""
        SELECT * REPLACE (make_timestamp(interval_start)::TIMESTAMPTZ AS interval_start,
                          make_timestamp(interval_end)::TIMESTAMPTZ AS interval_end)
        FROM ({validate})
    """
    with timed() as job:
        con.execute(f"COPY ({stamped}) TO '{out}/validated.parquet' (FORMAT parquet)")
        con.execute(f"CREATE TEMP TABLE per_meter AS {meters}")
        con.execute(f"COPY per_meter TO '{out}/per_meter.parquet' (FORMAT parquet)")
        con.execute(f"COPY ({DUCKDB_TYPES}) TO '{out}/per_type.parquet' (FORMAT parquet)")
    con.close()
    return {"seconds": job["seconds"]}


SAME = """
SELECT count(*) AS intervals,
       count(*) FILTER (WHERE d.device_id IS NULL OR s.device_id IS NULL
           OR d.quality IS DISTINCT FROM s.quality OR d.method IS DISTINCT FROM s.method
           OR d.fault_code IS DISTINCT FROM s.fault_code
           OR NOT coalesce(abs(d.value - s.value) <= 1e-9 * greatest(1.0, abs(d.value)),
                           d.value IS NULL AND s.value IS NULL)) AS differ
FROM read_parquet('{duck}') d
FULL JOIN read_parquet('{spark}/*.parquet') s USING (device_id, interval_start)
"""


def compare(lake_path: str, out: Path) -> dict[str, float]:
    """Intervals validated, and how many of them the two engines disagree on."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    sql = SAME.format(duck=out / "validated.parquet", spark=validated_path(lake_path, DAY))
    row = con.execute(sql).fetchone()
    con.close()
    assert row is not None
    return {"intervals": int(row[0]), "differ": int(row[1])}


# -- the parent: generate, run each engine in its own process, sample its memory ------------


def tree_rss(pids: Sequence[int]) -> int:
    """Summed RSS of these processes and all their descendants (disjoint trees)."""
    return sum(tree_memory(pid)[1] for pid in pids)


def measured(args: list[str], also: Sequence[int] = ()) -> tuple[dict[str, float], int]:
    """Run ``python -m bench.daily_scale ARGS``; its JSON answer and the peak summed RSS of
    its process tree (and of ``also``'s, the cluster's JVMs)."""
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.daily_scale", *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYSPARK_PYTHON": sys.executable},
    )
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss([child.pid, *also]))
            time.sleep(SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = child.communicate()
    done.set()
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"bench.daily_scale {' '.join(args)} failed ({child.returncode})")
    answer: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return answer, peak[0]


def one_size(
    data_dir: Path,
    scale: int,
    master: str,
    also: Sequence[int] = (),
    duckdb_done: dict | None = None,
) -> dict:
    """One size on ``master``; DuckDB runs unless ``duckdb_done`` is its row of this size
    (its output is still there to compare with)."""
    meters = BASE_METERS * scale
    lake_path, rows = prepare(data_dir, meters)
    engine = ["--engine", "spark", "--lake", lake_path, "--master", master]
    spark, spark_rss = measured(engine, also)
    assert spark["readings"] == rows, f"Spark counted {spark['readings']:,} of {rows:,}"
    out = data_dir / f"duckdb-{meters}"
    if duckdb_done is None:
        duck, duck_rss = measured(["--engine", "duckdb", "--lake", lake_path, "--out", str(out)])
    else:
        duck, duck_rss = {"seconds": duckdb_done["duckdb_s"]}, duckdb_done["duckdb_rss_mb"] * MIB
    same, _ = measured(["--engine", "compare", "--lake", lake_path, "--out", str(out)])
    assert same["differ"] == 0, f"{same['differ']:,} of {same['intervals']:,} intervals differ"
    row = {
        "scale": scale,
        "meters": meters,
        "readings": rows,
        "intervals": same["intervals"],
        "spark_s": round(spark["seconds"], 2),
        "spark_startup_job_s": round(spark["startup_job_seconds"], 2),
        "duckdb_s": round(duck["seconds"], 2),
        "ratio": round(spark["seconds"] / duck["seconds"], 2),
        "spark_rss_mb": round(spark_rss / MIB),
        "duckdb_rss_mb": round(duck_rss / MIB),
        "readings_per_s_spark": round(rows / spark["seconds"]),
        "readings_per_s_duckdb": round(rows / duck["seconds"]),
    }
    print(f"bench: {scale}x on {master}: " + json.dumps(row), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="1,3,10", help="days of N x 100,000 meters")
    parser.add_argument(
        "--cluster-scale", type=int, default=10, help="also run this size on a cluster (0: no)"
    )
    parser.add_argument("--data", default="data/bench/daily_batch")
    parser.add_argument("--engine", choices=("spark", "duckdb", "compare"), help=argparse.SUPPRESS)
    parser.add_argument("--lake", help=argparse.SUPPRESS)
    parser.add_argument("--master", default="local[*]", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine == "spark":
        print(json.dumps(spark_engine(args.lake, args.master)))
        return 0
    if args.engine == "duckdb":
        print(json.dumps(duckdb_engine(args.lake, Path(args.out))))
        return 0
    if args.engine == "compare":
        print(json.dumps(compare(args.lake, Path(args.out))))
        return 0

    data_dir = Path(args.data).absolute()
    # The generator validates D-7 with spark-submit, which takes its heap from here.
    os.environ.setdefault("SPARK_DRIVER_MEMORY", LOCAL_DRIVER_MEMORY)
    scales = [int(s) for s in args.scales.split(",")]
    sizes = [one_size(data_dir, scale, "local[*]") for scale in scales]
    cluster = None
    if args.cluster_scale:
        from meterflow.local.spark_cluster import ClusterPlan, spark_cluster

        plan = ClusterPlan(
            data_dir / "spark-cluster", workers=2, cores=1, memory=CLUSTER_EXECUTOR_MEMORY,
            port=free_port(), ui_port=free_port(),
        )  # fmt: skip
        with spark_cluster(plan) as running:
            pids = [s.process.pid for s in running.services if s.process is not None]
            local = next((s for s in sizes if s["scale"] == args.cluster_scale), None)
            cluster = one_size(data_dir, args.cluster_scale, running.master_url, pids, local)
        cluster.update(workers=plan.workers, cores_per_worker=plan.cores)
    largest = max(sizes, key=lambda s: s["readings"])
    write_results(
        "daily_scale",
        {
            "sizes": sizes,
            "cluster": cluster,
            "engines": {
                "spark": f"local[*], driver heap {LOCAL_DRIVER_MEMORY}",
                "spark_cluster": f"2 workers x 1 core, executors {CLUSTER_EXECUTOR_MEMORY}",
                "duckdb": f"{os.cpu_count()} threads",
            },
            "target_ratio": TARGET_RATIO,
            "target_met": largest["ratio"] <= TARGET_RATIO,
            "ratio_falls_with_size": all(
                a["ratio"] >= b["ratio"] for a, b in itertools.pairwise(sizes)
            ),
            "results_equal": True,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
