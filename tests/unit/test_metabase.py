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
from dashboards_helpers import run_card
from helpers import ROOT

from meterflow.clients.mongo import client as mongo_client
from meterflow.core.config import Settings
from meterflow.core.errors import ConfigError
from meterflow.dashboards import cards as dashboards
from meterflow.dashboards import metabase

GRID_COLUMNS = 24
MUTATING = {"POST", "PUT", "DELETE"}


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
        try:
            pipeline = json.loads(native.get("query"))
        except (TypeError, ValueError):
            return "native query is not JSON text"
        if not isinstance(pipeline, list) or not all(isinstance(s, dict) for s in pipeline):
            return "native MongoDB query is not a pipeline (JSON array of stages)"
        if not isinstance(body.get("visualization_settings"), dict):
            return "visualization_settings missing"
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
            dashboard = {"id": next(self.ids), "name": body["name"], "dashcards": []}
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
            new_id = dashcard["id"] if dashcard["id"] > 0 else next(self.ids)
            placed.append({**dashcard, "id": new_id})
        dashboard["dashcards"] = placed
        return 200, dashboard

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
        assert json.loads(native["query"]) == card.pipeline
    (dashboard,) = state.dashboards.values()
    assert dashboard["name"] == "Smart meters"
    assert sorted(d["card_id"] for d in dashboard["dashcards"]) == sorted(state.cards)
    assert first["dashboard_url"] == f"{url}/dashboard/{dashboard['id']}"

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


def run(db: Any, card: dashboards.Card, now: datetime) -> list[dict[str, Any]]:
    bound = None if os.environ.get("MONGO_URI") else now
    return run_card(db, card, bound)


def ms(value: datetime) -> datetime:
    """MongoDB keeps milliseconds: compare at that precision."""
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def same_instant(a: datetime, b: datetime) -> bool:
    return a.astimezone(UTC) == b.astimezone(UTC)


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


def test_every_card_is_on_the_dashboard_grid() -> None:
    names = [card.name for card in dashboards.CARDS]
    assert len(set(names)) == len(names) == 10
    cells: set[tuple[int, int]] = set()
    for card in dashboards.CARDS:
        row, col, size_x, size_y = card.layout
        assert col + size_x <= GRID_COLUMNS
        mine = {(r, c) for r in range(row, row + size_y) for c in range(col, col + size_x)}
        assert not cells & mine, f"{card.name} overlaps another card"
        cells |= mine
