"""One learner cycle, timed by phase, and LoRA training vs full fine-tuning of the same model.

Part 1: for each ``--sizes`` (buffered feedback examples) and device, a learner is
bootstrapped (head fit only, on 10 examples per known label: the first 60% of the labels)
on a fresh local registry and in-memory buffer; the buffer is then filled with ``size``
labelled examples over every label (the rest are new labels), and one
:meth:`learner.cycle.Learner.run_cycle` runs with the shipped settings (``epochs``,
``replay_ratio``, gate). Its :class:`CycleOutcome` gives the time of claim, build
(resolve + replay sample + holdout), train (head fit + LoRA epochs), evaluate (candidate
and active on holdout and known labels) and publish.

Part 2: examples/s of training steps (forward, backward, AdamW step) of the same base
model on the same batches, with LoRA (the shipped config: ``lora_r`` on
``lora_target_modules`` + the head) and fully fine-tuned (every encoder parameter trainable).

Data: ``--train`` (Banking77's training file by default), else generated intents.

Example::

    .venv/bin/python benchmarks/learner_cycle.py --out results/learner_cycle.json
    .venv/bin/python benchmarks/learner_cycle.py --quick --out /tmp/learner_cycle_quick.json
"""

from __future__ import annotations

import argparse
import copy
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, print_table, write_json

logger = logging.getLogger("benchmarks.learner_cycle")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRAIN = REPO_ROOT.parent / "shared" / "data" / "banking77" / "train.csv"
PHASES = ("claim", "build", "train", "evaluate", "publish")
BOOTSTRAP_PER_LABEL = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000", help="Buffered examples per cycle (default: 1000,10000).")
    parser.add_argument("--devices", default="auto", help="Comma-separated torch devices (auto: cpu, plus cuda "
                        "when available).")
    parser.add_argument("--train", type=Path, default=DEFAULT_TRAIN, help="text,label CSV the examples come from.")
    parser.add_argument("--text-column", default="text", help="Text column of --train (default: text).")
    parser.add_argument("--label-column", default="category", help="Label column of --train (default: category).")
    parser.add_argument("--epochs", type=int, default=None, help="LoRA epochs per cycle (default: the setting, 2).")
    parser.add_argument("--steps", type=int, default=20, help="Timed training steps of part 2 (default: 20).")
    parser.add_argument("--base-model", default="", help="Base model (default: bundled MiniLM; tiny with --quick).")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of data and training.")
    parser.add_argument("--quick", action="store_true",
                        help="A smoke run: 100 and 300 examples, generated intents, a tiny random base model.")
    parser.add_argument("--out", type=Path, help="Write the results as JSON to this file.")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.steps = "100,300", min(args.steps, 3)
        args.threads = args.threads or 1  # a tiny model: more threads only contend
    args.sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    return args


def devices(spec: str) -> list[str]:
    import torch

    if spec != "auto":
        return [d.strip() for d in spec.split(",") if d.strip()]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def load_rows(args: argparse.Namespace) -> list[tuple[str, str]]:
    from loraloop.demo.data import generate_intents, load_csv

    if not args.quick and args.train.exists():
        return load_csv(args.train, args.text_column, args.label_column)
    return generate_intents(per_label=100, seed=args.seed)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- part 1: one cycle ---------------------------------------------------------------------------
def examples_for(rows: list[tuple[str, str]], labels: list[str], n: int, version: str, seed: int) -> list:
    """``n`` labelled feedback examples drawn from ``rows`` (with replacement past its size), distinct requests."""
    from loraloop.schemas import Example

    rng = random.Random(seed)
    picked = rng.sample(rows, n) if n <= len(rows) else [rng.choice(rows) for _ in range(n)]
    now = time.time()
    return [Example(event_id=f"e{i}", request_id=f"r{i}", text=text, kind="label", label=label,
                    served_label=rng.choice(labels), adapter_version=version, ts=now + i * 1e-3)
            for i, (text, label) in enumerate(picked)]


def time_cycle(base_settings, rows: list[tuple[str, str]], size: int, device: str, workdir: Path,
               base: object, tokenizer: object) -> dict:
    """Bootstrap a learner on the known labels, buffer ``size`` examples, run and time one cycle."""
    from learner.cycle import Learner
    from learner.train import Trainer
    from loraloop.buffer.memory import MemoryFeedbackBuffer
    from loraloop.demo.scenario import DriftPlan
    from loraloop.metrics import Metrics
    from loraloop.registry import make_registry

    s = base_settings.model_copy(update={"device": device, "registry_url": str(workdir / f"registry-{device}-{size}"),
                                         "cycle_max_feedback": size, "buffer_max": size + 1})
    registry = make_registry(s)
    buffer = MemoryFeedbackBuffer(max_items=s.buffer_max, trim=s.buffer_trim, replay_per_label=s.replay_per_label,
                                  claim_idle_s=s.claim_idle_s, seed=s.seed, dedup_ttl_s=s.dedup_ttl_s)
    labels = sorted({label for _, label in rows})
    plan = DriftPlan.split(labels, 0.6, s.seed)
    per: dict[str, int] = {}
    boot = []
    for text, label in rows:
        if label in plan.known and per.get(label, 0) < BOOTSTRAP_PER_LABEL:
            per[label] = per.get(label, 0) + 1
            boot.append((text, label))

    def learner(settings) -> Learner:
        trainer = Trainer(settings, base=base, tokenizer=tokenizer, show_progress=False)
        return Learner(settings, registry=registry, buffer=buffer, metrics=Metrics(), trainer=trainer)

    version = learner(s.model_copy(update={"epochs": 0})).bootstrap([t for t, _ in boot], [y for _, y in boot])
    for example in examples_for(rows, labels, size, version, s.seed):
        buffer.append(example)
    _sync(device)
    outcome = learner(s).run_cycle("ops")
    _sync(device)
    if outcome.outcome not in ("promoted", "rejected"):
        raise RuntimeError(f"cycle of {size} examples on {device} ended {outcome.outcome!r}: {outcome.reason}")
    timings = {phase: outcome.timings.get(phase) for phase in PHASES}
    trained = (outcome.train_rows + outcome.negatives) * s.epochs
    return {"device": device, "examples": size, **timings, "total_s": round(sum(timings.values()), 3),
            "head_fit_s": outcome.head_fit_s, "head_rows": outcome.head_rows,
            "train_rows": outcome.train_rows, "replay_rows": outcome.replay_rows, "epochs": s.epochs,
            "train_examples_per_s": round(trained / timings["train"], 1) if timings["train"] else None,
            "outcome": outcome.outcome, "labels": outcome.labels, "new_labels": len(outcome.new_labels)}


# --- part 2: LoRA vs full fine-tuning ------------------------------------------------------------
def training_rate(settings, base, tokenizer, texts: list[str], device: str, mode: str, steps: int) -> dict:
    """Examples/s of ``steps`` training steps after one warm-up step; ``mode`` is lora or full."""
    import torch
    import torch.nn.functional as F
    from peft import get_peft_model

    from loraloop.model import lora_config

    model = copy.deepcopy(base)
    if mode == "lora":
        model = get_peft_model(model, lora_config(settings))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    size = settings.batch_size
    batches = []
    for i in range(steps + 1):
        chunk = [texts[(i * size + j) % len(texts)] for j in range(size)]
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=settings.max_tokens, return_tensors="pt")
        batches.append((enc["input_ids"].to(device), enc["attention_mask"].to(device),
                        torch.randint(0, 8, (size,), device=device)))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = 0.0
    for i, (ids, mask, target) in enumerate(batches):
        if i == 1:  # the first step warms up (allocations, kernels)
            _sync(device)
            started = time.perf_counter()
        loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask)[:, :8], target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    elapsed = time.perf_counter() - started
    out = {"device": device, "mode": mode, "steps": steps, "batch_size": size,
           "examples_per_s": round(steps * size / elapsed, 1), "trainable_params": sum(p.numel() for p in params)}
    if device.startswith("cuda"):
        out["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


# --- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    import torch
    from transformers import set_seed

    from loraloop.model import load_base, load_tokenizer
    from loraloop.settings import Settings

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = load_rows(args)
    cycles, rates = [], []
    with tempfile.TemporaryDirectory(prefix="loraloop-cycle-bench-") as tmp_name:
        tmp = Path(tmp_name)
        update: dict[str, object] = {"seed": args.seed}
        if args.base_model:
            update["base_model"] = args.base_model
        elif args.quick:
            from loraloop.testing import save_tiny_base_model

            update["base_model"] = str(save_tiny_base_model(tmp / "tiny-base"))
        if args.epochs is not None:
            update["epochs"] = args.epochs
        settings = Settings(**update)
        base, tokenizer = load_base(settings), load_tokenizer(settings)
        for device in devices(args.devices):
            for size in args.sizes:
                set_seed(args.seed)
                print(f"one learner cycle: {size} buffered examples on {device}", flush=True)
                cycles.append(time_cycle(settings, rows, size, device, tmp, base, tokenizer))
            texts = [t for t, _ in rows]
            random.Random(args.seed).shuffle(texts)
            for mode in ("lora", "full"):
                print(f"training steps: {mode} on {device}", flush=True)
                rates.append(training_rate(settings, base, tokenizer, texts, device, mode, args.steps))
    for device in {r["device"] for r in rates}:
        by_mode = {r["mode"]: r for r in rates if r["device"] == device}
        by_mode["lora"]["speedup_vs_full"] = round(by_mode["lora"]["examples_per_s"] /
                                                   by_mode["full"]["examples_per_s"], 2)
    print_table(cycles, ["device", "examples", *PHASES, "head_fit_s", "total_s", "head_rows", "train_rows", "replay_rows",
                         "train_examples_per_s", "outcome"], title="one learner cycle, seconds per phase")
    print_table(rates, ["device", "mode", "examples_per_s", "trainable_params", "speedup_vs_full"],
                title=f"training steps (batch {settings.batch_size}): LoRA vs full fine-tuning")
    write_json(args.out, {"cycles": cycles, "training": rates,
                          "config": {"sizes": args.sizes, "quick": args.quick, "epochs": settings.epochs,
                                     "base_model": settings.base_model or "(bundled all-MiniLM-L6-v2)",
                                     "data": str(args.train) if not args.quick and args.train.exists()
                                     else "generated intents", "steps": args.steps, "seed": args.seed,
                                     "lora_r": settings.lora_r, "lora_target_modules": settings.lora_target_modules},
                          "machine": machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
