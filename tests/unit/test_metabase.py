"""Metabase provisioning against a local fake of its API, and each card's pipeline on data.

The fake (a threaded ``http.server``) keeps state like Metabase does and answers 400 to
any request whose shape Metabase would refuse; every such refusal is recorded and the
tests assert there were none. The card pipelines run on mongomock, or on the real
server ``MONGO_URI`` names (then ``$$NOW`` is the server's own clock).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
import threading
import urllib.parse
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from dashboards_helpers import run_card, substitute
from helpers import ROOT

from meterflow.clients.mongo import client as mongo_client
from meterflow.core.config import Settings
from meterflow.core.errors import ConfigError
from meterflow.dashboards import cards as dashboards
from meterflow.dashboards import metabase

GRID_COLUMNS = 24
MUTATING = {"POST", "PUT", "DELETE"}
#: Template tag types of the pinned Metabase (lib.schema.template-tag) and what each needs.
TAG_TYPES = {"text", "number", "date", "boolean", "dimension", "snippet", "card"}
RAW_VALUE_TAGS = {"text", "number", "date", "boolean"}


class FakeMetabase:
    """Just enough of Metabase's REST API, with its request shapes checked."""

    def __init__(self, healthy_after: int = 2) -> None:
        self.setup_token = uuid.uuid4().hex
        self.admin: dict[str, Any] | None = None
        self.sessions: set[str] = set()
        self.databases: dict[int, dict[str, Any]] = {}
        self.cards: dict[int, dict[str, Any]] = {}
        self.dashboards: dict[int, dict[str, Any]] = {}
        self.ids = itertools.count(1)
        self.health_calls = 0
        self.healthy_after = healthy_after
        self.calls: list[tuple[str, str]] = []
        self.refused: list[str] = []
        self.lock = threading.Lock()

    # -- helpers ---------------------------------------------------------------------
    def refuse(self, why: str) -> tuple[int, Any]:
        self.refused.append(why)
        return 400, {"message": why}

    def check_card(self, body: dict[str, Any]) -> str | None:
        query = body.get("dataset_query") or {}
        native = query.get("native") or {}
        if not isinstance(body.get("name"), str) or not body["name"]:
            return "card without name"
        if body.get("display") not in {"table", "line", "bar", "scalar", "pie", "area", "row"}:
            return f"bad display {body.get('display')!r}"
        if query.get("type") != "native" or query.get("database") not in self.databases:
            return f"dataset_query not native on a known database: {query}"
        if not isinstance(native.get("collection"), str):
            return "native MongoDB query without collection"
        tags = native.get("template-tags")
        if not isinstance(tags, dict):
            return "native query without a template-tags map"
        for name, tag in tags.items():
            if why := self.check_tag(name, tag):
                return why
        query = native.get("query")
        if not isinstance(query, str):
            return "native query is not text"
        used = set(dashboards.VARIABLE.findall(query))
        if used != set(tags):
            return f"query variables {sorted(used)} are not its template tags {sorted(tags)}"
        if "[[" in query or "]]" in query:
            return "[[ ]] in a native query is an optional clause to Metabase"
        # Run as Metabase does: each text variable spliced in as a string literal.
        values = {name: tag.get("default") or "x" for name, tag in tags.items()}
        try:
            pipeline = json.loads(substitute(query, values))
        except ValueError:
            return "native query is not JSON text once its variables are substituted"
        if not isinstance(pipeline, list) or not all(isinstance(s, dict) for s in pipeline):
            return "native MongoDB query is not a pipeline (JSON array of stages)"
        if not isinstance(body.get("visualization_settings"), dict):
            return "visualization_settings missing"
        return None

    @staticmethod
    def check_tag(name: str, tag: Any) -> str | None:
        """A template tag as Metabase's schema wants it (keyed by its name, a uuid id)."""
        if not isinstance(tag, dict) or tag.get("name") != name:
            return f"template tag {name!r} not keyed by its name"
        if not isinstance(tag.get("display-name"), str) or not tag["display-name"].strip():
            return f"template tag {name!r} without display-name"
        try:
            uuid.UUID(str(tag.get("id")))
        except ValueError:
            return f"template tag {name!r} id is not a uuid: {tag.get('id')!r}"
        if tag.get("type") not in TAG_TYPES:
            return f"template tag {name!r} of unknown type {tag.get('type')!r}"
        if tag["type"] in RAW_VALUE_TAGS and "dimension" in tag:
            return f"template tag {name!r}: dimension only on dimension tags"
        if "required" in tag and not isinstance(tag["required"], bool):
            return f"template tag {name!r}: required is not a boolean"
        if tag["type"] == "text" and not isinstance(tag.get("default", ""), str | None):
            return f"template tag {name!r}: a text default is a string"
        return None

    # -- the API -----------------------------------------------------------------------
    def handle(self, method: str, path: str, headers: Any, body: Any) -> tuple[int, Any]:
        url = urllib.parse.urlsplit(path)
        route, params = url.path.rstrip("/"), urllib.parse.parse_qs(url.query)
        with self.lock:
            self.calls.append((method, route))
            if route == "/api/health":
                self.health_calls += 1
                ready = self.health_calls > self.healthy_after
                return (200, {"status": "ok"}) if ready else (503, {"status": "initializing"})
            if route == "/api/session/properties":
                return 200, {
                    "has-user-setup": self.admin is not None,
                    "setup-token": None if self.admin else self.setup_token,
                }
            if method == "POST" and route == "/api/setup":
                return self.setup(body)
            if method == "POST" and route == "/api/session":
                if self.admin is None or body != {
                    "username": self.admin["email"],
                    "password": self.admin["password"],
                }:
                    return 401, {"errors": {"password": "did not match stored password"}}
                return 200, self.new_session()
            if headers.get(metabase.SESSION_HEADER) not in self.sessions:
                return 401, "Unauthenticated"
            return self.authenticated(method, route, params, body)

    def new_session(self) -> dict[str, str]:
        session = str(uuid.uuid4())
        self.sessions.add(session)
        return {"id": session}

    def setup(self, body: dict[str, Any]) -> tuple[int, Any]:
        if self.admin is not None or body.get("token") != self.setup_token:
            return self.refuse("setup without the valid setup token")
        user = body.get("user") or {}
        wanted = {"email", "password", "first_name", "last_name"}
        if not wanted <= user.keys() or not all(user[k] for k in wanted):
            return self.refuse(f"setup user lacks {wanted - user.keys()}")
        if "site_name" not in (body.get("prefs") or {}):
            return self.refuse("setup prefs lack site_name")
        self.admin = user
        return 200, self.new_session()

    def authenticated(
        self, method: str, route: str, params: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        parts = route.split("/")[2:]
        if route == "/api/database":
            if method == "GET":
                items = list(self.databases.values())
                return 200, {"data": items, "total": len(items)}
            details = body.get("details") or {}
            if body.get("engine") != "mongo":
                return self.refuse(f"engine {body.get('engine')!r}")
            if not {"host", "port", "dbname"} <= details.keys() or not isinstance(
                details["port"], int
            ):
                return self.refuse(f"mongo details incomplete: {sorted(details)}")
            database = {"id": next(self.ids), "name": body["name"], "engine": "mongo"}
            database["details"] = {**details, "pass": "**MetabasePass**"}
            self.databases[database["id"]] = database
            self.stored_details = details
            return 200, database
        if route == "/api/card":
            if method == "GET":
                if params.get("f") != ["all"]:
                    return self.refuse("card list without f=all")
                return 200, list(self.cards.values())
            if why := self.check_card(body):
                return self.refuse(why)
            card = {**body, "id": next(self.ids), "archived": False}
            self.cards[card["id"]] = card
            return 200, card
        if parts[:1] == ["card"] and method == "PUT":
            card_id = int(parts[1])
            if card_id not in self.cards or (why := self.check_card(body)):
                return self.refuse(f"bad card update {card_id}")
            self.cards[card_id].update(body)
            return 200, self.cards[card_id]
        if route == "/api/search":
            query = params.get("q", [""])[0].lower()
            found = [
                {"model": "dashboard", "id": d["id"], "name": d["name"], "archived": False}
                for d in self.dashboards.values()
                if params.get("models") == ["dashboard"] and query in d["name"].lower()
            ]
            return 200, {"data": found, "total": len(found)}
        if route == "/api/dashboard" and method == "POST":
            if not body.get("name"):
                return self.refuse("dashboard without name")
            dashboard = {
                "id": next(self.ids),
                "name": body["name"],
                "dashcards": [],
                "parameters": [],
            }
            self.dashboards[dashboard["id"]] = dashboard
            return 200, dashboard
        if parts[:1] == ["dashboard"] and len(parts) == 2:
            dashboard = self.dashboards.get(int(parts[1]))
            if dashboard is None:
                return 404, "Not found."
            if method == "GET":
                return 200, dashboard
            return self.put_dashcards(dashboard, body)
        return 404, f"no route {method} {route}"

    def put_dashcards(self, dashboard: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any]:
        dashcards = body.get("dashcards")
        if not isinstance(dashcards, list):
            return self.refuse("PUT dashboard without dashcards list")
        filters = body.get("parameters", dashboard["parameters"])
        if why := self.check_filters(filters):
            return self.refuse(why)
        filter_types = {f["id"]: f["type"] for f in filters}
        known = {d["id"] for d in dashboard["dashcards"]}
        placed = []
        for dashcard in dashcards:
            numbers = [dashcard.get(k) for k in ("id", "row", "col", "size_x", "size_y")]
            if not all(isinstance(n, int) for n in numbers):
                return self.refuse(f"dashcard fields not integers: {dashcard}")
            if dashcard["card_id"] not in self.cards:
                return self.refuse(f"dashcard of unknown card {dashcard['card_id']}")
            if dashcard["col"] + dashcard["size_x"] > GRID_COLUMNS:
                return self.refuse("dashcard beyond the 24-column grid")
            if dashcard["id"] > 0 and dashcard["id"] not in known:
                return self.refuse(f"dashcard id {dashcard['id']} unknown (new ones are < 0)")
            for mapping in dashcard.get("parameter_mappings") or []:
                if why := self.check_mapping(mapping, dashcard["card_id"], filter_types):
                    return self.refuse(why)
            new_id = dashcard["id"] if dashcard["id"] > 0 else next(self.ids)
            placed.append({**dashcard, "id": new_id})
        dashboard["dashcards"] = placed
        dashboard["parameters"] = filters
        return 200, dashboard

    @staticmethod
    def check_filters(filters: Any) -> str | None:
        """Dashboard parameters: a list of filters with unique ids and slugs."""
        if not isinstance(filters, list) or not all(isinstance(f, dict) for f in filters):
            return "dashboard parameters are not a list of objects"
        for f in filters:
            if not all(isinstance(f.get(k), str) and f[k] for k in ("id", "name", "slug", "type")):
                return f"dashboard parameter lacks id, name, slug or type: {f}"
            if f.get("required") and f.get("default") in (None, []):
                return f"required dashboard parameter {f['id']} without default"
        for key in ("id", "slug"):
            if len({f[key] for f in filters}) != len(filters):
                return f"dashboard parameters with the same {key}"
        return None

    def check_mapping(self, mapping: Any, card_id: int, filter_types: dict[str, str]) -> str | None:
        """A dashcard's parameter mapping: a dashboard filter into one of its card's tags."""
        if not isinstance(mapping, dict) or mapping.get("card_id") != card_id:
            return f"parameter mapping not of the dashcard's card: {mapping}"
        if mapping.get("parameter_id") not in filter_types:
            return f"parameter mapping to unknown dashboard parameter: {mapping}"
        target = mapping.get("target")
        if not (isinstance(target, list) and len(target) == 2 and target[0] == "variable"):
            return f"parameter mapping target is not a variable: {target}"
        tag_ref = target[1]
        native = self.cards[card_id].get("dataset_query", {}).get("native", {})
        tags = native.get("template-tags") or {}
        if not (isinstance(tag_ref, list) and tag_ref[:1] == ["template-tag"]):
            return f"parameter mapping target is not a template tag: {target}"
        tag = tags.get(tag_ref[1]) if len(tag_ref) == 2 else None
        if tag is None:
            return f"parameter mapping to a tag card {card_id} does not have: {target}"
        if tag["type"] == "text" and not filter_types[mapping["parameter_id"]].startswith(
            ("string/", "category")
        ):
            return f"a text variable fed by a {filter_types[mapping['parameter_id']]} filter"
        return None

    def mutations(self) -> list[tuple[str, str]]:
        return [call for call in self.calls if call[0] in MUTATING]


@pytest.fixture
def fake() -> Iterator[tuple[FakeMetabase, str]]:
    state = FakeMetabase()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            if raw and self.headers.get("Content-Type") != "application/json":
                status, answer = state.refuse("body without Content-Type application/json")
            else:
                status, answer = state.handle(self.command, self.path, self.headers, body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _serve

        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def env_for(url: str, **extra: str) -> dict[str, str]:
    return {
        "METABASE_URL": url,
        "METABASE_ADMIN_EMAIL": "admin@example.org",
        "METABASE_ADMIN_PASSWORD": f"pw-{uuid.uuid4().hex}",
        "MONGO_URI": "mongodb://meterflow:s3cret-test@mongodb:27017/?authSource=admin",
        "MONGO_DB": "iot",
        "METABASE_WAIT_SECONDS": "30",
        **extra,
    }


def metabase_settings(env: dict[str, str]) -> metabase.MetabaseSettings:
    return metabase.MetabaseSettings.from_env(Settings.from_env(env), env)


def provision(env: dict[str, str]) -> dict[str, Any]:
    client = metabase.MetabaseClient(env["METABASE_URL"])
    settings = metabase_settings(env)
    metabase.wait_until_healthy(client, settings.wait_seconds, interval_s=0.05)
    return metabase.provision(settings, client)


def test_fresh_metabase_is_set_up_and_a_second_run_changes_nothing(fake) -> None:
    state, url = fake
    env = env_for(url)
    first = provision(env)

    assert state.refused == []
    assert first["session"] == "setup" and state.admin["email"] == env["METABASE_ADMIN_EMAIL"]
    assert state.stored_details == {
        "host": "mongodb",
        "port": 27017,
        "dbname": "iot",
        "user": "meterflow",
        "pass": "s3cret-test",
        "authdb": "admin",
        "ssl": False,
        "use-srv": False,
        "tunnel-enabled": False,
        "use-conn-uri": False,
    }
    assert first["cards"] == {"created": len(dashboards.CARDS), "updated": 0, "unchanged": 0}
    stored = {card["name"]: card for card in state.cards.values()}
    for card in dashboards.CARDS:
        native = stored[card.name]["dataset_query"]["native"]
        assert native["collection"] == card.collection
        assert native["query"] == card.native_query()
        assert native["template-tags"] == card.template_tags()
        if not card.parameters:
            assert json.loads(native["query"]) == card.pipeline
    (dashboard,) = state.dashboards.values()
    assert dashboard["name"] == "Smart meters"
    assert sorted(d["card_id"] for d in dashboard["dashcards"]) == sorted(state.cards)
    assert first["dashboard_url"] == f"{url}/dashboard/{dashboard['id']}"
    # The hourly profile's meter: a dashboard filter wired to the card's text variable.
    (meter_filter,) = dashboard["parameters"]
    assert meter_filter["type"] == "string/=" and meter_filter["default"] == ["em000001"]
    hourly_id = next(i for i, c in state.cards.items() if c["name"] == HOURLY.name)
    for dashcard in dashboard["dashcards"]:
        wired = [(m["parameter_id"], m["target"]) for m in dashcard["parameter_mappings"]]
        if dashcard["card_id"] == hourly_id:
            assert wired == [(meter_filter["id"], ["variable", ["template-tag", "device_id"]])]
        else:
            assert wired == []

    # Someone adds a question of their own; the provisioner must keep it and change nothing.
    state.cards[500] = {"id": 500, "name": "My own question", "archived": False}
    mine = {"id": 999, "card_id": 500, "row": 30, "col": 0, "size_x": 4, "size_y": 4}
    dashboard["dashcards"].append(mine)
    calls_before = len(state.calls)
    second = provision(env)

    assert state.refused == []
    new_mutations = [c for c in state.calls[calls_before:] if c[0] in MUTATING]
    assert new_mutations == [("POST", "/api/session")], new_mutations
    assert second["session"] == "login" and second["database"] == "found"
    assert second["cards"] == {"created": 0, "updated": 0, "unchanged": len(dashboards.CARDS)}
    assert (second["dashboard"], second["dashcards"]) == ("found", "unchanged")
    assert len(state.dashboards) == 1 and len(state.cards) == len(dashboards.CARDS) + 1
    assert mine in dashboard["dashcards"]


def test_a_changed_card_is_updated_in_place(fake) -> None:
    state, url = fake
    env = env_for(url)
    provision(env)
    name = dashboards.TOP_CONSUMERS_YESTERDAY.name
    card_id, card = next((i, c) for i, c in state.cards.items() if c["name"] == name)
    card["dataset_query"]["native"]["query"] = "[]"  # edited by hand in Metabase
    card["display"] = "bar"

    result = provision(env)

    assert state.refused == []
    assert result["cards"] == {"created": 0, "updated": 1, "unchanged": len(dashboards.CARDS) - 1}
    assert ("PUT", f"/api/card/{card_id}") in state.calls
    stored = state.cards[card_id]
    assert json.loads(stored["dataset_query"]["native"]["query"]) == (
        dashboards.TOP_CONSUMERS_YESTERDAY.pipeline
    )
    assert stored["display"] == "table" and len(state.cards) == len(dashboards.CARDS)


def test_the_hourly_profile_card_sends_its_template_tag(fake) -> None:
    state, url = fake
    provision(env_for(url))
    (card,) = [c for c in state.cards.values() if c["name"] == HOURLY.name]
    native = card["dataset_query"]["native"]

    (tag,) = native["template-tags"].values()
    assert {k: v for k, v in tag.items() if k != "id"} == {
        "name": "device_id",
        "display-name": "Meter",
        "type": "text",
        "required": True,
        "default": "em000001",
    }
    assert uuid.UUID(tag["id"]).version == 5  # stable across runs
    # Metabase splices the value in as a string literal: the placeholder is not quoted.
    assert '"device_id": {{device_id}},' in native["query"]
    assert '"{{device_id}}"' not in native["query"]
    pipeline = json.loads(substitute(native["query"], {"device_id": "wm000042"}))
    assert pipeline[0]["$match"]["device_id"] == "wm000042"


def test_a_changed_template_tag_is_updated_in_place(fake) -> None:
    state, url = fake
    env = env_for(url)
    provision(env)
    card_id, card = next((i, c) for i, c in state.cards.items() if c["name"] == HOURLY.name)
    card["dataset_query"]["native"]["template-tags"]["device_id"]["default"] = "gm000007"
    card["dataset_query"]["native"]["template-tags"]["device_id"]["widget-type"] = "none"

    result = provision(env)

    assert state.refused == []
    assert result["cards"] == {"created": 0, "updated": 1, "unchanged": len(dashboards.CARDS) - 1}
    assert ("PUT", f"/api/card/{card_id}") in state.calls
    tag = state.cards[card_id]["dataset_query"]["native"]["template-tags"]["device_id"]
    assert tag == HOURLY.template_tags()["device_id"]

    # A tag Metabase keeps with keys of its own (same values) is not a change.
    tag["widget-type"] = "none"
    again = provision(env)
    assert again["cards"]["unchanged"] == len(dashboards.CARDS)


def test_the_meter_filter_is_restored_and_other_filters_kept(fake) -> None:
    state, url = fake
    env = env_for(url)
    provision(env)
    (dashboard,) = state.dashboards.values()
    hourly_id = next(i for i, c in state.cards.items() if c["name"] == HOURLY.name)
    (hourly,) = [d for d in dashboard["dashcards"] if d["card_id"] == hourly_id]
    hourly["parameter_mappings"] = []  # unwired by hand
    mine = {"id": "f00d", "name": "Mine", "slug": "mine", "type": "string/="}
    dashboard["parameters"] = [{**dashboard["parameters"][0], "default": ["gm000001"]}, mine]

    result = provision(env)

    assert state.refused == [] and result["dashcards"] == "updated"
    assert dashboard["parameters"] == [mine, DEVICE_FILTER]
    (hourly,) = [d for d in dashboard["dashcards"] if d["card_id"] == hourly_id]
    assert [m["parameter_id"] for m in hourly["parameter_mappings"]] == [DEVICE_FILTER["id"]]
    assert provision(env)["dashcards"] == "unchanged"

    # The filter alone edited (its default meter): restored too.
    dashboard["parameters"][1]["default"] = ["wm000003"]
    assert provision(env)["dashcards"] == "updated"
    assert dashboard["parameters"] == [mine, DEVICE_FILTER] and state.refused == []


def with_tags(body: dict[str, Any], tags: dict[str, Any]) -> dict[str, Any]:
    native = {**body["dataset_query"]["native"], "template-tags": tags}
    return {**body, "dataset_query": {**body["dataset_query"], "native": native}}


def test_the_fake_refuses_what_metabase_would(fake) -> None:
    """The fake's checks of template tags and of the filter wiring are not vacuous."""
    state, url = fake
    provision(env_for(url))
    body = metabase.card_body(HOURLY, next(iter(state.databases)))
    (tag,) = body["dataset_query"]["native"]["template-tags"].values()

    assert state.check_card(body) is None
    assert "are not its template tags" in state.check_card(with_tags(body, {}))
    bad_id = with_tags(body, {"device_id": {**tag, "id": "not-a-uuid"}})
    assert "not a uuid" in state.check_card(bad_id)
    renamed = with_tags(body, {"device_id": {**tag, "name": "meter"}})
    assert "not keyed by its name" in state.check_card(renamed)
    unquoted = {
        **body,
        "dataset_query": {
            **body["dataset_query"],
            "native": {
                **body["dataset_query"]["native"],
                "query": body["dataset_query"]["native"]["query"].replace(
                    "{{device_id}}", "{{ device_id"
                ),
            },
        },
    }
    assert state.check_card(unquoted)

    hourly_id = next(i for i, c in state.cards.items() if c["name"] == HOURLY.name)
    types = {DEVICE_FILTER["id"]: "string/="}
    good = {
        "parameter_id": DEVICE_FILTER["id"],
        "card_id": hourly_id,
        "target": ["variable", ["template-tag", "device_id"]],
    }
    assert state.check_mapping(good, hourly_id, types) is None
    assert "unknown dashboard parameter" in state.check_mapping(
        {**good, "parameter_id": "nope"}, hourly_id, types
    )
    assert "does not have" in state.check_mapping(
        {**good, "target": ["variable", ["template-tag", "meter"]]}, hourly_id, types
    )
    assert "fed by a number/=" in state.check_mapping(
        good, hourly_id, {DEVICE_FILTER["id"]: "number/="}
    )
    assert "without default" in state.check_filters([{**DEVICE_FILTER, "default": None}])


def test_a_card_query_must_declare_its_variables() -> None:
    with pytest.raises(ValueError, match=r"uses the variables \['device_id'\] but declares \[\]"):
        dashboards.Card(
            name="x",
            description="x",
            collection="c",
            pipeline=[{"$match": {"device_id": dashboards.DEVICE_ID.placeholder}}],
            display="table",
        )


def test_wrong_admin_password_is_named(fake) -> None:
    _, url = fake
    provision(env_for(url))
    with pytest.raises(metabase.MetabaseError, match="METABASE_ADMIN_PASSWORD"):
        provision(env_for(url))  # a new random password


def test_unreachable_metabase_times_out_with_the_url() -> None:
    client = metabase.MetabaseClient("http://127.0.0.1:9")
    with pytest.raises(metabase.MetabaseError, match=r"127\.0\.0\.1:9 not healthy after 0.3 s"):
        metabase.wait_until_healthy(client, 0.3, interval_s=0.05)


def test_credentials_have_no_default() -> None:
    with pytest.raises(ConfigError, match="METABASE_ADMIN_PASSWORD"):
        metabase_settings({"METABASE_ADMIN_EMAIL": "a@b.c", "MONGO_URI": "x"})


def test_the_example_password_is_refused() -> None:
    """metabase-init with .env.example's placeholder stops with one line naming it."""
    with pytest.raises(ConfigError, match="METABASE_ADMIN_PASSWORD still holds a CHANGE-ME"):
        metabase_settings(
            {
                "METABASE_ADMIN_EMAIL": "a@b.c",
                "METABASE_ADMIN_PASSWORD": "CHANGE-ME-metabase1",
                "MONGO_URI": "mongodb://m:pw@mongodb:27017/",
            }
        )


def test_provision_metabase_command(fake) -> None:
    state, url = fake
    env = {**os.environ, **env_for(url)}
    run = [sys.executable, "-m", "meterflow.cli", "provision-metabase"]
    done = subprocess.run(run, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (dashboard_id,) = state.dashboards
    assert f"dashboard ready at {url}/dashboard/{dashboard_id}" in done.stdout
    assert state.refused == []

    bad = {**env, "METABASE_ADMIN_PASSWORD": "not-the-one"}
    failed = subprocess.run(run, env=bad, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2
    lines = failed.stderr.strip().splitlines()
    assert lines[-1].startswith("meterflow provision-metabase: login as admin@example.org")
    assert "not-the-one" not in failed.stderr


# -- the card pipelines on data --------------------------------------------------------


@pytest.fixture
def serving_db(mongo_uri: str, mongo_db_name: str) -> Iterator[Any]:
    client = mongo_client(mongo_uri)
    try:
        yield client[mongo_db_name]
    finally:
        client.drop_database(mongo_db_name)


@pytest.fixture
def now() -> datetime:
    """mongomock has no ``$$NOW``: bind it to the test's clock; a real server uses its own."""
    return datetime.now(UTC)


def run(
    db: Any, card: dashboards.Card, now: datetime, values: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    bound = None if os.environ.get("MONGO_URI") else now
    return run_card(db, card, bound, values)


def ms(value: datetime) -> datetime:
    """MongoDB keeps milliseconds: compare at that precision."""
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def same_instant(a: datetime, b: datetime) -> bool:
    return a.astimezone(UTC) == b.astimezone(UTC)


HOURLY = dashboards.METER_HOURLY_PROFILE
DEVICE_FILTER = dashboards.DEVICE_ID.dashboard_filter()
TYPES = ("electricity", "water", "gas")
CODES = ("SENTINEL", "NEGATIVE", "OUT_OF_RANGE", "MISSING_METRIC")


def test_faulty_meters_now(serving_db, now) -> None:
    rng = random.Random(7)
    docs = []
    for i in range(40):
        faulty = rng.random() < 0.4
        since = ms(now - timedelta(minutes=rng.randrange(1, 5000))) if faulty else None
        docs.append(
            {
                "_id": f"m{i:03d}",
                "device_id": f"m{i:03d}",
                "meter_type": rng.choice(TYPES),
                "last_seen": ms(now),
                "last_value": rng.random(),
                "open_fault": rng.choice(CODES) if faulty else None,
                "fault_since": since,
                "consecutive_faults": rng.randrange(1, 9) if faulty else 0,
                "fault_count": rng.randrange(0, 50),
            }
        )
    serving_db.meter_status.insert_many(docs)

    rows = run(serving_db, dashboards.FAULTY_METERS_NOW, now)

    expected = sorted(
        (d for d in docs if d["open_fault"]), key=lambda d: (d["fault_since"], d["device_id"])
    )
    assert [r["device_id"] for r in rows] == [d["device_id"] for d in expected]
    assert [r["open_fault"] for r in rows] == [d["open_fault"] for d in expected]
    assert "_id" not in rows[0] and "fault_count" not in rows[0]


def abnormal_docs(now: datetime) -> list[dict[str, Any]]:
    """Readings over the last 6 days, plus older ones the 7-day card must leave out."""
    rng = random.Random(11)
    docs = []
    for i in range(600):
        age = timedelta(minutes=rng.randrange(10, 6 * 1440))
        if i % 10 == 0:
            age = timedelta(days=8 + rng.random())
        device = f"{rng.choice('ewg')}m{rng.randrange(30):02d}"
        docs.append(
            {
                "_id": f"iot-meter-0-{i}",
                "event_id": f"iot-meter-0-{i}",
                "device_id": device,
                "meter_type": {"e": "electricity", "w": "water", "g": "gas"}[device[0]],
                "timestamp": ms(now - age),
                "fault_code": rng.choice(CODES),
                "reason": "test",
            }
        )
    return docs


def test_abnormal_readings_over_time(serving_db, now) -> None:
    docs = abnormal_docs(now)
    serving_db.abnormal_readings.insert_many(docs)

    rows = run(serving_db, dashboards.ABNORMAL_OVER_TIME, now)

    since = now - timedelta(days=dashboards.RECENT_DAYS)
    expected = Counter(
        (d["timestamp"].replace(minute=0, second=0, microsecond=0), d["fault_code"])
        for d in docs
        if d["timestamp"] >= since
    )
    got = Counter()
    for row in rows:
        got[(row["hour"].astimezone(UTC), row["fault_code"])] += row["readings"]
    assert got == expected
    assert len(rows) == len(expected)  # one row per hour and code
    keys = [(r["hour"], r["fault_code"]) for r in rows]
    assert keys == sorted(keys)


def test_abnormal_readings_per_meter(serving_db, now) -> None:
    docs = abnormal_docs(now)
    serving_db.abnormal_readings.insert_many(docs)

    rows = run(serving_db, dashboards.ABNORMAL_PER_METER, now)

    per_meter: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for d in docs:
        per_meter[d["device_id"]].append(d)
    order = sorted(per_meter, key=lambda device: (-len(per_meter[device]), device))
    assert [r["device_id"] for r in rows] == order[:100]
    for row in rows:
        mine = per_meter[row["device_id"]]
        assert row["abnormal_readings"] == len(mine)
        assert set(row["fault_codes"]) == {d["fault_code"] for d in mine}
        assert same_instant(row["last_fault_at"], max(d["timestamp"] for d in mine))
        assert row["meter_type"] == mine[0]["meter_type"]


def daily_meter_docs(now: datetime) -> list[dict[str, Any]]:
    rng = random.Random(5)
    docs = []
    for days_back in (1, 2, 3):
        day = (now - timedelta(days=days_back)).date()
        date = datetime(day.year, day.month, day.day, tzinfo=UTC)
        for i in range(45):
            meter_type = TYPES[i % 3]
            readings = rng.randrange(60, 97)
            total = round(rng.uniform(1, 500), 3)
            docs.append(
                {
                    "_id": f"{day.isoformat()}|m{i:02d}",
                    "date": date,
                    "day": day.isoformat(),
                    "device_id": f"m{i:02d}",
                    "meter_type": meter_type,
                    "district": f"D{i % 4}",
                    "unit": {"electricity": "kWh", "water": "L", "gas": "m3"}[meter_type],
                    "avg": total / readings,
                    "total": total,
                    "reading_count": readings,
                    "faulty_count": rng.randrange(0, 3),
                    "completeness": readings / 96,
                }
            )
    return docs


def test_top_consumers_yesterday(serving_db, now) -> None:
    docs = daily_meter_docs(now)
    serving_db.daily_meter_averages.insert_many(docs)

    rows = run(serving_db, dashboards.TOP_CONSUMERS_YESTERDAY, now)

    yesterday = (now - timedelta(days=1)).date().isoformat()
    expected = []
    for meter_type in sorted(TYPES):
        of_type = [d for d in docs if d["day"] == yesterday and d["meter_type"] == meter_type]
        of_type.sort(key=lambda d: (-d["total"], d["device_id"]))
        expected += of_type[: dashboards.TOP_PER_TYPE]
    assert [(r["meter_type"], r["device_id"], r["total"]) for r in rows] == [
        (d["meter_type"], d["device_id"], d["total"]) for d in expected
    ]
    assert {r["unit"] for r in rows if r["meter_type"] == "water"} == {"L"}


def test_data_completeness_per_day(serving_db, now) -> None:
    docs = daily_meter_docs(now)
    serving_db.daily_meter_averages.insert_many(docs)

    rows = run(serving_db, dashboards.COMPLETENESS_PER_DAY, now)

    by_date: dict[datetime, list[dict[str, Any]]] = defaultdict(list)
    for d in docs:
        by_date[d["date"]].append(d)
    assert [r["date"].astimezone(UTC) for r in rows] == sorted(by_date)
    for row in rows:
        mine = by_date[row["date"].astimezone(UTC)]
        assert row["completeness"] == pytest.approx(sum(d["completeness"] for d in mine) / 45)
        assert row["meters"] == len(mine)
        assert row["readings"] == sum(d["reading_count"] for d in mine)


def test_daily_average_per_meter_type(serving_db, now) -> None:
    rng = random.Random(3)
    docs = []
    for days_back in range(5, 0, -1):
        day = (now - timedelta(days=days_back)).date()
        for meter_type in TYPES:
            docs.append(
                {
                    "_id": f"{day.isoformat()}|{meter_type}",
                    "date": datetime(day.year, day.month, day.day, tzinfo=UTC),
                    "day": day.isoformat(),
                    "meter_type": meter_type,
                    "avg": rng.uniform(0, 10),
                    "total": rng.uniform(100, 1000),
                    "meter_count": rng.randrange(10, 20),
                    "reading_count": 1000,
                    "faulty_count": 3,
                }
            )
    rng.shuffle(docs)
    serving_db.daily_type_averages.insert_many(docs)

    rows = run(serving_db, dashboards.DAILY_AVERAGE_PER_TYPE, now)

    expected = sorted(docs, key=lambda d: (d["date"], d["meter_type"]))
    assert [(r["date"].astimezone(UTC), r["meter_type"], r["avg"]) for r in rows] == [
        (d["date"], d["meter_type"], d["avg"]) for d in expected
    ]


def test_open_incidents_by_code(serving_db, now) -> None:
    opened = [ms(now - timedelta(hours=h)) for h in range(1, 12)]
    docs = [
        # code, status, origin (None: a document from before incidents had one)
        ("LEAK", "open", "rule", opened[0]),
        ("STUCK", "open", "rule", opened[1]),
        ("STUCK", "open", "rule", opened[2]),
        ("STUCK", "closed", "rule", opened[3]),
        ("NO_DATA", "open", "rule", opened[4]),
        ("NO_DATA", "open", "rule", opened[5]),
        ("NO_DATA", "open", "rule", opened[6]),
        ("SENTINEL", "open", None, opened[7]),
        ("SENTINEL", "open", "reading", opened[8]),
        ("NEGATIVE", "closed", None, opened[9]),
        ("SPIKE", "open", "rule", opened[10]),
    ]
    serving_db.incidents.insert_many(
        {
            "_id": f"i{n}",
            "device_id": f"m{n}",
            "fault_code": code,
            "status": state,
            "opened_at": at,
            **({"origin": origin} if origin else {}),
        }
        for n, (code, state, origin, at) in enumerate(docs)
    )

    rows = run(serving_db, dashboards.OPEN_INCIDENTS_BY_CODE, now)

    assert [(r["severity"], r["fault_code"], r["open"]) for r in rows] == [
        ("critical", "LEAK", 1),
        ("major", "NO_DATA", 3),
        ("major", "STUCK", 2),
        ("minor", "SENTINEL", 2),
        ("minor", "SPIKE", 1),
    ]
    oldest = {r["fault_code"]: r["oldest_opened_at"] for r in rows}
    assert same_instant(oldest["STUCK"], opened[2]) and same_instant(oldest["NO_DATA"], opened[6])
    assert set(rows[0]) == {"fault_code", "severity", "open", "oldest_opened_at"}


def test_silent_meters_now(serving_db, now) -> None:
    since = {f"m{i}": ms(now - timedelta(hours=h)) for i, h in enumerate((5, 30, 2, 30))}
    docs = [
        {"_id": d, "device_id": d, "meter_type": TYPES[i % 3], "open_episodes": {"NO_DATA": at}}
        for i, (d, at) in enumerate(since.items())
    ]
    docs += [
        {"_id": "m8", "device_id": "m8", "meter_type": "gas", "open_episodes": {"STUCK": now}},
        {"_id": "m9", "device_id": "m9", "meter_type": "gas", "open_episodes": {}},
        {"_id": "m10", "device_id": "m10", "meter_type": "water", "open_fault": "SENTINEL"},
    ]
    serving_db.meter_status.insert_many(docs)

    rows = run(serving_db, dashboards.SILENT_METERS_NOW, now)

    assert [r["device_id"] for r in rows] == ["m1", "m3", "m0", "m2"]
    for row in rows:
        assert same_instant(row["since"], since[row["device_id"]])
        assert row["meter_type"] == TYPES[int(row["device_id"][1:]) % 3]
        assert "_id" not in row


def test_monthly_consumption_per_district(serving_db) -> None:
    docs = [
        {
            "_id": f"{month}|{district}|{meter_type}",
            "month": month,
            "district": district,
            "meter_type": meter_type,
            "consumption": 100.0 * index,
            "estimated_share": 0.1,
            "meter_count": 3,
        }
        for index, (month, district, meter_type) in enumerate(
            [
                ("2024-05", "north", "gas"),
                ("2024-06", "south", "water"),
                ("2024-06", "north", "gas"),
            ]
        )
    ]
    serving_db.monthly_district_totals.insert_many(docs)

    rows = run(serving_db, dashboards.MONTHLY_DISTRICT_TOTALS_CARD, datetime.now(UTC))

    assert [(r["month"], r["district"], r["consumption"]) for r in rows] == [
        ("2024-06", "north", 200.0),
        ("2024-06", "south", 100.0),
        ("2024-05", "north", 0.0),
    ]


def test_estimated_share_per_district(serving_db, now) -> None:
    docs = []
    for days_back, share in ((1, 0.5), (2, 0.0), (45, 1.0)):  # 45 days ago: out of the window
        day = (now - timedelta(days=days_back)).date()
        docs.append(
            {
                "_id": f"{day}|north|water",
                "date": datetime(day.year, day.month, day.day, tzinfo=UTC),
                "day": str(day),
                "district": "north",
                "meter_type": "water",
                "consumption": 300.0 if days_back == 1 else 100.0,
                "estimated_share": share,
            }
        )
    serving_db.daily_district_averages.insert_many(docs)

    (row,) = run(serving_db, dashboards.ESTIMATED_SHARE_PER_DISTRICT, now)

    # 150 of the 400 units of the last 30 days were estimated.
    assert (row["district"], row["meter_type"], row["consumption"]) == ("north", "water", 400.0)
    assert row["estimated_share"] == pytest.approx(150 / 400)


def hourly_profile_docs(now: datetime) -> list[dict[str, Any]]:
    """Three meters' profiles of the 10 days up to yesterday (the latest a daily batch
    publishes), in a zone one hour ahead of UTC: 24 hours a day, 25 and 23 on two DST days,
    one hour without a value. The hours run on without a gap; each value tells its meter,
    day and hour apart."""
    docs = []
    oldest = (now - timedelta(days=10)).date()
    for m, device in enumerate(("em000001", "em000002", "wm000001")):
        hour = datetime(oldest.year, oldest.month, oldest.day, tzinfo=UTC) - timedelta(hours=1)
        for days_back in range(10, 0, -1):
            day = (now - timedelta(days=days_back)).date()
            date = datetime(day.year, day.month, day.day, tzinfo=UTC)
            count = {6: 25, 4: 23}.get(days_back, 24)
            starts = [hour + timedelta(hours=h) for h in range(count)]
            hour += timedelta(hours=count)
            hours: list[float | None] = [m * 10_000 + days_back * 100 + h for h in range(count)]
            if days_back == 2:
                hours[5] = None
            docs.append(
                {
                    "_id": f"{day}|{device}",
                    "date": date,
                    "day": str(day),
                    "device_id": device,
                    "hour_starts": starts,
                    "hours": hours,
                }
            )
    return docs


def expected_hours(docs: list[dict[str, Any]], device: str, now: datetime) -> list[tuple]:
    since = now - timedelta(days=dashboards.HOURLY_PROFILE_DAYS)
    points = [
        (start, value)
        for d in docs
        if d["device_id"] == device
        for start, value in zip(d["hour_starts"], d["hours"], strict=True)
        if start >= since
    ]
    return sorted(points, key=lambda point: point[0])


def test_hourly_profile_of_one_meter(serving_db, now) -> None:
    docs = hourly_profile_docs(now)
    serving_db.meter_hourly_profiles.insert_many(docs)

    rows = run(serving_db, HOURLY, now, {"device_id": "em000002"})

    got = [(row["hour"].replace(tzinfo=UTC), row["consumption"]) for row in rows]
    expected = expected_hours(docs, "em000002", now)
    assert got == expected
    # One point per hour from 7 days ago on, the DST days included.
    since = now - timedelta(days=dashboards.HOURLY_PROFILE_DAYS)
    assert since <= got[0][0] < since + timedelta(hours=1)
    assert all(b[0] - a[0] == timedelta(hours=1) for a, b in itertools.pairwise(got))
    assert all(10_000 <= value < 20_000 for _, value in got if value is not None)
    assert (None in [value for _, value in got]) and set(rows[0]) == {"hour", "consumption"}


def test_hourly_profile_defaults_to_the_first_electricity_meter(serving_db, now) -> None:
    docs = hourly_profile_docs(now)
    serving_db.meter_hourly_profiles.insert_many(docs)

    rows = run(serving_db, HOURLY, now)  # no value typed: the tag's default

    assert dashboards.DEVICE_ID.default == "em000001"
    got = [(row["hour"].replace(tzinfo=UTC), row["consumption"]) for row in rows]
    assert got == expected_hours(docs, "em000001", now) and got


def test_hourly_profile_of_an_unknown_or_hostile_meter_is_empty(serving_db, now) -> None:
    serving_db.meter_hourly_profiles.insert_many(hourly_profile_docs(now))

    assert run(serving_db, HOURLY, now, {"device_id": "em999999"}) == []
    # A quote in the value stays inside the string literal Metabase splices in.
    assert run(serving_db, HOURLY, now, {"device_id": 'em000001", "$comment": "x'}) == []


def test_every_card_is_on_the_dashboard_grid() -> None:
    names = [card.name for card in dashboards.CARDS]
    assert len(set(names)) == len(names) == 11
    cells: set[tuple[int, int]] = set()
    for card in dashboards.CARDS:
        row, col, size_x, size_y = card.layout
        assert col + size_x <= GRID_COLUMNS
        mine = {(r, c) for r in range(row, row + size_y) for c in range(col, col + size_x)}
        assert not cells & mine, f"{card.name} overlaps another card"
        cells |= mine
