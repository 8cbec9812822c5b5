"""The serving database's MongoDB users: one that reads and writes, one that only reads.

Meter data is personal data, so no service but the user-creating step holds MongoDB's root
credentials (docs/operations.md, "Credentials"). ``meterflow mongo-users`` (compose's
``mongo-users``) logs in as root and makes sure two users exist in the serving database
``MONGO_DB``, with exactly these roles and the passwords configured now:

* the application user, ``readWrite`` on that database: the sink, the loader, the DAGs and
  ``init-mongo`` connect as it;
* the reader, ``read`` on that database: Metabase connects as it, so a native question
  cannot write or reach another database.

Running it again changes nothing but the passwords and roles, which it sets each time: a
password changed in ``.env`` takes effect on the next start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meterflow.core import variables
from meterflow.core.errors import ConfigError
from meterflow.core.variables import variable

READ_WRITE, READ = "readWrite", "read"


@dataclass(frozen=True)
class MongoUsersSettings:
    """Root access, and the two users to create in the serving database."""

    root_uri: str = variable(
        "MONGO_ROOT_URI",
        "MongoDB as its root user, for mongo-users alone (required there)",
        "",
        secret=True,
    )
    app_username: str = variable(
        "MONGO_APP_USERNAME", "MongoDB user with readWrite on MONGO_DB", "meterflow_app"
    )
    app_password: str = variable(
        "MONGO_APP_PASSWORD", "Its password (required by mongo-users)", "", secret=True
    )
    reader_username: str = variable(
        "MONGO_READER_USERNAME", "MongoDB user with read on MONGO_DB (Metabase)", "meterflow_reader"
    )
    reader_password: str = variable(
        "MONGO_READER_PASSWORD", "Its password (required by mongo-users)", "", secret=True
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MongoUsersSettings:
        read = variables.parse(cls, os.environ if env is None else env)
        missing = [
            name
            for name, value in (
                ("MONGO_ROOT_URI", read.root_uri),
                ("MONGO_APP_PASSWORD", read.app_password),
                ("MONGO_READER_PASSWORD", read.reader_password),
            )
            if not value
        ]
        if missing:
            raise ConfigError(f"{', '.join(missing)} must be set to create the MongoDB users")
        if read.app_username == read.reader_username:
            raise ConfigError("MONGO_APP_USERNAME and MONGO_READER_USERNAME must differ")
        return read


@dataclass(frozen=True)
class User:
    name: str
    password: str
    role: str

    def __repr__(self) -> str:  # never the password
        return f"User({self.name!r}, role={self.role!r})"


def wanted(settings: MongoUsersSettings) -> list[User]:
    return [
        User(settings.app_username, settings.app_password, READ_WRITE),
        User(settings.reader_username, settings.reader_password, READ),
    ]


def ensure_users(database: Any, users: list[User]) -> dict[str, str]:
    """Create each user in ``database`` (a pymongo Database), or set its password and its
    one role if it exists; returns what happened to each ("created" or "updated")."""
    done: dict[str, str] = {}
    for user in users:
        roles = [{"role": user.role, "db": database.name}]
        found = database.command({"usersInfo": user.name}).get("users") or []
        verb = "updateUser" if found else "createUser"
        database.command({verb: user.name, "pwd": user.password, "roles": roles})
        done[user.name] = "updated" if found else "created"
    return done
