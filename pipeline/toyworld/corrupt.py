"""Deliberately wrong renders of a story, to validate the metrics and to give them a measured floor.

Each corruption keeps the storyboard's texts and changes what is drawn: a character's colour in one segment, two
characters' looks swapped from a segment on, a scene's backdrop, one move played in the opposite direction.
`targets` names the checks the metrics must fail. The memoryless baseline draws every character that the
current segment's text does not describe with a random look, as a model without memory across segments would.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from .checks import VideoResult
from .render import render_story
from .world import (
    BACKDROP_COLORS,
    COLORS,
    PATTERNS,
    SHAPES,
    SIZES,
    Action,
    Appearance,
    Backdrop,
    Story,
    feasible,
    on_stage,
    plan,
)

KINDS = ("color", "swap", "background", "reverse", "memoryless")
_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


@dataclass
class Corruption:
    """A story to render with changed looks/backdrops/actions, and the checks that must then fail.

    targets: (segment index, character name) for character checks, (segment index, None) for the backdrop.
    check: the CharacterResult attribute that must be False for each target ("background_ok" for backdrops).
    """

    kind: str
    story: Story
    check: str | None
    targets: list[tuple[int, str | None]] = field(default_factory=list)
    looks: list[dict[str, Appearance]] | None = None
    backdrops: list[Backdrop] | None = None

    def render(self, size: int = 64) -> np.ndarray:
        """The corrupted video, uint8 (24 n + 1, size, size, 3)."""
        return render_story(self.story, size, self.looks, self.backdrops)

    def detected(self, result: VideoResult) -> list[bool]:
        """For every target, whether the metrics flagged it."""
        return detected(result, self.check, self.targets)


def detected(result: VideoResult, check: str | None, targets: list[tuple[int, str | None]]) -> list[bool]:
    """For every target (segment, character or None for the backdrop), whether `check` failed in `result`."""
    flags = []
    for index, name in targets:
        segment = result.segments[index]
        if name is None:
            flags.append(not segment.background_ok)
        else:
            character = next(c for c in segment.characters if c.name == name)
            flags.append(not getattr(character, check))
    return flags


def _on_stage(story: Story) -> list[list[str]]:
    """Everyone seen in each segment: present at its start, then entering."""
    return [on_stage(state, seg) for state, seg in zip(plan(story), story.segments)]


def corrupt(story: Story, kind: str, rng: np.random.Generator) -> Corruption | None:
    """A random corruption of `kind` (one of KINDS) of `story`, or None when the story has no room for it
    (no two characters together for "swap", no move for "reverse")."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    return {"color": _wrong_color, "swap": _swap, "background": _wrong_backdrop, "reverse": _reverse,
            "memoryless": _memoryless}[kind](story, rng)


def _wrong_color(story: Story, rng: np.random.Generator) -> Corruption:
    pairs = [(i, n) for i, names in enumerate(_on_stage(story)) for n in names]
    index, name = pairs[rng.integers(len(pairs))]
    unused = [c for c in COLORS if c not in {a.color for a in story.cast.values()}]
    looks: list[dict[str, Appearance]] = [{} for _ in story.segments]
    old = story.cast[name]
    looks[index][name] = Appearance(old.shape, str(rng.choice(unused)), old.size)
    return Corruption("color", story, "color_ok", [(index, name)], looks=looks)


def _swap(story: Story, rng: np.random.Generator) -> Corruption | None:
    stage = _on_stage(story)
    pairs = [(i, names) for i, names in enumerate(stage) if len(names) >= 2]
    if not pairs:
        return None
    index, names = pairs[rng.integers(len(pairs))]
    a, b = (str(n) for n in rng.choice(names, 2, replace=False))
    looks: list[dict[str, Appearance]] = [{} for _ in story.segments]
    for i in range(index, len(story.segments)):
        looks[i] = {a: story.cast[b], b: story.cast[a]}
    return Corruption("swap", story, "identity_ok", [(index, a), (index, b)], looks=looks)


def _wrong_backdrop(story: Story, rng: np.random.Generator) -> Corruption:
    scene = int(rng.integers(len(story.backdrops)))
    old = story.backdrops[scene]
    choices = [Backdrop(c, p) for c in BACKDROP_COLORS for p in PATTERNS if Backdrop(c, p) != old]
    backdrops = list(story.backdrops)
    backdrops[scene] = choices[rng.integers(len(choices))]
    targets = [(i, None) for i, seg in enumerate(story.segments) if seg.scene == scene]
    return Corruption("background", story, None, targets, backdrops=backdrops)


def _reverse(story: Story, rng: np.random.Generator) -> Corruption | None:
    moves = [(i, n) for i, seg in enumerate(story.segments) for n, a in seg.actions.items() if a.kind == "move"]
    for k in rng.permutation(len(moves)):
        index, name = moves[k]
        changed = copy.deepcopy(story)
        old = changed.segments[index].actions[name]
        changed.segments[index].actions[name] = Action("move", _OPPOSITE[old.direction])
        states = plan(changed)
        scene = changed.segments[index].scene
        if all(feasible(changed.cast, states[i], seg) for i, seg in enumerate(changed.segments)
               if seg.scene == scene and i >= index):
            return Corruption("reverse", changed, "motion_ok", [(index, name)])
    return None


def _memoryless(story: Story, rng: np.random.Generator) -> Corruption:
    looks: list[dict[str, Appearance]] = []
    introduced: set[str] = set()
    for names, seg in zip(_on_stage(story), story.segments):
        described = {n for n, a in seg.actions.items() if a.kind == "enter" and n not in introduced}
        introduced |= described
        taken = {story.cast[n].color for n in described}
        segment_looks = {}
        for name in names:
            if name in described:
                continue
            color = str(rng.choice([c for c in COLORS if c not in taken]))  # characters stay tellable apart
            taken.add(color)
            segment_looks[name] = Appearance(str(rng.choice(SHAPES)), color, str(rng.choice(list(SIZES))))
        looks.append(segment_looks)
    return Corruption("memoryless", story, None, looks=looks)
