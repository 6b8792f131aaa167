"""Benchmark: promote a bad adapter under load and time the rollback guard; or A/A promotions (false rollbacks).

    python benchmarks/rollback.py --quick --out rollback.json
    python benchmarks/rollback.py --aa 200 --window 3 --min-judged 20 --limit 30 --out rollback_aa.json

One process runs an inference worker, the feedback ingester and the rollback guard on
threads (embedded by default: in-memory transport, request log and buffer, a file
registry in a temporary folder, a tiny random base model, the guard reading the
process's metrics). ``--infra`` starts real servers where installed (``make infra``:
redis-server, Kafka 0.9 in .infra/kafka, prometheus; each one missing falls back to its
embedded part): the worker then serves its metrics on a free port, Prometheus scrapes it
every second and the guard reads PromQL. ``LORALOOP_*`` variables are honoured too
(``LORALOOP_TRANSPORT=kafka``, ``LORALOOP_REDIS_URL``, ``LORALOOP_PROMETHEUS_URL`` with
``--metrics-port`` a port that Prometheus scrapes).

Simulated users send requests at ``--rate`` per second whose true answer is "yes" 90 % of
the time, and judge a ``--feedback`` share of the predictions (a ``label`` event with the
truth). After a baseline on a good adapter, a bad one (it answers "no" to everything) is
promoted. Reported (table and JSON):

* ``detected_after_s``: promotion to the guard's rollback decision;
* ``rolled_back_after_s``: promotion to the registry pointer back on the good version;
* ``restored_after_s``: promotion to the first prediction by the good version again;
* ``requests``, ``failed`` (dead-lettered), ``lost`` (neither predicted nor dead-lettered);
* ``bad_predictions_served``: predictions made by the bad adapter (``bad_wrong``: of them wrong).

Goal: ``failed == lost == 0`` and ``detected_after_s <= 10``.

``--aa N`` promotes, N times, a copy of the live adapter (the same files published again:
identical weights, a new version id), each once the previous copy's probation has ended,
under the same load. Every copy should be kept; reported: ``false_rollbacks`` (and their
reasons), ``kept``, ``insufficient_evidence``, ``mean_s_to_keep`` (promotion to the keep
decision), ``failed``, ``lost``. Goal: ``false_rollbacks <= 4`` for N = 200 at
``guard_alpha = 0.01``, nothing failed or lost. ``--window``, ``--min-judged`` and
``--limit`` shorten the probation (its window, its paired judgements, its limit) to make the
run fast; they change how long each probation takes, not what decides it.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraloop.metrics import Metrics, serve_http
from loraloop.schemas import DeadLetter, FeedbackEvent, Prediction, Request
from loraloop.settings import Settings

logger = logging.getLogger("benchmarks.rollback")

LABELS = ["yes", "no"]
NO_SHARE = 0.1  # share of requests whose true answer is "no"


@dataclass
class Profile:
    rate: float
    baseline_s: float
    tail_s: float
    guard_window_s: float
    guard_min_judged: int


PROFILES = {"quick": Profile(rate=60, baseline_s=8, tail_s=3, guard_window_s=10, guard_min_judged=40),
            "full": Profile(rate=100, baseline_s=30, tail_s=5, guard_window_s=30, guard_min_judged=100)}


@dataclass
class Users:
    """Requests at a steady rate, judged from the predictions topic, dead letters counted."""

    settings: Settings
    transport: object
    rate: float
    feedback: float
    seed: int = 0
    truth: dict[str, str] = field(default_factory=dict)
    predictions: dict[str, Prediction] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)
    drain_until: float = float("inf")

    def run(self) -> None:
        s, rng = self.settings, random.Random(self.seed)
        producer = self.transport.producer()
        tag = uuid.uuid4().hex[:6]
        reader = self.transport.consumer([s.predictions_topic], f"bench-users-{tag}")
        letters = self.transport.consumer([s.dead_letter_topic], f"bench-dlq-{tag}")
        n, next_send = 0, time.monotonic()
        while time.monotonic() < self.drain_until:
            if not self.stop.is_set():
                while time.monotonic() >= next_send:
                    request = Request(id=f"bench-{tag}-{n:07d}", text=f"will my card number {n} work abroad")
                    self.truth[request.id] = "no" if rng.random() < NO_SHARE else "yes"
                    producer.send(s.requests_topic, request.to_bytes(), key=request.id.encode())
                    n += 1
                    next_send += 1 / self.rate
            elif len(self.predictions) + len(self.failed) >= len(self.truth):
                break
            for record in reader.poll(timeout_ms=5, max_records=1000):
                p = Prediction.model_validate_json(record.value)
                if p.request_id in self.predictions or p.request_id not in self.truth:
                    continue
                self.predictions[p.request_id] = p
                if rng.random() < self.feedback:
                    event = FeedbackEvent(event_id=uuid.uuid4().hex, request_id=p.request_id, kind="label",
                                          label=self.truth[p.request_id])
                    producer.send(s.feedback_topic, event.to_bytes(), key=p.request_id.encode())
            for record in letters.poll(timeout_ms=0, max_records=1000):
                letter = DeadLetter.model_validate_json(record.value)
                request_id = _request_id(letter)
                if request_id in self.truth:
                    self.failed.add(request_id)
        producer.flush()
        for client in (producer, reader, letters):
            client.close()


def _request_id(letter: DeadLetter) -> str | None:
    try:
        return json.loads(letter.payload).get("id")
    except (ValueError, AttributeError, TypeError):
        return None


def _base_model(choice: str, workdir: Path) -> str:
    if choice == "tiny":
        from loraloop.testing import save_tiny_base_model

        return str(save_tiny_base_model(workdir / "tiny-base"))
    return "" if choice == "default" else choice


def _stores(settings: Settings):
    """Transport, request log and buffer: fresh in-memory ones, or the real ones the settings name."""
    from loraloop.buffer import make_feedback_buffer, make_request_log
    from loraloop.buffer.memory import MemoryFeedbackBuffer, MemoryRequestLog
    from loraloop.transport import make_transport
    from loraloop.transport.memory import MemoryTransport

    transport = make_transport(settings) if settings.transport == "kafka" else MemoryTransport()
    if settings.redis_url:
        return transport, make_request_log(settings), make_feedback_buffer(settings)
    return (transport, MemoryRequestLog(settings.request_log_ttl_s),
            MemoryFeedbackBuffer(max_items=settings.buffer_max, trim=settings.buffer_trim, replay_per_label=10,
                                 claim_idle_s=settings.claim_idle_s, dedup_ttl_s=settings.dedup_ttl_s))


class Infra:
    """Real Redis, Kafka and Prometheus from tests/infra.py, each only where installed."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.servers: list[object] = []
        self.redis = self.kafka = self.prometheus = None
        self.notes: list[str] = []

    def start(self) -> dict[str, object]:
        """Start what is available; return the settings overrides that point at it."""
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.infra import KafkaBroker, PrometheusServer, RedisServer

        overrides: dict[str, object] = {}
        for name, factory in (("redis", RedisServer), ("kafka", KafkaBroker), ("prometheus", PrometheusServer)):
            try:
                (self.workdir / name).mkdir(parents=True, exist_ok=True)
                server = factory(self.workdir / name)
                if name != "prometheus":
                    server.start()
            except Exception as e:  # InfraMissing, ServerDied, TimeoutError: fall back to embedded
                self.notes.append(f"{name}: embedded ({type(e).__name__}: {e})".splitlines()[0])
                continue
            self.servers.append(server)
            setattr(self, name, server)
        if self.redis is not None:
            overrides["redis_url"] = self.redis.url
        if self.kafka is not None:
            tag = uuid.uuid4().hex[:8]
            overrides.update(transport="kafka", kafka_bootstrap=self.kafka.bootstrap, kafka_api_version="0.9",
                             requests_topic=f"bench-req-{tag}", predictions_topic=f"bench-pred-{tag}",
                             feedback_topic=f"bench-fb-{tag}", dead_letter_topic=f"bench-dlq-{tag}",
                             worker_group=f"bench-workers-{tag}", ingester_group=f"bench-ingest-{tag}")
        if self.prometheus is not None:
            overrides["prometheus_url"] = self.prometheus.url
        return overrides

    def create_topics(self, settings: Settings) -> None:
        if self.kafka is not None:
            for topic in (settings.requests_topic, settings.predictions_topic, settings.feedback_topic,
                          settings.dead_letter_topic):
                self.kafka.create_topic(topic, 4)

    def scrape(self, port: int) -> None:
        if self.prometheus is not None:
            self.prometheus.start([f"127.0.0.1:{port}"], scrape_interval_s=1)

    def stop(self) -> None:
        for server in reversed(self.servers):
            try:
                server.stop()
            except Exception as e:
                logger.warning("stopping %s failed: %s", type(server).__name__, e)


def run(args: argparse.Namespace) -> dict[str, object]:
    profile = PROFILES["quick" if args.quick else "full"]
    workdir = Path(tempfile.mkdtemp(prefix="loraloop-rollback-"))
    overrides = {"base_model": _base_model(args.base_model, workdir), "label_capacity": 4,
                 "registry_url": str(workdir / "registry"), "guard_window_s": float(args.window or profile.guard_window_s),
                 "guard_min_judged": args.min_judged or profile.guard_min_judged, "guard_poll_s": args.poll,
                 "guard_max_watch_s": float(args.limit or 3 * (args.window or profile.guard_window_s)),
                 **({"guard_max_p99_ratio": args.p99_ratio} if args.p99_ratio else {}),
                 "adapter_poll_s": 0.2, "max_wait_ms": 5}
    env = Settings()
    infra = Infra(workdir) if args.infra else None
    if infra is not None:
        overrides.update(infra.start())
    settings = Settings(**{**env.model_dump(exclude_unset=True),
                           **{k: v for k, v in overrides.items() if k not in env.model_fields_set}})
    try:
        if infra is not None:
            infra.create_topics(settings)
            if settings.prometheus_url and not args.metrics_port:
                from tests.infra import free_port

                args.metrics_port = free_port()
            infra.scrape(args.metrics_port)
        result = _run(args, settings, profile, workdir)
    finally:
        if infra is not None:
            infra.stop()
    result["infra"] = infra.notes if infra is not None else []
    return result


def _run(args: argparse.Namespace, settings: Settings, profile: Profile, workdir: Path) -> dict[str, object]:
    from feedback.ingester import build_ingester
    from loraloop.model import load_base
    from loraloop.registry import make_registry
    from loraloop.testing import build_constant_adapter
    from services.guard import build_guard
    from services.worker import build_worker

    rate = args.rate or profile.rate
    torch.set_num_threads(args.threads)

    registry = make_registry(settings)
    base = load_base(settings)
    good_dir = build_constant_adapter(settings, LABELS, "yes", workdir / "good", base=base, seed=1)
    bad_dir = build_constant_adapter(settings, LABELS, "no", workdir / "bad", base=base, seed=2)
    good, bad = registry.publish(good_dir), registry.publish(bad_dir)
    registry.promote(good, reason="benchmark: baseline", probation=False)

    transport, request_log, buffer = _stores(settings)
    metrics = Metrics()
    worker = build_worker(settings, transport=transport, registry=registry, request_log=request_log, metrics=metrics,
                          base=base)
    ingester = build_ingester(settings, transport=transport, request_log=request_log, buffer=buffer, metrics=metrics)
    guard = build_guard(settings, registry=registry, metrics=metrics)
    server = serve_http(metrics.registry, args.metrics_port, ready=worker.ready) if args.metrics_port else None
    stop = threading.Event()
    threads = [threading.Thread(target=c.run, args=(stop,), name=n, daemon=True)
               for n, c in (("worker", worker), ("ingester", ingester), ("guard", guard))]
    users = Users(settings, transport, rate, args.feedback, seed=args.seed)
    users_thread = threading.Thread(target=users.run, name="users", daemon=True)
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while not worker.ready():
        if time.monotonic() > deadline:
            raise RuntimeError("worker not ready after 120 s")
        time.sleep(0.1)
    users_thread.start()
    print(f"baseline: {profile.baseline_s:.0f} s of {rate:.0f} req/s on the good adapter {good}", file=sys.stderr)
    time.sleep(profile.baseline_s)
    if args.aa:
        aa = _aa(args, registry, good_dir)

        def finish() -> None:
            users.drain_until = time.monotonic() + 60
            users.stop.set()
            users_thread.join(timeout=70)
            stop.set()
            for t in threads:
                t.join(timeout=15)
            if server is not None:
                server.shutdown()

        finish()
        answered = set(users.predictions) | users.failed
        result = {**aa, "requests": len(users.truth), "failed": len(users.failed),
                  "lost": len(set(users.truth) - answered), "guard_window_s": settings.guard_window_s,
                  "guard_min_judged": settings.guard_min_judged, "guard_max_watch_s": settings.guard_max_watch_s,
                  "guard_alpha": settings.guard_alpha, "guard_poll_s": settings.guard_poll_s,
                  "guard_max_p99_ratio": settings.guard_max_p99_ratio, "shadow_fraction": settings.shadow_fraction,
                  "rate_per_s": rate, "feedback_share": args.feedback,
                  "source": "prometheus" if settings.prometheus_url else "in-process", "transport": settings.transport}
        allowed = max(1, round(4 * args.aa / 200))
        result["goal_met"] = bool(result["failed"] == 0 and result["lost"] == 0
                                  and result["false_rollbacks"] <= allowed)
        return result

    promoted_at = registry.promote(bad, reason="benchmark: bad adapter").updated_at
    print(f"promoted the bad adapter {bad}; waiting for the guard (window {settings.guard_window_s:.0f} s, "
          f"{settings.guard_min_judged} judged)", file=sys.stderr)
    wait_until = time.monotonic() + 3 * settings.guard_window_s + 30
    while not any(e.version == bad for e in guard.events) and time.monotonic() < wait_until:
        time.sleep(0.05)
    event = next((e for e in guard.events if e.version == bad), None)
    pointer = registry.active()
    time.sleep(profile.tail_s)  # keep serving after the rollback

    users.drain_until = time.monotonic() + 60
    users.stop.set()
    users_thread.join(timeout=70)
    stop.set()
    for t in threads:
        t.join(timeout=15)
    if server is not None:
        server.shutdown()
    return _report(settings, users, guard, event, pointer, promoted_at, good, bad, rate, args)


def _aa(args: argparse.Namespace, registry, folder: Path) -> dict[str, object]:
    """Promote ``args.aa`` identical copies of the live adapter, one per ended probation; tally the decisions."""
    decisions: list[dict] = []
    for k in range(args.aa):
        copy = registry.publish(folder, metadata={"benchmark": f"A/A copy {k}"})
        pointer = registry.promote(copy, reason=f"benchmark: A/A copy {k}")
        started = pointer.probation["started_at"] if pointer.probation else pointer.updated_at
        deadline = time.monotonic() + registry.probation_terms.limit_s + 60
        while time.monotonic() < deadline:
            current = registry.probation()
            if current is None or current.version != copy:
                break
            time.sleep(0.05)
        ended = registry.last_probation()
        if ended is None or ended.version != copy:
            decisions.append({"version": copy, "decision": "none", "reason": "no decision", "s": None})
        else:
            decisions.append({"version": copy, "decision": ended.decision, "reason": ended.reason,
                              "s": round(ended.decided_at - started, 3)})
        print(f"A/A {k + 1}/{args.aa}: {decisions[-1]['decision']} ({decisions[-1]['reason']}) after "
              f"{decisions[-1]['s']} s", file=sys.stderr)
    keeps = [d["s"] for d in decisions if d["decision"] == "keep"]
    rollbacks = [d for d in decisions if d["decision"] == "rollback"]
    return {"aa_promotions": args.aa, "false_rollbacks": len(rollbacks),
            "false_rollback_reasons": sorted({d["reason"] for d in rollbacks}),
            "kept": len(keeps), "insufficient_evidence": sum(d["decision"] == "insufficient_evidence" for d in decisions),
            "undecided": sum(d["decision"] not in {"keep", "rollback", "insufficient_evidence"} for d in decisions),
            "mean_s_to_keep": round(sum(keeps) / len(keeps), 3) if keeps else None}


def _report(settings: Settings, users: Users, guard, event, pointer, promoted_at: float, good: str, bad: str,
            rate: float, args: argparse.Namespace) -> dict[str, object]:
    rolled_back = event is not None and event.rolled_back and pointer.version == good
    rollback_at = pointer.updated_at if rolled_back else None
    bad_preds = [p for p in users.predictions.values() if p.adapter_version == bad]
    restored = [p.ts for p in users.predictions.values()
                if p.adapter_version == good and rollback_at is not None and p.ts >= rollback_at]
    answered = set(users.predictions) | users.failed
    result: dict[str, object] = {
        "detected_after_s": round(event.decided_at - promoted_at, 3) if event and event.action == "rollback" else None,
        "rolled_back_after_s": round(rollback_at - promoted_at, 3) if rollback_at else None,
        "restored_after_s": round(min(restored) - promoted_at, 3) if restored else None,
        "requests": len(users.truth),
        "failed": len(users.failed),
        "lost": len(set(users.truth) - answered),
        "bad_predictions_served": len(bad_preds),
        "bad_wrong": sum(p.label != users.truth[p.request_id] for p in bad_preds),
        "reason": event.reason if event else None,
        "evidence_judged": event.evidence["new"]["judged"] if event else None,
        "evidence_pairs": event.evidence["checks"]["correctness"].get("pairs") if event else None,
        "guard_window_s": settings.guard_window_s,
        "guard_min_judged": settings.guard_min_judged,
        "guard_alpha": settings.guard_alpha,
        "guard_poll_s": settings.guard_poll_s,
        "rate_per_s": rate,
        "feedback_share": args.feedback,
        "source": "prometheus" if settings.prometheus_url else "in-process",
        "transport": settings.transport,
        "base_model": args.base_model,
        "profile": "quick" if args.quick else "full",
    }
    result["goal_met"] = bool(result["failed"] == 0 and result["lost"] == 0 and result["detected_after_s"] is not None
                              and result["detected_after_s"] <= 10.0)
    result["rolled_back_to"] = pointer.version if rolled_back else None
    return result


def _table(result: dict[str, object]) -> str:
    rows = [(k, "-" if v is None else str(v)) for k, v in result.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run: 60 req/s, 10 s window, 40 judged")
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    parser.add_argument("--base-model", default="tiny",
                        help="tiny (random 2-layer BERT, default), default (the bundled MiniLM) or a model folder")
    parser.add_argument("--rate", type=float, default=0.0, help="requests per second (default: by profile)")
    parser.add_argument("--feedback", type=float, default=0.5, help="share of predictions users judge")
    parser.add_argument("--window", type=float, default=0.0, help="guard_window_s (default: by profile)")
    parser.add_argument("--min-judged", type=int, default=0, help="guard_min_judged (default: by profile)")
    parser.add_argument("--poll", type=float, default=1.0, help="guard_poll_s")
    parser.add_argument("--limit", type=float, default=0.0, help="guard_max_watch_s, the probation limit "
                        "(default: three windows)")
    parser.add_argument("--p99-ratio", type=float, default=0.0, help="guard_max_p99_ratio (default: the setting's)")
    parser.add_argument("--aa", type=int, default=0, metavar="N",
                        help="promote N identical copies of the live adapter instead of a bad one")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--metrics-port", type=int, default=0, help="serve /metrics here (for Prometheus)")
    parser.add_argument("--infra", action="store_true",
                        help="start real Redis, Kafka and Prometheus (tests/infra.py) where installed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run(args)
    if args.aa:
        result["profile"] = "quick" if args.quick else "full"
    print(_table(result))
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
