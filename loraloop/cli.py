"""The ``loraloop`` command.

Subcommands owned by ``services``, ``learner`` and ``feedback`` are plugged in through
the ``loraloop.commands`` entry-point group (each entry is a ``register(subparsers)``
function), so this shared package never imports them. Every setting is also a flag:
``--max-batch 64`` overrides ``LORALOOP_MAX_BATCH``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from pydantic import SecretStr, ValidationError

from loraloop.buffer.base import BufferError
from loraloop.settings import Settings, configure_logging
from loraloop.transport.base import TransportError

logger = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace, Settings], int | None]
_SETTING_PREFIX = "setting__"


def add_settings_flags(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """Add a ``--flag`` for each setting in ``names`` (all settings when None)."""
    group = parser.add_argument_group("settings (also LORALOOP_<NAME> environment variables)")
    for name, field in Settings.model_fields.items():
        if names is not None and name not in names:
            continue
        flag = "--" + name.replace("_", "-")
        kind = field.annotation
        default = field.default.get_secret_value() if isinstance(field.default, SecretStr) else field.default
        help_text = f"{field.description} (default: {default!r})"
        converter = {int: int, float: float}.get(kind, str)  # type: ignore[arg-type]
        group.add_argument(flag, dest=_SETTING_PREFIX + name, type=converter, default=None, help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags that were given."""
    overrides = {k.removeprefix(_SETTING_PREFIX): v for k, v in vars(args).items()
                 if k.startswith(_SETTING_PREFIX) and v is not None}
    return Settings(**overrides)


def command(subparsers: argparse._SubParsersAction, name: str, handler: Handler, help: str,
            settings: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """Create a subcommand whose handler receives (args, settings)."""
    parser = subparsers.add_parser(name, help=help, description=help)
    add_settings_flags(parser, settings)
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraloop", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for entry in sorted(entry_points(group="loraloop.commands"), key=lambda e: e.name):
        try:
            entry.load()(subparsers)
        except ImportError as e:  # a missing optional component must not break the others
            logger.warning("subcommand %s unavailable: %s", entry.name, e)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Before torch loads: OpenMP threads that spin while waiting collapse throughput 10-20x as soon as
    # another process (or the demo's other thread) wants the same cores; passive waiting costs little.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        print(f"loraloop: invalid settings:\n{e}", file=sys.stderr)
        return 2
    configure_logging(settings)
    try:
        return int(args.handler(args, settings) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, LookupError, OSError, TransportError, BufferError) as e:  # expected: one line, no traceback
        print(f"loraloop {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
