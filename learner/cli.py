"""``loraloop learner`` (run cycles until SIGTERM), ``loraloop retrain`` (ask a running learner for a cycle) and
``loraloop adapters publish --from-csv FILE [--promote]`` (train a first adapter offline from a labelled CSV).

``learner --bootstrap`` and ``adapters publish --from-csv --promote`` run the same code
(:func:`train_from_csv`): the CSV is checked whole before anything is trained (a missing column,
an empty file, a single label or more labels than ``label_capacity`` stop it with the reason, and
nothing is published), then the adapter is trained with a progress bar and published.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import threading
import time
from pathlib import Path

from loraloop import __version__
from loraloop.cli import command
from loraloop.metrics import Metrics, serve_http
from loraloop.redact import mask_url
from loraloop.runtime import stop_on_signals
from loraloop.settings import Settings

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``loraloop learner``."""
    parser = command(subparsers, "learner", _run_learner,
                     help="Train LoRA adapters from buffered feedback on a timer, a feedback count or ops request; "
                          "promote those that pass the gate.")
    parser.add_argument("--bootstrap", type=Path, metavar="CSV",
                        help="When no version is active, first train one on this text,label CSV.")
    parser.add_argument("--text-column", default="text", help="Text column of --bootstrap (default: text).")
    parser.add_argument("--label-column", default="label", help="Label column of --bootstrap (default: label).")
    parser.add_argument("--once", action="store_true", help="Run one cycle now and exit (0 unless it failed).")


def register_retrain(subparsers: argparse._SubParsersAction) -> None:
    """Add ``loraloop retrain``."""
    parser = command(subparsers, "retrain", _run_retrain, settings=["registry_url", "api_token", "log_level"],
                     help="Ask the running learner (any process sharing the registry) for a cycle now "
                          "(signed with api_token, LORALOOP_API_TOKEN, which a learner that has one requires).")
    parser.add_argument("--wait", type=float, default=0.0, metavar="S",
                        help="Wait up to S seconds for the cycle's outcome and print it (default: do not wait).")


def register_publish(subparsers: argparse._SubParsersAction) -> None:
    """Add ``publish`` to ``loraloop adapters`` (entry point ``loraloop.commands: adapters-publish``)."""
    adapters = subparsers.choices.get("adapters")
    if adapters is None:  # the registry's commands failed to load: nothing to attach to
        logger.warning("loraloop adapters is unavailable: adapters publish is not registered")
        return
    (actions,) = [a for a in adapters._actions if isinstance(a, argparse._SubParsersAction)]
    parser = command(actions, "publish", _run_publish,
                     help="Train a first adapter from a labelled CSV (text,label) and publish it; --promote makes "
                          "it active. The same training as `loraloop learner --bootstrap`.")
    parser.add_argument("--from-csv", type=Path, required=True, metavar="FILE", dest="csv",
                        help="Labelled CSV: one row per example, at least two labels.")
    parser.add_argument("--text-column", default="text", help="Text column (default: text).")
    parser.add_argument("--label-column", default="label", help="Label column (default: label).")
    parser.add_argument("--promote", action="store_true", help="Make the new version active.")
    parser.add_argument("--json", action="store_true", help="Print the outcome as JSON.")


def read_labelled_csv(path: Path, text_column: str, label_column: str,
                      label_capacity: int | None = None) -> tuple[list[str], list[str]]:
    """Texts and labels of a CSV, checked to train a classifier on.

    Rows with an empty text or label are left out and counted in the log line.

    Raises:
        ValueError: the file is missing, empty, not UTF-8 CSV, lacks a column (the columns found are
            named), has no usable row, a single label, or more labels than ``label_capacity``.
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise ValueError(f"{path}: the file is empty; expected a header row with columns "
                                 f"{text_column!r} and {label_column!r}, then one row per example")
            missing = {text_column, label_column} - set(reader.fieldnames)
            if missing:
                raise ValueError(f"{path}: missing column(s) {sorted(missing)}; found {reader.fieldnames} "
                                 f"(--text-column / --label-column name others)")
            rows, skipped = [], 0
            for r in reader:
                text, label = (r.get(text_column) or "").strip(), (r.get(label_column) or "").strip()
                if text and label:
                    rows.append((text, label))
                else:
                    skipped += 1
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a UTF-8 CSV file: {e}") from e
    if not rows:
        raise ValueError(f"{path}: no row with both a {text_column!r} and a {label_column!r} value"
                         + (f" ({skipped} rows with one of them empty)" if skipped else ""))
    labels = sorted({y for _, y in rows})
    if len(labels) < 2:
        raise ValueError(f"{path}: only one label ({labels[0]!r}) in {len(rows)} rows: a classifier needs at "
                         f"least two")
    if label_capacity is not None and len(labels) > label_capacity:
        raise ValueError(f"{path}: {len(labels)} labels exceed label_capacity {label_capacity} "
                         f"(set --label-capacity, the size of the classification head, at least this high)")
    if skipped:
        logger.warning("%s: %d rows with an empty text or label left out (%d used)", path, skipped, len(rows))
    return [t for t, _ in rows], [y for _, y in rows]


def train_from_csv(learner, path: Path, text_column: str = "text", label_column: str = "label", *,
                   promote: bool = True, progress: bool = True) -> str:
    """Train an adapter on a labelled CSV and publish it; with ``promote``, make it active (the bootstrap).

    The CSV is checked first (:func:`read_labelled_csv`): on a bad file nothing is trained or published.
    Promoted, its rows also seed the replay reservoir, exactly like ``learner --bootstrap``.

    Returns:
        The new version id.
    """
    from tqdm import tqdm

    texts, labels = read_labelled_csv(path, text_column, label_column, learner.settings.label_capacity)
    stages = ["train", "publish"] + (["promote"] if promote else [])
    with tqdm(total=len(stages), desc=f"{len(texts)} examples, {len(set(labels))} labels", unit="step",
              disable=not progress, file=sys.stderr) as bar:
        bar.set_postfix_str("training")
        version = (learner.bootstrap(texts, labels, reason="bootstrap") if promote
                   else _publish_candidate(learner, texts, labels))
        bar.update(len(stages))
        bar.set_postfix_str(version)
    return version


def _publish_candidate(learner, texts: list[str], labels: list[str]) -> str:
    """Like :meth:`learner.cycle.Learner.bootstrap` without promoting: train, publish, mark it a candidate."""
    from transformers import set_seed

    from learner.cycle import CycleOutcome
    from learner.dataset import Labelled, TrainingSet, is_reference
    from loraloop.model import LabelMap

    s = learner.settings
    set_seed(s.seed)
    rows = [Labelled(t, y) for t, y in zip(texts, labels, strict=True)]
    label_map = LabelMap(tuple(sorted(set(labels))))
    train = [r for i, r in enumerate(rows) if not is_reference(f"bootstrap-{i}", s.reference_share)]
    held = [r for i, r in enumerate(rows) if is_reference(f"bootstrap-{i}", s.reference_share)]
    outcome = CycleOutcome(trigger="publish", outcome="candidate")
    model, report = learner._train(None, label_map, TrainingSet(train=train), train, held, outcome)
    folder = learner.trainer.save(model, label_map, learner._workdir / "publish")
    version = learner.registry.publish(folder, metadata={
        "trigger": "publish", "examples": len(train), "train_loss": report.final_loss, "labels": len(label_map),
        "recipe": outcome.recipe, "recipe_evidence": outcome.recipe_evidence})
    learner.registry.set_status(version, "candidate", {"published": "adapters publish --from-csv"})
    return version


def _run_publish(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from learner.cycle import build_learner

    read_labelled_csv(args.csv, args.text_column, args.label_column, settings.label_capacity)  # before any load
    learner = build_learner(settings, show_progress=sys.stderr.isatty())
    try:
        version = train_from_csv(learner, args.csv, args.text_column, args.label_column, promote=args.promote)
        active = learner.registry.active().version
    finally:
        learner.close()
    if args.json:
        print(json.dumps({"version": version, "promoted": args.promote, "active": active}))
    else:
        print(f"published {version}" + (" and promoted it: workers serve it within seconds" if args.promote
                                        else f" (not active; promote with: loraloop adapters promote {version})"))
    return 0


def _run_learner(args: argparse.Namespace, settings: Settings) -> int:
    from learner.cycle import build_learner

    metrics = Metrics()
    metrics.build.info({"version": __version__, "role": "learner"})
    learner = build_learner(settings, metrics=metrics)
    if args.bootstrap and not learner.registry.active().version:
        version = train_from_csv(learner, args.bootstrap, args.text_column, args.label_column, promote=True,
                                 progress=sys.stderr.isatty())
        print(f"bootstrapped {version} from {args.bootstrap}", flush=True)
    if args.once:
        outcome = learner.run_cycle("ops")
        print(outcome.outcome, outcome.version or "", outcome.reason, flush=True)
        return 1 if outcome.outcome == "failed" else 0
    stop = threading.Event()
    stop_on_signals(stop, logger, "the learner stops after the current cycle")
    server = serve_http(metrics.registry, settings.metrics_port, ready=learner.ready) if settings.metrics_port else None
    logger.info("learner up: registry %s, cycle every %.0fs or %d new examples", mask_url(settings.registry_url),
                settings.cycle_interval_s, settings.cycle_min_feedback)
    try:
        learner.run(stop)
    finally:
        if server is not None:
            server.shutdown()
        learner.close()
    return 0


def _run_retrain(args: argparse.Namespace, settings: Settings) -> int:
    from learner.trigger import OpsTriggers
    from loraloop.registry import make_registry

    registry = make_registry(settings)
    seen = len(registry.cycles())
    token = settings.api_token.get_secret_value()
    request_id = OpsTriggers(settings.registry_url, token=token).request("loraloop retrain")
    if not token:
        print("warning: api_token is not set, so the request is unsigned: a learner with api_token refuses it",
              flush=True)
    print(f"retrain requested: {request_id}", flush=True)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        cycles = registry.cycles()
        if len(cycles) > seen:
            last = cycles[-1]
            print(f"cycle {last.get('outcome')} {last.get('version') or ''}: {last.get('reason', '')}")
            return 0
        time.sleep(0.5)
    if args.wait:
        print(f"no cycle outcome within {args.wait:g}s (is a learner running on {settings.registry_url}?)")
        return 1
    return 0
