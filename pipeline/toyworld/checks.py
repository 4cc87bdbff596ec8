"""Scoring a toy-world video against its storyboard, from what pipeline/toyworld/tracking.py finds in it.

1. Per segment: the backdrop; per character on stage: presence, colour, shape and size, and whether its motion
   matches the text's action. Identity = colour, shape and size all as introduced.
2. Per character, consistency: its appearance in each later segment equals what was drawn at its introduction.
   Continuity: a character on stage across a boundary inside a scene is still where it was one latent frame later.
3. `summarize`: the accuracy of every check over videos, by segment, with the chance levels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .text import Script, ScriptSegment, parse_storyboard
from .tracking import (
    ENTRY_ZONE,
    NEUTRAL_PHASE,
    Observation,
    Pixels,
    appearance_frames,
    classify_backdrop,
    find_blobs,
    observe_appearance,
    shape_scores,
    track_characters,
)
from .world import (
    BACKDROP_COLORS,
    COLORS,
    DIRECTIONS,
    FRAMES_PER_SEGMENT,
    GROW,
    JUMP,
    MOVE,
    PAN,
    PATTERNS,
    SHAPES,
    SHRINK,
    SIZES,
    Action,
    Appearance,
    Backdrop,
    num_frames,
    segment_frames,
)

CONTINUITY_FRAMES = 4  # one latent frame of the VAE (4x temporal compression)
# of the frame (x in widths, y in heights): the world's fastest motion (a hop) over CONTINUITY_FRAMES stays inside
CONTINUITY_RADIUS = 0.2
_LOOKS = len(SHAPES) * len(COLORS) * len(SIZES)
CHANCE = {
    "background": 1.0 / (len(BACKDROP_COLORS) * len(PATTERNS)),
    "background_recall": 1.0 / (len(BACKDROP_COLORS) * len(PATTERNS)),
    "identity": 1.0 / _LOOKS,
    "identity_intro": 1.0 / _LOOKS,
    "identity_recall": 1.0 / _LOOKS,
    "consistency": 1.0 / _LOOKS,
    "color": 1.0 / len(COLORS),
    "color_intro": 1.0 / len(COLORS),
    "color_recall": 1.0 / len(COLORS),
    "shape": 1.0 / len(SHAPES),
    "size": 1.0 / len(SIZES),
}
"""What a model drawing a uniformly random look in every segment scores per check (1/48 for a whole look)."""


@dataclass
class CharacterResult:
    """One character in one segment. observed is None when it was not found."""

    name: str
    action: str
    named: bool
    introduced_here: bool
    expected: Appearance
    observed: Appearance | None
    present: bool
    color_ok: bool
    shape_ok: bool
    size_ok: bool
    motion_ok: bool
    consistent: bool | None = None  # same look as drawn at its introduction; None in the introducing segment
    # still where it was CONTINUITY_FRAMES frames after the previous segment's last frame (across the boundary) and
    # over the same span in the middle of this segment (inside); None unless it was on stage and found in the
    # previous segment's last frame, in the same scene
    continuous: bool | None = None
    continuous_inside: bool | None = None

    @property
    def identity_ok(self) -> bool:
        return self.present and self.color_ok and self.shape_ok and self.size_ok


@dataclass
class SegmentResult:
    index: int
    scene: int
    expected_backdrop: Backdrop
    observed_backdrop: Backdrop
    characters: list[CharacterResult] = field(default_factory=list)

    @property
    def background_ok(self) -> bool:
        return self.expected_backdrop == self.observed_backdrop


@dataclass
class VideoResult:
    title: str
    segments: list[SegmentResult]


def _window(seg: ScriptSegment) -> tuple[int, int, np.ndarray]:
    """Frames [first, stop) used to judge a segment and their phases s (shape (frames,)).

    A segment inside a scene is judged from the previous segment's last frame (s = 0), where its action starts.
    """
    start, stop = segment_frames(seg.index)
    first = start - 1 if seg.index > 0 and not seg.scene_start else start
    return first, stop, (np.arange(first, stop) - (stop - FRAMES_PER_SEGMENT - 1)) / FRAMES_PER_SEGMENT


def score_video(frames: np.ndarray, storyboard: dict | Script) -> VideoResult:
    """Scores one video against its storyboard.

    frames: (24 n + 1, H, W, 3) uint8 at 8 fps for a storyboard of n segments. storyboard: the storyboard dict
    (`{"title", "scenes": [{"segments": [{"text"}]}]}`), an object with `to_dict()` returning one, or a parsed
    `Script`. Returns a VideoResult: per segment the backdrop check and, for every character on stage, its
    presence, appearance, motion and consistency checks.
    """
    script = storyboard if isinstance(storyboard, Script) else parse_storyboard(
        storyboard.to_dict() if hasattr(storyboard, "to_dict") else storyboard)
    frames = np.asarray(frames)
    expected = num_frames(len(script.segments))
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames: expected uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[0] != expected:
        raise ValueError(f"frames: a storyboard of {len(script.segments)} segments needs {expected} frames "
                         f"(24 per segment + 1 at 8 fps), got {frames.shape[0]}")
    height, width = frames.shape[1:3]
    pixels = Pixels.of(frames)
    blobs = find_blobs(pixels.labels)
    tracks = track_characters(script, blobs, height)

    results = []
    for seg in script.segments:
        first, stop, s = _window(seg)
        start = segment_frames(seg.index)[0]
        votes = [classify_backdrop(frames[t], pixels.labels[t]) for t in (start, (start + stop) // 2, stop - 1)]
        observed = max(votes, key=votes.count)
        result = SegmentResult(seg.index, seg.scene, seg.backdrop, observed)
        for name in seg.on_stage():
            character = _check_character(seg, name, script.cast[name], tracks[name], pixels, first, stop, s)
            before = script.segments[seg.index - 1] if not seg.scene_start else None
            if before is not None and name in before.on_stage() and tracks[name].found[start - 1]:
                character.continuous = _stays(tracks[name], start - 1)
                character.continuous_inside = _stays(tracks[name], (start + stop) // 2 - 1)
            result.characters.append(character)
        results.append(result)
    _mark_consistency(script, results)
    return VideoResult(script.title, results)


def _stays(obs: Observation, frame: int) -> bool:
    """Found CONTINUITY_FRAMES frames after `frame` within CONTINUITY_RADIUS of where it was there (found)."""
    later = frame + CONTINUITY_FRAMES
    return bool(obs.found[later] and obs.found[frame]
                and np.hypot(obs.x[later] - obs.x[frame], obs.y[later] - obs.y[frame]) < CONTINUITY_RADIUS)


def _check_character(seg: ScriptSegment, name: str, expected: Appearance, obs: Observation, pixels: Pixels,
                     first: int, stop: int, s: np.ndarray) -> CharacterResult:
    action = seg.action_of(name)
    label = action.kind + (f" {action.direction}" if action.direction else "") + (
        f" x{action.count}" if action.kind == "jump" else "")
    found = obs.found[first:stop]
    if action.kind == "enter":
        present = found[len(found) // 2:].mean() >= 0.5
    elif action.kind == "leave":
        present = found[: len(found) // 4].mean() >= 0.5
    elif action.kind == "shrink":  # a small thin shape may vanish mid-shrink
        present = found[(s < 0.25) | (s > 0.75)].mean() >= 0.5
    else:
        present = found.mean() >= 0.5
    observed = observe_appearance(action.kind, obs, pixels, first, stop, s) if present else None
    motion_ok = present and _motion_ok(seg, action, obs, first, stop, s, observed, pixels)
    return CharacterResult(
        name=name, action=label, named=name in seg.actions, introduced_here=name in seg.intros, expected=expected,
        observed=observed, present=bool(present),
        color_ok=observed is not None and observed.color == expected.color,
        shape_ok=observed is not None and observed.shape == expected.shape,
        size_ok=observed is not None and observed.size == expected.size,
        motion_ok=bool(motion_ok),
    )


def _motion_ok(seg: ScriptSegment, action: Action, obs: Observation, first: int, stop: int, s: np.ndarray,
               observed: Appearance, pixels: Pixels) -> bool:
    found = obs.found[first:stop]
    x, y = obs.x[first:stop], obs.y[first:stop]
    head, tail = np.flatnonzero(found[:3]), np.flatnonzero(found[-3:]) + len(found) - 3
    if action.kind == "enter":
        seen = np.flatnonzero(found)
        if len(tail) == 0:
            return False
        inward = 1.0 if action.direction == "left" else -1.0
        from_edge = x[seen[0]] if action.direction == "left" else 1.0 - x[seen[0]]
        return from_edge < ENTRY_ZONE and inward * (x[seen[-1]] - x[seen[0]]) > 0.1
    if action.kind == "leave":
        seen = np.flatnonzero(found)
        if len(head) == 0:
            return False
        outward = 1.0 if action.direction == "right" else -1.0
        to_edge = 1.0 - x[seen[-1]] if action.direction == "right" else x[seen[-1]]
        gone = not found[-1] or obs.border[stop - 1]
        return gone and to_edge < ENTRY_ZONE and outward * (x[seen[-1]] - x[seen[0]]) > 0.1
    if len(head) == 0 or len(tail) == 0:
        return False
    a, b = head[0], tail[-1]
    expected = np.array([-seg.pan * PAN, 0.0])
    if action.kind == "move":
        expected += MOVE * np.asarray(DIRECTIONS[action.direction])
    moved = np.array([x[b] - x[a], y[b] - y[a]])
    if np.hypot(*(moved - expected)) >= 0.5 * MOVE:
        return False
    baseline = y[a] + (y[b] - y[a]) * (np.arange(len(found)) - a) / max(b - a, 1)
    up = np.where(found, baseline - y, 0.0) > 0.5 * JUMP
    hops = int(np.count_nonzero(up[1:] & ~up[:-1]) + up[0])
    if action.kind == "jump":
        return hops == action.count
    if hops:
        return False
    area = np.where(found, obs.area[first:stop], 0.0)
    ends = np.median(area[(s <= NEUTRAL_PHASE) | (s >= 1.0 - NEUTRAL_PHASE)])
    middle = area[(s > 0.35) & (s < 0.65)]
    if action.kind == "grow":
        return middle.max() > (1.0 + GROW) * ends
    if action.kind == "shrink":
        return middle.min() < (1.0 - SHRINK) * ends
    if action.kind == "spin":
        return _turns(obs, pixels, first, stop, s, observed)
    return True


def _turns(obs: Observation, pixels: Pixels, first: int, stop: int, s: np.ndarray,
           observed: Appearance) -> bool:
    """Whether the character's outline leaves its upright template mid-segment (it rotates)."""
    t = np.arange(first, stop)
    ends = appearance_frames("spin", obs, first, stop, s)
    middle = t[obs.found[first:stop] & ~obs.border[first:stop] & (s > 0.15) & (s < 0.85)]
    if len(ends) == 0 or len(middle) == 0:
        return False
    upright = shape_scores(obs, pixels, ends)[0][observed.shape]
    turned = min(shape_scores(obs, pixels, np.array([m]))[0][observed.shape] for m in middle)
    return turned < upright - 0.12


def _mark_consistency(script: Script, results: list[SegmentResult]) -> None:
    first_look = {}
    for result in results:
        for c in result.characters:
            if c.introduced_here:
                first_look[c.name] = c.observed
            elif c.name in first_look:
                c.consistent = c.observed is not None and c.observed == first_look[c.name]


def summarize(results: list[VideoResult], given: int = 0) -> dict:
    """Accuracy of every check over videos, identity curves by segment index, and chance levels.

    given: how many leading segments of every video were given rather than generated (recall mode gives segment
    1 as ground truth). They are not scored, so that no check counts them; a character introduced there counts
    after its introduction in the later segments, and a scene they start counts as seen.

    identity: colour, shape and size as introduced, over every (segment, character on stage); identity_intro: the
    same in the segment that introduces the character (drawing what the text says); identity_recall: the same over
    segments after the character's introduction (what needs memory); consistency: later looks
    equal to the look drawn at the introduction. background_recall: the backdrop in the segments after a scene's
    first, whose texts do not name it (memory again, of the scene rather than a character). color_intro and
    color_recall: the colour alone, where introduced and after (memory of the one attribute a weak model may draw
    well; a character not drawn counts as wrong). continuity: a character on stage on both sides of a boundary inside
    a scene, found in the earlier segment's last frame, is found CONTINUITY_FRAMES frames later within
    CONTINUITY_RADIUS of where it was (the toy world's motion never moves it further); continuity_inside: the same
    characters over the same span in the middle of the later segment. Segments are generated with attention inside
    each and only TTT across them, so the gap between the two is what the model fails to carry over a boundary.
    """
    if given < 0:
        raise ValueError(f"given: expected a number of segments >= 0, got {given}")
    checks = {k: [] for k in ("background", "background_recall", "presence", "color", "color_intro", "color_recall",
                              "shape", "size", "identity", "identity_intro", "identity_recall", "motion",
                              "consistency", "continuity", "continuity_inside")}
    by_segment: dict[int, list[bool]] = {}
    recall_by_segment: dict[int, list[bool]] = {}
    color_recall_by_segment: dict[int, list[bool]] = {}
    for video in results:
        scenes_seen = set()
        for seg in video.segments:
            seen, scenes_seen = seg.scene in scenes_seen, scenes_seen | {seg.scene}
            if seg.index < given:
                continue
            checks["background"].append(seg.background_ok)
            if seen:
                checks["background_recall"].append(seg.background_ok)
            for c in seg.characters:
                checks["presence"].append(c.present)
                checks["color"].append(c.color_ok)
                checks["shape"].append(c.shape_ok)
                checks["size"].append(c.size_ok)
                checks["identity"].append(c.identity_ok)
                checks["motion"].append(c.motion_ok)
                by_segment.setdefault(seg.index, []).append(c.identity_ok)
                part = "intro" if c.introduced_here else "recall"
                checks[f"identity_{part}"].append(c.identity_ok)
                checks[f"color_{part}"].append(c.color_ok)
                if part == "recall":
                    recall_by_segment.setdefault(seg.index, []).append(c.identity_ok)
                    color_recall_by_segment.setdefault(seg.index, []).append(c.color_ok)
                if c.consistent is not None:
                    checks["consistency"].append(c.consistent)
                if c.continuous is not None:
                    checks["continuity"].append(c.continuous)
                    checks["continuity_inside"].append(c.continuous_inside)
    summary = {k: (float(np.mean(v)) if v else float("nan")) for k, v in checks.items()}
    summary["counts"] = {k: len(v) for k, v in checks.items()}
    summary["videos"] = len(results)
    summary["given"] = given
    summary["segments"] = len(checks["background"])
    n = max(by_segment) + 1 if by_segment else 0
    for key, table in (("identity", by_segment), ("identity_recall", recall_by_segment),
                       ("color_recall", color_recall_by_segment)):
        summary[f"{key}_by_segment"] = [float(np.mean(table[i])) if i in table else float("nan") for i in range(n)]
        summary[f"{key}_count_by_segment"] = [len(table.get(i, [])) for i in range(n)]
    summary["chance"] = dict(CHANCE)
    return summary
