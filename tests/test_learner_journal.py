"""The learner's intent journal: a cycle killed after any step is completed once, never trained again.

A "kill" here is a BaseException raised by the learner's step hook right after the named
step, which no ``except Exception`` catches: the learner object is then dropped and a new
one (a restarted learner) is built on the same registry and in-memory buffer.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from learner.cycle import build_learner
from learner.gate import GateDecision
from learner.journal import FAULT_ENV, Intent, fault_point_from_env
from loraloop.buffer.memory import MemoryFeedbackBuffer
from loraloop.metrics import Metrics
from loraloop.registry import make_registry
from loraloop.schemas import Example
from loraloop.settings import Settings
from loraloop.testing import build_constant_adapter, save_tiny_base_model

WORDS = {"a": "apple banana fruit pear", "b": "car truck wheel engine", "c": "moon star planet comet"}
IDLE_S = 0.3  # claim_idle_s: a killed claim comes back this long after it was claimed


class Killed(BaseException):
    """The learner process died right after a step."""


def _text(rng: random.Random, label: str) -> str:
    return " ".join(rng.choice(WORDS[label].split()) for _ in range(4))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_base_model(tmp_path_factory.mktemp("tiny") / "base")


class Loop:
    """A registry and a buffer that outlive learners, and learners that can be killed and restarted."""

    def __init__(self, base_dir: Path, tmp_path: Path) -> None:
        self.settings = Settings(base_model=str(base_dir), registry_url=str(tmp_path / "registry"), label_capacity=8,
                                 epochs=1, claim_idle_s=IDLE_S, gate_enabled=False)
        self.buffer = MemoryFeedbackBuffer(1000, "reject", 50, IDLE_S, 600)
        self.registry = make_registry(self.settings)
        self.first = self.registry.publish(build_constant_adapter(self.settings, ["a", "b"], "a", tmp_path / "c"))
        self.registry.promote(self.first)
        self.learners = []
        self.trained: list[list[str]] = []  # texts fine-tuned on, per finetune call, across learners
        self.rng = random.Random(0)

    def learner(self, kill_at: str | None = None, decision: GateDecision | None = None):
        metrics = Metrics(CollectorRegistry())
        learner = build_learner(self.settings, registry=self.registry, buffer=self.buffer, metrics=metrics,
                                show_progress=False)
        finetune = learner.trainer.finetune

        def counting(model, label_map, rows, *args, **kwargs):
            self.trained.append([r.text for r in rows])
            return finetune(model, label_map, rows, *args, **kwargs)

        learner.trainer.finetune = counting
        if decision is not None:
            learner._evaluate = lambda *args, **kwargs: decision
        if kill_at:
            def step(name: str) -> None:
                if name == kill_at:
                    raise Killed(name)
            learner.step = step
        self.learners.append(learner)
        return learner

    def feed(self, n: int, label: str = "c", start: int = 0) -> list[str]:
        ids = []
        for i in range(start, start + n):
            self.buffer.append(Example(event_id=f"e{i}", request_id=f"r{i}", text=_text(self.rng, label),
                                       kind="label", label=label, served_label="a", adapter_version=self.first,
                                       ts=time.time()))
            ids.append(f"e{i}")
        return ids

    def intents(self) -> list[str]:
        folder = Path(self.registry.root) / "intents"
        return sorted(p.name for p in folder.iterdir()) if folder.exists() else []

    def statuses(self) -> dict[str, str]:
        return {v.version: v.status.get("status", "ok") for v in self.registry.versions()}

    def close(self) -> None:
        for learner in self.learners:
            learner.close()


@pytest.fixture
def loop(base_dir: Path, tmp_path: Path):
    loop = Loop(base_dir, tmp_path)
    yield loop
    loop.close()


def _recovery(learner, action: str) -> float:
    return learner.metrics.registry.get_sample_value("loraloop_learner_recovery_total", {"action": action}) or 0.0


@pytest.mark.parametrize("kill_at", ["publish", "promote", "record", "acknowledge"])
def test_a_learner_killed_after_each_step_completes_the_cycle_once(loop: Loop, kill_at: str) -> None:
    ids = loop.feed(30)
    with pytest.raises(Killed):
        loop.learner(kill_at).run_cycle("count")
    assert len(loop.trained) == 1 and loop.intents(), "the intent is written before the first effect"
    claim_id = Intent.model_validate_json((Path(loop.registry.root) / "intents" / loop.intents()[0]).read_bytes()
                                          ).claim_id
    restarted = loop.learner()
    restarted.recover()  # what `loraloop learner` does at start
    versions = [v.version for v in loop.registry.versions()]
    assert len(versions) == 2, versions  # the first and one candidate: published once
    candidate = versions[1]
    assert loop.registry.active().version == candidate  # promoted once, by whoever got there
    records = [c for c in loop.registry.cycles() if c.get("claim_id") == claim_id]
    assert len(records) == 1 and records[0]["outcome"] == "promoted" and records[0]["version"] == candidate
    assert records[0]["duration_s"] > 0
    assert loop.statuses()[candidate] == "promoted"
    time.sleep(2 * IDLE_S + 0.1)  # the killed claim is handed out again (unless it was acknowledged)
    outcome = restarted.run_cycle("timer")
    assert outcome.outcome == ("empty" if kill_at == "acknowledge" else "settled"), outcome.reason
    assert outcome.settled_examples == (0 if kill_at == "acknowledge" else 30)
    assert len(loop.trained) == 1, "trained again"
    assert loop.buffer.depth() == 0 and loop.intents() == []
    assert len([c for c in loop.registry.cycles() if c.get("outcome") == "promoted"]) == 1
    replayed = {e.event_id for e in loop.buffer.replay_sample(10**6, seed=0)}
    assert set(ids) <= replayed  # settled examples enter the reservoir as the cycle decided
    if kill_at != "acknowledge":
        assert _recovery(restarted, "settled") == 30


def test_a_killed_rejected_candidate_is_never_listed_ok_and_its_feedback_stays_quarantined(loop: Loop) -> None:
    ids = loop.feed(30)
    suspect = GateDecision(False, "worse on the reference set", suspect_feedback=True)
    with pytest.raises(Killed):
        loop.learner("publish", decision=suspect).run_cycle("count")
    candidate = loop.registry.versions()[-1].version
    assert loop.statuses()[candidate] == "ok"  # killed between publish and its status: the one gap
    restarted = loop.learner()
    restarted.recover()
    assert loop.statuses()[candidate] == "rejected" and loop.registry.active().version == loop.first
    time.sleep(IDLE_S + 0.1)
    assert restarted.run_cycle("timer").outcome == "settled"
    assert len(loop.trained) == 1
    assert not set(ids) & {e.event_id for e in loop.buffer.replay_sample(10**6, seed=0)}
    assert restarted.metrics.registry.get_sample_value("loraloop_feedback_quarantined_total",
                                                       {"reason": "gate"}) == 30
    assert [c["outcome"] for c in loop.registry.cycles()] == ["rejected"]


def test_a_candidate_is_not_promoted_over_a_pointer_that_moved(loop: Loop, tmp_path: Path) -> None:
    loop.feed(30)
    with pytest.raises(Killed):
        loop.learner("publish").run_cycle("count")
    candidate = loop.registry.versions()[-1].version
    other = loop.registry.publish(build_constant_adapter(loop.settings, ["a", "b"], "b", tmp_path / "other"))
    loop.registry.promote(other, reason="ops")  # while the learner was down
    restarted = loop.learner()
    restarted.recover()
    assert loop.registry.active().version == other
    assert loop.statuses()[candidate] == "superseded"
    [record] = loop.registry.cycles()
    assert record["outcome"] == "superseded" and other in record["reason"]
    assert _recovery(restarted, "superseded") == 1


def test_the_candidate_is_published_by_recovery_when_the_learner_died_before_publishing(loop: Loop,
                                                                                       monkeypatch) -> None:
    loop.feed(30)
    learner = loop.learner()

    def die(*args: object, **kwargs: object) -> str:
        raise Killed("publish started")

    monkeypatch.setattr(loop.registry, "publish", die)
    with pytest.raises(Killed):
        learner.run_cycle("count")
    monkeypatch.undo()
    assert [v.version for v in loop.registry.versions()] == [loop.first]
    restarted = loop.learner()
    restarted.recover()  # the candidate folder of the dead learner is still on this machine
    assert len(loop.registry.versions()) == 2 and loop.registry.active().version != loop.first
    assert _recovery(restarted, "published") == 1 and _recovery(restarted, "promoted") == 1
    assert [c["outcome"] for c in loop.registry.cycles()] == ["promoted"]


def test_an_intent_without_a_candidate_is_abandoned_and_its_claim_trained_again(loop: Loop, monkeypatch) -> None:
    loop.feed(30)
    learner = loop.learner()
    monkeypatch.setattr(loop.registry, "publish", lambda *a, **k: (_ for _ in ()).throw(Killed("publish")))
    with pytest.raises(Killed):
        learner.run_cycle("count")
    monkeypatch.undo()
    learner.close()  # its workdir, with the candidate, is gone (another machine, a fresh container)
    restarted = loop.learner()
    time.sleep(IDLE_S + 0.1)
    outcome = restarted.run_cycle("timer")
    assert _recovery(restarted, "abandoned") == 1
    assert outcome.outcome == "promoted" and outcome.examples == 30 and len(loop.trained) == 2
    assert loop.intents() == [] and len(loop.registry.cycles()) == 1


def test_new_examples_claimed_with_settled_ones_are_trained_alone(loop: Loop) -> None:
    old = loop.feed(30)
    with pytest.raises(Killed):
        loop.learner("record").run_cycle("count")
    restarted = loop.learner()
    time.sleep(IDLE_S + 0.1)
    new = loop.feed(20, label="b", start=100)
    outcome = restarted.run_cycle("count")
    assert outcome.outcome == "promoted" and outcome.settled_examples == 30 and outcome.examples == 20
    assert set(" ".join(loop.trained[1]).split()) <= set(WORDS["b"].split())  # none of the settled "c" texts
    assert loop.buffer.depth() == 0 and loop.intents() == []
    claims = [c["claim_id"] for c in loop.registry.cycles()]
    assert len(claims) == 2 == len(set(claims))
    replayed = {e.event_id for e in loop.buffer.replay_sample(10**6, seed=0)}
    assert set(old) <= replayed and len(set(new) & replayed) > 0


def test_records_carry_their_duration(loop: Loop) -> None:
    loop.feed(30)
    outcome = loop.learner().run_cycle("count")
    [record] = loop.registry.cycles()
    assert 0 < record["duration_s"] <= outcome.duration_s
    assert loop.intents() == [] and loop.statuses()[outcome.version] == "promoted"


def test_an_unreadable_intent_is_moved_aside_and_counted(loop: Loop) -> None:
    folder = Path(loop.registry.root) / "intents"
    folder.mkdir()
    (folder / "garbage.json").write_text("[" * 50_000)
    (folder / "bad-name.json").write_text(json.dumps({"claim_id": "../../etc", "claimed_at": 0, "created_at": 0,
                                                      "event_ids": [], "outcome": {}}))
    learner = loop.learner()
    assert learner.recover() == 0
    assert sorted(p.name for p in folder.iterdir()) == ["bad-name.json.unreadable", "garbage.json.unreadable"]
    assert _recovery(learner, "unreadable") == 2
    loop.feed(10)
    assert learner.run_cycle("count").outcome == "promoted"  # and the learner carries on


def test_the_fault_point_is_off_unless_named(monkeypatch) -> None:
    monkeypatch.delenv(FAULT_ENV, raising=False)
    fault_point_from_env()("publish")  # no-op
    monkeypatch.setenv(FAULT_ENV, "trained")
    with pytest.raises(ValueError, match="'trained'"):
        fault_point_from_env()
