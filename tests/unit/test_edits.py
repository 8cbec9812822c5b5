"""Editing: overrides in an append-only audit trail (meterflow.batch.edits, `meterflow edit`)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from meterflow import cli
from meterflow.batch import edits
from meterflow.core.timestamps import parse_timestamp_us


@pytest.fixture
def lake_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("METERFLOW_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("METERFLOW_TIMEZONE", "Europe/Paris")
    return str(tmp_path / "data" / "lake")


def files(lake_path: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(edits.edits_path(lake_path)).glob("*")}


def test_the_trail_only_grows_and_the_latest_override_wins(lake_path: str) -> None:
    first = edits.record(
        lake_path,
        [edits.Edit("em1", "2024-06-02T10:00:00Z", 1.5, "meter read on site")],
        "alice",
        datetime(2024, 6, 3, 9, tzinfo=UTC),
    )
    before = files(lake_path)
    edits.record(
        lake_path,
        [
            edits.Edit("em1", "2024-06-02T10:00:00Z", 1.25, "corrected read"),
            edits.Edit("em2", "2024-06-02T11:00:00Z", 0.0, "vacant"),
        ],
        "bob",
        datetime(2024, 6, 4, 9, tzinfo=UTC),
    )
    after = files(lake_path)
    assert {name: after[name] for name in before} == before  # nothing rewritten
    trail = edits.read(lake_path, "em1").to_pylist()
    assert [(r["author"], r["value"]) for r in trail] == [("alice", 1.5), ("bob", 1.25)]
    start = parse_timestamp_us("2024-06-02T00:00:00Z")
    latest = edits.latest(edits.read(lake_path), start, start + 86_400 * 10**6).to_pylist()
    assert [(r["device_id"], r["value"]) for r in latest] == [("em1", 1.25), ("em2", 0.0)]
    assert edits.days_of(first.rows, "UTC") == [date(2024, 6, 2)]


def test_a_bad_edit_records_nothing(lake_path: str) -> None:
    good = edits.Edit("em1", "2024-06-02T10:00:00Z", 1.0, "fine")
    for bad, why in (
        (edits.Edit("em1", "yesterday", 1.0, "x"), "not an ISO 8601 time"),
        (edits.Edit("em1", "2024-06-02T10:00:00Z", -1.0, "x"), "0 or more"),
        (edits.Edit("em1", "2024-06-02T10:00:00Z", 1.0, " "), "needs a reason"),
    ):
        with pytest.raises(edits.EditRejectedError, match=why):
            edits.record(lake_path, [good, bad], "alice")
    assert files(lake_path) == {}


def test_the_edit_command_records_lists_and_names_the_days_to_rerun(
    lake_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    # 23:30 UTC on June 2 is 01:30 on June 3 in Paris: the local day to run again.
    assert (
        cli.main(
            [
                "edit",
                "em1",
                "2024-06-02T23:30:00Z",
                "2.5",
                "--reason",
                "site read",
                "--author",
                "ann",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "recorded 1 edits by ann" in out
    assert "applies when 2024-06-03 runs again: meterflow batch --date 2024-06-03" in out
    many = tmp_path / "edits.csv"
    many.write_text(
        "device_id,interval_start,value,reason\n"
        "em1,2024-06-02T10:00:00Z,1,a\nem2,2024-06-02T10:00:00Z,2,b\n"
    )
    assert cli.main(["edit", "--file", str(many), "--author", "ann"]) == 0
    capsys.readouterr()
    assert cli.main(["edit", "--list", "em1"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[-1] == "2 edits of em1" and "= 2.5 (site read)" in listed[0]

    assert cli.main(["edit", "em1", "2024-06-02T10:00:00Z", "1"]) == 2  # no reason
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "meterflow edit: edit 1: every edit needs a reason (--reason)"
