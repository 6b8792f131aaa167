"""Worker throughput: the inference worker end to end next to bare batched inference on the same texts.

Every run classifies the same texts (generated banking-intent-like sentences, or
``--dataset`` CSV) with the same compute: the base encoder plus one constant LoRA
adapter loaded through PEFT, under ``torch.inference_mode()``. Runs:

* ``bare bN``: ``tokenizer(batch, padding=True)`` then ``model(**batch)``, texts in
  arrival order, N = 1, 8, 32, 64;
* ``bare sorted bN``: the same on texts sorted by token count (hardly any padding): an
  upper bound for what a batching window that groups by length can gain;
* ``naive``: what a service without batching does: poll one request from the in-memory
  topic, decode, tokenize, forward, produce the prediction, commit;
* ``worker bN``: :class:`services.worker.InferenceWorker` with ``max_batch`` N, through the
  in-memory transport: the topic is loaded with every request first, then the clock runs
  until the last prediction is produced (decode, batching, tokenize, forward, request
  log, produce, commit).

For each: requests/s, p50/p99 latency (time from the start of the run, when every request
is waiting, to the request's result: under a backlog this is queueing plus service), the
achieved model GFLOP/s and its fraction of this machine's measured ``torch.matmul`` peak.
``ratio_to_bare_b32`` = worker b32 / bare b32 (goal: >= 0.8).

Example::

    .venv/bin/python benchmarks/worker_throughput.py --out results/worker_throughput.json
    .venv/bin/python benchmarks/worker_throughput.py --quick
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from pathlib import Path

from _common import (
    base_parser,
    load_texts,
    machine,
    percentile,
    print_table,
    resolve_base_model,
    rounded,
    write_json,
)

logger = logging.getLogger("benchmarks.worker_throughput")

LABELS = [f"intent_{i}" for i in range(16)]


def parse_args(argv: list[str] | None = None):
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, help="Texts per run (default 1024; 192 with --quick).")
    parser.add_argument("--batches", default="1,8,32,64", help="Batch sizes (comma separated; must include 32).")
    parser.add_argument("--max-tokens", type=int, default=128, help="Truncation (the worker's max_tokens).")
    parser.add_argument("--max-wait-ms", type=int, default=5, help="Worker max_wait_ms.")
    args = parser.parse_args(argv)
    args.n = args.n if args.n is not None else (192 if args.quick else 1024)
    args.batches = [int(b) for b in args.batches.split(",")]
    if 32 not in args.batches:
        parser.error("--batches must include 32 (the reference point)")
    return args


# --- measurements ------------------------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bare(model, tokenizer, texts: list[str], batch: int, max_tokens: int, device) -> dict[str, object]:
    """Tokenize + ``model(**batch)`` on consecutive chunks of ``texts``."""
    import torch

    done_at: list[float] = []
    with torch.inference_mode():
        warm = tokenizer(texts[:batch], padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        model(**{k: v.to(device) for k, v in warm.items()})
        _sync(device)
        started = time.perf_counter()
        for i in range(0, len(texts), batch):
            chunk = texts[i:i + batch]
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
            logits = model(**{k: v.to(device) for k, v in enc.items()})
            logits.softmax(-1).argmax(-1).tolist()  # the result, on the host
            done_at.extend([time.perf_counter() - started] * len(chunk))
    return _figures(len(texts), done_at[-1], done_at)


def run_naive(model, tokenizer, texts: list[str], max_tokens: int, device) -> dict[str, object]:
    """One request at a time through the in-memory transport, no batching."""
    import torch

    from loraloop.schemas import Prediction, Request, TopLabel, decode_request
    from loraloop.transport import next_offsets
    from loraloop.transport.memory import MemoryBroker, MemoryTransport

    transport = MemoryTransport(MemoryBroker(partitions=1))
    producer = transport.producer()
    for i, text in enumerate(texts):
        producer.send("requests", Request(id=f"r{i:06d}", text=text).to_bytes())
    consumer = transport.consumer(["requests"], "naive")
    done_at: list[float] = []
    with torch.inference_mode():
        warm = tokenizer(texts[:1], truncation=True, max_length=max_tokens, return_tensors="pt")
        model(**{k: v.to(device) for k, v in warm.items()})
        started = time.perf_counter()
        while len(done_at) < len(texts):
            records = consumer.poll(timeout_ms=100, max_records=1)
            for record in records:
                request = decode_request(record.value, 1 << 20)
                enc = tokenizer([request.text], truncation=True, max_length=max_tokens, return_tensors="pt")
                probs = model(**{k: v.to(device) for k, v in enc.items()}).softmax(-1)[0, :len(LABELS)]
                score, index = (float(x) for x in probs.max(-1))
                label = LABELS[int(index)]
                prediction = Prediction(request_id=request.id, label=label, score=score,
                                        top_k=[TopLabel(label=label, score=score)], adapter_version="naive",
                                        latency_ms=0.0)
                producer.send("predictions", prediction.to_bytes(), key=request.id.encode()).get()
                consumer.commit(next_offsets([record]))
                done_at.append(time.perf_counter() - started)
    consumer.close()
    return _figures(len(texts), done_at[-1], done_at)


def run_worker(settings, base, tokenizer, registry, texts: list[str]) -> dict[str, object]:
    """The worker through the in-memory transport, with every request waiting in the topic."""
    from prometheus_client import CollectorRegistry

    from loraloop.buffer.memory import MemoryRequestLog
    from loraloop.metrics import Metrics
    from loraloop.schemas import Prediction, Request
    from loraloop.transport import TopicPartition
    from loraloop.transport.memory import MemoryBroker, MemoryTransport
    from services.worker import build_worker

    transport = MemoryTransport(MemoryBroker(partitions=1))
    producer = transport.producer()
    worker = build_worker(settings, transport=transport, registry=registry, request_log=MemoryRequestLog(ttl_s=3600),
                          metrics=Metrics(CollectorRegistry()), base=base, tokenizer=tokenizer)
    try:
        deadline = time.monotonic() + 120
        while worker.active_version is None:  # loads the adapter; joins no group, consumes nothing yet
            if time.monotonic() > deadline:
                raise SystemExit("the worker did not load its adapter within 120 s")
            worker.run_once()
        warm = [Request(id=f"warm{i}", text=t) for i, t in enumerate(texts[:settings.max_batch])]
        for request in warm:
            producer.send(settings.requests_topic, request.to_bytes())
        predictions = TopicPartition(settings.predictions_topic, 0)
        while transport.broker.end_offset(predictions) < len(warm):
            worker.run_once()
        for i, text in enumerate(texts):
            producer.send(settings.requests_topic, Request(id=f"r{i:06d}", text=text).to_bytes())
        wall_start = time.time()  # latency: from here (every request waiting) to the prediction
        started = time.perf_counter()
        target = len(warm) + len(texts)
        while transport.broker.end_offset(predictions) < target:
            worker.run_once()
        elapsed = time.perf_counter() - started
        records = transport.broker.read(predictions, len(warm), len(texts) + 1)
        results = [Prediction.model_validate_json(r.value) for r in records]
        done_at = [max(0.0, p.ts - wall_start) for p in results]
        dead = transport.broker.end_offset(TopicPartition(settings.dead_letter_topic, 0))
    finally:
        worker.close()
    figures = _figures(len(texts), elapsed, done_at)
    figures.update(predictions=len(results), dead_letters=dead,
                   batches=round(worker.metrics.registry.get_sample_value("loraloop_batch_size_count") or 0))
    return figures


def _figures(n: int, elapsed: float, done_at: list[float]) -> dict[str, object]:
    ms = [t * 1000 for t in done_at]
    return {"requests": n, "seconds": round(elapsed, 3), "requests_per_s": round(n / elapsed, 2),
            "p50_ms": rounded(percentile(ms, 50)), "p99_ms": rounded(percentile(ms, 99))}


def flops_per_request(model, tokenizer, texts: list[str], max_tokens: int, device) -> dict[str, float]:
    """Model FLOPs of one request, counted by FlopCounterMode on length-sorted batches (hardly any padding),
    next to the estimate 2 * parameters in matmuls * tokens."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    tokens = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_tokens)["input_ids"]]
    by_length = [texts[i] for i in sorted(range(len(texts)), key=tokens.__getitem__)]
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        for i in range(0, len(by_length), 32):
            enc = tokenizer(by_length[i:i + 32], padding=True, truncation=True, max_length=max_tokens,
                            return_tensors="pt")
            model(**{k: v.to(device) for k, v in enc.items()})
    matmul_params = sum(m.weight.numel() for m in model.modules()
                        if isinstance(m, torch.nn.Linear) and m.weight.dim() == 2)
    mean_tokens = sum(tokens) / len(tokens)
    return {"counted": counter.get_total_flops() / len(texts), "mean_tokens": mean_tokens,
            "estimated_2_params_tokens": 2 * matmul_params * mean_tokens, "matmul_params": matmul_params}


def matmul_gflops(device, size: int = 1024, seconds: float = 1.0) -> float:
    """Best measured fp32 ``torch.matmul`` GFLOP/s of ``size`` x ``size`` matrices with the current threads."""
    import torch

    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.matmul(a, b)
    _sync(device)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b)
        _sync(device)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - started) / 1e9)
    return best


# --- the run ----------------------------------------------------------------------------------------------
def run(args) -> dict[str, object]:
    import torch
    from peft import PeftModel

    from loraloop.model import load_base, load_tokenizer, resolve_device
    from loraloop.registry import make_registry
    from loraloop.settings import Settings
    from loraloop.testing import build_constant_adapter

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    texts = load_texts(args, args.n)
    with tempfile.TemporaryDirectory(prefix="loraloop-throughput-") as tmp_name:
        tmp = Path(tmp_name)
        settings = Settings(base_model=resolve_base_model(args, tmp), registry_url=str(tmp / "registry"),
                            registry_pointer="file", redis_url="", label_capacity=len(LABELS),
                            max_tokens=args.max_tokens, max_wait_ms=args.max_wait_ms, device=str(device),
                            torch_threads=args.threads, transport="memory", max_text_bytes=1 << 20)
        pristine = load_base(settings)
        tokenizer = load_tokenizer(settings)
        adapter = build_constant_adapter(settings, LABELS, LABELS[3], tmp / "adapter", base=pristine)
        bare = PeftModel.from_pretrained(copy.deepcopy(pristine), str(adapter)).to(device).eval()
        registry = make_registry(settings)
        registry.promote(registry.publish(adapter))

        flops = flops_per_request(bare, tokenizer, texts, args.max_tokens, device)
        peak = matmul_gflops(device)
        print(f"{len(texts)} texts, mean {flops['mean_tokens']:.1f} tokens; "
              f"{flops['counted'] / 1e9:.3f} GFLOP per request; matmul peak {peak:.1f} GFLOP/s", flush=True)
        order = sorted(range(len(texts)), key=lambda i: len(tokenizer(texts[i], truncation=True,
                                                                      max_length=args.max_tokens)["input_ids"]))
        by_length = [texts[i] for i in order]
        rows: dict[str, dict[str, object]] = {}
        for b in args.batches:
            rows[f"bare b{b}"] = run_bare(bare, tokenizer, texts, b, args.max_tokens, device)
            print(f"  bare b{b}: {rows[f'bare b{b}']['requests_per_s']} requests/s", flush=True)
        for b in [b for b in args.batches if b >= 8]:
            rows[f"bare sorted b{b}"] = run_bare(bare, tokenizer, by_length, b, args.max_tokens, device)
            print(f"  bare sorted b{b}: {rows[f'bare sorted b{b}']['requests_per_s']} requests/s", flush=True)
        rows["naive"] = run_naive(bare, tokenizer, texts, args.max_tokens, device)
        print(f"  naive: {rows['naive']['requests_per_s']} requests/s", flush=True)
        for b in args.batches:
            worker_settings = Settings(**{**settings.model_dump(), "max_batch": b})
            rows[f"worker b{b}"] = run_worker(worker_settings, copy.deepcopy(pristine), tokenizer, registry, texts)
            print(f"  worker b{b}: {rows[f'worker b{b}']['requests_per_s']} requests/s", flush=True)

    for name, row in rows.items():
        row["run"] = name
        achieved = row["requests_per_s"] * flops["counted"] / 1e9
        row["gflop_per_s"] = round(achieved, 2)
        row["fraction_of_peak"] = round(achieved / peak, 4)
        reference = rows.get(f"bare b{name.rsplit('b', 1)[-1]}") if name.startswith("worker") else None
        if reference:
            row["ratio_to_bare_same_batch"] = round(row["requests_per_s"] / reference["requests_per_s"], 3)
    worker32, bare32 = rows["worker b32"]["requests_per_s"], rows["bare b32"]["requests_per_s"]
    sorted32 = rows["bare sorted b32"]["requests_per_s"]
    best_worker = max((r for n, r in rows.items() if n.startswith("worker")), key=lambda r: r["requests_per_s"])
    return {
        "ratio_to_bare_b32": round(worker32 / bare32, 3),
        "ratio_to_naive": round(worker32 / rows["naive"]["requests_per_s"], 3),
        "sorted_upper_bound_ratio": round(sorted32 / bare32, 3),
        "worker_to_sorted_b32": round(worker32 / sorted32, 3),
        "worker_requests_per_s_b32": worker32, "bare_requests_per_s_b32": bare32,
        "bare_sorted_requests_per_s_b32": sorted32, "naive_requests_per_s": rows["naive"]["requests_per_s"],
        "best_worker": best_worker["run"], "best_worker_requests_per_s": best_worker["requests_per_s"],
        "goal_met": worker32 >= 0.8 * bare32,
        "flops_per_request": flops["counted"], "flops_per_request_estimated": flops["estimated_2_params_tokens"],
        "mean_tokens": round(flops["mean_tokens"], 2), "matmul_gflop_per_s": round(peak, 2),
        "runs": list(rows.values()),
        "settings": {"base_model": settings.base_model_path, "quick": args.quick, "texts": len(texts),
                     "dataset": str(args.dataset) if args.dataset else "generated", "max_tokens": args.max_tokens,
                     "max_wait_ms": args.max_wait_ms, "threads": args.threads, "device": str(device)},
        "machine": machine(),
    }


def report(result: dict[str, object]) -> None:
    columns = ["run", "requests_per_s", "p50_ms", "p99_ms", "ratio_to_bare_same_batch", "gflop_per_s",
               "fraction_of_peak"]
    print_table(result["runs"], columns, title="worker throughput (same texts, same model + adapter)")
    print(f"\nratio_to_bare_b32 (worker b32 / bare b32): {result['ratio_to_bare_b32']}  (goal >= 0.8: "
          f"{'met' if result['goal_met'] else 'NOT met'})")
    print(f"worker b32 / naive loop: {result['ratio_to_naive']}")
    print(f"bare sorted b32 / bare b32 (upper bound of length batching): {result['sorted_upper_bound_ratio']}; "
          f"worker b32 reaches {result['worker_to_sorted_b32']:.0%} of it")
    print(f"model: {result['flops_per_request'] / 1e9:.3f} GFLOP per request (counted; "
          f"2*params*tokens: {result['flops_per_request_estimated'] / 1e9:.3f}), {result['mean_tokens']} tokens "
          f"on average; measured matmul peak {result['matmul_gflop_per_s']} GFLOP/s")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    result = run(args)
    report(result)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
