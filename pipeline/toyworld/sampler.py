"""The story sampler: random casts, scenes, backdrops and actions that keep everyone inside the frame and apart."""

from __future__ import annotations

import numpy as np

from .text import dense_segment_text, segment_text
from .world import (
    BACKDROP_COLORS,
    COLORS,
    DIRECTIONS,
    NAMES,
    PATTERNS,
    SCENE_CHANGE_PROB,
    SHAPES,
    SIZES,
    Action,
    Appearance,
    Backdrop,
    Segment,
    StageState,
    Story,
    advance,
    feasible,
    on_stage,
)


def sample_story(seed: int, min_segments: int = 1, max_segments: int = 21) -> Story:
    """A random story with between `min_segments` and `max_segments` segments, fully determined by `seed`."""
    if not 1 <= min_segments <= max_segments:
        raise ValueError(f"segments: expected 1 <= min_segments <= max_segments, got {min_segments}, {max_segments}")
    rng = np.random.default_rng(seed)
    n_segments = int(rng.integers(min_segments, max_segments + 1))
    n_cast = int(rng.integers(1, 4))
    names = [str(n) for n in rng.choice(NAMES, n_cast, replace=False)]
    colors = rng.choice(list(COLORS), n_cast, replace=False)
    cast = {
        n: Appearance(str(rng.choice(SHAPES)), str(c), str(rng.choice(list(SIZES)))) for n, c in zip(names, colors)
    }
    scene_of = np.cumsum([0] + [int(rng.random() < SCENE_CHANGE_PROB) for _ in range(n_segments - 1)])
    backdrops: list[Backdrop] = []
    for _ in range(int(scene_of[-1]) + 1):
        while True:
            b = Backdrop(str(rng.choice(list(BACKDROP_COLORS))), str(rng.choice(PATTERNS)))
            if not backdrops or (b.color != backdrops[-1].color and b.pattern != backdrops[-1].pattern):
                break
        backdrops.append(b)
    segments, state, introduced = [], StageState({}), []
    for i in range(n_segments):
        scene_start = bool(i == 0 or scene_of[i] != scene_of[i - 1])
        if scene_start:
            state = StageState({})
        segment = _sample_segment(rng, cast, state, int(scene_of[i]), scene_start, set(introduced))
        segment.text = segment_text(segment, cast, backdrops[segment.scene], set(introduced), rng)
        segment.dense_text = dense_segment_text(segment, cast, backdrops[segment.scene], on_stage(state, segment),
                                                segment.text)
        introduced += [n for n, a in segment.actions.items() if a.kind == "enter" and n not in introduced]
        segments.append(segment)
        state = advance(cast, state, segment)
    # A short story may not reach every sampled character: the cast is who appears, in order of introduction.
    title = introduced[0] if len(introduced) == 1 else ", ".join(introduced[:-1]) + " and " + introduced[-1]
    return Story(seed=seed, title=title, cast={n: cast[n] for n in introduced}, backdrops=backdrops,
                 segments=segments)


def _sample_segment(rng: np.random.Generator, cast: dict[str, Appearance], state: StageState, scene: int,
                    scene_start: bool, introduced: set[str]) -> Segment:
    present = list(state.positions)
    absent = [n for n in cast if n not in state.positions]
    new = [n for n in absent if n not in introduced]
    for _ in range(50):
        if scene_start:
            pool = new if new and rng.random() < 0.7 else absent
            actors = [str(rng.choice(pool))]
        else:
            pool = present + absent
            k = 2 if len(pool) >= 2 and rng.random() < 0.4 else 1
            actors = [str(n) for n in rng.choice(pool, k, replace=False)]
            if new and rng.random() < 0.3 and not any(a in new for a in actors):
                actors[0] = str(rng.choice(new))  # bring in characters not seen yet
            if sum(a in new for a in actors) > 1:
                actors = actors[:1]  # one introduction per segment keeps the text short
        actions = {a: _sample_action(rng, cast[a], a in state.positions) for a in actors}
        leaving = sum(a.kind == "leave" for a in actions.values())
        entering = sum(a.kind == "enter" for a in actions.values())
        sides = [a.direction for a in actions.values() if a.kind == "enter"]
        if len(set(sides)) < len(sides):
            continue  # two newcomers from one side could not be told apart from the text
        if len(present) - leaving + entering < 1:
            continue  # someone stays on stage
        pan = 0
        if not leaving and not entering and rng.random() < 0.2:
            pan = int(rng.choice([-1, 1]))
        segment = Segment(scene=scene, scene_start=scene_start, actions=actions, pan=pan)
        if feasible(cast, state, segment):
            return segment
    return Segment(scene=scene, scene_start=scene_start, actions={present[0]: Action("rest")})


_ACTION_WEIGHTS = {"move": 4.0, "jump": 2.0, "spin": 1.5, "grow": 1.0, "shrink": 1.0, "rest": 1.0, "leave": 0.8}


def _sample_action(rng: np.random.Generator, appearance: Appearance, on_stage: bool) -> Action:
    if not on_stage:
        side = str(rng.choice(["left", "right"]))
        x = rng.uniform(0.25, 0.5) if side == "left" else rng.uniform(0.5, 0.75)
        y = rng.uniform(0.3, 0.78)
        return Action("enter", side, target=(round(float(x), 4), round(float(y), 4)))
    kinds = [k for k in _ACTION_WEIGHTS if not (k == "spin" and appearance.shape == "circle")]
    weights = np.array([_ACTION_WEIGHTS[k] for k in kinds])
    kind = str(rng.choice(kinds, p=weights / weights.sum()))
    if kind == "move":
        return Action("move", str(rng.choice(list(DIRECTIONS))))
    if kind == "leave":
        return Action("leave", str(rng.choice(["left", "right"])))
    if kind == "jump":
        return Action("jump", count=int(rng.choice([1, 2])))
    return Action(kind)
