"""The toy world: its vocabulary, the story model, the motion of every action, and the story sampler.

A story is a list of 3-second segments grouped into scenes. Each scene has a backdrop; a cast of one to three
characters (distinct appearances and colours) enters, acts and leaves. Only decisions are stored (who does what,
where an entering character stops, camera pans): positions are replayed from them by `plan`, so the renderer,
the sampler and the corruptions used to validate the metrics all share one definition of the motion.

Coordinates are screen units: x and y in [0, 1] (y points down), radii in units of the frame height.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FPS = 8
FRAMES_PER_SEGMENT = 24  # 3 s at 8 fps; the first segment has one extra frame (24 n + 1 frames in all)

# Three shapes that differ at the scale of one transformer token (16x16 pixels at patch 4 on a 64x64 frame): a round
# circle, an upright tower and a flat bar, the last two 2.4x longer than wide. Big ones span about 1 x 2.5 tokens, so
# a model that draws token-sized blocks can still draw them apart. 8 colours x 3 shapes x 2 sizes = 48 looks. (Two
# earlier worlds had shapes that differed only inside a token, circle/square/triangle at 1.2-1.8 tokens and six
# shapes at 0.8-1.1; their pretrained models drew the colours but never the shapes.)
SHAPES = ("circle", "tower", "bar")
# Half width and half height of each upright unit shape (in radii); render.shape_sdf draws them, feasible keeps them
# inside the frame and apart.
HALF_EXTENTS: dict[str, tuple[float, float]] = {"circle": (0.85, 0.85), "tower": (0.5, 1.2), "bar": (1.2, 0.5)}
# Bright, saturated character colours (luma >= 113), far from the dark backdrops (luma <= 62), so that a pixel's
# colour tells a character from the background and luma alone outlines it (see metrics._outline).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (240, 60, 60),
    "orange": (255, 145, 20),
    "yellow": (250, 225, 50),
    "green": (70, 205, 80),
    "blue": (70, 120, 255),
    "purple": (175, 90, 245),
    "pink": (255, 125, 205),
    "white": (245, 245, 245),
}
SIZES: dict[str, float] = {"small": 0.15, "big": 0.22}  # nominal radius, fraction of the frame height
BACKDROP_COLORS: dict[str, tuple[int, int, int]] = {
    "navy": (25, 35, 95),
    "dark green": (20, 80, 35),
    "maroon": (95, 20, 40),
    "brown": (85, 58, 20),
    "gray": (55, 55, 62),
    "teal": (15, 80, 90),
}
PATTERNS = ("plain", "horizontal stripes", "vertical stripes", "checks", "dots", "gradient")
NAMES = (
    "Pip", "Bo", "Kiki", "Milo", "Zed", "Luna", "Tam", "Rex", "Nia", "Odo", "Pia", "Quin", "Rua", "Sol", "Tia",
    "Uma", "Vik", "Wren", "Yara", "Zuzu", "Ada", "Ben", "Cleo", "Dax", "Eli", "Fay", "Gus", "Hana", "Ivo", "Juno",
    "Kai", "Lex", "Moe", "Nell", "Otto", "Rosa",
)  # fmt: skip
ACTIONS = ("enter", "leave", "move", "jump", "spin", "grow", "shrink", "rest")
DIRECTIONS: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0),
                                              "down": (0.0, 1.0)}

MOVE = 0.25  # distance of a move, frame units
PAN = 0.15  # how far a camera pan shifts the view
JUMP = 0.18  # jump height
GROW = 0.5  # peak extra scale of "grow"
SHRINK = 0.45  # peak scale loss of "shrink"
MARGIN = 0.02  # characters stay this far inside the frame (except while entering or leaving)
SEPARATION = 1.15  # characters never come closer, along x or y, than this many times the sum of their half extents
SCENE_CHANGE_PROB = 0.25


@dataclass(frozen=True)
class Appearance:
    """What a character looks like: one of SHAPES x COLORS x SIZES."""

    shape: str
    color: str
    size: str

    def describe(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Backdrop:
    """A scene's background: a BACKDROP_COLORS name and one of PATTERNS."""

    color: str
    pattern: str


@dataclass(frozen=True)
class Action:
    """What one character does during a segment.

    direction: move -> left/right/up/down; enter -> the side it comes from; leave -> the side it leaves to.
    count: number of jumps. target: where an entering character stops, (x, y) screen units.
    """

    kind: str
    direction: str | None = None
    count: int = 1
    target: tuple[float, float] | None = None


@dataclass
class Segment:
    """One 3-s segment: its scene, the acting characters (in text order), a camera pan (-1 left, +1 right), and
    its captions in two registers: text (story: a look only at a character's introduction, the backdrop only at a
    scene's start) and dense_text (dense: the backdrop and every on-stage character's look in every segment)."""

    scene: int
    scene_start: bool
    actions: dict[str, Action]
    pan: int = 0
    text: str = ""
    dense_text: str = ""


@dataclass
class Story:
    """A sampled story: cast in order of introduction, one backdrop per scene, the segments."""

    seed: int
    title: str
    cast: dict[str, Appearance]
    backdrops: list[Backdrop]
    segments: list[Segment] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return num_frames(len(self.segments))

    def to_dict(self) -> dict:
        """The story as JSON-ready data (the ground truth written next to each video)."""
        return {
            "seed": self.seed,
            "title": self.title,
            "cast": [{"name": n, "shape": a.shape, "color": a.color, "size": a.size} for n, a in self.cast.items()],
            "backdrops": [{"color": b.color, "pattern": b.pattern} for b in self.backdrops],
            "segments": [
                {
                    "scene": s.scene,
                    "scene_start": s.scene_start,
                    "pan": s.pan,
                    "text": s.text,
                    "dense_text": s.dense_text,
                    "actions": [
                        {"name": n, "kind": a.kind, "direction": a.direction, "count": a.count,
                         "target": list(a.target) if a.target is not None else None}
                        for n, a in s.actions.items()
                    ],
                }
                for s in self.segments
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Story:
        cast = {c["name"]: Appearance(c["shape"], c["color"], c["size"]) for c in data["cast"]}
        segments = [
            Segment(
                scene=s["scene"],
                scene_start=s["scene_start"],
                pan=s["pan"],
                text=s["text"],
                dense_text=s.get("dense_text", ""),  # truth files written before the dense register have none
                actions={
                    a["name"]: Action(a["kind"], a["direction"], a["count"],
                                      tuple(a["target"]) if a["target"] is not None else None)
                    for a in s["actions"]
                },
            )
            for s in data["segments"]
        ]
        backdrops = [Backdrop(b["color"], b["pattern"]) for b in data["backdrops"]]
        return cls(seed=data["seed"], title=data["title"], cast=cast, backdrops=backdrops, segments=segments)


def num_frames(num_segments: int) -> int:
    """Frames of a story of `num_segments` segments: 24 n + 1 (the causal VAE's 1 + 4k rule)."""
    return FRAMES_PER_SEGMENT * num_segments + 1


def segment_frames(index: int) -> tuple[int, int]:
    """Frame range [start, stop) of segment `index` (the first segment owns the extra first frame)."""
    if index == 0:
        return 0, FRAMES_PER_SEGMENT + 1
    start = 1 + FRAMES_PER_SEGMENT * index
    return start, start + FRAMES_PER_SEGMENT


def segment_phases(index: int) -> np.ndarray:
    """Phase s in [0, 1] of every frame of segment `index`, shape (frames,).

    s = 0 is the last frame of the previous segment (or frame 0), s = 1 the segment's own last frame, so each
    action runs from the state the previous segment left to its own end state.
    """
    k = np.arange(0 if index == 0 else 1, FRAMES_PER_SEGMENT + 1, dtype=np.float64)
    return k / FRAMES_PER_SEGMENT


def ease(s: np.ndarray) -> np.ndarray:
    """Smoothstep, so that motion starts and stops gently."""
    return s * s * (3.0 - 2.0 * s)


@dataclass
class Track:
    """Where a character is over a segment; every field has shape (frames,) like the phases it was built for."""

    x: np.ndarray
    y: np.ndarray
    scale: np.ndarray
    angle: np.ndarray


@dataclass
class StageState:
    """Who is on stage where at a segment boundary, and the camera offset (shifts the backdrop pattern)."""

    positions: dict[str, tuple[float, float]]
    camera: float = 0.0


def radius(appearance: Appearance) -> float:
    return SIZES[appearance.size]


def half_extents(appearance: Appearance, scale: np.ndarray, angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Half width and half height (frame units) of a character's bounding box at `scale` and `angle` (radians)."""
    hx, hy = (radius(appearance) * h * scale for h in HALF_EXTENTS[appearance.shape])
    cos, sin = np.abs(np.cos(angle)), np.abs(np.sin(angle))
    return cos * hx + sin * hy, sin * hx + cos * hy


def edge_x(side: str, appearance: Appearance) -> float:
    """x of a character just outside the frame on `side`."""
    reach = 1.2 * radius(appearance) * HALF_EXTENTS[appearance.shape][0]
    return -reach if side == "left" else 1.0 + reach


def segment_tracks(cast: dict[str, Appearance], state: StageState, segment: Segment, s: np.ndarray
                   ) -> dict[str, Track]:
    """Tracks of every character on stage during `segment`, at phases `s` (shape (frames,)).

    Characters that are on stage but not named in the text rest (and follow a camera pan like everyone).
    """
    pan_shift = -segment.pan * PAN * ease(s)  # the camera moving left moves the world right on screen
    zeros, ones = np.zeros_like(s), np.ones_like(s)
    names = list(state.positions) + [n for n, a in segment.actions.items() if a.kind == "enter"]
    tracks = {}
    for name in names:
        action = segment.actions.get(name, Action("rest"))
        if action.kind == "enter":
            x_end, y0 = action.target
            x_start = edge_x(action.direction, cast[name])
            tracks[name] = Track(x_start + (x_end - x_start) * ease(s), y0 + zeros, ones, zeros)
            continue
        x0, y0 = state.positions[name]
        x, y, scale, angle = x0 + pan_shift, y0 + zeros, ones, zeros
        if action.kind == "leave":
            x = x0 + (edge_x(action.direction, cast[name]) - x0) * ease(s)
        elif action.kind == "move":
            dx, dy = DIRECTIONS[action.direction]
            x, y = x + dx * MOVE * ease(s), y + dy * MOVE * ease(s)
        elif action.kind == "jump":
            y = y - JUMP * np.abs(np.sin(np.pi * action.count * s))
        elif action.kind == "spin":
            angle = 2.0 * np.pi * ease(s)
        elif action.kind == "grow":
            scale = 1.0 + GROW * np.sin(np.pi * s) ** 2
        elif action.kind == "shrink":
            scale = 1.0 - SHRINK * np.sin(np.pi * s) ** 2
        tracks[name] = Track(x, y, scale, angle)
    return tracks


def advance(cast: dict[str, Appearance], state: StageState, segment: Segment) -> StageState:
    """The stage after `segment` (leaving characters are gone)."""
    end = segment_tracks(cast, state, segment, np.ones(1))
    leaving = {n for n, a in segment.actions.items() if a.kind == "leave"}
    positions = {n: (float(t.x[0]), float(t.y[0])) for n, t in end.items() if n not in leaving}
    return StageState(positions, state.camera + segment.pan * PAN)


def on_stage(state: StageState, segment: Segment) -> list[str]:
    """Everyone seen during `segment` that starts from `state`: those present at its start, then those entering."""
    entering = [n for n, a in segment.actions.items() if a.kind == "enter" and n not in state.positions]
    return [*state.positions, *entering]


def plan(story: Story) -> list[StageState]:
    """The stage at the start of every segment (a new scene starts with an empty stage)."""
    states, state = [], StageState({})
    for segment in story.segments:
        if segment.scene_start:
            state = StageState({})
        states.append(state)
        state = advance(story.cast, state, segment)
    return states


def feasible(cast: dict[str, Appearance], state: StageState, segment: Segment) -> bool:
    """Whether everyone stays inside the frame and apart from each other for the whole segment."""
    tracks = segment_tracks(cast, state, segment, np.linspace(0.0, 1.0, 4 * FRAMES_PER_SEGMENT + 1))
    # a character entering or leaving is inside the frame only where it stops or starts
    inside = {n: -1 if a.kind == "enter" else 0 for n, a in segment.actions.items() if a.kind in ("enter", "leave")}
    boxes = {name: half_extents(cast[name], t.scale, t.angle) for name, t in tracks.items()}
    for name, t in tracks.items():
        hx, hy = boxes[name]
        if np.any(t.y - hy < MARGIN) or np.any(t.y + hy > 1.0 - MARGIN):
            return False
        x, hx = (t.x, hx) if name not in inside else (t.x[inside[name]], hx[inside[name]])
        if np.any(x - hx < MARGIN) or np.any(x + hx > 1.0 - MARGIN):
            return False
    names = list(tracks)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ta, tb = tracks[a], tracks[b]
            (ax, ay), (bx, by) = boxes[a], boxes[b]
            apart_x = np.abs(ta.x - tb.x) >= SEPARATION * (ax + bx) + MARGIN
            apart_y = np.abs(ta.y - tb.y) >= SEPARATION * (ay + by) + MARGIN
            if not np.all(apart_x | apart_y):
                return False
    return True
