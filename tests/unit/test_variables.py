"""Settings declared once (meterflow/core/variables.py): one declaration per variable gives
its parsing, its bounds, its default and its line in ``meterflow config``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Literal

import pytest

from meterflow.core import variables
from meterflow.core.config import Settings, env_value
from meterflow.core.contract import MeterType
from meterflow.core.errors import ConfigError
from meterflow.core.thresholds import DetectionRules, Rules
from meterflow.core.variables import variable
from meterflow.dashboards.metabase import MetabaseSettings


@dataclass(frozen=True)
class Inner:
    level: float = variable("T_LEVEL", "a level", 1.5, minimum=1)

    def __post_init__(self) -> None:
        if self.level > 10:
            raise ValueError("level must be at most 10")


@dataclass(frozen=True)
class Example:
    count: int = variable("T_COUNT", "a count", 3, minimum=1)
    ratio: float = variable("T_RATIO", "a ratio", 0.5, minimum=0)
    name: str = variable("T_NAME", "a name", "x")
    mode: Literal["fast", "slow"] = variable("T_MODE", "a mode", "fast")
    enabled: bool = variable("T_ENABLED", "a switch", False)
    home: Path = variable("T_HOME", "a path", Path("/tmp"))
    day: date = variable("T_DAY", "a day", date(2026, 1, 1))
    per_type: dict[MeterType, float] = variable(
        "T_MIN_{key}",
        "a level for {key}",
        default_factory=lambda: dict.fromkeys(MeterType, 1.0),
        minimum=0,
        keys=tuple(str(kind) for kind in MeterType),
    )
    password: str = variable("T_PASSWORD", "a secret", "", secret=True)
    inner: Inner = dataclasses.field(default_factory=Inner, metadata={"label": "inner rules"})


def test_absent_and_empty_variables_take_the_declared_defaults() -> None:
    assert variables.parse(Example, {}) == Example()
    assert variables.parse(Example, {"T_COUNT": "  ", "T_NAME": ""}) == Example()


def test_each_type_is_parsed_from_its_annotation() -> None:
    parsed = variables.parse(
        Example,
        {
            "T_COUNT": "7",
            "T_RATIO": "2.5",
            "T_NAME": " y ",
            "T_MODE": "SLOW",
            "T_ENABLED": "on",
            "T_HOME": "~/x",
            "T_DAY": "2026-12-06",
            "T_MIN_WATER": "4",
            "T_LEVEL": "2",
        },
    )
    assert (parsed.count, parsed.ratio, parsed.name, parsed.mode) == (7, 2.5, "y", "slow")
    assert parsed.enabled is True
    assert parsed.home == Path("~/x").expanduser().absolute()
    assert parsed.day == date(2026, 12, 6)
    assert parsed.per_type == {MeterType.ELECTRICITY: 1.0, MeterType.WATER: 4.0, MeterType.GAS: 1.0}
    assert parsed.inner == Inner(level=2.0)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"T_COUNT": "many"}, "T_COUNT='many' is not a whole number"),
        ({"T_COUNT": "2.5"}, "T_COUNT='2.5' is not a whole number"),
        ({"T_COUNT": "0"}, "T_COUNT='0' must be at least 1"),
        ({"T_RATIO": "nan"}, "T_RATIO='nan' is not a finite number"),
        ({"T_RATIO": "-1"}, "T_RATIO='-1' must be at least 0"),
        ({"T_MODE": "medium"}, "T_MODE='medium' must be fast or slow"),
        ({"T_ENABLED": "yes"}, "T_ENABLED='yes' must be on or off"),
        ({"T_DAY": "06/12/2026"}, "T_DAY='06/12/2026' is not a date (YYYY-MM-DD)"),
        ({"T_MIN_GAS": "-2"}, "T_MIN_GAS='-2' must be at least 0"),
        ({"T_LEVEL": "0.5"}, "T_LEVEL='0.5' must be at least 1"),
        ({"T_LEVEL": "11"}, "inner rules: level must be at most 10"),
        ({"T_PASSWORD": "CHANGE-ME-1"}, "T_PASSWORD still holds a CHANGE-ME placeholder"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        variables.parse(Example, env)
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


def test_the_table_lists_each_variable_once_with_its_default_and_values() -> None:
    entries = {entry.name: entry for entry in variables.table(Example)}
    assert list(entries)[:3] == ["T_COUNT", "T_RATIO", "T_NAME"]
    assert entries["T_COUNT"] == variables.Entry("T_COUNT", "3", "whole number ≥ 1", "a count")
    assert entries["T_MODE"].kind == "`fast` or `slow`"
    assert entries["T_ENABLED"].default == "off"
    assert entries["T_MIN_WATER"] == variables.Entry(
        "T_MIN_WATER", "1", "number ≥ 0", "a level for water"
    )
    assert entries["T_LEVEL"].default == "1.5"  # a nested class's variables in place
    assert variables.default_text(Example, "T_DAY") == "2026-01-01"


def test_settings_from_an_empty_environment_are_the_declared_defaults() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.rules == Rules() and settings.detection == DetectionRules()
    assert settings.lake_path == str(Path("data").absolute() / "lake")
    assert settings.partitions == 4 and settings.kafka_source == "auto"


def test_every_setting_and_threshold_is_declared_once() -> None:
    names = [
        entry.name for entry in [*variables.table(Settings), *variables.table(MetabaseSettings)]
    ]
    assert len(names) == len(set(names))
    for name in (
        "METERFLOW_MAX_USAGE_KWH",
        "METERFLOW_STUCK_MIN_GAS",
        "METERFLOW_LEAK_NIGHT_HOURS",
    ):
        assert name in names
    assert env_value("METERFLOW_DAG_START_DATE", {}) == str(Settings().dag_start_date)
    assert env_value("METERFLOW_TOPIC_ABNORMAL", {"METERFLOW_TOPIC_ABNORMAL": " a "}) == "a"


def test_metabase_reads_only_its_own_variables_beside_the_platforms_mongodb() -> None:
    platform = Settings.from_env({"MONGO_URI": "mongodb://m:pw@db:27017/", "MONGO_DB": "city"})
    env = {"METABASE_ADMIN_EMAIL": "a@b.c", "METABASE_ADMIN_PASSWORD": "pw", "METABASE_URL": "u/"}
    metabase = MetabaseSettings.from_env(platform, env)
    assert (metabase.mongo_uri, metabase.mongo_db, metabase.url) == (
        "mongodb://m:pw@db:27017/",
        "city",
        "u",
    )
    own = MetabaseSettings.from_env(platform, {**env, "METABASE_MONGO_URI": "mongodb://r@db/"})
    assert own.mongo_uri == "mongodb://r@db/"
    with pytest.raises(ConfigError, match="METABASE_MONGO_URI \\(or MONGO_URI\\) must be set"):
        MetabaseSettings.from_env(Settings.from_env({}), env)


# -- secrets: NAME_FILE, placeholders in files, redaction -------------------------------------


def test_a_secret_may_come_from_a_file_named_by_its_file_variable(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret with spaces \n")  # one trailing newline dropped, nothing else
    assert variables.parse(Example, {"T_PASSWORD_FILE": str(secret)}).password == (
        "s3cret with spaces "
    )
    assert variables.parse(Example, {"T_NAME_FILE": str(secret)}).name == "x"  # not a secret


@pytest.mark.parametrize(
    ("content", "env", "message"),
    [
        ("a\n", {"T_PASSWORD": "b"}, "T_PASSWORD and T_PASSWORD_FILE are both set: keep one"),
        (None, {}, "T_PASSWORD_FILE={path} cannot be read (No such file or directory): point "),
        ("\n", {}, "T_PASSWORD_FILE={path} is empty: write T_PASSWORD into it"),
        (
            "CHANGE-ME-1\n",
            {},
            "T_PASSWORD_FILE={path} still holds a CHANGE-ME placeholder: set it",
        ),
    ],
)
def test_a_bad_secret_file_is_one_line_naming_its_variable(
    tmp_path: Path, content: str | None, env: dict[str, str], message: str
) -> None:
    path = tmp_path / "password"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as raised:
        variables.parse(Example, {"T_PASSWORD_FILE": str(path), **env})
    assert str(raised.value).startswith(message.format(path=path))
    assert "\n" not in str(raised.value)


def test_a_secret_is_redacted_in_reprs_and_its_file_variable_documented() -> None:
    @dataclass(frozen=True)
    class Secretive:
        user: str = variable("T_USER", "a user", "")
        password: str = variable("T_PASSWORD", "a secret", "", secret=True)
        __repr__ = variables.redacted_repr

    shown = repr(variables.parse(Secretive, {"T_USER": "alice", "T_PASSWORD": "hunter2"}))
    assert shown == "Secretive(user='alice', password=***)"
    assert repr(Secretive()) == "Secretive(user='', password='')"  # unset: nothing to hide
    assert variables.table(Secretive)[1].doc == "a secret; or `T_PASSWORD_FILE`, a file holding it"
