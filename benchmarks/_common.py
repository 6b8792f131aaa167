"""Shared pieces of the serving benchmarks: arguments, texts, percentiles, a table and a JSON file."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

# Repository root on sys.path, so that `python benchmarks/x.py` finds loraloop and services.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def base_parser(description: str) -> argparse.ArgumentParser:
    """Arguments every serving benchmark takes: --quick, --out, --device, --threads, --base-model, --seed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="A tiny random base model (loraloop.testing) and less work: a smoke run, not a figure.")
    parser.add_argument("--out", type=Path, help="Write the results as JSON to this file.")
    parser.add_argument("--device", default="cpu", help="Torch device: cpu, cuda, cuda:N or auto (default: cpu).")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch.set_num_threads (default: every core, %(default)s here).")
    parser.add_argument("--base-model", default="",
                        help="Base model path or id (default: the bundled all-MiniLM-L6-v2; tiny random with --quick).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the generated texts.")
    parser.add_argument("--dataset", type=Path, help="CSV file to take the texts from instead of generating them.")
    parser.add_argument("--text-column", default="text", help="Column of --dataset holding the texts.")
    return parser


def resolve_base_model(args: argparse.Namespace, tmp_dir: Path) -> str:
    """The base model the run uses: --base-model, else tiny random (--quick), else "" (the bundled MiniLM)."""
    if args.base_model:
        return args.base_model
    if args.quick:
        from loraloop.testing import save_tiny_base_model

        return str(save_tiny_base_model(tmp_dir / "tiny-base"))
    return ""


# --- texts ---------------------------------------------------------------------------------------
_OPENERS = ["", "Hi,", "Hello, ", "Please help:", "Quick question:", "Hey there,", "Good morning,"]
_ASKS = ["I", "Can I", "How do I", "Why can't I", "Is it possible to", "What should I do to", "Where can I",
         "I need to", "I want to", "Could you help me", "How long does it take to", "Am I able to"]
_ACTIONS = ["activate my new card", "top up my account", "transfer money to a friend", "change my PIN",
            "get a refund for a purchase", "cancel a transaction", "order a physical card", "verify my identity",
            "exchange currency", "withdraw cash abroad", "close my account", "update my address",
            "see my card details", "link a new bank account", "dispute a charge", "unblock my card",
            "find out about the fees", "use Apple Pay", "receive my salary here", "check my balance"]
_TAILS = ["before the weekend", "as soon as possible", "from the app", "while I am travelling in Spain",
          "because the payment was declined twice yesterday", "without visiting a branch",
          "since the last update of the app it keeps showing an error and I do not know why",
          "and I already tried restarting my phone", "for my daughter who is under 18",
          "even though the money already left my other account three days ago",
          "and the support chat has not answered me for hours which is really frustrating",
          "if my card was stolen", "using a card from another country", "after I changed my phone number"]


def intent_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` banking-intent-like requests with a long tail of lengths (about 5 to 80 words), seeded."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        parts = [rng.choice(_OPENERS), rng.choice(_ASKS), rng.choice(_ACTIONS)]
        while rng.random() < 0.45:  # geometric number of extra clauses: most short, some long
            parts.append(rng.choice(_TAILS))
        text = " ".join(p for p in parts if p).strip()
        texts.append(text + ("?" if rng.random() < 0.6 else "."))
    return texts


def load_texts(args: argparse.Namespace, n: int) -> list[str]:
    """``n`` texts: from --dataset (first n rows of --text-column, repeated if short) or generated."""
    if args.dataset is None:
        return intent_texts(n, args.seed)
    with open(args.dataset, newline="", encoding="utf-8") as f:
        rows = [row[args.text_column] for row in csv.DictReader(f) if row.get(args.text_column)]
    if not rows:
        raise SystemExit(f"{args.dataset}: no non-empty values in column {args.text_column!r}")
    rng = random.Random(args.seed)
    rng.shuffle(rows)
    return [rows[i % len(rows)] for i in range(n)]


# --- statistics and output ------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100, linear interpolation); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def rounded(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def print_table(rows: Sequence[dict], columns: Sequence[str], title: str = "") -> None:
    """Rows as an aligned text table (missing values shown as '-')."""
    def cell(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
        return str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths, strict=True))))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True))))


def write_json(path: Path | None, data: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    print(f"\nwrote {path}")


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    import platform

    import torch

    info: dict[str, object] = {"cpu_count": os.cpu_count(), "torch": torch.__version__,
                               "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                               "processor": platform.processor() or platform.machine()}
    info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "(default: active)")
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info
