"""Running the dashboard's card pipelines in tests, as Metabase would.

``mongomock`` does not know ``$$NOW``: :func:`bind_now` replaces it with a fixed instant
so the rest of a pipeline can be tested there; against a real server a pipeline runs as
Metabase sends it (``now=None``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from meterflow.dashboards.cards import NOW, Card


def bind_now(pipeline: Any, now: datetime) -> Any:
    """A copy of ``pipeline`` with every ``$$NOW`` replaced by ``now`` (for mongomock)."""
    if pipeline == NOW:
        return now
    if isinstance(pipeline, dict):
        return {key: bind_now(value, now) for key, value in pipeline.items()}
    if isinstance(pipeline, list):
        return [bind_now(item, now) for item in pipeline]
    return pipeline


def run_card(db: Any, card: Card, now: datetime | None = None) -> list[dict[str, Any]]:
    """Run ``card``'s pipeline on ``db`` as Metabase would; ``now`` binds ``$$NOW``."""
    pipeline = card.pipeline if now is None else bind_now(card.pipeline, now)
    return list(db[card.collection].aggregate(pipeline))
