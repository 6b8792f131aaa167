"""AdapterManager: load / set / delete adapters by name on a tiny model, and every refusal."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraloop.model import ADAPTER_WEIGHTS, LABELS_FILE, load_base, load_tokenizer, mask_logits
from loraloop.settings import Settings
from loraloop.testing import build_constant_adapter, save_tiny_base_model
from services.adapters import AdapterError, AdapterManager

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("adapters")
    settings = Settings(base_model=str(save_tiny_base_model(root / "base")), label_capacity=8)
    base = load_base(settings)
    # lora_std large enough that the LoRA weights visibly change the logits
    a = build_constant_adapter(settings, ["x", "y", "z"], "x", root / "a", base=base, seed=1, lora_std=0.5,
                               margin=0.5)
    b = build_constant_adapter(settings, ["x", "y", "z", "w"], "w", root / "b", base=base, seed=2, lora_std=0.5,
                               margin=0.5)
    tokenizer = load_tokenizer(settings)
    batch = tokenizer(["hello there", "my card has not arrived yet, what can I do?"], padding=True,
                      return_tensors="pt")
    return {"settings": settings, "root": root, "a": a, "b": b, "batch": batch}


def _fresh_logits(env: dict, folder: Path) -> torch.Tensor:
    """Reference: a brand-new base with only this adapter, loaded by PEFT's own from_pretrained."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(env["settings"]), str(folder)).eval()
    n = len(json.loads((folder / LABELS_FILE).read_text())["labels"])
    with torch.inference_mode():
        out = model(input_ids=env["batch"]["input_ids"], attention_mask=env["batch"]["attention_mask"])
    return mask_logits(out, n)


def _served(manager: AdapterManager, env: dict) -> tuple[torch.Tensor, str]:
    with torch.inference_mode():
        logits, name, _ = manager.forward(env["batch"]["input_ids"], env["batch"]["attention_mask"])
    return logits, name


@pytest.fixture()
def manager(env: dict) -> AdapterManager:
    return AdapterManager(load_base(env["settings"]), max_loaded=3)


def test_swap_back_and_forth_matches_a_fresh_model(env: dict, manager: AdapterManager) -> None:
    ref_a, ref_b = _fresh_logits(env, env["a"]), _fresh_logits(env, env["b"])
    assert not torch.allclose(ref_a, ref_b), "the two adapters must differ for this test to mean anything"
    manager.load_adapter(env["a"], "va")
    assert manager.active_adapter is None  # loading never activates
    manager.set_adapter("va")
    manager.load_adapter(env["b"], "vb")
    logits, name = _served(manager, env)
    assert name == "va" and torch.allclose(logits, ref_a, atol=1e-5)  # loading vb left va active
    for _ in range(3):
        manager.set_adapter("vb")
        logits, name = _served(manager, env)
        assert name == "vb" and manager.label_map.labels == ("x", "y", "z", "w")
        assert torch.allclose(logits, ref_b, atol=1e-5)
        manager.set_adapter("va")
        logits, name = _served(manager, env)
        assert name == "va" and len(manager.label_map) == 3
        assert torch.allclose(logits, ref_a, atol=1e-5)
        assert torch.isinf(logits[:, 3:]).all()  # slots past the label map are masked


def test_delete_and_prune_keep_the_active_and_most_recent(env: dict, manager: AdapterManager) -> None:
    for i in range(4):
        manager.load_adapter(env["a"] if i % 2 == 0 else env["b"], f"v{i}")
        manager.set_adapter(f"v{i}")
    assert manager.prune(keep=2) == ["v1", "v0"]
    assert sorted(manager.adapters) == ["v2", "v3"]
    with pytest.raises(ValueError, match="'v3' is active"):
        manager.delete_adapter("v3")
    manager.delete_adapter("v2")
    assert manager.adapters == ["v3"]
    logits, name = _served(manager, env)
    assert name == "v3" and torch.allclose(logits, _fresh_logits(env, env["b"]), atol=1e-5)


def test_unknown_and_duplicate_names_are_refused(env: dict, manager: AdapterManager) -> None:
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        manager.set_adapter("nope")
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        manager.delete_adapter("nope")
    with pytest.raises(RuntimeError, match="no active adapter"):
        _served(manager, env)
    manager.load_adapter(env["a"], "va")
    with pytest.raises(ValueError, match="'va' is already loaded"):
        manager.load_adapter(env["a"], "va")
    with pytest.raises(ValueError, match="invalid adapter name"):
        manager.prepare(env["a"], "bad.name")


def _copy(env: dict, name: str) -> Path:
    dest = env["root"] / "work" / name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(env["a"], dest)
    return dest


def _rewrite_weights(folder: Path, change) -> None:
    weights = load_file(str(folder / ADAPTER_WEIGHTS))
    change(weights)
    save_file(weights, str(folder / ADAPTER_WEIGHTS))


def _lora_a_key(folder: Path) -> str:
    return next(k for k in load_file(str(folder / ADAPTER_WEIGHTS)) if k.endswith("lora_A.weight"))


@pytest.mark.parametrize(("damage", "match"), [
    ("shape", r"shape mismatch for .*lora_A\.weight: file has \(4, 32\), the model needs \(8, 32\)"),
    ("corrupt", r"adapter_model\.safetensors is not a safetensors file \(tensor .* outside \d+ data bytes\)"),
    ("bad_tensor_data", r"unreadable adapter_model\.safetensors \(corrupted\?\)"),
    ("pickle_named_safetensors", r"adapter_model\.safetensors is not a safetensors file \(header length"),
    ("symlink", r"adapter_model\.safetensors is a symbolic link, not a regular file"),
    ("fifo", r"labels\.json is a FIFO, not a regular file"),
    ("too_many_labels", r"9 labels, the head has 8 slots"),
    ("missing_key", r"keys do not match the model: missing \[.*lora_A"),
    ("extra_key", r"unexpected \['base_model\.model\.encoder\.bogus\.weight'\]"),
    ("nan", r"NaN or infinite"),
    ("missing_file", r"missing \['labels\.json'\]"),
    ("pickle", r"refusing pickled weight files \['adapter_model\.bin'\]"),
    ("not_lora", r"expected a LoRA adapter config, got peft_type 'IA3'"),
    ("no_head", r"lacks the 'classifier' head"),
    ("bad_target", r"does not fit the base model"),
])
def test_bad_adapters_are_refused_before_touching_the_model(env: dict, manager: AdapterManager, damage: str,
                                                            match: str) -> None:
    manager.load_adapter(env["a"], "va")
    manager.set_adapter("va")
    before, _ = _served(manager, env)
    folder = _copy(env, damage)
    key = _lora_a_key(folder)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if damage == "shape":
        _rewrite_weights(folder, lambda w: w.__setitem__(key, torch.zeros(4, 32)))
    elif damage == "corrupt":
        data = (folder / ADAPTER_WEIGHTS).read_bytes()
        (folder / ADAPTER_WEIGHTS).write_bytes(data[: len(data) // 2])
    elif damage == "bad_tensor_data":  # a header that parses but declares a dtype safetensors does not know
        data = (folder / ADAPTER_WEIGHTS).read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        first = next(k for k in header if k != "__metadata__")
        header[first]["dtype"] = "NOPE"
        raw = json.dumps(header).encode()
        (folder / ADAPTER_WEIGHTS).write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    elif damage == "pickle_named_safetensors":
        import pickle

        (folder / ADAPTER_WEIGHTS).write_bytes(pickle.dumps({"lora_A": [0.0] * 64}))
    elif damage == "symlink":
        (folder / "real.safetensors").write_bytes((folder / ADAPTER_WEIGHTS).read_bytes())
        (folder / ADAPTER_WEIGHTS).unlink()
        (folder / ADAPTER_WEIGHTS).symlink_to(folder / "real.safetensors")
    elif damage == "fifo":  # would block a reader that opened it; lstat refuses it first
        (folder / LABELS_FILE).unlink()
        os.mkfifo(folder / LABELS_FILE)
    elif damage == "too_many_labels":
        (folder / LABELS_FILE).write_text(json.dumps({"labels": [f"l{i}" for i in range(9)]}))
    elif damage == "missing_key":
        _rewrite_weights(folder, lambda w: w.pop(key))
    elif damage == "extra_key":
        _rewrite_weights(folder, lambda w: w.__setitem__("base_model.model.encoder.bogus.weight", torch.zeros(2)))
    elif damage == "nan":
        _rewrite_weights(folder, lambda w: w[key].fill_(float("nan")))
    elif damage == "missing_file":
        (folder / LABELS_FILE).unlink()
    elif damage == "pickle":
        (folder / "adapter_model.bin").write_bytes(b"\x80\x04")
    elif damage == "not_lora":
        config_path.write_text(json.dumps({**config, "peft_type": "IA3"}))
    elif damage == "no_head":
        config_path.write_text(json.dumps({**config, "modules_to_save": None}))
    elif damage == "bad_target":
        config_path.write_text(json.dumps({**config, "target_modules": ["no_such_module"]}))
    with pytest.raises(AdapterError, match=match):
        manager.load_adapter(folder, "bad")
    assert manager.adapters == ["va"] and manager.active_adapter == "va"
    after, _ = _served(manager, env)
    assert torch.equal(before, after)  # the model was not touched


def test_prepare_on_another_thread_leaves_the_model_alone(env: dict, manager: AdapterManager) -> None:
    manager.load_adapter(env["a"], "va")
    manager.set_adapter("va")
    before = {k: v.clone() for k, v in manager.model.state_dict().items()}
    prepared: list = []
    worker = threading.Thread(target=lambda: prepared.append(manager.prepare(env["b"], "vb")))
    worker.start()
    probe = torch.zeros(3)  # the meta-device context of the dry run is thread-local
    worker.join()
    assert probe.device.type == "cpu"
    assert prepared[0].label_map.labels == ("x", "y", "z", "w")
    assert manager.adapters == ["va"]
    after = manager.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    manager.install(prepared[0])
    manager.set_adapter("vb")
    logits, _ = _served(manager, env)
    assert torch.allclose(logits, _fresh_logits(env, env["b"]), atol=1e-5)


def test_constant_adapter_predicts_its_label(env: dict, tmp_path: Path) -> None:
    settings = env["settings"]
    folder = build_constant_adapter(settings, ["p", "q", "r"], "q", tmp_path / "c", base=load_base(settings))
    manager = AdapterManager(load_base(settings))
    manager.load_adapter(folder, "vc")
    manager.set_adapter("vc")
    logits, _ = _served(manager, env)
    probs = torch.softmax(logits, -1)
    assert probs.argmax(-1).tolist() == [1, 1] and (probs[:, 1] > 0.99).all()
    with pytest.raises(ValueError, match="favoured label 'nope' is not in the label map"):
        build_constant_adapter(settings, ["p"], "nope", tmp_path / "d", base=load_base(settings))
