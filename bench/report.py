"""docs/benchmarks.md from bench/results/*.json: one table per benchmark, its machine and command.

The figures live in the results files alone; this module turns each into a table, which the
benchmark prints when it ends (:func:`table_markdown`, through ``bench.common.write_results``)
and the page shows, so the page cannot say something the results do not. A results file
holds the latest run only: earlier runs are in git's history.

    python -m bench.report            rewrite docs/benchmarks.md (`make bench` ends with it)
    python -m bench.report --check    exit 1, naming the first difference, if it is stale
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"

Results = dict[str, Any]


@dataclass
class Table:
    header: tuple[str, ...]
    rows: Sequence[tuple[str, ...]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [
            "| " + " | ".join(self.header) + " |",
            "|" + "---|" * len(self.header),
            *("| " + " | ".join(row) + " |" for row in self.rows),
        ]
        if self.notes:
            lines += ["", *self.notes]
        return "\n".join(lines)


def measures(rows: list[tuple[str, str]], notes: list[str] | None = None) -> Table:
    return Table(("Measure", "Value"), list(rows), notes or [])


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def streaming_throughput(r: Results) -> Table:
    warm, cold, base = r["spark_running_job"], r["spark_cold_catch_up"], r["baseline"]
    return measures(
        [
            ("readings", f"{r['readings']:,} ({r['partitions']} Kafka partitions)"),
            (
                "Spark streaming job, running: simulator -> Kafka -> job -> lake + events",
                f"{warm['seconds']:.1f} s = {warm['readings_per_s']:,.0f} readings/s "
                f"(producing took {warm['produce_seconds']:.1f} s of it; query start and "
                f"warm-up before: {warm['start_and_warmup_seconds']:.1f} s)",
            ),
            (
                "baseline: confluent-kafka loop, same rules, topic preloaded",
                f"{base['seconds']:.1f} s = {base['readings_per_s']:,.0f} readings/s",
            ),
            ("ratio Spark running / baseline", f"{r['ratio_spark_over_baseline']:.2f}"),
            (
                "Spark cold catch-up (new query, topic preloaded, availableNow)",
                f"{cold['seconds']:.1f} s = {cold['readings_per_s']:,.0f} readings/s; "
                f"after the first micro-batch {cold['steady_state_readings_per_s']:,.0f}/s",
            ),
            (
                "cold catch-up's micro-batches (readings, seconds)",
                "; ".join(f"{n:,} in {s:.1f} s" for n, s in cold["micro_batches"]),
            ),
            ("Spark session start (not timed)", f"{cold['session_start_s']:.1f} s"),
            (
                "target",
                f">= {r['target_readings_per_s']:,} readings/s end to end (running job): "
                + met(r["target_met"]),
            ),
            (
                "counts (cold run)",
                f"valid {cold['valid']:,}, abnormal {cold['abnormal']:,}, "
                f"dead-lettered {cold['deadletter']:,}",
            ),
            ("checks", ", ".join(f"{k}={v}" for k, v in r["checks"].items())),
        ]
    )


RULE_CODES = ("STUCK", "SPIKE", "LEAK", "NO_DATA")


def _size(value: float, unit: str) -> str:
    """A size bucket's edge as people say it: hours and minutes, a factor, L/h."""
    if unit == "s":
        return f"{value / 3600:g} h" if value >= 3600 else f"{value / 60:g} min"
    return f"{value:g}x" if unit == "x" else f"{value:g} L/h"


def detection(r: Results) -> Table:
    rules = {code: r[code] for code in RULE_CODES if code in r}
    target = f" (target >= {r['target_ratio']:g})" if "target_ratio" in r else ""
    rows = []
    for code, row in rules.items():
        rows.append(
            (
                f"**{code}**, all",
                f"{row['episodes']:,}",
                f"{row['recall']:.3f}",
                f"{row['delay_p50_s']:,.0f} / {row['delay_p95_s']:,.0f} s",
            )
        )
        if row.get("recall_detectable") is not None:
            rows.append(
                (
                    f"{code}, within its detectable range",
                    f"{row['detectable_episodes']:,}",
                    f"{row['recall_detectable']:.3f}",
                    "",
                )
            )
        unit = row.get("unit", "")
        for bucket in row.get("curve", []):
            recall = "-" if bucket["recall"] is None else f"{bucket['recall']:.3f}"
            delays = (
                f"{bucket['delay_p50_s']:,.0f} / {bucket['delay_p95_s']:,.0f} s"
                if bucket["detected"]
                else ""
            )
            size = f"{_size(bucket['low'], unit)} - {_size(bucket['high'], unit)}"
            rows.append((f"{code} {size}", f"{bucket['episodes']:,}", recall, delays))
    notes = [
        f"{r['meters']:,} meters x {r['days']} days: {r['readings']:,} readings, "
        f"{r['episodes']:,} injected episodes, sized from field-like ranges (not from the "
        "rules). NO_DATA's delay bound: "
        f"{r['nodata_delay_bound_s']:,.0f} s. Precision per rule: "
        + ", ".join(f"{code} {row['precision']:.3f}" for code, row in rules.items())
        + ". The smallest size from which every bucket has recall >= 0.95: "
        + ", ".join(
            f"{code} "
            + (
                "none in the range"
                if row.get("recall_95_from") is None
                else _size(row["recall_95_from"], row["unit"])
            )
            for code, row in rules.items()
            if "curve" in row
        )
        + " (a rule's detectable range also has a floor: README, \"What the detector can "
        'see").',
    ]
    if "false_alarms_per_10k_meter_days" in r:
        by_code = ", ".join(f"{c} {n}" for c, n in r["false_alarms_by_code"].items()) or "none"
        limit = r["target_false_alarms_per_10k_meter_days"]
        notes += [
            "",
            f"False alarms (openings that match no injected episode of their code, wrong "
            f"codes included): {r['false_alarms']} ({by_code}) in "
            f"{r['healthy_meter_days']:,.0f} meter-days without an episode = "
            f"{r['false_alarms_per_10k_meter_days']:.2f} per 10,000 meter-days (target < "
            f"{limit:g}: {met(r['false_alarms_per_10k_meter_days'] < limit)}). The fleet's "
            "clocks jitter by up to a minute, 0.1% of readings are sent twice, 5% of radios "
            "deliver up to two intervals late, 2% of electricity meters are constant loads "
            "declared in the registry, and water meters use water at night now and then.",
        ]
    notes += [
        "",
        f"Without the stateful stage {r['seconds_off']:.1f} s = "
        f"{r['readings_per_s_off']:,} readings/s; with it {r['seconds_on']:.1f} s = "
        f"{r['readings_per_s_on']:,} readings/s: `throughput_ratio` "
        f"{r['throughput_ratio']:.3f}{target}. State: {r['state_bytes_per_meter']:,.0f} "
        f"bytes per meter ({r['state_bytes'] / 1e6:.1f} MB in {r['buckets']} buckets; "
        f"largest bucket {r['largest_bucket_bytes'] / 1e3:.0f} kB). Lost: {r['lost']}; "
        f"read {r['read_off']:,} without, {r['read_on']:,} with.",
    ]
    return Table(("Rule and size", "Episodes", "Recall", "Delay p50 / p95"), rows, notes)


def detection_fleet(r: Results) -> Table:
    rows = [
        (
            f"{size['meters']:,}",
            f"{size['batch_s']:.2f} s",
            f"{size['max_batch_s']:.2f} s",
            f"{size['per_digest_ms']:.3f} ms",
            f"{size['ratio_to_smallest']:.2f}",
        )
        for size in r["sizes"]
    ]
    notes = [
        f"{r['digests_per_batch']:,} one-reading digests a batch, of meters drawn at random; "
        "each meter's state holds a week of hourly readings; the mean and the slowest of "
        f"{len(r['sizes'][0]['batches_s'])} batches of each size. "
        f"Target: the largest fleet's batch at most {r['target_ratio']:g} times the "
        f"smallest's: {met(r['target_met'])}.",
    ]
    return Table(
        (
            "Meters",
            "Batch (addBatch, mean)",
            "Slowest batch",
            "Per digest",
            "Ratio to the smallest",
        ),
        rows,
        notes,
    )


def detection_real(r: Results) -> Table:
    rows: list[tuple[str, ...]] = []
    for name, by_interval in r["files"].items():
        for interval, rules in by_interval.items():
            counts = next(iter(rules.values()))["readings"]
            found = ", ".join(
                f"{code} {row['openings']}"
                + (f" ({row['per_10k']:g} / 10k)" if row["openings"] else "")
                for code, row in rules.items()
            )
            fresh = ", ".join(
                f"{code} {row['fresh_starts']}"
                for code, row in rules.items()
                if "fresh_starts" in row
            )
            rows.append((f"`{name}`", f"{interval} s", f"{counts:,}", found, fresh or "-"))
            for code, row in rules.items():
                rows += [
                    (
                        "",
                        "",
                        "",
                        f"top {code} {spike['value']:g}: {spike['ratio']:g} x baseline "
                        f"{spike['baseline']:g}",
                        "",
                    )
                    for spike in row.get("top", [])
                ]
    return Table(
        ("Recording", "Interval", "Readings", "Openings", "Openings in fresh two-week starts"),
        rows,
        [f"Micro-batches of {r['batch_s']:,} s, with the NO_DATA timer at each batch's end."],
    )


def chaos(r: Results) -> Table:
    return measures(
        [
            (
                "run",
                f"{r['seconds']:.0f} s at {r['readings_per_s']} readings/s; "
                f"{r['stream_kills']} SIGKILLs of the stream (driver, JVM, workers), "
                f"{r['sink_kills']} of the sink, {r['stalls']} broker stalls of "
                f"{r['stall_seconds']:.0f} s",
            ),
            ("produced (baseline: the topic read by a plain consumer)", f"{r['produced']:,}"),
            ("lake rows (readings + dead letters)", f"{r['lake_rows']:,}"),
            ("lake lost / duplicated", f"{r['lake_lost']} / {r['lake_duplicated']}"),
            (
                "MongoDB abnormal events expected / stored / lost",
                f"{r['mongo_expected']:,} / {r['mongo_events']:,} / {r['mongo_lost']}",
            ),
            (
                "episodes opened / cleared on iot-abnormal; incidents missing / not closed",
                f"{r['episodes_opened']:,} / {r['episodes_cleared']:,}; "
                f"{r['incidents_missing']} / {r['incidents_not_closed']}",
            ),
            (
                "stream caught up after the simulator stopped; sink after the stream",
                f"{r['stream_catch_up_after_stop_s']:.0f} s; "
                f"{r['sink_catch_up_after_stream_s']:.0f} s",
            ),
            ("meterflow reconcile --scan-lake", r["reconcile_last_line"]),
            ("target: lost = duplicated = 0", met(r["target_met"])),
        ]
    )


def spread(runs: list[float]) -> str:
    return (
        f"best {min(runs):.2f} s, median {statistics.median(runs):.2f} s, worst {max(runs):.2f} s"
    )


def daily_batch(r: Results) -> Table:
    spark, duck = r["spark_job_seconds"], r["duckdb_seconds"]
    share = r["startup_day_readings"] / r["readings"]
    return measures(
        [
            (
                "readings",
                f"{r['readings']:,} ({r['meters']:,} meters, "
                f"{r['interval_seconds'] // 60}-minute interval, one day, {r['files']} files)",
            ),
            (
                "spark-submit of the job, as the DAG runs it (fresh JVM)",
                f"{r['spark_submit_wall_seconds']:.1f} s wall, of which the job "
                f"{r['spark_submit_job_seconds']:.2f} s",
            ),
            (
                "Spark session start (JVM start, not timed)",
                f"{r['spark_session_start_seconds']:.1f} s",
            ),
            (
                f"JVM start-up job: a {share:.0%} day ({r['startup_day_readings']:,} readings), "
                "first job, then warm",
                f"{r['startup_job_seconds']:.2f} s, then {r['startup_day_warm_seconds']:.2f} s",
            ),
            (
                f"Spark job on D, {len(spark)} runs (the first is the JVM's first on D)",
                f"{spread(spark)}; first {spark[0]:.2f} s",
            ),
            (f"DuckDB same aggregates, {len(duck)} runs", spread(duck)),
            ("ratio Spark / DuckDB (medians): the target", f"{r['ratio_median']:.2f}"),
            ("ratio Spark / DuckDB (best runs)", f"{r['ratio_best']:.2f}"),
            ("ratio first Spark run on D / best DuckDB", f"{r['ratio_first_run']:.2f}"),
            (
                "ratio spark-submit job (with JVM start-up) / best DuckDB",
                f"{r['ratio_spark_submit_job']:.2f}",
            ),
            ("target", f"medians <= {r['target_ratio']:g}: {met(r['target_met'])}"),
            ("results equal (per meter, per type)", "yes" if r["results_equal"] else "NO"),
            ("machine load (1-minute average) at the end", f"{r['load_average_1m_at_end']:.1f}"),
        ]
    )


def vee(r: Results) -> Table:
    by_quality = ", ".join(f"{name} {n:,}" for name, n in r["by_quality"].items())
    by_method = ", ".join(f"{name} {n:,}" for name, n in r["by_method"].items())
    return measures(
        [
            (
                "readings",
                f"{r['readings']:,} ({r['meters']:,} meters, {r['intervals']:,} intervals)",
            ),
            ("Spark daily job on D (validation, then views), median", f"{r['spark_s']:.2f} s"),
            ("DuckDB, the same VEE in SQL (bench/vee_sql.py), median", f"{r['duckdb_s']:.2f} s"),
            (
                "DuckDB, VEE and the views' aggregates, median",
                f"{r['duckdb_vee_and_views_s']:.2f} s",
            ),
            ("ratio Spark / DuckDB VEE (medians): the target", f"{r['ratio']:.2f}"),
            ("target", f"medians <= {r['target_ratio']:g}: {met(r['target_met'])}"),
            ("validated tables equal", "yes" if r["results_equal"] else "NO"),
            ("intervals by quality", by_quality),
            ("intervals by method", by_method),
            ("duplicates dropped", f"{r['duplicates_dropped']:,}"),
        ]
    )


def daily_scale(r: Results) -> Table:
    sizes = [*r["sizes"], *([r["cluster"]] if r.get("cluster") else [])]
    rows = []
    for size in sizes:
        where = "cluster" if size is r.get("cluster") else "local"
        rows.append(
            (
                f"{size['scale']}x ({size['meters']:,} meters)"
                + (", cluster" if where == "cluster" else ""),
                f"{size['readings']:,}",
                f"{size['spark_s']:.1f} s",
                f"{size['duckdb_s']:.1f} s",
                f"{size['ratio']:.2f}",
                f"{size['spark_rss_mb']:,}",
                f"{size['duckdb_rss_mb']:,}",
            )
        )
    largest = max(r["sizes"], key=lambda s: s["readings"])
    engines = r["engines"]
    return Table(
        (
            "Day",
            "Readings",
            "Spark (warm)",
            "DuckDB",
            "Spark / DuckDB",
            "Spark peak RSS (MB)",
            "DuckDB peak RSS (MB)",
        ),
        rows,
        [
            f"Spark: {engines['spark']}; on the cluster, {engines['spark_cluster']}, its RSS "
            f"including the master's and workers' JVMs; DuckDB: {engines['duckdb']}. Both "
            "validate the day and compute the views, writing Parquet; their validated "
            f"intervals agree: {'yes' if r['results_equal'] else 'NO'}. Target: at most "
            f"{r['target_ratio']:g} times DuckDB at {largest['readings']:,} readings, warm: "
            f"{met(r['target_met'])}; the ratio falls as the day grows: "
            f"{'yes' if r['ratio_falls_with_size'] else 'no'}.",
        ],
    )


def simulator_rate(r: Results) -> Table:
    return measures(
        [
            ("readings", f"{r['readings']:,} ({r['meters']:,} meters, one core)"),
            (
                "naive generator (json.dumps per reading)",
                f"{r['naive_readings_per_s']:,.0f} readings/s",
            ),
            ("simulator, generation only", f"{r['simulator_readings_per_s']:,.0f} readings/s"),
            (
                "simulator into Kafka (acknowledged)",
                f"{r['simulator_to_kafka_readings_per_s']:,.0f} readings/s",
            ),
            ("ratio simulator / naive", f"{r['ratio_simulator_over_naive']:.2f}"),
            ("undelivered", f"{r['undelivered']:,}"),
            (
                "target",
                f">= {r['target_readings_per_s']:,} readings/s into Kafka: {met(r['target_met'])}",
            ),
        ]
    )


def memory(r: Results) -> Table:
    rows = [
        (
            f"`{s['service']}`",
            f"{s['peak_mb']:,} MB" if s["measured"] else f"not run here: {s['sized_by']}",
            f"{s['peak_rss_sum_mb']:,} MB" if s["measured"] else "-",
            f"{s['mem_limit_mb']:,} MB",
        )
        for s in r["services"]
    ]
    return Table(
        ("Service", "Peak (each page once, as the cgroup counts)", "RSS sum", "mem_limit"),
        rows,
        [
            f"Load: {r['backfilled_readings']:,} backfilled readings caught up by the stream, "
            f"then the live simulator, then the daily DAG's run (ended "
            f"`{r['daily_run_state']}`). Every measured peak must leave {r['headroom']:.0%} "
            f"of its limit free: {'yes' if r['within_limits'] else 'NO'}. The RSS sum counts "
            "pages that forked workers share once per process: an upper bound.",
            *city_load(r.get("load")),
        ],
    )


def city_load(load: Results | None) -> list[str]:
    """The memory benchmark's last phase, a city's rate, in a sentence."""
    if not load:
        return []
    peaks = ", ".join(
        f"`{name}` {mb:,} MB (RSS sum {load['peak_rss_sum_mb'][name]:,} MB)"
        for name, mb in load["peak_mb"].items()
    )
    return [
        "",
        f"At a city's rate: the simulator offered {load['offered_per_s']:,} readings/s for "
        f"{load['seconds']:.0f} s and produced {load['produced_per_s']:,}/s; the streaming "
        f"job (compose's `local[1]`) committed {load['stream_committed_per_s']:,}/s. Peaks: "
        f"{peaks}.",
    ]


def latency(r: Results) -> Table:
    def spread(row: Results, path: str) -> str:
        if row[f"{path}_p50_s"] is None:
            return "none seen"
        return " / ".join(f"{row[f'{path}_{k}_s']:.2f}" for k in ("p50", "p95", "p99", "max"))

    rows = [
        (
            f"{row['rate']:,} ({row['offered_per_s']:,} offered)",
            spread(row, "abnormal"),
            spread(row, "mongo"),
            spread(row, "lake"),
        )
        for row in r["loads"]
    ]
    return Table(
        (
            "Readings/s",
            "produce -> iot-abnormal, p50 / p95 / p99 / max s",
            "produce -> MongoDB",
            "produce -> lake",
        ),
        rows,
        [
            f"{r['seconds_per_load']:g} s per load after a warm-up; trigger "
            f"{r['trigger_s']:g} s; the stream, its stateful stage (here "
            f"{r.get('detection', 'on')}) and the sink run as `meterflow run` runs them; "
            f"MongoDB: {r['mongodb']}. Target at "
            f"{r['target_load']:,} readings/s: p99 to iot-abnormal <= "
            f"{r['target_abnormal_p99_s']:g} s and to MongoDB <= {r['target_mongo_p99_s']:g} "
            f"s: {met(r['target_met'])}.",
            *batch_phases(r),
            *cores(r),
            *tradeoffs(r),
        ],
    )


def cores(r: Results) -> list[str]:
    """How many of the machine's cores each part of the benchmark used at each load."""
    lines = [
        f"- At {row['rate']:,}/s: "
        + ", ".join(f"{part} {n:.2f}" for part, n in row["cores_used"].items())
        + "."
        for row in r["loads"]
        if "cores_used" in row
    ]
    if not lines:
        return []
    return [
        "",
        "Cores used meanwhile (`spark`: the JVM and its Python workers; `bench`: the offered "
        "load, the sink and the probes; `other`: the machine's other processes; `rest`: "
        "what the processes' counters miss, such as the kernel's own work):",
        *lines,
    ]


def tradeoffs(r: Results) -> list[str]:
    """The target load again with another trigger or without the stateful stage."""
    rows = r.get("tradeoffs", [])
    if not rows:
        return []
    lines = [
        f"| {row['trigger_s']:g} s | {row['detection']} | "
        f"{row['abnormal_p50_s']:.2f} / {row['abnormal_p99_s']:.2f} | "
        f"{row['mongo_p99_s']:.2f} | {row['lake_p99_s']:.2f} | "
        f"{row['cores_used']['spark']:.2f} |"
        for row in rows
    ]
    return [
        "",
        f"The trade-off at {r['target_load']:,} readings/s, the stream restarted for each row "
        f"({r['seconds_per_tradeoff']:g} s each):",
        "",
        "| Trigger | Stateful stage | to iot-abnormal p50 / p99 s | MongoDB p99 s "
        "| lake p99 s | Spark's cores |",
        "|---|---|---|---|---|---|",
        *lines,
    ]


def batch_phases(r: Results) -> list[str]:
    """Where the micro-batches spent their time at each load (Spark's progress reports)."""
    lines = []
    for row in r["loads"]:
        for query, profile in row.get("micro_batches", {}).items():
            phases = ", ".join(f"{name} {ms:,}" for name, ms in profile["mean_ms"].items())
            lines.append(
                f"- At {row['rate']:,}/s, `{query}`: {profile['batches']} batches of "
                f"{profile['rows_per_batch']:,} rows on average; mean ms per batch: {phases}."
            )
    return ["", *lines] if lines else []


#: Each benchmark's heading on the page and its table, in the page's order.
TABLES: dict[str, tuple[str, Callable[[Results], Table]]] = {
    "streaming_throughput": ("Streaming throughput", streaming_throughput),
    "latency": ("Alarm latency", latency),
    "detection": ("Stateful detection", detection),
    "detection_fleet": ("Stateful detection as the fleet grows", detection_fleet),
    "detection_real": ("False alarms on real data", detection_real),
    "chaos": ("Chaos", chaos),
    "daily_batch": ("Daily batch job", daily_batch),
    "vee": ("Validation (VEE) against DuckDB", vee),
    "daily_scale": ("The daily job at scale", daily_scale),
    "simulator_rate": ("Simulator rate", simulator_rate),
    "memory": ("Memory per compose service", memory),
}


def table(name: str, results: Results) -> Table:
    if name not in TABLES:
        raise SystemExit(f"bench/report.py has no table for {name!r}: add one to TABLES")
    return TABLES[name][1](results)


def table_markdown(name: str, results: Results) -> str:
    return table(name, results).markdown()


#: Results written by another benchmark's module.
MODULES = {"vee": "daily_batch"}


def module(name: str) -> str:
    return MODULES.get(name, name)


def summary(name: str) -> str:
    """The first line of the benchmark module's docstring, in Markdown (no import: no Spark)."""
    source = ROOT / "bench" / f"{module(name)}.py"
    doc = ast.get_docstring(ast.parse(source.read_text())) or name
    first = doc.strip().splitlines()[0]
    return re.sub(r":[a-z]+:`", "`", first).replace("``", "`")


def machine(results: Results) -> str:
    box = results.get("machine", {})
    memory_gib = f", {box['memory_gib']:g} GiB" if "memory_gib" in box else ""
    return (
        f"{box.get('cpus', '?')} CPUs{memory_gib}, {box.get('platform', '?')}, "
        f"Python {box.get('python', '?')}"
    )


def page(results_dir: Path = RESULTS) -> str:
    found = {path.stem: json.loads(path.read_text()) for path in results_dir.glob("*.json")}
    unknown = sorted(found.keys() - TABLES.keys())
    if unknown:
        raise SystemExit(f"bench/report.py has no table for {', '.join(unknown)}: add to TABLES")
    parts = [
        "# Benchmarks",
        "",
        "<!-- generated by: python -m bench.report (from bench/results/*.json); do not edit -->",
        "",
        "Each benchmark measures a baseline in the same run and writes "
        "`bench/results/<name>.json`; this page is generated from those files "
        "(`make bench` runs every benchmark, then rewrites it; `make docs` rewrites it from "
        "the files as they are). A results file holds the latest run: earlier ones are in "
        "git's history. How each benchmark measures is in its module's docstring. Natively, "
        "the streaming job reads Kafka through the Python data source; compose uses the JVM "
        "connector.",
    ]
    for name in (n for n in TABLES if n in found):
        results, source = found[name], module(name)
        measured = str(results.get("measured_at", "?")).replace("T", " ").replace("Z", " UTC")
        parts += [
            "",
            f"## {TABLES[name][0]}",
            "",
            f"{summary(name)} Method: [bench/{source}.py](../bench/{source}.py).",
            "",
            f"Command: `python -m bench.{source}`. Measured {measured} on {machine(results)}.",
            "",
            table_markdown(name, results),
        ]
    return "\n".join(parts) + "\n"


def first_difference(expected: str, found: str) -> str:
    want, have = expected.splitlines(), found.splitlines()
    for number, (a, b) in enumerate(zip(want, have, strict=False), start=1):
        if a != b:
            return f"line {number}: expected {a!r}, found {b!r}"
    return f"expected {len(want)} lines, found {len(have)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if stale")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of *.json")
    parser.add_argument("--output", type=Path, default=PAGE, help="the page to write or check")
    args = parser.parse_args(argv)
    expected = page(args.results)
    if not args.check:
        args.output.write_text(expected)
        print(f"wrote {args.output}")
        return 0
    found = args.output.read_text() if args.output.exists() else ""
    if found != expected:
        print(
            f"bench.report: {args.output} is out of date with {args.results}/*.json "
            f"({first_difference(expected, found)}): run `make docs`",
            file=sys.stderr,
        )
        return 1
    print(f"{args.output} is current")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
