"""The "Smart meters" dashboard: each card's MongoDB aggregation pipeline, in one place.

Metabase runs a native MongoDB question as a JSON pipeline against one collection, so
every card here is a collection name, a pipeline and how to draw the result. The
provisioner (:mod:`meterflow.dashboards.metabase`) sends them as they are; the tests run the same
pipelines against test data. Field names are the serving layer's agreed document fields.

Time-relative cards use ``$$NOW`` (MongoDB 4.2+, the constant :data:`NOW`) so a dashboard
always shows "yesterday" and "the last 7 days" without being re-provisioned.

A card may take text parameters (:class:`TextParameter`, Metabase "template tags"): its
pipeline holds the placeholder string ``"{{name}}"`` where the value goes, and
:meth:`Card.native_query` writes it bare, ``"device_id": {{device_id}}``, because Metabase
splices a text value in as a quoted string literal.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from meterflow.clients.mongo import (
    ABNORMAL_READINGS,
    DAILY_DISTRICT_AVERAGES,
    DAILY_METER_AVERAGES,
    DAILY_TYPE_AVERAGES,
    INCIDENTS,
    METER_HOURLY_PROFILES,
    METER_STATUS,
    MONTHLY_DISTRICT_TOTALS,
)
from meterflow.core.contract import METER_SPECS, SEVERITY, MeterType
from meterflow.core.timestamps import SECONDS_PER_DAY

DASHBOARD_NAME = "Smart meters"
DASHBOARD_DESCRIPTION = (
    "Faulty meters, abnormal readings and daily consumption from the meterflow serving layer."
)
NOW = "$$NOW"
DAY_MS = SECONDS_PER_DAY * 1000
#: How far back the "over time" card looks (abnormal readings expire after the TTL anyway).
RECENT_DAYS = 7
TOP_PER_TYPE = 10


#: What Metabase reads as a variable in a native query's text.
VARIABLE = re.compile(r"\{\{\s*([A-Za-z0-9_.]+)\s*\}\}")
#: Namespace of the template tags' ids: stable, so a second provisioning changes nothing.
_TAG_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://meterflow/dashboards/template-tags")


@dataclass(frozen=True)
class TextParameter:
    """A required text variable of a native question: a Metabase "text" template tag.

    On the dashboard it is one filter (type ``string/=``) named ``display_name``, wired to
    every card that has a parameter of this ``name``; ``default`` makes the card render
    before anyone types a value.
    """

    name: str
    display_name: str
    default: str

    @property
    def placeholder(self) -> str:
        """What a card's pipeline holds where the value goes (written bare in the query)."""
        return "{{" + self.name + "}}"

    def template_tag(self, card_name: str) -> dict[str, Any]:
        """The tag as ``dataset_query.native["template-tags"][name]`` holds it."""
        return {
            "id": str(uuid.uuid5(_TAG_NAMESPACE, f"{card_name}/{self.name}")),
            "name": self.name,
            "display-name": self.display_name,
            "type": "text",
            "required": True,
            "default": self.default,
        }

    def dashboard_filter(self) -> dict[str, Any]:
        """The dashboard parameter (filter) wired to this variable on every card that has it."""
        return {
            "id": f"meterflow-{self.name}",
            "name": self.display_name,
            "slug": self.name,
            "type": "string/=",
            "sectionId": "string",
            "required": True,
            "default": [self.default],
        }


@dataclass(frozen=True)
class Card:
    """One dashboard card: a native MongoDB question plus its place on the dashboard."""

    name: str
    description: str
    collection: str
    pipeline: list[dict[str, Any]]
    display: str
    visualization_settings: dict[str, Any] = field(default_factory=dict)
    #: Position on Metabase's 24-column grid: (row, col, size_x, size_y).
    layout: tuple[int, int, int, int] = (0, 0, 12, 6)
    #: The question's variables; the pipeline holds each one's ``placeholder``.
    parameters: tuple[TextParameter, ...] = ()

    def __post_init__(self) -> None:
        used = set(VARIABLE.findall(self.native_query()))
        declared = {parameter.name for parameter in self.parameters}
        if used != declared:
            raise ValueError(
                f"card {self.name!r}: its query uses the variables {sorted(used)} "
                f"but declares {sorted(declared)}"
            )

    def native_query(self) -> str:
        """The pipeline as Metabase stores a native MongoDB query: JSON text, with each
        parameter's ``"{{name}}"`` written bare (Metabase substitutes a quoted string)."""
        text = json.dumps(self.pipeline, indent=2)
        for parameter in self.parameters:
            text = text.replace(json.dumps(parameter.placeholder), parameter.placeholder)
        return text

    def template_tags(self) -> dict[str, dict[str, Any]]:
        """``dataset_query.native["template-tags"]``: one tag per parameter, by name."""
        return {p.name: p.template_tag(self.name) for p in self.parameters}


def _hour_of(field_path: str) -> dict[str, Any]:
    """A date truncated to its hour with operators every MongoDB (and mongomock) knows.

    ``$dateTrunc`` needs MongoDB 5; subtracting the minutes, seconds and milliseconds
    works on any version and keeps a real date, so Metabase draws a time axis.
    """
    return {
        "$subtract": [
            field_path,
            {
                "$add": [
                    {"$multiply": [{"$minute": field_path}, 60_000]},
                    {"$multiply": [{"$second": field_path}, 1_000]},
                    {"$millisecond": field_path},
                ]
            },
        ]
    }


FAULTY_METERS_NOW = Card(
    name="Faulty meters now",
    description="Meters whose latest reading is faulty (meter_status.open_fault), oldest first.",
    collection=METER_STATUS,
    pipeline=[
        {"$match": {"open_fault": {"$ne": None}}},
        {"$sort": {"fault_since": 1, "device_id": 1}},
        {
            "$project": {
                "_id": 0,
                "device_id": 1,
                "meter_type": 1,
                "open_fault": 1,
                "fault_since": 1,
                "consecutive_faults": 1,
                "last_seen": 1,
                "last_value": 1,
            }
        },
    ],
    display="table",
    layout=(0, 0, 12, 7),
)

ABNORMAL_OVER_TIME = Card(
    name="Abnormal readings over time by fault code",
    description=f"Abnormal readings per hour and fault code, last {RECENT_DAYS} days.",
    collection=ABNORMAL_READINGS,
    pipeline=[
        {"$match": {"$expr": {"$gte": ["$timestamp", {"$subtract": [NOW, RECENT_DAYS * DAY_MS]}]}}},
        {
            "$group": {
                "_id": {"hour": _hour_of("$timestamp"), "fault_code": "$fault_code"},
                "readings": {"$sum": 1},
            }
        },
        {
            "$project": {
                "_id": 0,
                "hour": "$_id.hour",
                "fault_code": "$_id.fault_code",
                "readings": 1,
            }
        },
        {"$sort": {"hour": 1, "fault_code": 1}},
    ],
    display="line",
    visualization_settings={
        "graph.dimensions": ["hour", "fault_code"],
        "graph.metrics": ["readings"],
    },
    layout=(0, 12, 12, 7),
)

ABNORMAL_PER_METER = Card(
    name="Abnormal readings per meter",
    description="Meters with the most abnormal readings (kept for the TTL), and their fault codes.",
    collection=ABNORMAL_READINGS,
    pipeline=[
        {
            "$group": {
                "_id": "$device_id",
                "meter_type": {"$first": "$meter_type"},
                "abnormal_readings": {"$sum": 1},
                "fault_codes": {"$addToSet": "$fault_code"},
                "last_fault_at": {"$max": "$timestamp"},
            }
        },
        {"$sort": {"abnormal_readings": -1, "_id": 1}},
        {"$limit": 100},
        {
            "$project": {
                "_id": 0,
                "device_id": "$_id",
                "meter_type": 1,
                "abnormal_readings": 1,
                "fault_codes": 1,
                "last_fault_at": 1,
            }
        },
    ],
    display="table",
    layout=(7, 0, 12, 7),
)

DAILY_AVERAGE_PER_TYPE = Card(
    name="Daily average consumption per meter type",
    description="Average consumption per reading, per day and meter type (daily batch job).",
    collection=DAILY_TYPE_AVERAGES,
    pipeline=[
        {"$sort": {"date": 1, "meter_type": 1}},
        {"$project": {"_id": 0, "date": 1, "meter_type": 1, "avg": 1, "meter_count": 1}},
    ],
    display="line",
    visualization_settings={"graph.dimensions": ["date", "meter_type"], "graph.metrics": ["avg"]},
    layout=(7, 12, 12, 7),
)

TOP_CONSUMERS_YESTERDAY = Card(
    name="Top consumers yesterday",
    description=(
        f"The {TOP_PER_TYPE} meters of each type with the largest total consumption yesterday "
        "(UTC); units differ per type, so each type is ranked on its own."
    ),
    collection=DAILY_METER_AVERAGES,
    pipeline=[
        {
            "$match": {
                "$expr": {
                    "$eq": [
                        "$day",
                        {
                            "$dateToString": {
                                "format": "%Y-%m-%d",
                                "date": {"$subtract": [NOW, DAY_MS]},
                            }
                        },
                    ]
                }
            }
        },
        {"$sort": {"meter_type": 1, "total": -1, "device_id": 1}},
        {"$group": {"_id": "$meter_type", "meters": {"$push": "$$ROOT"}}},
        {"$project": {"meters": {"$slice": ["$meters", TOP_PER_TYPE]}}},
        {"$unwind": "$meters"},
        {
            "$project": {
                "_id": 0,
                "meter_type": "$meters.meter_type",
                "device_id": "$meters.device_id",
                "district": "$meters.district",
                "total": "$meters.total",
                "unit": "$meters.unit",
                "avg": "$meters.avg",
            }
        },
        {"$sort": {"meter_type": 1, "total": -1, "device_id": 1}},
    ],
    display="table",
    layout=(14, 0, 12, 8),
)

COMPLETENESS_PER_DAY = Card(
    name="Data completeness per day",
    description="Mean share of expected readings received per meter, per day (1 = complete).",
    collection=DAILY_METER_AVERAGES,
    pipeline=[
        {
            "$group": {
                "_id": "$date",
                "completeness": {"$avg": "$completeness"},
                "meters": {"$sum": 1},
                "readings": {"$sum": "$reading_count"},
            }
        },
        {"$project": {"_id": 0, "date": "$_id", "completeness": 1, "meters": 1, "readings": 1}},
        {"$sort": {"date": 1}},
    ],
    display="bar",
    visualization_settings={"graph.dimensions": ["date"], "graph.metrics": ["completeness"]},
    layout=(14, 12, 12, 8),
)


def _severity_of(code_path: str) -> dict[str, Any]:
    """A fault code's severity from the contract (:data:`SEVERITY`), computed in the
    pipeline so that incidents stored before they carried ``severity`` have one too."""
    return {
        "$switch": {
            "branches": [
                {"case": {"$eq": [code_path, str(code)]}, "then": severity}
                for code, severity in SEVERITY.items()
            ],
            "default": "unknown",
        }
    }


_SEVERITY_RANK = {"critical": 0, "major": 1, "minor": 2}

OPEN_INCIDENTS_BY_CODE = Card(
    name="Open incidents by code",
    description=(
        "Open incidents per fault code, most severe first, with the oldest one's opening: "
        "stateful rules' episodes and meters that keep failing."
    ),
    collection=INCIDENTS,
    pipeline=[
        {"$match": {"status": "open"}},
        {
            "$group": {
                "_id": "$fault_code",
                "open": {"$sum": 1},
                "oldest_opened_at": {"$min": "$opened_at"},
            }
        },
        {"$addFields": {"severity": _severity_of("$_id")}},
        {
            "$addFields": {
                "rank": {
                    "$switch": {
                        "branches": [
                            {"case": {"$eq": ["$severity", name]}, "then": rank}
                            for name, rank in _SEVERITY_RANK.items()
                        ],
                        "default": len(_SEVERITY_RANK),
                    }
                }
            }
        },
        {"$sort": {"rank": 1, "open": -1, "_id": 1}},
        {
            "$project": {
                "_id": 0,
                "fault_code": "$_id",
                "severity": 1,
                "open": 1,
                "oldest_opened_at": 1,
            }
        },
    ],
    display="table",
    layout=(22, 0, 12, 7),
)

SILENT_METERS_NOW = Card(
    name="Silent meters now",
    description=(
        "Meters in a NO_DATA episode (meter_status.open_episodes.NO_DATA), silent longest first."
    ),
    collection=METER_STATUS,
    pipeline=[
        {"$match": {"open_episodes.NO_DATA": {"$exists": True}}},
        {"$sort": {"open_episodes.NO_DATA": 1, "device_id": 1}},
        {
            "$project": {
                "_id": 0,
                "device_id": 1,
                "meter_type": 1,
                "since": "$open_episodes.NO_DATA",
                "last_seen": 1,
            }
        },
    ],
    display="table",
    layout=(22, 12, 12, 7),
)

MONTHLY_DISTRICT_TOTALS_CARD = Card(
    name="Monthly consumption per district",
    description=(
        "Validated consumption per district and meter type, month to date (latest month "
        "first), with the share of it that was estimated."
    ),
    collection=MONTHLY_DISTRICT_TOTALS,
    pipeline=[
        {"$sort": {"month": -1, "district": 1, "meter_type": 1}},
        {
            "$project": {
                "_id": 0,
                "month": 1,
                "district": 1,
                "meter_type": 1,
                "consumption": 1,
                "estimated_share": 1,
                "meter_count": 1,
            }
        },
    ],
    display="table",
    layout=(29, 0, 12, 8),
)

#: How far back the estimated-share card looks.
ESTIMATED_SHARE_DAYS = 30

ESTIMATED_SHARE_PER_DISTRICT = Card(
    name="Estimated share per district",
    description=(
        f"Share of each district's validated consumption over the last {ESTIMATED_SHARE_DAYS} "
        "days that was estimated rather than measured, per meter type (units differ per type)."
    ),
    collection=DAILY_DISTRICT_AVERAGES,
    pipeline=[
        {
            "$match": {
                "$expr": {"$gte": ["$date", {"$subtract": [NOW, ESTIMATED_SHARE_DAYS * DAY_MS]}]}
            }
        },
        {
            "$group": {
                "_id": {"district": "$district", "meter_type": "$meter_type"},
                "consumption": {"$sum": "$consumption"},
                "estimated": {"$sum": {"$multiply": ["$estimated_share", "$consumption"]}},
            }
        },
        {
            "$project": {
                "_id": 0,
                "district": "$_id.district",
                "meter_type": "$_id.meter_type",
                "consumption": 1,
                "estimated_share": {
                    "$cond": [
                        {"$gt": ["$consumption", 0]},
                        {"$divide": ["$estimated", "$consumption"]},
                        0,
                    ]
                },
            }
        },
        {"$sort": {"estimated_share": -1, "district": 1, "meter_type": 1}},
    ],
    display="bar",
    visualization_settings={
        "graph.dimensions": ["district", "meter_type"],
        "graph.metrics": ["estimated_share"],
    },
    layout=(29, 12, 12, 8),
)

#: The meter of the hourly-profile card until someone types another: the simulator's first
#: electricity meter.
DEFAULT_METER = f"{METER_SPECS[MeterType.ELECTRICITY].id_prefix}000001"
DEVICE_ID = TextParameter(name="device_id", display_name="Meter", default=DEFAULT_METER)
#: How far back the hourly-profile card looks.
HOURLY_PROFILE_DAYS = 7
#: A profile document's ``date`` is the UTC midnight of its local day, whose hours lie up to
#: 14 h before and 36 h after it (UTC+14 to UTC-12): pre-select days with this margin.
_PROFILE_MARGIN_DAYS = 2

METER_HOURLY_PROFILE = Card(
    name="Hourly consumption of one meter",
    description=(
        f"Validated consumption per hour of the meter typed in the Meter filter, last "
        f"{HOURLY_PROFILE_DAYS} days (meter_hourly_profiles); an hour without a counted "
        "interval is a gap."
    ),
    collection=METER_HOURLY_PROFILES,
    pipeline=[
        {
            "$match": {
                "device_id": DEVICE_ID.placeholder,
                "$expr": {
                    "$gte": [
                        "$date",
                        {
                            "$subtract": [
                                NOW,
                                (HOURLY_PROFILE_DAYS + _PROFILE_MARGIN_DAYS) * DAY_MS,
                            ]
                        },
                    ]
                },
            }
        },
        {"$unwind": {"path": "$hours", "includeArrayIndex": "hour_index"}},
        {
            "$project": {
                "_id": 0,
                "hour": {"$arrayElemAt": ["$hour_starts", "$hour_index"]},
                "consumption": "$hours",
            }
        },
        {
            "$match": {
                "$expr": {"$gte": ["$hour", {"$subtract": [NOW, HOURLY_PROFILE_DAYS * DAY_MS]}]}
            }
        },
        {"$sort": {"hour": 1}},
    ],
    display="line",
    visualization_settings={"graph.dimensions": ["hour"], "graph.metrics": ["consumption"]},
    layout=(37, 0, 24, 8),
    parameters=(DEVICE_ID,),
)

CARDS: tuple[Card, ...] = (
    FAULTY_METERS_NOW,
    ABNORMAL_OVER_TIME,
    ABNORMAL_PER_METER,
    DAILY_AVERAGE_PER_TYPE,
    TOP_CONSUMERS_YESTERDAY,
    COMPLETENESS_PER_DAY,
    OPEN_INCIDENTS_BY_CODE,
    SILENT_METERS_NOW,
    MONTHLY_DISTRICT_TOTALS_CARD,
    ESTIMATED_SHARE_PER_DISTRICT,
    METER_HOURLY_PROFILE,
)
