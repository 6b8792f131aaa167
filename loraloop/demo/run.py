"""``loraloop demo``: the whole loop in one process.

Worker, feedback ingester, learner (and the rollback guard when installed) run on
threads against the configured transport, buffer and registry (in-memory and a local
folder by default). Simulated users send a stream of requests that drifts from known
intents to new ones, and correct a fraction of the predictions. The demo then writes
``summary.json`` and ``accuracy.png`` to its output folder.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

from loraloop.demo.data import generate_intents, load_csv
from loraloop.demo.plot import plot_accuracy
from loraloop.demo.scenario import DriftPlan, SimulatedUsers, split_rows
from loraloop.metrics import Metrics
from loraloop.schemas import FeedbackEvent, Prediction, Request
from loraloop.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: Path = Path("demo-out")
    dataset: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    requests: int = 3000
    rate: float = 25.0
    # Hold traffic while the learner trains, so results depend on requests, not on how fast this
    # machine trains (benchmarks compare systems and machines this way); off in the live demo.
    pace_with_learner: bool = False
    feedback_fraction: float = 0.5
    noise: float = 0.05
    known_fraction: float = 0.6
    bootstrap_per_label: int = 40
    test_fraction: float = 0.2
    max_test: int = 1500
    poison: bool = False
    poison_window: float = 0.2  # the burst: this share of the stream, from 55% of it
    poison_share: float = 0.2  # share of the judged predictions in the burst whose label is flipped
    seed: int = 0
    learn: bool = True  # False: the learner thread is not started (the "static" baseline)
    test_dataset: str | None = None  # a separate test CSV (same columns); the whole dataset is then the stream's

    def poison_span(self, requests: int) -> tuple[int, int]:
        """[first, end) request numbers of the adversarial burst: from 55% of the stream, ``poison_window`` of it.

        Example:
            >>> DemoConfig(poison_window=0.2).poison_span(3000)
            (1650, 2250)
        """
        first = int(requests * 0.55)
        return first, int(requests * 0.55 + requests * self.poison_window)


@dataclass
class Observed:
    """What the demo saw, in arrival order of predictions."""

    correct: list[bool] = field(default_factory=list)
    phases: list[int] = field(default_factory=list)
    is_new: list[bool] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    feedback_events: int = 0
    poisoned_events: set[str] = field(default_factory=set)  # burst events naming the target, which is not the truth


def _component(name: str) -> Callable[..., object] | None:
    for entry in entry_points(group="loraloop.components"):
        if entry.name == name:
            return entry.load()
    return None


def demo_settings(settings: Settings, config: DemoConfig) -> Settings:
    """Embedded defaults tuned so the loop learns within minutes on a 2-core CPU."""
    update: dict[str, object] = {"registry_url": str((config.out / "registry").resolve())}
    fields_set = settings.model_fields_set
    # replay_ratio 2: two replayed examples per new one keeps the known intents within a point of where they
    # started under 5 % label noise (measured: 0.992 vs 0.976 with the global default of 1)
    defaults = {"cycle_min_feedback": 250, "cycle_interval_s": 60.0, "epochs": 2, "replay_ratio": 2.0,
                "guard_window_s": 20.0, "guard_min_judged": 80, "claim_idle_s": 600.0, "max_wait_ms": 20,
                # the learner trains on the worker's CPU cores here: latency during a cycle says nothing of the adapter
                "guard_max_p99_ratio": 4.0}
    update.update({k: v for k, v in defaults.items() if k not in fields_set})
    return settings.model_copy(update=update)


class Demo:
    def __init__(self, settings: Settings, config: DemoConfig) -> None:
        self.config = config
        self.settings = demo_settings(settings, config)
        self.metrics = Metrics()
        self.observed = Observed()
        self.stop = threading.Event()
        self._truth: dict[str, tuple[str, int]] = {}
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self.events: list[tuple[int, str, str]] = []  # (prediction index, promoted/rejected/rolled_back, version)
        # What the loop was given, for an offline model trained on the same data (benchmarks/drift.py):
        # the first adapter's rows, and every feedback event sent with the text and the label it judged.
        self.bootstrap_rows: list[tuple[str, str]] = []
        self.sent_feedback: list[tuple[FeedbackEvent, str, str]] = []  # (event, request text, served label)
        self.feedback_at: list[int] = []  # the prediction index each of them judged
        self._texts: dict[str, str] = {}

    # --- set-up ----------------------------------------------------------------------
    def _rows(self) -> list[tuple[str, str]]:
        if self.config.dataset:
            return load_csv(self.config.dataset, self.config.text_column, self.config.label_column)
        return generate_intents(per_label=300, seed=self.config.seed)

    def _build(self) -> None:
        from loraloop.buffer import make_feedback_buffer, make_request_log
        from loraloop.registry import make_registry
        from loraloop.transport import make_transport

        s = self.settings
        self.transport = make_transport(s)
        self.registry = make_registry(s)
        self.buffer = make_feedback_buffer(s)
        self.request_log = make_request_log(s)
        common = {"metrics": self.metrics}
        self.learner = _component("learner")(s, registry=self.registry, buffer=self.buffer, **common)
        self.worker = _component("worker")(s, transport=self.transport, registry=self.registry,
                                           request_log=self.request_log, **common)
        self.ingester = _component("ingester")(s, transport=self.transport, buffer=self.buffer,
                                               request_log=self.request_log, **common)
        guard_factory = _component("guard")
        self.guard = guard_factory(s, registry=self.registry, **common) if guard_factory else None

    # --- the loop ----------------------------------------------------------------------
    def run(self) -> dict[str, object]:
        started = time.monotonic()
        cfg = self.config
        cfg.out.mkdir(parents=True, exist_ok=True)
        rows = self._rows()
        if cfg.test_dataset:
            train, test = list(dict(rows).items()), load_csv(cfg.test_dataset, cfg.text_column, cfg.label_column)
            random.Random(cfg.seed).shuffle(test)
        else:
            train, test = split_rows(rows, cfg.test_fraction, cfg.seed)
        test = test[: cfg.max_test]
        labels = sorted({label for _, label in rows})
        plan = DriftPlan.split(labels, cfg.known_fraction, cfg.seed)
        self._build()
        self._cycles_before = len(self.registry.cycles())  # an --out folder reused: count this run's cycles only

        boot = self.bootstrap_rows = self._bootstrap_rows(train, plan)
        print(f"bootstrap: training the first adapter on {len(boot)} examples of {len(plan.known)} known intents "
              f"({len(plan.new)} intents are new and will appear midway)")
        initial = self.learner.bootstrap([t for t, _ in boot], [label for _, label in boot])
        initial_eval = self._evaluate(initial, test, plan)
        print(f"initial adapter {initial}: test accuracy {initial_eval['all']:.3f} "
              f"(known {initial_eval['known']:.3f}, new {initial_eval['new']:.3f})")

        # Worker and learner now share this process's cores: one intra-op thread each, not two teams
        # fighting over them (the bootstrap above had the cores to itself).
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
        threads = [threading.Thread(target=c.run, args=(self.stop,), name=n, daemon=True)
                   for n, c in (("worker", self.worker), ("ingester", self.ingester), ("learner", self.learner),
                                ("guard", self.guard)) if c is not None and (cfg.learn or n != "learner")]
        for t in threads:
            t.start()
        stream = plan.stream(train, cfg.requests, cfg.seed)
        events = self.events = self._serve(stream, plan, labels)
        self._drain_feedback()
        seen = len(self.registry.cycles())
        if cfg.learn and not self.learner.drain():  # traffic has stopped: learn the stream's tail too
            logger.warning("the learner's drain cycle did not end in time")
        events.extend(self._cycle_events(seen))
        self.stop.set()
        for t in threads:
            t.join(timeout=900 if t.name == "learner" else 120)  # let a running cycle finish

        final = self.registry.active().version
        final_eval = self._evaluate(final, test, plan)
        summary = self._summary(initial, initial_eval, final, final_eval, time.monotonic() - started, plan, events)
        (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_accuracy(cfg.out / "accuracy.png", self.observed.correct, self.observed.phases, self.observed.is_new,
                      events, window=max(50, cfg.requests // 15),
                      title=f"loraloop demo: {len(plan.known)} known + {len(plan.new)} new intents")
        return summary

    def _drain_feedback(self, timeout_s: float = 60.0) -> None:
        """Give the ingester time to settle every event the users sent before everything stops."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            settled = sum(s.value for m in self.metrics.registry.collect() for s in m.samples
                          if s.name == "loraloop_feedback_events_total")
            if settled >= self.observed.feedback_events:
                return
            time.sleep(0.1)
        logger.warning("the ingester had not settled all %d feedback events after %.0f s",
                       self.observed.feedback_events, timeout_s)

    def _bootstrap_rows(self, train: list[tuple[str, str]], plan: DriftPlan) -> list[tuple[str, str]]:
        per: dict[str, int] = {}
        out = []
        for text, label in train:
            if label in plan.known and per.get(label, 0) < self.config.bootstrap_per_label:
                per[label] = per.get(label, 0) + 1
                out.append((text, label))
        return out

    def _evaluate(self, version: str, test: list[tuple[str, str]], plan: DriftPlan) -> dict[str, float]:
        out = {}
        for name, keep in (("known", set(plan.known)), ("new", set(plan.new))):
            rows = [(t, label) for t, label in test if label in keep]
            out[name] = self.learner.evaluate(version, [t for t, _ in rows], [label for _, label in rows]) if rows else 0.0
        n_known = sum(1 for _, label in test if label in plan.known)
        out["all"] = (out["known"] * n_known + out["new"] * (len(test) - n_known)) / max(1, len(test))
        return out

    def _serve(self, stream: list[tuple[str, str, int]], plan: DriftPlan, labels: list[str]
               ) -> list[tuple[int, str, str]]:
        """Send the stream at the configured rate; judge predictions as they come back."""
        from tqdm import tqdm

        cfg, s = self.config, self.settings
        users = SimulatedUsers(labels, cfg.feedback_fraction, cfg.noise, cfg.seed, poison_share=cfg.poison_share)
        poison_from, poison_to = cfg.poison_span(len(stream))
        producer = self.transport.producer()
        observer = self.transport.consumer([s.predictions_topic], f"demo-observer-{uuid.uuid4().hex[:6]}")
        events: list[tuple[int, str, str]] = []
        seen_cycles = len(self.registry.cycles())
        generation = self.registry.active().generation
        bar = tqdm(total=len(stream), desc="demo requests", unit="req", dynamic_ncols=True)
        interval = 1.0 / cfg.rate if cfg.rate > 0 else 0.0
        next_send, sent = time.monotonic(), 0
        deadline = None
        while True:
            now = time.monotonic()
            if cfg.pace_with_learner and self.learner.busy:
                next_send = now + interval  # traffic resumes when the cycle ends
            while sent < len(stream) and now >= next_send:
                text, label, phase = stream[sent]
                request = Request(id=f"req-{sent:06d}", text=text)
                with self._lock:
                    self._truth[request.id] = (label, phase)
                    self._texts[request.id] = text
                    self._pending.add(request.id)
                producer.send(s.requests_topic, request.to_bytes(), key=request.id.encode())
                sent += 1
                next_send += interval
            for record in observer.poll(timeout_ms=50, max_records=500):
                prediction = Prediction.model_validate_json(record.value)
                users.poison_target = (plan.known[0] if cfg.poison and poison_from <= len(self.observed.correct)
                                       < poison_to else None)
                self._judge(prediction, plan, users, producer)
                bar.update(1)
            events.extend(self._cycle_events(seen_cycles))
            seen_cycles = len(self.registry.cycles())
            pointer = self.registry.active()
            if pointer.generation != generation:
                generation = pointer.generation
                if pointer.reason.startswith("rollback"):
                    events.append((len(self.observed.correct), "rolled_back", pointer.version or ""))
            bar.set_postfix(active=self.registry.active().version, promotions=sum(e[1] == "promoted" for e in events),
                            refresh=False)
            if sent == len(stream):
                with self._lock:
                    if not self._pending:
                        break
                deadline = deadline or time.monotonic() + 120
                if time.monotonic() > deadline:
                    logger.error("%d requests got no prediction within 120 s", len(self._pending))
                    break
        bar.close()
        producer.flush()
        producer.close()
        observer.close()
        return events

    def _judge(self, prediction: Prediction, plan: DriftPlan, users: SimulatedUsers, producer: object) -> None:
        with self._lock:
            if prediction.request_id not in self._pending:
                return  # an at-least-once repeat: already judged
            self._pending.discard(prediction.request_id)
            truth, phase = self._truth[prediction.request_id]
        obs = self.observed
        obs.correct.append(prediction.label == truth)
        obs.phases.append(phase)
        obs.is_new.append(truth in plan.new)
        obs.versions.append(prediction.adapter_version)
        verdict = users.judge(prediction.label, truth)
        if verdict is not None:
            kind, label = verdict
            event = FeedbackEvent(event_id=uuid.uuid4().hex, request_id=prediction.request_id, kind=kind, label=label)
            producer.send(self.settings.feedback_topic, event.to_bytes(), key=prediction.request_id.encode())
            obs.feedback_events += 1
            self.sent_feedback.append((event, self._texts[prediction.request_id], prediction.label))
            self.feedback_at.append(len(obs.correct) - 1)
            if users.poison_target is not None and label == users.poison_target != truth:
                obs.poisoned_events.add(event.event_id)

    def _cycle_events(self, seen: int) -> list[tuple[int, str, str]]:
        out = []
        for cycle in self.registry.cycles()[seen:]:
            outcome = str(cycle.get("outcome", ""))
            if outcome in {"promoted", "rejected"}:  # rollbacks are read from the pointer (guard or manual)
                out.append((len(self.observed.correct), outcome, str(cycle.get("version", ""))))
        return out

    def _summary(self, initial: str, initial_eval: dict[str, float], final: str | None,
                 final_eval: dict[str, float], duration: float, plan: DriftPlan,
                 events: list[tuple[int, str, str]]) -> dict[str, object]:
        cycles = self.registry.cycles()[self._cycles_before:]
        outcomes = [str(c.get("outcome", "")) for c in cycles]
        n = len(self.observed.correct)
        return {
            "requests": n,
            "feedback_events": self.observed.feedback_events,
            "promotions": outcomes.count("promoted"),
            "rejections": outcomes.count("rejected"),
            "rollbacks": sum(kind == "rolled_back" for _, kind, _ in events),
            "screened_examples": sum(int(c.get("screened_examples", 0)) for c in cycles),
            "poisoned_events": len(self.observed.poisoned_events),
            "accuracy_initial": round(initial_eval["all"], 4),
            "accuracy_final": round(final_eval["all"], 4),
            "new_label_accuracy_initial": round(initial_eval["new"], 4),
            "new_label_accuracy_final": round(final_eval["new"], 4),
            "old_label_accuracy_initial": round(initial_eval["known"], 4),
            "old_label_accuracy_final": round(final_eval["known"], 4),
            "live_accuracy": round(sum(self.observed.correct) / max(1, n), 4),
            "initial_version": initial,
            "final_version": final,
            "known_labels": list(plan.known),
            "new_labels": list(plan.new),
            "duration_s": round(duration, 1),
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()},
        }
