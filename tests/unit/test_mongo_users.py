"""``meterflow mongo-users``: the serving database's two users, created or updated as root.

No MongoDB server can run here and mongomock has no users, so by default the commands the
step sends are recorded and checked (their roles, their passwords on a re-run). With
``MONGO_URI`` set to a real server's root URI the same test creates the users there and
logs in as each: the application user writes, the reader cannot.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

from meterflow import cli
from meterflow.clients import mongo

RECORDER = "users-recorder"


class RecordingDatabase:
    """What ``ensure_users`` needs of a pymongo Database, with a log of the commands."""

    def __init__(self, name: str, server: RecordingClient) -> None:
        self.name, self.users, self.log = name, server.users, server.log
        self.refuse = server.refuse

    def command(self, spec: dict[str, Any]) -> dict[str, Any]:
        if self.refuse:
            from pymongo.errors import OperationFailure

            raise OperationFailure("Authentication failed.", 18, {"errmsg": "secret detail"})
        self.log.append(spec)
        verb, user = next(iter(spec.items()))
        if verb == "usersInfo":
            return {"users": [self.users[user]] if user in self.users else [], "ok": 1}
        if verb == "createUser":
            assert user not in self.users, "createUser of an existing user fails on a server"
        elif verb == "updateUser":
            assert user in self.users
        else:
            raise AssertionError(f"unexpected command {verb}")
        self.users[user] = {"user": user, "pwd": spec["pwd"], "roles": spec["roles"]}
        return {"ok": 1}


class RecordingClient:
    def __init__(self) -> None:
        self.users: dict[str, dict[str, Any]] = {}
        self.log: list[dict[str, Any]] = []
        self.refuse = False  # as a server does a wrong root password

    def __getitem__(self, name: str) -> RecordingDatabase:
        return RecordingDatabase(name, self)


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch):
    server = RecordingClient()
    mongo.register_scheme(RECORDER, lambda _uri: server)  # type: ignore[arg-type,return-value]
    yield server
    mongo.register_scheme(RECORDER, None)


def _env(monkeypatch: pytest.MonkeyPatch, root_uri: str, db_name: str, app_pw: str) -> None:
    for name, value in {
        "MONGO_ROOT_URI": root_uri,
        "MONGO_DB": db_name,
        "MONGO_URI": root_uri,
        "MONGO_APP_USERNAME": f"{db_name}_app",
        "MONGO_APP_PASSWORD": app_pw,
        "MONGO_READER_USERNAME": f"{db_name}_reader",
        "MONGO_READER_PASSWORD": "reader-pw-1",
    }.items():
        monkeypatch.setenv(name, value)


def test_mongo_users_command(
    recorder: RecordingClient,
    mongo_db_name: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    real = os.environ.get("MONGO_URI", "")
    root_uri = real or f"{RECORDER}://root@server"
    _env(monkeypatch, root_uri, mongo_db_name, "app-pw-1")
    app, reader = f"{mongo_db_name}_app", f"{mongo_db_name}_reader"
    assert cli.main(["mongo-users"]) == 0
    out = capsys.readouterr().out
    assert f"user {app}: created, readWrite on {mongo_db_name}" in out
    assert f"user {reader}: created, read on {mongo_db_name}" in out
    # Again, with the application user's password changed in .env: both updated.
    _env(monkeypatch, root_uri, mongo_db_name, "app-pw-2")
    assert cli.main(["mongo-users"]) == 0
    out = capsys.readouterr().out
    assert f"user {app}: updated" in out and f"user {reader}: updated" in out
    assert "app-pw" not in out and "reader-pw" not in out  # no password is printed
    if real:
        _check_logins(real, mongo_db_name, app, reader)
        return
    sent = [spec for spec in recorder.log if "usersInfo" not in spec]
    assert [next(iter(spec)) for spec in sent] == ["createUser"] * 2 + ["updateUser"] * 2
    assert recorder.users[app]["roles"] == [{"role": "readWrite", "db": mongo_db_name}]
    assert recorder.users[reader]["roles"] == [{"role": "read", "db": mongo_db_name}]
    assert recorder.users[app]["pwd"] == "app-pw-2"


def test_mongo_users_refuses_to_start_without_its_passwords(
    recorder: RecordingClient,
    mongo_db_name: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    _env(monkeypatch, f"{RECORDER}://root@server", mongo_db_name, "")
    assert cli.main(["mongo-users"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "level=" not in line]
    assert len(err) == 1 and "MONGO_APP_PASSWORD" in err[0]
    assert recorder.log == []


def test_a_wrong_root_password_is_one_line(
    recorder: RecordingClient,
    mongo_db_name: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    recorder.refuse = True
    _env(monkeypatch, f"{RECORDER}://root:wrong-root-pw@server", mongo_db_name, "app-pw-1")
    assert cli.main(["mongo-users"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "level=" not in line]
    assert len(err) == 1 and "Authentication failed" in err[0] and "MONGO_ROOT_PASSWORD" in err[0]
    assert "wrong-root-pw" not in err[0] and "secret detail" not in err[0]


def _as(uri: str, user: str, password: str, db_name: str) -> str:
    parts = urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(
        (parts.scheme, f"{quote(user)}:{quote(password)}@{host}", f"/{db_name}", "", "")
    )


def _check_logins(root_uri: str, db_name: str, app: str, reader: str) -> None:
    """On a real server: the application user writes, the reader reads and cannot write."""
    from pymongo.errors import OperationFailure

    root = mongo.client(root_uri)[db_name]
    try:
        writer = mongo.client(_as(root_uri, app, "app-pw-2", db_name))[db_name]
        writer["probe"].insert_one({"x": 1})
        looker = mongo.client(_as(root_uri, reader, "reader-pw-1", db_name))[db_name]
        assert looker["probe"].count_documents({}) == 1
        with pytest.raises(OperationFailure):
            looker["probe"].insert_one({"x": 2})
    finally:
        for user in (app, reader):
            root.command({"dropUser": user})
        root.client.drop_database(db_name)
