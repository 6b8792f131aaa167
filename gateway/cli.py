"""``loraloop gateway``: the HTTP edge (predict, feedback, read-only status) until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import ipaddress
import logging

from loraloop import __version__
from loraloop.cli import command
from loraloop.metrics import Metrics, serve_http
from loraloop.redact import mask_url
from loraloop.runtime import CachedProbe
from loraloop.settings import Settings

logger = logging.getLogger(__name__)

_SETTINGS = ["transport", "kafka_bootstrap", "kafka_api_version", "kafka_security_protocol", "kafka_sasl_mechanism",
             "kafka_sasl_username", "kafka_sasl_password", "kafka_ssl_cafile", "kafka_ssl_certfile",
             "kafka_ssl_keyfile", "requests_topic", "predictions_topic", "feedback_topic", "dead_letter_topic",
             "max_text_bytes", "registry_url", "registry_pointer", "redis_url", "redis_prefix", "registry_verify_key",
             "label_capacity", "api_token", "metrics_port", "log_level"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``loraloop gateway`` (entry point ``loraloop.commands: gateway``)."""
    parser = command(subparsers, "gateway", run_gateway, settings=_SETTINGS,
                     help="HTTP gateway: POST /v1/predict and /v1/feedback through the topics, GET /v1/status, "
                          "/v1/adapters, /openapi.json and a status page at /.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="Address to bind (default 127.0.0.1; beyond loopback api_token is required).")
    parser.add_argument("--port", type=int, default=8000, help="Port (default: 8000).")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="Seconds to wait for a prediction unless a request names its own timeout (default 10).")
    parser.add_argument("--max-in-flight", type=int, default=10_000,
                        help="Most predictions waited for at once; more are answered 503 (default 10000).")
    parser.add_argument("--max-connections", type=int, default=1_000,
                        help="Most open connections; more are answered 503 by uvicorn (default 1000).")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine.

    Example:
        >>> [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0")]
        [True, True, True, False]
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_gateway(settings: Settings, *, metrics: Metrics | None = None, default_timeout_s: float = 10.0,
                  max_in_flight: int = 10_000, transport: object | None = None):
    """The :class:`gateway.app.Gateway` wired from settings (the transport can be injected: tests)."""
    from gateway.app import Gateway
    from loraloop.client import RequestClient
    from loraloop.registry import make_registry
    from loraloop.status import status_buffer
    from loraloop.status_http import StatusView

    metrics = metrics or Metrics()
    client = RequestClient(settings, transport=transport, metrics=metrics, max_in_flight=max_in_flight)
    view = StatusView(make_registry(settings), status_buffer(settings), redis_url=settings.redis_url)
    return Gateway(settings, client, view, metrics, default_timeout_s=default_timeout_s)


def run_gateway(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    if not is_loopback(args.host) and not settings.api_token.get_secret_value():
        raise ValueError(f"refusing to bind {args.host} beyond loopback without api_token (LORALOOP_API_TOKEN): "
                         f"POST /v1/predict and /v1/feedback would be open to the network")
    metrics = Metrics()
    metrics.build.info({"version": __version__, "role": "gateway"})
    gateway = build_gateway(settings, metrics=metrics, default_timeout_s=args.timeout,
                            max_in_flight=args.max_in_flight)
    ready = CachedProbe(lambda: gateway.client.in_flight < gateway.client.max_in_flight
                        and gateway.client.start().transport.ping(timeout=1.0))
    server = serve_http(metrics.registry, settings.metrics_port, ready=ready) if settings.metrics_port else None
    logger.info("gateway on http://%s:%d: requests %s -> predictions %s (transport %s, registry %s)", args.host,
                args.port, settings.requests_topic, settings.predictions_topic, settings.transport,
                mask_url(settings.registry_url))
    try:
        uvicorn.run(gateway.app(), host=args.host, port=args.port, log_level="warning",
                    limit_concurrency=args.max_connections, timeout_keep_alive=10)
    finally:
        if server is not None:
            server.shutdown()
    return 0
