"""The learner: training-set rules, the gate, triggers, and whole cycles on a tiny random base model."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from learner.cycle import build_learner
from learner.dataset import Labelled, Negative, build_training_set, is_reference, reference_rows, resolve
from learner.gate import Paired, Pairs, Scores, decide
from learner.train import _loss
from learner.trigger import TRIGGER_MAX_AGE_S, OpsTriggers, due, sign
from loraloop.buffer.memory import MemoryFeedbackBuffer
from loraloop.metrics import Metrics
from loraloop.registry import make_registry
from loraloop.schemas import Example
from loraloop.settings import Settings
from loraloop.testing import save_tiny_base_model

torch.set_num_threads(1)
WORDS = {"a": "apple banana fruit pear", "b": "car truck wheel engine", "c": "moon star planet comet"}


def _text(rng: random.Random, label: str) -> str:
    return " ".join(rng.choice(WORDS[label].split()) for _ in range(4))


def _ex(i: int, request: str, label: str | None, kind: str = "label", served: str = "a", text: str = "t") -> Example:
    return Example(event_id=f"e{i}", request_id=request, text=text, kind=kind, label=label,
                   negative_label=served if kind == "thumbs_down" else None, served_label=served,
                   adapter_version="v1", ts=float(i))


# --- pure pieces ---------------------------------------------------------------------------
def test_resolve_majority_ties_and_thumbs_down() -> None:
    rows, stats = resolve([
        _ex(1, "r1", "b"), _ex(2, "r1", "c"), _ex(3, "r1", "b"),  # majority b
        _ex(4, "r2", "b"), _ex(5, "r2", "c"),  # tie: ambiguous, dropped
        _ex(6, "r3", None, kind="thumbs_down", served="a"),  # negative evidence against a
        _ex(7, "r4", "a", kind="thumbs_up"), _ex(8, "r4", None, kind="thumbs_down"),  # label beats thumbs-down
    ])
    assert rows == [Labelled("t", "b", 3.0), Negative("t", "a", 6.0), Labelled("t", "a", 8.0)]
    assert (stats.conflicts_resolved, stats.ambiguous_dropped, stats.negatives) == (1, 1, 1)


def test_training_set_keeps_the_most_recent_feedback_aside_and_trains_on_replay() -> None:
    new = [_ex(i, f"r{i}", "ab"[i % 2], text=f"new{i}") for i in range(10)]
    replay = [_ex(100 + i, f"p{i}", "c", text=f"old{i}") for i in range(10)]
    data = build_training_set(new, replay, holdout_fraction=0.2, seed=0)
    assert [r.text for r in data.holdout] == ["new8", "new9"]
    trained = {r.text for r in data.train}
    assert not trained & {r.text for r in data.holdout}
    assert len(trained) == 18 and data.new_rows == 10 and data.replay_rows == 10


@pytest.mark.parametrize(("candidate", "active", "promote", "why"), [
    (Scores(0.9, 0.9, None, 10, 10), None, True, "first version"),
    (Scores(0.9, 0.9, None, 10, 10), Scores(0.8, 0.9, None, 10, 10), True, "holdout 0.800 -> 0.900"),
    (Scores(0.7, 0.9, None, 10, 10), Scores(0.8, 0.9, None, 10, 10), False, "worse on the holdout"),
    (Scores(0.9, 0.85, None, 10, 10), Scores(0.8, 0.9, None, 10, 10), False, "forgets known labels"),
    (Scores(0.9, 0.89, None, 10, 10), Scores(0.8, 0.9, None, 10, 10), True, "known labels"),
    (Scores(0.9, 0.9, 0.7, 10, 10), Scores(0.8, 0.9, 0.9, 10, 10), False, "worse on the golden set"),
    (Scores(None, None, None), Scores(0.8, 0.9, 0.9), False, "nothing to evaluate"),
])
def test_gate(candidate: Scores, active: Scores | None, promote: bool, why: str) -> None:
    decision = decide(candidate, active, tolerance=0.02)
    assert decision.promote is promote and why in decision.reason


@pytest.mark.parametrize(("reference", "pairs", "promote"), [
    ((0.70, 0.80), Paired(candidate_only=1, active_only=11), False),  # 10 rows lost net, significant
    ((0.78, 0.80), Paired(candidate_only=3, active_only=5), True),  # within tolerance
    ((0.70, 0.80), Paired(candidate_only=12, active_only=20), True),  # beyond tolerance, not significant (p=0.11)
    ((0.70, 0.80), None, False),  # no pairs: the tolerance alone decides
])
def test_gate_reference_set_needs_a_significant_loss(reference, pairs, promote) -> None:
    cand = Scores(1.0, 1.0, None, 50, 40, reference=reference[0], n_reference=100)
    act = Scores(0.5, 1.0, None, 50, 40, reference=reference[1], n_reference=100)
    decision = decide(cand, act, tolerance=0.02, pairs=Pairs(reference=pairs), alpha=0.05)
    assert decision.promote is promote, decision.reason
    assert decision.suspect_feedback is (not promote)


@pytest.mark.parametrize(("holdout", "pairs", "promote"), [
    ((0.804, 0.826), Paired(candidate_only=0, active_only=1), True),  # 1 row of 46: beyond tolerance, noise
    ((0.804, 0.826), None, False),  # no pairs: the tolerance alone decides
    ((0.815, 0.826), Paired(candidate_only=0, active_only=20), True),  # significant, but within tolerance
    ((0.717, 0.826), Paired(candidate_only=0, active_only=5), False),  # 5 of 46 lost, none won: p=0.031
])
def test_gate_holdout_rejects_only_a_significant_loss_beyond_tolerance(holdout, pairs, promote) -> None:
    cand = Scores(holdout[0], 0.9, None, 46, 40)
    act = Scores(holdout[1], 0.9, None, 46, 40)
    decision = decide(cand, act, tolerance=0.02, alpha=0.05, pairs=Pairs(holdout=pairs))
    assert decision.promote is promote, decision.reason
    assert promote or ("worse on the holdout" in decision.reason and not decision.suspect_feedback)


@pytest.mark.parametrize(("pairs", "suspect"), [
    (Paired(candidate_only=0, active_only=5), False),  # p=0.031: rejected, the claim still teaches later cycles
    (Paired(candidate_only=0, active_only=9), True),  # p=0.002: rejected and quarantined
])
def test_only_a_strong_reference_loss_quarantines_the_claim(pairs: Paired, suspect: bool) -> None:
    cand = Scores(1.0, 1.0, None, 50, 40, reference=0.80, n_reference=100)
    act = Scores(0.5, 1.0, None, 50, 40, reference=0.90, n_reference=100)
    decision = decide(cand, act, tolerance=0.02, pairs=Pairs(reference=pairs), alpha=0.05, quarantine_alpha=0.005)
    assert not decision.promote and "reference set" in decision.reason
    assert decision.suspect_feedback is suspect


@pytest.mark.parametrize(("pairs", "promote"), [
    (Paired(candidate_only=0, active_only=2), True),  # 2 rows of 41 (4.9 points): noise (p=0.25)
    (Paired(candidate_only=0, active_only=6), False),  # 6 rows, none won: p=0.016
    (None, False),  # no pairs: the tolerance alone decides
])
def test_gate_forgetting_check_needs_a_significant_loss(pairs: Paired | None, promote: bool) -> None:
    known = (0.829, 0.878) if pairs is None or pairs.active_only == 2 else (0.732, 0.878)
    cand, act = Scores(0.9, known[0], None, 50, 41), Scores(0.8, known[1], None, 50, 41)
    decision = decide(cand, act, tolerance=0.02, pairs=Pairs(known=pairs), alpha=0.05)
    assert decision.promote is promote, decision.reason
    assert promote or decision.reason.startswith("forgets known labels")


def test_triggers_and_cross_process_ops_requests(tmp_path: Path) -> None:
    assert due(10, 0, 5, False, 60, 100) is None
    assert due(10, 0, 100, False, 60, 100) == "count"
    assert due(61, 0, 0, False, 60, 100) == "timer"
    assert due(1, 0, 0, True, 60, 100) == "ops"
    OpsTriggers(str(tmp_path)).request("test")  # another process: another instance on the same registry
    reader = OpsTriggers(str(tmp_path))
    assert [t["reason"] for t in reader.take()] == ["test"]
    assert reader.take() == []


def _triggers(tmp_path: Path, token: str = "") -> tuple[OpsTriggers, Metrics]:
    metrics = Metrics(CollectorRegistry())
    return OpsTriggers(str(tmp_path), token=token, metrics=metrics), metrics


def _trigger_count(metrics: Metrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("loraloop_learner_triggers_total", {"outcome": outcome}) or 0.0


def test_signed_retrain_requests_are_taken_and_others_refused(tmp_path: Path) -> None:
    learner_side, metrics = _triggers(tmp_path, token="s3cret")
    signed = OpsTriggers(str(tmp_path), token="s3cret").request("signed")
    OpsTriggers(str(tmp_path)).request("unsigned")  # `loraloop retrain` without the token
    OpsTriggers(str(tmp_path), token="wrong").request("forged")
    folder = tmp_path / "triggers"
    body = {"id": "old", "reason": "replay of an old request", "at": time.time() - 2 * TRIGGER_MAX_AGE_S}
    (folder / "old.json").write_text(json.dumps({**body, "hmac": sign(b"s3cret", body)}))
    tampered = json.loads((folder / f"{signed}.json").read_text()) | {"reason": "edited after signing"}
    (folder / "tampered.json").write_text(json.dumps(tampered))
    assert [t["reason"] for t in learner_side.take()] == ["signed"]
    assert list(folder.iterdir()) == []  # refused files are deleted, not retried every tick
    assert {o: _trigger_count(metrics, o) for o in ("accepted", "unsigned", "bad_signature", "stale")} == {
        "accepted": 1, "unsigned": 1, "bad_signature": 2, "stale": 1}
    (folder / "again.json").write_text(json.dumps(tampered | {"reason": "signed"}))  # the taken request, copied back
    assert learner_side.take() == [] and _trigger_count(metrics, "replayed") == 1


def test_garbage_trigger_files_are_refused_without_blocking(tmp_path: Path) -> None:
    taker, metrics = _triggers(tmp_path, token="s3cret")
    folder = tmp_path / "triggers"
    folder.mkdir()
    (folder / "nested.json").write_text("[" * 3000)
    (folder / "list.json").write_text("[1, 2]")
    (folder / "huge.json").write_bytes(b" " * 10_000)
    (folder / "fields.json").write_text(json.dumps({"id": 1, "at": "now", "hmac": "x"}))
    os.mkfifo(folder / "fifo.json")  # opening a FIFO for reading would block the learner's loop
    (folder / "dir.json").mkdir()
    (folder / "link.json").symlink_to(tmp_path / "elsewhere.json")
    (folder / "notes.txt").write_text("not a request")
    assert taker.take() == []
    assert _trigger_count(metrics, "malformed") == 7
    assert sorted(p.name for p in folder.iterdir()) == ["dir.json", "notes.txt"]  # a directory cannot be rm'd
    assert taker.take() == [] and _trigger_count(metrics, "malformed") == 7  # and is not refused every tick


def test_without_a_token_requests_are_taken_unsigned_with_one_warning(tmp_path: Path, caplog) -> None:
    taker, metrics = _triggers(tmp_path)
    OpsTriggers(str(tmp_path)).request("one")
    OpsTriggers(str(tmp_path), token="any").request("signed is fine too")
    with caplog.at_level("WARNING", logger="learner.trigger"):
        assert len(taker.take()) == 2
        OpsTriggers(str(tmp_path)).request("two")
        assert len(taker.take()) == 1
    assert sum("api_token is not set" in r.getMessage() for r in caplog.records) == 1
    assert _trigger_count(metrics, "accepted") == 3


def test_the_learner_starts_no_cycle_on_a_refused_trigger(env, monkeypatch) -> None:
    learner, *_ = env
    monkeypatch.setattr(learner.triggers, "token", b"s3cret")
    OpsTriggers(learner.settings.registry_url).request("unsigned")
    assert learner._take_ops() == []
    OpsTriggers(learner.settings.registry_url, token="s3cret").request("signed")
    assert [t["reason"] for t in learner._take_ops()] == ["signed"]
    assert _trigger_count(learner.metrics, "unsigned") == 1


def test_unlikelihood_pushes_down_the_rejected_label() -> None:
    logits = torch.zeros(1, 3, requires_grad=True)
    _loss(logits, [1], [True]).backward()
    assert logits.grad[0, 1] > 0 > logits.grad[0, 0]  # gradient descent lowers the rejected logit, raises others


# --- whole cycles -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_base_model(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture
def env(base_dir: Path, tmp_path: Path):
    golden = tmp_path / "golden.csv"
    rng = random.Random(1)
    golden.write_text("text,label\n" + "".join(f"{_text(rng, y)},{y}\n" for y in "ab" * 15))
    yield from _env(base_dir, tmp_path, golden_path=str(golden))


@pytest.fixture
def env_without_golden(base_dir: Path, tmp_path: Path):
    yield from _env(base_dir, tmp_path, reference_share=0.4)  # a reference set large enough for a toy stream


@pytest.fixture
def env_known(base_dir: Path, tmp_path: Path):
    """Bootstrapped on twice the rows: enough reference rows (8 of label b) for the screen to judge b as known."""
    golden = tmp_path / "golden.csv"
    rng = random.Random(1)
    golden.write_text("text,label\n" + "".join(f"{_text(rng, y)},{y}\n" for y in "ab" * 15))
    yield from _env(base_dir, tmp_path, repeats=60, golden_path=str(golden))


def _env(base_dir: Path, tmp_path: Path, repeats: int = 30, **overrides):
    settings = Settings(base_model=str(base_dir), registry_url=str(tmp_path / "registry"), label_capacity=8,
                        epochs=1, claim_idle_s=0.5, **overrides)
    buffer = MemoryFeedbackBuffer(1000, "reject", 50, settings.claim_idle_s, 600)
    registry = make_registry(settings)
    metrics = Metrics(CollectorRegistry())
    learner = build_learner(settings, registry=registry, buffer=buffer, metrics=metrics, show_progress=False)
    rng = random.Random(0)
    first = learner.bootstrap([_text(rng, y) for y in "ab" * repeats], list("ab" * repeats))
    yield learner, buffer, registry, metrics, first, rng
    learner.close()


def _feed(buffer: MemoryFeedbackBuffer, rng: random.Random, labels: str, start: int, truth: str | None = None) -> None:
    for i, label in enumerate(labels, start):
        text = _text(rng, truth or label)
        buffer.append(Example(event_id=f"e{i}", request_id=f"r{i}", text=text, kind="label", label=label,
                              served_label="a", adapter_version="v", ts=time.time()))


def test_a_new_label_is_learned_promoted_and_old_ones_kept(env) -> None:
    learner, buffer, registry, metrics, first, rng = env
    _feed(buffer, rng, "c" * 40 + "ab" * 10, 0)
    outcome = learner.run_cycle("count")
    assert outcome.outcome == "promoted", outcome.reason
    assert outcome.new_labels == ["c"] and registry.active().version == outcome.version
    assert registry.show(outcome.version).metadata["parent"] == first
    version = outcome.version
    assert learner.evaluate(version, [_text(rng, "c") for _ in range(20)], ["c"] * 20) >= 0.9
    assert learner.evaluate(version, [_text(rng, y) for y in "ab" * 10], list("ab" * 10)) >= 0.9
    assert buffer.depth() == 0
    assert metrics.registry.get_sample_value("loraloop_learner_cycles_total",
                                             {"trigger": "count", "outcome": "promoted"}) == 1
    assert registry.cycles()[-1]["outcome"] == "promoted"


def test_an_empty_cycle_trains_nothing(env) -> None:
    learner, buffer, registry, *_ = env
    before = [v.version for v in registry.versions()]
    assert learner.run_cycle("timer").outcome == "empty"
    assert [v.version for v in registry.versions()] == before


def test_poisoned_feedback_is_rejected_by_the_gate(env) -> None:
    learner, buffer, registry, _, first, rng = env
    _feed(buffer, rng, "b" * 150, 0, truth="a")  # every "a" text labelled "b"
    eager = learner.settings.model_copy(update={"epochs": 5, "head_learning_rate": 0.05,  # learns the poison
                                                "screen_alpha": 0})  # the gate alone
    learner.settings = learner.trainer.settings = eager
    outcome = learner.run_cycle("count")
    assert outcome.outcome == "rejected" and "golden" in outcome.reason, (outcome.candidate, outcome.active)
    assert registry.active().version == first
    assert (Path(registry.url) / "status" / f"{outcome.version}.json").exists()
    assert outcome.quarantined  # suspect feedback stays out of the replay reservoir
    assert not any(e.event_id.startswith("e") for e in buffer.replay_sample(10**6, seed=0))


def test_without_a_golden_set_the_reference_set_rejects_poison(env_without_golden) -> None:
    learner, buffer, registry, metrics, _, rng = env_without_golden
    share = learner.settings.reference_share
    _feed(buffer, rng, "ab" * 50, 0)  # clean feedback: its reference requests join the reference set
    clean = learner.run_cycle("count")
    assert clean.reference_held > 0 and not clean.quarantined, clean.reason
    reference = [e for e in buffer.replay_sample(10**6, seed=0) if is_reference(e.request_id, share)]
    assert 0 < len(reference) <= clean.reference_held + sum(is_reference(f"bootstrap-{i}", share) for i in range(60))
    live = registry.active().version
    _feed(buffer, rng, "b" * 150, 1000, truth="a")  # every "a" text labelled "b"
    learner.settings = learner.trainer.settings = learner.settings.model_copy(
        update={"epochs": 5, "head_learning_rate": 0.05, "screen_alpha": 0,  # learns the poison; the gate alone
                "learner_mode": "lora"})
    outcome = learner.run_cycle("count")
    assert outcome.outcome == "rejected" and "reference set" in outcome.reason, (outcome.candidate, outcome.reason)
    assert outcome.candidate["holdout"] > outcome.active["holdout"]  # the poisoned holdout alone would promote it
    assert outcome.quarantined and registry.active().version == live
    assert outcome.reference_rows == len(reference_rows(reference, learner.settings.reference_per_label))
    replayed = {e.event_id for e in buffer.replay_sample(10**6, seed=0)}
    assert not any(f"e{i}" in replayed for i in range(1000, 1150))
    assert metrics.registry.get_sample_value("loraloop_feedback_quarantined_total", {"reason": "gate"}) == 150


def test_the_screen_sets_aside_a_burst_pushed_onto_one_label(env_known) -> None:
    learner, buffer, registry, metrics, first, rng = env_known
    _feed(buffer, rng, "ab" * 40, 0)  # honest corrections
    _feed(buffer, rng, "b" * 40, 1000, truth="a")  # a burst: "a" texts labelled "b"
    outcome = learner.run_cycle("count")
    assert outcome.screened == {"b": outcome.screened_examples} and outcome.screened_examples >= 38, outcome.reason
    assert not outcome.quarantined and outcome.outcome == "promoted", outcome.reason  # the honest rest is learned
    replayed = {e.event_id for e in buffer.replay_sample(10**6, seed=0)}
    assert sum(f"e{i}" in replayed for i in range(1000, 1040)) <= 40 - outcome.screened_examples
    assert sum(f"e{i}" in replayed for i in range(80)) >= 20  # honest corrections enter the reservoir (50 per label)
    assert metrics.registry.get_sample_value("loraloop_feedback_quarantined_total",
                                             {"reason": "screen"}) == outcome.screened_examples
    assert learner.evaluate(outcome.version, [_text(rng, "a") for _ in range(20)], ["a"] * 20) >= 0.9


def test_a_claim_that_is_all_suspect_trains_nothing(env_known) -> None:
    learner, buffer, registry, metrics, first, rng = env_known
    _feed(buffer, rng, "b" * 30, 0, truth="a")
    before = [v.version for v in registry.versions()]
    outcome = learner.run_cycle("count")
    assert outcome.outcome == "screened" and outcome.screened_examples == 30, outcome.reason
    assert [v.version for v in registry.versions()] == before and registry.active().version == first
    assert buffer.depth() == 0 and not any(e.event_id.startswith("e") for e in buffer.replay_sample(10**6, seed=0))
    assert registry.cycles()[-1]["outcome"] == "screened"


def test_reference_requests_are_never_trained_on() -> None:
    new = [_ex(i, f"r{i}", "ab"[i % 2], text=f"new{i}") for i in range(200)]
    data = build_training_set(new, [], holdout_fraction=0.2, seed=0, reference_share=0.1)
    used = {r.text for r in data.train + data.holdout}
    held = {f"new{i}" for i in range(200) if is_reference(f"r{i}", 0.1)}
    assert data.reference_held == len(held) > 0 and not used & held and len(used) == 200 - len(held)


@pytest.mark.parametrize(("replay_ratio", "per_label"), [(1.0, 100), (1.0, 5), (0.0, 100)])
def test_the_head_is_refitted_on_the_reservoir_not_only_the_replay_sample(env, monkeypatch, replay_ratio: float,
                                                                         per_label: int) -> None:
    learner, buffer, *_ = env
    learner.settings = learner.settings.model_copy(update={"replay_ratio": replay_ratio, "learner_mode": "lora",
                                                           "head_fit_per_label": per_label})
    fitted, trained = [], []
    fit_head, finetune = learner.trainer.fit_head, learner.trainer.finetune
    monkeypatch.setattr(learner.trainer, "fit_head", lambda m, lm, rows: fitted.extend(rows) or fit_head(m, lm, rows))
    monkeypatch.setattr(learner.trainer, "finetune",
                        lambda m, lm, rows, *a, **k: trained.extend(rows) or finetune(m, lm, rows, *a, **k))
    reservoir = {(e.text, e.label) for e in buffer.replay_sample(10**6, 0)  # the bootstrap rows, deduplicated,
                 if not is_reference(e.request_id, learner.settings.reference_share)}  # less the reference set
    _feed(buffer, random.Random(5), "c" * 10, 0)
    outcome = learner.run_cycle("count")
    head, train = [(r.text, r.label) for r in fitted], {(r.text, r.label) for r in trained}
    assert train <= set(head) and outcome.head_rows == len(head)
    extra = [pair for pair in head if pair not in train]
    assert len(extra) == len(set(extra))  # each reservoir example once
    if replay_ratio == 0:
        assert not extra  # no replay: the naive baseline refits on this cycle's rows alone
    elif per_label >= 30:
        assert reservoir <= set(head)  # the whole reservoir, not only the 40 rows of the replay sample
        assert len(set(head) & reservoir) > len(train & reservoir)
    else:
        assert all(sum(label == y for _, y in extra) <= per_label for label in "ab")


def test_a_learner_failing_mid_training_changes_nothing_and_the_claim_comes_back(env, monkeypatch) -> None:
    learner, buffer, registry, _, first, rng = env
    _feed(buffer, rng, "c" * 20, 0)
    versions = [v.version for v in registry.versions()]

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed during training")

    monkeypatch.setattr(learner.trainer, "finetune", crash)
    outcome = learner.run_cycle("ops")
    assert outcome.outcome == "failed" and "killed" in outcome.reason
    assert registry.active().version == first and [v.version for v in registry.versions()] == versions
    time.sleep(0.6)  # claim_idle_s
    again = buffer.claim("other-learner", 100)
    assert len(again.examples) == 20


def test_labels_beyond_the_head_capacity_are_not_learned(env) -> None:
    learner, buffer, registry, *_ = env
    labels = [f"x{i}" for i in range(10)]
    for i, label in enumerate(labels * 3):
        buffer.append(Example(event_id=f"cap{i}", request_id=f"cap{i}", text=f"{label} words {i}", kind="label",
                              label=label, served_label="a", adapter_version="v"))
    outcome = learner.run_cycle("ops")
    assert outcome.labels == 8  # capacity 8: 2 known + 6 new


def test_ready_follows_the_buffer(env, monkeypatch) -> None:
    learner, buffer, *_ = env
    assert learner.ready()

    def down() -> int:
        raise ConnectionError("redis down")

    monkeypatch.setattr(buffer, "pending", down)
    assert not learner.ready()


@pytest.mark.parametrize(("lora_right", "head_right", "kept"), [(5, 3, "lora"), (3, 5, "head_only"),
                                                                (4, 4, "head_only")])
def test_auto_keeps_lora_only_when_it_beats_the_head_refit(env, monkeypatch, lora_right: int, head_right: int,
                                                           kept: str) -> None:
    """learner_mode auto: both recipes score the holdout + reference rows; a tie goes to the head refit."""
    learner, buffer, registry, *_ = env
    assert learner.settings.learner_mode == "auto"  # the shipped default
    finetune, correct = learner.trainer.finetune, learner.trainer.correct

    def tuned(model, *args, **kwargs):
        model._loraloop_tuned = True
        return finetune(model, *args, **kwargs)

    def scored(model, label_map, rows, among=None):
        if among is None and len(rows) >= max(lora_right, head_right) and getattr(model, "_loraloop_selecting", 0):
            right = lora_right if getattr(model, "_loraloop_tuned", False) else head_right
            return [i < right for i in range(len(rows))]
        return correct(model, label_map, rows, among)

    monkeypatch.setattr(learner.trainer, "finetune", tuned)
    monkeypatch.setattr(learner.trainer, "correct", scored)
    refit = learner._head_refit
    monkeypatch.setattr(learner, "_head_refit", lambda *a: _selecting(refit(*a)))
    monkeypatch.setattr(learner.trainer, "fit_head", _marking(learner.trainer.fit_head))
    _feed(buffer, random.Random(5), "ab" * 40, 0)
    outcome = learner.run_cycle("count")
    assert outcome.recipe == kept, outcome.recipe_evidence
    evidence = outcome.recipe_evidence
    assert (evidence["lora_right"], evidence["head_only_right"]) == (lora_right, head_right)
    assert evidence["selection_rows"] == outcome.candidate["n_holdout"] + outcome.reference_rows
    record = registry.cycles()[-1]
    assert record["recipe"] == kept and record["recipe_evidence"] == evidence
    if outcome.version:
        assert registry.show(outcome.version).metadata["recipe"] == kept


def _selecting(pair):
    pair[0]._loraloop_selecting = 1
    return pair


def _marking(fit_head):
    def inner(model, label_map, rows):
        model._loraloop_selecting = 1
        return fit_head(model, label_map, rows)
    return inner


def test_a_drain_cycle_learns_the_tail_once_feedback_stops() -> None:
    from learner.trigger import due

    # fewer than cycle_min_feedback examples pending, timer far away: only a pause in feedback starts a cycle
    assert due(100.0, 0.0, 5, False, 600.0, 200, quiet_since=95.0, drain_s=30.0) is None
    assert due(130.0, 0.0, 5, False, 600.0, 200, quiet_since=95.0, drain_s=30.0) == "drain"
    assert due(130.0, 120.0, 5, False, 600.0, 200, quiet_since=95.0, drain_s=30.0) is None  # a cycle just ran
    assert due(130.0, 0.0, 5, False, 600.0, 200, quiet_since=95.0, drain_s=0.0) is None  # off


def test_drain_runs_one_cycle_on_what_is_pending_and_waits_for_it(env) -> None:
    import threading

    learner, buffer, registry, *_ = env
    _feed(buffer, random.Random(3), "ab" * 10, 0)  # below cycle_min_feedback
    stop = threading.Event()
    thread = threading.Thread(target=learner.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert learner.drain(timeout_s=120)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert buffer.pending() == 0
    assert registry.cycles()[-1]["trigger"] == "drain"
