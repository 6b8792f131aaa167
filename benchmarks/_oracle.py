"""The offline oracle's cheap half: logistic regression on frozen mean-pooled embeddings."""

from __future__ import annotations

import time

import numpy as np
import torch

from loraloop.model import load_base, load_tokenizer
from loraloop.settings import Settings


@torch.inference_mode()
def embed(settings: Settings, texts: list[str], batch_size: int = 64, model=None, tokenizer=None) -> np.ndarray:
    """Mean-pooled embeddings of ``texts`` from the frozen base encoder, sorted by length for speed."""
    model = model or load_base(settings)
    tokenizer = tokenizer or load_tokenizer(settings)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), model.classifier.in_features), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=settings.max_tokens,
                        return_tensors="pt")
        out[idx] = model.embed(enc["input_ids"], enc["attention_mask"]).numpy()
    return out


def logistic_regression_oracle(settings: Settings, train: list[tuple[str, str]], test: list[tuple[str, str]]
                               ) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression

    started = time.perf_counter()
    x_train = embed(settings, [t for t, _ in train])
    x_test = embed(settings, [t for t, _ in test])
    clf = LogisticRegression(max_iter=2000, C=10.0)
    clf.fit(x_train, [label for _, label in train])
    accuracy = float((clf.predict(x_test) == np.array([label for _, label in test])).mean())
    return {"accuracy": accuracy, "seconds": time.perf_counter() - started}


if __name__ == "__main__":
    import sys

    from loraloop.demo.data import load_csv

    folder = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/banking77"
    torch.set_num_threads(2)
    train = load_csv(f"{folder}/train.csv", "text", "category")
    test = load_csv(f"{folder}/test.csv", "text", "category")
    print(logistic_regression_oracle(Settings(), train, test))
