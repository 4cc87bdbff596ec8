"""Vectorised numpy rendering of toy-world stories: anti-aliased shapes over patterned backdrops.

Shapes are signed distance functions (SDFs) in unit space (world.HALF_EXTENTS, centroid at the origin);
a pixel's coverage is clip(0.5 - distance in pixels, 0, 1), the area of the pixel inside a straight edge through
it. Every frame of a segment is computed at once, each character only inside the box its track sweeps.
"""

from __future__ import annotations

import numpy as np

from .world import (
    BACKDROP_COLORS,
    COLORS,
    HALF_EXTENTS,
    PAN,
    SIZES,
    Appearance,
    Backdrop,
    StageState,
    Story,
    ease,
    plan,
    segment_phases,
    segment_tracks,
)

PATTERN_PERIOD = 0.25  # stripes, checks and dots repeat every quarter of the frame height
DOT_RADIUS = 0.05
DARK_TONE = 0.45  # the pattern's second tone is the backdrop colour times this


def _box_sdf(px: np.ndarray, py: np.ndarray, half_w: float, half_h: float) -> np.ndarray:
    qx, qy = np.abs(px) - half_w, np.abs(py) - half_h
    return np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0)) + np.minimum(np.maximum(qx, qy), 0.0)


def shape_sdf(shape: str, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Signed distance to a unit shape (HALF_EXTENTS, centroid at the origin); px, py any equal shapes."""
    if shape not in HALF_EXTENTS:
        raise ValueError(f"shape: expected one of {', '.join(HALF_EXTENTS)}, got {shape!r}")
    half_w, half_h = HALF_EXTENTS[shape]
    if shape == "circle":
        return np.hypot(px, py) - half_w
    return _box_sdf(px, py, half_w, half_h)


def coverage(shape: str, radius_px: np.ndarray, angle: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape at pixel offsets (dx, dy) from its centre.

    radius_px, angle: (F, 1, 1) per frame; dx, dy: (F, h, w) pixel offsets. Returns (F, h, w).
    """
    cos, sin = np.cos(angle), np.sin(angle)
    ux, uy = (cos * dx + sin * dy) / radius_px, (cos * dy - sin * dx) / radius_px  # rotate back by `angle`
    return np.clip(0.5 - shape_sdf(shape, ux, uy) * radius_px, 0.0, 1.0)


def backdrop_frames(backdrop: Backdrop, camera: np.ndarray, height: int, width: int) -> np.ndarray:
    """A backdrop as float RGB frames (F, H, W, 3) in [0, 255]; camera: (F,) horizontal offsets (pans)."""
    y = (np.arange(height) + 0.5)[None, :, None] / height  # (1, H, 1), frame-height units
    x = (np.arange(width) + 0.5)[None, None, :] / height + camera[:, None, None]  # (F, 1, W)
    px = height * PATTERN_PERIOD / (2 * np.pi)  # turns a sine's slope into ~one-pixel-wide soft edges
    phase_x, phase_y = 2 * np.pi * x / PATTERN_PERIOD, 2 * np.pi * y / PATTERN_PERIOD
    zero = np.zeros((camera.shape[0], height, width))
    if backdrop.pattern == "plain":
        dark = zero
    elif backdrop.pattern == "horizontal stripes":
        dark = zero + 0.5 + 0.5 * np.clip(np.sin(phase_y) * px, -1, 1)
    elif backdrop.pattern == "vertical stripes":
        dark = zero + 0.5 + 0.5 * np.clip(np.sin(phase_x) * px, -1, 1)
    elif backdrop.pattern == "checks":
        dark = 0.5 + 0.5 * np.clip(np.sin(phase_x) * px, -1, 1) * np.clip(np.sin(phase_y) * px, -1, 1)
    elif backdrop.pattern == "dots":
        gx = np.mod(x, PATTERN_PERIOD) - PATTERN_PERIOD / 2
        gy = np.mod(y, PATTERN_PERIOD) - PATTERN_PERIOD / 2
        dark = np.clip(0.5 - (np.hypot(gx, gy) - DOT_RADIUS) * height, 0.0, 1.0)
    elif backdrop.pattern == "gradient":
        dark = zero + y
    else:
        raise ValueError(f"backdrop.pattern: unknown pattern {backdrop.pattern!r}")
    base = np.asarray(BACKDROP_COLORS[backdrop.color], dtype=np.float64)
    return base * (1.0 - (1.0 - DARK_TONE) * dark[..., None])


def render_segment(story: Story, index: int, state: StageState, size: int = 64,
                   looks: dict[str, Appearance] | None = None, backdrop: Backdrop | None = None) -> np.ndarray:
    """Frames of segment `index` (25 for the first, else 24) as uint8 (F, size, size, 3).

    state: the stage at the segment's start (from `world.plan`). looks / backdrop override the story's
    appearances / the scene's backdrop (used to build corrupted videos that the metrics must catch).
    """
    segment = story.segments[index]
    camera = state.camera + segment.pan * PAN * ease(segment_phases(index))  # (F,)
    frames = backdrop_frames(backdrop or story.backdrops[segment.scene], camera, size, size)
    for look, (y0, y1, x0, x1), alpha in _layers(story, index, state, size, looks or {}):
        color = np.asarray(COLORS[look.color], dtype=np.float64)
        region = frames[:, y0:y1, x0:x1]
        region += alpha[..., None] * (color - region)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def _layers(story: Story, index: int, state: StageState, size: int, looks: dict[str, Appearance]):
    """Yields (look, (y0, y1, x0, x1), alpha (F, y1 - y0, x1 - x0) coverage) per character on stage in segment
    `index`, in the fixed drawing order (the story's cast order)."""
    segment = story.segments[index]
    tracks = segment_tracks(story.cast, state, segment, segment_phases(index))
    for name in story.cast:
        if name not in tracks:
            continue
        look = looks.get(name, story.cast[name])
        t = tracks[name]
        layer = _coverage_box(look, t.x * size, t.y * size, SIZES[look.size] * size * t.scale, t.angle, size)
        if layer is not None:
            yield look, *layer


def _coverage_box(look: Appearance, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, angle: np.ndarray, size: int
                  ) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """One character's box (y0, y1, x0, x1) in a size x size frame and its coverage (F, y1 - y0, x1 - x0) there;
    cx, cy, r (pixels), angle: (F,). None when the box lies outside the frame."""
    reach = 1.5 * r + 1.0  # every unit shape lies within 1.5 of its centroid, plus a pixel of anti-aliasing
    x0, x1 = int(max(np.floor(np.min(cx - reach)), 0)), int(min(np.ceil(np.max(cx + reach)), size))
    y0, y1 = int(max(np.floor(np.min(cy - reach)), 0)), int(min(np.ceil(np.max(cy + reach)), size))
    if x0 >= x1 or y0 >= y1:
        return None
    dx = (np.arange(x0, x1) + 0.5)[None, None, :] - cx[:, None, None]  # (F, 1, w)
    dy = (np.arange(y0, y1) + 0.5)[None, :, None] - cy[:, None, None]  # (F, h, 1)
    dx, dy = np.broadcast_arrays(dx, dy)
    return (y0, y1, x0, x1), coverage(look.shape, r[:, None, None], angle[:, None, None], dx, dy)


def render_story(story: Story, size: int = 64, looks: list[dict[str, Appearance]] | None = None,
                 backdrops: list[Backdrop] | None = None) -> np.ndarray:
    """All frames of a story, uint8 (24 n + 1, size, size, 3) at 8 fps.

    looks: per segment, appearance overrides by name; backdrops: per scene, a replacement backdrop
    (both only for corrupted variants used to validate the metrics and to build baselines).
    """
    if size < 16 or size % 2:
        raise ValueError(f"size: expected an even frame size of at least 16 pixels, got {size}")
    states = plan(story)
    return np.concatenate([
        render_segment(story, i, states[i], size, looks[i] if looks else None,
                       backdrops[seg.scene] if backdrops else None)
        for i, seg in enumerate(story.segments)
    ])


def render_story_mask(story: Story, size: int = 64) -> np.ndarray:
    """Where the characters are in every frame of `render_story(story, size)`: uint8 (24 n + 1, size, size), 255
    where a character covers the whole pixel, 0 on the backdrop (the largest coverage of any character, anti-aliased
    edges in between). The toy world's loss masks (data format: a metadata line's "mask" video)."""
    if size < 16 or size % 2:
        raise ValueError(f"size: expected an even frame size of at least 16 pixels, got {size}")
    states = plan(story)
    masks = []
    for i in range(len(story.segments)):
        mask = np.zeros((len(segment_phases(i)), size, size))
        for _, (y0, y1, x0, x1), alpha in _layers(story, i, states[i], size, {}):
            np.maximum(mask[:, y0:y1, x0:x1], alpha, out=mask[:, y0:y1, x0:x1])
        masks.append(mask)
    return np.rint(np.concatenate(masks) * 255).astype(np.uint8)
