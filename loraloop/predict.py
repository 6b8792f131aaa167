"""``loraloop predict "text"`` (or ``-`` for one text per line of standard input): send requests, print predictions.

Exit codes: 0 every request answered; 1 the broker does not answer, or a request timed out (its id
is printed, to trace it); 3 some request was refused (dead-lettered by the worker, with its reason).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator

from loraloop.cli import command
from loraloop.client import Answer, RequestClient
from loraloop.settings import Settings
from loraloop.transport import TransportError

logger = logging.getLogger(__name__)

_SETTINGS = ["transport", "kafka_bootstrap", "kafka_api_version", "kafka_security_protocol", "kafka_sasl_mechanism",
             "kafka_sasl_username", "kafka_sasl_password", "kafka_ssl_cafile", "kafka_ssl_certfile",
             "kafka_ssl_keyfile", "requests_topic", "predictions_topic", "dead_letter_topic", "max_text_bytes",
             "log_level"]
_CHUNK = 256  # lines of standard input in flight at once


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``loraloop predict`` (entry point ``loraloop.commands: predict``)."""
    parser = command(subparsers, "predict", _predict, settings=_SETTINGS,
                     help="Send a text through the requests topic and print the prediction of a running worker.")
    parser.add_argument("text", metavar="TEXT", help='The text to classify; "-" reads one text per line of stdin.')
    parser.add_argument("--json", action="store_true", help="Print one JSON object per request.")
    parser.add_argument("--timeout", type=float, default=10.0, help="Seconds to wait for each answer (default 10).")
    parser.add_argument("--tenant", default=None, help="Tenant to attach to the requests.")


def _predict(args: argparse.Namespace, settings: Settings) -> int:
    if settings.transport != "kafka":
        print("loraloop predict: transport is memory, which lives inside one process (no worker can answer here); "
              "set LORALOOP_TRANSPORT=kafka and LORALOOP_KAFKA_BOOTSTRAP, or use loraloop.client.RequestClient in "
              "the process that runs the worker", file=sys.stderr)
        return 1
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # a dead broker is reported in one line below
    worst = 0
    try:
        with RequestClient(settings) as client:
            for chunk in _chunks(_texts(args.text)):
                for answer in client.predict_many(chunk, timeout=args.timeout, tenant=args.tenant):
                    worst = max(worst, _show(answer, args, settings))
    except TransportError as e:
        print(f"loraloop predict: {e}", file=sys.stderr)
        return 1
    return {0: 0, 1: 3, 2: 1}[worst]


def _texts(text: str) -> Iterator[str]:
    if text != "-":
        yield text
        return
    for line in sys.stdin:
        line = line.rstrip("\n")
        if line.strip():
            yield line


def _chunks(texts: Iterator[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _show(answer: Answer, args: argparse.Namespace, settings: Settings) -> int:
    """Print one answer; return 0 answered, 1 refused, 2 timed out."""
    if args.json:
        print(json.dumps(answer.as_dict()), flush=True)
    elif answer.status == "answered":
        p = answer.prediction
        print(f"{p.label}\t{p.score:.3f}\tadapter {p.adapter_version}\trequest {answer.request_id}"
              + ("\t(truncated)" if p.truncated else ""), flush=True)
    elif answer.status == "timeout":
        print(f"loraloop predict: no prediction for request {answer.request_id} within {args.timeout:g} s: is a "
              f"worker consuming {settings.requests_topic}, with an active adapter? (loraloop status)",
              file=sys.stderr, flush=True)
    else:
        print(f"loraloop predict: request {answer.request_id} refused: {answer.reason}: {answer.detail}",
              file=sys.stderr, flush=True)
    return {"answered": 0, "dead_letter": 1, "refused": 1, "timeout": 2}[answer.status]
