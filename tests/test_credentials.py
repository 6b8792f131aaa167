"""Credentials really flow from the settings into the Redis and Kafka clients of every component.

Redis: a real redis-server started by the compose file's own command (password from the
environment, AOF on); the request log, the feedback buffer and the registry pointer built from
``Settings`` with the password in ``redis_url`` work, and the same without it (or with a wrong one)
are refused. Kafka: the test broker (0.9) has no SASL/PLAIN, so a fake broker on a loopback port
answers the SASL handshake and records what the client sends: the producer and the consumer built
from ``Settings`` authenticate with the configured user and password before anything else.
"""

from __future__ import annotations

import os
import shlex
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import SecretStr

from loraloop.buffer import BufferError, make_feedback_buffer, make_request_log
from loraloop.registry import make_registry
from loraloop.registry.pointer import RedisPointerStore
from loraloop.schemas import Example, ServedRequest
from loraloop.settings import Settings
from loraloop.transport.kafka import KafkaProducerAdapter, client_config
from tests.infra import InfraMissing, RedisServer, ServerDied, free_port
from tests.test_deploy import COMPOSE_SECRETS, _rendered

PASSWORD = COMPOSE_SECRETS["REDIS_PASSWORD"]


class ComposeRedisServer(RedisServer):
    """redis-server started by deploy/compose.yaml's redis command, on a free loopback port.

    The command (config file with ``requirepass`` written by the shell, AOF flags) is the compose
    file's, with only its temporary config path moved into the work folder and a port, bind
    address and data folder appended.
    """

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        service = _rendered()["services"]["redis"]
        shell, flag, script = service["command"]
        assert (shell, flag) == ("sh", "-c")
        self.script = script.replace("/tmp/redis-auth.conf", str(workdir / "redis-auth.conf")) + " " + shlex.join(
            ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", ""])
        self.env = {k: str(v) for k, v in service["environment"].items()}
        self.password = self.env["REDIS_PASSWORD"]
        self.url = f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if self.running:
            return
        self._spawn(["sh", "-c", self.script], self.env)
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=1)
        try:
            self.wait_until(client.ping, 20, f"password-protected redis on port {self.port}")
        finally:
            client.close()


@pytest.fixture(scope="module")
def secured_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeRedisServer]:
    server = None
    try:
        server = ComposeRedisServer(tmp_path_factory.mktemp("redis-auth"))
        server.start()
    except (InfraMissing, ServerDied, TimeoutError) as e:
        if server is not None:
            server.stop()
        if os.environ.get("LORALOOP_REQUIRE_INFRA") == "1":
            pytest.fail(f"redis-server required but unavailable: {e}", pytrace=False)
        pytest.skip(f"redis-server unavailable: {e}")
    yield server
    server.stop()


def _urls(server: ComposeRedisServer) -> dict[str, str]:
    return {"password": server.url, "none": f"redis://127.0.0.1:{server.port}/0",
            "wrong": f"redis://:not-{server.password}@127.0.0.1:{server.port}/0"}


def _served(request_id: str) -> ServedRequest:
    return ServedRequest(request_id=request_id, text="my card was charged twice", label="billing", score=0.9,
                         adapter_version="v000001")


def _example(event_id: str) -> Example:
    return Example(event_id=event_id, request_id="r1", text="my card was charged twice", kind="label",
                   label="billing", served_label="billing", adapter_version="v000001")


# --- redis ----------------------------------------------------------------------------------------
def test_compose_redis_requires_the_password_and_keeps_an_aof(secured_redis: ComposeRedisServer) -> None:
    import redis

    urls = _urls(secured_redis)
    for which in ("none", "wrong"):
        client = redis.Redis.from_url(urls[which], socket_timeout=2)
        with pytest.raises(redis.AuthenticationError):
            client.set("loraloop:test", b"x")
        client.close()
    client = redis.Redis.from_url(urls["password"], socket_timeout=2)
    try:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync")["appendfsync"] in {"everysec", "always"}
    finally:
        client.close()
    # The compose healthcheck (redis-cli with REDISCLI_AUTH): healthy with the password, not without.
    test = _rendered()["services"]["redis"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    check = test[1].replace("redis-cli", f"redis-cli -p {secured_redis.port}")
    auth = {"REDISCLI_AUTH": secured_redis.env["REDISCLI_AUTH"]}
    base = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
    assert subprocess.run(["sh", "-c", check], env={**base, **auth}, timeout=10).returncode == 0
    assert subprocess.run(["sh", "-c", check], env=base, timeout=10, capture_output=True).returncode != 0


def test_password_is_not_on_the_redis_command_line(secured_redis: ComposeRedisServer) -> None:
    """The compose command writes the password to a config file: `ps` on the host does not show it."""
    pids = subprocess.run(["pgrep", "-g", str(secured_redis.proc.pid)], capture_output=True, text=True).stdout.split()
    assert pids
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert secured_redis.password not in cmdline, cmdline
    conf = Path(secured_redis.workdir / "redis-auth.conf")
    assert oct(conf.stat().st_mode & 0o777) == "0o600"  # umask 077


def test_request_log_and_buffer_built_from_settings_carry_the_password(secured_redis: ComposeRedisServer) -> None:
    urls = _urls(secured_redis)
    settings = Settings(redis_url=urls["password"], redis_prefix="cred-test")
    log = make_request_log(settings)
    log.record([_served("r1")])
    assert log.get("r1").label == "billing"
    buffer = make_feedback_buffer(settings)
    assert buffer.durability().durable  # AOF: the ingester would start
    assert buffer.append_many([_example("e1")]) == ["appended"]
    claim = buffer.claim("learner-1", 10)
    assert [e.event_id for e in claim.examples] == ["e1"]
    buffer.acknowledge(claim)
    for which in ("none", "wrong"):  # a refused password is a configuration error: refused at once, not retried
        refused = Settings(redis_url=urls[which], redis_prefix="cred-test")
        started = time.monotonic()
        with pytest.raises(BufferError, match="(?i)auth|password"):
            make_request_log(refused).record([_served("r2")])
        with pytest.raises(BufferError, match="(?i)auth|password"):
            make_feedback_buffer(refused).append_many([_example("e2")])
        assert time.monotonic() - started < 1.5, which
    assert make_request_log(settings).get("r2") is None  # nothing got through without the password


def test_registry_pointer_built_from_settings_carries_the_password(secured_redis: ComposeRedisServer,
                                                                   tmp_path: Path) -> None:
    import redis

    urls = _urls(secured_redis)
    settings = Settings(redis_url=urls["password"], registry_url=str(tmp_path / "registry"), registry_pointer="redis")
    registry = make_registry(settings)
    assert isinstance(registry.pointer, RedisPointerStore)
    pointer = registry.pointer.update(lambda p: replace(p, sequence=p.sequence + 7, generation=p.generation + 1))
    authed = redis.Redis.from_url(urls["password"])
    try:
        copy = authed.get(registry.pointer.key)
        assert copy is not None and b'"sequence": 7' in copy  # the Redis copy was written with the password
        assert registry.active() == pointer
        authed.delete(registry.pointer.key)
        # Without the password the Redis side is refused; the file stays the truth and readable.
        refused = make_registry(Settings(redis_url=urls["none"], registry_url=str(tmp_path / "registry"),
                                         registry_pointer="redis"))
        with pytest.raises(redis.AuthenticationError):
            refused.pointer.client.ping()
        try:
            refused.pointer.update(lambda p: replace(p, sequence=p.sequence + 1, generation=p.generation + 1))
        except Exception as e:  # refusing the update outright is as good as not writing Redis
            assert "auth" in str(e).lower(), e
        assert authed.get(registry.pointer.key) is None, "an unauthenticated client wrote the pointer copy"
    finally:
        authed.close()


# --- kafka ----------------------------------------------------------------------------------------
def _sasl_settings(bootstrap: str, password: str = "kafka-pw-77c2") -> Settings:
    return Settings(transport="kafka", kafka_bootstrap=bootstrap, kafka_api_version="0.10.0",
                    kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN",
                    kafka_sasl_username="loraloop", kafka_sasl_password=SecretStr(password))


def test_kafka_client_config_carries_the_sasl_settings() -> None:
    config = client_config(_sasl_settings("kafka:9092"))
    assert config["security_protocol"] == "SASL_PLAINTEXT"
    assert (config["sasl_mechanism"], config["sasl_plain_username"], config["sasl_plain_password"]) == \
        ("PLAIN", "loraloop", "kafka-pw-77c2")
    plain = client_config(Settings(transport="kafka"))  # unset options keep kafka-python's defaults
    assert plain["security_protocol"] == "PLAINTEXT" and not any(k.startswith("sasl_") for k in plain)
    assert "kafka-pw-77c2" not in repr(_sasl_settings("kafka:9092"))  # the settings never print it


class FakeSaslBroker:
    """Answers ApiVersions and SaslHandshake v0 (PLAIN) and records the PLAIN token the client sends next.

    That is all a Kafka client does before authentication succeeds (ApiVersions is the one request
    a broker answers unauthenticated), so the recorded tokens are exactly the credentials that would
    reach a real broker. The connection is then closed: an authentication failure, to the client.
    """

    API_VERSIONS, SASL_HANDSHAKE = 18, 17
    # (api key, min, max) of a 0.10.0 broker: what a client expects to find before it goes on.
    APIS = [(0, 0, 2), (1, 0, 2), (2, 0, 0), (3, 0, 1), (8, 0, 2), (9, 0, 1), (10, 0, 0), (11, 0, 0), (12, 0, 0),
            (13, 0, 0), (14, 0, 0), (15, 0, 0), (16, 0, 0), (17, 0, 0), (18, 0, 0)]

    def __init__(self) -> None:
        self.port = free_port()
        self.tokens: list[bytes] = []
        self.before_token: list[int] = []  # api keys of every request a client sent before its token
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    self._session(conn)
                except (OSError, struct.error):
                    pass

    @staticmethod
    def _read(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise OSError("closed")
            data += chunk
        return data

    def _frame(self, conn: socket.socket) -> bytes:
        (size,) = struct.unpack(">i", self._read(conn, 4))
        return self._read(conn, size)

    @staticmethod
    def _reply(conn: socket.socket, correlation: int, body: bytes) -> None:
        payload = struct.pack(">i", correlation) + body
        conn.sendall(struct.pack(">i", len(payload)) + payload)

    def _session(self, conn: socket.socket) -> None:
        while True:
            api_key, _version, correlation = struct.unpack(">hhi", self._frame(conn)[:8])
            self.before_token.append(api_key)
            if api_key == self.API_VERSIONS:
                apis = b"".join(struct.pack(">hhh", *api) for api in self.APIS)
                self._reply(conn, correlation, struct.pack(">hi", 0, len(self.APIS)) + apis)
            elif api_key == self.SASL_HANDSHAKE:
                self._reply(conn, correlation, struct.pack(">hih", 0, 1, 5) + b"PLAIN")  # no error; [PLAIN]
                self.tokens.append(self._frame(conn))
                return
            else:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()


@pytest.fixture()
def sasl_broker() -> Iterator[FakeSaslBroker]:
    broker = FakeSaslBroker()
    yield broker
    broker.close()


def _wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _logins(broker: FakeSaslBroker) -> set[tuple[str, str]]:
    """(user, password) of each PLAIN token: RFC 4616, ``authzid NUL authcid NUL passwd``."""
    return {tuple(token.decode().split("\0")[1:]) for token in broker.tokens}


def test_kafka_producer_and_consumer_authenticate_with_the_settings(sasl_broker: FakeSaslBroker) -> None:
    from kafka import KafkaConsumer

    settings = _sasl_settings(f"127.0.0.1:{sasl_broker.port}")
    producer = KafkaProducerAdapter(settings)
    failed: list[BaseException] = []

    def send() -> None:  # blocks until metadata comes, which it never does: nothing is sent
        try:
            producer.send("loraloop.requests", b"{}")
        except Exception as e:
            failed.append(e)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        assert _wait_for(lambda: _logins(sasl_broker) == {("loraloop", "kafka-pw-77c2")}), sasl_broker.tokens
    finally:
        producer._client().close(timeout=0)
    # The blocked send gives up after the producer's max_block_ms, with a TransportError: not waited for.
    assert not failed or "metadata" in str(failed[0]).lower() or "closed" in str(failed[0]).lower(), failed
    sasl_broker.tokens.clear()
    consumer = KafkaConsumer(group_id="cred-test", enable_auto_commit=False, **client_config(settings))
    try:
        consumer.poll(timeout_ms=100)
        assert _wait_for(lambda: _logins(sasl_broker) == {("loraloop", "kafka-pw-77c2")}), sasl_broker.tokens
    finally:
        consumer.close(autocommit=False)
    # Nothing but the version probe and the handshake is asked of a broker before logging in.
    assert set(sasl_broker.before_token) == {FakeSaslBroker.API_VERSIONS, FakeSaslBroker.SASL_HANDSHAKE}


# --- the feedback endpoint as deployed ------------------------------------------------------------
def _ingester_settings(**overrides: object) -> Settings:
    """The compose ingester's settings (its rendered environment), on the in-memory transport."""
    env = _rendered()["services"]["ingester"]["environment"]
    values = {k[len("LORALOOP_"):].lower(): v for k, v in env.items()}
    values.update(transport="memory", redis_url="", **overrides)
    return Settings(**values)


def _post(port: int, token: str | None) -> int:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        conn.request("POST", "/feedback", body=b'{"event_id": "e1", "request_id": "r1", "kind": "thumbs_up"}',
                     headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def test_the_deployed_endpoint_binds_every_interface_only_with_the_token() -> None:
    from prometheus_client import CollectorRegistry

    from feedback.http import FeedbackServer
    from loraloop.metrics import Metrics
    from loraloop.transport.memory import MemoryBroker, MemoryTransport

    settings = _ingester_settings()
    assert settings.feedback_http_host == "0.0.0.0"
    with pytest.raises(ValueError, match="api_token"):  # the same environment without its token: no endpoint
        FeedbackServer(_ingester_settings(api_token=SecretStr("")), 0, MemoryTransport(MemoryBroker(partitions=1)))
    server = FeedbackServer(settings, 0, MemoryTransport(MemoryBroker(partitions=1)),
                            metrics=Metrics(CollectorRegistry())).start()
    try:
        assert _post(server.port, None) == 401
        assert _post(server.port, "not-" + COMPOSE_SECRETS["LORALOOP_API_TOKEN"]) == 401
        assert _post(server.port, COMPOSE_SECRETS["LORALOOP_API_TOKEN"]) == 202
    finally:
        server.close()


def test_the_kubernetes_secrets_as_shipped_fail_safe(tmp_path: Path, secured_redis: ComposeRedisServer) -> None:
    """secret.yaml ships every value empty: each component built from it stops, none runs unprotected."""
    from feedback.http import FeedbackServer
    from loraloop.registry import RegistryError
    from loraloop.transport.memory import MemoryBroker, MemoryTransport
    from tests.test_deploy import (
        _SECRET_NAME,
        _containers,
        _deployments,
        _expanded,
        _manifests,
        _mounted_files,
        _secrets,
    )

    shipped = {(name, key): value for name, s in _secrets().items() for key, value in s["stringData"].items()}
    assert {v for (_, key), v in shipped.items() if _SECRET_NAME.search(key.upper().replace("-", "_"))} == {""}
    configmap = {d["metadata"]["name"]: d for d in _manifests() if d["kind"] == "ConfigMap"}["loraloop-settings"]
    for name, doc in _deployments().items():
        (container,) = _containers(doc)
        env = {**configmap["data"], **_expanded(container, shipped)}
        for path, ref in _mounted_files(doc).items():  # the Secret's files, as the kubelet would write them
            local = tmp_path / name / Path(path).name
            local.parent.mkdir(exist_ok=True)
            local.write_text(shipped[ref])
            env = {k: (str(local) if v == path else v) for k, v in env.items()}
        env["LORALOOP_REDIS_URL"] = env["LORALOOP_REDIS_URL"].replace("redis-master.redis.svc:6379",
                                                                      f"127.0.0.1:{secured_redis.port}")
        settings = Settings(**{k[len("LORALOOP_"):].lower(): v for k, v in env.items() if k.startswith("LORALOOP_")}
                            | {"registry_url": str(tmp_path / name / "registry"), "transport": "memory"})
        with pytest.raises(RegistryError, match="PEM"):  # an empty key file: no unsigned publishing or loading
            make_registry(settings)
        assert "@" in settings.redis_url and ":@" in settings.redis_url  # an empty password: no AUTH sent ...
        if name == "worker":  # ... which the password-protected Redis refuses (one component is enough: slow)
            with pytest.raises(BufferError, match="(?i)auth"):
                make_request_log(settings).record([_served("r9")])
        if int(env.get("LORALOOP_FEEDBACK_HTTP_PORT", 0)):
            with pytest.raises(ValueError, match="api_token"):
                FeedbackServer(settings, 0, MemoryTransport(MemoryBroker(partitions=1)))
