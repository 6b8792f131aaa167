"""Feedback ingest: events/s through validation, join and buffer into real Redis, next to ``redis-benchmark``.

A redis-server is started on a free port (``tests/infra.py``'s ``RedisServer``; its
``appendfsync`` set by ``--fsync``) unless ``--redis-url`` names one. The request log in
Redis is pre-filled with one served request per event; the feedback events (a mix of
``label``, ``thumbs_up`` and ``thumbs_down``) are produced to an in-memory transport and
read back as records. The timed part is :meth:`feedback.ingester.FeedbackIngester.handle_batch`
on those records, in batches of the ingester's poll size: decode and validate, join against
the request log (one MGET per batch), then deduplicate, bound and append each event with one
call of the buffer's append script (SET NX EX + XLEN + XADD inside Redis), pipelined per batch.

In the same run, on the same server, ``redis-benchmark`` (one client, pipelined ``-P 16``,
and unpipelined ``-P 1``) measures what the ingester sends per event: a GET (its key's share
of the MGET) and an EVAL of the same append script with a payload of the same size. Their
combination ``1 / sum(calls_per_event / rate)`` is the rate at which one client could send one
event's commands: ``ratio_pipelined`` compares the ingester with it (goal of issue 5: at least
0.25). The script's inner commands are also benchmarked alone, for reference.

Example::

    .venv/bin/python benchmarks/feedback_ingest.py --out results/feedback_ingest.json
    .venv/bin/python benchmarks/feedback_ingest.py --quick --out /tmp/feedback_ingest_quick.json
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _common import machine, print_table, write_json

logger = logging.getLogger("benchmarks.feedback_ingest")

LABELS = [f"intent_{i:02d}" for i in range(40)]
BENCH_COMMANDS = ("get", "evalsha", "set", "xlen", "xadd")  # benchmarked alone
TOP_LEVEL = ("get", "evalsha")  # what the ingester sends per event: a key of the MGET, one append script call


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="Feedback events ingested (default: 20000).")
    parser.add_argument("--bench-requests", type=int, default=200_000,
                        help="Requests of each redis-benchmark run (default: 200000).")
    parser.add_argument("--pipeline", type=int, default=16, help="redis-benchmark pipeline depth (default: 16).")
    parser.add_argument("--redis-url", default="", help="An existing Redis (default: start a redis-server here).")
    parser.add_argument("--fsync", default="everysec", choices=["always", "everysec", "no"],
                        help="appendfsync of the started redis-server (default: everysec, Redis' AOF default).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the generated events.")
    parser.add_argument("--quick", action="store_true", help="A smoke run: 1000 events, short redis-benchmark runs.")
    parser.add_argument("--out", type=Path, help="Write the results as JSON to this file.")
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.bench_requests = min(args.events, 1000), min(args.bench_requests, 20_000)
    return args


# --- data ----------------------------------------------------------------------------------------
def served_requests(n: int, seed: int) -> list:
    """``n`` served requests with ids ``000000000000``..., the form of redis-benchmark's ``__rand_int__``."""
    from loraloop.schemas import ServedRequest

    rng = random.Random(seed)
    words = "card transfer refund balance account payment pin top up fee exchange cash declined pending".split()
    return [ServedRequest(request_id=f"{i:012d}", text=" ".join(rng.choices(words, k=rng.randint(5, 25))),
                          label=rng.choice(LABELS), score=round(rng.random(), 3), adapter_version="v000001")
            for i in range(n)]


def feedback_events(served: list, seed: int) -> list:
    """One event per served request: 60% label, 30% thumbs_up, 10% thumbs_down."""
    from loraloop.schemas import FeedbackEvent

    rng = random.Random(seed + 1)
    out = []
    for s in served:
        draw = rng.random()
        kind = "label" if draw < 0.6 else "thumbs_up" if draw < 0.9 else "thumbs_down"
        out.append(FeedbackEvent(event_id=uuid.UUID(int=rng.getrandbits(128)).hex, request_id=s.request_id,
                                 kind=kind, label=rng.choice(LABELS) if kind == "label" else None))
    return out


# --- the ingester ----------------------------------------------------------------------------------
def command_calls(client) -> dict[str, int]:
    """Calls per command so far (``INFO commandstats``), lower-case names."""
    return {name.removeprefix("cmdstat_").lower(): int(stats["calls"])
            for name, stats in client.info("commandstats").items()}


def ingest(url: str, n: int, seed: int) -> tuple[dict, object]:
    """Pre-fill the request log, build the records, time ``handle_batch``; return figures and a sample Example."""
    from feedback.ingester import MAX_RECORDS, FeedbackIngester
    from loraloop.buffer import make_feedback_buffer, make_request_log
    from loraloop.buffer.redis import connect
    from loraloop.metrics import Metrics
    from loraloop.settings import Settings
    from loraloop.transport.memory import MemoryTransport

    prefix = f"bench{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=url, redis_prefix=prefix, buffer_max=n + 1, transport="memory")
    request_log, buffer = make_request_log(settings), make_feedback_buffer(settings)
    served = served_requests(n, seed)
    for start in range(0, n, 1000):
        request_log.record(served[start:start + 1000])
    transport = MemoryTransport()  # a private broker: records as the ingester would poll them
    producer = transport.producer()
    for event in feedback_events(served, seed):
        producer.send(settings.feedback_topic, event.to_bytes(), key=event.request_id.encode())
    reader = transport.consumer([settings.feedback_topic], "prebuild")
    records = []
    while len(records) < n:
        records += reader.poll(timeout_ms=100, max_records=10_000)
    reader.close()

    client = connect(url)
    metrics = Metrics()
    ingester = FeedbackIngester(settings, transport=transport, request_log=request_log, buffer=buffer,
                                metrics=metrics)
    ingester.handle_batch([])  # join the group and open the clients outside the timed part
    before = command_calls(client)
    started = time.perf_counter()
    for start in range(0, n, MAX_RECORDS):
        ingester.handle_batch(records[start:start + MAX_RECORDS])
    elapsed = time.perf_counter() - started
    after = command_calls(client)
    ingester.close()
    depth = buffer.depth()
    sample = buffer.claim("bench", 1).examples[0] if depth else None
    calls = {c: round((after.get(c, 0) - before.get(c, 0)) / n, 3) for c in sorted(set(after) | set(before))
             if after.get(c, 0) - before.get(c, 0) >= n / 100}  # not the one-off ones (INFO, HELLO...)
    _delete_prefix(client, prefix)
    client.close()
    if depth != n:
        raise RuntimeError(f"{n} events ingested but the buffer holds {depth}: some were refused "
                           f"(held {ingester.held}); see the log")
    return {"events": n, "seconds": round(elapsed, 3), "events_per_s": round(n / elapsed, 1),
            "us_per_event": round(elapsed / n * 1e6, 1), "redis_calls_per_event": calls, "buffered": depth}, sample


def _delete_prefix(client, prefix: str) -> None:
    batch = []
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            client.delete(*batch)
            batch = []
    if batch:
        client.delete(*batch)


# --- redis-benchmark -------------------------------------------------------------------------------
from loraloop.buffer.redis import _APPEND_LUA  # noqa: E402 - the same script the buffer runs


def bench_commands(n_keys: int, served_bytes: bytes, example_bytes: bytes, prefix: str) -> dict[str, list[str]]:
    """The ingester's per-event commands for redis-benchmark, with payloads of the same size."""
    return {
        "get": ["-r", str(n_keys), "GET", f"{prefix}:req:__rand_int__"],
        "set": ["-r", "1000000000", "SET", f"{prefix}:seen:__rand_int__", "1", "NX", "EX", "604800"],
        "xlen": ["XLEN", f"{prefix}:stream"],
        "xadd": ["XADD", f"{prefix}:stream", "*", "e", example_bytes.decode()],
        "evalsha": ["-r", "1000000000", "EVAL", _APPEND_LUA, "2", f"{prefix}:seen:__rand_int__", f"{prefix}:stream",
                    "604800", "1000000000", "reject", example_bytes.decode(), str(7 * 86400 * 1000), "learners"],
        "_fill": ["-r", str(n_keys), "SET", f"{prefix}:req:__rand_int__", served_bytes.decode(), "EX", "600"],
    }


def redis_benchmark(port: int, host: str, command: list[str], requests: int, pipeline: int) -> float:
    """Requests/s of one redis-benchmark run: one client (``-c 1``), pipeline ``pipeline``."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise SystemExit("redis-benchmark not found (Debian: apt-get install redis-tools)")
    argv = [binary, "-h", host, "-p", str(port), "-c", "1", "-P", str(pipeline), "-n", str(requests), "--csv",
            *command]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True).stdout
    lines = [line for line in out.splitlines() if line.strip()]
    header = next(csv.reader(io.StringIO(lines[0]))) if lines else []
    if "rps" not in header or len(lines) < 2:
        raise RuntimeError(f"unexpected redis-benchmark output for {command[:3]}: {out[:300]!r}")
    # the test name (first column) holds the command with its payload, unescaped: read the figures from the right
    figures = lines[-1].rsplit(",", len(header) - 1)[1:]
    return float(figures[header.index("rps") - 1].strip('"'))


def combined_rate(rates: dict[str, float], calls: dict[str, float]) -> float:
    """Events/s one client could reach sending only each event's commands: ``1 / sum(calls / rate)``.

    Example:
        >>> combined_rate({"get": 100.0, "xadd": 50.0}, {"get": 1, "xadd": 1, "ping": 3})
        33.3
    """
    seconds = sum(calls[c] / rates[c] for c in rates if c in calls)
    return round(1.0 / seconds, 1) if seconds else 0.0


def benchmark_redis(url: str, n_keys: int, served: object, example: object, requests: int, pipeline: int
                    ) -> dict[str, dict[str, float]]:
    from urllib.parse import urlparse

    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    prefix = f"redisbench{uuid.uuid4().hex[:8]}"
    commands = bench_commands(n_keys, served.to_bytes(), example.to_bytes(), prefix)
    redis_benchmark(port, host, commands["_fill"], n_keys * 3, pipeline)  # most GET keys exist, as in the log
    out: dict[str, dict[str, float]] = {"pipelined": {}, "unpipelined": {}}
    for name in BENCH_COMMANDS:
        out["pipelined"][name] = round(redis_benchmark(port, host, commands[name], requests, pipeline), 1)
        out["unpipelined"][name] = round(redis_benchmark(port, host, commands[name], max(1000, requests // 10), 1), 1)
    from loraloop.buffer.redis import connect

    client = connect(url)
    _delete_prefix(client, prefix)
    client.close()
    return out


# --- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    server = None
    with tempfile.TemporaryDirectory(prefix="loraloop-ingest-bench-") as tmp:
        url = args.redis_url
        if not url:
            from tests.infra import RedisServer

            server = RedisServer(Path(tmp))
            server.start()
            url = server.url
        try:
            import redis

            client = redis.Redis.from_url(url)
            if server is not None:
                client.config_set("appendfsync", args.fsync)
            redis_config = {k: client.config_get(k).get(k) for k in ("appendonly", "appendfsync", "save")}
            redis_version = client.info("server").get("redis_version")
            client.close()
            print(f"ingesting {args.events} feedback events into {url} ({redis_config})", flush=True)
            ingester, example = ingest(url, args.events, args.seed)
            print(f"redis-benchmark: one client, -P {args.pipeline} and -P 1, {args.bench_requests} requests per "
                  "command", flush=True)
            rates = benchmark_redis(url, args.events, served_requests(1, args.seed)[0], example,
                                    args.bench_requests, args.pipeline)
        finally:
            if server is not None:
                server.stop()
    calls = {"get": 1.0, "evalsha": ingester["redis_calls_per_event"].get("evalsha", 0.0)}  # per event, top level
    pipelined = combined_rate(rates["pipelined"], calls)
    unpipelined = combined_rate(rates["unpipelined"], calls)
    results = {
        "ingester": ingester,
        "redis_benchmark": {"pipeline": args.pipeline, "clients": 1, "requests": args.bench_requests,
                            "commands_per_s": rates, "event_equivalent_per_s_pipelined": pipelined,
                            "event_equivalent_per_s_unpipelined": unpipelined},
        "ratio_pipelined": round(ingester["events_per_s"] / pipelined, 4) if pipelined else None,
        "ratio_unpipelined": round(ingester["events_per_s"] / unpipelined, 4) if unpipelined else None,
        "ratio_vs_xadd_pipelined": round(ingester["events_per_s"] / rates["pipelined"]["xadd"], 4),
        "config": {"events": args.events, "quick": args.quick, "redis_url": args.redis_url or "(started here)",
                   "redis": redis_config, "redis_version": redis_version, "seed": args.seed},
        "machine": machine(),
    }
    _print(results)
    write_json(args.out, results)
    return 0


def _print(results: dict) -> None:
    ing, rb = results["ingester"], results["redis_benchmark"]
    rows = [{"what": "loraloop ingester (handle_batch)", "per_s": ing["events_per_s"], "unit": "events",
             "ratio": None}]
    for name in BENCH_COMMANDS:
        rows.append({"what": f"redis-benchmark {name.upper()} -P {rb['pipeline']}",
                     "per_s": rb["commands_per_s"]["pipelined"][name], "unit": "commands",
                     "ratio": round(ing["events_per_s"] / rb["commands_per_s"]["pipelined"][name], 4)})
    rows.append({"what": f"redis-benchmark, one event's commands -P {rb['pipeline']}",
                 "per_s": rb["event_equivalent_per_s_pipelined"], "unit": "events", "ratio": results["ratio_pipelined"]})
    rows.append({"what": "redis-benchmark, one event's commands -P 1", "per_s": rb["event_equivalent_per_s_unpipelined"],
                 "unit": "events", "ratio": results["ratio_unpipelined"]})
    print_table(rows, ["what", "per_s", "unit", "ratio"],
                title=f"feedback ingest into Redis ({ing['events']} events; Redis calls per event: "
                      f"{ing['redis_calls_per_event']})")


if __name__ == "__main__":
    sys.exit(main())
