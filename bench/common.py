"""Helpers shared by the benchmarks: a private broker, timing, and result files."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


def machine() -> dict[str, str | int]:
    import os

    return {
        "cpus": os.cpu_count() or 0,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def write_results(name: str, results: dict, table: list[tuple[str, str]]) -> Path:
    """Write ``results/<name>.json`` and a Markdown table ``results/<name>.md``."""
    RESULTS.mkdir(exist_ok=True)
    stamped = {
        "benchmark": name,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        **results,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(stamped, indent=2) + "\n")
    lines = ["| Measure | Value |", "|---|---|", *(f"| {k} | {v} |" for k, v in table)]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return RESULTS / f"{name}.json"
