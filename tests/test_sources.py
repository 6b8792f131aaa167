"""Per-source caps (learner.sources): the pure split, and a learner cycle whose claim is one source's."""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from learner.cycle import build_learner
from learner.sources import SOURCE_FLOOR, cap_sources, source_limit
from loraloop.buffer.memory import MemoryFeedbackBuffer
from loraloop.metrics import Metrics
from loraloop.registry import make_registry
from loraloop.schemas import Example, FeedbackEvent
from loraloop.settings import Settings
from loraloop.testing import save_tiny_base_model


def _ex(i: int, source: str | None, label: str = "a", ts: float = 0.0) -> Example:
    return Example(event_id=f"e{i}", request_id=f"r{i}", text=f"t{i}", kind="label", label=label,
                   served_label="a", adapter_version="v", source=source, ts=ts or float(i))


@hsettings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["u1", "u2", "u3", None]), max_size=300), st.floats(0.05, 1.0))
def test_no_source_goes_over_its_limit_and_nothing_is_lost(sources: list, share: float) -> None:
    examples = [_ex(i, s) for i, s in enumerate(sources)]
    kept, deferred = cap_sources(examples, share)
    assert sorted(e.event_id for e in kept + deferred) == sorted(e.event_id for e in examples)
    limit = source_limit(len(examples), share)
    counts = Counter(e.source for e in kept if e.source is not None)
    assert all(n <= limit for n in counts.values())
    assert all(e.source is not None for e in deferred)  # feedback without a source is never capped
    for source in set(e.source for e in deferred):
        assert counts[source] == limit  # only a source over its limit waits, and it keeps exactly the limit


def test_the_oldest_examples_of_a_capped_source_are_kept() -> None:
    examples = [_ex(i, "bot", ts=100.0 - i) for i in range(50)]  # appended newest first
    kept, deferred = cap_sources(examples, 0.1)
    assert len(kept) == SOURCE_FLOOR and {e.ts for e in kept} == {100.0 - i for i in range(30, 50)}


def test_feedback_without_a_source_is_valid_and_joins_to_none() -> None:
    event = FeedbackEvent.model_validate_json(b'{"event_id": "e", "request_id": "r", "kind": "thumbs_up"}')
    assert event.source is None
    assert FeedbackEvent(event_id="e", request_id="r", kind="thumbs_up", source="user-7").source == "user-7"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_base_model(tmp_path_factory.mktemp("tiny") / "base")


def test_a_claim_entirely_from_one_source_is_capped_and_the_rest_waits_for_later_cycles(base_dir: Path,
                                                                                       tmp_path: Path) -> None:
    settings = Settings(base_model=str(base_dir), registry_url=str(tmp_path / "registry"), label_capacity=8,
                        epochs=1, claim_idle_s=0.5, gate_enabled=False, source_max_share=0.5)
    buffer = MemoryFeedbackBuffer(1000, "reject", 200, settings.claim_idle_s, 600)
    metrics = Metrics(CollectorRegistry())
    learner = build_learner(settings, registry=make_registry(settings), buffer=buffer, metrics=metrics,
                            show_progress=False)
    rng = random.Random(0)
    try:
        learner.bootstrap([f"alpha {rng.random()}" for _ in range(20)] + [f"beta {rng.random()}" for _ in range(20)],
                          ["a"] * 20 + ["b"] * 20)
        now = time.time()
        for i in range(100):
            buffer.append(Example(event_id=f"e{i}", request_id=f"r{i}", text=f"gamma {i}", kind="label", label="c",
                                  served_label="a", adapter_version="v", source="annotator-1", ts=now + i))
        first = learner.run_cycle("count")
        assert first.outcome == "promoted" and first.deferred == {"annotator-1": 50}, first.reason
        assert buffer.pending() == 50 and buffer.depth() == 50  # waiting, unclaimed: nothing lost
        replayed = {e.event_id for e in buffer.replay_sample(10**6, seed=0)}
        assert replayed >= {f"e{i}" for i in range(50)} and not replayed & {f"e{i}" for i in range(50, 100)}
        assert metrics.registry.get_sample_value("loraloop_feedback_deferred_total", {"reason": "source_cap"}) == 50
        outcomes = [learner.run_cycle("count") for _ in range(3)]
        assert [o.deferred for o in outcomes] == [{"annotator-1": 25}, {"annotator-1": 5}, {}]
        assert buffer.depth() == 0
        assert {e.event_id for e in buffer.replay_sample(10**6, seed=0)} >= {f"e{i}" for i in range(100)}
        assert learner.registry.cycles()[0]["deferred"] == {"annotator-1": 50}
    finally:
        learner.close()
