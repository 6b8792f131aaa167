"""A registry that resists a writer: signed versions, dry-run checks at the door, a pointer that survives damage.

Real PEFT adapters on a tiny base model; a worker on the in-memory transport for the end-to-end refusal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from pydantic import SecretStr
from safetensors.torch import load_file, save_file

from loraloop.cli import main
from loraloop.model import ADAPTER_WEIGHTS, LABELS_FILE, METADATA_FILE
from loraloop.redact import mask_url
from loraloop.registry import AdapterRegistry, RegistryError, make_registry
from loraloop.registry import checks as registry_checks
from loraloop.registry.signing import SIGNATURE_FILE, generate_key_pair
from loraloop.settings import Settings
from loraloop.testing import build_constant_adapter
from tests.test_worker_memory import Stack, serve_until, swap_to

torch.set_num_threads(1)
LABELS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    mine = generate_key_pair(tmp_path_factory.mktemp("keys"))
    other = generate_key_pair(tmp_path_factory.mktemp("other-keys"))
    return {"private": mine[0], "public": mine[1], "other_private": other[0]}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, base_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    settings = Settings(base_model=str(base_dir), label_capacity=8)
    return {label: build_constant_adapter(settings, LABELS, label, root / label, seed=i)
            for i, label in enumerate(LABELS)}


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(**{"registry_url": str(tmp_path / "registry"), "registry_pointer": "file", "label_capacity": 8,
                       **overrides})


def _publisher(tmp_path: Path, keys: dict[str, Path]) -> AdapterRegistry:
    return make_registry(_settings(tmp_path, registry_signing_key=SecretStr(str(keys["private"]))))


def _reader(tmp_path: Path, keys: dict[str, Path]) -> AdapterRegistry:
    """A worker's view: the public key only."""
    return make_registry(_settings(tmp_path, registry_verify_key=str(keys["public"])))


def _tamper(registry: AdapterRegistry, version: str, new_weights: Path) -> None:
    """Replace a version's weights and rewrite their sha256 in metadata.json, as a writer of the registry could."""
    folder = Path(registry.root) / "versions" / version
    data = new_weights.read_bytes()
    (folder / ADAPTER_WEIGHTS).write_bytes(data)
    meta = json.loads((folder / METADATA_FILE).read_text())
    meta["files"][ADAPTER_WEIGHTS] = hashlib.sha256(data).hexdigest()
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))


def _copy(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for p in src.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


# --- signatures ----------------------------------------------------------------------------------------
def test_signed_versions_verify_and_a_tampered_one_is_refused(tmp_path: Path, keys: dict[str, Path],
                                                              adapters: dict[str, Path]) -> None:
    publisher = _publisher(tmp_path, keys)
    good, victim = publisher.publish(adapters["a"]), publisher.publish(adapters["b"])
    assert (Path(publisher.root) / "versions" / good / SIGNATURE_FILE).is_file()
    reader = _reader(tmp_path, keys)
    reader.verify(good)
    assert (reader.fetch(good, tmp_path / "cache") / ADAPTER_WEIGHTS).read_bytes() == \
        (adapters["a"] / ADAPTER_WEIGHTS).read_bytes()

    _tamper(publisher, victim, adapters["c"] / ADAPTER_WEIGHTS)
    keyless = make_registry(_settings(tmp_path))
    keyless.verify(victim)  # checksums alone are fooled: the sums were rewritten with the weights
    for call in (lambda: reader.verify(victim), lambda: reader.fetch(victim, tmp_path / "cache"),
                 lambda: reader.promote(victim), lambda: publisher.promote(victim)):
        with pytest.raises(RegistryError, match=f"version {victim}: bad signature .*metadata.json was changed"):
            call()
    assert not (tmp_path / "cache" / victim).exists()
    assert reader.active().version is None


def test_unsigned_or_foreign_signed_versions_are_refused_when_a_key_is_set(tmp_path: Path, keys: dict[str, Path],
                                                                          adapters: dict[str, Path]) -> None:
    unsigned = make_registry(_settings(tmp_path)).publish(adapters["a"])
    reader = _reader(tmp_path, keys)
    with pytest.raises(RegistryError, match=f"version {unsigned}: unsigned .*refusing an unsigned adapter"):
        reader.promote(unsigned)
    with pytest.raises(RegistryError, match="unsigned"):
        reader.fetch(unsigned, tmp_path / "cache")

    foreign = make_registry(_settings(tmp_path, registry_signing_key=SecretStr(str(keys["other_private"]))))
    theirs = foreign.publish(adapters["b"])
    with pytest.raises(RegistryError, match=r"bad signature \(signed by key '[0-9a-f]{16}', not by the configured"):
        reader.verify(theirs)

    # `adapters sign` (after its checks) makes the old unsigned version acceptable.
    _publisher(tmp_path, keys).sign(unsigned)
    reader.promote(unsigned)
    assert reader.active().version == unsigned
    with pytest.raises(RegistryError, match="no registry_signing_key"):
        reader.sign(unsigned)


def test_mismatched_or_unreadable_keys_are_clear_errors(tmp_path: Path, keys: dict[str, Path]) -> None:
    with pytest.raises(RegistryError, match="does not match registry_verify_key"):
        make_registry(_settings(tmp_path, registry_signing_key=SecretStr(str(keys["other_private"])),
                                registry_verify_key=str(keys["public"])))
    with pytest.raises(RegistryError, match="neither PEM text nor a readable file: /no/such.pem"):
        make_registry(_settings(tmp_path, registry_verify_key="/no/such.pem"))
    with pytest.raises(RegistryError, match="not a PEM public key"):
        make_registry(_settings(tmp_path, registry_verify_key="-----BEGIN PUBLIC KEY-----\nAAAA\n"))
    # PEM text works as well as a path.
    make_registry(_settings(tmp_path, registry_verify_key=keys["public"].read_text()))
    with pytest.raises(RegistryError, match="refusing to overwrite"):
        generate_key_pair(keys["private"].parent)
    assert oct(keys["private"].stat().st_mode & 0o777) == "0o600"


def test_a_worker_with_the_public_key_refuses_a_tampered_version(tmp_path: Path, base_dir: Path,
                                                                 keys: dict[str, Path]) -> None:
    stack = Stack(tmp_path, base_dir, registry_signing_key=SecretStr(str(keys["private"])))
    good = stack.registry.promote(stack.publish(LABELS, "a")).version
    victim = stack.publish(LABELS, "b")
    other = build_constant_adapter(stack.settings, LABELS, "c", tmp_path / "evil", base=stack.base, seed=99)
    _tamper(stack.registry, victim, other / ADAPTER_WEIGHTS)
    worker_view = make_registry(stack.settings.model_copy(update={
        "registry_signing_key": SecretStr(""), "registry_verify_key": str(keys["public"])}))
    with stack.worker(registry=worker_view) as worker:
        swap_to(worker, good)
        # A writer of the registry points at the tampered version without `promote`'s checks.
        stack.registry.pointer.update(lambda p: replace(p, version=victim, generation=p.generation + 1))
        serve_until(worker, lambda: stack.sample("adapter_swaps_total", outcome="failed") == 1)
        ids = stack.requests(4)
        serve_until(worker, lambda: len(stack.predictions()) == 4)
        assert worker.active_version == good
    assert sorted(p.request_id for p in stack.predictions()) == ids
    assert {(p.label, p.adapter_version) for p in stack.predictions()} == {("a", good)}


# --- dry-run checks at publish and promote -------------------------------------------------------------------
def _nan(folder: Path) -> None:
    weights = load_file(str(folder / ADAPTER_WEIGHTS))
    key = next(k for k in weights if k.endswith("lora_B.weight"))
    weights[key][0, 0] = float("nan")
    save_file(weights, str(folder / ADAPTER_WEIGHTS))


def _integer(folder: Path) -> None:
    weights = load_file(str(folder / ADAPTER_WEIGHTS))
    key = next(iter(weights))
    weights[key] = torch.zeros(2, dtype=torch.int64)
    save_file(weights, str(folder / ADAPTER_WEIGHTS))


def _wide(folder: Path) -> None:
    (folder / LABELS_FILE).write_text(json.dumps({"labels": [f"l{i}" for i in range(9)]}))


def _pickle(folder: Path) -> None:
    (folder / ADAPTER_WEIGHTS).write_bytes(pickle.dumps({"lora_A": torch.zeros(2).tolist()}))


def _symlink(folder: Path) -> None:
    target = folder.parent / f"{folder.name}-outside.safetensors"
    target.write_bytes((folder / ADAPTER_WEIGHTS).read_bytes())
    (folder / ADAPTER_WEIGHTS).unlink()
    (folder / ADAPTER_WEIGHTS).symlink_to(target)


def _fifo(folder: Path) -> None:
    (folder / LABELS_FILE).unlink()
    os.mkfifo(folder / LABELS_FILE)


DAMAGES = [
    (_nan, r"lora_B\.weight holds NaN or infinite values"),
    (_integer, r"has dtype torch\.int64, expected floating point"),
    (_wide, r"9 labels, the head has 8 slots \(label_capacity\)"),
    (_pickle, r"adapter_model\.safetensors is not a safetensors file \(header length \d+ does not fit"),
    (_symlink, r"adapter_model\.safetensors is a symbolic link, not a regular file"),
    (_fifo, r"labels\.json is a FIFO, not a regular file"),
]


def _promptly(call, seconds: float = 10.0) -> BaseException | None:
    """Run ``call`` on a thread and return what it raised; fail if it blocks (a FIFO opened for reading)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - returned to the test
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert outcome, f"blocked for {seconds} s"
    assert time.monotonic() - started < seconds
    return outcome[0]


@pytest.mark.parametrize(("damage", "reason"), DAMAGES, ids=[d.__name__.strip("_") for d, _ in DAMAGES])
def test_publish_refuses_what_a_worker_would_refuse(tmp_path: Path, keys: dict[str, Path],
                                                     adapters: dict[str, Path], damage, reason: str) -> None:
    registry = _publisher(tmp_path, keys)
    folder = _copy(adapters["a"], tmp_path / "src")
    damage(folder)
    error = _promptly(lambda: registry.publish(folder))
    assert isinstance(error, RegistryError) and re.search(reason, str(error)), error
    assert registry.versions() == [] and registry.active().version is None


@pytest.mark.parametrize(("damage", "reason"), DAMAGES, ids=[d.__name__.strip("_") for d, _ in DAMAGES])
def test_promote_and_verify_refuse_a_damaged_version(tmp_path: Path, adapters: dict[str, Path], damage,
                                                     reason: str) -> None:
    """Damage planted in a published version (with its sha256 rewritten, so only the content checks catch it)."""
    registry = make_registry(_settings(tmp_path))
    good = registry.promote(registry.publish(adapters["a"])).version
    victim = registry.publish(adapters["b"])
    folder = Path(registry.root) / "versions" / victim
    damage(folder)
    meta = json.loads((folder / METADATA_FILE).read_text())
    for name in meta["files"]:
        if (folder / name).is_file() and not (folder / name).is_symlink():
            meta["files"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    for call in (lambda: registry.verify(victim), lambda: registry.promote(victim),
                 lambda: registry.fetch(victim, tmp_path / "cache")):
        error = _promptly(call)
        assert isinstance(error, RegistryError) and re.search(reason, str(error)), error
    assert registry.active().version == good and registry.active().generation == 1


def test_size_bounds_are_checked_before_reading(tmp_path: Path, adapters: dict[str, Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    registry = make_registry(_settings(tmp_path))
    version = registry.publish(adapters["a"])
    size = (adapters["a"] / ADAPTER_WEIGHTS).stat().st_size
    monkeypatch.setattr(registry_checks, "MAX_WEIGHTS_BYTES", size - 1)
    with pytest.raises(RegistryError, match=f"adapter_model.safetensors is {size} bytes, over the {size - 1}-byte"):
        registry.publish(adapters["a"])
    with pytest.raises(RegistryError, match="over the"):
        registry.promote(version)


def test_a_planted_directory_is_refused(tmp_path: Path, adapters: dict[str, Path]) -> None:
    registry = make_registry(_settings(tmp_path))
    version = registry.publish(adapters["a"])
    (Path(registry.root) / "versions" / version / "extra").mkdir()
    with pytest.raises(RegistryError, match="extra is a directory, not a regular file"):
        registry.verify(version)


def test_cli_verify_and_promote_print_the_reason(tmp_path: Path, adapters: dict[str, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    registry = make_registry(_settings(tmp_path))
    version = registry.publish(adapters["a"])
    argv = ["--registry-url", registry.url, "--registry-pointer", "file", "--label-capacity", "8"]
    assert main(["adapters", "verify", version, *argv]) == 0
    assert f"ok: {version}" in capsys.readouterr().out
    folder = Path(registry.root) / "versions" / version
    (folder / LABELS_FILE).unlink()
    os.mkfifo(folder / LABELS_FILE)
    assert main(["adapters", "promote", version, *argv]) == 1
    assert "labels.json is a FIFO, not a regular file" in capsys.readouterr().err


def test_cli_keygen_then_signed_publish(tmp_path: Path, adapters: dict[str, Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["adapters", "keygen", str(tmp_path / "k")]) == 0
    out = capsys.readouterr().out
    assert "LORALOOP_REGISTRY_SIGNING_KEY=" in out and "BEGIN" not in out  # paths printed, never the key
    registry = make_registry(_settings(tmp_path, registry_signing_key=SecretStr(str(tmp_path / "k" /
                                                                                     "registry-signing.pem"))))
    version = registry.publish(adapters["a"])
    argv = ["--registry-url", registry.url, "--registry-pointer", "file", "--label-capacity", "8",
            "--registry-verify-key", str(tmp_path / "k" / "registry-verify.pem")]
    assert main(["adapters", "promote", version, *argv]) == 0
    assert main(["adapters", "keygen", str(tmp_path / "k")]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err


# --- the pointer file -------------------------------------------------------------------------------------
def test_a_garbage_pointer_falls_back_to_its_last_good_copy(tmp_path: Path, adapters: dict[str, Path],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    registry = make_registry(_settings(tmp_path))
    v1, v2, v3 = (registry.publish(adapters[label]) for label in LABELS)
    registry.promote(v1)
    before = registry.promote(v2)
    pointer_file = Path(registry.root) / "pointer.json"
    assert json.loads((Path(registry.root) / "pointer.json.last-good").read_text())["version"] == v2
    for garbage in (b"\x00garbage{", b"[1, 2]", b'{"version": 7, "generation": 2}', b'{"generation": -1}'):
        pointer_file.write_bytes(garbage)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="loraloop.registry.pointer"):
            assert make_registry(_settings(tmp_path)).active() == before
        assert any("REGISTRY POINTER" in r.getMessage() and "last good copy" in r.getMessage()
                   for r in caplog.records)
    after = registry.promote(v3)  # promote works again and rewrites a good file
    assert (after.version, after.generation, after.history) == (v3, 3, (v1, v2))
    assert json.loads(pointer_file.read_text())["version"] == v3
    assert make_registry(_settings(tmp_path)).rollback().version == v2

    pointer_file.unlink()  # a deleted pointer file too
    assert make_registry(_settings(tmp_path)).active().version == v2


def test_a_pointer_damaged_with_its_copy_is_a_clear_error_and_ids_stay_unique(tmp_path: Path,
                                                                            adapters: dict[str, Path]) -> None:
    registry = make_registry(_settings(tmp_path))
    v1 = registry.promote(registry.publish(adapters["a"])).version
    root = Path(registry.root)
    (root / "pointer.json").write_text("{")
    (root / "pointer.json.last-good").write_text("nope")
    with pytest.raises(RegistryError, match=r"pointer.json is damaged .* last good copy .* is damaged too"):
        registry.active()
    with pytest.raises(RegistryError, match="restore one of them"):
        registry.promote(v1)
    (root / "pointer.json").unlink()
    (root / "pointer.json.last-good").unlink()  # the operator starts an empty history
    v2 = registry.publish(adapters["b"])
    assert int(v2[1:7]) > int(v1[1:7])  # the sequence continues from the versions on disk


# --- masking -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("url", "masked"), [
    ("redis://:hunter2@cache:6379/0", "redis://:***@cache:6379/0"),
    ("rediss://app:hunter2@cache:6380/1", "rediss://app:***@cache:6380/1"),
    ("s3://AKIAX:wJalrXUtn@bucket/registry", "s3://AKIAX:***@bucket/registry"),
    ("https://ghp_0123456789abcdefghijkl@host/x", "https://***@host/x"),
    ("s3://bucket/reg?secret_access_key=abc&region=eu", "s3://bucket/reg?secret_access_key=%2A%2A%2A&region=eu"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("./loraloop-registry", "./loraloop-registry"),
    ("redis://:pw@host:notaport/0", "redis://:***@host:notaport/0"),
    ("", ""),
])
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_status_and_registry_logs_mask_credentials(tmp_path: Path, adapters: dict[str, Path],
                                                   capsys: pytest.CaptureFixture[str],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    url = "memory://user:s3cr3t@bucket/registry"
    with caplog.at_level(logging.INFO, logger="loraloop.registry"):
        registry = make_registry(Settings(registry_url=url, registry_pointer="file", label_capacity=8))
        registry.promote(registry.publish(adapters["a"]))
    assert caplog.records and not any("s3cr3t" in r.getMessage() for r in caplog.records)
    assert any("user:***@bucket" in r.getMessage() for r in caplog.records)
    # The Redis copy is never read by `status`: it works (and masks) with Redis unreachable.
    argv = ["--registry-url", url, "--registry-pointer", "redis", "--redis-url", "redis://:hunter2@127.0.0.1:9/0"]
    for extra in ([], ["--json"]):
        assert main(["status", *extra, *argv]) == 0
        out = capsys.readouterr().out
        assert "s3cr3t" not in out and "hunter2" not in out
        assert "user:***@bucket" in out and ":***@127.0.0.1:9" in out
