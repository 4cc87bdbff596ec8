"""Metrics that read a toy-world video back against its storyboard.

Only the video and the storyboard's texts are used (no ground-truth file), so a model's output for a storyboard
is scored exactly like the rendered ground truth:

1. Every pixel gets the nearest character colour, or none (backdrops are dark, characters bright).
2. Characters are tracked frame by frame, each scene from an empty stage: a character is matched to the colour
   blob nearest to where it was in the previous frame, or, when it enters, to a new blob near the side the text
   names. Tracking by position, not colour, is what lets a character drawn in the wrong colour (or two
   characters that swapped looks) be caught.
3. Per segment: the backdrop (colour from the brightest pixels, pattern from row/column profiles); per
   character on stage: presence, colour (its blob's palette colour), shape (IoU of its luma outline with the
   renderer's own shapes, area-matched) and size (its area), and whether its motion matches the text's action.
   Identity = colour, shape and size all as introduced.
4. Per character, consistency: its appearance in each later segment equals what was drawn at its introduction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import numpy as np

from .render import coverage, shape_sdf
from .text import Script, ScriptSegment, parse_storyboard
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

_COLOR_NAMES = list(COLORS)
_PALETTE = np.asarray([COLORS[c] for c in _COLOR_NAMES], dtype=np.float32)  # (C, 3)
COLOR_TOLERANCE = 60.0  # RGB distance: compression noise passes, blends of a character with the backdrop do not
_MIN_BLOB = 0.1 * np.pi * SIZES["small"] ** 2  # smallest blob that counts, fraction of height^2 (~10 px at 64)
_MAX_STEP = 0.35  # a tracked character moves less than this between frames (frame units)
_ENTRY_ZONE = 0.35  # an entering character is first seen this close to its side
_NEUTRAL_PHASE = 0.1  # spin/grow/shrink look like the character's plain self this close to a segment boundary

_LOOKS = len(SHAPES) * len(COLORS) * len(SIZES)
CHANCE = {
    "background": 1.0 / (len(BACKDROP_COLORS) * len(PATTERNS)),
    "background_recall": 1.0 / (len(BACKDROP_COLORS) * len(PATTERNS)),
    "identity": 1.0 / _LOOKS,
    "identity_recall": 1.0 / _LOOKS,
    "consistency": 1.0 / _LOOKS,
    "color": 1.0 / len(COLORS),
    "shape": 1.0 / len(SHAPES),
    "size": 1.0 / len(SIZES),
}
"""What a model drawing a uniformly random look in every segment scores per check (1/96 for a whole look)."""


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


@cache
def _color_table() -> np.ndarray:
    """Nearest character colour (or -1) for every RGB value quantised to 6 bits per channel, (64**3,) int8."""
    levels = np.arange(64, dtype=np.float32) * 4 + 1.5  # the centre of each 4-value bin
    rgb = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 1, 3)
    d2 = ((rgb - _PALETTE) ** 2).sum(-1)  # (64**3, C)
    nearest = d2.argmin(1)
    return np.where(d2.min(1) < COLOR_TOLERANCE**2, nearest, -1).astype(np.int8)


def label_pixels(frames: np.ndarray) -> np.ndarray:
    """Nearest character colour of every pixel: frames (F, H, W, 3) uint8 -> (F, H, W) int8, -1 for none."""
    q = (frames >> 2).astype(np.int32)
    return _color_table()[(q[..., 0] << 12) | (q[..., 1] << 6) | q[..., 2]]


@dataclass
class _Pixels:
    """Per-pixel data of a whole video: nearest character colour and luma."""

    labels: np.ndarray  # (F, H, W) int8, -1 for none
    luma: np.ndarray  # (F, H, W) float32

    @classmethod
    def of(cls, frames: np.ndarray) -> _Pixels:
        luma = frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return cls(_drop_rims(label_pixels(frames)), luma)


def _drop_rims(labels: np.ndarray) -> np.ndarray:
    """Drops rims between colours and lone pixels, labels (F, H, W) -> same.

    The anti-aliased edge of one bright character over a dark backdrop can pass through the tolerance of another
    palette colour (yellow over maroon passes orange): such pixels touch the character's own colour.
    """
    def neighbours(a: np.ndarray) -> list[np.ndarray]:
        p = np.pad(a, ((0, 0), (1, 1), (1, 1)), mode="edge")
        return [p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]]

    rim = np.logical_or.reduce([(n >= 0) & (n != labels) for n in neighbours(labels)])
    labels = np.where(rim, -1, labels)
    lone = ~np.logical_or.reduce([n == labels for n in neighbours(labels)])
    return np.where(lone, -1, labels).astype(np.int8)


@dataclass
class _Blobs:
    """Per frame and colour: pixel count and centroid (frame units), whether the blob touches the border."""

    area: np.ndarray  # (F, C) pixels
    x: np.ndarray  # (F, C)
    y: np.ndarray  # (F, C)
    border: np.ndarray  # (F, C) bool


def _blobs(labels: np.ndarray) -> _Blobs:
    f, h, w = labels.shape
    c = len(_COLOR_NAMES)
    valid = labels >= 0
    index = (np.arange(f)[:, None, None] * c + labels.astype(np.int64))[valid]
    ys, xs = np.broadcast_arrays((np.arange(h)[:, None] + 0.5) / h, (np.arange(w)[None, :] + 0.5) / w)
    ys, xs = np.broadcast_to(ys, labels.shape)[valid], np.broadcast_to(xs, labels.shape)[valid]
    area = np.bincount(index, minlength=f * c).reshape(f, c).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        x = np.bincount(index, xs, minlength=f * c).reshape(f, c) / area
        y = np.bincount(index, ys, minlength=f * c).reshape(f, c) / area
    edge = np.zeros((h, w), dtype=bool)
    edge[[0, -1], :] = edge[:, [0, -1]] = True
    on_edge = np.broadcast_to(edge, labels.shape)[valid].astype(np.float64)
    border = np.bincount(index, on_edge, minlength=f * c).reshape(f, c) > 0
    return _Blobs(area, x, y, border)


@dataclass
class _Observation:
    """A character's track over the whole video (NaN / -1 where not found)."""

    x: np.ndarray
    y: np.ndarray
    color: np.ndarray
    area: np.ndarray
    border: np.ndarray

    @classmethod
    def empty(cls, frames: int) -> _Observation:
        nan = np.full(frames, np.nan)
        return cls(nan.copy(), nan.copy(), np.full(frames, -1), np.zeros(frames), np.zeros(frames, dtype=bool))

    @property
    def found(self) -> np.ndarray:
        return self.color >= 0


def _track(script: Script, blobs: _Blobs, height: int) -> dict[str, _Observation]:
    """Frame-by-frame assignment of on-stage characters to colour blobs (see the module docstring, step 2)."""
    frames = blobs.area.shape[0]
    obs = {name: _Observation.empty(frames) for name in script.cast}
    min_area = _MIN_BLOB * height * height
    last: dict[str, tuple[float, float]] = {}
    for seg in script.segments:
        if seg.scene_start:
            last = {}
        entering = {n: a.direction for n, a in seg.actions.items() if a.kind == "enter"}
        start, stop = segment_frames(seg.index)
        for t in range(start, stop):
            colors = np.flatnonzero(blobs.area[t] >= min_area)
            pairs = []
            for name in seg.on_stage():
                for c in colors:
                    bx, by = blobs.x[t, c], blobs.y[t, c]
                    if name in last:
                        cost = np.hypot(bx - last[name][0], by - last[name][1])
                        if cost < _MAX_STEP:
                            pairs.append((cost, name, c))
                    elif name in entering:
                        from_edge = bx if entering[name] == "left" else 1.0 - bx
                        if from_edge < _ENTRY_ZONE:
                            pairs.append((1.0 + from_edge, name, c))
                    else:  # on stage but never seen in this scene (a model may have failed to draw its entrance)
                        pairs.append((2.0, name, c))
            taken_names, taken_colors = set(), set()
            for _, name, c in sorted(pairs, key=lambda p: p[0]):
                if name in taken_names or c in taken_colors:
                    continue
                taken_names.add(name)
                taken_colors.add(c)
                o = obs[name]
                o.x[t], o.y[t], o.color[t] = blobs.x[t, c], blobs.y[t, c], c
                o.area[t], o.border[t] = blobs.area[t, c], blobs.border[t, c]
                last[name] = (o.x[t], o.y[t])
        for name, action in seg.actions.items():
            if action.kind == "leave":
                last.pop(name, None)
    return obs


def _window(seg: ScriptSegment) -> tuple[int, int, np.ndarray]:
    """Frames [first, stop) used to judge a segment and their phases s (shape (frames,)).

    A segment inside a scene is judged from the previous segment's last frame (s = 0), where its action starts.
    """
    start, stop = segment_frames(seg.index)
    first = start - 1 if seg.index > 0 and not seg.scene_start else start
    return first, stop, (np.arange(first, stop) - (stop - FRAMES_PER_SEGMENT - 1)) / FRAMES_PER_SEGMENT


_SUBPIXEL = 4  # templates are drawn at quarter-pixel offsets and radii, and cached


@cache
def unit_area(shape: str) -> float:
    """Area of a unit shape (radius 1) as drawn, for turning a blob's pixel count into a radius."""
    grid = np.linspace(-1.6, 1.6, 641)
    gx, gy = np.meshgrid(grid, grid)
    return float(np.mean(shape_sdf(shape, gx, gy) < 0)) * 3.2**2


@cache
def _template(shape: str, radius_px: float, fx: float, fy: float) -> np.ndarray:
    """Binary mask (2 reach + 1, 2 reach + 1), reach = ceil(1.5 radius) + 2, of a shape upright at offset (fx, fy)."""
    reach = int(np.ceil(1.5 * radius_px)) + 2
    grid = np.arange(-reach, reach + 1) + 0.5
    dx, dy = np.meshgrid(grid - fx, grid - fy)
    return coverage(shape, np.full((1, 1, 1), radius_px), np.zeros((1, 1, 1)), dx[None], dy[None])[0] > 0.5


def _shape_iou(mask: np.ndarray, shape: str) -> float:
    """IoU of a character's mask (h, w) with `shape` drawn upright at the mask's centroid and with its area.

    Matching the area first makes the score about shape alone (size is judged from the area separately).
    """
    area = np.count_nonzero(mask)
    if area == 0:
        return 0.0
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    radius_px = max(round(np.sqrt(area / unit_area(shape)) * _SUBPIXEL) / _SUBPIXEL, 1.0)
    ix, iy = int(np.floor(cx)), int(np.floor(cy))
    fx, fy = round((cx - ix) * _SUBPIXEL) / _SUBPIXEL, round((cy - iy) * _SUBPIXEL) / _SUBPIXEL
    template = _template(shape, radius_px, fx, fy)
    reach = template.shape[0] // 2
    height, width = mask.shape
    x0, x1, y0, y1 = max(ix - reach, 0), min(ix + reach + 1, width), max(iy - reach, 0), min(iy + reach + 1, height)
    template = template[y0 - iy + reach: y1 - iy + reach, x0 - ix + reach: x1 - ix + reach]
    crop = mask[y0:y1, x0:x1]
    union = np.count_nonzero(crop | template) + area - np.count_nonzero(crop)
    return np.count_nonzero(crop & template) / union


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Grows a mask (h, w) by `steps` pixels (square element)."""
    height, width = mask.shape
    padded = np.pad(mask, steps)
    grown = np.zeros_like(mask)
    for dy in range(2 * steps + 1):
        for dx in range(2 * steps + 1):
            grown |= padded[dy: dy + height, dx: dx + width]
    return grown


def _outline(pixels: _Pixels, t: int, color: int) -> np.ndarray:
    """The character of colour index `color` in frame t as a sharp mask (h, w) over a crop around it.

    The colour labels locate it, but video codecs store colour at half resolution (yuv420p), which makes small
    shapes blocky; the outline is therefore cut from luma, which keeps full resolution, at the level halfway
    between the character and the backdrop around it (its coverage-0.5 contour), near the coloured pixels.
    """
    own = pixels.labels[t] == color
    ys, xs = np.nonzero(own)
    height, width = own.shape
    y0, y1, x0, x1 = max(ys.min() - 5, 0), min(ys.max() + 6, height), max(xs.min() - 5, 0), min(xs.max() + 6, width)
    own, luma, labels = own[y0:y1, x0:x1], pixels.luma[t, y0:y1, x0:x1], pixels.labels[t, y0:y1, x0:x1]
    near = _dilate(own, 3)
    around = ~near & (labels < 0)
    # The brighter backdrop tone: halfway to it is exactly the coverage-0.5 contour over that tone and a slightly
    # tighter one over the darker tone of a pattern.
    backdrop = np.percentile(luma[around], 90) if around.any() else np.percentile(luma, 10)
    return near & (luma > 0.5 * (np.median(luma[own]) + backdrop)) & ((labels < 0) | own)


def classify_backdrop(frame: np.ndarray, labels: np.ndarray) -> Backdrop:
    """The backdrop of one frame (H, W, 3) uint8, with character pixels (labels (H, W) >= 0) left out."""
    rgb = frame.astype(np.float64)
    lum = rgb @ np.array([0.299, 0.587, 0.114])
    near_character = _dilate(labels >= 0, 2)  # blends of a character and the backdrop
    valid = ~near_character & (lum < 110)
    if np.count_nonzero(valid) < 0.1 * valid.size:
        valid = lum < 110
    if not valid.any():
        valid = np.ones_like(valid)
    bright = valid & (lum >= np.percentile(lum[valid], 70))
    mean = rgb[bright].mean(0)
    names = list(BACKDROP_COLORS)
    color = names[int(np.argmin([np.sum((mean - np.asarray(BACKDROP_COLORS[n])) ** 2) for n in names]))]

    lo, hi = np.percentile(lum[valid], [5, 95])
    if hi - lo < 0.25 * max(hi, 1.0):
        return Backdrop(color, "plain")
    norm = np.clip((lum - lo) / (hi - lo), 0.0, 1.0)
    weights = valid.astype(np.float64)

    def profile(axis: int) -> tuple[np.ndarray, np.ndarray]:
        counts = weights.sum(axis)
        keep = counts > 0.3 * weights.shape[axis]
        return (norm * weights).sum(axis)[keep] / counts[keep], np.flatnonzero(keep)

    rows, row_index = profile(1)
    cols, _ = profile(0)
    if len(rows) > 2 and np.std(rows) > 0 and np.corrcoef(rows, row_index)[0, 1] < -0.9:
        return Backdrop(color, "gradient")
    var_rows, var_cols = np.var(rows), np.var(cols)
    if var_rows > 3 * var_cols and var_rows > 0.02:
        return Backdrop(color, "horizontal stripes")
    if var_cols > 3 * var_rows and var_cols > 0.02:
        return Backdrop(color, "vertical stripes")
    dark = np.mean(norm[valid] < 0.5)
    return Backdrop(color, "checks" if dark > 0.3 else "dots")


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
    pixels = _Pixels.of(frames)
    blobs = _blobs(pixels.labels)
    tracks = _track(script, blobs, height)

    results = []
    for seg in script.segments:
        first, stop, s = _window(seg)
        start = segment_frames(seg.index)[0]
        votes = [classify_backdrop(frames[t], pixels.labels[t]) for t in (start, (start + stop) // 2, stop - 1)]
        observed = max(votes, key=votes.count)
        result = SegmentResult(seg.index, seg.scene, seg.backdrop, observed)
        for name in seg.on_stage():
            result.characters.append(_check_character(seg, name, script.cast[name], tracks[name], pixels,
                                                      first, stop, s))
        results.append(result)
    _mark_consistency(script, results)
    return VideoResult(script.title, results)


def _check_character(seg: ScriptSegment, name: str, expected: Appearance, obs: _Observation, pixels: _Pixels,
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
    observed = _observe_appearance(action.kind, obs, pixels, first, stop, s) if present else None
    motion_ok = present and _motion_ok(seg, action, obs, first, stop, s, observed, pixels)
    return CharacterResult(
        name=name, action=label, named=name in seg.actions, introduced_here=name in seg.intros, expected=expected,
        observed=observed, present=bool(present),
        color_ok=observed is not None and observed.color == expected.color,
        shape_ok=observed is not None and observed.shape == expected.shape,
        size_ok=observed is not None and observed.size == expected.size,
        motion_ok=bool(motion_ok),
    )


def _appearance_frames(kind: str, obs: _Observation, first: int, stop: int, s: np.ndarray) -> np.ndarray:
    t = np.arange(first, stop)
    usable = obs.found[first:stop] & ~obs.border[first:stop]
    if kind in ("spin", "grow", "shrink"):
        usable &= (s <= _NEUTRAL_PHASE) | (s >= 1.0 - _NEUTRAL_PHASE)
    picked = t[usable]
    if len(picked) == 0:
        picked = t[obs.found[first:stop]]
    return picked[np.linspace(0, len(picked) - 1, min(len(picked), 6)).astype(int)] if len(picked) else picked


def _shape_scores(obs: _Observation, pixels: _Pixels, frames: np.ndarray) -> tuple[dict[str, float], float]:
    """Mean IoU over `frames` of the character's outline with each shape, and its median area in pixels."""
    scores, areas = dict.fromkeys(SHAPES, 0.0), []
    for t in frames:
        outline = _outline(pixels, t, obs.color[t])
        areas.append(np.count_nonzero(outline))
        for shape in SHAPES:
            scores[shape] += _shape_iou(outline, shape) / len(frames)
    return scores, float(np.median(areas)) if areas else 0.0


def _observe_appearance(kind: str, obs: _Observation, pixels: _Pixels, first: int, stop: int,
                        s: np.ndarray) -> Appearance:
    colors = obs.color[first:stop]
    color = _COLOR_NAMES[int(np.bincount(colors[colors >= 0]).argmax())]
    scores, area = _shape_scores(obs, pixels, _appearance_frames(kind, obs, first, stop, s))
    shape = max(scores, key=scores.get)
    height = pixels.labels.shape[1]
    size = min(SIZES, key=lambda z: abs(np.log(max(area, 1.0) / (unit_area(shape) * (SIZES[z] * height) ** 2))))
    return Appearance(shape, color, size)


def _motion_ok(seg: ScriptSegment, action: Action, obs: _Observation, first: int, stop: int, s: np.ndarray,
               observed: Appearance, pixels: _Pixels) -> bool:
    found = obs.found[first:stop]
    x, y = obs.x[first:stop], obs.y[first:stop]
    head, tail = np.flatnonzero(found[:3]), np.flatnonzero(found[-3:]) + len(found) - 3
    if action.kind == "enter":
        seen = np.flatnonzero(found)
        if len(tail) == 0:
            return False
        inward = 1.0 if action.direction == "left" else -1.0
        from_edge = x[seen[0]] if action.direction == "left" else 1.0 - x[seen[0]]
        return from_edge < _ENTRY_ZONE and inward * (x[seen[-1]] - x[seen[0]]) > 0.1
    if action.kind == "leave":
        seen = np.flatnonzero(found)
        if len(head) == 0:
            return False
        outward = 1.0 if action.direction == "right" else -1.0
        to_edge = 1.0 - x[seen[-1]] if action.direction == "right" else x[seen[-1]]
        gone = not found[-1] or obs.border[stop - 1]
        return gone and to_edge < _ENTRY_ZONE and outward * (x[seen[-1]] - x[seen[0]]) > 0.1
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
    ends = np.median(area[(s <= _NEUTRAL_PHASE) | (s >= 1.0 - _NEUTRAL_PHASE)])
    middle = area[(s > 0.35) & (s < 0.65)]
    if action.kind == "grow":
        return middle.max() > (1.0 + GROW) * ends
    if action.kind == "shrink":
        return middle.min() < (1.0 - SHRINK) * ends
    if action.kind == "spin":
        return _turns(obs, pixels, first, stop, s, observed)
    return True


def _turns(obs: _Observation, pixels: _Pixels, first: int, stop: int, s: np.ndarray,
           observed: Appearance) -> bool:
    """Whether the character's outline leaves its upright template mid-segment (it rotates)."""
    t = np.arange(first, stop)
    ends = _appearance_frames("spin", obs, first, stop, s)
    middle = t[obs.found[first:stop] & ~obs.border[first:stop] & (s > 0.15) & (s < 0.85)]
    if len(ends) == 0 or len(middle) == 0:
        return False
    upright = _shape_scores(obs, pixels, ends)[0][observed.shape]
    turned = min(_shape_scores(obs, pixels, np.array([m]))[0][observed.shape] for m in middle)
    return turned < upright - 0.12


def _mark_consistency(script: Script, results: list[SegmentResult]) -> None:
    first_look = {}
    for result in results:
        for c in result.characters:
            if c.introduced_here:
                first_look[c.name] = c.observed
            elif c.name in first_look:
                c.consistent = c.observed is not None and c.observed == first_look[c.name]


def summarize(results: list[VideoResult]) -> dict:
    """Accuracy of every check over videos, identity curves by segment index, and chance levels.

    identity: colour, shape and size as introduced, over every (segment, character on stage); identity_recall:
    the same over segments after the character's introduction (what needs memory); consistency: later looks
    equal to the look drawn at the introduction. background_recall: the backdrop in the segments after a scene's
    first, whose texts do not name it (memory again, of the scene rather than a character).
    """
    checks = {k: [] for k in ("background", "background_recall", "presence", "color", "shape", "size", "identity",
                              "identity_recall", "motion", "consistency")}
    by_segment: dict[int, list[bool]] = {}
    recall_by_segment: dict[int, list[bool]] = {}
    for video in results:
        scenes_seen = set()
        for seg in video.segments:
            checks["background"].append(seg.background_ok)
            if seg.scene in scenes_seen:
                checks["background_recall"].append(seg.background_ok)
            scenes_seen.add(seg.scene)
            for c in seg.characters:
                checks["presence"].append(c.present)
                checks["color"].append(c.color_ok)
                checks["shape"].append(c.shape_ok)
                checks["size"].append(c.size_ok)
                checks["identity"].append(c.identity_ok)
                checks["motion"].append(c.motion_ok)
                by_segment.setdefault(seg.index, []).append(c.identity_ok)
                if not c.introduced_here:
                    checks["identity_recall"].append(c.identity_ok)
                    recall_by_segment.setdefault(seg.index, []).append(c.identity_ok)
                if c.consistent is not None:
                    checks["consistency"].append(c.consistent)
    summary = {k: (float(np.mean(v)) if v else float("nan")) for k, v in checks.items()}
    summary["counts"] = {k: len(v) for k, v in checks.items()}
    summary["videos"] = len(results)
    summary["segments"] = len(checks["background"])
    n = max(by_segment) + 1 if by_segment else 0
    for key, table in (("identity", by_segment), ("identity_recall", recall_by_segment)):
        summary[f"{key}_by_segment"] = [float(np.mean(table[i])) if i in table else float("nan") for i in range(n)]
        summary[f"{key}_count_by_segment"] = [len(table.get(i, [])) for i in range(n)]
    summary["chance"] = dict(CHANCE)
    return summary
