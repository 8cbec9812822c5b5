"""Late data: days that received readings after the daily job published them.

The lake's ledger records, per readings partition, the last commit that added files to it
(:attr:`meterflow.core.ledger.Ledger.days_touched`), and each day's report the ledger's
position when the job read the day (``DayReport.ledger_seq``). A day whose partition was
touched after that is late: the job runs it again and its report says what changed.
"""

from __future__ import annotations

from datetime import date

from meterflow.batch.views import DayReport, read_report
from meterflow.core import lake
from meterflow.core.ledger import Ledger


def late_days(lake_path: str, since: date, until: date) -> list[date]:
    """Days in ``[since, until]`` the job published before some of their readings landed."""
    ledger = Ledger.load(lake_path)
    views_root = lake.views_path(lake_path)
    late = []
    for text, seq in ledger.days_touched.items():
        day = date.fromisoformat(text)
        if not since <= day <= until:
            continue
        report = read_report(views_root, day)
        if report is not None and seq > report.ledger_seq:
            late.append(day)
    return sorted(late)


def summary_lines(reports: list[DayReport], since: date) -> list[str]:
    """What ``meterflow batch --since`` prints after the reports: each day's change."""
    lines = [f"{len(reports)} days with late readings since {since} run again"]
    for report in reports:
        change = report.changes
        lines.append(
            f"  {report.day}: {change.get('readings_added', 0):+,.0f} readings, consumption "
            f"{change.get('consumption_before', 0):g} -> {change.get('consumption_after', 0):g}"
        )
    return lines
