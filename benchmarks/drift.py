"""The continual-learning scenario: does loraloop learn new labels without forgetting, next to its baselines?

Every system serves the same seeded request stream through the real worker, feedback
ingester, learner and rollback guard (``loraloop.demo.run.Demo``, embedded transport), in
three phases (known labels only; half known, half new; all labels), with simulated users
labelling ``--feedback-fraction`` of the predictions with ``--noise`` label noise. The
labels are shuffled and the first 60% are *known*: the first adapter is trained offline on
their training examples. Systems (each runs in a fresh process, so that no in-process
transport, buffer or registry is shared between them):

* ``loraloop``: the loop as shipped (replay, gate, guard, LoRA + head);
* ``static``: the first adapter, never updated (``DemoConfig(learn=False)``);
* ``naive``: the same learner without replay and without the gate;
* ``head_only``: the same loop with the encoder frozen, only the linear head refitted;
* ``oracle``: offline, the better of a logistic regression on frozen mean-pooled
  embeddings and a head fit + one LoRA epoch, both on the whole training file.

Reported per system (JSON with ``--out``): ``final_accuracy``, ``final_accuracy_known``,
``final_accuracy_new`` on the test file; except for the oracle, ``forgetting`` (known-label
test accuracy at the end minus after bootstrap) and ``prequential_accuracy`` (live accuracy
per window of the stream); for the learning systems also ``requests_to_80pct_new``
(requests after the first new-label request until the rolling new-label live accuracy
reaches 80% of the final new-label test accuracy), ``promotions``, ``rejections``,
``rollbacks`` and ``learner_time_s`` (sum of cycle durations). ``--poison`` also runs
loraloop with a burst of adversarial feedback and compares its final accuracy with the
clean run. ``--plot`` draws the prequential accuracy of every system with loraloop's
promotion, rejection and rollback markers.

Example::

    .venv/bin/python benchmarks/drift.py --requests 4000 --out results/drift.json --plot results/drift.png
    .venv/bin/python benchmarks/drift.py --quick --out /tmp/drift_quick.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from _common import machine, print_table, write_json

logger = logging.getLogger("benchmarks.drift")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "banking77"
LIVE_SYSTEMS = ("loraloop", "static", "naive", "head_only")
# oracle_same_feedback is computed inside loraloop's run, from what that run's users sent.
SYSTEMS = (*LIVE_SYSTEMS, "oracle", "oracle_same_feedback")
# Settings each live system changes; everything else is the shipped default (or the demo's).
SYSTEM_SETTINGS: dict[str, dict[str, object]] = {
    "loraloop": {}, "static": {}, "naive": {"replay_ratio": 0.0, "gate_enabled": False, "reference_share": 0.0},
    "head_only": {"learner_mode": "head_only"}}
QUICK_SETTINGS = {"cycle_min_feedback": 40, "epochs": 1, "guard_min_judged": 20, "guard_window_s": 5.0}
# A version that trained on more than this share of the burst's wrong labels in its claim "learned the
# poison" (label noise is 5% by default: a screen that misses a few is not what the criterion is about).
POISON_TRAINED_SHARE = 0.1
NEW_LABEL_WINDOW = 50  # new-label requests in the rolling accuracy of requests_to_80pct_new


# --- pure figures -----------------------------------------------------------------------------
def window_means(values: Sequence[bool], n_windows: int) -> list[float]:
    """Mean of ``values`` over ``n_windows`` consecutive equal windows (the last one takes the rest).

    Example:
        >>> window_means([1, 1, 0, 0, 1, 0], 3)
        [1.0, 0.0, 0.5]
    """
    if not values:
        return []
    n_windows = max(1, min(n_windows, len(values)))
    size = len(values) // n_windows
    bounds = [i * size for i in range(n_windows)] + [len(values)]
    return [round(sum(values[a:b]) / (b - a), 4) for a, b in zip(bounds, bounds[1:], strict=False)]


def requests_to_fraction(correct: Sequence[bool], is_new: Sequence[bool], target: float, fraction: float = 0.8,
                         window: int = NEW_LABEL_WINDOW) -> int | None:
    """Requests from the first new-label request until the rolling new-label accuracy reaches ``fraction * target``.

    The rolling accuracy is the mean over the last ``window`` new-label requests (fewer
    when the stream has few: a quarter of them); it is read only once the window is full.
    None when there is no new-label request, the target is 0, or the level is never reached.

    Example:
        >>> requests_to_fraction([0, 1, 0, 0, 1, 1, 1, 1, 1], [False] + [True] * 8, 1.0, 0.8, window=2)
        4
    """
    idx = [i for i, new in enumerate(is_new) if new]
    if not idx or target <= 0:
        return None
    w = max(1, min(window, len(idx) // 4))
    total = 0.0
    for k, i in enumerate(idx):
        total += correct[i]
        if k >= w:
            total -= correct[idx[k - w]]
        if k + 1 >= w and total / w >= fraction * target - 1e-12:
            return i - idx[0]
    return None


def split_accuracy(predicted: Sequence[str], truth: Sequence[str], known: set[str]) -> dict[str, float]:
    """Accuracy over all rows, rows of known labels and rows of new labels.

    Example:
        >>> split_accuracy(["a", "b", "c", "c"], ["a", "b", "b", "c"], {"a", "b"})
        {'final_accuracy': 0.75, 'final_accuracy_known': 0.6667, 'final_accuracy_new': 1.0}
    """
    def acc(rows: list[tuple[str, str]]) -> float:
        return round(sum(p == t for p, t in rows) / len(rows), 4) if rows else 0.0

    pairs = list(zip(predicted, truth, strict=True))
    return {"final_accuracy": acc(pairs), "final_accuracy_known": acc([r for r in pairs if r[1] in known]),
            "final_accuracy_new": acc([r for r in pairs if r[1] not in known])}


# --- one system, in its own process ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Job:
    """What a child process needs to run one system (picklable)."""

    system: str
    train: str
    test: str
    text_column: str
    label_column: str
    requests: int
    rate: float
    feedback_fraction: float
    noise: float
    seed: int
    out: str
    settings: dict
    windows: int = 20
    poison: bool = False
    poison_share: float = 0.2
    oracle_finetune: bool = True
    threads: int = 0
    bootstrap_per_label: int = 40
    max_test: int = 10**9
    same_feedback_oracle: bool = False  # loraloop's run also trains the oracle on the feedback it received


def _settings(job: Job):
    from loraloop.settings import Settings

    return Settings(**{**job.settings, **SYSTEM_SETTINGS.get(job.system, {}), "seed": job.seed})


def poisoned_versions(cycles: list[dict], start: float, end: float) -> set[str]:
    """Versions trained on feedback given within [start, end] (unix time), or descended from one.

    Example:
        >>> cycles = [{"version": "v2", "parent": "v1", "window": [10, 20]},
        ...           {"version": "v3", "parent": "v2", "window": [30, 40]},
        ...           {"version": "v4", "parent": "v1", "window": [50, 60]}]
        >>> sorted(poisoned_versions(cycles, 15, 25))
        ['v2', 'v3']
    """
    out: set[str] = set()
    for cycle in cycles:
        version, (low, high) = cycle.get("version"), cycle.get("window") or (0.0, 0.0)
        if version and ((low <= end and high >= start) or cycle.get("parent") in out):
            out.add(version)
    return out


def _demo_class():
    from loraloop.demo.run import Demo

    class TimedDemo(Demo):
        """The demo, noting when each prediction was judged (to date the poisoned feedback) and what each
        learner claim held (to count the poisoned examples each version trained on)."""

        judged_at: list[float]
        claimed: dict[str, set[str]]

        def _build(self) -> None:
            super()._build()
            self.claimed, claim = {}, self.buffer.claim

            def recording_claim(consumer: str, max_items: int):
                taken = claim(consumer, max_items)
                self.claimed[taken.claim_id] = {e.event_id for e in taken.examples}
                return taken

            self.buffer.claim = recording_claim

        def _judge(self, *args, **kwargs) -> None:
            before = len(self.observed.correct)
            super()._judge(*args, **kwargs)
            if len(self.observed.correct) > before:
                self.judged_at = getattr(self, "judged_at", [])
                self.judged_at.append(time.time())

    return TimedDemo


def poison_trained(cycles: list[dict], claimed: dict[str, set[str]], poisoned: set[str]) -> dict[str, dict]:
    """Per version: the burst's wrong labels its claim held, how many the screen set aside, how many it trained on.

    Example:
        >>> cycles = [{"version": "v2", "claim_id": "c1", "screened_ids": ["p1", "p2"]}]
        >>> poison_trained(cycles, {"c1": {"p1", "p2", "p3", "ok"}}, {"p1", "p2", "p3"})
        {'v2': {'claimed': 3, 'screened': 2, 'trained': 1}}
    """
    out = {}
    for cycle in cycles:
        held = claimed.get(cycle.get("claim_id", ""), set()) & poisoned
        if cycle.get("version") and held:
            screened = len(held & set(cycle.get("screened_ids") or ()))
            out[cycle["version"]] = {"claimed": len(held), "screened": screened, "trained": len(held) - screened}
    return out


def learned_the_poison(cycles: list[dict], trained: dict[str, dict], share: float) -> set[str]:
    """Versions that trained on more than ``share`` of the wrong labels their claim held, or descend from one.

    Example:
        >>> cycles = [{"version": "v2", "parent": "v1"}, {"version": "v3", "parent": "v2"},
        ...           {"version": "v4", "parent": "v1"}]
        >>> sorted(learned_the_poison(cycles, {"v2": {"claimed": 50, "trained": 20},
        ...                                    "v4": {"claimed": 50, "trained": 2}}, share=0.1))
        ['v2', 'v3']
    """
    out: set[str] = set()
    for cycle in cycles:
        mine = trained.get(cycle.get("version"), {})
        if mine.get("trained", 0) > share * mine.get("claimed", 0) or cycle.get("parent") in out:
            out.add(cycle["version"])
    return out


def _poison_report(demo, job: Job, cycles: list[dict], final: str | None) -> dict:
    """Which versions learned from the adversarial burst, and whether one is active at the end.

    A version "learned the poison" when it trained on more than POISON_TRAINED_SHARE of the
    burst's wrong labels in its claim (the screen missed them), or descends from one. The
    versions merely trained on feedback given during the burst are listed too.
    """
    n = len(demo.judged_at)
    first, end = demo.config.poison_span(job.requests)
    last = min(n, end) - 1
    if n == 0 or first > last:
        return {"poisoned_versions": [], "poisoned_versions_promoted": [], "poisoned_version_active_at_end": False}
    during = poisoned_versions(cycles, demo.judged_at[first], demo.judged_at[last])
    trained = poison_trained(cycles, demo.claimed, demo.observed.poisoned_events)
    bad = learned_the_poison(cycles, trained, POISON_TRAINED_SHARE)
    promoted = [c["version"] for c in cycles if c.get("outcome") == "promoted" and c.get("version") in bad]
    return {"poisoned_events": len(demo.observed.poisoned_events), "poison_by_version": trained,
            "poison_trained_share": POISON_TRAINED_SHARE, "versions_trained_during_burst": sorted(during),
            "versions_trained_during_burst_active_at_end": final in during,
            "poisoned_versions": sorted(bad), "poisoned_versions_promoted": promoted,
            "poisoned_version_active_at_end": final in bad}


def run_live(job: Job) -> dict:
    """Run one live system through ``Demo``; return its figures plus the per-request trace for the plot."""
    import torch

    from loraloop.demo.run import DemoConfig

    if job.threads:
        torch.set_num_threads(job.threads)
    config = DemoConfig(out=Path(job.out), dataset=job.train, test_dataset=job.test, text_column=job.text_column,
                        label_column=job.label_column, requests=job.requests, rate=job.rate,
                        feedback_fraction=job.feedback_fraction, noise=job.noise, max_test=job.max_test,
                        bootstrap_per_label=job.bootstrap_per_label, poison=job.poison, poison_share=job.poison_share,
                        seed=job.seed,
                        learn=job.system != "static", pace_with_learner=True)
    demo = _demo_class()(_settings(job), config)
    summary = demo.run()
    obs = demo.observed
    cycles = [c for c in demo.registry.cycles() if c.get("outcome") != "empty"]
    known_initial, known_final = summary["old_label_accuracy_initial"], summary["old_label_accuracy_final"]
    result = {
        "final_accuracy": summary["accuracy_final"], "final_accuracy_known": known_final,
        "final_accuracy_new": summary["new_label_accuracy_final"],
        "initial_accuracy": summary["accuracy_initial"], "initial_accuracy_known": known_initial,
        "forgetting": round(known_final - known_initial, 4),
        "prequential_accuracy": window_means(obs.correct, job.windows),
        "prequential_window": max(1, len(obs.correct) // max(1, job.windows)),
        "live_accuracy": summary["live_accuracy"], "requests": summary["requests"],
        "feedback_events": summary["feedback_events"], "duration_s": summary["duration_s"],
        "final_version": summary["final_version"],
    }
    if job.system != "static":
        result.update({
            "requests_to_80pct_new": requests_to_fraction(obs.correct, obs.is_new, summary["new_label_accuracy_final"]),
            "promotions": summary["promotions"], "rejections": summary["rejections"], "rollbacks": summary["rollbacks"],
            "cycles": len(cycles),
            "learner_time_s": round(sum(sum((c.get("timings") or {}).values()) for c in cycles), 2),
            "quarantined_examples": sum(c.get("examples", 0) - c.get("screened_examples", 0)
                                        for c in cycles if c.get("quarantined")),
            "screened_examples": sum(c.get("screened_examples", 0) for c in cycles),
            "gate_log": [{"version": c.get("version"), "outcome": c.get("outcome"), "reason": c.get("reason"),
                          "reference_rows": c.get("reference_rows"), "quarantined": c.get("quarantined", False),
                          "screened": c.get("screened", {}), "recipe": c.get("recipe"),
                          "recipe_evidence": c.get("recipe_evidence")} for c in cycles],
        })
    if job.system != "static" and demo.guard is not None:
        result["guard_decisions"] = [{"version": e.version, "action": e.action, "reason": e.reason,
                                      "after_s": round(e.decided_at - e.promoted_at, 1)} for e in demo.guard.events]
    if job.system != "static":
        result.update(set_aside_report(cycles, demo.claimed, demo.sent_feedback, demo.observed.poisoned_events))
        learned = requests_to_learn(demo.sent_feedback, demo.feedback_at, cycles, demo.events)
        result["requests_to_learn"] = learned
        waits = sorted(v for v in learned.values() if v is not None)
        result["requests_to_learn_median"] = waits[len(waits) // 2] if waits else None
        result["labels_never_learned"] = sorted(k for k, v in learned.items() if v is None)
    if job.poison:
        result.update(_poison_report(demo, job, cycles, summary["final_version"]))
    out_extra = {}
    if job.same_feedback_oracle:
        out_extra["oracle_same_feedback"] = oracle_same_feedback(job, demo.bootstrap_rows, demo.sent_feedback)
    trace = {"correct": [bool(c) for c in obs.correct], "is_new": list(obs.is_new), "phases": list(obs.phases),
             "events": [list(e) for e in demo.events]}
    return {"result": result, "trace": trace, "labels": (summary["known_labels"], summary["new_labels"]), **out_extra}


def _test_split(job: Job) -> tuple[list[tuple[str, str]], list[tuple[str, str]], set[str]]:
    """(train rows, the test rows Demo evaluates on -- the same shuffle and cut --, the known labels)."""
    from loraloop.demo.data import load_csv
    from loraloop.demo.scenario import DriftPlan

    train = list(dict(load_csv(job.train, job.text_column, job.label_column)).items())
    test = load_csv(job.test, job.text_column, job.label_column)
    random.Random(job.seed).shuffle(test)
    test = test[:job.max_test]
    labels = sorted({label for _, label in train})
    return train, test, set(DriftPlan.split(labels, 0.6, job.seed).known)


def _offline(job: Job, train: list, negatives: list, test: list[tuple[str, str]], known: set[str],
             epochs: int, recipe: str) -> dict:
    """The better of LR on frozen embeddings and head fit + ``epochs`` LoRA epochs (named ``recipe``).

    ``train``: Labelled rows; ``negatives``: Negative rows (the recipe's unlikelihood term uses them).
    """
    import torch
    from _oracle import embed
    from sklearn.linear_model import LogisticRegression
    from transformers import set_seed

    from learner.train import Trainer
    from loraloop.model import LabelMap

    if job.threads:
        torch.set_num_threads(job.threads)
    settings = _settings(job)
    labels = sorted({r.label for r in train})
    truth = [label for _, label in test]
    candidates: dict[str, dict] = {}
    started = time.perf_counter()
    x_train, x_test = embed(settings, [r.text for r in train]), embed(settings, [t for t, _ in test])
    clf = LogisticRegression(max_iter=2000, C=10.0).fit(x_train, [r.label for r in train])
    candidates["logistic_regression"] = {**split_accuracy(list(clf.predict(x_test)), truth, known),
                                         "seconds": round(time.perf_counter() - started, 1)}
    if job.oracle_finetune:
        started = time.perf_counter()
        set_seed(job.seed)
        settings = settings.model_copy(update={"label_capacity": max(settings.label_capacity, len(labels))})
        trainer = Trainer(settings, show_progress=False)
        model, label_map = trainer.model_for(None, trainable=True), LabelMap(tuple(labels))
        trainer.fit_head(model, label_map, train)
        trainer.finetune(model, label_map, train, [n for n in negatives if n.label in labels], epochs=epochs)
        predicted = [label_map.labels[i] for i in trainer.predict(model, [t for t, _ in test], len(label_map))]
        candidates[recipe] = {
            **split_accuracy(predicted, truth, known), "seconds": round(time.perf_counter() - started, 1)}
    best = max(candidates, key=lambda name: candidates[name]["final_accuracy"])
    return {**{k: v for k, v in candidates[best].items() if k != "seconds"}, "method": best,
            "rows": len(train), "candidates": candidates}


def run_oracle(job: Job) -> dict:
    """The offline oracle: the better of LR on frozen embeddings and head fit + 1 LoRA epoch, on the whole train file."""
    from learner.dataset import Labelled

    train, test, known = _test_split(job)
    return {"result": _offline(job, [Labelled(t, y) for t, y in train], [], test, known, epochs=1,
                               recipe="lora_finetune")}


def same_feedback_rows(bootstrap: list[tuple[str, str]], sent: list) -> tuple[list, list]:
    """What the loop received, resolved as the learner resolves it: (Labelled rows, Negative rows).

    ``sent``: (FeedbackEvent, request text, served label) for every event the users sent, noise and
    poison included. A thumbs-up confirms the served label, a thumbs-down only rejects it.

    Example:
        >>> from loraloop.schemas import FeedbackEvent
        >>> ev = lambda i, r, kind, label=None: FeedbackEvent(event_id=i, request_id=r, kind=kind, label=label, ts=1.0)
        >>> rows, negatives = same_feedback_rows([("hi", "greet")], [(ev("e1", "r1", "thumbs_up"), "bye", "leave"),
        ...     (ev("e2", "r2", "thumbs_down"), "eh", "greet"), (ev("e3", "r3", "label", "x"), "x?", "greet")])
        >>> [(r.text, r.label) for r in rows], [(n.text, n.label) for n in negatives]
        ([('hi', 'greet'), ('bye', 'leave'), ('x?', 'x')], [('eh', 'greet')])
    """
    from learner.dataset import Labelled, Negative, resolve
    from loraloop.schemas import Example

    examples = [Example(event_id=e.event_id, request_id=e.request_id, text=text, kind=e.kind,
                        label={"label": e.label, "thumbs_up": served}.get(e.kind),
                        negative_label=served if e.kind == "thumbs_down" else None, served_label=served,
                        adapter_version="", ts=e.ts) for e, text, served in sent]
    resolved, _ = resolve(examples)
    rows = [Labelled(t, y) for t, y in bootstrap] + [r for r in resolved if isinstance(r, Labelled)]
    return rows, [r for r in resolved if isinstance(r, Negative)]


def oracle_same_feedback(job: Job, bootstrap: list[tuple[str, str]], sent: list) -> dict:
    """Offline, on exactly what the loop received (bootstrap rows + every feedback event), the same test rows."""
    _, test, known = _test_split(job)
    rows, negatives = same_feedback_rows(bootstrap, sent)
    return _offline(job, rows, negatives, test, known, epochs=_settings(job).epochs, recipe="learner_recipe")


def requests_to_learn(sent: list, sent_at: list[int], cycles: list[dict], events: list) -> dict[str, int | None]:
    """Per label: requests from its first feedback to the first promoted version right on most of its holdout rows.

    ``sent``/``sent_at``: every feedback event and the prediction index it judged; ``events``: (prediction
    index, kind, version) of promotions as the stream saw them; None: never learned within the stream.

    Example:
        >>> from loraloop.schemas import FeedbackEvent
        >>> sent = [(FeedbackEvent(event_id="e", request_id="r", kind="label", label="x"), "t", "y")]
        >>> cycles = [{"version": "v2", "outcome": "promoted", "holdout_by_label": {"x": [0, 2]}},
        ...           {"version": "v3", "outcome": "promoted", "holdout_by_label": {"x": [2, 3]}}]
        >>> requests_to_learn(sent, [10], cycles, [(50, "promoted", "v2"), (90, "promoted", "v3")])
        {'x': 80}
    """
    first: dict[str, int] = {}
    for (event, _, served), index in zip(sent, sent_at, strict=True):
        label = event.label if event.kind == "label" else served if event.kind == "thumbs_up" else None
        if label is not None:
            first.setdefault(label, index)
    promoted_at = {version: index for index, kind, version in events if kind == "promoted"}
    out: dict[str, int | None] = {}
    for label, start in first.items():
        out[label] = None
        for cycle in cycles:
            right, rows = (cycle.get("holdout_by_label") or {}).get(label, (0, 0))
            at = promoted_at.get(cycle.get("version"))
            if cycle.get("outcome") == "promoted" and rows and 2 * right > rows and at is not None and at >= start:
                out[label] = at - start
                break
    return out


def set_aside_report(cycles: list[dict], claimed: dict[str, set[str]], sent: list, poisoned: set[str]) -> dict:
    """Honest corrections (label events not from a poisoned burst) and how many the screen and the gate set aside.

    The screen sets aside its suspect rows; the gate's quarantine keeps a whole claim out of the reservoir.

    Example:
        >>> from loraloop.schemas import FeedbackEvent
        >>> sent = [(FeedbackEvent(event_id=f"e{i}", request_id=f"r{i}", kind="label", label="a"), "t", "b")
        ...         for i in range(4)]
        >>> cycles = [{"claim_id": "c1", "screened_ids": ["e0", "e3"]}, {"claim_id": "c2", "quarantined": True}]
        >>> set_aside_report(cycles, {"c1": {"e0", "e3"}, "c2": {"e1"}}, sent, poisoned={"e3"})
        {'honest_corrections': 3, 'screened_honest': 1, 'quarantined_honest': 1, 'set_aside_honest': 2}
    """
    honest = {e.event_id for e, _, _ in sent if e.kind == "label"} - poisoned
    screened = {i for c in cycles for i in c.get("screened_ids") or ()} & honest
    quarantined = {i for c in cycles if c.get("quarantined") for i in claimed.get(c.get("claim_id", ""), ())}
    quarantined = (quarantined & honest) - screened
    return {"honest_corrections": len(honest), "screened_honest": len(screened),
            "quarantined_honest": len(quarantined), "set_aside_honest": len(screened) + len(quarantined)}


# Imported once by the fork server, so that each system's fresh process starts in a second, not in ten.
PRELOAD = ["torch", "transformers", "peft", "sklearn.linear_model", "loraloop.demo.run", "services.worker",
           "feedback.ingester", "learner.cycle"]


def _in_fresh_process(fn, job: Job) -> dict:
    """Run ``fn(job)`` in a fresh process (in-process transports and buffers are process-wide singletons).

    The process is forked from a fork server that imported the heavy modules and ran nothing else.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, job).result()


# --- data ----------------------------------------------------------------------------------------
def quick_data(folder: Path, seed: int) -> tuple[Path, Path]:
    """A small synthetic train/test pair (``loraloop.demo.data.generate_intents``) as text,label CSVs."""
    import csv

    from loraloop.demo.data import generate_intents

    paths = []
    for name, per_label, offset in (("train.csv", 60, 0), ("test.csv", 15, 1)):
        path = folder / name
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(generate_intents(per_label=per_label, seed=seed + offset))
        paths.append(path)
    return paths[0], paths[1]


# --- output --------------------------------------------------------------------------------------
def plot(path: Path, traces: dict[str, dict], oracle: float | None, window: int, title: str,
         quiet: bool = False, poison_span: tuple[int, int] | None = None) -> None:
    """Rolling prequential accuracy of every system, loraloop's promotions/rejections/rollbacks marked,
    and the poisoned burst's requests shaded when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from loraloop.demo.scenario import rolling

    colors = {"loraloop": "black", "static": "tab:grey", "naive": "tab:orange", "head_only": "tab:blue",
              "loraloop_poisoned": "tab:red"}
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    for name, trace in traces.items():
        values = [float(c) for c in trace["correct"]]
        ax.plot(range(len(values)), rolling(values, window), lw=2 if name == "loraloop" else 1.2,
                color=colors.get(name), label=name)
    if oracle is not None:
        ax.axhline(oracle, color="tab:green", ls="--", lw=1, label=f"offline oracle (test) {oracle:.3f}")
    if poison_span is not None:
        ax.axvspan(*poison_span, color="tab:red", alpha=0.08, label="poisoned burst (loraloop_poisoned)")
    phases = next(iter(traces.values()))["phases"] if traces else []
    for phase in (1, 2):
        if phase in phases:
            ax.axvline(phases.index(phase), color="grey", ls=":", lw=1)
    style = {"promoted": ("tab:green", "^", "loraloop promotion"), "rejected": ("tab:orange", "x", "rejected by gate"),
             "rolled_back": ("tab:red", "v", "rolled back by guard")}
    seen: set[str] = set()
    for index, kind, _ in traces.get("loraloop", {}).get("events", []):
        color, marker, name = style.get(kind, ("grey", "o", kind))
        ax.plot([index], [0.03], marker=marker, color=color, ms=9, ls="none", label=None if kind in seen else name)
        seen.add(kind)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("request (arrival order)")
    ax.set_ylabel(f"live accuracy (rolling {window})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    if not quiet:
        print(f"wrote {path}")


def print_results(results: dict[str, dict]) -> None:
    columns = ["system", "final_accuracy", "final_accuracy_known", "final_accuracy_new", "forgetting",
               "efficiency", "efficiency_new", "set_aside_honest", "requests_to_80pct_new",
               "requests_to_learn_median", "promotions",
               "rejections", "rollbacks", "learner_time_s", "live_accuracy"]

    def cell(figures: dict, key: str) -> object:
        value, spread = figures.get(key), (figures.get("sd") or {}).get(key)
        if isinstance(value, float) and len(figures.get("seeds") or ()) > 1 and spread is not None:
            return f"{value:.4f} ± {spread:.4f}"
        return value

    rows = [{"system": name, **{k: cell(figures, k) for k in columns[1:]}} for name, figures in results.items()]
    seeds = next(iter(results.values()), {}).get("seeds") or []
    print_table(rows, columns, title="drift scenario: test accuracy at the end, and the loop's activity"
                + (f" (mean ± sd over seeds {seeds})" if len(seeds) > 1 else ""))


# --- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, default=DEFAULT_DATA / "train.csv", help="Training CSV (the stream).")
    parser.add_argument("--test", type=Path, default=DEFAULT_DATA / "test.csv", help="Test CSV (final accuracy).")
    parser.add_argument("--text-column", default="text", help="Text column of both CSVs (default: text).")
    parser.add_argument("--label-column", default="category", help="Label column of both CSVs (default: category).")
    parser.add_argument("--requests", type=int, default=4000, help="Requests in the stream (default: 4000).")
    parser.add_argument("--rate", type=float, default=25.0, help="Requests per second sent (default: 25).")
    parser.add_argument("--feedback-fraction", type=float, default=0.5, help="Share of predictions users judge.")
    parser.add_argument("--noise", type=float, default=0.05, help="Share of user labels that are wrong.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the scenario and of training.")
    parser.add_argument("--seeds", default="",
                        help="Comma-separated seeds: every system runs on every seed; figures are means with their "
                        "standard deviation and a per_seed list (default: --seed alone).")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="Combine the per-seed figures of earlier runs (split by seed or by system) into --out; "
                        "runs nothing.")
    parser.add_argument("--poison", action="store_true",
                        help="Also run loraloop with a burst of adversarial feedback and compare with the clean run: "
                        "from 55%% of the stream, for 20%% of it, a share --poison-share of the judged predictions "
                        "get a label naming one known intent.")
    parser.add_argument("--poison-share", type=float, default=0.2,
                        help="Share of the burst's judged predictions whose label is flipped (default: 0.2; 1.0: all).")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="Comma-separated subset of " + ",".join(SYSTEMS) + ", run in the order given")
    parser.add_argument("--bootstrap-per-label", type=int, default=40,
                        help="Training examples per known label of the first adapter (default: 40).")
    parser.add_argument("--max-test", type=int, default=10**9,
                        help="Evaluate on at most this many test rows (a seeded shuffle; default: all).")
    parser.add_argument("--windows", type=int, default=20, help="Windows of the prequential accuracy list.")
    parser.add_argument("--quick", action="store_true",
                        help="CI size: synthetic data, a tiny random base model, a few hundred requests.")
    parser.add_argument("--out", type=Path, help="Write the results as JSON to this file.")
    parser.add_argument("--plot", type=Path, help="Write the prequential accuracy plot (PNG) to this file.")
    parser.add_argument("--device", default="cpu", help="Torch device of worker and learner (default: cpu).")
    parser.add_argument("--base-model", default="", help="Base model (default: bundled MiniLM; tiny with --quick).")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads per system (0: torch default).")
    parser.add_argument("--no-oracle-finetune", action="store_true",
                        help="Oracle: logistic regression only (the LoRA epoch on the whole file is skipped).")
    args = parser.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(args.systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown system(s) {unknown}; choose from {list(SYSTEMS)}")
    if "oracle_same_feedback" in args.systems and "loraloop" not in args.systems:
        parser.error("oracle_same_feedback trains on what loraloop's run received: add loraloop to --systems")
    try:
        args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds else [args.seed]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if args.merge and not args.out:
        parser.error("--merge needs --out")
    return args


def _setup(args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    """Data files, base model and settings of the run (quick: synthetic data and a tiny base)."""
    settings: dict[str, object] = {"device": args.device}
    if args.quick or not (args.train.exists() and args.test.exists()):
        if not args.quick:
            raise SystemExit(f"{args.train} or {args.test} not found (use --train/--test, or --quick)")
        args.train, args.test = quick_data(tmp, args.seed)
        args.text_column, args.label_column = "text", "label"
        if args.requests == parse_args([]).requests:
            args.requests = 240
        args.rate = max(args.rate, 60.0)
        args.no_oracle_finetune = True
        args.threads = args.threads or 1  # a tiny model: more threads only contend
        settings.update(QUICK_SETTINGS)
    if args.base_model:
        settings["base_model"] = args.base_model
    elif args.quick:
        from loraloop.testing import save_tiny_base_model

        settings["base_model"] = str(save_tiny_base_model(tmp / "tiny-base"))
    return settings


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.merge:
        merged = merge_runs([json.loads(path.read_text()) for path in args.merge])
        write_json(args.out, merged)
        print_results({k: v for k, v in merged.items() if k in SYSTEMS})
        return 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="loraloop-drift-") as tmp_name:
        tmp = Path(tmp_name)
        settings = _setup(args, tmp)
        run = Run(args, settings, started)
        for seed in args.seeds:
            run_seed(args, settings, tmp / f"seed{seed}", seed, run)
        run.report()
    return 0


def run_seed(args: argparse.Namespace, settings: dict, tmp: Path, seed: int, run: Run) -> None:
    """Every asked-for system on one seed; figures land in ``run`` as soon as each system ends."""
    tmp.mkdir(parents=True, exist_ok=True)

    def job(system: str, **extra: object) -> Job:
        return Job(system=system, train=str(args.train), test=str(args.test), text_column=args.text_column,
                   label_column=args.label_column, requests=args.requests, rate=args.rate,
                   feedback_fraction=args.feedback_fraction, noise=args.noise, seed=seed,
                   out=str(tmp / system), settings=settings, windows=args.windows, threads=args.threads,
                   oracle_finetune=not args.no_oracle_finetune, bootstrap_per_label=args.bootstrap_per_label,
                   max_test=args.max_test, **extra)

    order = [x for x in args.systems if x != "oracle_same_feedback"]
    if args.poison and "loraloop" not in order:
        order.append("loraloop")
    for system in order:  # in the order asked for: a run stopped midway keeps the systems done so far
        t0 = time.monotonic()
        if system == "oracle":
            print(f"\n=== oracle, seed {seed} (offline, whole training file) ===", flush=True)
            run.add(seed, "oracle", _in_fresh_process(run_oracle, job("oracle"))["result"])
        else:
            print(f"\n=== {system}, seed {seed} ({args.requests} requests) ===", flush=True)
            same = system == "loraloop" and "oracle_same_feedback" in args.systems
            out = _in_fresh_process(run_live, job(system, same_feedback_oracle=same))
            run.add(seed, system, out["result"], out["trace"])
            run.labels = out["labels"]
            if same:
                run.add(seed, "oracle_same_feedback", out["oracle_same_feedback"])
                run.add_efficiency(seed)
        print(f"=== {system}, seed {seed}: done in {time.monotonic() - t0:.0f} s, test accuracy "
              f"{run.per_seed[system][seed]['final_accuracy']:.3f}", flush=True)
        run.save(quiet=True)
    if args.poison:
        print(f"\n=== loraloop_poisoned, seed {seed} ===", flush=True)
        poisoned_job = dataclasses.replace(job("loraloop", poison=True, poison_share=args.poison_share),
                                           out=str(tmp / "loraloop_poisoned"))
        out = _in_fresh_process(run_live, poisoned_job)
        clean, poisoned = run.per_seed["loraloop"][seed]["final_accuracy"], out["result"]["final_accuracy"]
        run.add_poison(seed, {"poison_share": args.poison_share, "clean_final_accuracy": clean,
                              "poisoned_final_accuracy": poisoned, "difference": round(poisoned - clean, 4),
                              "poisoned": out["result"]}, out["trace"])
        if "loraloop" not in args.systems:
            run.per_seed.pop("loraloop")
        run.save(quiet=True)


# --- across seeds --------------------------------------------------------------------------------------
def aggregate(per_seed: dict[int, dict]) -> dict:
    """Means of the numeric figures over seeds, their sample standard deviation (``sd``), and ``per_seed``.

    Figures that are not numbers (lists, dicts) are the first seed's; every seed's are in ``per_seed``.

    Example:
        >>> out = aggregate({0: {"final_accuracy": 0.8, "method": "x"}, 1: {"final_accuracy": 0.9, "method": "y"}})
        >>> out["final_accuracy"], out["sd"]["final_accuracy"], out["method"], [r["seed"] for r in out["per_seed"]]
        (0.85, 0.0707, 'x', [0, 1])
    """
    import statistics

    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    out: dict = {}
    sd: dict[str, float] = {}
    for key, value in first.items():
        values = [per_seed[s].get(key) for s in seeds]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if numeric and len(values) > 1:
            out[key] = round(statistics.fmean(values), 4)
            sd[key] = round(statistics.stdev(values), 4)
        else:  # one seed: the figure itself, its type kept (counts stay integers)
            out[key] = value
            if numeric:
                sd[key] = 0.0
    return {**out, "sd": sd, "seeds": seeds, "per_seed": [{"seed": s, **per_seed[s]} for s in seeds]}


def merge_runs(runs: list[dict]) -> dict:
    """One result from runs made separately (by seed or by system): their per-seed figures, aggregated again.

    A later run's figures for the same system and seed replace an earlier one's.
    """
    per_seed: dict[str, dict[int, dict]] = {}
    poison: dict[int, dict] = {}
    for data in runs:
        for system in SYSTEMS:
            if system in data:
                for row in data[system].get("per_seed") or [{"seed": data["config"].get("seed", 0), **data[system]}]:
                    row = dict(row)
                    per_seed.setdefault(system, {})[int(row.pop("seed"))] = row
        if "poison" in data:
            for row in data["poison"].get("per_seed") or [{"seed": data["config"].get("seed", 0), **data["poison"]}]:
                row = dict(row)
                poison[int(row.pop("seed"))] = row
    merged: dict = {system: aggregate(rows) for system, rows in per_seed.items()}
    if poison:
        merged["poison"] = aggregate(poison)
    merged["config"] = {**runs[-1].get("config", {}), "merged_from": len(runs),
                        "seeds": sorted({s for rows in per_seed.values() for s in rows})}
    merged["machine"] = runs[-1].get("machine", {})
    return merged


def efficiency(loop: dict, oracle: dict) -> dict:
    """loraloop's final accuracy as a share of the oracle's trained on the same feedback (all, known, new labels).

    Example:
        >>> efficiency({"final_accuracy": 0.8, "final_accuracy_known": 0.9, "final_accuracy_new": 0.0},
        ...            {"final_accuracy": 0.9, "final_accuracy_known": 0.9, "final_accuracy_new": 0.5})
        {'efficiency': 0.8889, 'efficiency_known': 1.0, 'efficiency_new': 0.0}
    """
    out = {}
    for suffix in ("", "_known", "_new"):
        denominator = oracle.get(f"final_accuracy{suffix}") or 0.0
        out[f"efficiency{suffix}"] = round(loop[f"final_accuracy{suffix}"] / denominator, 4) if denominator else None
    return out


class Run:
    """Figures gathered so far (per system and seed), and how they are written out."""

    def __init__(self, args: argparse.Namespace, settings: dict, started: float) -> None:
        self.args, self.settings, self.started = args, settings, started
        self.per_seed: dict[str, dict[int, dict]] = {}
        self.traces: dict[str, dict] = {}  # the first seed's, for the plot
        self.labels: tuple[list[str], list[str]] = ([], [])
        self.poison: dict[int, dict] = {}

    def add(self, seed: int, system: str, result: dict, trace: dict | None = None) -> None:
        self.per_seed.setdefault(system, {})[seed] = result
        if trace is not None and system not in self.traces:
            self.traces[system] = trace

    def add_efficiency(self, seed: int) -> None:
        loop = self.per_seed["loraloop"][seed]
        loop.update(efficiency(loop, self.per_seed["oracle_same_feedback"][seed]))

    def add_poison(self, seed: int, poison: dict, trace: dict) -> None:
        self.poison[seed] = poison
        self.traces.setdefault("loraloop_poisoned", trace)

    @property
    def results(self) -> dict[str, dict]:
        return {system: aggregate(rows) for system, rows in self.per_seed.items()}

    def data(self) -> dict:
        args = self.args
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "merge"}
        config.update({"settings": self.settings, "system_settings": SYSTEM_SETTINGS,
                       "known_labels": len(self.labels[0]), "new_labels": len(self.labels[1]),
                       "duration_s": round(time.monotonic() - self.started, 1)})
        if args.quick:
            config["train"] = config["test"] = "(synthetic, generated by loraloop.demo.data.generate_intents)"
        data = {**self.results, "config": config, "machine": machine()}
        if self.poison:
            data["poison"] = aggregate(self.poison)
        return data

    def save(self, quiet: bool = False) -> None:
        if self.args.out is not None and quiet:
            self.args.out.parent.mkdir(parents=True, exist_ok=True)
            self.args.out.write_text(json.dumps(self.data(), indent=2, sort_keys=True, default=str) + "\n")
        elif self.args.out is not None:
            write_json(self.args.out, self.data())
        if self.args.plot and self.traces:
            oracle = self.results.get("oracle", {}).get("final_accuracy")
            from loraloop.demo.run import DemoConfig

            span = DemoConfig().poison_span(self.args.requests) if "loraloop_poisoned" in self.traces else None
            plot(self.args.plot, self.traces, oracle, window=max(20, self.args.requests // 20),
                 title=f"drift: {len(self.labels[0])} known + {len(self.labels[1])} new labels, "
                       f"{self.args.requests} requests, seed {self.args.seeds[0]}", quiet=quiet, poison_span=span)

    def report(self) -> None:
        print_results(self.results)
        if self.poison:
            poison = aggregate(self.poison)
            bad = poison["poisoned"]
            caught = sum(v["screened"] for v in bad.get("poison_by_version", {}).values())
            print(f"\npoison (mean of {len(self.poison)} seed(s)): final accuracy clean "
                  f"{poison['clean_final_accuracy']:.4f}, poisoned {poison['poisoned_final_accuracy']:.4f} "
                  f"(difference {poison['difference']:+.4f}); first seed's poisoned run: {bad['promotions']} "
                  f"promotions, {bad['rejections']} rejections, {bad['rollbacks']} rollbacks; "
                  f"{bad.get('poisoned_events', 0)} wrong labels sent, {caught} set aside by the screen, "
                  f"{bad.get('quarantined_examples', 0)} examples quarantined by the gate; versions that learned "
                  f"the poison: {bad['poisoned_versions']}, one active at the end: "
                  f"{bad['poisoned_version_active_at_end']}")
        self.save()


if __name__ == "__main__":
    sys.exit(main())
