"""The demo's picture: rolling live accuracy with promotion, rejection and rollback markers."""

from __future__ import annotations

from pathlib import Path

from loraloop.demo.scenario import PHASES, rolling


def plot_accuracy(path: Path, correct: list[bool], phases: list[int], is_new: list[bool],
                  events: list[tuple[int, str, str]], window: int = 200, title: str = "loraloop demo") -> Path:
    """Write a PNG of rolling prequential accuracy.

    Args:
        path: PNG file to write.
        correct: per request, in arrival order, whether its live prediction was right.
        phases: per request, its scenario phase (0, 1, 2).
        is_new: per request, whether its true label is one of the new labels.
        events: (request index, kind, text) with kind in promoted / rejected / rolled_back.
        window: requests in the rolling mean.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    x = list(range(len(correct)))
    ax.plot(x, rolling([float(c) for c in correct], window), color="black", lw=2, label=f"all labels (rolling {window})")
    for flag, color, name in ((False, "tab:blue", "known labels"), (True, "tab:purple", "new labels")):
        idx = [i for i in x if is_new[i] == flag]
        if idx:
            ax.plot(idx, rolling([float(correct[i]) for i in idx], max(20, window // 2)), color=color, lw=1.2,
                    alpha=0.85, label=name)
    for phase in (1, 2):
        if phase in phases:
            ax.axvline(phases.index(phase), color="grey", ls=":", lw=1)
    for i, phase_name in enumerate(PHASES):
        if i in phases:
            ax.text(phases.index(i) + 5, 1.02, phase_name, fontsize=8, color="grey")
    style = {"promoted": ("tab:green", "^", "promotion"), "rejected": ("tab:orange", "x", "rejected by gate"),
             "rolled_back": ("tab:red", "v", "rolled back by guard")}
    seen: set[str] = set()
    for index, kind, _version in events:
        color, marker, name = style.get(kind, ("grey", "o", kind))
        ax.axvline(index, color=color, alpha=0.35, lw=1)
        ax.plot([index], [0.03], marker=marker, color=color, ms=9, ls="none",
                label=None if kind in seen else name)
        seen.add(kind)
    ax.set_ylim(0, 1.08)
    ax.set_xlim(0, max(1, len(correct)))
    ax.set_xlabel("request (arrival order)")
    ax.set_ylabel("live accuracy (judged against the true label)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
