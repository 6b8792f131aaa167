"""The model contract shared by the worker and the learner.

A served model is the frozen base encoder, mean-pooled (all-MiniLM-L6-v2 was trained
with mean pooling; the stock BERT classification head reads the CLS/pooler output and
learns far slower), followed by a linear head of ``label_capacity`` slots. An adapter
is a PEFT LoRA adapter on the encoder plus its own copy of the head
(``modules_to_save``), and a label map that names the first N slots: adding a label
means publishing an adapter with a longer label map, never resizing the head, so no
worker restarts. Logits of unused slots are masked.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loraloop.settings import Settings

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LABELS_FILE = "labels.json"
METADATA_FILE = "metadata.json"
HEAD_MODULE = "classifier"


class MeanPoolClassifier(nn.Module):
    """Encoder + masked mean pooling + linear head; returns logits of every slot."""

    def __init__(self, encoder: nn.Module, capacity: int, seed: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config  # PEFT reads model.config
        generator = torch.Generator().manual_seed(seed)
        head = nn.Linear(encoder.config.hidden_size, capacity)
        with torch.no_grad():  # same initial head in every process, whatever the global seed
            head.weight.normal_(0.0, 0.02, generator=generator)
            head.bias.zero_()
        self.classifier = head

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: object) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return self.classifier(self.embed(input_ids, attention_mask))


@dataclass(frozen=True)
class LabelMap:
    """Names of the first ``len(labels)`` head slots; order is fixed once published."""

    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"label map has duplicates: {self.labels}")
        if any(not isinstance(label, str) or not label for label in self.labels):
            raise ValueError(f"labels must be non-empty strings: {self.labels}")

    def __len__(self) -> int:
        return len(self.labels)

    def index(self, label: str) -> int:
        return self.labels.index(label)

    def extended(self, new_labels: list[str]) -> LabelMap:
        """This map plus unseen labels appended in first-seen order (old slots never move)."""
        seen = list(self.labels)
        for label in new_labels:
            if label not in seen:
                seen.append(label)
        return LabelMap(tuple(seen))

    def save(self, folder: Path) -> None:
        (folder / LABELS_FILE).write_text(json.dumps({"labels": list(self.labels)}, indent=1))

    @classmethod
    def load(cls, folder: Path) -> LabelMap:
        data = json.loads((folder / LABELS_FILE).read_text())
        labels = data.get("labels") if isinstance(data, dict) else None
        if not isinstance(labels, list):
            raise ValueError(f"{folder / LABELS_FILE}: expected {{'labels': [...]}}")
        return cls(tuple(labels))


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def load_tokenizer(settings: Settings):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(settings.base_model_path)


def load_base(settings: Settings, encoder_config: object | None = None) -> MeanPoolClassifier:
    """The base classifier: the configured encoder (or a random one built from ``encoder_config``)."""
    from transformers import AutoModel

    if encoder_config is not None:
        encoder = AutoModel.from_config(encoder_config)
    else:
        encoder = AutoModel.from_pretrained(settings.base_model_path)
    model = MeanPoolClassifier(encoder, settings.label_capacity, seed=settings.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def lora_config(settings: Settings, inference_mode: bool = False):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.target_modules,
        modules_to_save=[HEAD_MODULE],
        inference_mode=inference_mode,
    )


def mask_logits(logits: torch.Tensor, n_labels: int) -> torch.Tensor:
    """Logits with every slot past the adapter's label map set to -inf."""
    if n_labels >= logits.shape[-1]:
        return logits
    masked = logits.clone()
    masked[..., n_labels:] = float("-inf")
    return masked
