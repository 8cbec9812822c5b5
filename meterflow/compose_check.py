"""Pre-flight of the docker compose set-up: ``.env`` values, host ports, Docker itself.

``meterflow doctor`` runs every check before ``docker compose up``; the init
containers run :func:`env_problems` on what they were given, so a placeholder or a
malformed key stops them with one line naming the variable and how to make a good value,
instead of a service failing later (an invalid Fernet key breaks Airflow's triggers).
"""

from __future__ import annotations

import base64
import binascii
import re
import shutil
import subprocess
from collections.abc import Collection, Mapping
from pathlib import Path

from meterflow.core.variables import FILE_SUFFIX, PLACEHOLDER
from meterflow.local.service import port_open

GENERATE = {
    "AIRFLOW_FERNET_KEY": 'python -c "from cryptography.fernet import Fernet;'
    'print(Fernet.generate_key().decode())"',
    "AIRFLOW_JWT_SECRET": 'python -c "import secrets;print(secrets.token_urlsafe(32))"',
}
_PASSWORD = 'python -c "import secrets;print(secrets.token_urlsafe(18))"'
#: Values that end up inside MongoDB/PostgreSQL URIs.
_URI_SAFE = re.compile(r"^[A-Za-z0-9._-]+$")
HOST_PORTS = (
    "KAFKA_HOST_PORT",
    "MONGO_HOST_PORT",
    "SPARK_UI_PORT",
    "AIRFLOW_HOST_PORT",
    "METABASE_HOST_PORT",
)


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a compose ``.env`` (comments and blank lines skipped)."""
    values = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().strip("'\"")
    return values


def _fernet_ok(key: str) -> bool:
    try:
        return len(base64.urlsafe_b64decode(key.encode())) == 32
    except (binascii.Error, ValueError):
        return False


def _stale_secret_file(name: str, value: str) -> bool:
    """A secret given as a file (``NAME_FILE``, as Docker secrets do) still holding the
    placeholder."""
    if not name.endswith(FILE_SUFFIX) or not value or not Path(value).is_file():
        return False
    return PLACEHOLDER in Path(value).read_text(errors="replace")


def env_problems(values: Mapping[str, str]) -> list[str]:
    """One line per bad value: the variable, what is wrong, how to make a good one."""
    problems = []
    for name, value in sorted(values.items()):
        if PLACEHOLDER in value:
            how = GENERATE.get(name, _PASSWORD)
            problems.append(f"{name} is still a {PLACEHOLDER} placeholder: set it, e.g. {how}")
        elif _stale_secret_file(name, value):
            secret = name.removesuffix(FILE_SUFFIX)
            how = GENERATE.get(secret, _PASSWORD)
            problems.append(
                f"{name}={value} still holds a {PLACEHOLDER} placeholder: write the real "
                f"{secret} into it, e.g. {how}"
            )
    fernet = values.get("AIRFLOW_FERNET_KEY", "")
    if fernet and PLACEHOLDER not in fernet and not _fernet_ok(fernet):
        problems.append(
            "AIRFLOW_FERNET_KEY is not a Fernet key (32 url-safe base64 bytes): "
            f"generate one with {GENERATE['AIRFLOW_FERNET_KEY']}"
        )
    jwt = values.get("AIRFLOW_JWT_SECRET", "")
    if jwt and PLACEHOLDER not in jwt and len(jwt) < 16:
        problems.append(
            f"AIRFLOW_JWT_SECRET is shorter than 16 characters: {GENERATE['AIRFLOW_JWT_SECRET']}"
        )
    metabase = values.get("METABASE_ADMIN_PASSWORD", "")
    if (
        metabase
        and PLACEHOLDER not in metabase
        and (len(metabase) < 6 or not any(c.isdigit() for c in metabase))
    ):
        problems.append(
            "METABASE_ADMIN_PASSWORD must have at least 6 characters and a digit (Metabase "
            f"refuses it otherwise): {_PASSWORD}"
        )
    for name in (
        "KAFKA_SASL_PASSWORD",
        "MONGO_ROOT_PASSWORD",
        "MONGO_APP_PASSWORD",
        "MONGO_READER_PASSWORD",
        "AIRFLOW_POSTGRES_PASSWORD",
        "METABASE_POSTGRES_PASSWORD",
    ):
        value = values.get(name, "")
        if value and PLACEHOLDER not in value and not _URI_SAFE.match(value):
            problems.append(
                f"{name} goes into a URI or a login config: use letters, digits, '-', '_' and '.' "
                f"only, e.g. {_PASSWORD}"
            )
    return problems


def port_problems(values: Mapping[str, str]) -> list[str]:
    problems = []
    for name in HOST_PORTS:
        port = values.get(name, "")
        if port.isdigit() and port_open(int(port), host="127.0.0.1"):
            problems.append(f"{name}={port} is already in use on this host: pick a free port")
    return problems


def parse_size(value: str) -> int:
    """Bytes of a compose size such as ``768m``, ``1g``, ``1.5gb`` or ``1048576``."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    size = value.strip().lower().rstrip("b")
    return int(float(size[:-1]) * units[size[-1]]) if size[-1:] in units else int(size or 0)


#: The master of the compose ``cluster`` profile, as its containers reach it.
CLUSTER_MASTER = "spark://spark-master:7077"


def profiles_on(value: str) -> set[str]:
    """The profiles of a ``COMPOSE_PROFILES`` value (comma-separated)."""
    return {name.strip() for name in value.split(",") if name.strip()}


def cluster_problems(values: Mapping[str, str], profiles: Collection[str]) -> list[str]:
    """``SPARK_MASTER`` and the ``cluster`` profile disagreeing: jobs that wait forever for
    a master that is not started, or a cluster nothing submits to."""
    master = values.get("SPARK_MASTER", "")
    if "cluster" in profiles and master != CLUSTER_MASTER:
        return [
            f"the cluster profile is on but SPARK_MASTER={master}: set "
            f"SPARK_MASTER={CLUSTER_MASTER} so the jobs run on it"
        ]
    if "cluster" not in profiles and master == CLUSTER_MASTER:
        return [
            f"SPARK_MASTER={CLUSTER_MASTER} but the cluster profile is off: set "
            "COMPOSE_PROFILES=cluster in .env (or docker compose --profile cluster)"
        ]
    return []


def active(service: Mapping[str, object], profiles: Collection[str] = ()) -> bool:
    """Whether compose starts ``service`` with ``profiles`` on: a service without
    ``profiles`` always, one with them only if one of them is on."""
    wanted = service.get("profiles")
    if not isinstance(wanted, list) or not wanted:
        return True
    return any(str(name) in profiles for name in wanted)


def memory_budget(
    services: Mapping[str, Mapping[str, object]], profiles: Collection[str] = ()
) -> int:
    """Bytes Docker needs at most with ``profiles`` on: every long-running service's
    ``mem_limit`` plus the largest one-shot step's (``restart: "no"``; they run for seconds
    at start-up)."""
    long_running, one_shot = 0, [0]
    for service in services.values():
        if not active(service, profiles):
            continue
        size = parse_size(str(service.get("mem_limit", "0")))
        if service.get("restart") == "no":
            one_shot.append(size)
        else:
            long_running += size
    return long_running + max(one_shot)


def memory_limits(compose_file: Path, profiles: Collection[str] = ()) -> int:
    """:func:`memory_budget` of a compose file."""
    import yaml

    services = yaml.safe_load(compose_file.read_text()).get("services") or {}
    return memory_budget(services, profiles)


def docker_problems(compose_file: Path, need_bytes: int) -> tuple[list[str], list[str]]:
    """(problems, notes) from Docker when it is installed: memory and ``compose config``."""
    if shutil.which("docker") is None:
        return [], ["docker not installed here: its memory and the compose file not checked"]
    info = subprocess.run(
        ["docker", "info", "--format", "{{.MemTotal}}"], capture_output=True, text=True, check=False
    )
    if info.returncode != 0:
        return [], ["the Docker engine does not answer: its memory was not checked"]
    problems, notes = [], []
    total = int(info.stdout.strip() or 0)
    if total < need_bytes:
        problems.append(
            f"Docker has {total / 2**30:.1f} GiB of memory; the services' memory limits need "
            f"{need_bytes / 2**30:.1f} GiB: give Docker more memory"
        )
    config = subprocess.run(
        ["docker", "compose", "-f", str(compose_file), "config", "-q"],
        check=False,
        capture_output=True,
        text=True,
    )
    if config.returncode != 0:
        problems.append(f"docker compose config: {config.stderr.strip().splitlines()[-1]}")
    else:
        notes.append("docker compose config: valid")
    return problems, notes


#: How the init containers receive what ``.env`` set (compose renames a few).
_CONTAINER_NAMES = {
    "AIRFLOW__CORE__FERNET_KEY": "AIRFLOW_FERNET_KEY",
    "AIRFLOW__API_AUTH__JWT_SECRET": "AIRFLOW_JWT_SECRET",
}


#: What the init steps use as it is; a placeholder inside a URI names the URI.
_CHECKED_AS_GIVEN = (
    "AIRFLOW_ADMIN_PASSWORD",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
    "METABASE_ADMIN_PASSWORD",
    "MONGO_URI",
)


def main(argv: list[str] | None = None) -> int:
    """``python -m meterflow.compose_check STEP``: an init container's check of its env."""
    import os
    import sys

    step = (argv or sys.argv[1:] or ["init"])[0]
    values = {
        _CONTAINER_NAMES.get(name, name): os.environ[name]
        for name in (*_CONTAINER_NAMES, *_CHECKED_AS_GIVEN)
        if os.environ.get(name)
    }
    problems = env_problems(values)
    for problem in problems:
        print(f"{step}: {problem} (in .env)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
