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
    results: dict[str, object] = {}
    table: list[tuple[str, str]] = []
    for path in files:
        measured = measure_file(path)
        results[path.name] = measured
        for interval, rules in measured.items():
            assert isinstance(rules, dict)
            for code, row in rules.items():
                table.append(
                    (
                        f"{path.name} @{interval}s {code}",
                        f"{row['openings']} in {row['readings']:,} ({row['per_10k']:g} / 10k)"
                        + (
                            f"; {row['fresh_starts']} from fresh starts"
                            if "fresh_starts" in row
                            else ""
                        ),
                    )
                )
                for spike in row.get("top", []):
                    table.append(
                        (
                            f"  top SPIKE {spike['value']:g}",
                            f"{spike['ratio']:g} x baseline {spike['baseline']:g}",
                        )
                    )
    write_results(
        "detection_real",
        {"batch_s": BATCH_S, "intervals_s": list(INTERVALS_S), "files": results},
        table,
    )


if __name__ == "__main__":
    main()
