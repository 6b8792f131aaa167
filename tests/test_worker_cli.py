"""``loraloop worker``: every setting is a flag; probes; graceful stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from loraloop.cli import build_parser
from loraloop.settings import Settings
from loraloop.testing import save_tiny_base_model
from tests.infra import free_port, http_status


def test_help_lists_every_setting() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["worker"]
    text = sub.format_help()
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in text, name
    assert "--metrics-port" in text and "--max-batch" in text




def test_probes_and_graceful_sigterm(tmp_path: Path) -> None:
    base = save_tiny_base_model(tmp_path / "base")
    port = free_port()
    env = {**os.environ, "LORALOOP_TORCH_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraloop.cli", "worker", "--base-model", str(base), "--registry-url",
         str(tmp_path / "registry"), "--metrics-port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            health = http_status(f"http://127.0.0.1:{port}/healthz")
            if health == 200:
                break
            time.sleep(0.2)
        assert health == 200, proc.stdout.read() if proc.poll() is not None else "no /healthz"
        assert http_status(f"http://127.0.0.1:{port}/readyz") == 503  # no adapter promoted: not ready
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            body = r.read().decode()
        assert 'loraloop_build_info{role="worker"' in body
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "SIGTERM received" in output and "worker stopped" in output
