"""Named LoRA adapters on one base model, in peft's vocabulary.

``load_adapter(path, name)`` loads without activating, ``set_adapter(name)`` activates,
``delete_adapter(name)`` frees; an unknown name is a ``ValueError`` that names it.

Loading is split in two so that a worker never pauses serving for I/O or checks:

* :meth:`AdapterManager.prepare` (any thread) reads the folder and verifies it in a
  dry run, without touching the served model: only regular files within size bounds
  are opened (checked by ``lstat`` first, so a FIFO never blocks), the weights must be a
  real safetensors file (its header parsed before loading); the adapter's own ``LoraConfig`` is
  injected into a *meta-device skeleton* of the base model (no memory, no weights) and
  PEFT itself says which keys and shapes that adapter must have; every tensor of the
  file is checked against them, and must be finite; the label map must fit the head.
* :meth:`AdapterManager.install` (the inference thread, between two forward passes)
  adds the verified weights to the PEFT model under the version name. This is the only
  step that mutates the model; it takes a few milliseconds (measured by the worker as
  its swap pause).

:meth:`AdapterManager.set_adapter` then switches PEFT's active adapter and replaces the
``(name, label map)`` pair in one assignment, so a forward pass always sees a
consistent pair. Version ids are never reused by the registry, so a name identifies
its weights for good.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from loraloop.model import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    HEAD_MODULE,
    LABELS_FILE,
    LabelMap,
    MeanPoolClassifier,
)
from loraloop.registry.checks import check_local_entries, read_regular_file, safetensors_header
from loraloop.registry.errors import RegistryError

logger = logging.getLogger(__name__)

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class AdapterError(ValueError):
    """An adapter that must not be served; the message names it and says why."""


@dataclass(frozen=True)
class PreparedAdapter:
    """A verified adapter held in memory, ready to be installed between two batches."""

    name: str
    config: object  # peft.LoraConfig
    weights: dict[str, torch.Tensor]
    label_map: LabelMap
    source: str


class AdapterManager:
    """The base model plus named LoRA adapters (each with its head and label map), one active.

    Args:
        base: the frozen base classifier; PEFT wraps it in place on the first install.
        max_loaded: most adapters kept in memory by :meth:`prune` (the active one and the
            most recently active others, so a rollback is a switch, not a load).
    """

    def __init__(self, base: MeanPoolClassifier, max_loaded: int = 3) -> None:
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be >= 1, got {max_loaded}")
        self.base = base
        self.max_loaded = max_loaded
        self.capacity = int(base.classifier.out_features)
        self.device = next(base.parameters()).device
        self.model = None  # peft.PeftModel, created by the first install
        self._label_maps: dict[str, LabelMap] = {}
        self._state: tuple[str, LabelMap] | None = None  # (active name, its labels): swapped in one assignment
        self._recent: list[str] = []  # activation order, most recent last
        self._expected: dict[str, dict[str, tuple[int, ...]]] = {}  # config signature -> key -> shape

    # --- state ---------------------------------------------------------------------------
    @property
    def active_adapter(self) -> str | None:
        state = self._state
        return state[0] if state else None

    @property
    def label_map(self) -> LabelMap | None:
        state = self._state
        return state[1] if state else None

    @property
    def active(self) -> tuple[str, LabelMap] | None:
        """The active (name, label map) pair, read in one step."""
        return self._state

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters."""
        return list(self._label_maps)

    def labels_of(self, name: str) -> LabelMap:
        self._require(name)
        return self._label_maps[name]

    def _require(self, name: str) -> None:
        if name not in self._label_maps:
            raise ValueError(f"unknown adapter {name!r}; loaded: {sorted(self._label_maps)}")

    # --- loading -------------------------------------------------------------------------
    def load_adapter(self, path: str | Path, name: str) -> None:
        """Read, verify and install the adapter in ``path`` under ``name``; does not activate it.

        Raises:
            AdapterError: the folder is unreadable, incomplete or does not fit the model.
            ValueError: ``name`` is already loaded.
        """
        self.install(self.prepare(path, name))

    def prepare(self, path: str | Path, name: str) -> PreparedAdapter:
        """Read and verify an adapter folder without touching the model (safe on any thread).

        Raises:
            AdapterError: missing or unreadable file, pickled weights, a config that is not a
                LoRA adapter with the ``classifier`` head, a key or shape the model does not
                have, non-finite weights, or more labels than the head's capacity.
            ValueError: ``name`` is already loaded.
        """
        from peft import LoraConfig
        from safetensors.torch import load as load_safetensors

        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"invalid adapter name {name!r}: a non-empty string without dots")
        if name in self._label_maps:
            raise ValueError(f"adapter {name!r} is already loaded; version names are never reused")
        folder = Path(path)
        where = f"adapter {name} ({folder})"
        if not folder.is_dir():
            raise AdapterError(f"{where}: no such folder")
        pickled = sorted(p.name for p in folder.iterdir() if p.name.lower().endswith(_PICKLE_SUFFIXES))
        if pickled:
            raise AdapterError(f"{where}: refusing pickled weight files {pickled}; adapters must be safetensors")
        required = [ADAPTER_WEIGHTS, ADAPTER_CONFIG, LABELS_FILE]
        missing = [n for n in required if not os.path.lexists(folder / n)]
        if missing:
            raise AdapterError(f"{where}: missing {missing}")
        try:  # lstat before anything is opened: a symlink, a FIFO or a huge file is refused, never read
            check_local_entries(str(folder), required, where)
            raw_weights = read_regular_file(str(folder / ADAPTER_WEIGHTS), where)
            safetensors_header(raw_weights, where)
        except RegistryError as e:
            raise AdapterError(str(e)) from e
        try:
            raw_config = json.loads((folder / ADAPTER_CONFIG).read_text())
        except (OSError, ValueError) as e:
            raise AdapterError(f"{where}: unreadable {ADAPTER_CONFIG}: {e}") from e
        if not isinstance(raw_config, dict) or raw_config.get("peft_type") != "LORA":
            kind = raw_config.get("peft_type") if isinstance(raw_config, dict) else type(raw_config).__name__
            raise AdapterError(f"{where}: expected a LoRA adapter config, got peft_type {kind!r}")
        try:
            config = LoraConfig.from_pretrained(str(folder))
        except (TypeError, ValueError) as e:
            raise AdapterError(f"{where}: invalid {ADAPTER_CONFIG}: {e}") from e
        config.inference_mode = True
        if HEAD_MODULE not in (config.modules_to_save or []):
            raise AdapterError(f"{where}: modules_to_save {config.modules_to_save!r} lacks the {HEAD_MODULE!r} head")
        try:
            label_map = LabelMap.load(folder)
        except (OSError, ValueError) as e:
            raise AdapterError(f"{where}: invalid {LABELS_FILE}: {e}") from e
        if not 1 <= len(label_map) <= self.capacity:
            raise AdapterError(f"{where}: {len(label_map)} labels, the head has {self.capacity} slots "
                               f"(label_capacity); a label map must have 1..{self.capacity}")
        try:
            weights = load_safetensors(raw_weights)
        except Exception as e:  # safetensors raises its own error type on a damaged file
            raise AdapterError(f"{where}: unreadable {ADAPTER_WEIGHTS} (corrupted?): {e}") from e
        self._check_weights(weights, self._expected_shapes(config, where), where)
        return PreparedAdapter(name, config, weights, label_map, str(folder))

    def _expected_shapes(self, config: object, where: str) -> dict[str, tuple[int, ...]]:
        """Keys and shapes PEFT saves for ``config`` on this base model, from a meta-device dry run."""
        from peft import PeftModel, get_peft_model_state_dict
        from transformers import AutoModel

        signature = json.dumps(config.to_dict(), sort_keys=True, default=str)
        cached = self._expected.get(signature)
        if cached is not None:
            return cached
        try:
            with torch.device("meta"):  # thread-local: the served model on other threads is unaffected
                skeleton = MeanPoolClassifier(AutoModel.from_config(self.base.encoder.config), self.capacity)
                dry = PeftModel(skeleton, config, adapter_name="dry_run")
                state = get_peft_model_state_dict(dry, adapter_name="dry_run")
        except (ValueError, KeyError, TypeError, RuntimeError) as e:  # e.g. target modules not in the model
            raise AdapterError(f"{where}: its LoRA config does not fit the base model: {e}") from e
        expected = {k: tuple(v.shape) for k, v in state.items()}
        self._expected[signature] = expected
        return expected

    @staticmethod
    def _check_weights(weights: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], where: str) -> None:
        missing = sorted(set(expected) - set(weights))
        unexpected = sorted(set(weights) - set(expected))
        if missing or unexpected:
            raise AdapterError(f"{where}: keys do not match the model: missing {missing[:5]}"
                               f"{'…' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                               f"{'…' if len(unexpected) > 5 else ''}")
        for key, shape in expected.items():
            tensor = weights[key]
            if tuple(tensor.shape) != shape:
                raise AdapterError(f"{where}: shape mismatch for {key}: file has {tuple(tensor.shape)}, "
                                   f"the model needs {shape}")
            if not tensor.is_floating_point():
                raise AdapterError(f"{where}: {key} has dtype {tensor.dtype}, expected floating point")
            if not torch.isfinite(tensor).all():
                raise AdapterError(f"{where}: {key} holds NaN or infinite values")

    def install(self, prepared: PreparedAdapter) -> None:
        """Add a verified adapter to the model under its name, inactive (inference thread only).

        Raises:
            ValueError: the name is already loaded.
            AdapterError: PEFT refused the weights (the partial adapter is removed again).
        """
        from peft import PeftModel, set_peft_model_state_dict

        name = prepared.name
        if name in self._label_maps:
            raise ValueError(f"adapter {name!r} is already loaded; version names are never reused")
        weights = {k: v.to(self.device) for k, v in prepared.weights.items()}
        first = self.model is None
        # low_cpu_mem_usage: LoRA modules are created empty and receive the weights directly,
        # skipping their random initialisation (most of the install time otherwise).
        if first:
            self.model = PeftModel(self.base, prepared.config, adapter_name=name, low_cpu_mem_usage=True)
        else:
            self.model.add_adapter(name, prepared.config, low_cpu_mem_usage=True)
        try:
            result = set_peft_model_state_dict(self.model, weights, adapter_name=name, low_cpu_mem_usage=True)
            if result.unexpected_keys:
                raise AdapterError(f"adapter {name}: PEFT did not use keys {result.unexpected_keys[:5]}")
        except Exception:
            # Remove the half-loaded adapter. PEFT cannot delete a wrapper's only adapter: after a
            # failed first install it stays injected but unregistered (never activated, never named).
            if not first:
                self.model.delete_adapter(name)
            raise
        self.model.eval()  # PeftModel() and add_adapter leave new dropout modules in training mode
        self._label_maps[name] = prepared.label_map
        logger.info("loaded adapter %s (%d labels) from %s", name, len(prepared.label_map), prepared.source)

    # --- switching -----------------------------------------------------------------------
    def set_adapter(self, name: str) -> None:
        """Serve ``name`` from the next forward pass on (inference thread only).

        Raises:
            ValueError: ``name`` is not loaded.
        """
        self._require(name)
        self.model.set_adapter(name)
        self._state = (name, self._label_maps[name])  # the single assignment forward() reads
        if name in self._recent:
            self._recent.remove(name)
        self._recent.append(name)

    def delete_adapter(self, name: str) -> None:
        """Free a loaded, inactive adapter.

        Raises:
            ValueError: ``name`` is not loaded, or is the active one.
        """
        self._require(name)
        if name == self.active_adapter:
            raise ValueError(f"adapter {name!r} is active; activate another one before deleting it")
        self.model.delete_adapter(name)
        del self._label_maps[name]
        if name in self._recent:
            self._recent.remove(name)
        logger.info("unloaded adapter %s", name)

    def prune(self, keep: int | None = None) -> list[str]:
        """Delete all but the ``keep`` most recently active adapters (the active one is always kept)."""
        keep = self.max_loaded if keep is None else max(1, keep)
        ranked = [n for n in reversed(self._recent)] + [n for n in self._label_maps if n not in self._recent]
        doomed = [n for n in ranked[keep:] if n != self.active_adapter]
        for name in doomed:
            self.delete_adapter(name)
        return doomed

    # --- inference -----------------------------------------------------------------------
    def forward_as(self, name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Masked logits of a loaded, possibly inactive adapter (inference thread only: shadow scoring).

        The active adapter is restored before returning, even on error; ``active`` never changes.
        """
        from loraloop.model import mask_logits

        self._require(name)
        state = self._state
        self.model.set_adapter(name)
        try:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            if state is not None:
                self.model.set_adapter(state[0])
        return mask_logits(logits.float(), len(self._label_maps[name]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, str, LabelMap]:
        """Logits of the active adapter with slots past its label map masked, and which adapter that was.

        Raises:
            RuntimeError: no adapter is active yet.
        """
        from loraloop.model import mask_logits

        state = self._state
        if state is None:
            raise RuntimeError("no active adapter: load_adapter() and set_adapter() first")
        name, label_map = state
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return mask_logits(logits.float(), len(label_map)), name, label_map
