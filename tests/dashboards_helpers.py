"""Running the dashboard's card pipelines in tests, as Metabase would.

Metabase runs a card's native query text: each ``{{variable}}`` replaced by its value
(:func:`substitute`), then parsed. ``mongomock`` does not know ``$$NOW``: :func:`bind_now`
replaces it with a fixed instant so the rest of a pipeline can be tested there; against a
real server a pipeline runs as Metabase sends it (``now=None``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from meterflow.dashboards.cards import NOW, VARIABLE, Card


def bind_now(pipeline: Any, now: datetime) -> Any:
    """A copy of ``pipeline`` with every ``$$NOW`` replaced by ``now`` (for mongomock)."""
    if pipeline == NOW:
        return now
    if isinstance(pipeline, dict):
        return {key: bind_now(value, now) for key, value in pipeline.items()}
    if isinstance(pipeline, list):
        return [bind_now(item, now) for item in pipeline]
    return pipeline


def substitute(query: str, values: Mapping[str, str]) -> str:
    """``query`` with each ``{{name}}`` replaced as Metabase's MongoDB driver does for a text
    variable: the value spliced in as a double-quoted string literal (its ``pr-str``, the
    same as JSON for the strings used here). A variable without a value is an error, as
    Metabase's "missing required parameters"."""

    def value(match: Any) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"missing required parameter {name!r}")
        return json.dumps(values[name], ensure_ascii=False)

    return VARIABLE.sub(value, query)


def card_values(card: Card, values: Mapping[str, str] | None = None) -> dict[str, str]:
    """The value of each of ``card``'s variables: ``values``, else its tag's default."""
    return {p.name: (values or {}).get(p.name, p.default) for p in card.parameters}


def run_card(
    db: Any, card: Card, now: datetime | None = None, values: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Run ``card``'s native query on ``db`` as Metabase would: its text with ``values``
    substituted (else the tags' defaults), parsed; ``now`` binds ``$$NOW``."""
    pipeline = json.loads(substitute(card.native_query(), card_values(card, values)))
    if now is not None:
        pipeline = bind_now(pipeline, now)
    return list(db[card.collection].aggregate(pipeline))
