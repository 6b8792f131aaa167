"""``loraloop adapters list|show|promote|rollback`` and ``loraloop status`` against a file registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraloop.cli import main
from loraloop.registry import make_registry
from loraloop.settings import Settings
from loraloop.testing import build_constant_adapter, save_tiny_base_model

torch.set_num_threads(1)
REPO_ROOT = Path(__file__).resolve().parents[1]
LABELS = ["balance", "card_lost", "refund"]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three real PEFT adapter folders on a tiny base, each predicting its own label."""
    root = tmp_path_factory.mktemp("cli-adapters")
    settings = Settings(base_model=str(save_tiny_base_model(root / "base")), label_capacity=8)
    return {label: build_constant_adapter(settings, LABELS, label, root / label, seed=i)
            for i, label in enumerate(LABELS)}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LORALOOP_"):
            monkeypatch.delenv(name)


@pytest.fixture()
def registry_url(tmp_path: Path) -> str:
    return str(tmp_path / "registry")


@pytest.fixture()
def versions(registry_url: str, adapter_dirs: dict[str, Path]) -> list[str]:
    registry = make_registry(Settings(registry_url=registry_url, registry_pointer="file"))
    first = registry.publish(adapter_dirs["balance"], metadata={"metrics": {"accuracy": 0.812}})
    second = registry.publish(adapter_dirs["card_lost"], parent=first)
    third = registry.publish(adapter_dirs["refund"], parent=second)
    return [first, second, third]


def run(capsys: pytest.CaptureFixture[str], registry_url: str, *argv: str) -> tuple[int, str, str]:
    """``loraloop <argv> --registry-url ... --registry-pointer file``: (exit code, stdout, stderr)."""
    code = main([*argv, "--registry-url", registry_url, "--registry-pointer", "file"])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_show_promote_rollback_status(capsys: pytest.CaptureFixture[str], registry_url: str,
                                           versions: list[str]) -> None:
    first, second, third = versions
    code, out, _ = run(capsys, registry_url, "adapters", "list")
    assert code == 0
    rows = out.splitlines()[1:]
    assert [row.split()[0] for row in rows] == versions  # oldest first, none active yet
    assert "accuracy=0.812" in rows[0] and first in rows[1]  # metrics shown; parent column

    code, out, _ = run(capsys, registry_url, "adapters", "show", second)
    shown = json.loads(out)
    assert code == 0 and shown["metadata"]["version"] == second and shown["metadata"]["parent"] == first
    assert set(shown["metadata"]["files"]) == {"adapter_model.safetensors", "adapter_config.json", "labels.json"}

    for version in versions:
        code, out, _ = run(capsys, registry_url, "adapters", "promote", version, "--reason", "cli test")
        assert code == 0 and version in out
    code, out, _ = run(capsys, registry_url, "adapters", "list")
    active = [row for row in out.splitlines() if row.startswith("*")]
    assert len(active) == 1 and third in active[0]

    code, out, _ = run(capsys, registry_url, "adapters", "rollback", "--reason", "too slow")
    assert code == 0 and out.strip() == f"active: {second} (generation 4)"

    code, out, _ = run(capsys, registry_url, "status", "--json")
    state = json.loads(out)
    assert code == 0
    assert (state["active"], state["generation"], state["history"], state["versions"]) == (second, 4, [first], 3)
    assert state["reason"] == "rollback: too slow" and state["registry"] == registry_url

    code, out, _ = run(capsys, registry_url, "adapters", "rollback", "--to", first)
    assert code == 0 and first in out
    code, out, _ = run(capsys, registry_url, "status")
    assert code == 0 and f"active:     {first}" in out and "history:    (empty)" in out


def test_status_shows_what_the_screen_set_aside(capsys: pytest.CaptureFixture[str], registry_url: str,
                                                versions: list[str]) -> None:
    registry = make_registry(Settings(registry_url=registry_url, registry_pointer="file"))
    registry.record_cycle({"outcome": "promoted", "version": versions[1], "reason": "holdout 0.8 -> 0.9",
                           "screened": {"card_lost": 30, "top_up": 4}, "screened_ids": ["e1"]})
    registry.record_cycle({"outcome": "rejected", "version": versions[2], "reason": "worse on the holdout"})
    code, out, _ = run(capsys, registry_url, "status")
    lines = [line for line in out.splitlines() if line.startswith("cycle:")]
    assert code == 0 and len(lines) == 2
    assert lines[0].endswith("holdout 0.8 -> 0.9 [screen set aside 30 card_lost, 4 top_up]")
    assert lines[1].endswith("worse on the holdout")


def test_rollback_with_no_history_fails_clearly(capsys: pytest.CaptureFixture[str], registry_url: str,
                                                versions: list[str]) -> None:
    code, out, err = run(capsys, registry_url, "adapters", "rollback")
    assert code == 1 and out == ""
    assert "loraloop adapters: no previous version to roll back to" in err
    run(capsys, registry_url, "adapters", "promote", versions[0])
    code, _, err = run(capsys, registry_url, "adapters", "rollback")
    assert code == 1 and f"active: '{versions[0]}', empty history" in err


@pytest.mark.parametrize("action", [["show"], ["promote"], ["rollback", "--to"]])
@pytest.mark.parametrize("version", ["v000099-20260101T000000-abcdef", "../../etc"])
def test_unknown_or_malformed_versions_fail_clearly(capsys: pytest.CaptureFixture[str], registry_url: str,
                                                    versions: list[str], action: list[str], version: str) -> None:
    code, out, err = run(capsys, registry_url, "adapters", *action, version)
    assert code == 1 and out == ""
    expected = "unknown adapter version" if version.startswith("v") else "invalid adapter version name"
    assert err.startswith("loraloop adapters: ") and expected in err and repr(version) in err
    code, out, _ = run(capsys, registry_url, "status", "--json")
    assert json.loads(out)["generation"] == 0  # nothing changed


def test_a_corrupted_version_is_not_promoted(capsys: pytest.CaptureFixture[str], registry_url: str,
                                             versions: list[str]) -> None:
    weights = Path(registry_url) / "versions" / versions[1] / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, _, err = run(capsys, registry_url, "adapters", "promote", versions[1])
    assert code == 1 and "checksum mismatch for adapter_model.safetensors" in err


@pytest.mark.parametrize(("argv", "expected"), [
    (["adapters", "--help"], ["list", "show", "promote", "rollback"]),
    (["worker", "--help"], ["--max-batch", "--max-wait-ms", "--requests-topic", "--predictions-topic",
                            "--registry-url", "--kafka-bootstrap", "LORALOOP_"]),
    (["status", "--help"], ["--json", "--registry-url"]),
    (["--help"], ["worker", "adapters", "status"]),
])
def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str], argv: list[str], expected: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for word in expected:
        assert word in out, f"{word!r} missing from `loraloop {' '.join(argv)}`"


def test_adapters_without_an_action_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["adapters"])
    assert exit_info.value.code == 2 and "ACTION" in capsys.readouterr().err


def test_console_script_status_json(capsys: pytest.CaptureFixture[str], registry_url: str,
                                    versions: list[str]) -> None:
    """The installed ``loraloop`` command, settings from LORALOOP_* variables."""
    script = Path(sys.executable).parent / "loraloop"
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable}")
    assert run(capsys, registry_url, "adapters", "promote", versions[2])[0] == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORALOOP_")}
    env.update(LORALOOP_REGISTRY_URL=registry_url, LORALOOP_REGISTRY_POINTER="file", LORALOOP_LOG_LEVEL="ERROR")
    status = subprocess.run([str(script), "status", "--json"], env=env, cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["active"] == versions[2]
    failed = subprocess.run([str(script), "adapters", "rollback"], env=env, cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)
    assert failed.returncode == 1 and "no previous version to roll back to" in failed.stderr
