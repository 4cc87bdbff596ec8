"""The demo's storyboard editor: table rows <-> Storyboard, row editing, the summary line and the bundled examples."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from ..storyboard import (
    DEFAULT_MAX_SEGMENTS,
    SEGMENT_SECONDS,
    Segment,
    Storyboard,
    StoryboardError,
    count_problems,
    load_storyboard,
)

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
STORYBOARD_SUFFIXES = (".json", ".yaml", ".yml", ".txt")
COLUMNS = ["text", "new scene", "negative text", "keep"]
MAX_TEXT_CHARS = 1000  # about 250 T5 tokens, past the 226 CogVideoX reads; the pipeline checks the exact budget




def storyboard_from_rows(rows: list[list[Any]] | None, title: str | None = None, negative_text: str | None = None,
                         max_segments: int | None = DEFAULT_MAX_SEGMENTS,
                         max_text_chars: int = MAX_TEXT_CHARS) -> Storyboard:
    """The editor's table as a validated Storyboard; raises StoryboardError with one line per problem.

    rows: [text, new scene, negative text] per segment, as gr.Dataframe(type="array") passes them. Blank rows at the
    end are ignored (the table keeps an empty row for typing); "new scene" on the first row is ignored (nothing to cut
    from). Segment places are "row N", so the pipeline's own errors (e.g. the token budget) name the row too.
    """
    cells = [row_cells(row) for row in rows or []]
    while cells and not cells[-1][0] and not cells[-1][2]:
        cells.pop()
    problems = []
    segments = []
    for i, (text, new_scene, negative) in enumerate(cells, start=1):
        if not text:
            problems.append(f"row {i}: no text; write what happens in this segment, or remove the row")
        for name, value in (("text", text), ("negative text", negative)):
            if len(value) > max_text_chars:
                problems.append(f"row {i} {name}: {len(value)} characters; the limit is {max_text_chars}")
        segments.append(Segment(text=text, negative_text=negative or None, scene_start=new_scene and i > 1,
                                place=f"row {i}"))
    title, negative_text = (title or "").strip(), (negative_text or "").strip()
    for name, value in (("title", title), ("negative text for every segment", negative_text)):
        if len(value) > max_text_chars:
            problems.append(f"{name}: {len(value)} characters; the limit is {max_text_chars}")
    if not segments:
        problems.append("the storyboard is empty; write at least one segment")
    else:
        problems += count_problems(len(segments), max_segments)
    if problems:
        raise StoryboardError(problems)
    return Storyboard(segments=segments, title=title or None, negative_text=negative_text or None).validate(
        max_segments)


def rows_from_storyboard(storyboard: Storyboard) -> list[list[Any]]:
    """The editor's table for a storyboard: [text, new scene, negative text, keep] per segment (keep unticked)."""
    return [[s.text, s.scene_start, s.negative_text or "", False] for s in storyboard.segments]


def kept_rows(rows: list[list[Any]] | None) -> list[int]:
    """0-based rows ticked "keep" (the 4th cell; absent counts as not ticked), among the rows that
    `storyboard_from_rows` turns into segments."""
    cells = [row_cells(row) for row in rows or []]
    while cells and not cells[-1][0] and not cells[-1][2]:
        cells.pop()
    return [i for i, row in enumerate((rows or [])[: len(cells)]) if _ticked(list(row)[3] if len(row) > 3 else False)]


def edit_table(rows: list[list[Any]] | None, selected: int | None, action: str) -> tuple[list[list[Any]], int | None]:
    """The editor's row buttons. action: "add" (an empty row after the selected one, else at the end), "remove",
    "up", "down" (the selected row) or "clear" (one empty row). Returns the new rows and the new selected index
    (None: nothing selected); the table never becomes empty, so there is always a row to type into."""
    if action not in ("add", "remove", "up", "down", "clear"):
        raise ValueError(f"action: expected add, remove, up, down or clear, got {action!r}")
    rows = [list(row) for row in rows or []]
    row = selected if selected is not None and 0 <= selected < len(rows) else None
    if action == "add":
        row = len(rows) if row is None else row + 1
        rows.insert(row, ["", False, "", False])
    elif action == "remove" and row is not None:
        del rows[row]
        row = min(row, len(rows) - 1) if rows else None
    elif action == "up" and row is not None and row > 0:
        rows[row - 1], rows[row] = rows[row], rows[row - 1]
        row -= 1
    elif action == "down" and row is not None and row + 1 < len(rows):
        rows[row + 1], rows[row] = rows[row], rows[row + 1]
        row += 1
    elif action == "clear":
        rows, row = [], None
    return rows or [["", False, "", False]], row


def storyboard_summary(rows: list[list[Any]] | None, max_segments: int | None) -> str:
    """One line for the editor: segments, seconds and scenes of the non-blank rows, and what is over a limit."""
    cells = [row_cells(row) for row in rows or []]
    while cells and not cells[-1][0] and not cells[-1][2]:
        cells.pop()
    n = len(cells)
    scenes = 1 + sum(1 for _, new_scene, _ in cells[1:] if new_scene) if n else 0
    text = (f"**{n} segment{'s' * (n != 1)} · {format_seconds(n * SEGMENT_SECONDS)} · "
            f"{scenes} scene{'s' * (scenes != 1)}**")
    if max_segments is not None and n > max_segments:
        text += f" — over the limit of {max_segments} segments ({format_seconds(max_segments * SEGMENT_SECONDS)})"
    blank = [str(i) for i, (t, _, _) in enumerate(cells, start=1) if not t]
    if blank:
        text += f" — row{'s' * (len(blank) > 1)} {', '.join(blank)} without text"
    return text


def example_choices(examples_dir: Path = EXAMPLES_DIR) -> list[tuple[str, str]]:
    """(label, file name) of every storyboard file in examples_dir; the label shows the title when there is one."""
    choices = []
    for path in sorted(examples_dir.glob("*")) if examples_dir.is_dir() else []:
        if path.suffix.lower() not in STORYBOARD_SUFFIXES:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                storyboard = load_storyboard(path, max_segments=None)
        except StoryboardError:
            logger.warning("skipping example %s: not a valid storyboard", path)
            continue
        label = f"{storyboard.title} ({path.name})" if storyboard.title not in (None, path.stem) else path.name
        choices.append((f"{label}, {format_seconds(storyboard.duration_seconds)}", path.name))
    return choices


def row_cells(row: list[Any]) -> tuple[str, bool, str]:
    """(text, new scene, negative text) of one table row, whatever the browser sent for empty cells."""
    row = list(row) + [None] * (3 - len(row))
    text, new_scene, negative = row[:3]
    return ("" if text is None else str(text).strip(), _ticked(new_scene),
            "" if negative is None else str(negative).strip())


def _ticked(value: Any) -> bool:
    """A checkbox cell, whatever the browser sent."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "y", "x")
    return bool(value)


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 and seconds != int(seconds) else f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if rest else f"{minutes} min"
