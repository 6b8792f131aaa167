"""``loraloop adapters publish --from-csv`` and ``loraloop init``: a first adapter from a labelled CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from loraloop.cli import main
from loraloop.registry import make_registry
from loraloop.settings import Settings


def _args(tmp_path: Path, base_dir: Path) -> list[str]:
    return ["--registry-url", str(tmp_path / "registry"), "--registry-pointer", "file", "--base-model", str(base_dir),
            "--label-capacity", "16", "--epochs", "1", "--max-tokens", "16", "--device", "cpu"]


def _write(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


def _registry(tmp_path: Path):
    return make_registry(Settings(registry_url=str(tmp_path / "registry"), registry_pointer="file"))


def test_init_then_publish_and_promote_the_sample(tmp_path: Path, base_dir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", str(tmp_path / "project"), "--per-label", "6"]) == 0
    out = capsys.readouterr().out
    sample = tmp_path / "project" / "sample.csv"
    assert "loraloop adapters publish --from-csv sample.csv --promote" in out and "loraloop predict" in out
    env = (tmp_path / "project" / "loraloop.env").read_text()
    assert "LORALOOP_TRANSPORT=kafka" in env and f"LORALOOP_REGISTRY_URL={tmp_path / 'project' / 'registry'}" in env
    rows = list(csv.DictReader(sample.open()))
    assert len(rows) == 72 and len({r["label"] for r in rows}) == 12
    assert main(["init", str(tmp_path / "project")]) == 1  # never overwrites without --force
    assert "--force" in capsys.readouterr().err

    assert main(["adapters", "publish", "--from-csv", str(sample), "--promote", "--json",
                 *_args(tmp_path, base_dir)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    registry = _registry(tmp_path)
    assert result["promoted"] and registry.active().version == result["version"] == result["active"]
    info = registry.show(result["version"])
    assert info.metadata["labels"] == 12 and info.status["status"] == "promoted"


def test_publish_without_promote_leaves_a_candidate(tmp_path: Path, base_dir: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    sample = _write(tmp_path / "s.csv", [["utterance", "intent"], *[[f"pay bill {i}", "billing"] for i in range(8)],
                                         *[[f"lost card {i}", "lost_card"] for i in range(8)], ["", "billing"]])
    assert main(["adapters", "publish", "--from-csv", str(sample), "--text-column", "utterance",
                 "--label-column", "intent", *_args(tmp_path, base_dir)]) == 0
    out = capsys.readouterr().out
    (info,) = _registry(tmp_path).versions()
    assert "not active; promote with: loraloop adapters promote " + info.version in out
    assert _registry(tmp_path).active().version is None and info.status["status"] == "candidate"
    assert main(["adapters", "promote", info.version, "--json", "--registry-url", str(tmp_path / "registry"),
                 "--registry-pointer", "file"]) == 0
    assert json.loads(capsys.readouterr().out)["active"] == info.version


@pytest.mark.parametrize(("rows", "message"), [
    ([], "the file is empty"),
    ([["text", "label"]], "no row with both"),
    ([["text", "label"], ["a", ""], ["", "b"]], "no row with both"),
    ([["text", "label"], *[[f"t{i}", "only"] for i in range(5)]], "only one label ('only') in 5 rows"),
    ([["text", "category"], ["t", "a"], ["u", "b"]], "missing column(s) ['label']; found ['text', 'category']"),
    ([["text", "label"], *[[f"t{i}", f"label-{i}"] for i in range(17)]], "17 labels exceed label_capacity 16"),
])
def test_bad_csvs_fail_clearly_and_publish_nothing(tmp_path: Path, base_dir: Path, rows: list[list[str]],
                                                   message: str, capsys: pytest.CaptureFixture[str]) -> None:
    sample = _write(tmp_path / "bad.csv", rows)
    code = main(["adapters", "publish", "--from-csv", str(sample), "--promote", *_args(tmp_path, base_dir)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("loraloop adapters: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert _registry(tmp_path).versions() == [] and _registry(tmp_path).active().version is None


def test_a_missing_or_binary_file_fails_clearly(tmp_path: Path, base_dir: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["adapters", "publish", "--from-csv", str(tmp_path / "nope.csv"), *_args(tmp_path, base_dir)]) == 1
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "bin.csv").write_bytes(b"text,label\n\xff\xfe\x00,a\n")
    assert main(["adapters", "publish", "--from-csv", str(tmp_path / "bin.csv"), *_args(tmp_path, base_dir)]) == 1
    assert "not a UTF-8 CSV file" in capsys.readouterr().err
    assert _registry(tmp_path).versions() == []


def test_learner_bootstrap_uses_the_same_checks(tmp_path: Path, base_dir: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    sample = _write(tmp_path / "one.csv", [["text", "label"], ["a", "x"], ["b", "x"]])
    assert main(["learner", "--bootstrap", str(sample), "--once", *_args(tmp_path, base_dir)]) == 1
    assert "only one label ('x')" in capsys.readouterr().err
    assert _registry(tmp_path).versions() == []
