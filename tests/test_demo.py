"""``loraloop demo`` end to end, small: on embedded defaults and on real Kafka and Redis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraloop.demo.run import Demo, DemoConfig
from loraloop.settings import Settings
from loraloop.testing import save_tiny_base_model

SUMMARY_KEYS = {"requests", "feedback_events", "promotions", "rejections", "rollbacks", "accuracy_initial",
                "accuracy_final", "new_label_accuracy_initial", "new_label_accuracy_final",
                "old_label_accuracy_initial", "old_label_accuracy_final", "duration_s"}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_base_model(tmp_path_factory.mktemp("tiny") / "base")


def _run(settings: Settings, out: Path, **config: object) -> dict:
    cfg = DemoConfig(out=out, requests=400, rate=200.0, bootstrap_per_label=10, max_test=200, **config)
    demo = Demo(settings, cfg)
    summary = demo.run()
    joined = sum(demo.metrics.registry.get_sample_value("loraloop_feedback_events_total",
                                                        {"kind": k, "outcome": "joined"}) or 0
                 for k in ("label", "thumbs_up", "thumbs_down"))
    assert joined == summary["feedback_events"], "every event was joined to its served request and buffered"
    assert SUMMARY_KEYS <= set(summary)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "accuracy.png").stat().st_size > 10_000
    assert summary["requests"] == 400, "every request got a prediction and was judged once"
    assert 100 <= summary["feedback_events"] <= 300  # half of them, by the simulated users
    for key in SUMMARY_KEYS - {"requests", "feedback_events", "promotions", "rejections", "rollbacks", "duration_s"}:
        assert 0.0 <= summary[key] <= 1.0
    assert summary["new_label_accuracy_initial"] == 0.0  # the first adapter cannot name labels it never saw
    return summary


def test_demo_on_embedded_defaults_with_a_csv(tiny_base: Path, tmp_path: Path) -> None:
    from loraloop.demo.data import generate_intents

    data = tmp_path / "data.csv"
    data.write_text("utterance,intent\n" + "".join(f'"{t}",{y}\n' for t, y in generate_intents(60, seed=3)))
    settings = Settings(base_model=str(tiny_base), label_capacity=16, cycle_min_feedback=80, epochs=1)
    summary = _run(settings, tmp_path / "out", dataset=str(data), text_column="utterance", label_column="intent")
    assert summary["promotions"] + summary["rejections"] >= 1, "the learner ran at least one cycle"


def test_demo_rejects_a_csv_without_the_columns(tiny_base: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.csv"
    data.write_text("text,category\nhello,greet\n")
    with pytest.raises(ValueError, match="missing column"):
        Demo(Settings(base_model=str(tiny_base)), DemoConfig(out=tmp_path / "out", dataset=str(data))).run()


@pytest.mark.integration
def test_demo_on_real_kafka_and_redis(tiny_base: Path, kafka_settings, redis_url: str, tmp_path: Path) -> None:
    settings = kafka_settings(base_model=str(tiny_base), redis_url=redis_url, label_capacity=16,
                              cycle_min_feedback=80, epochs=1)
    _run(settings, tmp_path / "out")  # feedback joined over Kafka against the request log in Redis


def test_a_reused_output_folder_counts_only_this_runs_cycles(tiny_base: Path, tmp_path: Path) -> None:
    settings = Settings(base_model=str(tiny_base), label_capacity=16, cycle_min_feedback=80, epochs=1)
    first = _run(settings, tmp_path / "out")
    second = _run(settings, tmp_path / "out")
    cycles = Demo(settings, DemoConfig(out=tmp_path / "out")).settings.registry_url
    from loraloop.registry import make_registry

    recorded = [c["outcome"] for c in make_registry(settings.model_copy(update={"registry_url": cycles})).cycles()]
    assert recorded.count("promoted") + recorded.count("rejected") == (
        first["promotions"] + first["rejections"] + second["promotions"] + second["rejections"])


@pytest.mark.parametrize("share", [0.2, 1.0])
def test_simulated_users_flip_the_poison_share_of_judged_predictions(share: float) -> None:
    from loraloop.demo.scenario import SimulatedUsers

    users = SimulatedUsers(["a", "b", "c"], feedback_fraction=1.0, noise=0.0, seed=3, poison_target="c",
                           poison_share=share)
    verdicts = [users.judge("a", "a") for _ in range(2000)]
    flipped = sum(v == ("label", "c") for v in verdicts) / len(verdicts)
    assert flipped == pytest.approx(share, abs=0.03)
    users.poison_target = None
    assert all(users.judge("a", "a") != ("label", "c") for _ in range(200))  # the burst is over
