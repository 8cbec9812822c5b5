"""What the stream's two queries run per micro-batch (``foreachBatch``), and how it fails.

Spark re-raises a failed ``foreachBatch`` as a text; the supervisor reads the Python
exception itself from :attr:`ForeachBatch.failure` once the query ended
(:mod:`meterflow.stream.failures`). A batch that fails once the supervisor began stopping
its query was cut short by the stop (Spark cancels the query's running job): nothing of it
committed, the next start redoes it, and it is no failure to report.
"""

from __future__ import annotations

from collections import Counter

from pyspark.sql import DataFrame

from meterflow.core.logs import get_logger

log = get_logger(__name__)


class ForeachBatch:
    """A query's ``foreachBatch`` function: :meth:`process` one micro-batch, keep its failure."""

    def __init__(self) -> None:
        self.totals: Counter[str] = Counter()
        self.batches = 0
        self.failure: BaseException | None = None
        #: Set by the supervisor before it stops the query.
        self.stopping = False

    def __call__(self, frame: DataFrame, batch_id: int) -> None:
        try:
            self.process(frame, batch_id)
        except BaseException as exc:
            if not self.stopping:
                self.failure = exc
            else:
                log.info(
                    "batch=%d function=%s status=cut-short-by-stop (redone at the next start)",
                    batch_id,
                    type(self).__name__,
                )
            raise

    def process(self, frame: DataFrame, batch_id: int) -> None:
        raise NotImplementedError
