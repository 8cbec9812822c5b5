"""Chaos benchmark: the live pipeline under kill -9 and broker stalls loses and doubles nothing.

``python -m bench.chaos``: a local broker behind a stalling relay, the MongoDB stand-in,
``meterflow simulate`` (live, fixed rate), ``meterflow stream`` and ``meterflow sink`` as
separate processes, run for ``--seconds``. At seeded random times the stream's whole
process group (driver, JVM, Python workers) and the sink are killed with SIGKILL and
restarted, and the broker stalls (every byte held) for ``--stall-seconds``. Then the
simulator stops, the stream and the sink catch up and stop, and everything is counted by
identity against the baseline, the readings topic itself read by a plain consumer:

* ``lake_lost``: offsets of the topic with no row in the lake (readings or dead letters);
* ``lake_duplicated``: rows beyond the first for one offset;
* ``mongo_lost``: abnormal readings in the lake whose event is not in ``abnormal_readings``;
* ``incidents_missing`` / ``incidents_not_closed``: the stateful stage runs (as in compose):
  episodes it published on ``iot-abnormal`` with no incident in MongoDB, and cleared ones
  whose incident is not closed.

Target: all of them 0. Results in ``bench/results/chaos.json``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as ds

from bench.common import timed, write_results
from meterflow.clients import kafka
from meterflow.clients.mongo import ABNORMAL_READINGS, INCIDENTS, client
from meterflow.core import lake, messages
from meterflow.core.config import Settings
from meterflow.core.events import event_id
from meterflow.core.ledger import Ledger
from meterflow.local.mongo import LocalMongo
from meterflow.local.service import free_port
from meterflow.local.stall_proxy import ProxiedBroker, StallingProxy
from meterflow.stream.reconcile import reconcile

ROOT = Path(__file__).resolve().parents[1]


class Service:
    """A ``meterflow`` command in its own process group, killable and restartable."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name, self.args, self.env, self.logs = name, args, env, logs
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        out = (self.logs / f"{self.name}-{self.starts}.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meterflow.cli", *self.args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=ROOT,
            start_new_session=True,
        )

    def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 180) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            tail = (self.logs / f"{self.name}-{self.starts}.log").read_text()[-3000:]
            raise SystemExit(f"bench: {self.name} exited with {self.process.returncode}:\n{tail}")


def schedule(seconds: float, kills: int, sink_kills: int, stalls: int, seed: int) -> list:
    """(time, action) pairs at seeded random times, away from the start and the end."""
    rng = random.Random(seed)
    actions = ["kill_stream"] * kills + ["kill_sink"] * sink_kills + ["stall"] * stalls
    times = sorted(rng.uniform(20, max(21, seconds - 25)) for _ in actions)
    rng.shuffle(actions)
    return list(zip(times, actions, strict=True))


def _wait(done, timeout: float, what: str, services: list[Service]) -> float:
    started = time.monotonic()
    while not done():
        for service in services:
            service.check_alive()
        if time.monotonic() - started > timeout:
            raise SystemExit(f"bench: timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(1)
    return time.monotonic() - started


def _ends(settings: Settings, topic: str) -> dict[int, int]:
    consumer = kafka.consumer(settings.bootstrap_servers)
    try:
        found = kafka.partition_ends(consumer, kafka.topic_partitions(consumer, [topic]))
    finally:
        consumer.close()
    return {p: end for (_, p), end in found.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=240)
    parser.add_argument("--meters", type=int, default=300, help="readings per second")
    parser.add_argument("--stream-kills", type=int, default=3)
    parser.add_argument("--sink-kills", type=int, default=3)
    parser.add_argument("--stalls", type=int, default=2)
    parser.add_argument("--stall-seconds", type=float, default=15)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="meterflow-chaos-"))
    logs = workdir / "logs"
    logs.mkdir()
    proxy_port = free_port()
    broker = ProxiedBroker(free_port(), logs / "broker.log")
    broker.proxy_port = proxy_port
    mongo = LocalMongo(free_port(), logs / "mongo.log")
    mongo.data_dir = workdir / "mongo"
    services: list[Service] = []
    try:
        broker.start()
        proxy = StallingProxy(proxy_port, broker.port)
        mongo.start()
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{proxy_port}",
            "METERFLOW_DATA_DIR": str(workdir / "data"),
            "METERFLOW_KAFKA_SOURCE": "python",
            "METERFLOW_KAFKA_PARTITIONS": "4",
            "METERFLOW_TRIGGER_SECONDS": "2",
            "METERFLOW_STREAM_RETRIES": "30",
            "MONGO_URI": mongo.uri,
            "METERFLOW_SINK_FLUSH_SECONDS": "0.5",
            "METERFLOW_LOG_LEVEL": "INFO",
            "METERFLOW_DETECTION": "on",  # as compose runs it: kills hit the detector too
            "PYSPARK_PYTHON": sys.executable,
        }
        settings = Settings.from_env(env)
        kafka.ensure_topics(settings.bootstrap_servers, settings.topics, settings.partitions)
        simulator = Service(
            "simulator",
            [
                "simulate",
                "--mode=live",
                f"--meters={args.meters}",
                "--interval=1s",
                f"--seed={args.seed}",
                "--fault-rate=SENTINEL=0.02",
            ],
            env,
            logs,
        )
        stream = Service("stream", ["stream"], env, logs)
        sink = Service("sink", ["sink"], env, logs)
        services = [simulator, stream, sink]
        for service in services:
            service.start()
        plan = schedule(args.seconds, args.stream_kills, args.sink_kills, args.stalls, args.seed)
        print(f"chaos: {args.seconds:.0f} s, {args.meters} readings/s, plan {plan}")
        began = time.monotonic()
        done: Counter[str] = Counter()
        for at, action in plan:
            while time.monotonic() - began < at:
                for service in services:
                    service.check_alive()
                time.sleep(0.5)
            if action == "stall":
                proxy.flowing.clear()
                time.sleep(args.stall_seconds)
                proxy.flowing.set()
            else:
                target = stream if action == "kill_stream" else sink
                target.kill()
                time.sleep(2)  # a supervisor's restart delay
                target.start()
            done[action] += 1
            print(f"chaos: t={time.monotonic() - began:.0f}s {action}")
        while time.monotonic() - began < args.seconds:
            time.sleep(0.5)
        simulator.stop(signal.SIGINT)
        readings_end = _ends(settings, settings.topic_readings)
        generation = kafka.topic_ids(settings.bootstrap_servers, [settings.topic_readings])
        topic_generation = generation[settings.topic_readings]

        def stream_caught_up() -> bool:
            ends = Ledger.load(settings.lake_path).ends(settings.topic_readings, topic_generation)
            return all(ends.get(p, 0) >= end for p, end in readings_end.items() if end)

        catch_up_s = _wait(stream_caught_up, 600, "the stream to catch up", [stream, sink])
        stream_exit = stream.stop()
        event_ends = {
            t: _ends(settings, t) for t in (settings.topic_abnormal, settings.topic_status)
        }
        sink_catch_up_s = _wait(
            lambda: kafka.group_caught_up(
                settings.bootstrap_servers, settings.sink_group, event_ends
            ),
            300,
            "the sink to catch up",
            [sink],
        )
        sink_exit = sink.stop()

        with timed() as counting:
            produced = kafka.read_to_end(settings.bootstrap_servers, settings.topic_readings, 300)
            produced_ids = {(m.partition(), m.offset()) for m in produced}
            identity: Counter[tuple[str, int, int]] = Counter()
            for part in (
                lake.readings_path(settings.lake_path),
                lake.deadletter_path(settings.lake_path),
            ):
                if not Path(part).exists():
                    continue
                table = ds.dataset(part, format="parquet", partitioning="hive").to_table(
                    columns=["source_generation", "source_partition", "source_offset"]
                )
                identity.update(
                    zip(
                        table["source_generation"].to_pylist(),
                        table["source_partition"].to_pylist(),
                        table["source_offset"].to_pylist(),
                        strict=True,
                    )
                )
            in_lake = {(p, o) for g, p, o in identity if g == topic_generation}
            abnormal = ds.dataset(
                lake.readings_path(settings.lake_path), format="parquet", partitioning="hive"
            ).to_table(
                columns=["source_generation", "source_partition", "source_offset"],
                filter=pc.is_valid(pc.field("fault_code")),
            )
            expected = {
                event_id(settings.topic_readings, g, p, o)
                for g, p, o in zip(
                    abnormal["source_generation"].to_pylist(),
                    abnormal["source_partition"].to_pylist(),
                    abnormal["source_offset"].to_pylist(),
                    strict=True,
                )
            }
            db = client(mongo.uri)[settings.mongo_db]
            stored = {d["_id"] for d in db[ABNORMAL_READINGS].find({}, {"_id": 1})}
            # Every episode the detector published is an incident, closed if it cleared.
            episodes: dict[str, set[str]] = {"open": set(), "clear": set()}
            for message in kafka.read_to_end(
                settings.bootstrap_servers, settings.topic_abnormal, 300
            ):
                event = messages.decode(message.value(), messages.AbnormalEvent)
                if event.episode is not None:
                    episodes[event.episode.action].add(event.episode.id)
            incidents = {d["_id"]: d["status"] for d in db[INCIDENTS].find({"origin": "rule"})}
        report = reconcile(
            settings.lake_path,
            settings.topic_readings,
            settings.bootstrap_servers,
            scan_lake_files=True,
        )
        results = {
            "produced": len(produced_ids),
            "lake_rows": sum(identity.values()),
            "lake_lost": len(produced_ids - in_lake),
            "lake_duplicated": sum(n - 1 for n in identity.values() if n > 1),
            "mongo_expected": len(expected),
            "mongo_events": len(expected & stored),
            "mongo_lost": len(expected - stored),
            "episodes_opened": len(episodes["open"]),
            "episodes_cleared": len(episodes["clear"]),
            "incidents_missing": len((episodes["open"] | episodes["clear"]) - set(incidents)),
            "incidents_not_closed": sum(
                1 for e in episodes["clear"] if incidents.get(e, "closed") != "closed"
            ),
            "kills": done["kill_stream"] + done["kill_sink"],
            "stream_kills": done["kill_stream"],
            "sink_kills": done["kill_sink"],
            "stalls": done["stall"],
            "stall_seconds": args.stall_seconds,
            "seconds": args.seconds,
            "readings_per_s": args.meters,
            "stream_catch_up_after_stop_s": catch_up_s,
            "sink_catch_up_after_stream_s": sink_catch_up_s,
            "stream_exit_code": stream_exit,
            "sink_exit_code": sink_exit,
            "reconciled": report.ok,
            "reconcile_last_line": report.lines[-1] if report.lines else "",
            "counting_seconds": counting["seconds"],
            "schedule": plan,
        }
        results["target_met"] = (
            results["lake_lost"]
            == results["lake_duplicated"]
            == results["mongo_lost"]
            == results["incidents_missing"]
            == results["incidents_not_closed"]
            == 0
        )
    finally:
        for service in services:
            if service.process is not None and service.process.poll() is None:
                service.kill()
        mongo.stop()
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    write_results("chaos", results)
    return 0 if results["target_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
