"""Human-readable output of the toy-world metrics: a text table and the identity-by-segment plot."""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import numpy as np

from ..atomic import atomic_path

_ROWS = (
    ("background", "backdrop colour and pattern, per segment"),
    ("background_recall", "backdrop after the scene's first segment"),
    ("presence", "character on stage is drawn"),
    ("color", "colour as introduced"),
    ("color_intro", "colour where the character is introduced"),
    ("color_recall", "colour after the introduction (memory)"),
    ("shape", "shape as introduced"),
    ("size", "size as introduced"),
    ("identity", "colour + shape + size, every segment"),
    ("identity_intro", "identity where the character is introduced"),
    ("identity_recall", "identity after the introduction (memory)"),
    ("consistency", "later looks equal the look drawn at intro"),
    ("motion", "motion matches the action"),
    ("continuity", "still in place just after a segment boundary"),
    ("continuity_inside", "the same, mid-segment (no boundary)"),
)


def format_table(summary: dict) -> str:
    """The summary from `checks.summarize` as a fixed-width table (accuracy, count, chance, meaning)."""
    lines = [f"{'check':<18}{'accuracy':>9}{'n':>8}{'chance':>8}  meaning", "-" * 80]
    for key, meaning in _ROWS:
        value, count = summary[key], summary["counts"][key]
        chance = summary["chance"].get(key)
        accuracy = "-" if math.isnan(value) else f"{100 * value:.1f}%"
        chance_text = f"{100 * chance:.1f}%" if chance is not None else ""
        lines.append(f"{key:<18}{accuracy:>9}{count:>8}{chance_text:>8}  {meaning}")
    lines.append(f"{summary['videos']} videos, {summary['segments']} segments")
    return "\n".join(lines)


def _percent(values: list[float | None]) -> np.ndarray:
    """Percentages; None (a summary read back from JSON) or NaN where a segment index had nothing to count."""
    return np.array([np.nan if v is None else 100.0 * v for v in values])


def plot_identity(summaries: dict[str, dict], path: str | os.PathLike) -> Path:
    """Plots identity accuracy against segment index for each labelled summary, with the chance level.

    Solid: every character on stage; dashed: only after its introduction (what needs memory). Written as PNG
    under a temporary name, then renamed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    path = Path(path)
    fig, ax = plt.subplots(figsize=(8.5, 3.6), dpi=100)
    for i, (label, summary) in enumerate(summaries.items()):
        color = f"C{i}"
        x = range(1, len(summary["identity_by_segment"]) + 1)
        ax.plot(x, _percent(summary["identity_by_segment"]), "-o", color=color, ms=3, label=f"{label}: identity")
        ax.plot(x, _percent(summary["identity_recall_by_segment"]), "--", color=color,
                label=f"{label}: after introduction")
    chance = 100 * next(iter(summaries.values()))["chance"]["identity"]
    ax.axhline(chance, color="gray", lw=1, ls=":", label=f"chance ({chance:.1f}%)")
    ax.set_xlabel("segment (3 s each)")
    ax.set_ylabel("identity accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def plot_story(frames: np.ndarray, texts: list[str], path: str | os.PathLike, per_segment: int = 3) -> Path:
    """A frame strip: one row per segment, `per_segment` frames from its start to its end, then its text.

    frames: (24 n + 1, H, W, 3) uint8; texts: the n segment texts. Written as PNG (temporary name, then renamed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .world import segment_frames

    path = Path(path)
    rows = len(texts)
    fig = plt.figure(figsize=(1.0 * per_segment + 4.6, 1.05 * rows), dpi=100)
    for i, text in enumerate(texts):
        start, stop = segment_frames(i)
        for j, t in enumerate(np.linspace(start, stop - 1, per_segment).round().astype(int)):
            ax = fig.add_axes((j / (per_segment + 4.6), 1 - (i + 1) / rows + 0.05 / rows, 0.95 / (per_segment + 4.6),
                               0.9 / rows))
            ax.imshow(frames[t], interpolation="nearest")
            ax.set_axis_off()
            if j == 0:
                ax.text(-4, frames.shape[1] / 2, str(i + 1), ha="right", va="center", fontsize=9)
        fig.text((per_segment + 0.15) / (per_segment + 4.6), 1 - (i + 0.5) / rows, textwrap.fill(text, 52),
                 va="center", fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
