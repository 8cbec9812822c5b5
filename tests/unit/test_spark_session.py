"""The Spark conf meterflow's sessions choose for themselves."""

from __future__ import annotations

import pytest

from meterflow.spark.session import FILE_SYSTEM_CHECKPOINTS, checkpoint_conf

MANAGER = "spark.sql.streaming.checkpointFileManagerClass"


@pytest.mark.parametrize(
    ("checkpoint_path", "local"),
    [
        ("/data/checkpoints", True),
        ("data/checkpoints", True),
        ("file:///data/checkpoints", True),
        ("hdfs://namenode:8020/meterflow/checkpoints", False),
        ("s3a://city-lake/checkpoints", False),
    ],
)
def test_only_local_checkpoints_skip_hadoops_file_context(
    checkpoint_path: str, local: bool
) -> None:
    """On local disk the FileSystem manager spares a process per checkpoint file; elsewhere
    Spark's default keeps its atomic renames."""
    manager = checkpoint_conf(checkpoint_path).get(MANAGER)

    assert manager == (FILE_SYSTEM_CHECKPOINTS if local else None)
