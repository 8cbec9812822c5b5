"""Publishing batch views to MongoDB: what the loader says before any batch job ran.

MongoDB is mongomock unless MONGO_URI names a server. The loader and checks on views the
real batch job wrote are in tests/integration/test_loader_spark.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from lake_helpers import D1

from meterflow.core.config import Settings
from meterflow.serving.loader import ViewMissingError, publish_day


def test_load_before_the_batch_job_is_a_clear_error(env: dict[str, str], db: Any) -> None:
    with pytest.raises(ViewMissingError, match="run the batch job"):
        publish_day(Settings.from_env(env).views_path, D1, db)
