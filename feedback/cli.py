"""``loraloop feedback``: ``run`` the ingester until SIGTERM/SIGINT, or ``send`` one event.

``loraloop feedback run --metrics-port 9102 --feedback-http-port 8081`` serves
``/metrics``, ``/healthz``, ``/readyz`` and the HTTP endpoint ``POST /feedback``.
``loraloop feedback send --request-id r1 --kind label --label billing`` prints the event sent.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from loraloop import __version__
from loraloop.cli import command
from loraloop.metrics import Metrics, serve_http
from loraloop.runtime import stop_on_signals
from loraloop.settings import Settings

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``feedback run`` and ``feedback send`` (entry point ``loraloop.commands: feedback``)."""
    parser = subparsers.add_parser("feedback", help="Feedback: run the ingester, or send one event.",
                                   description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="feedback_command", metavar="SUBCOMMAND")
    command(sub, "run", run_ingester, help="Join feedback to served requests and buffer it until SIGTERM.")
    send = command(sub, "send", send_event, help="Send one feedback event to the feedback topic.")
    send.add_argument("--request-id", required=True, help="Id of the served request the feedback is about.")
    send.add_argument("--kind", required=True, choices=["label", "thumbs_up", "thumbs_down"])
    send.add_argument("--label", default=None, help="The correct label (kind label only).")
    send.add_argument("--source", default=None, help="Who gives the feedback (a user, client or annotator id): "
                      "the learner caps each source's share of a cycle (optional).")


def run_ingester(args: argparse.Namespace, settings: Settings) -> int:
    """Build the ingester from settings and run it until a stop signal."""
    from feedback.http import serve_feedback
    from feedback.ingester import NotDurable, build_ingester

    metrics = Metrics()
    metrics.build.info({"version": __version__, "role": "ingester"})
    stop = threading.Event()
    stop_on_signals(stop, logger, "committing and stopping")
    ingester = build_ingester(settings, metrics=metrics)
    closers = []
    try:
        if settings.metrics_port:
            closers.append(serve_http(metrics.registry, settings.metrics_port, ready=ingester.ready).shutdown)
        if settings.feedback_http_port:
            closers.append(serve_feedback(settings, metrics=metrics).close)
        logger.info("ingester up: group %s, topic %s, dead letters to %s", settings.ingester_group,
                    settings.feedback_topic, settings.dead_letter_topic)
        ingester.run(stop)
    except (NotDurable, ValueError) as e:  # a refused configuration: say why, exit non-zero
        logger.error("ingester refused to start: %s", e)
        print(f"loraloop feedback run: {e}", file=sys.stderr)
        return 2
    finally:
        for close in closers:
            close()
    logger.info("ingester stopped")
    return 0


def send_event(args: argparse.Namespace, settings: Settings) -> int:
    """Send one event and print it as JSON once the broker acknowledged it."""
    from feedback.client import FeedbackClient

    if (args.kind == "label") != bool(args.label):
        print(f"loraloop feedback send: --label is required with --kind label and only then "
              f"(kind {args.kind!r}, label {args.label!r})", file=sys.stderr)
        return 2
    if settings.transport == "memory":
        print("loraloop feedback send: the in-memory transport lives inside one process, so no worker or ingester "
              "would ever read this event; use --transport kafka (or LORALOOP_TRANSPORT=kafka) with "
              "--kafka-bootstrap, or the feedback HTTP endpoint of `loraloop feedback run`", file=sys.stderr)
        return 2
    with FeedbackClient(settings) as client:
        if args.kind == "label":
            event = client.label(args.request_id, args.label, source=args.source)
        else:
            event = getattr(client, args.kind)(args.request_id, source=args.source)
        client.flush()
    print(event.model_dump_json(exclude_none=True))
    return 0
