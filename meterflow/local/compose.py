"""docker-compose.yml read as ``docker compose`` reads it, and its commands run on this machine.

The memory benchmark (``bench/memory.py``) and the native compose tests
(``tests/integration/test_compose_native.py``) take each service's command and environment
from the compose file itself, with ``.env.example``'s values, and swap hosts and ports for
local ones: what compose would run, without Docker. The compose file lives in a checkout,
not in the installed package.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from meterflow.core.folders import PARENT as CHECKOUT

COMPOSE_FILE = CHECKOUT / "docker-compose.yml"
ENV_EXAMPLE = CHECKOUT / ".env.example"
#: Where this Python's executables are (airflow, spark-submit, check-jsonschema).
BIN = Path(sys.executable).parent
VARIABLE = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)|(?P<dollar>\$))"
)


def env_example(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    """The ``NAME=value`` lines of ``.env.example``; any other line is an error that quotes it."""
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            if not sep:
                raise ValueError(f"{path.name} line is not NAME=value: {line!r}")
            values[name.strip()] = value.strip()
    return values


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation: ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``, ``$$``."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match["dollar"]:
            return "$"
        name = match["braced"] or match["bare"]
        current = env.get(name)
        op = match["op"] or ""
        if op.endswith("-") and not (current if op.startswith(":") else current is not None):
            return str(match["arg"])
        if op.endswith("?") and not current:
            raise KeyError(f"{name}: {match['arg']}")
        if current is None:
            raise KeyError(f"${{{name}}} is not set in .env.example")
        return current

    return VARIABLE.sub(substitute, value)


def resolved_compose() -> dict[str, Any]:
    """The compose file with ``.env.example`` interpolated."""
    resolved: dict[str, Any] = interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), env_example())
    return resolved


def native(argv: list[str], swap: dict[str, str]) -> list[str]:
    """A compose command for this machine: local executables, hosts and ports swapped."""
    out = []
    for arg in argv:
        swapped = arg
        for old, new in swap.items():
            swapped = swapped.replace(old, new)
        out.append(swapped)
    program = out[0]
    if program == "python":
        out[0] = sys.executable
    elif (BIN / program).exists():
        out[0] = str(BIN / program)
    return out


def service_env(service: dict[str, Any], **overrides: str) -> dict[str, str]:
    """This process's environment, then the service's, then ``overrides``."""
    env = {**os.environ, **{k: str(v) for k, v in service.get("environment", {}).items()}}
    env.update(overrides)
    return env


def healthcheck(service: dict[str, Any], swap: dict[str, str], env: dict[str, str]) -> bool:
    """Whether the service's own compose health check passes, run here."""
    test = service["healthcheck"]["test"]
    if test[0] == "CMD-SHELL":
        argv = ["bash", "-c", test[1].replace("airflow ", f"{BIN / 'airflow'} ", 1)]
    else:
        argv = native(test[1:], swap)
    done = subprocess.run(
        argv, check=False, capture_output=True, text=True, env=env, cwd=CHECKOUT, timeout=120
    )
    return done.returncode == 0


@contextmanager
def running(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The command in its own process group, stopped with SIGTERM (then SIGKILL) on exit."""
    with log.open("w") as out:
        process = subprocess.Popen(
            argv,
            env=env,
            cwd=CHECKOUT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(10)
