"""The ``meterflow`` command as users run it, where it stops before it needs a service:
its configuration, and the one-line errors of a bad one. A real process each time.

Commands that run a broker, Spark or the whole platform, or wait for a broker that does
not answer, are in tests/integration/test_cli_processes.py.
"""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT, meterflow

from meterflow.core import variables
from meterflow.core.config import Settings
from meterflow.core.contract import FaultCode
from meterflow.dashboards.metabase import MetabaseSettings
from meterflow.serving.users import MongoUsersSettings
from simulator.faults import DEMO_EPISODE_RATES


def test_config_lists_every_variable() -> None:
    result = meterflow("config", "--markdown")
    assert result.returncode == 0, result.stderr
    declared = [
        *variables.table(Settings),
        *variables.table(MetabaseSettings),
        *variables.table(MongoUsersSettings),
    ]
    assert len(declared) > 50  # the per-type thresholds and bounds are expanded
    listed = [line.split("`")[1] for line in result.stdout.splitlines()[2:]]
    assert listed == [entry.name for entry in declared]


def test_bad_config_is_one_line_and_non_zero() -> None:
    result = meterflow("topics", env={"METERFLOW_KAFKA_PARTITIONS": "many"})
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "meterflow topics: METERFLOW_KAFKA_PARTITIONS='many' is not a whole number"
    )


def test_a_placeholder_is_refused_at_start() -> None:
    result = meterflow(
        "topics", env={"MONGO_URI": "mongodb://meterflow:CHANGE-ME-mongo@localhost:27017/"}
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "meterflow topics: MONGO_URI still holds a CHANGE-ME placeholder: set it (see "
        ".env.example; meterflow doctor checks them all)"
    )


def test_stream_summary_names_the_episodes_per_code() -> None:
    from meterflow.cli import _totals_line

    totals = {"read": 10, "valid": 9, "abnormal": 1, "deadletter": 0}
    assert "episodes" not in _totals_line(totals)
    line = _totals_line({**totals, "open_STUCK": 2, "open_NO_DATA": 1, "clear_STUCK": 1})
    assert "; episodes opened: NO_DATA 1, STUCK 2; episodes cleared: STUCK 1 (" in line


def test_python_m_simulator_is_meterflow_simulate_and_replay() -> None:
    """The simulator's own command shares meterflow's parser: same options, no drift."""

    def python(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
        )

    own = python("-m", "simulator", "--help")
    assert own.returncode == 0, own.stderr
    assert own.stdout.startswith("usage: python -m simulator")
    for command in ("simulate", "replay"):
        mine = python("-m", "simulator", command, "--help")
        theirs = meterflow(command, "--help")
        assert mine.returncode == theirs.returncode == 0, mine.stderr
        # The usage line wraps by the program's name; the options are the same text.
        assert mine.stdout.split("options:")[1] == theirs.stdout.split("options:")[1]
    refused = python("-m", "simulator", "run")
    assert refused.returncode == 2 and "invalid choice: 'run'" in refused.stderr


def test_run_injects_the_demo_episodes_unless_told_otherwise() -> None:
    from meterflow.cli import build_parser
    from meterflow.local.run import episodes_note

    parser = build_parser()
    assert parser.parse_args(["run"]).episodes == DEMO_EPISODE_RATES
    assert parser.parse_args(["run", "--episodes", "none"]).episodes == {}
    assert parser.parse_args(["run", "--episodes", "stuck=1"]).episodes == {FaultCode.STUCK: 1}
    assert parser.parse_args(["run", "--interval", "1m"]).interval == 60.0
    note = episodes_note(DEMO_EPISODE_RATES, backfilled=False)
    assert "STUCK=4, SPIKE=4, LEAK=1, NO_DATA=4" in note and "--episodes none" in note
    assert "--airflow" in note and "--airflow" not in episodes_note({FaultCode.SPIKE: 1}, True)


def test_a_dead_worker_is_named_in_the_runs_one_line(monkeypatch) -> None:
    """How ``meterflow run`` words any worker's death (the whole run, with the sink as
    the dead worker, is tests/integration/test_cli_processes.py's)."""
    from meterflow.local.run import Drain

    drain = Drain(Settings.from_env({}))
    drains: list[bool] = []
    monkeypatch.setattr(drain, "_start", lambda: drains.append(True) or True)
    drain.failed("simulator", RuntimeError("disk on fire\n(injected)"))
    drain.failed("sink", OSError("later"))
    assert drain.failure is not None and drain.failure.startswith(
        "the simulator stopped: RuntimeError: disk on fire (injected); the run stopped with it"
    )
    assert drain.dead == {"simulator", "sink"} and drains == [True, True]
