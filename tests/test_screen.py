"""The learner's feedback screen (learner.screen): what it flags and, above all, what it leaves alone."""

from __future__ import annotations

from learner.screen import Judged, screen


def _rows(label: str, n: int, contested: int, prefix: str | None = None) -> list[Judged]:
    prefix = prefix or label
    return [Judged(f"{prefix}{i}", label, "other" if i < contested else label) for i in range(n)]


def _honest(labels: str = "abcdefgh", n: int = 20, contested: int = 2) -> list[Judged]:
    return [row for label in labels for row in _rows(label, n, contested)]


def _known(labels: str, rows: int = 20, errors: int = 0) -> list[tuple[str, str]]:
    """Reference rows on which the live version gets ``labels`` right (but ``errors`` of each)."""
    return [(label, "other" if i < errors else label) for label in labels for i in range(rows)]


KNOWN = _known("abcdefgh")


def test_a_burst_onto_one_label_is_flagged_and_only_its_contested_rows_are_suspect() -> None:
    result = screen(_honest() + _rows("t", 30, 27), reference=KNOWN + _known("t"), alpha=0.001, min_share=0.5)
    assert set(result.flagged) == {"t"}
    assert result.suspect == {f"t{i}" for i in range(27)}  # its 3 uncontested rows are used as usual
    assert "t: 27/30 contested" in result.reason


def test_users_who_mostly_correct_mistakes_raise_every_label_alike_and_nothing_is_flagged() -> None:
    rows = _honest(n=20, contested=16) + _rows("t", 20, 18)
    assert screen(rows, reference=KNOWN + _known("t"), alpha=0.001, min_share=0.5).flagged == {}


def test_a_label_the_live_version_often_gets_wrong_is_judged_against_its_own_error_rate() -> None:
    reference = _known("x", errors=12) + _known("y") + _known("a")
    reference = [(label, "other" if label == "x" and i < 12 else label) for i, (label, _) in enumerate(reference)]
    rows = _honest(n=20, contested=1) + _rows("x", 20, 12) + _rows("y", 20, 12)
    result = screen(rows, reference, alpha=0.001, min_share=0.5)
    assert set(result.flagged) == {"y"}  # x's 60% is its usual error rate; y's is not


def test_a_contested_minority_is_not_flagged_however_significant() -> None:
    rows = _honest(n=200, contested=5) + _rows("t", 200, 80)  # 40% against 2.5% elsewhere
    reference = _known("abcdefgh") + _known("t", rows=100)
    assert screen(rows, reference, alpha=0.001, min_share=0.5).flagged == {}
    assert set(screen(rows, reference, alpha=0.001, min_share=0.3).flagged) == {"t"}


def test_a_few_rows_among_many_labels_are_not_enough() -> None:
    rows = [row for label in "abcdefghijklmnopqrstuvwxyz" for row in _rows(label, 10, 1)] + _rows("t", 3, 3)
    assert screen(rows, _known("abcdefghijklmnopqrstuvwxyz"), alpha=0.001, min_share=0.5).flagged == {}


def test_alpha_zero_turns_the_screen_off() -> None:
    assert screen(_honest() + _rows("t", 30, 30), reference=KNOWN + _known("t"), alpha=0, min_share=0.5).suspect == set()


def test_a_young_label_corrected_50_times_all_contested_is_not_flagged() -> None:
    """A label first fitted from one example: the live version files its texts elsewhere, as a burst's would."""
    rows = _honest() + _rows("young", 50, 50)
    for reference in ([], KNOWN + [("young", "young")], KNOWN + [("young", "other")] * 6):
        assert screen(rows, reference, alpha=0.001, min_share=0.5).flagged == {}, reference


def test_the_same_burst_on_a_label_known_at_95_percent_on_its_reference_rows_is_flagged() -> None:
    rows = _honest() + _rows("t", 50, 50)
    result = screen(rows, KNOWN + _known("t", rows=20, errors=1), alpha=0.001, min_share=0.5)
    assert set(result.flagged) == {"t"} and len(result.suspect) == 50


def test_a_label_is_known_from_five_reference_rows_all_right_not_from_four() -> None:
    rows = _honest() + _rows("t", 50, 50)
    assert set(screen(rows, KNOWN + _known("t", rows=5), alpha=0.001, min_share=0.5).flagged) == {"t"}
    assert screen(rows, KNOWN + _known("t", rows=4), alpha=0.001, min_share=0.5).flagged == {}
