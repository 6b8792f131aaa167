"""``loraloop adapters list|show|promote|rollback`` and ``loraloop status``."""

from __future__ import annotations

import argparse
import json
import time

from loraloop.cli import command
from loraloop.registry import make_registry
from loraloop.settings import Settings

_REGISTRY_SETTINGS = ["registry_url", "registry_pointer", "redis_url", "adapter_poll_s"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("adapters", help="List, inspect, promote and roll back adapter versions.",
                                   description="List, inspect, promote and roll back adapter versions.")
    sub = parser.add_subparsers(dest="adapters_command", metavar="ACTION", required=True)
    command(sub, "list", _list, "Every version, newest last, with status and the active marker.", _REGISTRY_SETTINGS)
    show = command(sub, "show", _show, "One version's metadata and status as JSON.", _REGISTRY_SETTINGS)
    show.add_argument("version")
    promote = command(sub, "promote", _promote, "Make a version active (checksums verified first).",
                      _REGISTRY_SETTINGS)
    promote.add_argument("version")
    promote.add_argument("--reason", default="manual", help="Why (recorded in the pointer history).")
    rollback = command(sub, "rollback", _rollback, "Go back to the previous active version.", _REGISTRY_SETTINGS)
    rollback.add_argument("--to", help="A specific earlier version instead of the previous one.")
    rollback.add_argument("--reason", default="manual", help="Why (recorded in the pointer history).")


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
    state = {"registry": settings.registry_url, "active": pointer.version, "generation": pointer.generation,
             "reason": pointer.reason, "history": list(pointer.history), "versions": len(registry.versions()),
             "last_cycles": cycles}
    if args.json:
        print(json.dumps(state, indent=2, default=str))
        return 0
    print(f"registry:   {state['registry']}\nactive:     {pointer.version or '(none)'} "
          f"(generation {pointer.generation}, {pointer.reason or 'no change yet'})")
    print(f"history:    {' <- '.join(reversed(pointer.history)) or '(empty)'}\nversions:   {state['versions']}")
    for cycle in cycles:
        screened = cycle.get("screened") or {}
        aside = f" [screen set aside {', '.join(f'{n} {label}' for label, n in sorted(screened.items()))}]" \
            if screened else ""
        print(f"cycle:      {cycle.get('outcome', '?'):10} {cycle.get('version') or '':34} {cycle.get('reason', '')}"
              f"{aside}")
    return 0
