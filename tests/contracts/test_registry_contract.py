"""One contract for the adapter registry, run against each pointer store: memory, file and real Redis.

``registry`` is an indirect fixture: a factory of registry *clients* that all name the same
registry (same URL, same pointer store), so that "another client" (another worker, the
learner, the CLI) can be simulated by calling it twice. The memory store uses a
``memory://`` fsspec URL (so the object-store publishing path runs too); file and Redis use
a local folder, so two processes can share them.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import save as safetensors_save

from loraloop.model import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LABELS_FILE, METADATA_FILE
from loraloop.registry import AdapterRegistry, RegistryError, check_version_name, make_registry
from loraloop.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
BAD_NAMES = ["../../etc", "../../etc/passwd", "v000001-20260101T000000-a1b2c3/../../x", "/etc", "", ".", "..",
             "v1", "v000001-20260101T000000-A1B2C3", "v000001-20260101T000000-a1b2c3\n"]

MakeRegistry = Callable[[], AdapterRegistry]


def _settings(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    if kind == "memory":
        return Settings(registry_url=f"memory://registry-{uuid.uuid4().hex[:8]}", registry_pointer="file",
                        adapter_poll_s=0.5)
    if kind == "file":
        return Settings(registry_url=str(tmp_path / "registry"), registry_pointer="file", adapter_poll_s=0.5)
    return Settings(registry_url=str(tmp_path / "registry"), registry_pointer="redis",
                    redis_url=request.getfixturevalue("redis_url"), adapter_poll_s=0.5)


@pytest.fixture(params=["memory", "file", pytest.param("redis", marks=pytest.mark.integration)])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> MakeRegistry:
    """``registry()``: a new client of this test's registry (every call names the same one)."""
    settings = _settings(request.param, request, tmp_path)
    clients: list[AdapterRegistry] = []

    def make() -> AdapterRegistry:
        clients.append(make_registry(settings))
        return clients[-1]

    make.settings = settings  # type: ignore[attr-defined]
    make.kind = request.param  # type: ignore[attr-defined]
    yield make
    for client in clients:
        close = getattr(getattr(client.pointer, "client", None), "close", None)
        if close is not None:
            close()


def _adapter(folder: Path, tag: str = "a", extra: dict[str, bytes] | None = None) -> Path:
    """A small adapter folder the registry's checks accept (real safetensors, a LoRA config, labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    seed = int(hashlib.sha256(tag.encode()).hexdigest()[:8], 16)
    weights = {"lora_A": torch.randn(2, 4, generator=torch.Generator().manual_seed(seed))}
    files = {ADAPTER_WEIGHTS: safetensors_save(weights),
             ADAPTER_CONFIG: json.dumps({"peft_type": "LORA", "modules_to_save": ["classifier"]}).encode(),
             LABELS_FILE: json.dumps({"labels": ["x", tag]}).encode(), **(extra or {})}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _stored_path(reg: AdapterRegistry, version: str, name: str) -> str:
    return f"{reg.root}/versions/{version}/{name}"


def _flip_byte(reg: AdapterRegistry, path: str, at: int = 10) -> None:
    with reg.fs.open(path, "rb") as f:
        data = bytearray(f.read())
    data[at] ^= 0x01
    with reg.fs.open(path, "wb") as f:
        f.write(bytes(data))


# --- publishing ------------------------------------------------------------------------------
def test_publish_makes_an_immutable_version_with_metadata(registry: MakeRegistry, tmp_path: Path) -> None:
    reg = registry()
    src = _adapter(tmp_path / "src")
    before = time.time()
    v1 = reg.publish(src, metadata={"metrics": {"accuracy": 0.9}, "window": [1, 2]})
    v2 = reg.publish(_adapter(tmp_path / "src2", "b"), parent=v1)

    info = reg.show(v1)
    assert check_version_name(v1) == v1
    assert info.version == v1 and info.parent is None
    assert before - 1 <= info.created_at <= time.time() + 1
    assert info.metadata["metrics"] == {"accuracy": 0.9} and info.metadata["window"] == [1, 2]
    expected = {n: hashlib.sha256((src / n).read_bytes()).hexdigest() for n in (ADAPTER_WEIGHTS, ADAPTER_CONFIG,
                                                                                  LABELS_FILE)}
    assert info.metadata["files"] == expected
    assert reg.show(v2).parent == v1
    assert [v.version for v in registry().versions()] == [v1, v2]  # another client sees both, oldest first

    # The source changing afterwards does not touch the published version.
    (src / ADAPTER_WEIGHTS).write_bytes(b"changed after publishing")
    reg.verify(v1)
    fetched = reg.fetch(v1, tmp_path / "cache")
    assert fetched.name == v1
    assert hashlib.sha256((fetched / ADAPTER_WEIGHTS).read_bytes()).hexdigest() == expected[ADAPTER_WEIGHTS]
    assert json.loads((fetched / METADATA_FILE).read_text())["version"] == v1


def test_publish_refuses_an_unknown_parent_or_an_incomplete_folder(registry: MakeRegistry, tmp_path: Path) -> None:
    reg = registry()
    with pytest.raises(RegistryError, match="unknown adapter version 'v000099-20260101T000000-abcdef'"):
        reg.publish(_adapter(tmp_path / "a"), parent="v000099-20260101T000000-abcdef")
    incomplete = _adapter(tmp_path / "b")
    (incomplete / LABELS_FILE).unlink()
    with pytest.raises(RegistryError, match=r"missing \['labels.json'\]"):
        reg.publish(incomplete)
    assert reg.versions() == []


def test_version_ids_are_never_reused(registry: MakeRegistry, tmp_path: Path) -> None:
    src = _adapter(tmp_path / "src")
    first, second = registry().publish(src), registry().publish(src)  # the same folder, two clients
    assert first != second
    ids: list[str] = []
    errors: list[BaseException] = []

    def publish_some() -> None:
        try:
            client = registry()
            ids.extend(client.publish(src) for _ in range(5))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=publish_some) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    every = [first, second, *ids]
    assert len(set(every)) == len(every) == 22
    assert len({v.split("-")[0] for v in every}) == 22  # sequence numbers are unique too
    assert sorted(v.version for v in registry().versions()) == sorted(every)


@pytest.mark.parametrize("name", ["adapter_model.bin", "pytorch_model.pt", "weights.PKL"])
def test_pickled_weights_are_refused_at_publish(registry: MakeRegistry, tmp_path: Path, name: str) -> None:
    reg = registry()
    with pytest.raises(RegistryError, match=f"refusing pickled weight file.*{name}"):
        reg.publish(_adapter(tmp_path / "src", extra={name: b"\x80\x04pickle"}))
    assert reg.versions() == []


# --- the active pointer ------------------------------------------------------------------------
def test_promote_rollback_and_history(registry: MakeRegistry, tmp_path: Path) -> None:
    reg = registry()
    v1, v2, v3 = (reg.publish(_adapter(tmp_path / t, t)) for t in "abc")
    assert reg.active().version is None and reg.active().generation == 0

    assert reg.promote(v1).generation == 1
    reg.promote(v2, reason="better")
    pointer = reg.promote(v3)
    assert (pointer.version, pointer.generation, pointer.history) == (v3, 3, (v1, v2))
    assert reg.promote(v3).generation == 3  # already active: no change, no new generation

    other = registry()
    assert other.active() == pointer
    back = other.rollback(reason="p99 too high")
    assert (back.version, back.generation, back.history) == (v2, 4, (v1,))
    assert back.reason == "rollback: p99 too high"
    assert reg.rollback().version == v1
    assert reg.active().history == ()

    reg.promote(v2)
    reg.promote(v3)
    to = reg.rollback(to=v1)
    assert (to.version, to.history) == (v1, ())  # rolled back past v2: the history is cut there
    assert reg.active().generation == 8


def test_rollback_with_no_history_is_a_clear_error(registry: MakeRegistry, tmp_path: Path) -> None:
    reg = registry()
    with pytest.raises(RegistryError, match="no previous version to roll back to .*active: None"):
        reg.rollback()
    v1 = reg.publish(_adapter(tmp_path / "a"))
    reg.promote(v1)
    with pytest.raises(RegistryError, match=f"no previous version to roll back to .*active: '{v1}'"):
        registry().rollback()
    assert (reg.active().version, reg.active().generation) == (v1, 1)  # unchanged by the refusal
    with pytest.raises(RegistryError, match="unknown adapter version"):
        reg.rollback(to="v000042-20260101T000000-abcdef")


def test_a_corrupted_version_is_refused(registry: MakeRegistry, tmp_path: Path) -> None:
    reg = registry()
    good = reg.publish(_adapter(tmp_path / "good", "g"))
    bad = reg.publish(_adapter(tmp_path / "bad", "b"))
    reg.promote(good)
    _flip_byte(reg, _stored_path(reg, bad, ADAPTER_WEIGHTS))

    with pytest.raises(RegistryError, match=f"version {bad}: checksum mismatch for {ADAPTER_WEIGHTS}"):
        reg.verify(bad)
    with pytest.raises(RegistryError, match="checksum mismatch"):
        reg.fetch(bad, tmp_path / "cache")
    assert not (tmp_path / "cache" / bad).exists()
    cache = tmp_path / "cache"
    assert not cache.exists() or [p.name for p in cache.iterdir()] == []  # no temporary copy left behind
    with pytest.raises(RegistryError, match="checksum mismatch"):
        registry().promote(bad)
    assert reg.active().version == good and reg.active().generation == 1
    reg.verify(good)


def test_extra_or_pickled_files_planted_in_a_version_are_refused(registry: MakeRegistry, tmp_path: Path) -> None:
    reg = registry()
    v = reg.publish(_adapter(tmp_path / "a"))
    with reg.fs.open(_stored_path(reg, v, "adapter_model.bin"), "wb") as f:
        f.write(b"\x80\x04pickle")
    with pytest.raises(RegistryError, match=r"refusing pickled weight file\(s\) \['adapter_model.bin'\]"):
        reg.fetch(v, tmp_path / "cache")
    reg.fs.rm(_stored_path(reg, v, "adapter_model.bin"))
    with reg.fs.open(_stored_path(reg, v, "notes.txt"), "wb") as f:
        f.write(b"hello")
    with pytest.raises(RegistryError, match=r"unexpected files \['notes.txt'\]"):
        reg.verify(v)


def test_a_damaged_local_copy_is_fetched_again(registry: MakeRegistry, tmp_path: Path) -> None:
    reg = registry()
    v = reg.publish(_adapter(tmp_path / "a"))
    copy = reg.fetch(v, tmp_path / "cache")
    original = (copy / ADAPTER_WEIGHTS).read_bytes()
    (copy / ADAPTER_WEIGHTS).write_bytes(b"tampered")
    again = reg.fetch(v, tmp_path / "cache")
    assert again == copy and (again / ADAPTER_WEIGHTS).read_bytes() == original


@pytest.mark.parametrize("name", BAD_NAMES)
def test_version_names_that_escape_the_root_are_refused(registry: MakeRegistry, tmp_path: Path, name: str) -> None:
    reg = registry()
    reg.promote(reg.publish(_adapter(tmp_path / "a")))
    before = reg.active()
    dest = tmp_path / "deep" / "cache"
    for call in (lambda: reg.show(name), lambda: reg.verify(name), lambda: reg.fetch(name, dest),
                 lambda: reg.promote(name), lambda: reg.rollback(to=name), lambda: reg.mark_rejected(name, {})):
        with pytest.raises(RegistryError, match="invalid adapter version name"):
            call()
    assert reg.active() == before
    assert not (tmp_path / "etc").exists() and not dest.exists()


def test_unknown_but_well_formed_version_is_refused(registry: MakeRegistry, tmp_path: Path) -> None:
    reg = registry()
    with pytest.raises(RegistryError, match="unknown adapter version 'v000007-20260101T000000-abcdef'"):
        reg.promote("v000007-20260101T000000-abcdef")
    with pytest.raises(RegistryError, match="unknown adapter version"):
        reg.fetch("v000007-20260101T000000-abcdef", tmp_path / "cache")


# --- concurrency ---------------------------------------------------------------------------------
def _check_consistent(observed: list[tuple[int, str]], final_generation: int, history: tuple[str, ...]) -> None:
    """Every generation names one version, none is skipped or lost, and the history replays them."""
    by_generation: dict[int, set[str]] = {}
    for generation, version in observed:
        by_generation.setdefault(generation, set()).add(version)
    assert all(len(v) == 1 for v in by_generation.values()), "two promotions got the same generation"
    assert sorted(by_generation) == list(range(1, final_generation + 1)), "an update was lost"
    sequence = [next(iter(by_generation[g])) for g in range(1, final_generation + 1)]
    assert list(history) == sequence[:-1][-50:]


def test_concurrent_promotes_from_threads_stay_consistent(registry: MakeRegistry, tmp_path: Path) -> None:
    versions = [registry().publish(_adapter(tmp_path / t, t)) for t in "abcd"]
    observed: list[tuple[int, str]] = []
    errors: list[BaseException] = []

    def promote_many(offset: int) -> None:
        client = registry()
        last = 0
        try:
            for i in range(15):
                pointer = client.promote(versions[(offset + i) % len(versions)], reason=f"thread {offset}")
                assert pointer.generation >= last, "generation went backwards"
                last = pointer.generation
                observed.append((pointer.generation, pointer.version))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=promote_many, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    final = registry().active()
    assert final.generation >= 15
    _check_consistent(observed, final.generation, final.history)


_PROMOTER = """
import json, sys
from loraloop.registry import make_registry
from loraloop.settings import Settings
settings = Settings.model_validate_json(sys.argv[1])
reg = make_registry(settings)
versions = json.loads(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()  # "go": both processes promote at the same time
out = []
for i in range(int(sys.argv[3])):
    p = reg.promote(versions[i % len(versions)], reason="process")
    out.append([p.generation, p.version])
print(json.dumps(out))
"""


def test_concurrent_promotes_from_two_processes_stay_consistent(registry: MakeRegistry, tmp_path: Path) -> None:
    if registry.kind == "memory":  # type: ignore[attr-defined]
        pytest.skip("a memory:// registry lives in one process")
    versions = [registry().publish(_adapter(tmp_path / t, t)) for t in "abc"]
    settings = registry.settings.model_dump_json(include={"registry_url", "registry_pointer", "redis_url",  # type: ignore[attr-defined]
                                                          "adapter_poll_s"})
    procs = [subprocess.Popen([sys.executable, "-c", _PROMOTER, settings, json.dumps(versions[k:] + versions[:k]),
                               "100"], cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for k in range(2)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    observed: list[tuple[int, str]] = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        pairs = [tuple(p) for p in json.loads(out)]
        assert [g for g, _ in pairs] == sorted(g for g, _ in pairs), "generation went backwards"
        observed.extend(pairs)
    final = registry().active()
    _check_consistent(observed, final.generation, final.history)


def test_wait_for_change_wakes_within_2s_of_a_promote_by_another_client(registry: MakeRegistry,
                                                                       tmp_path: Path) -> None:
    promoter, watcher = registry(), registry()
    v1, v2 = (promoter.publish(_adapter(tmp_path / t, t)) for t in "ab")
    promoter.promote(v1)
    generation = watcher.active().generation

    started = time.monotonic()
    assert watcher.wait_for_change(generation, timeout=0.3).generation == generation  # nothing changed
    assert 0.25 <= time.monotonic() - started < 2.0

    result: dict[str, object] = {}

    def wait() -> None:
        result["pointer"] = watcher.wait_for_change(generation, timeout=10)
        result["at"] = time.monotonic()

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.3)
    promoted_at = time.monotonic()
    promoter.promote(v2)
    thread.join(10)
    assert result["pointer"].version == v2  # type: ignore[union-attr]
    assert result["at"] - promoted_at < 2.0  # type: ignore[operator]


# --- fsspec URLs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_registry_on_an_fsspec_url(tmp_path: Path, scheme: str) -> None:
    url = (f"memory://fsspec-{uuid.uuid4().hex[:8]}/registry" if scheme == "memory"
           else f"file://{tmp_path / 'url-registry'}")
    reg = make_registry(Settings(registry_url=url, registry_pointer="file"))
    src = _adapter(tmp_path / "src")
    v1 = reg.publish(src)
    v2 = reg.publish(src, parent=v1)
    fetched = reg.fetch(v2, tmp_path / "cache")
    assert (fetched / ADAPTER_WEIGHTS).read_bytes() == (src / ADAPTER_WEIGHTS).read_bytes()
    reg.promote(v1)
    reg.promote(v2)
    again = make_registry(Settings(registry_url=url, registry_pointer="file"))
    assert [v.version for v in again.versions()] == [v1, v2]
    assert again.rollback().version == v1
    fs, root = fsspec.core.url_to_fs(url)
    assert fs.exists(f"{root.rstrip('/')}/versions/{v1}/{ADAPTER_WEIGHTS}")
    if scheme == "file":
        assert (tmp_path / "url-registry" / "versions" / v1 / METADATA_FILE).is_file()
