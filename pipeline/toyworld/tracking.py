"""Finding a toy-world video's characters and backdrops: what pipeline/toyworld/checks.py scores.

Only the video and the storyboard's texts are used (no ground-truth file), so a model's output is read exactly like
the rendered ground truth:

1. Every pixel gets the nearest character colour, or none (backdrops are dark, characters bright).
2. Characters are tracked frame by frame, each scene from an empty stage: a character is matched to the colour
   blob nearest to where it was in the previous frame, or, when it enters, to a new blob near the side the text
   names. Tracking by position, not colour, is what lets a character drawn in the wrong colour (or two
   characters that swapped looks) be caught.
3. A tracked character's look: its colour (its blob's palette colour), shape (IoU of its luma outline with the
   renderer's own shapes, area-matched) and size (its area); a frame's backdrop: colour from the brightest pixels,
   pattern from row/column profiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from .render import coverage, shape_sdf
from .text import Script
from .world import BACKDROP_COLORS, COLORS, SHAPES, SIZES, Appearance, Backdrop, segment_frames

_COLOR_NAMES = list(COLORS)
_PALETTE = np.asarray([COLORS[c] for c in _COLOR_NAMES], dtype=np.float32)  # (C, 3)
COLOR_TOLERANCE = 60.0  # RGB distance: compression noise passes, blends of a character with the backdrop do not
_MIN_BLOB = 0.1 * np.pi * SIZES["small"] ** 2  # smallest blob that counts, fraction of height^2 (~10 px at 64)
_MAX_STEP = 0.35  # a tracked character moves less than this between frames (frame units)
ENTRY_ZONE = 0.35  # an entering character is first seen this close to its side
NEUTRAL_PHASE = 0.1  # spin/grow/shrink look like the character's plain self this close to a segment boundary


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
class Pixels:
    """Per-pixel data of a whole video: nearest character colour and luma."""

    labels: np.ndarray  # (F, H, W) int8, -1 for none
    luma: np.ndarray  # (F, H, W) float32

    @classmethod
    def of(cls, frames: np.ndarray) -> Pixels:
        luma = frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return cls(drop_rims(label_pixels(frames)), luma)


def drop_rims(labels: np.ndarray) -> np.ndarray:
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
class Blobs:
    """Per frame and colour: pixel count and centroid (frame units), whether the blob touches the border."""

    area: np.ndarray  # (F, C) pixels
    x: np.ndarray  # (F, C)
    y: np.ndarray  # (F, C)
    border: np.ndarray  # (F, C) bool


def find_blobs(labels: np.ndarray) -> Blobs:
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
    return Blobs(area, x, y, border)


@dataclass
class Observation:
    """A character's track over the whole video (NaN / -1 where not found)."""

    x: np.ndarray
    y: np.ndarray
    color: np.ndarray
    area: np.ndarray
    border: np.ndarray

    @classmethod
    def empty(cls, frames: int) -> Observation:
        nan = np.full(frames, np.nan)
        return cls(nan.copy(), nan.copy(), np.full(frames, -1), np.zeros(frames), np.zeros(frames, dtype=bool))

    @property
    def found(self) -> np.ndarray:
        return self.color >= 0


def track_characters(script: Script, blobs: Blobs, height: int) -> dict[str, Observation]:
    """Frame-by-frame assignment of on-stage characters to colour blobs (see the module docstring, step 2)."""
    frames = blobs.area.shape[0]
    obs = {name: Observation.empty(frames) for name in script.cast}
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
                        if from_edge < ENTRY_ZONE:
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


def _outline(pixels: Pixels, t: int, color: int) -> np.ndarray:
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


def appearance_frames(kind: str, obs: Observation, first: int, stop: int, s: np.ndarray) -> np.ndarray:
    t = np.arange(first, stop)
    usable = obs.found[first:stop] & ~obs.border[first:stop]
    if kind in ("spin", "grow", "shrink"):
        usable &= (s <= NEUTRAL_PHASE) | (s >= 1.0 - NEUTRAL_PHASE)
    picked = t[usable]
    if len(picked) == 0:
        picked = t[obs.found[first:stop]]
    return picked[np.linspace(0, len(picked) - 1, min(len(picked), 6)).astype(int)] if len(picked) else picked


def shape_scores(obs: Observation, pixels: Pixels, frames: np.ndarray) -> tuple[dict[str, float], float]:
    """Mean IoU over `frames` of the character's outline with each shape, and its median area in pixels."""
    scores, areas = dict.fromkeys(SHAPES, 0.0), []
    for t in frames:
        outline = _outline(pixels, t, obs.color[t])
        areas.append(np.count_nonzero(outline))
        for shape in SHAPES:
            scores[shape] += _shape_iou(outline, shape) / len(frames)
    return scores, float(np.median(areas)) if areas else 0.0


def observe_appearance(kind: str, obs: Observation, pixels: Pixels, first: int, stop: int,
                        s: np.ndarray) -> Appearance:
    colors = obs.color[first:stop]
    color = _COLOR_NAMES[int(np.bincount(colors[colors >= 0]).argmax())]
    scores, area = shape_scores(obs, pixels, appearance_frames(kind, obs, first, stop, s))
    shape = max(scores, key=scores.get)
    height = pixels.labels.shape[1]
    size = min(SIZES, key=lambda z: abs(np.log(max(area, 1.0) / (unit_area(shape) * (SIZES[z] * height) ** 2))))
    return Appearance(shape, color, size)
