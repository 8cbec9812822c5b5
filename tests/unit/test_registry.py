"""``meterflow registry import FILE`` and the registry's contract (meterflow.core.registry):
a good CSV or Parquet fleet reaches the lake and MongoDB's ``meters``; a file with one bad
row is refused whole, naming the row's line, and changes nothing; a re-import replaces the
registry. MongoDB is mongomock, or the server ``MONGO_URI`` names (the ``db`` fixture)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meterflow import cli
from meterflow.clients import mongo
from meterflow.core import registry
from meterflow.core.config import Settings
from meterflow.serving.registry_import import RegistryRejectedError, import_registry

HEADER = (
    "device_id,meter_type,district,installed_on,interval_seconds,register_digits,"
    "register_reset_at,spike_factor,stuck_readings"
)
GOOD_ROWS = [
    "em1,electricity,North,2020-01-01,900,6,2024-05-01T02:00:00+02:00,12.5,4",
    "wm1,water,South,,,,,,",
    "gm1,gas,North,2021-03-04,1800,8,,,",
]


def write_csv(path: Path, rows: list[str], header: str = HEADER) -> str:
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


@pytest.fixture
def settings(
    tmp_path: Path, mongo_uri: str, mongo_db_name: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    env = {
        "MONGO_URI": mongo_uri,
        "MONGO_DB": mongo_db_name,
        "METERFLOW_DATA_DIR": str(tmp_path / "data"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings.from_env(env)


def meters(db: Any) -> dict[str, dict[str, Any]]:
    return {d["_id"]: d for d in db[mongo.METERS].find()}


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if "level=" not in line]


def test_a_good_csv_reaches_the_lake_and_meters(
    tmp_path: Path,
    settings: Settings,
    db: Any,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    source = write_csv(tmp_path / "fleet.csv", GOOD_ROWS)
    assert cli.main(["registry", "import", source]) == 0
    out = capsys.readouterr().out
    assert "imported 3 meters" in out and "electricity 1, gas 1, water 1" in out
    assert (
        "districts: 2; with interval_seconds: 2; with a register: 2; with detection "
        "overrides: 1; constant loads: 0" in out
    )
    assert "MongoDB meters: 3 new, 0 updated, 0 removed" in out
    assert "not read by meterflow" not in out

    table = pq.read_table(Path(settings.registry_path) / "meters.parquet")
    header = HEADER.split(",")  # in the declared types, in the declared order
    assert table.schema == registry.schema_of([n for n in registry.BY_NAME if n in header])
    assert table["device_id"].to_pylist() == ["em1", "wm1", "gm1"]
    assert table["interval_seconds"].to_pylist() == [900, None, 1800]
    assert table["register_reset_at"][0].as_py() == datetime(2024, 5, 1, tzinfo=UTC)
    assert table["stuck_readings"].to_pylist() == [4, None, None]

    docs = meters(db)
    assert set(docs) == {"em1", "wm1", "gm1"}
    em1 = docs["em1"]
    assert (em1["meter_type"], em1["district"], em1["interval_seconds"]) == (
        "electricity",
        "North",
        900,
    )
    assert em1["register_digits"] == 6
    assert em1["register_reset_at"].replace(tzinfo=UTC) == datetime(2024, 5, 1, tzinfo=UTC)
    assert em1["installed_on"].replace(tzinfo=UTC) == datetime(2020, 1, 1, tzinfo=UTC)
    assert "interval_seconds" not in docs["wm1"] and "register_digits" not in docs["wm1"]


def test_a_good_parquet_reaches_the_lake_and_meters(
    tmp_path: Path, settings: Settings, db: Any
) -> None:
    source = tmp_path / "fleet.parquet"
    pq.write_table(
        pa.table(
            {
                "device_id": ["em1", "wm1"],
                "meter_type": ["electricity", "water"],
                "interval_seconds": pa.array([900, None], pa.int64()),  # pandas' int64
                "leak_min_night_flow": [None, 2.5],
                "owner": ["A. Smith", "B. Jones"],
            }
        ),
        source,
    )
    report = import_registry(db, str(source), settings.registry_path)
    assert (report.per_type, report.with_interval, report.with_overrides) == (
        {"electricity": 1, "water": 1},
        1,
        1,
    )
    table = registry.read(settings.registry_path)
    assert table.schema.field("interval_seconds").type == pa.int32()
    assert table["leak_min_night_flow"].to_pylist() == [None, 2.5]
    docs = meters(db)
    assert docs["em1"]["interval_seconds"] == 900 and docs["wm1"]["owner"] == "B. Jones"


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        (",electricity", "line 3: device_id is missing"),
        ("em1,water", "line 3: device_id repeats line 2 (value em1)"),
        ("em2,steam", "line 3: meter_type must be one of electricity, water, gas (value steam)"),
        (
            "em2,electricity,,,7",
            "line 3: interval_seconds must be a whole number at least 1 that divides 86400 "
            "(value 7)",
        ),
        (
            "em2,electricity,,,,-1",
            "line 3: register_digits must be a whole number from 1 to 15 (value -1)",
        ),
        (
            "em2,electricity,,,,,2024-13-01T00:00:00Z",
            "line 3: register_reset_at must be an ISO 8601 time with an offset or Z "
            "(value 2024-13-01T00:00:00Z)",
        ),
        ("em2,electricity,,,,,,twelve", "line 3: spike_factor must be a number (value twelve)"),
    ],
)
def test_a_bad_row_is_named_by_its_line_and_nothing_is_written(
    tmp_path: Path, settings: Settings, db: Any, row: str, problem: str
) -> None:
    import_registry(db, write_csv(tmp_path / "first.csv", GOOD_ROWS), settings.registry_path)
    lake_file = Path(settings.registry_path) / "meters.parquet"
    before = (lake_file.read_bytes(), meters(db))
    rows = [
        r + "," * (HEADER.count(",") - r.count(",")) for r in ("em1,electricity", row, "gm9,gas")
    ]
    with pytest.raises(RegistryRejectedError) as rejected:
        import_registry(db, write_csv(tmp_path / "bad.csv", rows), settings.registry_path)
    assert rejected.value.rows == [problem]
    assert str(rejected.value).endswith("not imported: 1 bad row; fix the file and import it again")
    assert (lake_file.read_bytes(), meters(db)) == before


def test_a_rows_problems_share_its_line_and_blank_lines_count(tmp_path: Path) -> None:
    source = write_csv(
        tmp_path / "bad.csv", ["em1,electricity,,,,,,,", "", "em2,gas,,not-a-day,30,16,,,1"]
    )
    read = registry.read_file(source)
    clean, problems = registry.validate(read.table, read.lines)
    assert problems == [
        "line 4: installed_on must be a date YYYY-MM-DD (value not-a-day); register_digits "
        "must be a whole number from 1 to 15 (value 16); stuck_readings must be a whole "
        "number at least 2 (value 1)"
    ]  # 30 s divides a day: no word of interval_seconds
    assert clean["device_id"].to_pylist() == ["em1"]


def test_a_parquet_row_is_named_by_its_number(tmp_path: Path) -> None:
    table = pa.table({"device_id": ["em1", "em2"], "meter_type": ["electricity", "gas"],
                      "nodata_intervals": [3.0, 0.0]})  # fmt: skip
    _, problems = registry.validate(table)
    assert problems == ["row 2: nodata_intervals must be a whole number at least 1 (value 0.0)"]


def test_a_reimport_replaces_the_registry_and_removes_dropped_meters(
    tmp_path: Path,
    settings: Settings,
    db: Any,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    assert cli.main(["registry", "import", write_csv(tmp_path / "a.csv", GOOD_ROWS)]) == 0
    changed = [GOOD_ROWS[0].replace("North", "East"), GOOD_ROWS[2]]  # wm1 is gone
    assert cli.main(["registry", "import", write_csv(tmp_path / "b.csv", changed)]) == 0
    out = capsys.readouterr().out
    assert "MongoDB meters: 0 new, 1 updated, 1 removed" in out
    assert registry.read(settings.registry_path)["device_id"].to_pylist() == ["em1", "gm1"]
    docs = meters(db)
    assert set(docs) == {"em1", "gm1"} and docs["em1"]["district"] == "East"


def test_unknown_columns_are_kept_and_named(tmp_path: Path, settings: Settings, db: Any) -> None:
    source = write_csv(
        tmp_path / "typo.csv",
        ["em1,electricity,900,x1"],
        "device_id,meter_type,intervall_seconds,tag",
    )
    report = import_registry(db, source, settings.registry_path)
    assert report.unknown == ["intervall_seconds", "tag"]
    assert report.with_interval == 0  # the typo is not the interval
    from meterflow.serving.registry_import import summary_lines

    assert summary_lines(report)[-1].startswith(
        "kept as metadata, not read by meterflow: intervall_seconds, tag"
    )
    assert registry.read(settings.registry_path)["intervall_seconds"].to_pylist() == ["900"]


def test_the_command_prints_the_bad_rows_then_one_line_and_exits_2(
    tmp_path: Path,
    settings: Settings,
    db: Any,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    rows = [f"em{n},steam" for n in range(150)]
    source = write_csv(tmp_path / "bad.csv", rows, "device_id,meter_type")
    assert cli.main(["registry", "import", source]) == 2
    captured = capsys.readouterr()
    shown = captured.out.splitlines()
    assert len(shown) == 101 and shown[-1] == "... and 50 more bad rows"
    assert shown[0] == "line 2: meter_type must be one of electricity, water, gas (value steam)"
    assert errors(captured.err) == [
        f"meterflow registry import: {source} not imported: 150 bad rows; fix the file and "
        "import it again"
    ]
    assert not registry.exists(settings.registry_path) and meters(db) == {}


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("fleet.json", "{}", "a registry is a .csv or .parquet file, not .json"),
        ("fleet.csv", "device_id\nem1\n", "meter_type: the required column is missing"),
        ("fleet.csv", "device_id,meter_type\nem1,gas,extra\n", "line 2: 3 fields where"),
        ("fleet.csv", "device_id,meter_type\n", "the file has no meters"),
    ],
)
def test_a_file_that_is_no_registry_is_one_line(
    tmp_path: Path,
    settings: Settings,
    db: Any,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
    name: str,
    text: str,
    reason: str,
) -> None:
    (tmp_path / name).write_text(text)
    assert cli.main(["registry", "import", str(tmp_path / name)]) == 2
    captured = capsys.readouterr()
    err = errors(captured.err)
    assert len(err) == 1 and err[0].startswith("meterflow registry import: ") and reason in err[0]
    assert captured.out == ""
    assert not registry.exists(settings.registry_path)


def test_the_simulators_columns_and_the_detectors_bounds_are_the_registrys() -> None:
    from meterflow.stream.detection.profiles import PROFILE_COLUMNS
    from simulator.fleet import REGISTRY_SCHEMA

    assert all(registry.SCHEMA.field(f.name) == f for f in REGISTRY_SCHEMA)
    assert set(PROFILE_COLUMNS) == {registry.INTERVAL, *registry.OVERRIDES}
    bound = registry.BY_NAME["interval_seconds"].bound
    assert bound is not None and bound.allows(900) and not bound.allows(7)
    assert not bound.allows(float("nan")) and not bound.allows(0)


def test_docs_registry_md_lists_every_column_with_its_bound() -> None:
    """docs/registry.md's table is written once by hand: it must follow the declaration."""
    from helpers import ROOT

    lines = (ROOT / "docs" / "registry.md").read_text().splitlines()
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| `")}
    documented = {name.strip(" `") for cell in rows for name in cell.split(",")}
    assert documented >= set(registry.BY_NAME)
    for column in registry.COLUMNS:
        if column.bound is not None:
            assert column.bound.describe() in rows[f"`{column.name}`"], column.name


def test_constant_loads_are_imported_and_reach_the_detector(
    tmp_path: Path,
    settings: Settings,
    db: Any,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    """A utility's street lights and pumps, declared in its CSV; a value that is not a yes
    or no names its line."""
    from meterflow.stream.detection.profiles import load_profiles

    header = "device_id,meter_type,constant_load"
    rows = ["em1,electricity,true", "em2,electricity,No", "wm1,water,", "gm1,gas, YES "]
    assert cli.main(["registry", "import", write_csv(tmp_path / "f.csv", rows, header)]) == 0
    assert "constant loads: 2" in capsys.readouterr().out
    profiles = load_profiles(settings.registry_path, settings.detection)
    assert {d for d, p in profiles.items() if p.constant_load} == {"em1", "gm1"}
    assert "em2" not in profiles and "wm1" not in profiles  # nothing set: the defaults

    bad = write_csv(tmp_path / "bad.csv", ["em1,electricity,maybe"], header)
    assert cli.main(["registry", "import", bad]) == 2
    shown = capsys.readouterr().out.splitlines()
    assert shown == ["line 2: constant_load must be true or false (value maybe)"]
