"""Container health checks without curl: ``python docker/healthcheck.py CHECK [ARG]``.

``http URL`` (an HTTP 2xx from URL), ``kafka`` (KAFKA_BOOTSTRAP_SERVERS answers a
metadata request) or ``mongo`` (MONGO_URI answers a ping). Exit 0 when healthy, 1 with
one line on stderr otherwise: the line ``docker inspect`` shows for an unhealthy service.
The same script runs natively in tests/integration/test_compose_native.py.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 5.0


def check_http(url: str) -> None:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        if not 200 <= response.status < 300:
            raise RuntimeError(f"{url} answered HTTP {response.status}")


def check_kafka() -> None:
    from meterflow.clients.kafka import check_reachable

    check_reachable(os.environ["KAFKA_BOOTSTRAP_SERVERS"], timeout=TIMEOUT_S)


def check_mongo() -> None:
    from meterflow.clients.mongo import ping

    ping(os.environ["MONGO_URI"], timeout=TIMEOUT_S)


def main(argv: list[str]) -> int:
    checks = {"http": 1, "kafka": 0, "mongo": 0}
    if not argv or argv[0] not in checks or len(argv) != 1 + checks[argv[0]]:
        print("usage: healthcheck.py http URL | kafka | mongo", file=sys.stderr)
        return 2
    try:
        if argv[0] == "http":
            check_http(argv[1])
        elif argv[0] == "kafka":
            check_kafka()
        else:
            check_mongo()
    except (OSError, RuntimeError, ValueError, KeyError, urllib.error.URLError) as exc:
        what = argv[1] if argv[0] == "http" else argv[0]
        print(f"unhealthy: {what}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
