"""Nothing lost, nothing twice: the lake's ledger alone (docs/architecture.md, "Exactly
once into the lake"). What kill -9 leaves is rolled forward or dropped, compaction keeps
the proof of contiguity, and ``meterflow reconcile`` says "reconciled" only when every
offset has one outcome.

The scenarios that run the real streaming job against a real broker are in
tests/integration/test_nothing_lost_stream.py.
"""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path

from meterflow.core.config import Settings
from meterflow.core.ledger import Ledger
from meterflow.stream.reconcile import reconcile


def test_recovery_rolls_committed_staging_forward_and_drops_the_rest(tmp_path: Path):
    """What kill -9 leaves: staged files of a batch that committed, and of one that did not."""
    from meterflow.core.ledger import BATCH, Range

    lake_path = str(tmp_path / "lake")
    ledger = Ledger.load(lake_path)
    committed = tmp_path / "lake" / "_staging" / "run-1" / "readings" / "date=2024-05-27"
    committed.mkdir(parents=True)
    (committed / "part-a.parquet").write_bytes(b"PAR1")
    uncommitted = tmp_path / "lake" / "_staging" / "run-2" / "readings" / "date=2024-05-27"
    uncommitted.mkdir(parents=True)
    (uncommitted / "part-b.parquet").write_bytes(b"")  # the 0-byte file of a killed task
    ledger.commit(
        BATCH,
        [Range("t", "g", 0, 0, 10, valid=10)],
        files=["readings/date=2024-05-27/part-a.parquet"],
        staging="_staging/run-1",
    )
    readings = tmp_path / "lake" / "readings"
    assert not readings.exists()  # nothing visible before the move

    reloaded = Ledger.load(lake_path)
    assert reloaded.recover() == (1, 1)
    assert sorted(p.name for p in readings.rglob("*.parquet")) == ["part-a.parquet"]
    assert not (tmp_path / "lake" / "_staging").exists() or not any(
        (tmp_path / "lake" / "_staging").iterdir()
    )
    assert reloaded.ends("t", "g") == {0: 10}


def test_the_ledger_compacts_and_still_proves_contiguity(tmp_path: Path):
    from meterflow.core.ledger import BATCH, LOSS, Range, audit

    lake_path = str(tmp_path / "lake")
    ledger = Ledger.load(lake_path)
    for i in range(7):
        ledger.commit(BATCH, [Range("t", "g", 0, i * 10, i * 10 + 10, valid=9, abnormal=1)])
    ledger.commit(LOSS, [Range("t", "g", 0, 70, 75)], note="accepted")
    ledger.commit(BATCH, [Range("t", "g", 0, 75, 80, valid=5)])
    assert ledger.compact_if_due(every=5)
    assert len(list((tmp_path / "lake" / "_ledger").iterdir())) == 1
    ledger.commit(BATCH, [Range("t", "g", 0, 85, 90, deadletter=5)])  # 80..84 missing
    ledger.commit(BATCH, [Range("t", "g", 0, 88, 95, valid=7)])  # 88, 89 twice

    (result,) = audit(Ledger.load(lake_path))
    assert (result.first, result.end) == (0, 95)
    assert (result.valid, result.abnormal, result.deadletter) == (75, 7, 5)
    assert result.lost == [(70, 75, "accepted")]
    assert result.gaps == [(80, 85)]
    assert result.double == [(88, 90)]
    assert not result.ok


def test_reconcile_says_reconciled_only_when_every_offset_has_one_outcome(tmp_path: Path):
    from meterflow.core.ledger import BATCH, Range

    settings = Settings.from_env({"LAKE_PATH": str(tmp_path / "lake")})
    ledger = Ledger.load(settings.lake_path)
    ledger.commit(BATCH, [Range("iot-meter", "g1", 0, 0, 100, valid=99, deadletter=1)])
    ledger.commit(BATCH, [Range("iot-meter", "g1", 0, 100, 150, valid=50)])
    good_report = reconcile(settings.lake_path, settings.topic_readings, settings.bootstrap_servers)
    assert good_report.ok and good_report.lines[-1].startswith("reconciled: 150 offsets")

    ledger.commit(BATCH, [Range("iot-meter", "g1", 0, 160, 170, abnormal=10)])
    gap = reconcile(settings.lake_path, settings.topic_readings, settings.bootstrap_servers)
    assert not gap.ok and not any(line.startswith("reconciled") for line in gap.lines)
    assert "offsets 150..159 have no outcome" in gap.problem

    result = subprocess_reconcile(settings)
    assert result.returncode == 1 and "150..159" in result.stderr


def subprocess_reconcile(settings: Settings):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "meterflow.cli", "reconcile"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LAKE_PATH": settings.lake_path, "KAFKA_BOOTSTRAP_SERVERS": ""},
    )


def test_the_ledger_remembers_the_days_each_commit_touched_across_compaction(
    tmp_path: Path,
) -> None:
    """What finds late data: per readings day, the last commit that added files to it."""
    from meterflow.batch.late import late_days
    from meterflow.batch.views import DayReport, write_report
    from meterflow.core.lake import views_path
    from meterflow.core.ledger import BATCH, Range

    lake_path = str(tmp_path / "lake")
    ledger = Ledger.load(lake_path)
    for i, day in enumerate(("2024-06-01", "2024-06-02", "2024-06-01")):
        ledger.commit(
            BATCH,
            [Range("t", "g", 0, i, i + 1, valid=1)],
            files=[f"readings/date={day}/part-{i}.parquet", f"deadletter/date=2024-07-0{i + 1}/x"],
        )
    assert ledger.compact_if_due(every=3)
    ledger.commit(BATCH, [Range("t", "g", 0, 3, 4, valid=1)], ["readings/date=2024-06-03/p"])
    assert Ledger.load(lake_path).days_touched == {
        "2024-06-01": 3,
        "2024-06-02": 2,
        "2024-06-03": 4,
    }
    # June 1 was published at entry 2 (a reading came in entry 3), June 2 after its last
    # commit, June 3 never: only June 1 is late.
    for day, seq in (("2024-06-01", 2), ("2024-06-02", 2)):
        write_report(views_path(lake_path), DayReport(day=day, status="ok", ledger_seq=seq))
    june = [date(2024, 6, d) for d in (1, 2, 3)]
    assert late_days(lake_path, june[0], june[-1]) == [june[0]]
    assert late_days(lake_path, june[1], june[-1]) == []
