"""``loraloop adapters list|show|verify|promote|rollback|sign|keygen`` and ``loraloop status``.

URLs are printed through :func:`loraloop.redact.mask_url`, so credentials never reach a terminal.
"""

from __future__ import annotations

import argparse
import json
import time

from loraloop.cli import command
from loraloop.redact import mask_url
from loraloop.registry import RegistryError, make_registry
from loraloop.registry.pointer import RedisPointerStore
from loraloop.registry.signing import generate_key_pair
from loraloop.settings import Settings

_REGISTRY_SETTINGS = ["registry_url", "registry_pointer", "redis_url", "adapter_poll_s", "registry_verify_key",
                      "label_capacity"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("adapters", help="List, inspect, promote and roll back adapter versions.",
                                   description="List, inspect, promote and roll back adapter versions.")
    sub = parser.add_subparsers(dest="adapters_command", metavar="ACTION", required=True)
    command(sub, "list", _list, "Every version, newest last, with status and the active marker.", _REGISTRY_SETTINGS)
    show = command(sub, "show", _show, "One version's metadata and status as JSON.", _REGISTRY_SETTINGS)
    show.add_argument("version")
    verify = command(sub, "verify", _verify, "Run every check a worker runs (files, checksums, signature, "
                     "weights, labels) without changing anything.", _REGISTRY_SETTINGS)
    verify.add_argument("version")
    promote = command(sub, "promote", _promote, "Make a version active (every check of `verify` first).",
                      _REGISTRY_SETTINGS)
    promote.add_argument("version")
    promote.add_argument("--reason", default="manual", help="Why (recorded in the pointer history).")
    rollback = command(sub, "rollback", _rollback, "Go back to the previous active version.", _REGISTRY_SETTINGS)
    rollback.add_argument("--to", help="A specific earlier version instead of the previous one.")
    rollback.add_argument("--reason", default="manual", help="Why (recorded in the pointer history).")
    sign = command(sub, "sign", _sign, "Sign versions published before a signing key was set (checked first).",
                   [*_REGISTRY_SETTINGS, "registry_signing_key"])
    sign.add_argument("versions", nargs="+", metavar="VERSION")
    command(sub, "adopt-redis-pointer", _adopt, "Upgrade: copy a pointer kept only in Redis (older releases) into "
            "pointer.json, which is now the source of truth.", _REGISTRY_SETTINGS)
    keygen = command(sub, "keygen", _keygen, "Write a new Ed25519 key pair: registry-signing.pem (secret, for "
                     "publishers) and registry-verify.pem (for every reader).", [])
    keygen.add_argument("folder", metavar="DIR")


def register_status(subparsers: argparse._SubParsersAction) -> None:
    parser = command(subparsers, "status", _status, "Active adapter, its history and the last learner cycles.",
                     _REGISTRY_SETTINGS)
    parser.add_argument("--json", action="store_true", help="Print JSON.")


def _list(args: argparse.Namespace, settings: Settings) -> int:
    registry = make_registry(settings)
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
    pointer = make_registry(settings).promote(args.version, reason=args.reason)
    print(f"active: {pointer.version} (generation {pointer.generation})")
    return 0


def _rollback(args: argparse.Namespace, settings: Settings) -> int:
    pointer = make_registry(settings).rollback(reason=args.reason, to=args.to)
    print(f"active: {pointer.version} (generation {pointer.generation})")
    return 0


def _status(args: argparse.Namespace, settings: Settings) -> int:
    registry = make_registry(settings)
    pointer = registry.active()
    cycles = registry.cycles()[-5:]
    state = {"registry": mask_url(settings.registry_url), "redis": mask_url(settings.redis_url) or None,
             "active": pointer.version, "generation": pointer.generation, "reason": pointer.reason, "history": list(pointer.history), "versions": len(registry.versions()),
             "last_cycles": cycles}
    if args.json:
        print(json.dumps(state, indent=2, default=str))
        return 0
    print(f"registry:   {state['registry']}" + (f" (pointer copy and notifications: {state['redis']})"
                                                   if state["redis"] else ""))
    print(f"active:     {pointer.version or '(none)'} "
          f"(generation {pointer.generation}, {pointer.reason or 'no change yet'})")
    print(f"history:    {' <- '.join(reversed(pointer.history)) or '(empty)'}\nversions:   {state['versions']}")
    for cycle in cycles:
        screened = cycle.get("screened") or {}
        aside = f" [screen set aside {', '.join(f'{n} {label}' for label, n in sorted(screened.items()))}]" \
            if screened else ""
        print(f"cycle:      {cycle.get('outcome', '?'):10} {cycle.get('version') or '':34} {cycle.get('reason', '')}"
              f"{aside}")
    return 0
