"""MongoDB for the serving layer: one client factory and the collection names.

Everything that talks to MongoDB takes its database from :func:`database`, so the CLI, the
Airflow tasks and the tests reach MongoDB one way: ``MONGO_URI``. The code stays thin over
``pymongo``: bulk upserts, indexes, simple aggregations. Tests put an in-process fake behind
a URI scheme of their own through :func:`register_scheme` (tests/mongomock_client.py);
nothing in the package registers one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meterflow.core.config import Settings
from meterflow.core.errors import ConfigError, MeterflowError
from meterflow.core.logs import get_logger

if TYPE_CHECKING:
    from pymongo import MongoClient
    from pymongo.database import Database

log = get_logger(__name__)

#: Collections of the ``iot`` database (docs/serving.md).
ABNORMAL_READINGS = "abnormal_readings"  # _id = event id (topic-generation-partition-offset)
METER_STATUS = "meter_status"  # _id = device_id: last seen, last reading, open fault, episodes
METERS = "meters"  # _id = device_id: the fleet registry
DAILY_METER_AVERAGES = "daily_meter_averages"  # _id = "<date>|<device_id>"
DAILY_TYPE_AVERAGES = "daily_type_averages"  # _id = "<date>|<meter_type>"
DAILY_DISTRICT_AVERAGES = "daily_district_averages"  # _id = "<date>|<district>|<type>"
METER_HOURLY_PROFILES = "meter_hourly_profiles"  # _id = "<date>|<device_id>": 23-25 hours
MONTHLY_METER_TOTALS = "monthly_meter_totals"  # _id = "<YYYY-MM>|<device_id>": month to date
MONTHLY_DISTRICT_TOTALS = "monthly_district_totals"  # _id = "<YYYY-MM>|<district>|<type>"
DAILY_REPORTS = "daily_reports"  # _id = date: what the batch job found for the day
INCIDENTS = "incidents"  # one per run of faulty readings (per meter) or rule episode

_SERVER_SELECTION_MS = 5000

#: Makes the client for a URI of a registered scheme (see :func:`register_scheme`).
ClientFactory = Callable[[str], "MongoClient[dict[str, Any]]"]

#: URI schemes (without ``://``) that something other than pymongo serves. Empty unless a
#: test registered one: production URIs all go to pymongo.
_schemes: dict[str, ClientFactory] = {}


class MongoUnavailableError(MeterflowError):
    """MongoDB cannot be reached (or its URI is unusable)."""


def register_scheme(scheme: str, factory: ClientFactory | None) -> None:
    """Serve ``scheme://`` URIs with ``factory`` instead of pymongo; None removes it.

    The one seam for an in-process fake (the tests' ``mongomock://``), so the package
    itself knows only real URIs and a fake cannot be reached by accident in production.
    """
    if factory is None:
        _schemes.pop(scheme, None)
    else:
        _schemes[scheme] = factory


def _registered(uri: str) -> ClientFactory | None:
    scheme, sep, _ = uri.partition("://")
    return _schemes.get(scheme) if sep else None


def client(uri: str) -> MongoClient[dict[str, Any]]:
    """A ``pymongo.MongoClient`` for ``uri`` (tz-aware), or a registered scheme's client."""
    if not uri:
        raise ConfigError("MONGO_URI is empty: start a local stand-in or point it at a server")
    factory = _registered(uri)
    if factory is not None:
        return factory(uri)
    import pymongo
    from pymongo.errors import ConfigurationError, InvalidURI

    try:
        return pymongo.MongoClient(
            uri, serverSelectionTimeoutMS=_SERVER_SELECTION_MS, tz_aware=True
        )
    except (ConfigurationError, InvalidURI) as exc:
        raise ConfigError(f"MONGO_URI is not usable: {exc}") from None


def database(settings: Settings) -> Database[dict[str, Any]]:
    """The serving-layer database (``MONGO_DB``) of the configured MongoDB."""
    return client(settings.mongo_uri)[settings.mongo_db]


def ping(uri: str, timeout: float = 5.0) -> None:
    """Raise :class:`MongoUnavailableError` (one line, no credentials) unless ``uri`` answers."""
    factory = _registered(uri)
    if factory is not None:  # in-process: asked as it is, no timeout to apply
        factory(uri).admin.command("ping")
        return
    import pymongo
    from pymongo.errors import ConfigurationError, InvalidURI, PyMongoError

    try:
        probe: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            uri, serverSelectionTimeoutMS=int(timeout * 1000)
        )
        with probe:
            probe.admin.command("ping")
    except (ConfigurationError, InvalidURI) as exc:
        raise ConfigError(f"MONGO_URI is not usable: {exc}") from None
    except PyMongoError as exc:
        where = redacted(uri)
        reason = str(exc).split(",")[0].split(" (configured")[0]
        raise MongoUnavailableError(
            f"MongoDB at {where} did not answer within {timeout:g} s ({reason})"
        ) from None


def redacted(uri: str) -> str:
    """The URI without its user and password, for messages and logs."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    hosts = rest.rsplit("@", 1)[-1]
    return f"{scheme}://{hosts.split('/')[0].split('?')[0]}"
