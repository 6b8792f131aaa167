"""The CUDA paths: bf16-autocast training on the GPU, and serving on the GPU.

Skipped on machines without CUDA (CI has none); run on a GPU machine with
``pytest tests/test_cuda.py``. An adapter trained on the GPU must serve the same answers
on a CPU worker as on a GPU worker: the registry is the only thing they share.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from learner.cycle import build_learner
from loraloop.buffer.memory import MemoryFeedbackBuffer
from loraloop.metrics import Metrics
from loraloop.registry import make_registry
from loraloop.schemas import Example, Request
from loraloop.settings import Settings
from loraloop.testing import save_tiny_base_model
from tests.test_learner import _text
from tests.test_worker_memory import Stack, swap_to

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_base_model(tmp_path_factory.mktemp("tiny") / "base")


def test_a_version_trained_on_cuda_serves_the_same_answers_on_cpu_and_cuda(tmp_path: Path, base_dir: Path) -> None:
    settings = Settings(base_model=str(base_dir), registry_url=str(tmp_path / "registry"), label_capacity=8,
                        epochs=1, device="cuda")
    buffer = MemoryFeedbackBuffer(1000, "reject", 50, 600.0, 600)
    learner = build_learner(settings, registry=make_registry(settings), buffer=buffer,
                            metrics=Metrics(CollectorRegistry()), show_progress=False)
    assert learner.trainer.device.type == "cuda"
    assert learner.trainer.bf16 is torch.cuda.is_bf16_supported()
    rng = random.Random(0)
    learner.bootstrap([_text(rng, y) for y in "ab" * 30], list("ab" * 30))
    for i, label in enumerate("c" * 40 + "ab" * 10):
        buffer.append(Example(event_id=f"e{i}", request_id=f"r{i}", text=_text(rng, label), kind="label",
                              label=label, served_label="a", adapter_version="v", ts=time.time()))
    outcome = learner.run_cycle("ops")
    assert outcome.outcome == "promoted", outcome.reason
    assert learner.evaluate(outcome.version, [_text(rng, "c") for _ in range(20)], ["c"] * 20) >= 0.9
    learner.close()

    texts = [_text(rng, y) for y in "abc" * 10]
    answers = {}
    for device in ("cpu", "cuda"):
        stack = Stack(tmp_path, base_dir, device=device)
        with stack.worker() as worker:
            swap_to(worker, outcome.version)
            assert next(worker.manager.model.parameters()).device.type == device
            answers[device] = worker._predict([Request(id=f"x{i}", text=t) for i, t in enumerate(texts)])
    assert sum(p.label == y for p, y in zip(answers["cuda"], "abc" * 10, strict=True)) >= 27
    for cpu, gpu in zip(answers["cpu"], answers["cuda"], strict=True):
        assert cpu.label == gpu.label
        assert cpu.score == pytest.approx(gpu.score, abs=2e-3)  # fp32 on both: only kernel rounding differs
