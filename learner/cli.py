"""``loraloop learner`` (run cycles until SIGTERM) and ``loraloop retrain`` (ask a running learner for a cycle)."""

from __future__ import annotations

import argparse
import csv
import logging
import threading
import time
from pathlib import Path

from loraloop import __version__
from loraloop.cli import command
from loraloop.metrics import Metrics, serve_http
from loraloop.redact import mask_url
from loraloop.runtime import stop_on_signals
from loraloop.settings import Settings

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``loraloop learner``."""
    parser = command(subparsers, "learner", _run_learner,
                     help="Train LoRA adapters from buffered feedback on a timer, a feedback count or ops request; "
                          "promote those that pass the gate.")
    parser.add_argument("--bootstrap", type=Path, metavar="CSV",
                        help="When no version is active, first train one on this text,label CSV.")
    parser.add_argument("--text-column", default="text", help="Text column of --bootstrap (default: text).")
    parser.add_argument("--label-column", default="label", help="Label column of --bootstrap (default: label).")
    parser.add_argument("--once", action="store_true", help="Run one cycle now and exit (0 unless it failed).")


def register_retrain(subparsers: argparse._SubParsersAction) -> None:
    """Add ``loraloop retrain``."""
    parser = command(subparsers, "retrain", _run_retrain, settings=["registry_url", "api_token", "log_level"],
                     help="Ask the running learner (any process sharing the registry) for a cycle now "
                          "(signed with api_token, LORALOOP_API_TOKEN, which a learner that has one requires).")
    parser.add_argument("--wait", type=float, default=0.0, metavar="S",
                        help="Wait up to S seconds for the cycle's outcome and print it (default: do not wait).")


def read_labelled_csv(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    """Texts and labels of a CSV; a missing column is a ValueError naming the columns found."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {text_column, label_column} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
        rows = [(r[text_column], r[label_column]) for r in reader if r[text_column] and r[label_column]]
    return [t for t, _ in rows], [y for _, y in rows]


def _run_learner(args: argparse.Namespace, settings: Settings) -> int:
    from learner.cycle import build_learner

    metrics = Metrics()
    metrics.build.info({"version": __version__, "role": "learner"})
    learner = build_learner(settings, metrics=metrics)
    if args.bootstrap and not learner.registry.active().version:
        texts, labels = read_labelled_csv(args.bootstrap, args.text_column, args.label_column)
        print(f"bootstrapped {learner.bootstrap(texts, labels)} on {len(texts)} examples", flush=True)
    if args.once:
        outcome = learner.run_cycle("ops")
        print(outcome.outcome, outcome.version or "", outcome.reason, flush=True)
        return 1 if outcome.outcome == "failed" else 0
    stop = threading.Event()
    stop_on_signals(stop, logger, "the learner stops after the current cycle")
    server = serve_http(metrics.registry, settings.metrics_port, ready=learner.ready) if settings.metrics_port else None
    logger.info("learner up: registry %s, cycle every %.0fs or %d new examples", mask_url(settings.registry_url),
                settings.cycle_interval_s, settings.cycle_min_feedback)
    try:
        learner.run(stop)
    finally:
        if server is not None:
            server.shutdown()
        learner.close()
    return 0


def _run_retrain(args: argparse.Namespace, settings: Settings) -> int:
    from learner.trigger import OpsTriggers
    from loraloop.registry import make_registry

    registry = make_registry(settings)
    seen = len(registry.cycles())
    token = settings.api_token.get_secret_value()
    request_id = OpsTriggers(settings.registry_url, token=token).request("loraloop retrain")
    if not token:
        print("warning: api_token is not set, so the request is unsigned: a learner with api_token refuses it",
              flush=True)
    print(f"retrain requested: {request_id}", flush=True)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        cycles = registry.cycles()
        if len(cycles) > seen:
            last = cycles[-1]
            print(f"cycle {last.get('outcome')} {last.get('version') or ''}: {last.get('reason', '')}")
            return 0
        time.sleep(0.5)
    if args.wait:
        print(f"no cycle outcome within {args.wait:g}s (is a learner running on {settings.registry_url}?)")
        return 1
    return 0
