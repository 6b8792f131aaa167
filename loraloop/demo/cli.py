"""``loraloop demo`` command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loraloop.cli import command
from loraloop.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = command(subparsers, "demo", _run,
                     "Run the whole loop in one process (worker, feedback ingester, learner, guard, simulated users).")
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="Output folder (default: demo-out).")
    parser.add_argument("--dataset", help="A text,label CSV to use instead of the built-in intent generator.")
    parser.add_argument("--text-column", default="text", help="Text column of --dataset (default: text).")
    parser.add_argument("--label-column", default="label", help="Label column of --dataset (default: label).")
    parser.add_argument("--requests", type=int, default=3000, help="Requests in the stream (default: 3000).")
    parser.add_argument("--rate", type=float, default=25.0, help="Requests per second sent (default: 25).")
    parser.add_argument("--feedback-fraction", type=float, default=0.5, help="Share of predictions users judge.")
    parser.add_argument("--noise", type=float, default=0.05, help="Share of user labels that are wrong.")
    parser.add_argument("--poison", action="store_true", help="Add a burst of adversarially flipped feedback: from 55%% "
                        "of the stream, for 20%% of it, a share --poison-share of the judged predictions get a label "
                        "naming one known label.")
    parser.add_argument("--poison-share", type=float, default=0.2,
                        help="Share of the burst's judged predictions whose label is flipped (default: 0.2).")
    parser.add_argument("--pace-with-learner", action="store_true",
                        help="Hold traffic while the learner trains (results in requests, whatever the CPU speed).")
    parser.add_argument("--kafka", action="store_true", help="Use the Kafka at --kafka-bootstrap instead of in-memory.")
    parser.add_argument("--redis", action="store_true", help="Use the Redis at --redis-url (default "
                        "redis://127.0.0.1:6379/0) for request log, buffer and registry pointer.")


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from loraloop.demo.run import Demo, DemoConfig

    update: dict[str, object] = {}
    if args.kafka:
        update["transport"] = "kafka"
    if args.redis and not settings.redis_url:
        update["redis_url"] = "redis://127.0.0.1:6379/0"
    if update:
        settings = settings.model_copy(update=update)
    config = DemoConfig(out=args.out, dataset=args.dataset, text_column=args.text_column,
                        label_column=args.label_column, requests=args.requests, rate=args.rate,
                        feedback_fraction=args.feedback_fraction, noise=args.noise, poison=args.poison,
                        poison_share=args.poison_share,
                        pace_with_learner=args.pace_with_learner,
                        seed=settings.seed)
    summary = Demo(settings, config).run()
    _print_table(summary)
    print(f"\nwrote {args.out / 'summary.json'} and {args.out / 'accuracy.png'}")
    return 0


def _print_table(summary: dict[str, object]) -> None:
    rows = [("requests", "requests"), ("feedback events", "feedback_events"), ("promotions", "promotions"),
            ("rejections (gate)", "rejections"), ("rollbacks (guard)", "rollbacks"),
            ("test accuracy, all labels", ("accuracy_initial", "accuracy_final")),
            ("test accuracy, known labels", ("old_label_accuracy_initial", "old_label_accuracy_final")),
            ("test accuracy, new labels", ("new_label_accuracy_initial", "new_label_accuracy_final")),
            ("live accuracy over the stream", "live_accuracy"), ("duration (s)", "duration_s")]
    print("\n" + json.dumps({"initial_version": summary["initial_version"], "final_version": summary["final_version"]}))
    print(f"{'':32} {'start':>8} {'end':>8}")
    for name, key in rows:
        if isinstance(key, tuple):
            print(f"{name:32} {summary[key[0]]:>8.3f} {summary[key[1]]:>8.3f}")
        else:
            print(f"{name:32} {'':>8} {summary[key]!s:>8}")
