"""Storyboards: ordered 3-second segments of text, grouped into scenes (docs/design.md, "What the system does").

Three file formats are read:

- JSON or YAML (the project's own)::

      {"title": "optional", "negative_text": "optional default",
       "scenes": [{"segments": [{"text": "...", "negative_text": "optional"}, ...]}, ...]}

  Every scene after the first opens with a scene transition.
- The original TTT-Video release's list: ``[{"text": ..., "requires_scene_transition": bool, "neg_text": ...}]``.
- Plain text (``.txt``): one segment per line, a blank line between scenes.

Every problem is reported as one line naming its place (file, line/column or key path) and what was expected;
all problems of a storyboard are raised together in one `StoryboardError`. Messages quote values shortened.

Files are read only up to MAX_FILE_BYTES, and a YAML file's anchors and aliases may not expand it past
MAX_EXPANDED_SIZE (a "billion laughs" file of a few hundred bytes would otherwise expand to gigabytes): both are
checked before any value is built, so a hostile file is refused quickly and with little memory.
"""

from __future__ import annotations

import json
import os
import reprlib
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .atomic import atomic_write_text

SEGMENT_SECONDS = 3.0
DEFAULT_MAX_SEGMENTS = 21  # 63 s, the longest stage of the training recipe
# where one memory guidance scale applies (the pipeline's memory_guidance_segments): every segment, or those that
# continue a scene (`Storyboard.continues_scene`)
MEMORY_GUIDANCE_SEGMENTS = ("all", "continuing")
MAX_FILE_BYTES = 1 << 20  # 1 MiB: 30 times a 63-s storyboard of 226-token texts
# nodes + characters of a YAML document with its aliases expanded; an alias-free file under MAX_FILE_BYTES stays under
MAX_EXPANDED_SIZE = 2 * MAX_FILE_BYTES

_TOP_KEYS = ("title", "negative_text", "scenes")
_SCENE_KEYS = ("segments",)
_SEGMENT_KEYS = ("text", "negative_text")
_LEGACY_SEGMENT_KEYS = ("text", "requires_scene_transition", "neg_text")


class StoryboardError(ValueError):
    """A storyboard that cannot be used. `problems` holds one line per problem; str() joins them with newlines."""

    def __init__(self, problems: Iterable[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Segment:
    """One 3-second segment.

    scene_start: the segment opens a new scene after a cut from the previous segment. Always False for the first
    segment of a storyboard (there is nothing to cut from); this is the transformer's `scene_start` input.
    negative_text: this segment's own negative text, or None to use the storyboard's default.
    place: where the segment came from, for error messages (not part of equality).
    """

    text: str
    negative_text: str | None = None
    scene_start: bool = False
    place: str = field(default="", compare=False, repr=False)


@dataclass
class Storyboard:
    """A parsed, validated storyboard: `segments` in order, scenes marked by `Segment.scene_start`."""

    segments: list[Segment]
    title: str | None = None
    negative_text: str | None = None

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    @property
    def duration_seconds(self) -> float:
        return self.num_segments * SEGMENT_SECONDS

    @property
    def scenes(self) -> list[list[Segment]]:
        scenes: list[list[Segment]] = []
        for i, segment in enumerate(self.segments):
            if i == 0 or segment.scene_start:
                scenes.append([])
            scenes[-1].append(segment)
        return scenes

    @property
    def continues_scene(self) -> list[bool]:
        """Per segment: whether it continues a scene, i.e. is neither the first segment nor a scene's first (whose
        texts set the stage, with nothing before them in the scene to carry over)."""
        return [i > 0 and not segment.scene_start for i, segment in enumerate(self.segments)]

    @property
    def texts(self) -> list[str]:
        return [segment.text for segment in self.segments]

    def negative_texts(self, default: str | None = None) -> list[str]:
        """Each segment's negative text: its own, else `default` when given, else the storyboard's, else ""."""
        fallback = default if default is not None else (self.negative_text or "")
        return [s.negative_text if s.negative_text is not None else fallback for s in self.segments]

    def to_dict(self) -> dict[str, Any]:
        """The project's JSON/YAML format (optional keys only when set)."""
        data: dict[str, Any] = {}
        if self.title is not None:
            data["title"] = self.title
        if self.negative_text is not None:
            data["negative_text"] = self.negative_text
        data["scenes"] = [
            {"segments": [_segment_dict(s) for s in scene]} for scene in self.scenes
        ]
        return data

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the storyboard as .json, .yaml/.yml or .txt (atomically: a temporary name, then a rename)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        elif suffix in (".yaml", ".yml"):
            text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        elif suffix == ".txt":
            if self.negative_text is not None or any(s.negative_text is not None for s in self.segments):
                raise StoryboardError([f"{path}: the .txt format has no negative texts; save as .json or .yaml"])
            text = "\n\n".join("\n".join(s.text for s in scene) for scene in self.scenes) + "\n"
        else:
            raise StoryboardError([f"{path}: unknown storyboard suffix {path.suffix!r}; expected .json, .yaml, "
                                   ".yml or .txt"])
        return atomic_write_text(path, text)

    def validate(self, max_segments: int | None = DEFAULT_MAX_SEGMENTS) -> Storyboard:
        """Checks texts, types and the segment count (1 .. max_segments; None: no maximum). Returns self."""
        problems = []
        for i, segment in enumerate(self.segments):
            place = segment.place or f"segments[{i}]"
            problems += _text_problems(segment.text, f"{place}.text", required=True)
            problems += _text_problems(segment.negative_text, f"{place}.negative_text", required=False)
            if not isinstance(segment.scene_start, bool):
                problems.append(f"{place}.scene_start: expected true or false, got {_describe(segment.scene_start)}")
        problems += _text_problems(self.title, "title", required=False)
        problems += _text_problems(self.negative_text, "negative_text", required=False)
        problems += count_problems(self.num_segments, max_segments)
        if problems:
            raise StoryboardError(problems)
        return self

    def check_token_budget(self, tokenizer, max_tokens: int, extra_negative_text: str | None = None,
                           strict: bool = True) -> None:
        """Checks every text against the text encoder's budget (special tokens included).

        tokenizer: a transformers tokenizer (the pipeline's); max_tokens: the transformer's max_text_seq_length.
        extra_negative_text: a caller-supplied default negative text, checked too.
        strict: raise StoryboardError naming every text over the budget; else warn (UserWarning) once per such text,
            naming it and the words the text encoder will drop (it truncates, as diffusers' pipelines do).
        """
        over = self.over_token_budget(tokenizer, max_tokens, extra_negative_text)
        if strict and over:
            raise StoryboardError([f"{place}: {name} has {count} tokens, over the text encoder's budget of "
                                   f"{max_tokens} (shorten it)" for place, name, count, _ in over])
        for line in truncation_warnings(over, max_tokens):
            warnings.warn(line, stacklevel=2)

    def over_token_budget(self, tokenizer, max_tokens: int,
                          extra_negative_text: str | None = None) -> list[tuple[str, str, int, str]]:
        """(place, field, token count, the words past the budget) of every text over max_tokens tokens."""
        checks = []
        for i, segment in enumerate(self.segments):
            place = segment.place or f"segments[{i}]"
            checks.append((place, "text", segment.text))
            if segment.negative_text:
                checks.append((place, "negative_text", segment.negative_text))
        if self.negative_text:
            checks.append(("storyboard", "negative_text", self.negative_text))
        if extra_negative_text:
            checks.append(("argument", "negative_text", extra_negative_text))
        over = []
        for place, name, text in checks:
            count = count_tokens(tokenizer, text)
            if count > max_tokens:
                over.append((place, name, count, dropped_text(tokenizer, text, max_tokens)))
        return over


def truncation_warnings(over: list[tuple[str, str, int, str]], max_tokens: int) -> list[str]:
    """One line per `Storyboard.over_token_budget` entry: where, how many tokens, and what is dropped."""
    return [f"{place}: {name} has {count} tokens, over the text encoder's budget of {max_tokens}; truncated, "
            f"dropping {_shorten(dropped, 80)}" for place, name, count, dropped in over]


def dropped_text(tokenizer, text: str, max_tokens: int) -> str:
    """The end of `text` that the text encoder does not see when it truncates to max_tokens tokens (special tokens
    included), as encode_text does."""
    keep = max(max_tokens - tokenizer.num_special_tokens_to_add(), 0)
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return text[offsets[keep][0]:].strip() if keep < len(offsets) else ""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[keep:]).strip()


def count_tokens(tokenizer, text: str) -> int:
    """Tokens the text encoder sees for `text`, special tokens included."""
    return len(tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"])


def count_problems(num_segments: int, max_segments: int | None) -> list[str]:
    if num_segments == 0:
        return ["storyboard has no segments; expected at least 1"]
    if max_segments is not None and num_segments > max_segments:
        return [f"storyboard has {num_segments} segments ({num_segments * SEGMENT_SECONDS:g} s); the maximum is "
                f"{max_segments} ({max_segments * SEGMENT_SECONDS:g} s) — raise max_segments to allow more"]
    return []


def load_storyboard(source: Storyboard | str | os.PathLike | dict | list,
                    max_segments: int | None = DEFAULT_MAX_SEGMENTS) -> Storyboard:
    """Reads and validates a storyboard from a path (.json, .yaml, .yml, .txt), a parsed dict/list, or a Storyboard.

    max_segments: the most segments allowed (default 21 = 63 s); None for no maximum.
    Raises StoryboardError with one line per problem; warns (UserWarning) about unknown keys.
    """
    if isinstance(source, Storyboard):
        return source.validate(max_segments)
    if isinstance(source, (dict, list)):
        return _from_data(source, "", max_segments)
    if isinstance(source, (str, os.PathLike)):
        return _from_file(Path(source), max_segments)
    raise StoryboardError([f"storyboard: expected a path, a dict, a list or a Storyboard, got {_describe(source)}"])


def _from_file(path: Path, max_segments: int | None) -> Storyboard:
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml", ".txt"):
        raise StoryboardError([f"{path}: unknown storyboard suffix {path.suffix!r}; expected .json, .yaml, .yml "
                               "or .txt"])
    if not path.is_file():
        raise StoryboardError([f"{path}: storyboard file not found"])
    with open(path, "rb") as f:  # at most one byte past the limit, whatever stat says (a pipe, a growing file)
        raw = f.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise StoryboardError([f"{path}: over {MAX_FILE_BYTES} bytes, the size limit of a storyboard file"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StoryboardError([f"{path}: not UTF-8 text (byte {e.start})"]) from None
    if suffix == ".txt":
        return _from_text(text, str(path), max_segments)
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise StoryboardError([f"{path} line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}"]) from None
        except RecursionError:
            raise StoryboardError([f"{path}: nested too deeply"]) from None
    else:
        try:
            data = _load_yaml(text, path)
        except RecursionError:
            raise StoryboardError([f"{path}: nested too deeply"]) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e)
            raise StoryboardError([f"{path}{where}: invalid YAML: {problem}"]) from None
    return _from_data(data, f"{path}: ", max_segments)


def _load_yaml(text: str, path: Path) -> Any:
    """yaml.safe_load, refusing a document whose aliases expand it past MAX_EXPANDED_SIZE (or refer to themselves)
    before any Python value is built: the node graph keeps each anchored node once, so measuring it is cheap."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        sizes: dict[int, int] = {}
        open_nodes: set[int] = set()

        def size(n: yaml.Node) -> int:  # nodes + scalar characters, aliases expanded
            if id(n) in sizes:
                return sizes[id(n)]
            if id(n) in open_nodes:
                raise StoryboardError([f"{path}: a YAML alias refers to a node that contains it; a storyboard "
                                       "cannot contain itself"])
            open_nodes.add(id(n))
            if isinstance(n, yaml.ScalarNode):
                total = 1 + len(n.value)
            elif isinstance(n, yaml.SequenceNode):
                total = 1 + sum(size(child) for child in n.value)
            else:
                total = 1 + sum(size(key) + size(value) for key, value in n.value)
            open_nodes.discard(id(n))
            if total > MAX_EXPANDED_SIZE:
                raise StoryboardError([f"{path}: its YAML aliases expand it past {MAX_EXPANDED_SIZE} nodes and "
                                       "characters, the size limit of a storyboard; repeat fewer aliases"])
            sizes[id(n)] = total
            return total

        size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _from_text(text: str, name: str, max_segments: int | None) -> Storyboard:
    problems = count_problems(sum(1 for line in text.splitlines() if line.strip()), max_segments)
    if problems:
        raise StoryboardError([f"{name}: {p}" for p in problems])
    segments = []
    new_scene = False
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            new_scene = bool(segments)
            continue
        segments.append(Segment(text=line.strip(), scene_start=new_scene, place=f"{name} line {lineno}"))
        new_scene = False
    return Storyboard(segments=segments, title=Path(name).stem)


def _from_data(data: Any, prefix: str, max_segments: int | None) -> Storyboard:
    problems: list[str] = []
    if max_segments is not None and _segment_count(data) > max_segments:  # before building thousands of segments
        raise StoryboardError([prefix + p for p in count_problems(_segment_count(data), max_segments)])
    if isinstance(data, list):
        storyboard = _from_legacy_list(data, prefix, problems)
    elif isinstance(data, dict):
        storyboard = _from_scenes(data, prefix, problems)
    else:
        raise StoryboardError([f"{prefix}storyboard: expected an object with 'scenes' or a list of segments, "
                               f"got {_describe(data)}"])
    if not problems:
        problems += [prefix + p for p in count_problems(storyboard.num_segments, max_segments)]
    if problems:
        raise StoryboardError(problems)
    return storyboard


def _segment_count(data: Any) -> int:
    """Segments a parsed storyboard would have, counted without validating it (0 for what will fail validation)."""
    if isinstance(data, list):
        return len(data)
    scenes = data.get("scenes") if isinstance(data, dict) else None
    if not isinstance(scenes, list):
        return 0
    return sum(len(s["segments"]) for s in scenes if isinstance(s, dict) and isinstance(s.get("segments"), list))


def _from_scenes(data: dict, prefix: str, problems: list[str]) -> Storyboard:
    _warn_unknown(data, _TOP_KEYS, f"{prefix}storyboard")
    title = data.get("title")
    negative_text = data.get("negative_text")
    problems += _text_problems(title, f"{prefix}title", required=False)
    problems += _text_problems(negative_text, f"{prefix}negative_text", required=False)
    scenes = data.get("scenes")
    segments: list[Segment] = []
    if scenes is None:
        problems.append(f"{prefix}scenes: missing; expected a list of scenes, each {{\"segments\": [...]}}")
    elif not isinstance(scenes, list):
        problems.append(f"{prefix}scenes: expected a list of scenes, got {_describe(scenes)}")
    for i, scene in enumerate(scenes if isinstance(scenes, list) else []):
        place = f"{prefix}scenes[{i}]"
        if not isinstance(scene, dict):
            problems.append(f"{place}: expected an object with 'segments', got {_describe(scene)}")
            continue
        _warn_unknown(scene, _SCENE_KEYS, place)
        entries = scene.get("segments")
        if not isinstance(entries, list) or not entries:
            got = "nothing" if entries is None else _describe(entries)
            problems.append(f"{place}.segments: expected a non-empty list of segments, got {got}")
            continue
        for j, entry in enumerate(entries):
            segment_place = f"{place}.segments[{j}]"
            if not isinstance(entry, dict):
                problems.append(f"{segment_place}: expected an object with 'text', got {_describe(entry)}")
                continue
            _warn_unknown(entry, _SEGMENT_KEYS, segment_place)
            problems += _text_problems(entry.get("text"), f"{segment_place}.text", required=True)
            problems += _text_problems(entry.get("negative_text"), f"{segment_place}.negative_text", required=False)
            segments.append(Segment(text=entry.get("text"), negative_text=entry.get("negative_text"),
                                    scene_start=j == 0 and bool(segments), place=segment_place))
    return Storyboard(segments=segments, title=title, negative_text=negative_text)


def _from_legacy_list(data: list, prefix: str, problems: list[str]) -> Storyboard:
    segments = []
    for i, entry in enumerate(data):
        place = f"{prefix}[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{place}: expected an object with 'text', got {_describe(entry)}")
            continue
        _warn_unknown(entry, _LEGACY_SEGMENT_KEYS, place)
        problems += _text_problems(entry.get("text"), f"{place}.text", required=True)
        problems += _text_problems(entry.get("neg_text"), f"{place}.neg_text", required=False)
        transition = entry.get("requires_scene_transition", False)
        if not isinstance(transition, bool):
            problems.append(f"{place}.requires_scene_transition: expected true or false, got {_describe(transition)}")
        elif transition and not segments:
            warnings.warn(f"{place}.requires_scene_transition: ignored on the first segment (nothing to cut from)",
                          stacklevel=2)
        segments.append(Segment(text=entry.get("text"), negative_text=entry.get("neg_text"),
                                scene_start=transition is True and bool(segments), place=place))
    return Storyboard(segments=segments)


def _text_problems(value: Any, place: str, required: bool) -> list[str]:
    if value is None:
        return [f"{place}: missing; expected a non-empty string"] if required else []
    if not isinstance(value, str):
        return [f"{place}: expected a string, got {_describe(value)}"]
    if required and not value.strip():
        return [f"{place}: empty; expected a non-empty string"]
    return []


def _warn_unknown(entry: dict, known: tuple[str, ...], place: str) -> None:
    for key in entry:
        if key not in known:
            warnings.warn(f"{place}: unknown key {_shorten(key)} ignored (known keys: {', '.join(known)})",
                          stacklevel=2)


def _segment_dict(segment: Segment) -> dict[str, str]:
    data = {"text": segment.text}
    if segment.negative_text is not None:
        data["negative_text"] = segment.negative_text
    return data


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 40, 40


def _shorten(value: Any, limit: int = 40) -> str:
    """repr(value) cut to about `limit` characters (a string: its first `limit`, then …), without ever building the
    whole repr (values may be huge)."""
    if isinstance(value, str):
        return repr(value if len(value) <= limit else value[:limit] + "…")
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _describe(value: Any) -> str:
    return f"{_shorten(value)} ({type(value).__name__})"
