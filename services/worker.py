"""The inference worker: requests topic -> micro-batch -> base model + active LoRA adapter -> predictions.

One worker is one member of the consumer group ``settings.worker_group``; several
workers split the partitions of the requests topic, and a worker that stops hands its
partitions to the others.

Delivery is **at-least-once**. A micro-batch's offsets are committed only after the
broker acknowledged every prediction and dead letter produced for it. A crash (or a
failed produce, or a refused commit) between producing and committing means those
requests are served again by whoever owns the partition next, so a prediction can be
repeated: consumers of the predictions topic must treat ``request_id`` as an
idempotency key (predictions are keyed by it, so repeats land on the same partition).

No input stops the worker. Every per-record step has its own error boundary: decoding
(malformed, oversize or too deeply nested JSON, invalid Unicode, missing fields, wrong
types, empty or over-long text: :func:`loraloop.schemas.decode_request`), inference, and
the serialization of the prediction and its request-log entry. A record that raises
anything becomes a dead letter with its reason and its offset is committed with the
batch. A tokenizer or forward pass that raises is retried on halves of the batch until
each failing request stands alone (:func:`services.batching.isolate_failures`): only those
are dead-lettered (``inference_error``), the others are answered. Anything else the loop
meets is counted (``worker_loop_errors``) and the batch is served again; only ``stop``
ends :meth:`InferenceWorker.run`. With ``redact_dead_letters`` a dead letter keeps its
reason, detail and offset but only a keyed hash and the length of the refused record.
Texts longer than ``max_tokens`` tokens are truncated and flagged (``Prediction.truncated``).

Adapters: a background thread blocks on ``registry.wait_for_change`` (Redis pub/sub, or
polling), fetches each newly active version (checksums verified by the registry) and
verifies it against the model in a dry run (:class:`services.adapters.AdapterManager`).
The inference thread installs and activates it *between two batches*, so PEFT's model
mutation never races a forward pass and every prediction names the adapter that made
it. The previous versions stay loaded (rollback is a switch); a version that fails to
load is reported and the worker stays on its current one. A worker with no active
adapter is not ready and does not join the group: requests wait in the topic.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import threading
import time
import traceback
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from loraloop.buffer import RequestLog, make_request_log
from loraloop.metrics import Metrics
from loraloop.registry import AdapterRegistry, make_registry
from loraloop.runtime import CachedProbe, RateLimitedLog, close_quietly
from loraloop.schemas import (
    DeadLetter,
    InvalidMessage,
    Prediction,
    Request,
    ServedRequest,
    TopLabel,
    decode_request,
)
from loraloop.settings import Settings
from loraloop.transport import (
    Consumer,
    Producer,
    Record,
    SendResult,
    Transport,
    TransportError,
    make_transport,
    next_offsets,
)
from services.adapters import AdapterManager, PreparedAdapter
from services.batching import BatchPolicy, collect, isolate_failures, plan_chunks

logger = logging.getLogger(__name__)

TOP_K = 3
IDLE_POLL_MS = 100  # longest wait for the first record of a batch: bounds how late a swap applies when idle
DELIVERY_TIMEOUT_S = 30.0
LAG_EVERY_S = 5.0  # a Kafka lag lookup is a few round trips on the inference thread
PING_CACHE_S = 2.0
WATCH_TIMEOUT_S = 0.5  # longest block on the registry pointer: bounds how long close() waits for the watcher
LOOP_ERROR_BACKOFF_S = 0.5  # after an unexpected loop error: do not spin on a bug
MAX_LATENCY_S = 1e6  # a request's ts further in the past is the client's bug; latencies are clamped to it
REQUEST_LOG_BACKOFF_S = 1.0  # after a failed write, skip the request log this long (do not slow every batch)
# Fixed cost of one forward pass, in padded tokens, for splitting a batch by length (services.batching).
# Measured for MiniLM on a CPU core: ~4.7 ms per call vs ~0.11 ms per token, i.e. ~40 tokens.
CHUNK_OVERHEAD_TOKENS = 40.0


def default_chunk_overhead(device: torch.device) -> float:
    """Fixed cost of a forward pass in tokens on ``device``: 40 on a CPU, never split on an accelerator.

    On an H200 a MiniLM forward pass is bound by kernel launches (~3.6 ms for 1 row or 64), so
    every extra chunk costs a whole pass: splitting a batch of 32 by length made the worker
    0.41x bare ``model(**batch)`` there (benchmarks/results/worker_throughput_cuda.json).

    Example:
        >>> default_chunk_overhead(torch.device("cpu")), default_chunk_overhead(torch.device("cuda", 0))
        (40.0, inf)
    """
    return CHUNK_OVERHEAD_TOKENS if device.type == "cpu" else math.inf


@dataclass(frozen=True)
class _Swap:
    version: str
    prepared: PreparedAdapter | None  # None: the version is already loaded (rollback)
    seen_at: float  # time.monotonic() when the pointer change was seen


@dataclass(frozen=True)
class _Outcome:
    label: str
    score: float
    top_k: list[TopLabel]


@dataclass(frozen=True)
class _Outgoing:
    """One answered request, serialized inside its own error boundary."""

    key: bytes
    value: bytes
    prediction: Prediction
    served: ServedRequest


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _latency_ms(now: float, ts: float) -> float:
    """Milliseconds since the request's ``ts``, clamped: a client's clock or ``ts`` can be anything,
    and the prediction must stay finite (serializable) and the latency histogram sane."""
    return round(min(max(0.0, now - ts), MAX_LATENCY_S) * 1000, 3)


def _letter_bytes(letter: DeadLetter) -> bytes:
    """A dead letter's bytes; if it cannot be serialized, the same letter without its payload.

    ``DeadLetter.of`` already makes every field serializable: this is the last boundary, so
    that no letter is ever dropped and no letter can stop the batch.
    """
    try:
        return letter.to_bytes()
    except Exception as e:
        logger.error("dead letter (%s at %s/%d@%d) not serializable, sent without its payload: %s", letter.reason,
                     letter.source_topic, letter.partition, letter.offset, _describe(e))
        fallback = {"v": letter.v, "payload": "", "reason": letter.reason,
                    "detail": f"dead letter not serializable ({_describe(e)}); payload dropped",
                    "source_topic": letter.source_topic, "partition": letter.partition, "offset": letter.offset,
                    "payload_bytes": letter.payload_bytes, "ts": letter.ts}
        return json.dumps(fallback, default=str).encode("utf-8", errors="replace")


class InferenceWorker:
    """One member of the workers' consumer group, serving the active adapter.

    Args:
        settings: worker settings (topics, group, batching, limits).
        transport: where requests come from and predictions go.
        registry: the adapter registry whose active pointer this worker follows.
        request_log: where served requests are remembered for feedback to join.
        metrics: the process's metrics.
        base: the frozen base classifier (moved to ``settings.device``).
        tokenizer: the base model's (fast) tokenizer.
        max_loaded: most adapter versions kept in memory (active + recent, for instant rollback).
        chunk_overhead_tokens: fixed cost of a forward pass in tokens, used to split a batch by
            length (``math.inf``: one forward pass per batch; None: :func:`default_chunk_overhead`).
    """

    def __init__(self, settings: Settings, *, transport: Transport, registry: AdapterRegistry,
                 request_log: RequestLog, metrics: Metrics, base: torch.nn.Module, tokenizer: object,
                 max_loaded: int = 3, chunk_overhead_tokens: float | None = None) -> None:
        self.settings = settings
        self.transport = transport
        self.registry = registry
        self.request_log = request_log
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.manager = AdapterManager(base, max_loaded=max_loaded)
        self._shadow: tuple[str, float] | None = None  # (replaced version, monotonic deadline) after a swap
        self._shadow_out: dict[str, tuple[str, str]] = {}
        self.policy = BatchPolicy(settings.max_batch, settings.max_wait_ms)
        self.chunk_overhead_tokens = (default_chunk_overhead(self.manager.device) if chunk_overhead_tokens is None
                                      else chunk_overhead_tokens)
        self.pad_id = int(tokenizer.pad_token_id or 0)
        # Every adapter swap this worker made: (unix time, version, pause of the inference thread in s).
        self.swap_log: deque[tuple[float, str, float]] = deque(maxlen=10_000)
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._pending: _Swap | None = None
        self._swap_lock = threading.Lock()
        self._swap_ready = threading.Event()
        self._refresh = threading.Event()  # ask the watcher to re-read the pointer
        self._closing = threading.Event()
        self._stop: threading.Event | None = None
        self._watcher: threading.Thread | None = None
        self._cache_dir: Path | None = None
        self._lag_at = 0.0
        self._lag_labels: set[tuple[str, str]] = set()
        self._broker_probe = CachedProbe(lambda: self.transport.ping(timeout=2.0), PING_CACHE_S)
        self._log_down_until = 0.0
        self._log_errors = RateLimitedLog(logger)
        self._transport_errors = RateLimitedLog(logger)
        self._inference_errors = RateLimitedLog(logger)
        self._loop_errors = RateLimitedLog(logger)

    # --- status ------------------------------------------------------------------------
    @property
    def active_version(self) -> str | None:
        return self.manager.active_adapter

    def ready(self) -> bool:
        """Ready = an adapter is active and the broker answers (cached for a few seconds)."""
        if self.manager.active_adapter is None:
            return False
        return self._broker_probe()

    # --- adapter watching (background thread) ---------------------------------------------
    def start(self) -> None:
        """Start following the registry's active pointer (idempotent)."""
        if self._watcher is None:
            self._cache_dir = Path(tempfile.mkdtemp(prefix="loraloop-worker-adapters-"))
            self._watcher = threading.Thread(target=self._watch, name="adapter-watcher", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        generation = -1  # differs from every real generation: the first read returns at once
        while not self._closing.is_set():
            if self._refresh.is_set():
                self._refresh.clear()
                generation = -1
            try:
                pointer = self.registry.wait_for_change(generation, timeout=WATCH_TIMEOUT_S)
            except Exception as e:  # registry unreachable: keep serving the current adapter
                self._transport_errors(logging.WARNING, "cannot read the active adapter pointer: %s", e)
                self._closing.wait(1.0)
                continue
            if pointer.generation == generation:
                continue
            generation = pointer.generation
            if pointer.version is not None:
                self._prepare(pointer.version, time.monotonic())

    def _prepare(self, version: str, seen_at: float) -> None:
        """Fetch and verify ``version`` off the inference thread, then hand it over."""
        prepared = None
        if version not in self.manager.adapters:
            folder = None
            try:
                folder = self.registry.fetch(version, self._cache_dir)
                prepared = self.manager.prepare(folder, version)
            except Exception as e:  # RegistryError, AdapterError, OSError, ...: stay on the current one
                self.metrics.adapter_swaps.labels(outcome="failed").inc()
                logger.error("adapter %s refused, staying on %s: %s", version, self.manager.active_adapter, e)
                return
            finally:
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)  # the weights are in memory now
        with self._swap_lock:
            self._pending = _Swap(version, prepared, seen_at)  # the newest change wins
        self._swap_ready.set()

    # --- adapter switching (inference thread, between batches) ------------------------------
    def _apply_pending(self) -> None:
        with self._swap_lock:
            swap, self._pending = self._pending, None
            self._swap_ready.clear()
        if swap is None or swap.version == self.manager.active_adapter:
            return
        previous = self.manager.active_adapter
        started = time.perf_counter()
        try:
            if swap.prepared is not None and swap.version not in self.manager.adapters:
                self.manager.install(swap.prepared)
            self.manager.set_adapter(swap.version)
            pruned = self.manager.prune()
        except Exception as e:  # e.g. unloaded since the watcher looked: fetch it again
            self.metrics.adapter_swaps.labels(outcome="failed").inc()
            logger.error("adapter %s failed to load, staying on %s: %s", swap.version, previous, e)
            if swap.version not in self.manager.adapters:
                self._refresh.set()
            return
        pause = time.perf_counter() - started
        self.swap_log.append((time.time(), swap.version, pause))
        if previous is not None and self.settings.shadow_fraction > 0:  # the guard compares both on the same traffic
            # shadow-score as long as the guard may watch the promotion
            self._shadow = (previous, time.monotonic() + self.settings.guard_watch_limit_s)
        m = self.metrics
        m.adapter_swaps.labels(outcome="ok").inc()
        m.swap_seconds.observe(time.monotonic() - swap.seen_at)
        if previous is not None:
            m.active_adapter.labels(adapter_version=previous).set(0)
        m.active_adapter.labels(adapter_version=swap.version).set(1)
        for name in pruned:  # keep metric labels bounded to the loaded versions
            for family in (m.active_adapter, m.requests_served, m.end_to_end_seconds, m.prediction_confidence):
                try:
                    family.remove(name)
                except KeyError:
                    pass
        logger.info("serving adapter %s (was %s): inference paused %.1f ms, %.0f ms after the pointer change",
                    swap.version, previous, pause * 1000, (time.monotonic() - swap.seen_at) * 1000)

    # --- the loop ------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set; then finish the current batch, commit and close."""
        self._stop = stop
        self.start()
        try:
            while not stop.is_set():
                try:
                    self.run_once()
                except Exception as e:  # a bug outside every per-record boundary: never let it end the loop
                    self.metrics.worker_loop_errors.inc()
                    self._loop_errors(logging.ERROR, "worker loop error, the batch will be served again: %s",
                                      "".join(traceback.format_exception(e)))
                    self._reset_clients()
                    stop.wait(LOOP_ERROR_BACKOFF_S)
        finally:
            self.close()

    def run_once(self) -> int:
        """Apply a pending adapter swap, then serve one micro-batch; return the records handled."""
        self.start()
        self._apply_pending()
        if self.manager.active_adapter is None:  # not ready: do not join the group yet
            self._swap_ready.wait(IDLE_POLL_MS / 1000)
            self._apply_pending()
            return 0
        try:
            consumer = self._consumer_client()
            records = self._collect(consumer)
        except TransportError as e:
            self._transport_errors(logging.WARNING, "broker unavailable (%s); retrying", e)
            self._reset_clients()
            (self._stop or self._closing).wait(0.5)
            return 0
        if records:
            self._handle(records)
        self._update_lag()
        return len(records)

    def _consumer_client(self) -> Consumer:
        if self._consumer is None:
            self._consumer = self.transport.consumer([self.settings.requests_topic], self.settings.worker_group)
        if self._producer is None:
            self._producer = self.transport.producer()
        return self._consumer

    def _collect(self, consumer: Consumer) -> list[Record]:
        """One micro-batch: wait for a first record, then fill up under the batch policy."""
        return collect(lambda timeout_ms, n: consumer.poll(timeout_ms=timeout_ms, max_records=n), self.policy,
                       IDLE_POLL_MS, time.monotonic)

    def _handle(self, records: list[Record]) -> None:
        """Serve one micro-batch: every record ends as one prediction or one dead letter, then commit.

        Each per-record step (decode, inference, serialization) has its own error boundary, so
        a record that raises anything becomes a dead letter with its reason and never stops the
        loop; a batch step that raises is bisected so that only the requests that make it raise
        are dead-lettered (``inference_error``) and the others are answered.
        """
        m = self.metrics
        m.requests_consumed.inc(len(records))
        letters: list[DeadLetter] = []
        valid: list[tuple[Record, Request]] = []
        for record in records:
            try:
                valid.append((record, decode_request(record.value, self.settings.max_text_bytes)))
            except InvalidMessage as e:
                letters.append(self._letter(record, e))
            except Exception as e:  # decode_request promises InvalidMessage only; the boundary holds regardless
                letters.append(self._letter(record, InvalidMessage("decode_error", f"{type(e).__name__}: {e}")))
        answered = self._infer(valid, letters)
        outgoing: list[_Outgoing] = []
        for record, request, prediction in answered:
            try:
                outgoing.append(self._serialize(request, prediction))
            except Exception as e:  # e.g. a field that cannot be encoded: dead-lettered, not fatal
                letters.append(self._letter(record, InvalidMessage(
                    "unserializable", f"prediction of {request.id!r} not serializable: {type(e).__name__}: {e}")))
        self._remember([o.served for o in outgoing])
        if not self._deliver(outgoing, letters):
            return  # not acknowledged: offsets stay uncommitted, the batch is served again
        # Counted once delivered, not once committed: a commit whose answer is lost may still have
        # landed, and then nothing is served again to be counted (a redelivery is served twice).
        self._observe([o.prediction for o in outgoing], letters)
        try:
            self._consumer.commit(next_offsets(records))
        except TransportError as e:  # rebalanced or broker gone: the next owner serves these again
            self._transport_errors(logging.WARNING, "commit refused (%s); the batch will be redelivered", e)
            self._reset_clients()

    def _infer(self, valid: list[tuple[Record, Request]], letters: list[DeadLetter]
               ) -> list[tuple[Record, Request, Prediction]]:
        """Predictions for the decoded requests; those whose inference raises go to ``letters``."""
        if not valid:
            return []
        self._shadow_out = {}
        done, failed = isolate_failures(valid, lambda batch: self._predict([r for _, r in batch]))
        if failed:
            self.metrics.inference_errors.inc()
            for (record, request), error in failed:
                detail = self._error_detail(error, request)
                self._inference_errors(logging.ERROR, "inference failed for request %r (%s/%d@%d), dead-lettered "
                                       "(%d of %d in its batch): %s", request.id, record.topic, record.partition,
                                       record.offset, len(failed), len(valid), detail)
                letters.append(self._letter(record, InvalidMessage("inference_error", detail)))
        return [(record, request, prediction) for (record, request), prediction in done]

    def _serialize(self, request: Request, prediction: Prediction) -> _Outgoing:
        """The bytes to produce for one prediction and its request-log entry; raises if either cannot be."""
        shadow_version, shadow_label = self._shadow_out.get(prediction.request_id, (None, None))
        served = ServedRequest(request_id=prediction.request_id, text=request.text, label=prediction.label,
                               score=prediction.score, adapter_version=prediction.adapter_version,
                               tenant=prediction.tenant, ts=prediction.ts, shadow_version=shadow_version,
                               shadow_label=shadow_label)
        served.to_bytes()  # the request log serializes it later, outside this record's boundary
        return _Outgoing(prediction.request_id.encode("utf-8"), prediction.to_bytes(), prediction, served)

    def _letter(self, record: Record, error: InvalidMessage) -> DeadLetter:
        s = self.settings
        return DeadLetter.of(record.value, error, record.topic, record.partition, record.offset,
                             redact=s.redact_dead_letters, key=s.redaction_key.get_secret_value())

    def _error_detail(self, error: Exception, request: Request) -> str:
        """The dead-letter detail of a failed inference; the request's text is cut out of it when redacting."""
        detail = _describe(error)
        if self.settings.redact_dead_letters and request.text:
            detail = detail.replace(request.text, "<text>")
        return detail

    # --- inference -----------------------------------------------------------------------
    def _encode(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids per text (truncated to max_tokens) and whether each was truncated."""
        max_tokens = self.settings.max_tokens
        enc = self.tokenizer(texts, truncation=True, max_length=max_tokens, padding=False,
                             return_attention_mask=False, return_token_type_ids=False)
        ids = enc["input_ids"]
        encodings = getattr(enc, "encodings", None)
        if encodings:  # fast tokenizer: the overflow is kept on each encoding
            truncated = [bool(e.overflowing) for e in encodings]
        else:  # slow tokenizer: count the untruncated tokens
            full = self.tokenizer(texts, truncation=False, return_attention_mask=False)["input_ids"]
            truncated = [len(f) > max_tokens for f in full]
        return ids, truncated

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        pad = self.pad_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)
        device = self.manager.device
        return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)

    @torch.inference_mode()
    def _predict(self, requests: list[Request]) -> list[Prediction]:
        started = time.perf_counter()
        state = self.manager.active  # one read: every row of this batch uses the same adapter
        if state is None:
            raise RuntimeError("no active adapter")
        version, label_map = state
        ids, truncated = self._encode([r.text for r in requests])
        outcomes: list[_Outcome | None] = [None] * len(requests)
        k = min(TOP_K, len(label_map))
        names = label_map.labels
        for chunk in plan_chunks([len(r) for r in ids], self.policy.max_batch, self.chunk_overhead_tokens):
            input_ids, attention_mask = self._pad([ids[i] for i in chunk])
            logits, served, _ = self.manager.forward(input_ids, attention_mask)
            if served != version:  # impossible on one thread; guards the invariant the tests rely on
                raise RuntimeError(f"adapter changed during a batch: {version} -> {served}")
            top = torch.topk(torch.softmax(logits, dim=-1), k=k, dim=-1)
            for i, row_scores, row_idx in zip(chunk, top.values.tolist(), top.indices.tolist(), strict=True):
                top_k = [TopLabel(label=names[j], score=round(p, 6)) for j, p in zip(row_idx, row_scores, strict=True)]
                outcomes[i] = _Outcome(top_k[0].label, top_k[0].score, top_k)
        elapsed = time.perf_counter() - started
        self.metrics.inference_seconds.observe(elapsed)
        self.metrics.batch_size.observe(len(requests))
        now = time.time()
        self._shadow_out.update(self._shadow_labels(requests, ids))
        return [Prediction(request_id=r.id, label=o.label, score=o.score, top_k=o.top_k, adapter_version=version,
                           latency_ms=_latency_ms(now, r.ts), truncated=cut, tenant=r.tenant, ts=now)
                for r, o, cut in zip(requests, outcomes, truncated, strict=True)]

    def _shadow_labels(self, requests: list[Request], ids: list[list[int]]) -> dict[str, tuple[str, str]]:
        """After a swap, the replaced adapter's label for a sample of the batch: {request id: (version, label)}.

        Sampled by a hash of the request id, so a redelivered request is shadowed the same way.
        Costs ``shadow_fraction`` of a forward pass per batch, for three guard windows after a swap.
        """
        shadow = self._shadow
        if shadow is None:
            return {}
        version, until = shadow
        if time.monotonic() > until or version not in self.manager.adapters:
            self._shadow = None
            return {}
        cut = int(self.settings.shadow_fraction * 1000)
        rows = [i for i, r in enumerate(requests) if zlib.crc32(r.id.encode()) % 1000 < cut]
        names = self.manager.labels_of(version).labels
        out: dict[str, tuple[str, str]] = {}
        for chunk in plan_chunks([len(ids[i]) for i in rows], self.policy.max_batch, self.chunk_overhead_tokens):
            picked = [rows[j] for j in chunk]
            input_ids, attention_mask = self._pad([ids[i] for i in picked])
            best = self.manager.forward_as(version, input_ids, attention_mask).argmax(-1).tolist()
            out.update({requests[i].id: (version, names[j]) for i, j in zip(picked, best, strict=True)})
        return out

    # --- side effects ----------------------------------------------------------------------
    def _remember(self, served: list[ServedRequest]) -> None:
        """Write the request log before the predictions leave, so feedback on them can join.

        An unreachable log never stops serving: the failure is counted per request
        (``request_log_errors``), logged at most every 30 s, and the log is skipped for
        a second so that a dead Redis does not add its timeout to every batch.
        """
        if not served:
            return
        if time.monotonic() < self._log_down_until:
            self.metrics.request_log_errors.inc(len(served))
            return
        try:
            self.request_log.record(served)
        except Exception as e:  # BufferError, redis errors, anything: keep serving
            self._log_down_until = time.monotonic() + REQUEST_LOG_BACKOFF_S
            self.metrics.request_log_errors.inc(len(served))
            self._log_errors(logging.ERROR, "request log unavailable, serving without it "
                             "(feedback on these requests cannot be joined): %s", e)

    def _deliver(self, outgoing: list[_Outgoing], letters: list[DeadLetter]) -> bool:
        """Produce the batch's records and wait for the broker's acknowledgement of each.

        Returns False when the broker did not acknowledge: the clients are rebuilt so the
        consumer resumes from the committed offsets and the batch is served again.
        """
        if not outgoing and not letters:
            return True
        s = self.settings
        try:
            producer = self._producer
            futures: list[SendResult] = [producer.send(s.predictions_topic, o.value, key=o.key) for o in outgoing]
            futures.extend(producer.send(s.dead_letter_topic, _letter_bytes(d)) for d in letters)
            producer.flush(timeout=DELIVERY_TIMEOUT_S)
            for future in futures:
                future.get(timeout=DELIVERY_TIMEOUT_S)
        except TransportError as e:
            self._transport_errors(logging.ERROR, "batch not acknowledged by the broker (%s); serving it again", e)
            self._reset_clients()
            return False
        return True

    def _observe(self, predictions: list[Prediction], letters: list[DeadLetter]) -> None:
        m = self.metrics
        if predictions:
            version = predictions[0].adapter_version
            m.requests_served.labels(adapter_version=version).inc(len(predictions))
            e2e = m.end_to_end_seconds.labels(adapter_version=version)
            confidence = m.prediction_confidence.labels(adapter_version=version)
            truncated = 0
            for p in predictions:
                e2e.observe(p.latency_ms / 1000)
                confidence.observe(p.score)
                truncated += p.truncated
            if truncated:
                m.requests_truncated.inc(truncated)
        for letter in letters:
            m.dead_letters.labels(source="requests", reason=letter.reason).inc()

    def _update_lag(self) -> None:
        if self._consumer is None or time.monotonic() - self._lag_at < LAG_EVERY_S:
            return
        self._lag_at = time.monotonic()
        try:
            lag = self._consumer.lag()
        except TransportError as e:
            logger.debug("consumer lag unavailable: %s", e)
            return
        labels = {(tp.topic, str(tp.partition)) for tp in lag}
        for topic, partition in self._lag_labels - labels:  # partitions handed to another worker
            self.metrics.consumer_lag.remove(topic, partition)
        for tp, value in lag.items():
            self.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(value)
        self._lag_labels = labels

    # --- shutdown --------------------------------------------------------------------------
    def _reset_clients(self) -> None:
        """Drop both clients; the next batch rejoins the group from the committed offsets."""
        consumer, producer = self._consumer, self._producer
        self._consumer = self._producer = None
        close_quietly((consumer, producer), logger)

    def close(self) -> None:
        """Leave the group (partitions go to the other workers), flush, stop the watcher."""
        self._closing.set()
        if self._producer is not None:
            try:
                self._producer.flush(timeout=10)
            except TransportError as e:
                logger.warning("flush on close failed: %s", e)
        self._reset_clients()
        for topic, partition in self._lag_labels:  # this worker no longer owns them
            try:
                self.metrics.consumer_lag.remove(topic, partition)
            except KeyError:
                pass
        self._lag_labels = set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        if self._cache_dir is not None:
            shutil.rmtree(self._cache_dir, ignore_errors=True)

    def __enter__(self) -> InferenceWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_worker(settings: Settings, *, transport: Transport | None = None, registry: AdapterRegistry | None = None,
                 request_log: RequestLog | None = None, metrics: Metrics | None = None,
                 base: torch.nn.Module | None = None, tokenizer: object | None = None,
                 **options: object) -> InferenceWorker:
    """A worker wired from settings; every part can be injected (tests, the demo).

    Args:
        settings: all settings; ``torch_threads`` (when > 0) is applied to the process.
        transport, registry, request_log, metrics: built from settings when None.
        base, tokenizer: the base classifier and its tokenizer (``load_base``/``load_tokenizer`` when None).
        options: passed to :class:`InferenceWorker` (``max_loaded``, ``chunk_overhead_tokens``).
    """
    from loraloop.model import load_base, load_tokenizer, resolve_device

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    model = base if base is not None else load_base(settings)
    model = model.to(resolve_device(settings.device)).eval()
    return InferenceWorker(
        settings,
        transport=transport if transport is not None else make_transport(settings),
        registry=registry if registry is not None else make_registry(settings),
        request_log=request_log if request_log is not None else make_request_log(settings),
        metrics=metrics if metrics is not None else Metrics(),
        base=model,
        tokenizer=tokenizer if tokenizer is not None else load_tokenizer(settings),
        **options,
    )
