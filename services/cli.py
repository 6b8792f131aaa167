"""``loraloop worker``: run one inference worker until SIGTERM or SIGINT.

Every setting is a flag (``loraloop worker --help``); ``--metrics-port`` serves
``/metrics``, ``/healthz`` and ``/readyz`` (ready = an adapter is loaded and the broker
answers). On SIGTERM/SIGINT the worker finishes its current batch, commits, leaves the
group (its partitions go to the other workers) and exits 0; a second signal aborts.
"""

from __future__ import annotations

import argparse
import logging
import threading

from loraloop import __version__
from loraloop.cli import command
from loraloop.metrics import Metrics, serve_http
from loraloop.redact import mask_url
from loraloop.runtime import stop_on_signals
from loraloop.settings import Settings

logger = logging.getLogger(__name__)


def register_worker(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``worker`` subcommand (entry point ``loraloop.commands: worker``)."""
    command(subparsers, "worker", run_worker,
            help="Serve predictions: consume the requests topic, run the active adapter, produce predictions.")


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Build the worker from settings and serve until a stop signal."""
    from services.worker import build_worker

    metrics = Metrics()
    metrics.build.info({"version": __version__, "role": "worker"})
    stop = threading.Event()
    stop_on_signals(stop, logger, "finishing the current batch")
    worker = build_worker(settings, metrics=metrics)
    server = serve_http(metrics.registry, settings.metrics_port, ready=worker.ready) if settings.metrics_port else None
    logger.info("worker up: group %s, topic %s -> %s, registry %s", settings.worker_group,
                settings.requests_topic, settings.predictions_topic, mask_url(settings.registry_url))
    try:
        worker.run(stop)
    finally:
        if server is not None:
            server.shutdown()
    logger.info("worker stopped")
    return 0
