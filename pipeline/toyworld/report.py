"""Human-readable output of the toy-world metrics: a text table and the identity-by-segment plot."""

from __future__ import annotations

import math
import os
from pathlib import Path

_ROWS = (
    ("background", "backdrop colour and pattern, per segment"),
    ("presence", "character on stage is drawn"),
    ("color", "colour as introduced"),
    ("shape", "shape as introduced"),
    ("size", "size as introduced"),
    ("identity", "colour + shape + size, every segment"),
    ("identity_recall", "identity after the introduction (memory)"),
    ("consistency", "later looks equal the look drawn at intro"),
    ("motion", "motion matches the action"),
)


def format_table(summary: dict) -> str:
    """The summary from `metrics.summarize` as a fixed-width table (accuracy, count, chance, meaning)."""
    lines = [f"{'check':<16}{'accuracy':>9}{'n':>8}{'chance':>8}  meaning", "-" * 78]
    for key, meaning in _ROWS:
        value, count = summary[key], summary["counts"][key]
        chance = summary["chance"].get(key)
        accuracy = "-" if math.isnan(value) else f"{100 * value:.1f}%"
        chance_text = f"{100 * chance:.1f}%" if chance is not None else ""
        lines.append(f"{key:<16}{accuracy:>9}{count:>8}{chance_text:>8}  {meaning}")
    lines.append(f"{summary['videos']} videos, {summary['segments']} segments")
    return "\n".join(lines)


def plot_identity(summaries: dict[str, dict], path: str | os.PathLike) -> Path:
    """Plots identity accuracy against segment index for each labelled summary, with the chance level.

    Solid: every character on stage; dashed: only after its introduction (what needs memory). Written as PNG
    under a temporary name, then renamed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    for i, (label, summary) in enumerate(summaries.items()):
        color = f"C{i}"
        x = range(1, len(summary["identity_by_segment"]) + 1)
        ax.plot(x, [100 * v for v in summary["identity_by_segment"]], "-o", color=color, ms=3,
                label=f"{label}: identity")
        ax.plot(x, [100 * v for v in summary["identity_recall_by_segment"]], "--", color=color,
                label=f"{label}: after introduction")
    chance = 100 * next(iter(summaries.values()))["chance"]["identity"]
    ax.axhline(chance, color="gray", lw=1, ls=":", label=f"chance ({chance:.1f}%)")
    ax.set_xlabel("segment (3 s each)")
    ax.set_ylabel("identity accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
