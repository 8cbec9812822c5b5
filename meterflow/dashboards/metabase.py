"""Metabase provisioning: first-time setup, the MongoDB database and the dashboard.

``meterflow provision-metabase`` (the compose one-shot ``metabase-init``) calls
:func:`provision`. It waits for Metabase, creates the admin from the environment on a
fresh instance (or logs in on a set-up one), registers the serving-layer MongoDB and
creates the "Smart meters" dashboard from :mod:`meterflow.dashboards.cards`, with one
dashboard filter per card parameter (template tag) wired to the cards that have it.
Everything is found by name first, so a second run changes nothing and a changed card
definition is updated in place. HTTP goes through ``urllib`` so the provisioner needs no
extra package.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from meterflow.core import variables
from meterflow.core.config import Settings
from meterflow.core.errors import ConfigError, MeterflowError
from meterflow.core.logs import get_logger
from meterflow.core.variables import variable
from meterflow.dashboards.cards import CARDS, DASHBOARD_DESCRIPTION, DASHBOARD_NAME, Card

log = get_logger("meterflow.dashboards.metabase")

SESSION_HEADER = "X-Metabase-Session"
MONGO_ENGINE = "mongo"
_LOCAL_URL = "http://localhost:3000"


class MetabaseError(MeterflowError):
    """Metabase is unreachable, refused a request or answered something unexpected."""


@dataclass(frozen=True)
class MetabaseSettings:
    """Where Metabase is, its admin, and the MongoDB that Metabase itself should query.

    Only the ``METABASE_*`` variables are declared here; the serving layer's MongoDB
    (``MONGO_URI``, ``MONGO_DB``) comes from the platform's :class:`Settings`.
    """

    url: str = variable("METABASE_URL", "Metabase that provision-metabase sets up", _LOCAL_URL)
    admin_email: str = variable(
        "METABASE_ADMIN_EMAIL", "Metabase admin created on first start (required)", ""
    )
    admin_password: str = variable(
        "METABASE_ADMIN_PASSWORD", "Password of that admin (required, no default)", "", secret=True
    )
    admin_first_name: str = variable(
        "METABASE_ADMIN_FIRST_NAME", "First name of that admin", "Meterflow"
    )
    admin_last_name: str = variable("METABASE_ADMIN_LAST_NAME", "Last name of that admin", "Admin")
    site_name: str = variable("METABASE_SITE_NAME", "Site name shown by Metabase", "meterflow")
    database_name: str = variable(
        "METABASE_DATABASE_NAME", "Name of the database in Metabase", "meterflow MongoDB"
    )
    mongo_uri: str = variable(
        "METABASE_MONGO_URI",
        "MongoDB as Metabase reaches it (may carry credentials); empty = MONGO_URI",
        "",
        secret=True,
    )
    wait_seconds: float = variable(
        "METABASE_WAIT_SECONDS", "How long provision-metabase waits for Metabase", 600.0, minimum=0
    )
    mongo_db: str = ""

    @classmethod
    def from_env(cls, platform: Settings, env: Mapping[str, str] | None = None) -> MetabaseSettings:
        """The ``METABASE_*`` variables of ``env`` beside the ``platform``'s MongoDB; there are
        no default credentials."""
        read = variables.parse(cls, os.environ if env is None else env)
        missing = [
            name
            for name, value in (
                ("METABASE_ADMIN_EMAIL", read.admin_email),
                ("METABASE_ADMIN_PASSWORD", read.admin_password),
            )
            if not value
        ]
        mongo_uri = read.mongo_uri or platform.mongo_uri
        if not mongo_uri:
            missing.append("METABASE_MONGO_URI (or MONGO_URI)")
        if missing:
            raise ConfigError(f"{', '.join(missing)} must be set to provision Metabase")
        return replace(
            read, url=read.url.rstrip("/"), mongo_uri=mongo_uri, mongo_db=platform.mongo_db
        )


def mongo_details(uri: str, db_name: str) -> dict[str, Any]:
    """Metabase's ``mongo`` engine details for ``uri`` (host, port, user, pass, authdb, ...)."""
    from pymongo.uri_parser import parse_uri

    try:
        parsed = parse_uri(uri, validate=False)
    except Exception as exc:
        raise ConfigError(f"the MongoDB URI for Metabase is not usable: {exc}") from None
    host, port = parsed["nodelist"][0]
    options = {key.lower(): value for key, value in parsed["options"].items()}
    details: dict[str, Any] = {
        "host": host,
        "port": port,
        "dbname": db_name,
        "ssl": bool(options.get("tls") or options.get("ssl")),
        "use-srv": uri.startswith("mongodb+srv://"),
        "tunnel-enabled": False,
        "use-conn-uri": False,
    }
    if parsed.get("username"):
        details["user"] = parsed["username"]
        details["pass"] = parsed["password"] or ""
        details["authdb"] = options.get("authsource") or parsed.get("database") or "admin"
    return details


class MetabaseClient:
    """A thin JSON client over Metabase's REST API (session header once logged in)."""

    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.session: str | None = None

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.session:
            req.add_header(SESSION_HEADER, self.session)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = " ".join(exc.read().decode(errors="replace").split())[:300]
            raise MetabaseError(f"{method} {path} -> HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise MetabaseError(
                f"{method} {path}: Metabase at {self.url} unreachable: {reason}"
            ) from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise MetabaseError(f"{method} {path}: answer is not JSON") from None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body)


def wait_until_healthy(
    client: MetabaseClient,
    timeout_s: float,
    interval_s: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Poll ``/api/health`` until it says ok; Metabase takes a minute or more to migrate."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while True:
        try:
            health = client.get("/api/health")
            if isinstance(health, dict) and health.get("status") == "ok":
                return
            last = f"health is {health!r}"
        except MetabaseError as exc:
            last = str(exc)
        if time.monotonic() >= deadline:
            raise MetabaseError(
                f"Metabase at {client.url} not healthy after {timeout_s:g} s (last: {last})"
            )
        sleep(interval_s)


def _items(answer: Any) -> list[dict[str, Any]]:
    """Metabase lists come bare or wrapped in ``{"data": [...]}`` depending on endpoint."""
    if isinstance(answer, dict):
        answer = answer.get("data", [])
    return [item for item in answer or [] if isinstance(item, dict)]


def log_in(client: MetabaseClient, settings: MetabaseSettings) -> str:
    """Set the instance up with the admin on first start, else log in: ``"setup"|"login"``."""
    properties = client.get("/api/session/properties") or {}
    if not properties.get("has-user-setup") and properties.get("setup-token"):
        answer = client.post(
            "/api/setup",
            {
                "token": properties["setup-token"],
                "user": {
                    "email": settings.admin_email,
                    "password": settings.admin_password,
                    "first_name": settings.admin_first_name,
                    "last_name": settings.admin_last_name,
                    "site_name": settings.site_name,
                },
                "prefs": {
                    "site_name": settings.site_name,
                    "site_locale": "en",
                    "allow_tracking": False,
                },
            },
        )
        how = "setup"
    else:
        try:
            answer = client.post(
                "/api/session",
                {"username": settings.admin_email, "password": settings.admin_password},
            )
        except MetabaseError as exc:
            raise MetabaseError(
                f"login as {settings.admin_email} refused ({exc}); Metabase was set up with "
                "other credentials than METABASE_ADMIN_EMAIL/METABASE_ADMIN_PASSWORD"
            ) from None
        how = "login"
    if not isinstance(answer, dict) or not answer.get("id"):
        raise MetabaseError(f"{how} gave no session id")
    client.session = str(answer["id"])
    return how


def ensure_database(client: MetabaseClient, settings: MetabaseSettings) -> tuple[int, str]:
    """The id of the MongoDB database named ``settings.database_name``, created if missing."""
    for database in _items(client.get("/api/database")):
        if database.get("name") == settings.database_name:
            if database.get("engine") != MONGO_ENGINE:
                raise MetabaseError(
                    f"Metabase database {settings.database_name!r} exists with engine "
                    f"{database.get('engine')!r}, not {MONGO_ENGINE!r}"
                )
            return int(database["id"]), "found"
    created = client.post(
        "/api/database",
        {
            "name": settings.database_name,
            "engine": MONGO_ENGINE,
            "details": mongo_details(settings.mongo_uri, settings.mongo_db),
            "is_full_sync": True,
        },
    )
    return int(created["id"]), "created"


def card_body(card: Card, database_id: int) -> dict[str, Any]:
    """What Metabase stores for ``card``: a native MongoDB question on its collection."""
    return {
        "name": card.name,
        "description": card.description,
        "display": card.display,
        "visualization_settings": card.visualization_settings,
        "dataset_query": {
            "type": "native",
            "database": database_id,
            "native": {
                "query": card.native_query(),
                "collection": card.collection,
                "template-tags": card.template_tags(),
            },
        },
    }


def _native_of(dataset_query: Mapping[str, Any]) -> tuple[Any, Any, Any, Any]:
    """(database, collection, pipeline, template tags) of a stored native query, in legacy
    or stage form; a query with variables is not JSON and stays text."""
    native = dataset_query.get("native") or {}
    if not native and dataset_query.get("stages"):  # newer Metabase (pMBQL) form
        native = dataset_query["stages"][0]
        query = native.get("native")
    else:
        query = native.get("query")
    try:
        pipeline = json.loads(query) if isinstance(query, str) else query
    except ValueError:
        pipeline = query
    tags = native.get("template-tags") or {}
    return dataset_query.get("database"), native.get("collection"), pipeline, tags


def _tags_match(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """The same tag names, each with the values we send (Metabase may add keys of its own)."""
    if not isinstance(existing, Mapping) or set(existing) != set(wanted):
        return False
    return all(
        isinstance(existing[name], Mapping)
        and all(existing[name].get(key) == value for key, value in tag.items())
        for name, tag in wanted.items()
    )


def _card_matches(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    same_fields = all(
        existing.get(key) == wanted[key]
        for key in ("description", "display", "visualization_settings")
    )
    *have, have_tags = _native_of(existing.get("dataset_query") or {})
    *want, want_tags = _native_of(wanted["dataset_query"])
    return same_fields and have == want and _tags_match(have_tags, want_tags)


def ensure_cards(
    client: MetabaseClient, database_id: int, cards: tuple[Card, ...] = CARDS
) -> tuple[dict[str, int], dict[str, int]]:
    """Card ids by name and counts of created/updated/unchanged cards."""
    existing = {
        card["name"]: card
        for card in _items(client.get("/api/card?f=all"))
        if not card.get("archived")
    }
    ids: dict[str, int] = {}
    counts = {"created": 0, "updated": 0, "unchanged": 0}
    for card in cards:
        wanted = card_body(card, database_id)
        found = existing.get(card.name)
        if found is None:
            ids[card.name] = int(client.post("/api/card", wanted)["id"])
            counts["created"] += 1
        elif _card_matches(found, wanted):
            ids[card.name] = int(found["id"])
            counts["unchanged"] += 1
        else:
            client.put(f"/api/card/{found['id']}", wanted)
            ids[card.name] = int(found["id"])
            counts["updated"] += 1
    return ids, counts


def ensure_dashboard(client: MetabaseClient) -> tuple[int, str]:
    """The id of the "Smart meters" dashboard, created if missing."""
    query = urllib.parse.urlencode({"models": "dashboard", "q": DASHBOARD_NAME})
    for item in _items(client.get(f"/api/search?{query}")):
        is_ours = item.get("model") == "dashboard" and item.get("name") == DASHBOARD_NAME
        if is_ours and not item.get("archived"):
            return int(item["id"]), "found"
    created = client.post(
        "/api/dashboard", {"name": DASHBOARD_NAME, "description": DASHBOARD_DESCRIPTION}
    )
    return int(created["id"]), "created"


def _placement(dashcard: Mapping[str, Any]) -> tuple[Any, ...]:
    """Where a dashcard is and which dashboard filters feed which of its variables."""
    mappings = sorted(
        json.dumps([m.get("parameter_id"), m.get("card_id"), m.get("target")])
        for m in dashcard.get("parameter_mappings") or []
        if isinstance(m, Mapping)
    )
    place = tuple(dashcard.get(key) for key in ("card_id", "row", "col", "size_x", "size_y"))
    return (*place, tuple(mappings))


def dashboard_filters(cards: tuple[Card, ...] = CARDS) -> list[dict[str, Any]]:
    """One dashboard filter per distinct card parameter, in card order."""
    filters: dict[str, dict[str, Any]] = {}
    for card in cards:
        for parameter in card.parameters:
            filters.setdefault(parameter.name, parameter.dashboard_filter())
    return list(filters.values())


def parameter_mappings(card: Card, card_id: int) -> list[dict[str, Any]]:
    """A dashcard's wiring: each of ``card``'s variables fed by its dashboard filter."""
    return [
        {
            "parameter_id": parameter.dashboard_filter()["id"],
            "card_id": card_id,
            "target": ["variable", ["template-tag", parameter.name]],
        }
        for parameter in card.parameters
    ]


def _filters_match(current: list[dict[str, Any]], wanted: list[dict[str, Any]]) -> bool:
    by_id = {f.get("id"): f for f in current}
    return len(by_id) == len(wanted) and all(
        all(by_id.get(f["id"], {}).get(key) == value for key, value in f.items()) for f in wanted
    )


def ensure_dashcards(
    client: MetabaseClient,
    dashboard_id: int,
    card_ids: Mapping[str, int],
    cards: tuple[Card, ...] = CARDS,
) -> str:
    """Place every card at its layout and wire the dashboard filters to the cards' variables;
    other cards and filters a person added stay as they are."""
    dashboard = client.get(f"/api/dashboard/{dashboard_id}") or {}
    current = [d for d in dashboard.get("dashcards", []) if isinstance(d, dict)]
    ours_filters = dashboard_filters(cards)
    our_filter_ids = {f["id"] for f in ours_filters}
    current_filters = [p for p in dashboard.get("parameters") or [] if isinstance(p, dict)]
    filters = [p for p in current_filters if p.get("id") not in our_filter_ids] + ours_filters
    ours = {card_ids[card.name] for card in cards}
    by_card = {d.get("card_id"): d for d in current if d.get("card_id") in ours}
    wanted: list[dict[str, Any]] = [
        {key: d.get(key) for key in ("id", "card_id", "row", "col", "size_x", "size_y")}
        | {
            "parameter_mappings": d.get("parameter_mappings", []),
            "visualization_settings": d.get("visualization_settings", {}),
            "series": d.get("series", []),
        }
        for d in current
        if d.get("card_id") not in ours
    ]
    new_id = -1
    for card in cards:
        card_id = card_ids[card.name]
        row, col, size_x, size_y = card.layout
        found = by_card.get(card_id)
        if found is None:
            dashcard_id, new_id = new_id, new_id - 1
        else:
            dashcard_id = found["id"]
        wanted.append(
            {
                "id": dashcard_id,
                "card_id": card_id,
                "row": row,
                "col": col,
                "size_x": size_x,
                "size_y": size_y,
                "parameter_mappings": parameter_mappings(card, card_id),
                "visualization_settings": {},
                "series": [],
            }
        )
    same_cards = sorted(map(_placement, current), key=repr) == sorted(
        map(_placement, wanted), key=repr
    )
    if same_cards and _filters_match(current_filters, filters):
        return "unchanged"
    client.put(f"/api/dashboard/{dashboard_id}", {"dashcards": wanted, "parameters": filters})
    return "updated"


def provision(settings: MetabaseSettings, client: MetabaseClient | None = None) -> dict[str, Any]:
    """Bring Metabase to the wanted state; returns what was done (for the log line)."""
    client = client or MetabaseClient(settings.url)
    wait_until_healthy(client, settings.wait_seconds)
    how = log_in(client, settings)
    database_id, database = ensure_database(client, settings)
    card_ids, cards = ensure_cards(client, database_id)
    dashboard_id, dashboard = ensure_dashboard(client)
    dashcards = ensure_dashcards(client, dashboard_id, card_ids)
    result = {
        "session": how,
        "database": database,
        "database_id": database_id,
        "cards": cards,
        "dashboard": dashboard,
        "dashcards": dashcards,
        "dashboard_url": f"{settings.url}/dashboard/{dashboard_id}",
    }
    log.info(
        "metabase=provisioned session=%s database=%s cards_created=%d cards_updated=%d "
        "cards_unchanged=%d dashboard=%s dashcards=%s url=%s",
        how,
        database,
        cards["created"],
        cards["updated"],
        cards["unchanged"],
        dashboard,
        dashcards,
        result["dashboard_url"],
    )
    return result
