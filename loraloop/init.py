"""``loraloop init DIR``: a settings file, a small labelled sample CSV and the commands to run next.

The sample comes from the demo's intent generator (:func:`loraloop.demo.data.generate_intents`), so
the first adapter can be trained without any data set; replace it with your own ``text,label`` CSV.
"""

from __future__ import annotations

import argparse
import csv
import shlex
from pathlib import Path

from loraloop.cli import command
from loraloop.demo.data import generate_intents
from loraloop.settings import Settings

SETTINGS_FILE = "loraloop.env"
SAMPLE_FILE = "sample.csv"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``loraloop init`` (entry point ``loraloop.commands: init``)."""
    parser = command(subparsers, "init", _init, settings=[],
                     help="Write a settings file and a sample labelled CSV into DIR and print the next commands.")
    parser.add_argument("folder", metavar="DIR", type=Path)
    parser.add_argument("--kafka", default="127.0.0.1:9092", help="Kafka bootstrap servers (default 127.0.0.1:9092).")
    parser.add_argument("--kafka-api-version", default="", help="e.g. 0.9 for a Kafka 0.9 broker (default: negotiate).")
    parser.add_argument("--redis", default="", help="Redis URL shared by the processes (default: none).")
    parser.add_argument("--per-label", type=int, default=20, help="Sample rows per intent (default 20, 12 intents).")
    parser.add_argument("--force", action="store_true", help="Overwrite files that exist.")


def write_project(folder: Path, *, kafka: str = "127.0.0.1:9092", kafka_api_version: str = "", redis: str = "",
                  per_label: int = 20, force: bool = False) -> dict[str, Path]:
    """Write ``loraloop.env`` and ``sample.csv`` into ``folder``; return their paths.

    Raises:
        FileExistsError: a file exists and ``force`` is False (nothing is written then).
        ValueError: ``per_label`` is under 1 or a setting is invalid.
    """
    if per_label < 1:
        raise ValueError(f"--per-label must be at least 1, got {per_label}")
    folder = folder.resolve()
    paths = {"settings": folder / SETTINGS_FILE, "sample": folder / SAMPLE_FILE}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)} exist(s); --force overwrites")
    values = {"transport": "kafka", "kafka_bootstrap": kafka, "kafka_api_version": kafka_api_version,
              "redis_url": redis, "registry_url": str(folder / "registry")}
    Settings(**values)  # refuse what the processes would refuse
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["# loraloop settings: every LORALOOP_<NAME> variable is a setting (see the README's Settings table).",
             "# Load them into a shell with:  set -a; . ./loraloop.env; set +a"]
    lines += [f"LORALOOP_{name.upper()}={shlex.quote(value) if value else ''}" for name, value in values.items()]
    lines.append("# LORALOOP_API_TOKEN=  required before binding the gateway or the feedback endpoint beyond "
                 "loopback")
    paths["settings"].write_text("\n".join(lines) + "\n")
    with open(paths["sample"], "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(generate_intents(per_label=per_label, seed=0))
    return paths


def _init(args: argparse.Namespace, settings: Settings) -> int:
    paths = write_project(args.folder, kafka=args.kafka, kafka_api_version=args.kafka_api_version, redis=args.redis,
                          per_label=args.per_label, force=args.force)
    folder = shlex.quote(str(paths["settings"].parent))
    print(f"wrote {paths['settings']} and {paths['sample']}\n\nNext, with Kafka at {args.kafka}"
          f"{' and Redis at ' + args.redis if args.redis else ''}:\n"
          f"  cd {folder} && set -a && . ./{SETTINGS_FILE} && set +a\n"
          f"  loraloop adapters publish --from-csv {SAMPLE_FILE} --promote   # the first adapter\n"
          f"  loraloop worker &                                             # serves it\n"
          f"  loraloop predict \"I lost my card yesterday\"                   # one prediction\n"
          f"  loraloop gateway &                                            # HTTP: http://127.0.0.1:8000/\n"
          f"  loraloop status                                               # versions and cycles\n"
          f"Without Kafka, `loraloop demo` runs the whole loop in one process.")
    return 0
