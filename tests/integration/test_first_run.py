"""A new user's first run on real Kafka and Redis, through the installed commands as separate processes.

``loraloop init`` -> ``loraloop adapters publish --from-csv sample.csv --promote`` -> ``loraloop worker`` ->
``loraloop predict`` (and ``--json``, and ``-`` on stdin) names the published version; the same through
``loraloop gateway``'s ``POST /v1/predict``; the status page in a real headless Chromium. Faults: the broker
down (one line, exit 1) and no worker (a timeout naming the request id).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from loraloop.registry import make_registry
from loraloop.settings import Settings
from tests.infra import free_port, http_status

pytestmark = pytest.mark.integration

COMMAND = [sys.executable, "-m", "loraloop.cli"]


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORALOOP_")}
    for name in ("transport", "kafka_bootstrap", "kafka_api_version", "requests_topic", "predictions_topic",
                 "feedback_topic", "dead_letter_topic", "worker_group", "redis_url", "registry_url", "base_model",
                 "label_capacity", "max_tokens", "epochs", "adapter_poll_s", "max_text_bytes"):
        env[f"LORALOOP_{name.upper()}"] = str(getattr(settings, name))
    env.update(LORALOOP_DEVICE="cpu", LORALOOP_TORCH_THREADS="1", LORALOOP_LOG_LEVEL="WARNING", **extra)
    return env


def _run(args: list[str], env: dict[str, str], timeout: float = 300, stdin: str | None = None):
    return subprocess.run([*COMMAND, *args], env=env, capture_output=True, text=True, timeout=timeout, input=stdin)


class Processes:
    def __init__(self, root: Path) -> None:
        self.root, self.procs = root, []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([*COMMAND, *args], env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append((name, proc, log))
        return proc

    def wait_ready(self, name: str, port: int, path: str = "/readyz", timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        proc = next(p for n, p, _ in self.procs if n == name)
        while http_status(f"http://127.0.0.1:{port}{path}") != 200:
            assert proc.poll() is None, f"{name} exited:\n{self.log(name)}"
            assert time.monotonic() < deadline, f"{name} not ready:\n{self.log(name)}"
            time.sleep(0.3)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()[-4000:]

    def stop(self) -> None:
        for _, proc, log in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()


@pytest.fixture()
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.stop()


@pytest.fixture()
def first_run(tmp_path: Path, base_dir: Path, kafka_settings: Callable[..., Settings], redis_url: str):
    """``loraloop init`` then ``adapters publish --from-csv sample.csv --promote`` on real Kafka settings and Redis."""
    settings = kafka_settings(redis_url=redis_url, registry_url=str(tmp_path / "project" / "registry"),
                              base_model=str(base_dir), label_capacity=16, max_tokens=16, epochs=1,
                              adapter_poll_s=0.2, max_text_bytes=300)
    env = _env(settings)
    done = _run(["init", str(tmp_path / "project"), "--per-label", "8"], env)
    assert done.returncode == 0, done.stderr
    sample = tmp_path / "project" / "sample.csv"
    done = _run(["adapters", "publish", "--from-csv", str(sample), "--promote"], env)
    assert done.returncode == 0, done.stdout + done.stderr
    version = make_registry(settings).active().version
    assert version and f"published {version} and promoted it" in done.stdout
    return settings, env, version


def test_publish_worker_predict_and_gateway(first_run, processes: Processes, tmp_path: Path) -> None:
    settings, env, version = first_run
    worker_port, gateway_port, gateway_metrics = free_port(), free_port(), free_port()
    processes.start("worker", ["worker", "--metrics-port", str(worker_port)], env)
    processes.wait_ready("worker", worker_port)

    done = _run(["predict", "I lost my card yesterday", "--timeout", "90"], env)
    assert done.returncode == 0, done.stdout + done.stderr
    label, score, adapter, request = done.stdout.strip().split("\t")
    assert adapter == f"adapter {version}" and request.startswith("request ") and 0 < float(score) <= 1
    assert label in {"lost_card", "check_balance", "transfer_money", "reset_password", "track_order",
                     "refund_request", "cancel_order", "change_address", "report_fraud", "open_account",
                     "card_declined", "exchange_rate"}

    lines = "where is my parcel\n\nplease reset my password\n" + "x" * 400 + "\n"
    done = _run(["predict", "-", "--json", "--timeout", "60"], env, stdin=lines)
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 3, done.stderr  # one refused
    assert [a["status"] for a in answers] == ["answered", "answered", "dead_letter"]
    assert {a.get("adapter_version") for a in answers[:2]} == {version} and answers[2]["reason"] == "oversize_text"

    processes.start("gateway", ["gateway", "--port", str(gateway_port), "--metrics-port", str(gateway_metrics)], env)
    processes.wait_ready("gateway", gateway_port, path="/v1/status")
    reply = httpx.post(f"http://127.0.0.1:{gateway_port}/v1/predict", json={"text": "cancel my order", "timeout": 60},
                       timeout=90)
    assert reply.status_code == 200, reply.text
    assert reply.json()["adapter_version"] == version and reply.json()["status"] == "answered"
    status = httpx.get(f"http://127.0.0.1:{gateway_port}/v1/status", timeout=10).json()
    assert status["active"] == version and isinstance(status["buffer"]["depth"], int)
    # No learner cycle yet (the bootstrap records none): the page says so instead of drawing a curve.
    _status_page_in_chromium(f"http://127.0.0.1:{gateway_port}/", version, tmp_path, curve=False)


def _chromium() -> str | None:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and os.environ.get("LORALOOP_REQUIRE_INFRA") == "1":
        pytest.fail("chromium is required (LORALOOP_REQUIRE_INFRA=1) but not installed: make infra", pytrace=False)
    return path


def _status_page_in_chromium(url: str, version: str, tmp_path: Path, curve: bool = True) -> None:
    """Headless Chromium loads the page: the DOM it built names the version, and the screenshot has the curve."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium not installed (set LORALOOP_REQUIRE_INFRA=1 to require it)")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1000,900", "--hide-scrollbars"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f'<code id="active-version">{version}</code>' in dom.stdout
    assert ('id="learning-curve"' in dom.stdout) == curve
    assert ('id="learning-curve-empty"' in dom.stdout) != curve
    if not curve:
        return
    shot = tmp_path / "status.png"
    done = subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    _assert_curve_drawn(shot)


def _assert_curve_drawn(png: Path) -> None:
    """The candidate-holdout colour of the curve (#1f77b4) covers pixels of the screenshot: the SVG rendered."""
    from PIL import Image

    image = Image.open(png).convert("RGB")
    pixels = image.getdata()
    curve = sum(1 for p in pixels if abs(p[0] - 0x1F) < 12 and abs(p[1] - 0x77) < 12 and abs(p[2] - 0xB4) < 12)
    assert image.size == (1000, 900) and curve > 30, f"{curve} pixels of the curve's colour"


def test_predict_with_the_broker_down_is_one_line_and_exit_1(tmp_path: Path) -> None:
    settings = Settings(transport="kafka", kafka_bootstrap=f"127.0.0.1:{free_port()}", kafka_api_version="0.9",
                        registry_url=str(tmp_path / "registry"))
    started = time.monotonic()
    done = _run(["predict", "hello"], _env(settings), timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("loraloop predict: no broker answers at 127.0.0.1:")
    assert time.monotonic() - started < 60


def test_predict_without_a_worker_times_out_naming_the_request(first_run) -> None:
    settings, env, _version = first_run
    done = _run(["predict", "is anyone there", "--timeout", "3"], env)
    assert done.returncode == 1 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    request_id = line.split("for request ")[1].split()[0]
    assert len(request_id) == 32 and f"within 3 s: is a worker consuming {settings.requests_topic}" in line


def test_gateway_status_page_with_cycles_renders_the_plot(tmp_path: Path, base_dir: Path) -> None:
    """``loraloop status --serve`` on a registry with cycles: the curve is a polyline Chromium draws."""
    settings = Settings(registry_url=str(tmp_path / "registry"), registry_pointer="file", label_capacity=8,
                        base_model=str(base_dir))
    from loraloop.testing import build_constant_adapter

    registry = make_registry(settings)
    version = registry.promote(registry.publish(build_constant_adapter(settings, ["a", "b"], "a", tmp_path / "a")))
    for i, (outcome, holdout) in enumerate([("promoted", 0.6), ("rejected", 0.55), ("promoted", 0.8),
                                            ("promoted", 0.9)]):
        registry.record_cycle({"trigger": "count", "outcome": outcome, "version": version.version,
                               "started_at": 1_700_000_000 + 600 * i, "duration_s": 30.0, "reason": "gate",
                               "candidate": {"holdout": holdout, "reference": holdout - 0.05},
                               "active": {"holdout": holdout - 0.1}})
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORALOOP_")}
    env.update(LORALOOP_REGISTRY_URL=settings.registry_url, LORALOOP_REGISTRY_POINTER="file")
    procs = Processes(tmp_path)
    procs.start("status", ["status", "--serve", "--port", str(port)], env)
    try:
        procs.wait_ready("status", port, path="/v1/status", timeout=60)
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10).text
        assert page.count("<polyline") == 3 and version.version in page
        _status_page_in_chromium(f"http://127.0.0.1:{port}/", version.version, tmp_path)
    finally:
        procs.stop()
