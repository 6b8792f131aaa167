"""Every Prometheus metric of loraloop, defined once, on an injected registry.

Each process builds ``Metrics(registry)`` (a fresh ``CollectorRegistry`` in tests, read
back with ``registry.get_sample_value``). Label values are bounded: reasons come from
``schemas.REASONS``, versions are adapter version ids (a handful live at a time),
partitions are numbers; never request ids or free text. The dashboard, alert rules and
the guard's PromQL are tested against :data:`METRIC_NAMES`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

logger = logging.getLogger(__name__)

NAMESPACE = "loraloop"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
SWAP_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0)
CYCLE_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    """All loraloop metrics on one registry (pass ``CollectorRegistry()`` in tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, ns = self.registry, NAMESPACE
        # --- worker ---------------------------------------------------------------
        self.requests_consumed = Counter("requests_consumed", "Request records read from the requests topic.",
                                         namespace=ns, registry=r)
        self.requests_served = Counter("requests_served", "Requests answered with a prediction.",
                                       ["adapter_version"], namespace=ns, registry=r)
        self.dead_letters = Counter("dead_letters", "Records sent to the dead-letter topic, by source and reason.",
                                    ["source", "reason"], namespace=ns, registry=r)
        self.requests_truncated = Counter("requests_truncated", "Requests longer than max_tokens, truncated.",
                                          namespace=ns, registry=r)
        self.batch_size = Histogram("batch_size", "Requests per micro-batch.", buckets=BATCH_BUCKETS,
                                    namespace=ns, registry=r)
        self.inference_seconds = Histogram("inference_seconds", "Tokenize + forward time of one micro-batch.",
                                           buckets=LATENCY_BUCKETS, namespace=ns, registry=r)
        self.worker_stage_seconds = Histogram("worker_stage_seconds", "Time one micro-batch spends in each worker "
                                              "stage (poll, decode, tokenize, forward, encode, log, produce, "
                                              "commit); decode+tokenize and encode..produce overlap the forward "
                                              "passes of the neighbouring batches.", ["stage"],
                                              buckets=LATENCY_BUCKETS, namespace=ns, registry=r)
        self.end_to_end_seconds = Histogram("end_to_end_seconds", "From request ts to its prediction produced.",
                                            ["adapter_version"], buckets=LATENCY_BUCKETS, namespace=ns, registry=r)
        self.consumer_lag = Gauge("consumer_lag", "Records behind the end of each owned partition.",
                                  ["topic", "partition"], namespace=ns, registry=r)
        self.active_adapter = Gauge("active_adapter", "1 for the adapter version this process serves, else 0.",
                                    ["adapter_version"], namespace=ns, registry=r)
        self.adapter_swaps = Counter("adapter_swaps", "Adapter switches, by outcome (ok, failed).",
                                     ["outcome"], namespace=ns, registry=r)
        self.swap_seconds = Histogram("swap_seconds", "From pointer change seen to new adapter serving.",
                                      buckets=SWAP_BUCKETS, namespace=ns, registry=r)
        self.prediction_confidence = Histogram("prediction_confidence", "Top-1 probability of served predictions.",
                                               ["adapter_version"], buckets=CONFIDENCE_BUCKETS,
                                               namespace=ns, registry=r)
        self.request_log_errors = Counter("request_log_errors", "Failures to write the request log.",
                                          namespace=ns, registry=r)
        self.inference_errors = Counter("inference_errors", "Batches whose forward pass raised.",
                                        namespace=ns, registry=r)
        self.worker_loop_errors = Counter("worker_loop_errors", "Unexpected errors the worker's loop caught "
                                          "outside every per-record boundary (the batch is served again).",
                                          namespace=ns, registry=r)
        # --- feedback ---------------------------------------------------------------
        self.feedback_events = Counter("feedback_events", "Feedback events by kind and outcome "
                                       "(joined, duplicate, dead_letter).", ["kind", "outcome"],
                                       namespace=ns, registry=r)
        self.judged = Counter("judged", "Served predictions judged by feedback.", ["adapter_version"],
                              namespace=ns, registry=r)
        self.correct = Counter("correct", "Judged predictions the feedback confirmed.", ["adapter_version"],
                               namespace=ns, registry=r)
        self.paired_judged = Counter("paired_judged", "Judged predictions that the replaced adapter also scored "
                                     "(shadow), by serving version and outcome (both_correct, new_only, old_only, "
                                     "both_wrong).", ["adapter_version", "outcome"], namespace=ns, registry=r)
        self.buffer_depth = Gauge("buffer_depth", "Feedback examples not yet acknowledged by the learner.",
                                  namespace=ns, registry=r)
        self.buffer_dropped = Counter("buffer_dropped", "Buffered examples dropped unused, by reason (drop_oldest: "
                                      "buffer_trim made room; retention: older than request_text_retention_s; "
                                      "replay_retention: reservoir entries older than it).", ["reason"],
                                      namespace=ns, registry=r)
        self.buffer_lost = Counter("buffer_lost", "Examples a Redis without persistence lost in a restart (its depth "
                                   "before the restart; only when buffer_require_durable is off).",
                                   namespace=ns, registry=r)
        self.buffer_durable = Gauge("buffer_durable", "1 when the feedback buffer confirms durable appends, else 0.",
                                    namespace=ns, registry=r)
        self.feedback_held = Gauge("feedback_held", "Feedback events waiting in the ingester (early, or the store "
                                   "was down).", namespace=ns, registry=r)
        self.feedback_http_requests = Counter("feedback_http_requests", "Requests to the HTTP feedback endpoint, by "
                                              "status code.", ["code"], namespace=ns, registry=r)
        self.buffer_claimed = Counter("buffer_claimed", "Examples claimed by the learner.", namespace=ns, registry=r)
        self.feedback_quarantined = Counter("feedback_quarantined", "Acknowledged examples kept out of the replay "
                                            "reservoir, by reason: gate (their candidate lost on the reference or "
                                            "golden set) or screen (corrections the live version contests on a "
                                            "label far more than usual, not trained on).", ["reason"],
                                            namespace=ns, registry=r)
        self.feedback_deferred = Counter("feedback_deferred", "Claimed examples put back into the buffer for a "
                                         "later cycle, by reason: source_cap (their source was over its share of "
                                         "the cycle).", ["reason"], namespace=ns, registry=r)
        self.buffer_acknowledged = Counter("buffer_acknowledged", "Examples acknowledged by the learner.",
                                           namespace=ns, registry=r)
        # --- learner ---------------------------------------------------------------
        self.learner_cycles = Counter("learner_cycles", "Learner cycles by trigger and outcome.",
                                      ["trigger", "outcome"], namespace=ns, registry=r)
        self.learner_cycle_seconds = Histogram("learner_cycle_seconds", "Duration of one learner cycle.",
                                               buckets=CYCLE_BUCKETS, namespace=ns, registry=r)
        self.learner_last_cycle_timestamp = Gauge("learner_last_cycle_timestamp_seconds",
                                                  "Unix time the last cycle ended.", namespace=ns, registry=r)
        self.train_loss = Gauge("train_loss", "Final training loss of the last cycle.", namespace=ns, registry=r)
        self.learner_recovery = Counter("learner_recovery", "What the learner did to complete cycles a killed "
                                        "learner left (published, promoted, superseded, recorded, abandoned, "
                                        "settled: examples acknowledged without training them again, closed, "
                                        "unreadable).", ["action"], namespace=ns, registry=r)
        self.learner_triggers = Counter("learner_triggers", "Retrain trigger files by outcome (accepted, "
                                        "unsigned, bad_signature, malformed, stale, replayed).", ["outcome"],
                                        namespace=ns, registry=r)
        self.eval_accuracy = Gauge("eval_accuracy", "Accuracy of the last cycle's models by set and role.",
                                   ["dataset", "role"], namespace=ns, registry=r)
        self.promotions = Counter("promotions", "Adapter promotions by reason.", ["reason"], namespace=ns, registry=r)
        self.rollbacks = Counter("rollbacks", "Adapter rollbacks by reason.", ["reason"], namespace=ns, registry=r)
        # --- guard -----------------------------------------------------------------
        self.guard_decisions = Counter("guard_decisions", "Final rollback-guard decisions on promotions, by "
                                       "action (keep, rollback, insufficient_evidence) and reason.", ["action", "reason"],
                                       namespace=ns, registry=r)
        self.guard_source_errors = Counter("guard_source_errors", "Guard polls that could not read the metric "
                                           "source (Prometheus unreachable): no decision taken on them.",
                                           namespace=ns, registry=r)
        self.guard_conflicts = Counter("guard_conflicts", "Guard decisions refused because the probation had "
                                       "already ended (another guard decided, or a promotion replaced it).",
                                       namespace=ns, registry=r)
        self.guard_probation_pairs = Gauge("guard_probation_pairs", "Paired judgements of the version on probation "
                                           "so far (0: none on probation).", namespace=ns, registry=r)
        # --- request client and gateway ----------------------------------------------
        self.predict_requests = Counter("predict_requests", "Requests sent by the request client (loraloop "
                                        "predict, the gateway), by outcome (answered, dead_letter, timeout, "
                                        "refused: not sent).", ["outcome"], namespace=ns, registry=r)
        self.predict_in_flight = Gauge("predict_in_flight", "Requests the request client waits for.",
                                       namespace=ns, registry=r)
        self.gateway_http_requests = Counter("gateway_http_requests", "Requests to the HTTP gateway, by route "
                                             "template and status code.", ["route", "code"], namespace=ns,
                                             registry=r)
        self.build = Info("build", "loraloop version and process role.", namespace=ns, registry=r)


# Full exposition names (counters gain _total); the dashboard and alert rules must use only these.
METRIC_NAMES = frozenset({
    "loraloop_requests_consumed_total", "loraloop_requests_served_total", "loraloop_dead_letters_total",
    "loraloop_requests_truncated_total", "loraloop_batch_size", "loraloop_inference_seconds",
    "loraloop_worker_stage_seconds",
    "loraloop_end_to_end_seconds", "loraloop_consumer_lag", "loraloop_active_adapter",
    "loraloop_adapter_swaps_total", "loraloop_swap_seconds", "loraloop_prediction_confidence",
    "loraloop_request_log_errors_total", "loraloop_inference_errors_total", "loraloop_worker_loop_errors_total",
    "loraloop_feedback_events_total",
    "loraloop_judged_total", "loraloop_correct_total",
    "loraloop_paired_judged_total", "loraloop_buffer_depth", "loraloop_buffer_claimed_total",
    "loraloop_buffer_acknowledged_total", "loraloop_buffer_dropped_total", "loraloop_buffer_lost_total",
    "loraloop_buffer_durable", "loraloop_feedback_held", "loraloop_feedback_http_requests_total",
    "loraloop_feedback_quarantined_total", "loraloop_feedback_deferred_total", "loraloop_learner_cycles_total",
    "loraloop_learner_cycle_seconds", "loraloop_learner_recovery_total", "loraloop_learner_triggers_total",
    "loraloop_learner_last_cycle_timestamp_seconds", "loraloop_train_loss", "loraloop_eval_accuracy",
    "loraloop_promotions_total", "loraloop_rollbacks_total", "loraloop_build_info",
    "loraloop_guard_decisions_total", "loraloop_guard_source_errors_total", "loraloop_guard_conflicts_total",
    "loraloop_guard_probation_pairs",
    "loraloop_predict_requests_total", "loraloop_predict_in_flight", "loraloop_gateway_http_requests_total",
})


class _Handler(BaseHTTPRequestHandler):
    registry: CollectorRegistry
    ready: Callable[[], bool]
    reason: Callable[[], str | None]

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.startswith("/metrics"):
            self._reply(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        elif self.path.startswith("/healthz"):
            self._reply(200, b"ok\n", "text/plain")
        elif self.path.startswith("/readyz"):
            ok = bool(self.ready())
            why = None if ok else self.reason()
            body = b"ready\n" if ok else (f"not ready: {why}\n" if why else "not ready\n").encode()
            self._reply(200 if ok else 503, body, "text/plain")
        else:
            self._reply(404, b"not found\n", "text/plain")

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # scrapes every few seconds: keep logs quiet
        return None


def serve_http(registry: CollectorRegistry, port: int, ready: Callable[[], bool] = lambda: True,
               host: str = "0.0.0.0", reason: Callable[[], str | None] = lambda: None) -> ThreadingHTTPServer:
    """Serve /metrics, /healthz (liveness) and /readyz (readiness; ``reason`` says why not) on a daemon thread."""
    handler = type("Handler", (_Handler,), {"registry": registry, "ready": staticmethod(ready),
                                            "reason": staticmethod(reason)})
    server = ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, name=f"metrics-{port}", daemon=True).start()
    logger.info("metrics, /healthz and /readyz on port %d", server.server_address[1])
    return server
