"""Hot-swap under load: does a promotion or rollback fail, lose or slow down any request?

Everything embedded in one process: an in-memory transport and request log, a file
registry in a temporary folder (file pointer store, polled every ``--poll-s``), and one
:class:`services.worker.InferenceWorker` built with ``build_worker`` on a thread. A
producer sends requests at a steady ``--rate``; an observer reads the predictions topic.
After ``--warmup-s`` the main thread makes ``--swaps`` pointer changes every
``--interval-s``, alternating a promotion (the next of ``--adapters`` constant adapters,
so some promotions load a version the worker has never seen, or has unloaded) and a
rollback (to a version still loaded: a switch). Every adapter predicts its own label
(``loraloop.testing.build_constant_adapter``), so a prediction proves which adapter
served it.

Reported (JSON with ``--out``):

* ``requests``, ``failed`` (predictions whose label is not the one their
  ``adapter_version`` predicts, plus dead letters), ``lost`` (requests without a
  prediction at the end), ``duplicates``, ``stale`` (predictions by a version that had
  stopped being active more than 2 s before), ``swaps``;
* ``p50_ms``, ``p99_ms``: end-to-end latency (sent -> prediction read by the observer) of
  requests sent after the warm-up and more than ``--window-s`` from every swap;
* ``p99_during_swap_ms``: the same for requests sent within ``--window-s`` after a swap;
* ``swap_s_p50``, ``swap_s_max``: pointer change -> first prediction by the new version.

Goal (issue 2): ``failed == lost == 0`` over at least 50 swaps and
``p99_during_swap_ms <= 1.5 * p99_ms``.

Example::

    .venv/bin/python benchmarks/hot_swap.py --out results/hot_swap.json
    .venv/bin/python benchmarks/hot_swap.py --quick --out /tmp/hot_swap_quick.json
"""

from __future__ import annotations

import bisect
import logging
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    base_parser,
    load_texts,
    machine,
    percentile,
    print_table,
    resolve_base_model,
    rounded,
    write_json,
)

logger = logging.getLogger("benchmarks.hot_swap")

STALE_AFTER_S = 2.0


@dataclass
class Trace:
    """What the producer sent, what the observer saw, and when the pointer changed."""

    sent: dict[str, float] = field(default_factory=dict)  # request id -> unix time sent
    received: dict[str, tuple[float, object]] = field(default_factory=dict)  # id -> (unix time read, Prediction)
    duplicates: int = 0
    initial: str = ""  # the version active before the first swap
    swaps: list[tuple[float, str, str]] = field(default_factory=list)  # (unix time, version, "promote"|"rollback")
    lock: threading.Lock = field(default_factory=threading.Lock)


def parse_args(argv: list[str] | None = None):
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, help="Pointer changes (default 50; 10 with --quick).")
    parser.add_argument("--interval-s", type=float, help="Seconds between swaps (default 3.0; 2.2 with --quick).")
    parser.add_argument("--rate", type=float, help="Requests per second (default 40; 100 with --quick).")
    parser.add_argument("--warmup-s", type=float, help="Traffic before the first swap, not measured "
                        "(default 3; 1 with --quick).")
    parser.add_argument("--window-s", type=float, default=1.0,
                        help="A request sent this close to a swap is not steady state; within this after one, "
                             "it counts as during the swap.")
    parser.add_argument("--adapters", type=int, default=4, help="Distinct constant adapters to cycle through.")
    parser.add_argument("--max-batch", type=int, default=32, help="Worker max_batch.")
    parser.add_argument("--max-wait-ms", type=int, default=5, help="Worker max_wait_ms.")
    parser.add_argument("--poll-s", type=float, default=0.5, help="Registry pointer polling period (adapter_poll_s).")
    parser.add_argument("--drain-s", type=float, default=30.0, help="Longest wait for the last predictions.")
    args = parser.parse_args(argv)
    args.swaps = args.swaps if args.swaps is not None else (10 if args.quick else 50)
    args.interval_s = args.interval_s if args.interval_s is not None else (2.2 if args.quick else 3.0)
    args.rate = args.rate if args.rate is not None else (100.0 if args.quick else 40.0)
    args.warmup_s = args.warmup_s if args.warmup_s is not None else (1.0 if args.quick else 3.0)
    return args


# --- the parts ---------------------------------------------------------------------------------
def produce(transport, topic: str, texts: list[str], rate: float, trace: Trace, stop: threading.Event) -> None:
    """Send requests at a steady rate (on a schedule, so a slow send does not lower the rate)."""
    from loraloop.schemas import Request

    producer = transport.producer()
    started = time.monotonic()
    i = 0
    while not stop.is_set():
        delay = started + i / rate - time.monotonic()
        if delay > 0 and stop.wait(delay):
            break
        request_id = f"r{i:07d}"
        now = time.time()
        with trace.lock:
            trace.sent[request_id] = now
        producer.send(topic, Request(id=request_id, text=texts[i % len(texts)], ts=now).to_bytes(),
                      key=request_id.encode())
        i += 1


def observe(transport, topic: str, trace: Trace, stop: threading.Event) -> None:
    """Read every prediction as it appears; remember when it was read."""
    from loraloop.schemas import Prediction

    consumer = transport.consumer([topic], "hot-swap-observer")
    try:
        while not stop.is_set():
            for record in consumer.poll(timeout_ms=50, max_records=10_000):
                now = time.time()
                prediction = Prediction.model_validate_json(record.value)
                with trace.lock:
                    if prediction.request_id in trace.received:
                        trace.duplicates += 1
                    else:
                        trace.received[prediction.request_id] = (now, prediction)
    finally:
        consumer.close()


def swap_loop(registry, order: list[str], trace: Trace, swaps: int, interval_s: float) -> None:
    """Alternate a promotion of the next adapter in ``order`` and a rollback, every ``interval_s``."""
    started = time.monotonic()
    for k in range(swaps):
        delay = started + (k + 1) * interval_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if k % 2 == 0:  # order[0] is active again after every rollback: promote the others in turn
            target = order[1 + (k // 2) % (len(order) - 1)]
            pointer = registry.promote(target, reason=f"benchmark swap {k}")
            kind = "promote"
        else:
            pointer = registry.rollback(reason=f"benchmark swap {k}")
            kind = "rollback"
        with trace.lock:
            trace.swaps.append((time.time(), pointer.version, kind))


# --- the analysis (pure) -------------------------------------------------------------------------
def analyse(trace: Trace, label_of: dict[str, str], dead_letters: int, measure_from: float,
            window_s: float) -> dict[str, object]:
    """The report's figures from a finished trace."""
    swap_times = [t for t, _, _ in trace.swaps]
    failed = dead_letters
    stale = 0
    steady, during = [], []
    for request_id, (read_at, prediction) in trace.received.items():
        if label_of.get(prediction.adapter_version) != prediction.label:
            failed += 1
        if not _was_active(prediction.adapter_version, prediction.ts, trace.initial, trace.swaps):
            stale += 1
        sent = trace.sent.get(request_id)
        if sent is None or sent < measure_from:
            continue
        latency_ms = (read_at - sent) * 1000
        i = bisect.bisect_right(swap_times, sent)
        after_previous = sent - swap_times[i - 1] if i > 0 else float("inf")
        before_next = swap_times[i] - sent if i < len(swap_times) else float("inf")
        if after_previous < window_s:
            during.append(latency_ms)
        elif after_previous >= window_s and before_next >= window_s:
            steady.append(latency_ms)
    lost = sum(1 for r in trace.sent if r not in trace.received)
    swap_s = _swap_delays(trace)
    p99 = percentile(steady, 99)
    p99_during = percentile(during, 99)
    return {
        "requests": len(trace.sent), "predictions": len(trace.received), "failed": failed, "lost": lost,
        "dead_letters": dead_letters, "duplicates": trace.duplicates, "stale": stale, "swaps": len(trace.swaps),
        "steady_requests": len(steady), "during_swap_requests": len(during),
        "p50_ms": rounded(percentile(steady, 50)), "p99_ms": rounded(p99),
        "p50_during_swap_ms": rounded(percentile(during, 50)), "p99_during_swap_ms": rounded(p99_during),
        "max_during_swap_ms": rounded(max(during, default=None) if during else None),
        "p99_during_swap_ratio": rounded(p99_during / p99 if p99 and p99_during is not None else None, 3),
        "swap_s_p50": rounded(percentile(swap_s, 50), 3), "swap_s_max": rounded(max(swap_s) if swap_s else None, 3),
        "swaps_not_applied": len(trace.swaps) - len(swap_s),
    }


def _was_active(version: str, at: float, initial: str, swaps: list[tuple[float, str, str]]) -> bool:
    """Whether ``version`` was the active one at some time in ``[at - 2 s, at]``."""
    starts = [-float("inf"), *(t for t, _, _ in swaps)]
    versions = [initial, *(v for _, v, _ in swaps)]
    for i, (start, active) in enumerate(zip(starts, versions, strict=True)):
        end = starts[i + 1] if i + 1 < len(starts) else float("inf")
        if active == version and start <= at and end >= at - STALE_AFTER_S:
            return True
    return False


def _swap_delays(trace: Trace) -> list[float]:
    """Per swap: seconds from the pointer change to the first prediction by the new version."""
    produced = sorted((p.ts, p.adapter_version) for _, p in trace.received.values())
    times = [t for t, _ in produced]
    delays = []
    for k, (t, version, _) in enumerate(trace.swaps):
        until = trace.swaps[k + 1][0] if k + 1 < len(trace.swaps) else float("inf")
        for j in range(bisect.bisect_left(times, t), len(produced)):
            ts, v = produced[j]
            if ts >= until:
                break
            if v == version:
                delays.append(ts - t)
                break
    return delays


# --- the run ------------------------------------------------------------------------------------
def run(args) -> dict[str, object]:
    import torch
    from prometheus_client import CollectorRegistry

    from loraloop.buffer.memory import MemoryRequestLog
    from loraloop.metrics import Metrics
    from loraloop.model import load_base, load_tokenizer
    from loraloop.registry import make_registry
    from loraloop.settings import Settings
    from loraloop.testing import build_constant_adapter
    from loraloop.transport import TopicPartition
    from loraloop.transport.memory import MemoryBroker, MemoryTransport
    from services.worker import build_worker

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="loraloop-hot-swap-") as tmp_name:
        tmp = Path(tmp_name)
        settings = Settings(base_model=resolve_base_model(args, tmp), registry_url=str(tmp / "registry"),
                            registry_pointer="file", redis_url="", adapter_poll_s=args.poll_s,
                            max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, label_capacity=16,
                            device=args.device, torch_threads=args.threads, transport="memory")
        base = load_base(settings)
        tokenizer = load_tokenizer(settings)
        registry = make_registry(settings)
        labels = [f"adapter_{i}" for i in range(args.adapters)]
        label_of: dict[str, str] = {}
        order = []
        for i, label in enumerate(labels):
            folder = build_constant_adapter(settings, labels, label, tmp / f"adapter-{i}", base=base, seed=i)
            version = registry.publish(folder, metadata={"benchmark": "hot_swap", "predicts": label})
            label_of[version] = label
            order.append(version)
        registry.promote(order[0], reason="benchmark start")

        transport = MemoryTransport(MemoryBroker(partitions=4))
        worker = build_worker(settings, transport=transport, registry=registry,
                              request_log=MemoryRequestLog(ttl_s=3600), metrics=Metrics(CollectorRegistry()),
                              base=base, tokenizer=tokenizer)
        trace = Trace(initial=order[0])
        stop_worker, stop_traffic, stop_observer = threading.Event(), threading.Event(), threading.Event()
        threads = [threading.Thread(target=worker.run, args=(stop_worker,), name="worker"),
                   threading.Thread(target=observe, args=(transport, settings.predictions_topic, trace,
                                                         stop_observer), name="observer"),
                   threading.Thread(target=produce, args=(transport, settings.requests_topic,
                                                         load_texts(args, 2000), args.rate, trace, stop_traffic),
                                    name="producer")]
        threads[0].start()
        deadline = time.monotonic() + 120
        while worker.active_version != order[0]:
            if time.monotonic() > deadline:
                raise SystemExit("the worker did not load the first adapter within 120 s")
            time.sleep(0.05)
        for thread in threads[1:]:
            thread.start()
        measure_from = time.time() + args.warmup_s
        time.sleep(args.warmup_s)
        print(f"{args.swaps} swaps, one every {args.interval_s} s, at {args.rate:g} requests/s ...", flush=True)
        swap_loop(registry, order, trace, args.swaps, args.interval_s)
        time.sleep(args.window_s + 0.5)  # the last swap's window, then stop sending
        stop_traffic.set()
        threads[2].join()
        deadline = time.monotonic() + args.drain_s
        while time.monotonic() < deadline:
            with trace.lock:
                if len(trace.received) >= len(trace.sent):
                    break
            time.sleep(0.05)
        stop_worker.set()
        threads[0].join(30)
        stop_observer.set()
        threads[1].join(10)
        broker = transport.broker
        dead = sum(broker.end_offset(TopicPartition(settings.dead_letter_topic, p))
                   for p in range(broker.partitions(settings.dead_letter_topic)))
        result = analyse(trace, label_of, dead, measure_from, args.window_s)
        pauses = [pause * 1000 for _, _, pause in worker.swap_log]
        result.update(
            swap_pause_ms_p50=rounded(percentile(pauses, 50)), swap_pause_ms_max=rounded(max(pauses, default=0.0)),
            settings={"base_model": settings.base_model_path, "quick": args.quick, "rate": args.rate,
                      "interval_s": args.interval_s, "window_s": args.window_s, "warmup_s": args.warmup_s,
                      "adapters": args.adapters, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
                      "poll_s": args.poll_s, "threads": args.threads, "device": args.device,
                      "dataset": str(args.dataset) if args.dataset else "generated"},
            machine=machine())
    p99, during = result["p99_ms"], result["p99_during_swap_ms"]
    result["goal_met"] = bool(result["failed"] == result["lost"] == 0 and p99 and during is not None
                              and during <= 1.5 * p99 and result["swaps"] >= 50)
    return result


def report(result: dict[str, object]) -> None:
    columns = ["requests", "failed", "lost", "duplicates", "stale", "swaps", "p50_ms", "p99_ms",
               "p99_during_swap_ms", "p99_during_swap_ratio", "swap_s_p50", "swap_s_max", "swap_pause_ms_max"]
    print_table([{"run": "hot swap", **result}], ["run", *columns], title="hot-swap benchmark")
    print(f"\ngoal (failed == lost == 0, >= 50 swaps, p99_during_swap_ms <= 1.5 * p99_ms): "
          f"{'met' if result['goal_met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("loraloop.registry.store").setLevel(logging.ERROR)  # one "rolled back" line per swap
    args = parse_args(argv)
    result = run(args)
    report(result)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
