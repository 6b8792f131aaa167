"""The gateway's Starlette app: ``POST /v1/predict``, ``POST /v1/feedback``, the read-only status routes, OpenAPI.

``POST /v1/predict`` takes ``{"text": "..."}`` or ``{"texts": [...]}`` (and optionally
``timeout`` in seconds and ``tenant``), sends each text through the requests topic with a
:class:`loraloop.client.RequestClient` and answers with the prediction (label, score, top_k,
the adapter version that made it, the request id to send feedback on), or why there is none:

=========  ==========================================================================
200        answered (for ``texts``: always 200, each item with its own ``status``)
422        the worker dead-lettered the request (``reason``: ``oversize_text``, ...)
413        the body, or one request, is larger than any broker record (nothing sent)
504        no answer within the timeout (``request_id`` given, to trace it)
503        too many requests in flight, or the broker does not answer
400 / 401  invalid body / missing or wrong bearer token (when ``api_token`` is set)
=========  ==========================================================================

``POST /v1/feedback`` takes one feedback event (``request_id``, ``kind`` and, for ``label``,
``label``; ``event_id`` optional) and produces it to the feedback topic: 202 once the broker
acknowledged it.

Memory is bounded: bodies over ``MAX_BODY_BYTES`` are refused before being read whole, a
call carries at most ``MAX_TEXTS`` texts, and the client waits for at most ``max_in_flight``
requests at once (uvicorn's ``limit_concurrency`` bounds connections on top).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import uuid

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from loraloop.client import Answer, Overloaded, RequestClient
from loraloop.metrics import Metrics
from loraloop.schemas import InvalidMessage, decode_feedback
from loraloop.settings import Settings
from loraloop.status_http import STATUS_OPENAPI_PATHS, STATUS_OPENAPI_SCHEMAS, StatusView, openapi
from loraloop.transport import Producer, TransportError

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 2 << 20
MAX_TEXTS = 256
MAX_TIMEOUT_S = 120.0
FLUSH_TIMEOUT_S = 10.0
_STATUS_CODES = {"answered": 200, "dead_letter": 422, "timeout": 504}
_REFUSED_CODES = {"oversize_record": 413}

_ERROR = {"$ref": "#/components/schemas/Error"}
_BEARER = [{"bearer": []}]
GATEWAY_OPENAPI_PATHS: dict = {
    "/v1/predict": {"post": {
        "summary": "Classify one text or many, through the requests topic and the workers.",
        "security": _BEARER,
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "$ref": "#/components/schemas/PredictRequest"}}}},
        "responses": {
            "200": {"description": "The prediction (one text) or one item per text, each with its status.",
                    "content": {"application/json": {"schema": {"oneOf": [
                        {"$ref": "#/components/schemas/Answer"},
                        {"type": "object", "properties": {"predictions": {
                            "type": "array", "items": {"$ref": "#/components/schemas/Answer"}}}}]}}}},
            "400": {"description": "Invalid body.", "content": {"application/json": {"schema": _ERROR}}},
            "401": {"description": "Missing or wrong bearer token.",
                    "content": {"application/json": {"schema": _ERROR}}},
            "413": {"description": "Body or request too large.", "content": {"application/json": {"schema": _ERROR}}},
            "422": {"description": "Dead-lettered by the worker; reason and detail given.",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Answer"}}}},
            "503": {"description": "Overloaded or broker unavailable.",
                    "content": {"application/json": {"schema": _ERROR}}},
            "504": {"description": "No answer within the timeout; the request id is given.",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Answer"}}}}}}},
    "/v1/feedback": {"post": {
        "summary": "Feedback on a served prediction (a corrected label, a thumbs up or down).",
        "security": _BEARER,
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "$ref": "#/components/schemas/Feedback"}}}},
        "responses": {
            "202": {"description": "Produced to the feedback topic.", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"event_id": {"type": "string"}}}}}},
            "400": {"description": "Invalid event.", "content": {"application/json": {"schema": _ERROR}}},
            "401": {"description": "Missing or wrong bearer token.",
                    "content": {"application/json": {"schema": _ERROR}}},
            "503": {"description": "The broker did not acknowledge.",
                    "content": {"application/json": {"schema": _ERROR}}}}}},
    **STATUS_OPENAPI_PATHS,
}
GATEWAY_OPENAPI_SCHEMAS: dict = {
    **STATUS_OPENAPI_SCHEMAS,
    "PredictRequest": {"type": "object", "properties": {
        "text": {"type": "string"}, "texts": {"type": "array", "items": {"type": "string"}, "maxItems": MAX_TEXTS},
        "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TIMEOUT_S},
        "tenant": {"type": "string"}}},
    "Answer": {"type": "object", "required": ["request_id", "status"], "properties": {
        "request_id": {"type": "string"},
        "status": {"enum": ["answered", "dead_letter", "timeout", "refused"]},
        "label": {"type": "string"}, "score": {"type": "number"},
        "top_k": {"type": "array", "items": {"type": "object"}}, "adapter_version": {"type": "string"},
        "latency_ms": {"type": "number"}, "truncated": {"type": "boolean"},
        "reason": {"type": "string"}, "detail": {"type": "string"}}},
    "Feedback": {"type": "object", "required": ["request_id", "kind"], "properties": {
        "request_id": {"type": "string"}, "kind": {"enum": ["label", "thumbs_up", "thumbs_down"]},
        "label": {"type": "string"}, "event_id": {"type": "string"}, "tenant": {"type": "string"}}},
}


class _BadRequest(Exception):
    def __init__(self, code: int, error: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.error, self.reason = code, error, reason


class Gateway:
    """The routes of the gateway around one request client, one feedback producer and the status view.

    Args:
        settings: topics, ``api_token`` (required on every POST when set).
        client: the request client (started by the app at startup, closed at shutdown).
        view: the read-only status routes.
        metrics: ``loraloop_gateway_http_requests_total`` by route and code.
        default_timeout_s: wait for a prediction this long unless the body names a ``timeout``.
    """

    def __init__(self, settings: Settings, client: RequestClient, view: StatusView, metrics: Metrics, *,
                 default_timeout_s: float = 10.0) -> None:
        self.settings, self.client, self.view, self.metrics = settings, client, view, metrics
        self.default_timeout_s = default_timeout_s
        self.token = settings.api_token.get_secret_value().encode()
        self._feedback: Producer | None = None
        view.count = self.count
        self.document = openapi("loraloop gateway", GATEWAY_OPENAPI_PATHS, GATEWAY_OPENAPI_SCHEMAS)
        self.document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}

    def count(self, route: str, code: int) -> None:
        self.metrics.gateway_http_requests.labels(route=route, code=str(code)).inc()

    def app(self) -> Starlette:
        routes = [Route("/v1/predict", self.predict, methods=["POST"]),
                  Route("/v1/feedback", self.feedback, methods=["POST"]),
                  Route("/openapi.json", self.spec, methods=["GET"]),
                  *self.view.routes()]
        return Starlette(routes=routes, lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette):
        try:
            await run_in_threadpool(self.client.start)
        except TransportError as e:  # serve the status, answer 503 to predictions until the broker answers
            logger.warning("gateway started without a broker (%s); /v1/predict answers 503 until it answers", e)
        try:
            yield
        finally:
            await run_in_threadpool(self.client.close)
            if self._feedback is not None:
                await run_in_threadpool(self._feedback.close)

    async def spec(self, request: Request) -> Response:
        return self._reply("/openapi.json", self.document)

    # --- POST /v1/predict --------------------------------------------------------------------
    async def predict(self, request: Request) -> Response:
        route = "/v1/predict"
        try:
            self._authorize(request)
            body = await self._body(request)
            texts, single = _texts(body)
            timeout = _timeout(body.get("timeout"), self.default_timeout_s)
            tenant = body.get("tenant")
            if tenant is not None and not isinstance(tenant, str):
                raise _BadRequest(400, "invalid body", f"tenant must be a string, got {type(tenant).__name__}")
        except _BadRequest as e:
            return self._error(route, e)
        try:
            pending = await run_in_threadpool(lambda: [self.client.submit(t, tenant=tenant) for t in texts])
        except Overloaded as e:
            return self._error(route, _BadRequest(503, "overloaded", str(e)))
        except TransportError as e:
            return self._error(route, _BadRequest(503, "broker unavailable", str(e)))
        except ValueError as e:  # e.g. a tenant over its length limit
            return self._error(route, _BadRequest(400, "invalid body", str(e)))
        answers = await asyncio.gather(*(self._wait(p, timeout) for p in pending))
        if not single:
            return self._reply(route, {"predictions": [a.as_dict() for a in answers]})
        answer = answers[0]
        code = (_STATUS_CODES.get(answer.status) or _REFUSED_CODES.get(answer.reason, 502))
        body = answer.as_dict()
        if answer.status == "timeout":
            body["detail"] = (f"no prediction for request {answer.request_id} within {timeout:g} s: is a worker "
                              f"running with an active adapter?")
        return self._reply(route, body, code)

    async def _wait(self, pending, timeout: float) -> Answer:
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(pending.future)), timeout)
        except TimeoutError:
            return pending.expire(timeout)

    # --- POST /v1/feedback ---------------------------------------------------------------------
    async def feedback(self, request: Request) -> Response:
        route = "/v1/feedback"
        try:
            self._authorize(request)
            body = await self._body(request)
            event = decode_feedback(json.dumps({"event_id": uuid.uuid4().hex, **body}).encode())
        except _BadRequest as e:
            return self._error(route, e)
        except InvalidMessage as e:
            return self._error(route, _BadRequest(400, e.reason, e.detail))
        try:
            await run_in_threadpool(self._produce_feedback, event)
        except TransportError as e:
            return self._error(route, _BadRequest(503, "broker unavailable", str(e)))
        return self._reply(route, {"event_id": event.event_id}, 202)

    def _produce_feedback(self, event) -> None:
        if self._feedback is None:
            self._feedback = self.client.start().transport.producer()
        self._feedback.send(self.settings.feedback_topic, event.to_bytes(), key=event.request_id.encode()) \
            .get(timeout=FLUSH_TIMEOUT_S)

    # --- helpers -----------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if not self.token:
            return
        header = request.headers.get("authorization", "")
        given = header[len("Bearer "):].encode() if header.startswith("Bearer ") else b""
        if not hmac.compare_digest(given, self.token):
            raise _BadRequest(401, "unauthorized", "a bearer token (api_token) is required")

    async def _body(self, request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            raise _BadRequest(413, "body too large", f"Content-Length {declared[:20]!r}: at most {MAX_BODY_BYTES} "
                                                     f"bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise _BadRequest(413, "body too large", f"body over {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as e:
            raise _BadRequest(400, "invalid body", f"not JSON: {str(e)[:200]}") from None
        if not isinstance(body, dict):
            raise _BadRequest(400, "invalid body", f"expected a JSON object, got {type(body).__name__}")
        return body

    def _reply(self, route: str, body: object, code: int = 200) -> Response:
        self.count(route, code)
        return JSONResponse(body, status_code=code)

    def _error(self, route: str, error: _BadRequest) -> Response:
        return self._reply(route, {"error": error.error, "reason": error.reason}, error.code)


def _texts(body: dict) -> tuple[list[str], bool]:
    if ("text" in body) == ("texts" in body):
        raise _BadRequest(400, "invalid body", 'give either "text" (one string) or "texts" (a list of strings)')
    if "text" in body:
        if not isinstance(body["text"], str):
            raise _BadRequest(400, "invalid body", f'"text" must be a string, got {type(body["text"]).__name__}')
        return [body["text"]], True
    texts = body["texts"]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise _BadRequest(400, "invalid body", '"texts" must be a non-empty list of strings')
    if len(texts) > MAX_TEXTS:
        raise _BadRequest(413, "too many texts", f"{len(texts)} texts in one call, at most {MAX_TEXTS}")
    return texts, False


def _timeout(value: object, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_TIMEOUT_S:
        raise _BadRequest(400, "invalid body", f"timeout must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], "
                                               f"got {value!r}")
    return float(value)
