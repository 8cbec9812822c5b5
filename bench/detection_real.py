"""False alarms of the stateful rules on real household recordings (``tests/data/real``).

The measure is :mod:`simulator.false_alarms` (the replay parser into the rules, in
micro-batches with the NO_DATA timer); this benchmark runs it on the committed excerpts
(and any other replayable file, e.g. the full UCI recording that
``python -m bench.uci_excerpts WHEEL --full`` rebuilds) at 1-minute and 15-minute
intervals, prints a table and writes ``results/detection_real.json``.

``python -m bench.detection_real [--file PATH ...]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import write_results
from simulator.false_alarms import BATCH_S, INTERVALS_S, measure_file

EXCERPTS = Path(__file__).parent.parent / "tests" / "data" / "real"


def excerpts() -> list[Path]:
    return sorted(EXCERPTS.glob("*.gz"))


def main() -> None:
    parser = argparse.ArgumentParser(description="False alarms of the rules on real data")
    parser.add_argument("--file", type=Path, action="append", default=[])
    args = parser.parse_args()
    files = [*excerpts(), *args.file]
    results = {path.name: measure_file(path) for path in files}
    write_results(
        "detection_real", {"batch_s": BATCH_S, "intervals_s": list(INTERVALS_S), "files": results}
    )


if __name__ == "__main__":
    main()
