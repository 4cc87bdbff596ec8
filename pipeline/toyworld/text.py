"""The toy world's grammar, both ways: segment texts from sampled segments, and storyboards parsed back.

One table of sentence templates drives both directions, so every generated text parses back to the events it
was generated from. A character's appearance is written only when it first enters ("Pip, a small red tower,
slides in from the left."); afterwards the text names it only, which is what makes the benchmark a memory test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .world import BACKDROP_COLORS, COLORS, SHAPES, SIZES, Action, Appearance, Backdrop, Segment

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "intro": ("{name}, {look}, slides in from the {side}.", "{name}, {look}, comes in from the {side}."),
    "enter": ("{name} slides in from the {side}.", "{name} comes in from the {side}."),
    "leave": ("{name} leaves to the {side}.", "{name} exits to the {side}."),
    "move": ("{name} moves {dir}.", "{name} glides {dir}."),
    "jump1": ("{name} jumps.", "{name} hops."),
    "jump2": ("{name} jumps twice.", "{name} hops twice."),
    "spin": ("{name} spins around.", "{name} turns a full circle."),
    "grow": ("{name} grows for a moment.", "{name} puffs up for a moment."),
    "shrink": ("{name} shrinks for a moment.",),
    "rest": ("{name} rests.", "{name} stays still.", "{name} waits."),
}
_PATTERN_PHRASES = {
    "plain": "",
    "horizontal stripes": " with horizontal stripes",
    "vertical stripes": " with vertical stripes",
    "checks": " with checks",
    "dots": " with dots",
    "gradient": " with a gradient",
}
_CAMERA = "The camera pans {dir}."


def _alternatives(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_SLOTS = {
    "name": r"(?P<name>[A-Z][a-z]+)",
    "look": rf"a (?P<size>{_alternatives(SIZES)}) (?P<color>{_alternatives(COLORS)}) "
            rf"(?P<shape>{_alternatives(SHAPES)})",
    "side": r"(?P<side>left|right)",
    "dir": r"(?P<dir>left|right|up|down)",
}


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", template)
    return re.compile("^" + "".join(_SLOTS[p[1:-1]] if p.startswith("{") else re.escape(p) for p in parts) + "$")


_PARSERS = [(kind, _pattern(t)) for kind, ts in _TEMPLATES.items() for t in ts]
_CAMERA_PARSER = _pattern(_CAMERA)
_PHRASE_TO_PATTERN = {phrase[len(" with "):]: p for p, phrase in _PATTERN_PHRASES.items() if phrase}
_BACKDROP_PARSER = re.compile(
    rf"^Scene: a (?P<color>{_alternatives(BACKDROP_COLORS)}) backdrop"
    rf"(?: with (?P<pattern>{_alternatives(_PHRASE_TO_PATTERN)}))?\.$"
)


def backdrop_sentence(backdrop: Backdrop) -> str:
    return f"Scene: a {backdrop.color} backdrop{_PATTERN_PHRASES[backdrop.pattern]}."


def action_sentence(name: str, action: Action, rng: np.random.Generator, look: Appearance | None = None) -> str:
    """One sentence for one character's action; `look` is given only when the character is introduced."""
    kind = "intro" if look is not None else action.kind
    if action.kind == "jump":
        kind = f"jump{action.count}"
    template = str(rng.choice(_TEMPLATES[kind]))
    return template.format(name=name, look=look.describe() if look else "", side=action.direction,
                           dir=action.direction)


def segment_text(segment: Segment, cast: dict[str, Appearance], backdrop: Backdrop, introduced: set[str],
                 rng: np.random.Generator) -> str:
    """The text of a segment: backdrop (at a scene start), camera pan, then each acting character in order."""
    sentences = []
    if segment.scene_start:
        sentences.append(backdrop_sentence(backdrop))
    if segment.pan:
        sentences.append(_CAMERA.format(dir="left" if segment.pan < 0 else "right"))
    for name, action in segment.actions.items():
        intro = action.kind == "enter" and name not in introduced
        sentences.append(action_sentence(name, action, rng, cast[name] if intro else None))
    return " ".join(sentences)


def dense_segment_text(segment: Segment, cast: dict[str, Appearance], backdrop: Backdrop, on_stage: list[str],
                       story_text: str) -> str:
    """The dense caption of a segment (what a pretrained video model's captions look like): the backdrop, then every
    character on stage during the segment with its look, then the story text's events (without its backdrop
    sentence). Uses no randomness, so adding it changed no sampled story."""
    sentences = [backdrop_sentence(backdrop)]
    if on_stage:
        sentences.append("On stage: " + "; ".join(f"{name}, {cast[name].describe()}" for name in on_stage) + ".")
    events = story_text
    if segment.scene_start and events.startswith(sentences[0]):
        events = events[len(sentences[0]):].lstrip()
    return " ".join(sentences + ([events] if events else []))


def unshaped_segment_text(cast: dict[str, Appearance], on_stage: list[str], story_text: str) -> str:
    """The unshaped caption of a segment (an experiment's register: it leaves only the shape for memory to carry):
    the story text, then the size and colour of every character on stage that the story text does not describe
    here, never its shape ("On stage: Pip, small and red."). Uses no randomness."""
    told = [name for name in on_stage if f"{name}, {cast[name].describe()}" not in story_text]
    if not told:
        return story_text
    sentence = "On stage: " + "; ".join(f"{name}, {cast[name].size} and {cast[name].color}" for name in told) + "."
    return f"{story_text} {sentence}" if story_text else sentence


def character_parts(text: str, names: list[str]) -> list[str]:
    """A segment's text split for composed guidance (the pipeline's segment_parts): first what every part shares, the
    sentences that name no one (the backdrop, the camera; "" when there are none), then one text per character the
    text names, in the order of `names`: the shared sentences, that character's own sentences and its entry of an
    "On stage:" list, in their order. Fewer than two characters named: [] (nothing to compose)."""
    sentences = re.split(r"(?<=\.)\s+", text.strip())

    def named(sentence: str, name: str) -> bool:
        return re.match(rf"{name}\b", sentence) is not None

    shared = [s for s in sentences if not s.startswith("On stage: ") and not any(named(s, n) for n in names)]
    parts = []
    for name in names:
        kept = []
        for sentence in sentences:
            if sentence.startswith("On stage: "):
                kept += [f"On stage: {e}." for e in sentence[len("On stage: "):-1].split("; ")
                         if e.startswith(f"{name},")]
            elif named(sentence, name) or sentence in shared:
                kept.append(sentence)
        if len(kept) > sum(s in shared for s in kept):
            parts.append(" ".join(kept))
    return [" ".join(shared), *parts] if len(parts) >= 2 else []


@dataclass
class ScriptSegment:
    """A segment as read back from its text.

    present: characters on stage when it starts; actions: named characters' actions (no enter targets; the
    text does not say where an entering character stops); intros: appearances described in this segment.
    """

    index: int
    scene: int
    scene_start: bool
    backdrop: Backdrop
    pan: int
    present: tuple[str, ...]
    actions: dict[str, Action]
    intros: dict[str, Appearance]

    def on_stage(self) -> list[str]:
        """Everyone seen during the segment: those present at its start, then those entering."""
        entering = [n for n, a in self.actions.items() if a.kind == "enter"]
        return list(self.present) + entering

    def action_of(self, name: str) -> Action:
        return self.actions.get(name, Action("rest"))


@dataclass
class Script:
    """A storyboard read back: the cast as introduced, and each segment's events."""

    title: str
    cast: dict[str, Appearance]
    segments: list[ScriptSegment]

    def intro_segment(self, name: str) -> int:
        return next(s.index for s in self.segments if name in s.intros)


def parse_storyboard(storyboard: dict) -> Script:
    """Read a toy-world storyboard (`{"title", "scenes": [{"segments": [{"text"}]}]}`) back into events.

    Raises ValueError naming the scene/segment and the sentence that does not fit the grammar or the story
    (a character acting before it is introduced, entering while on stage, acting while off stage, ...).
    """
    if not isinstance(storyboard, dict) or not isinstance(storyboard.get("scenes"), list) or not storyboard["scenes"]:
        raise ValueError("storyboard: expected an object with a non-empty 'scenes' list")
    cast: dict[str, Appearance] = {}
    segments: list[ScriptSegment] = []
    on_stage: list[str] = []
    for scene_index, scene in enumerate(storyboard["scenes"]):
        if not isinstance(scene, dict) or not isinstance(scene.get("segments"), list) or not scene["segments"]:
            raise ValueError(f"storyboard: scenes[{scene_index}]: expected an object with a non-empty 'segments' list")
        backdrop = None
        on_stage = []
        for j, seg in enumerate(scene["segments"]):
            where = f"storyboard: scenes[{scene_index}].segments[{j}]"
            if not isinstance(seg, dict) or not isinstance(seg.get("text"), str):
                raise ValueError(f"{where}.text: expected a string")
            sentences = [s.strip() for s in re.findall(r"[^.]+\.", seg["text"])]
            if "".join(sentences).replace(" ", "") != seg["text"].replace(" ", ""):
                raise ValueError(f"{where}.text: expected sentences ending in '.', got {seg['text']!r}")
            if j == 0:
                m = _BACKDROP_PARSER.match(sentences[0]) if sentences else None
                if m is None:
                    raise ValueError(f"{where}.text: a scene must open with 'Scene: a <color> backdrop[ with "
                                     f"<pattern>].', got {seg['text']!r}")
                backdrop = Backdrop(m["color"], _PHRASE_TO_PATTERN[m["pattern"]] if m["pattern"] else "plain")
                sentences = sentences[1:]
            pan = 0
            if sentences and (m := _CAMERA_PARSER.match(sentences[0])):
                pan = -1 if m["dir"] == "left" else 1
                sentences = sentences[1:]
            actions, intros = {}, {}
            for sentence in sentences:
                name, action, look = _parse_action(sentence, where)
                if name in actions:
                    raise ValueError(f"{where}.text: {name} acts twice in one segment")
                if action.kind == "enter":
                    if name in on_stage:
                        raise ValueError(f"{where}.text: {name} enters but is already on stage")
                    if look is not None:
                        if name in cast:
                            raise ValueError(f"{where}.text: {name} is introduced a second time")
                        cast[name] = intros[name] = look
                    elif name not in cast:
                        raise ValueError(f"{where}.text: {name} enters before being introduced with its appearance")
                elif name not in on_stage:
                    raise ValueError(f"{where}.text: {name} acts ({action.kind}) but is not on stage")
                actions[name] = action
            if not actions:
                raise ValueError(f"{where}.text: expected at least one character's action, got {seg['text']!r}")
            segments.append(ScriptSegment(len(segments), scene_index, j == 0, backdrop, pan, tuple(on_stage),
                                          actions, intros))
            on_stage = [n for n in segments[-1].on_stage() if segments[-1].action_of(n).kind != "leave"]
    return Script(str(storyboard.get("title", "")), cast, segments)


def _parse_action(sentence: str, where: str) -> tuple[str, Action, Appearance | None]:
    for kind, pattern in _PARSERS:
        m = pattern.match(sentence)
        if m is None:
            continue
        slots = m.groupdict()
        look = Appearance(slots["shape"], slots["color"], slots["size"]) if kind == "intro" else None
        if kind in ("intro", "enter", "leave"):
            return m["name"], Action("leave" if kind == "leave" else "enter", slots["side"]), look
        if kind == "move":
            return m["name"], Action("move", slots["dir"]), None
        if kind.startswith("jump"):
            return m["name"], Action("jump", count=int(kind[-1])), None
        return m["name"], Action(kind), None
    raise ValueError(f"{where}.text: cannot read {sentence!r}; expected a toy-world sentence such as "
                     f"'Pip jumps.' (see docs/toyworld.md)")
