"""Preparing MongoDB for the serving layer: indexes the dashboards need and the registry.

``meterflow init-mongo`` (and the compose init container, and the DAGs through
:func:`load_registry`) call :func:`init_mongo`. Everything here is idempotent: run twice,
the second run changes nothing; a changed TTL updates the existing index in place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from typing import Any

from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import OperationFailure

from meterflow.clients import mongo
from meterflow.core import lake, registry
from meterflow.core.logs import get_logger
from meterflow.core.timestamps import SECONDS_PER_DAY

log = get_logger(__name__)

#: Registry columns copied into ``meters`` (the simulator-only ``scale`` is not).
METER_FIELDS: tuple[str, ...] = (
    "device_id",
    "meter_type",
    "household_id",
    "owner",
    "address",
    "district",
    "city",
    "installed_on",
    "latitude",
    "longitude",
    "interval_seconds",
    "register_digits",
    "register_reset_at",
)
#: Left out of a meter's document when null: a registry that does not know them.
_OMITTED_WHEN_NULL = ("interval_seconds", "register_digits", "register_reset_at")
_REGISTRY_BATCH = 1000


@dataclass(frozen=True)
class IndexSpec:
    """One index: its collection, name, key pattern and options (TTL, unique, partial)."""

    collection: str
    name: str
    keys: tuple[tuple[str, int], ...]
    options: Mapping[str, Any] = field(default_factory=dict)
    #: Seconds a document lives after the keyed date (None: not a TTL index).
    ttl_seconds: int | None = None


def index_specs(abnormal_ttl_days: int) -> list[IndexSpec]:
    """The indexes the dashboards' and jobs' queries need; TTL ones only if the TTL is > 0.

    Abnormal readings expire by ``detected_at`` (when they were stored), not by the
    reading's own time, so a backfill of old days is not deleted on arrival. A closed
    incident expires by ``closed_at``; open ones have no ``closed_at`` and never expire.

    ``one_open_per_device`` keeps one open incident per meter from ``meter_status``
    (stateless faults): those have no ``episode_id``, which the index keys as null. A
    stateful rule's incident carries its own ``episode_id``, so a meter can have several
    of those open beside it. ``open_nodata`` is sparse: only silent meters have the field.
    """
    ttl = abnormal_ttl_days * SECONDS_PER_DAY if abnormal_ttl_days > 0 else None
    specs = [
        IndexSpec(mongo.ABNORMAL_READINGS, "device_time", (("device_id", 1), ("timestamp", -1))),
        IndexSpec(mongo.ABNORMAL_READINGS, "fault_time", (("fault_code", 1), ("timestamp", -1))),
        IndexSpec(mongo.ABNORMAL_READINGS, "time", (("timestamp", -1),)),
        IndexSpec(mongo.METER_STATUS, "open_fault", (("open_fault", 1), ("fault_since", 1))),
        IndexSpec(mongo.METER_STATUS, "last_seen", (("last_seen", -1),)),
        IndexSpec(
            mongo.METER_STATUS,
            "open_nodata",
            (("open_episodes.NO_DATA", 1),),
            {"sparse": True},
        ),
        IndexSpec(mongo.METERS, "district_type", (("district", 1), ("meter_type", 1))),
        IndexSpec(mongo.DAILY_METER_AVERAGES, "date_device", (("date", 1), ("device_id", 1))),
        IndexSpec(mongo.DAILY_METER_AVERAGES, "device_date", (("device_id", 1), ("date", -1))),
        IndexSpec(mongo.DAILY_TYPE_AVERAGES, "date_type", (("date", 1), ("meter_type", 1))),
        IndexSpec(
            mongo.DAILY_DISTRICT_AVERAGES,
            "date_district_type",
            (("date", 1), ("district", 1), ("meter_type", 1)),
        ),
        IndexSpec(mongo.METER_HOURLY_PROFILES, "device_date", (("device_id", 1), ("date", -1))),
        IndexSpec(mongo.DAILY_REPORTS, "date", (("date", 1),)),
        *(
            IndexSpec(collection, "month", (("month", 1),))
            for collection in (mongo.MONTHLY_METER_TOTALS, mongo.MONTHLY_DISTRICT_TOTALS)
        ),
        # The loader replaces, and the checks count, a day's documents by ``day``.
        *(
            IndexSpec(collection, "day", (("day", 1),))
            for collection in (
                mongo.DAILY_METER_AVERAGES,
                mongo.DAILY_TYPE_AVERAGES,
                mongo.DAILY_DISTRICT_AVERAGES,
                mongo.METER_HOURLY_PROFILES,
            )
        ),
        IndexSpec(mongo.INCIDENTS, "device_status", (("device_id", 1), ("status", 1))),
        IndexSpec(mongo.INCIDENTS, "status_opened", (("status", 1), ("opened_at", -1))),
        IndexSpec(mongo.INCIDENTS, "status_code", (("status", 1), ("fault_code", 1))),
        IndexSpec(
            mongo.INCIDENTS,
            "one_open_per_device",
            (("device_id", 1), ("episode_id", 1)),
            {"unique": True, "partialFilterExpression": {"status": "open"}},
        ),
    ]
    if ttl is not None:
        specs += [
            IndexSpec(mongo.ABNORMAL_READINGS, "ttl_detected_at", (("detected_at", 1),), {}, ttl),
            IndexSpec(mongo.INCIDENTS, "ttl_closed_at", (("closed_at", 1),), {}, ttl),
        ]
    return specs


#: Names of the TTL indexes, so that a TTL of 0 drops them.
TTL_INDEXES: tuple[tuple[str, str], ...] = (
    (mongo.ABNORMAL_READINGS, "ttl_detected_at"),
    (mongo.INCIDENTS, "ttl_closed_at"),
)


def _key_of(info: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    return tuple((name, int(direction)) for name, direction in info["key"])


def _matches(info: Mapping[str, Any], spec: IndexSpec) -> bool:
    """Whether an existing index (``index_information`` entry) is the one ``spec`` wants."""
    return (
        _key_of(info) == spec.keys
        and bool(info.get("unique", False)) == bool(spec.options.get("unique", False))
        and bool(info.get("sparse", False)) == bool(spec.options.get("sparse", False))
        and info.get("partialFilterExpression") == spec.options.get("partialFilterExpression")
        and info.get("expireAfterSeconds") == spec.ttl_seconds
    )


def _create(collection: Collection[dict[str, Any]], spec: IndexSpec) -> str:
    options = dict(spec.options)
    if spec.ttl_seconds is not None:
        options["expireAfterSeconds"] = spec.ttl_seconds
    collection.create_index(list(spec.keys), name=spec.name, **options)
    if "partialFilterExpression" in options:
        # A server without partial indexes (the nx-27017 stand-in) makes the index
        # unique over *all* documents, which would forbid a second closed incident.
        created = [
            (name, info)
            for name, info in collection.index_information().items()
            if _key_of(info) == spec.keys
        ]
        if not any(info.get("partialFilterExpression") for _, info in created):
            for name, _ in created:
                collection.drop_index(name)
            log.warning(
                "index=%s.%s action=unsupported reason=server-ignores-partial-indexes",
                collection.name,
                spec.name,
            )
            return "unsupported"
    return "created"


def _set_ttl(
    db: Database[dict[str, Any]], collection: Collection[dict[str, Any]], spec: IndexSpec
) -> str:
    """Change an index's TTL in place (collMod); servers without collMod get a rebuild."""
    try:
        db.command(
            {
                "collMod": collection.name,
                "index": {"name": spec.name, "expireAfterSeconds": spec.ttl_seconds},
            }
        )
        if (
            collection.index_information().get(spec.name, {}).get("expireAfterSeconds")
            == spec.ttl_seconds
        ):
            return "ttl-updated"
    except (NotImplementedError, OperationFailure):
        pass  # mongomock and the stand-in lack collMod
    collection.drop_index(spec.name)
    _create(collection, spec)
    return "ttl-rebuilt"


def ensure_indexes(db: Database[dict[str, Any]], abnormal_ttl_days: int) -> dict[str, str]:
    """Create or fix every index of :func:`index_specs`; return ``{coll.name: action}``.

    Actions: ``unchanged``, ``created``, ``ttl-updated`` (collMod), ``ttl-rebuilt``,
    ``recreated`` (other options changed), ``dropped`` (TTL set to 0), ``unsupported``.
    """
    report: dict[str, str] = {}
    specs = index_specs(abnormal_ttl_days)
    wanted = {(s.collection, s.name) for s in specs}
    for collection_name, name in TTL_INDEXES:
        collection = db[collection_name]
        if (collection_name, name) not in wanted and name in collection.index_information():
            collection.drop_index(name)
            report[f"{collection_name}.{name}"] = "dropped"
    for spec in specs:
        collection = db[spec.collection]
        existing = collection.index_information()
        info = existing.get(spec.name)
        if info is None:
            # The same keys under another name would make create_index fail: replace it.
            for other, other_info in existing.items():
                if other != "_id_" and _key_of(other_info) == spec.keys:
                    collection.drop_index(other)
            action = _create(collection, spec)
        elif _matches(info, spec):
            action = "unchanged"
        elif _key_of(info) == spec.keys and spec.ttl_seconds and info.get("expireAfterSeconds"):
            action = _set_ttl(db, collection, spec)
        else:
            collection.drop_index(spec.name)
            _create(collection, spec)
            action = "recreated"
        report[f"{spec.collection}.{spec.name}"] = action
    return report


@dataclass(frozen=True)
class RegistryLoad:
    """What :func:`load_registry` did."""

    path: str
    meters: int
    new: int
    updated: int
    #: Meters of ``meters`` the registry no longer has.
    removed: int = 0


def _meter_document(row: Mapping[str, Any]) -> dict[str, Any]:
    document = {name: row[name] for name in METER_FIELDS if name in row}
    installed = document.get("installed_on")
    if isinstance(installed, date) and not isinstance(installed, datetime):
        document["installed_on"] = datetime.combine(installed, time(), UTC)
    for name in _OMITTED_WHEN_NULL:
        if document.get(name) is None:
            document.pop(name, None)
    document["_id"] = document["device_id"]
    return document


def read_meter_documents(path: str) -> list[dict[str, Any]]:
    """The registry Parquet at ``path`` (file or directory, local or URI) as documents.

    Read with :func:`meterflow.core.registry.read` rather than the simulator's reader, so
    that columns the simulator's ``Meter`` does not model (``interval_seconds``) reach
    MongoDB too.
    """
    return [_meter_document(row) for row in registry.read(path).to_pylist()]


def registry_exists(path: str) -> bool:
    return registry.exists(path)


def load_registry(db: Database[dict[str, Any]], path: str) -> RegistryLoad:
    """Make ``meters`` the registry at ``path``: one document per meter (``_id`` =
    device_id), replaced as a whole, and meters the registry no longer has removed.

    The registry is the source of truth, and a new one (``meterflow registry import``, a
    simulator's fleet) replaces the old: a meter dropped from it leaves ``meters`` too. Its
    readings, events and incidents stay where they are.
    """
    from pymongo import ReplaceOne

    documents = read_meter_documents(path)
    collection = db[mongo.METERS]
    new = updated = removed = 0
    for start in range(0, len(documents), _REGISTRY_BATCH):
        chunk = documents[start : start + _REGISTRY_BATCH]
        result = collection.bulk_write(
            [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in chunk], ordered=False
        )
        new += len(result.upserted_ids or {})
        updated += result.modified_count
    # Ids in chunks: a fleet's worth of them in one $nin would pass a document's 16 MB.
    kept = {d["_id"] for d in documents}
    gone = [d["_id"] for d in collection.find({}, {"_id": 1}) if d["_id"] not in kept]
    for start in range(0, len(gone), _REGISTRY_BATCH):
        chunk = gone[start : start + _REGISTRY_BATCH]
        removed += collection.delete_many({"_id": {"$in": chunk}}).deleted_count
    load = RegistryLoad(lake.registry_parquet(path), len(documents), new, updated, removed)
    log.info(
        "registry=%s meters=%d new=%d updated=%d removed=%d",
        load.path,
        load.meters,
        new,
        updated,
        removed,
    )
    return load


@dataclass(frozen=True)
class InitReport:
    indexes: dict[str, str]
    registry: RegistryLoad | None


def init_mongo(
    db: Database[dict[str, Any]], abnormal_ttl_days: int, registry: str, required: bool = False
) -> InitReport:
    """Indexes, then the registry at ``registry`` if its file exists.

    A registry the user named (``required``) that does not exist is an error; the lake's
    default one may be missing (no simulator has run yet).
    """
    indexes = ensure_indexes(db, abnormal_ttl_days)
    changed = {k: v for k, v in indexes.items() if v != "unchanged"}
    log.info(
        "indexes=%d changed=%s", len(indexes), ",".join(f"{k}:{v}" for k, v in changed.items())
    )
    if not registry_exists(registry):
        if required:
            raise FileNotFoundError(f"no registry at {lake.registry_parquet(registry)}")
        log.info("registry=%s status=absent", lake.registry_parquet(registry))
        return InitReport(indexes, None)
    return InitReport(indexes, load_registry(db, registry))


def summary_lines(report: InitReport) -> Sequence[str]:
    """What ``meterflow init-mongo`` prints."""
    counts: dict[str, int] = {}
    for action in report.indexes.values():
        counts[action] = counts.get(action, 0) + 1
    lines = [f"indexes: {', '.join(f'{n} {a}' for a, n in sorted(counts.items()))}"]
    for name, action in report.indexes.items():
        if action != "unchanged":
            lines.append(f"  {name}: {action}")
    if report.registry is None:
        lines.append("registry: none found (the simulator writes one); meters not loaded")
    else:
        r = report.registry
        lines.append(
            f"registry: {r.meters} meters from {r.path} ({r.new} new, {r.updated} updated, "
            f"{r.removed} removed)"
        )
    return lines
