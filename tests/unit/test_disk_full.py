"""A full disk under the lake is one line with its remedy (meterflow.core.errors.DiskFullError),
wherever the stream meets it: a task writing Parquet (pyarrow's OSError keeps errno 28), the
driver committing to the ledger, the checks before a start."""

from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import kafka_records

from meterflow.core import lake
from meterflow.core.config import Settings
from meterflow.core.errors import DiskFullError, MeterflowError
from meterflow.core.thresholds import Rules
from meterflow.stream import startup, tasks
from meterflow.stream.commit import merge_summaries

#: What pyarrow raises when a Parquet write meets a full disk (seen on a full tmpfs).
PYARROW_FULL = OSError(
    errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device"
)


def test_a_full_disk_is_one_line_naming_the_variable_and_the_remedy() -> None:
    with pytest.raises(DiskFullError) as full, lake.full_as_error("LAKE_PATH", "/x"):
        raise PYARROW_FULL
    assert str(full.value) == (
        "LAKE_PATH=/x is full (No space left on device): free space or point LAKE_PATH "
        "elsewhere; the next start resumes where the lake's ledger ends"
    )
    assert isinstance(full.value, MeterflowError) and full.value.exit_code == 2
    quota = pytest.raises(DiskFullError, match=r"\(Disk quota exceeded\)")
    with quota, lake.full_as_error("LAKE_PATH", "/x"):
        raise OSError(errno.EDQUOT, "quota")
    with pytest.raises(PermissionError), lake.full_as_error("LAKE_PATH", "/x"):
        raise PermissionError(errno.EACCES, "Permission denied")  # not full: as it was


def test_a_task_that_finds_the_lake_full_says_so_in_its_summary(tmp_path: Path, monkeypatch):
    """No failed task (Spark would print pyarrow's traceback): one row for the driver."""

    def full(self: object, dataset: str, table: object) -> None:
        raise PYARROW_FULL

    monkeypatch.setattr(tasks._StagedFiles, "write", full)
    plan = tasks.TaskPlan(str(tmp_path), "_staging/t", "g", Rules(), "UTC")
    batch = kafka_records([b'{"device_id": "em1", "usage_kwh": 1.0}'], 1_716_768_000_000_000)
    rows = [r for out in tasks.process_partition(iter([batch]), plan) for r in out.to_pylist()]
    assert [(r["partition"], r["lake_full"]) for r in rows] == [(-1, "No space left on device")]
    outcome = merge_summaries(SimpleNamespace(**r) for r in rows)
    assert outcome.lake_full == "No space left on device" and outcome.tallies == {}


def test_a_full_disk_before_the_start_is_the_same_one_line(tmp_path: Path, monkeypatch):
    def full(path: str) -> None:
        raise PYARROW_FULL

    monkeypatch.setattr(lake, "ensure_writable", full)
    settings = Settings.from_env({"METERFLOW_DATA_DIR": str(tmp_path / "data")})
    with pytest.raises(DiskFullError, match=r"^METERFLOW_DATA_DIR=.* is full \(No space left"):
        startup.check_writable(settings)
