"""Expected failures of one-shot commands: one line a person can act on, a non-zero exit, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def _loraloop(*args: str, timeout: float = 90) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORALOOP_")}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "loraloop.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    return done, time.monotonic() - started


def test_feedback_send_refuses_the_in_memory_transport_in_one_line() -> None:
    done, _ = _loraloop("feedback", "send", "--request-id", "r", "--kind", "thumbs_up")
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "in-memory transport" in lines[0] and "--transport kafka" in lines[0]


def test_feedback_send_with_the_broker_down_says_so_in_a_few_lines() -> None:
    done, took = _loraloop("feedback", "send", "--transport", "kafka", "--kafka-bootstrap", "127.0.0.1:1",
                           "--request-id", "r", "--kind", "thumbs_up")
    output = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode != 0 and took < 60
    assert len(output) <= 5 and "Traceback" not in done.stderr, done.stderr
    assert "is the broker running" in output[-1] and "127.0.0.1:1" in output[-1]
