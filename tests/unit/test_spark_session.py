"""The Spark conf meterflow's sessions choose for themselves."""

from __future__ import annotations

import pytest

from meterflow.spark.session import FILE_SYSTEM_CHECKPOINTS, checkpoint_conf
from meterflow.stream.supervisor import STREAM_JAVA_OPTIONS, stream_spark_conf

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
    """On local disk the FileSystem manager spares a process per rename; elsewhere
    Spark's default keeps its atomic renames."""
    manager = checkpoint_conf(checkpoint_path).get(MANAGER)

    assert manager == (FILE_SYSTEM_CHECKPOINTS if local else None)


def test_only_the_running_stream_compiles_with_c1_alone() -> None:
    """The running stream's small batches re-plan every trigger (C1 spares the recompiles);
    a catch-up's few large batches run faster with C2."""
    running = stream_spark_conf("/data/checkpoints")
    catching_up = stream_spark_conf("/data/checkpoints", available_now=True)

    assert running["spark.driver.extraJavaOptions"] == STREAM_JAVA_OPTIONS
    assert "spark.driver.extraJavaOptions" not in catching_up
    assert running[MANAGER] == catching_up[MANAGER] == FILE_SYSTEM_CHECKPOINTS
