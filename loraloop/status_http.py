"""Read-only status over HTTP (Starlette): ``GET /v1/status``, ``/v1/adapters``, ``/v1/adapters/{version}``, ``/``.

Served by ``loraloop status --serve`` and, with the request routes added, by ``loraloop gateway``.
Nothing here writes: the routes read the registry (and the feedback buffer's depth) through
:mod:`loraloop.status`, in a thread so a slow store never blocks the event loop, and the status
is cached for ``cache_s`` so that a dashboard polling every second costs one read.

``/`` is a small HTML page: the active version, its history, the last cycles and the learning
curve (per cycle, the candidate's holdout and reference accuracy next to the live version's) as
an inline SVG, so the page needs no script and no other request.
"""

from __future__ import annotations

import html
import logging
import threading
import time
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from loraloop.buffer.base import FeedbackBuffer
from loraloop.registry import AdapterRegistry, RegistryError
from loraloop.registry.errors import VERSION_PATTERN
from loraloop.status import collect_status, describe_adapter, list_adapters

logger = logging.getLogger(__name__)

CACHE_S = 1.0
CURVE_COLORS = {"holdout": "#1f77b4", "reference": "#9467bd", "live_holdout": "#7f7f7f"}
OUTCOME_COLORS = {"promoted": "#2ca02c", "rejected": "#ff7f0e", "superseded": "#8c564b", "bootstrap": "#2ca02c"}

STATUS_OPENAPI_PATHS: dict = {
    "/v1/status": {"get": {
        "summary": "Active version, probation, history, last cycles, learning curve, buffer depth.",
        "responses": {"200": {"description": "The status (see loraloop.status.collect_status).",
                              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Status"}}}}}}},
    "/v1/adapters": {"get": {
        "summary": "Every adapter version, oldest first, with status and evaluation.",
        "responses": {"200": {"description": "Versions.", "content": {"application/json": {"schema": {
            "type": "object", "properties": {"adapters": {"type": "array", "items": {"type": "object"}}}}}}}}}},
    "/v1/adapters/{version}": {"get": {
        "summary": "One version: label map, evaluation, gate reason, status and file checksums.",
        "parameters": [{"name": "version", "in": "path", "required": True,
                        "schema": {"type": "string", "pattern": VERSION_PATTERN.pattern.replace("\\Z", "$")}}],
        "responses": {"200": {"description": "The version."},
                      "400": {"description": "Not a version id (e.g. a path).",
                              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                      "404": {"description": "No such version.",
                              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}}}},
    "/": {"get": {"summary": "HTML status page with the learning curve.",
                  "responses": {"200": {"description": "HTML.", "content": {"text/html": {}}}}}},
}
STATUS_OPENAPI_SCHEMAS: dict = {
    "Error": {"type": "object", "required": ["error", "reason"],
              "properties": {"error": {"type": "string"}, "reason": {"type": "string"}}},
    "Status": {"type": "object", "properties": {
        "active": {"type": ["string", "null"]}, "generation": {"type": "integer"},
        "history": {"type": "array", "items": {"type": "string"}}, "probation": {},
        "last_cycles": {"type": "array", "items": {"type": "object"}},
        "learning_curve": {"type": "array", "items": {"type": "object"}},
        "buffer": {"type": ["object", "null"]}}},
}


class StatusView:
    """The registry and buffer behind the routes, with a short cache of the status dict."""

    def __init__(self, registry: AdapterRegistry, buffer: FeedbackBuffer | None = None, *, redis_url: str = "",
                 cache_s: float = CACHE_S, count: Callable[[str, int], None] | None = None) -> None:
        self.registry, self.buffer, self.redis_url, self.cache_s = registry, buffer, redis_url, cache_s
        self.count = count or (lambda route, code: None)
        self._lock = threading.Lock()
        self._cached: tuple[float, dict] | None = None

    def status(self) -> dict:
        with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < self.cache_s:
                return self._cached[1]
            status = collect_status(self.registry, self.buffer, redis_url=self.redis_url)
            self._cached = (time.monotonic(), status)
            return status

    def routes(self) -> list[Route]:
        return [Route("/v1/status", self._status, methods=["GET"]),
                Route("/v1/adapters", self._adapters, methods=["GET"]),
                Route("/v1/adapters/{version:path}", self._adapter, methods=["GET"]),
                Route("/", self._page, methods=["GET"])]

    async def _status(self, request: Request) -> Response:
        return self._json("/v1/status", await run_in_threadpool(self.status))

    async def _adapters(self, request: Request) -> Response:
        return self._json("/v1/adapters", {"adapters": await run_in_threadpool(list_adapters, self.registry)})

    async def _adapter(self, request: Request) -> Response:
        # From the path itself: Starlette's route pattern ends in "$", which lets a trailing newline through.
        version = request.scope["path"].removeprefix(request.scope.get("root_path", "")).removeprefix("/v1/adapters/")
        if not VERSION_PATTERN.match(version):
            return self._json("/v1/adapters/{version}", {
                "error": "invalid version", "reason": f"{version[:100]!r} is not an adapter version id "
                                                      "(e.g. v000001-20260101T000000-a1b2c3)"}, 400)
        try:
            return self._json("/v1/adapters/{version}", await run_in_threadpool(describe_adapter, self.registry,
                                                                                 version))
        except RegistryError as e:
            unknown = str(e).startswith("unknown adapter version")
            return self._json("/v1/adapters/{version}", {"error": "unknown version" if unknown else "unreadable "
                                                         "version", "reason": str(e)}, 404 if unknown else 500)

    async def _page(self, request: Request) -> Response:
        status = await run_in_threadpool(self.status)
        self.count("/", 200)
        return HTMLResponse(render_page(status))

    def _json(self, route: str, body: object, code: int = 200) -> Response:
        self.count(route, code)
        return JSONResponse(body, status_code=code)


def render_page(status: dict) -> str:
    """The HTML status page of a :func:`loraloop.status.collect_status` dict."""
    e = html.escape
    active = status.get("active") or "(none)"
    history = " &larr; ".join(e(v) for v in reversed(status.get("history") or [])) or "(empty)"
    buffer = status.get("buffer")
    if buffer is None:
        buffer_text = "not shown (no shared buffer configured)"
    elif "error" in buffer:
        buffer_text = f"unavailable: {e(buffer['error'])}"
    else:
        buffer_text = f"{int(buffer['depth'])} examples not yet acknowledged by the learner"
    rows = "".join(
        f"<tr><td>{e(_when(c.get('started_at')))}</td><td>{e(str(c.get('trigger') or ''))}</td>"
        f"<td>{e(str(c.get('outcome') or ''))}</td><td>{_seconds(c.get('duration_s'))}</td>"
        f"<td><code>{e(str(c.get('version') or ''))}</code></td><td>{e(str(c.get('reason') or ''))}</td></tr>"
        for c in reversed(status.get("last_cycles") or []))
    probation = status.get("probation")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>loraloop status</title>
<meta http-equiv="refresh" content="15">
<style>body{{font-family:sans-serif;margin:2em;color:#222}} code{{background:#f3f3f3;padding:0 .3em}}
table{{border-collapse:collapse}} td,th{{border-bottom:1px solid #ddd;padding:.25em .6em;text-align:left;font-size:90%}}</style>
</head><body>
<h1>loraloop</h1>
<p>Active adapter: <code id="active-version">{e(active)}</code> (generation {int(status.get('generation') or 0)},
{e(status.get('reason') or 'no change yet')})</p>
<p>History: {history}</p>
<p>Probation: <span id="probation">{e(str(probation)) if probation else 'none'}</span></p>
<p>Versions: {int(status.get('versions') or 0)}. Feedback buffer: {buffer_text}.</p>
<h2>Learning curve</h2>
{render_curve(status.get("learning_curve") or [])}
<h2>Last cycles</h2>
<table><tr><th>started (UTC)</th><th>trigger</th><th>outcome</th><th>duration</th><th>version</th><th>gate</th></tr>
{rows or '<tr><td colspan="6">no cycle yet</td></tr>'}</table>
<p><a href="/v1/status">/v1/status</a> &middot; <a href="/v1/adapters">/v1/adapters</a> &middot;
<a href="/openapi.json">/openapi.json</a></p>
</body></html>
"""


def render_curve(points: list[dict], width: int = 720, height: int = 260) -> str:
    """An inline SVG of accuracy per cycle: candidate holdout and reference, the live version's holdout,
    and one marker per cycle coloured by its outcome (promoted green, rejected orange)."""
    if not points:
        return '<p id="learning-curve-empty">No evaluated cycle yet: the curve appears after the first cycle.</p>'
    left, right, top, bottom = 48, 12, 12, 32
    plot_w, plot_h = width - left - right, height - top - bottom
    n = len(points)

    def x(i: int) -> float:
        return left + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def y(v: float) -> float:
        return top + plot_h * (1 - max(0.0, min(1.0, v)))

    parts = [f'<svg id="learning-curve" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="accuracy per learner cycle">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#999"/>']
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" font-size="11" text-anchor="end">{tick:.2f}</text>')
    for key, color in CURVE_COLORS.items():
        coords = [(x(i), y(p[key])) for i, p in enumerate(points) if isinstance(p.get(key), int | float)]
        if not coords:
            continue
        dash = ' stroke-dasharray="5,4"' if key == "live_holdout" else ""
        if len(coords) == 1:
            parts.append(f'<circle class="curve-{key}" cx="{coords[0][0]:.1f}" cy="{coords[0][1]:.1f}" r="4" '
                         f'fill="{color}"/>')
        else:
            path = " ".join(f"{cx:.1f},{cy:.1f}" for cx, cy in coords)
            parts.append(f'<polyline class="curve-{key}" points="{path}" fill="none" stroke="{color}" '
                         f'stroke-width="3"{dash}/>')
    for i, p in enumerate(points):
        color = OUTCOME_COLORS.get(str(p.get("outcome")), "#bbb")
        parts.append(f'<rect class="outcome-{html.escape(str(p.get("outcome")))}" x="{x(i) - 4:.1f}" '
                     f'y="{top + plot_h - 10}" width="8" height="8" fill="{color}"/>')
    legend = [("candidate holdout", CURVE_COLORS["holdout"]), ("candidate reference", CURVE_COLORS["reference"]),
              ("live holdout", CURVE_COLORS["live_holdout"]), ("promoted", OUTCOME_COLORS["promoted"]),
              ("rejected", OUTCOME_COLORS["rejected"])]
    for k, (name, color) in enumerate(legend):
        lx = left + k * (plot_w / len(legend))
        parts.append(f'<rect x="{lx:.1f}" y="{height - 16}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{lx + 14:.1f}" y="{height - 7}" font-size="11">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _when(ts: object) -> str:
    if not isinstance(ts, int | float) or ts <= 0:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def _seconds(value: object) -> str:
    return f"{value:.1f} s" if isinstance(value, int | float) else ""


def openapi(title: str, paths: dict, schemas: dict) -> dict:
    """An OpenAPI 3.1 document of ``paths`` (kept by hand next to the routes it describes)."""
    from loraloop import __version__

    return {"openapi": "3.1.0", "info": {"title": title, "version": __version__}, "paths": paths,
            "components": {"schemas": schemas}}


def status_app(view: StatusView):
    """The Starlette app of ``loraloop status --serve``: the read-only routes and their OpenAPI description."""
    from starlette.applications import Starlette

    document = openapi("loraloop status", STATUS_OPENAPI_PATHS, STATUS_OPENAPI_SCHEMAS)

    async def spec(request: Request) -> Response:
        return JSONResponse(document)

    return Starlette(routes=[*view.routes(), Route("/openapi.json", spec, methods=["GET"])])
