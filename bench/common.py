"""Helpers shared by the benchmarks: a private broker, timing, and result files."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.report import table_markdown
from meterflow.local.broker import LocalBroker
from meterflow.local.service import free_port

RESULTS = Path(__file__).parent / "results"


@contextmanager
def local_broker(workdir: Path) -> Iterator[str]:
    """A tansu broker of the benchmark's own, on a free loopback port."""
    broker = LocalBroker(free_port(), workdir / "broker.log").start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@contextmanager
def timed() -> Iterator[dict[str, float]]:
    box: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - start


def machine() -> dict[str, str | int | float]:
    import os

    return {
        "cpus": os.cpu_count() or 0,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def write_results(name: str, results: dict) -> Path:
    """Write ``results/<name>.json`` and print its table (the one docs/benchmarks.md shows:
    ``python -m bench.report`` rewrites the page from the json files)."""
    RESULTS.mkdir(exist_ok=True)
    stamped = {
        "benchmark": name,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        **results,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(stamped, indent=2) + "\n")
    print(table_markdown(name, stamped))
    return RESULTS / f"{name}.json"
