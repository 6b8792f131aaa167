"""``loraloop adapters list|show|verify|promote|rollback|sign|keygen`` and ``loraloop status [--json|--serve]``.

URLs are printed through :func:`loraloop.redact.mask_url`, so credentials never reach a terminal.
``adapters publish`` is added by the learner (training lives there), onto the same ``adapters`` parser.
"""

from __future__ import annotations

import argparse
import json
import time

from loraloop import __version__
from loraloop.cli import command
from loraloop.redact import mask_url
from loraloop.registry import RegistryError, make_registry
from loraloop.registry.pointer import RedisPointerStore
from loraloop.registry.signing import generate_key_pair
from loraloop.settings import Settings
from loraloop.status import collect_status, status_buffer

_REGISTRY_SETTINGS = ["registry_url", "registry_pointer", "redis_url", "adapter_poll_s", "registry_verify_key",
                      "label_capacity"]
_STATUS_SETTINGS = [*_REGISTRY_SETTINGS, "redis_prefix", "metrics_port", "log_level"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("adapters", help="List, inspect, promote and roll back adapter versions.",
                                   description="List, inspect, promote and roll back adapter versions.")
    sub = parser.add_subparsers(dest="adapters_command", metavar="ACTION", required=True)
    listing = command(sub, "list", _list, "Every version, newest last, with status and the active marker.",
                      _REGISTRY_SETTINGS)
    listing.add_argument("--json", action="store_true", help="Print JSON.")
    show = command(sub, "show", _show, "One version's metadata and status as JSON.", _REGISTRY_SETTINGS)
    show.add_argument("version")
    verify = command(sub, "verify", _verify, "Run every check a worker runs (files, checksums, signature, "
                     "weights, labels) without changing anything.", _REGISTRY_SETTINGS)
    verify.add_argument("version")
    promote = command(sub, "promote", _promote, "Make a version active (every check of `verify` first).",
                      _REGISTRY_SETTINGS)
    promote.add_argument("version")
    promote.add_argument("--reason", default="manual", help="Why (recorded in the pointer history).")
    promote.add_argument("--json", action="store_true", help="Print the new pointer as JSON.")
    promote.add_argument("--probation", action="store_true", default=False,
                         help="Put it on probation for the guard to judge instead of keeping it at once.")
    rollback = command(sub, "rollback", _rollback, "Go back to the previous active version.", _REGISTRY_SETTINGS)
    rollback.add_argument("--to", help="A specific earlier version instead of the previous one.")
    rollback.add_argument("--reason", default="manual", help="Why (recorded in the pointer history).")
    rollback.add_argument("--json", action="store_true", help="Print the new pointer as JSON.")
    sign = command(sub, "sign", _sign, "Sign versions published before a signing key was set (checked first).",
                   [*_REGISTRY_SETTINGS, "registry_signing_key"])
    sign.add_argument("versions", nargs="+", metavar="VERSION")
    command(sub, "adopt-redis-pointer", _adopt, "Upgrade: copy a pointer kept only in Redis (older releases) into "
            "pointer.json, which is now the source of truth.", _REGISTRY_SETTINGS)
    keygen = command(sub, "keygen", _keygen, "Write a new Ed25519 key pair: registry-signing.pem (secret, for "
                     "publishers) and registry-verify.pem (for every reader).", [])
    keygen.add_argument("folder", metavar="DIR")


def register_status(subparsers: argparse._SubParsersAction) -> None:
    parser = command(subparsers, "status", _status, "Active adapter, its history, the last learner cycles and "
                     "the feedback buffer's depth; --serve serves the same read-only over HTTP.", _STATUS_SETTINGS)
    parser.add_argument("--json", action="store_true", help="Print JSON.")
    parser.add_argument("--serve", action="store_true", help="Serve GET /v1/status, /v1/adapters, "
                        "/v1/adapters/{version}, /openapi.json and an HTML page at / until stopped (read only).")
    parser.add_argument("--host", default="127.0.0.1", help="Address --serve binds (default: 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8090, help="Port --serve listens on (default: 8090).")


def _list(args: argparse.Namespace, settings: Settings) -> int:
    registry = make_registry(settings)
    if args.json:
        from loraloop.status import list_adapters

        print(json.dumps(list_adapters(registry), indent=2, default=str))
        return 0
    active = registry.active().version
    print(f"{'':2}{'version':34} {'created (UTC)':20} {'parent':34} {'status':10} metrics")
    for info in registry.versions():
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(info.created_at))
        metrics = info.metadata.get("metrics") or {}
        shown = " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, int | float))[:60]
        print(f"{'*' if info.version == active else ' ':2}{info.version:34} {created:20} {info.parent or '-':34} "
              f"{info.status.get('status', 'ok'):10} {shown}")
    return 0


def _show(args: argparse.Namespace, settings: Settings) -> int:
    info = make_registry(settings).show(args.version)
    print(json.dumps({"metadata": info.metadata, "status": info.status}, indent=2, default=str))
    return 0


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    registry = make_registry(settings)
    registry.verify(args.version)
    signed = "signature checked" if registry.verify_key is not None else "no registry_verify_key: signature not checked"
    print(f"ok: {args.version} ({signed})")
    return 0


def _sign(args: argparse.Namespace, settings: Settings) -> int:
    registry = make_registry(settings)
    for version in args.versions:
        registry.sign(version)
        print(f"signed: {version}")
    return 0


def _adopt(args: argparse.Namespace, settings: Settings) -> int:
    registry = make_registry(settings)
    if not isinstance(registry.pointer, RedisPointerStore):
        raise RegistryError(f"registry_pointer resolves to a {type(registry.pointer).__name__}: set redis_url "
                            f"(and registry_pointer redis) to adopt a Redis pointer")
    pointer = registry.pointer.adopt_copy(registry.verify)
    print(f"active: {pointer.version} (generation {pointer.generation}), now in pointer.json")
    return 0


def _keygen(args: argparse.Namespace, settings: Settings) -> int:
    private, public = generate_key_pair(args.folder)
    print(f"signing key (secret, publishers only): {private}\nverify key (every reader):            {public}\n"
          f"set LORALOOP_REGISTRY_SIGNING_KEY={private} on the learner and LORALOOP_REGISTRY_VERIFY_KEY={public} "
          f"everywhere")
    return 0


def _promote(args: argparse.Namespace, settings: Settings) -> int:
    # An operator's choice: final at once (kept), and it ends a probation in progress as ``manual``.
    _print_pointer(make_registry(settings).promote(args.version, reason=args.reason, probation=args.probation),
                   args.json)
    return 0


def _rollback(args: argparse.Namespace, settings: Settings) -> int:
    _print_pointer(make_registry(settings).rollback(reason=args.reason, to=args.to), args.json)
    return 0


def _print_pointer(pointer, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"active": pointer.version, "generation": pointer.generation, "reason": pointer.reason,
                          "history": list(pointer.history)}, indent=2))
    else:
        print(f"active: {pointer.version} (generation {pointer.generation})")


def _status(args: argparse.Namespace, settings: Settings) -> int:
    registry = make_registry(settings)
    if args.serve:
        return _serve_status(args, settings, registry)
    state = collect_status(registry, status_buffer(settings), last_cycles=5, redis_url=settings.redis_url)
    if args.json:
        print(json.dumps(state, indent=2, default=str))
        return 0
    print(f"registry:   {state['registry']}" + (f" (pointer copy and notifications: {state['redis']})"
                                                   if state["redis"] else ""))
    print(f"active:     {state['active'] or '(none)'} "
          f"(generation {state['generation']}, {state['reason'] or 'no change yet'})")
    print(f"history:    {' <- '.join(reversed(state['history'])) or '(empty)'}\nversions:   {state['versions']}")
    _print_probation(state.get("probation"))
    buffer = state["buffer"]
    if buffer is not None:
        print(f"buffer:     {buffer['error'] if 'error' in buffer else str(buffer['depth']) + ' not acknowledged'}")
    for cycle in state["last_cycles"]:
        screened = cycle.get("screened") or {}
        aside = f" [screen set aside {', '.join(f'{n} {label}' for label, n in sorted(screened.items()))}]" \
            if screened else ""
        took = f" {cycle['duration_s']:.0f}s" if isinstance(cycle.get("duration_s"), int | float) else ""
        print(f"cycle:      {cycle.get('outcome') or '?':10} {cycle.get('trigger') or '':8}{took:>6} "
              f"{cycle.get('version') or '':34} {cycle.get('reason') or ''}{aside}")
    return 0


def _serve_status(args: argparse.Namespace, settings: Settings, registry) -> int:
    """Serve the read-only status until SIGTERM / SIGINT (uvicorn handles both)."""
    import uvicorn

    from loraloop.metrics import Metrics, serve_http
    from loraloop.status_http import StatusView, status_app

    metrics = Metrics()
    metrics.build.info({"version": __version__, "role": "status"})
    view = StatusView(registry, status_buffer(settings), redis_url=settings.redis_url,
                      count=lambda route, code: metrics.gateway_http_requests.labels(route=route, code=str(code)).inc())
    server = serve_http(metrics.registry, settings.metrics_port) if settings.metrics_port else None
    print(f"status on http://{args.host}:{args.port}/ (registry {mask_url(settings.registry_url)})", flush=True)
    try:
        uvicorn.run(status_app(view), host=args.host, port=args.port, log_level="warning")
    finally:
        if server is not None:
            server.shutdown()
    return 0


def _print_probation(probation: dict | None) -> None:
    """The probation lines of ``loraloop status`` (see :func:`loraloop.status.probation_status`)."""
    if not probation:
        return
    current = probation.get("current")
    if current:
        p_value = current.get("p_value")
        print(f"probation:  {current['version']} vs {current['baseline']} (last kept {current['last_kept']}): "
              f"{current.get('pairs', 0):.0f} of {current['needed']} paired judgements, "
              f"{current['time_left_s']:.0f} s left, {current.get('state') or 'no guard progress yet'}"
              + (f", p={p_value:.3g}" if isinstance(p_value, int | float) else "")
              + (f", drop {current['drop']:+.3f}" if isinstance(current.get("drop"), int | float) else ""))
    last = probation.get("last")
    if last:
        print(f"last probation: {last['version']} {last['decision']} ({last.get('reason') or ''}) by "
              f"{last.get('decided_by') or '?'}")
    print(f"last kept:  {probation.get('last_kept') or '(none)'}"
          + (f"; pending {probation['pending']}" if probation.get("pending") else ""))

