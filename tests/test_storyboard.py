"""Storyboard formats, the Storyboard object and every validation error (pipeline/storyboard.py)."""

import json
from pathlib import Path

import pytest
from tiny import tiny_text_encoder

from pipeline.storyboard import (
    DEFAULT_MAX_SEGMENTS,
    MAX_EXPANDED_SIZE,
    MAX_FILE_BYTES,
    Segment,
    Storyboard,
    StoryboardError,
    count_tokens,
    load_storyboard,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

SCENES = {
    "title": "two scenes",
    "negative_text": "blurry",
    "scenes": [
        {"segments": [{"text": "a red ball rolls"}, {"text": "it bounces", "negative_text": "static"}]},
        {"segments": [{"text": "a blue box waits"}]},
    ],
}
EXPECTED_SEGMENTS = [
    Segment("a red ball rolls", None, False),
    Segment("it bounces", "static", False),
    Segment("a blue box waits", None, True),
]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(source, **kwargs) -> list[str]:
    with pytest.raises(StoryboardError) as info:
        load_storyboard(source, **kwargs)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


# formats


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_scenes_format_from_file(tmp_path, suffix):
    import yaml

    text = json.dumps(SCENES) if suffix == ".json" else yaml.safe_dump(SCENES)
    storyboard = load_storyboard(write(tmp_path, "story" + suffix, text))
    assert storyboard.segments == EXPECTED_SEGMENTS
    assert storyboard.title == "two scenes" and storyboard.negative_text == "blurry"
    assert storyboard.segments[2].place.endswith("scenes[1].segments[0]")


def test_scenes_format_from_dict_and_scene_grouping():
    storyboard = load_storyboard(SCENES)
    assert storyboard.num_segments == 3
    assert storyboard.duration_seconds == 9.0
    assert [len(scene) for scene in storyboard.scenes] == [2, 1]
    assert storyboard.texts == ["a red ball rolls", "it bounces", "a blue box waits"]


def test_legacy_list_format():
    legacy = [
        {"text": "a red ball rolls", "requires_scene_transition": False},
        {"text": "it bounces", "requires_scene_transition": False, "neg_text": "static"},
        {"text": "a blue box waits", "requires_scene_transition": True},
    ]
    assert load_storyboard(legacy).segments == EXPECTED_SEGMENTS


def test_legacy_transition_on_first_segment_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match=r"\[0\]\.requires_scene_transition: ignored on the first segment"):
        storyboard = load_storyboard([{"text": "a", "requires_scene_transition": True}, {"text": "b"}])
    assert [s.scene_start for s in storyboard.segments] == [False, False]


def test_text_format(tmp_path):
    path = write(tmp_path, "story.txt", "a red ball rolls\nit bounces\n\n\n  a blue box waits  \n")
    storyboard = load_storyboard(path)
    assert [(s.text, s.scene_start) for s in storyboard.segments] == [
        ("a red ball rolls", False), ("it bounces", False), ("a blue box waits", True)]
    assert storyboard.title == "story"
    assert storyboard.segments[2].place == f"{path} line 5"


def test_bundled_examples_parse_and_agree():
    stories = {p.name: load_storyboard(p) for p in sorted(EXAMPLES.iterdir())}
    assert set(stories) >= {"toy_story.json", "two_scenes.yaml", "two_scenes.txt", "two_scenes_legacy.json"}
    assert stories["toy_story.json"].num_segments == 20  # the default: 60 s
    short = [stories[n] for n in ("two_scenes.yaml", "two_scenes.txt", "two_scenes_legacy.json")]
    assert [s.text for s in short[0].segments] == [s.text for s in short[1].segments] == short[2].texts
    assert [s.scene_start for s in short[0].segments] == [s.scene_start for s in short[2].segments] == [
        False, False, True, False]


# the object


def test_negative_text_precedence():
    storyboard = load_storyboard(SCENES)
    assert storyboard.negative_texts() == ["blurry", "static", "blurry"]
    assert storyboard.negative_texts("dark") == ["dark", "static", "dark"]  # a caller's default beats the file's
    assert load_storyboard({"scenes": [{"segments": [{"text": "a"}]}]}).negative_texts() == [""]


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".txt"])
def test_save_and_load_round_trip(tmp_path, suffix):
    source = load_storyboard(SCENES)
    if suffix == ".txt":
        source = Storyboard([Segment(s.text, None, s.scene_start) for s in source.segments], title="story")
    path = source.save(tmp_path / "out" / f"story{suffix}")
    again = load_storyboard(path)
    assert again.segments == source.segments
    assert again.title == source.title and again.negative_text == source.negative_text
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_to_dict_is_the_scenes_format():
    assert load_storyboard(SCENES).to_dict() == SCENES


def test_txt_save_refuses_to_drop_negative_texts(tmp_path):
    with pytest.raises(StoryboardError, match=r"story\.txt: the \.txt format has no negative texts"):
        load_storyboard(SCENES).save(tmp_path / "story.txt")


def test_storyboard_object_is_validated():
    assert load_storyboard(Storyboard([Segment("a")])).num_segments == 1
    problems = problems_of(Storyboard([Segment("  "), Segment(3)]))
    assert problems == ["segments[0].text: empty; expected a non-empty string",
                        "segments[1].text: expected a string, got 3 (int)"]


# validation errors


def test_invalid_json_names_line_and_column(tmp_path):
    path = write(tmp_path, "bad.json", '{"scenes": [\n  {"segments": []}\n  {"segments": []}\n]}')
    assert problems_of(path) == [f"{path} line 3, column 3: invalid JSON: Expecting ',' delimiter"]


def test_invalid_yaml_names_line_and_column(tmp_path):
    path = write(tmp_path, "bad.yaml", "scenes:\n  - segments: [a, b\n  - x: 1\n")
    assert problems_of(path) == [f"{path} line 3, column 6: invalid YAML: expected ',' or ']', but got ':'"]


@pytest.mark.parametrize("segment, expected", [
    ({}, "scenes[0].segments[0].text: missing; expected a non-empty string"),
    ({"text": ""}, "scenes[0].segments[0].text: empty; expected a non-empty string"),
    ({"text": "   "}, "scenes[0].segments[0].text: empty; expected a non-empty string"),
    ({"text": 7}, "scenes[0].segments[0].text: expected a string, got 7 (int)"),
    ({"text": "a", "negative_text": ["x"]}, "scenes[0].segments[0].negative_text: expected a string, got ['x'] (list)"),
    ("a ball", "scenes[0].segments[0]: expected an object with 'text', got 'a ball' (str)"),
], ids=["missing", "empty", "blank", "int", "negative-list", "not-an-object"])
def test_segment_errors(tmp_path, segment, expected):
    path = write(tmp_path, "s.json", json.dumps({"scenes": [{"segments": [segment]}]}))
    assert problems_of(path) == [f"{path}: {expected}"]


@pytest.mark.parametrize("data, expected", [
    ({"scenes": "abc"}, "scenes: expected a list of scenes, got 'abc' (str)"),
    ({}, "scenes: missing; expected a list of scenes, each {\"segments\": [...]}"),
    ({"scenes": [["a"]]}, "scenes[0]: expected an object with 'segments', got ['a'] (list)"),
    ({"scenes": [{"segments": []}]}, "scenes[0].segments: expected a non-empty list of segments, got [] (list)"),
    ({"scenes": [{}]}, "scenes[0].segments: expected a non-empty list of segments, got nothing"),
    ({"title": 5, "scenes": [{"segments": [{"text": "a"}]}]}, "title: expected a string, got 5 (int)"),
    ({"negative_text": False, "scenes": [{"segments": [{"text": "a"}]}]},
     "negative_text: expected a string, got False (bool)"),
    ([{"text": "a", "requires_scene_transition": "yes"}],
     "[0].requires_scene_transition: expected true or false, got 'yes' (str)"),
    ([{"text": "a", "neg_text": 1}], "[0].neg_text: expected a string, got 1 (int)"),
    ("just text", "storyboard: expected an object with 'scenes' or a list of segments, got 'just text' (str)"),
], ids=["scenes-type", "scenes-missing", "scene-type", "segments-empty", "segments-missing", "title", "negative",
        "legacy-transition", "legacy-neg", "top-type"])
def test_structure_errors(tmp_path, data, expected):
    path = write(tmp_path, "s.json", json.dumps(data))
    assert problems_of(path) == [f"{path}: {expected}"]


def test_every_problem_is_reported_at_once():
    data = {"scenes": [{"segments": [{"text": ""}, {"text": 1}]}, {"segments": []}]}
    assert len(problems_of(data)) == 3


def test_zero_segments(tmp_path):
    assert problems_of({"scenes": []}) == ["storyboard has no segments; expected at least 1"]
    assert problems_of([]) == ["storyboard has no segments; expected at least 1"]
    path = write(tmp_path, "empty.txt", "\n\n")
    assert problems_of(path) == [f"{path}: storyboard has no segments; expected at least 1"]


def test_segment_maximum_and_raising_it():
    data = {"scenes": [{"segments": [{"text": f"segment {i}"} for i in range(DEFAULT_MAX_SEGMENTS + 1)]}]}
    (problem,) = problems_of(data)
    assert problem == ("storyboard has 22 segments (66 s); the maximum is 21 (63 s) — raise max_segments to allow "
                       "more")
    assert load_storyboard(data, max_segments=22).num_segments == 22
    assert load_storyboard(data, max_segments=None).num_segments == 22
    assert problems_of(data, max_segments=5)[0].startswith("storyboard has 22 segments (66 s); the maximum is 5")


def test_unknown_keys_are_warned_about_by_name_and_place():
    data = {"scenes": [{"segments": [{"text": "a", "duration": 3}], "mood": "calm"}], "author": "me"}
    with pytest.warns(UserWarning) as record:
        load_storyboard(data)
    messages = sorted(str(w.message) for w in record)
    assert messages == [
        "scenes[0].segments[0]: unknown key 'duration' ignored (known keys: text, negative_text)",
        "scenes[0]: unknown key 'mood' ignored (known keys: segments)",
        "storyboard: unknown key 'author' ignored (known keys: title, negative_text, scenes)",
    ]


def test_file_errors(tmp_path):
    assert problems_of(tmp_path / "missing.json") == [f"{tmp_path / 'missing.json'}: storyboard file not found"]
    assert problems_of(write(tmp_path, "s.toml", "x")) == [
        f"{tmp_path / 's.toml'}: unknown storyboard suffix '.toml'; expected .json, .yaml, .yml or .txt"]
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    assert problems_of(path) == [f"{path}: not UTF-8 text (byte 3)"]
    with pytest.raises(StoryboardError, match="expected a path, a dict, a list or a Storyboard, got 3"):
        load_storyboard(3)


def test_token_budget_names_count_and_limit(tmp_path):
    tokenizer, _ = tiny_text_encoder()
    long_text = "a red ball rolls across the whole floor"
    count = count_tokens(tokenizer, long_text)
    assert count == len(long_text.split()) + 2  # WordPiece words here are single tokens, plus [CLS] and [SEP]
    path = write(tmp_path, "s.txt", f"short\n{long_text}\n")
    storyboard = load_storyboard(path)
    storyboard.check_token_budget(tokenizer, count)
    with pytest.raises(StoryboardError) as info:
        storyboard.check_token_budget(tokenizer, count - 1, extra_negative_text=long_text)
    assert info.value.problems == [
        f"{path} line 2: text has {count} tokens, over the text encoder's budget of {count - 1} (shorten it)",
        f"argument: negative_text has {count} tokens, over the text encoder's budget of {count - 1} (shorten it)",
    ]


# hostile and oversized files: refused before anything big is built


def alias_bomb(levels: int = 9, width: int = 9, text: str = "lol") -> str:
    """A "billion laughs" YAML storyboard: each level is a list of `width` aliases to the level below, so a file of a
    few hundred bytes expands to width ** levels copies of `text`."""
    lines = [f"a0: &a0 {json.dumps(text)}"]
    for level in range(1, levels + 1):
        lines.append(f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * width)}]")
    lines.append(f"scenes: [{{segments: *a{levels}}}]")
    return "\n".join(lines) + "\n"


def measure(function) -> tuple[float, int, list[str]]:
    """CPU seconds, peak traced bytes and the problems of one call of `function`, which must raise StoryboardError.
    CPU time, not wall time: other jobs on a busy machine do not count, the work of expanding aliases would."""
    import time
    import tracemalloc

    tracemalloc.start()
    start = time.process_time()
    try:
        with pytest.raises(StoryboardError) as info:
            function()
    finally:
        seconds = time.process_time() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return seconds, peak, info.value.problems


@pytest.mark.parametrize("levels, width, text", [(9, 9, "lol"), (4, 600, "x" * 1000)],
                         ids=["billion-laughs", "long-strings"])
def test_yaml_alias_bomb_is_refused_fast_with_little_memory(tmp_path, levels, width, text):
    path = write(tmp_path, "bomb.yaml", alias_bomb(levels, width, text))
    assert path.stat().st_size < 20_000
    seconds, peak, problems = measure(lambda: load_storyboard(path, max_segments=None))
    assert problems == [f"{path}: its YAML aliases expand it past {MAX_EXPANDED_SIZE} nodes and characters, "
                                "the size limit of a storyboard; repeat fewer aliases"]
    assert seconds < 2 and peak < 4 * 2**20  # the read buffer (MAX_FILE_BYTES) is most of it


def test_a_yaml_alias_that_contains_itself_is_refused(tmp_path):
    path = write(tmp_path, "loop.yaml", "scenes: &s [{segments: [{text: a}]}, *s]\n")
    assert problems_of(path) == [f"{path}: a YAML alias refers to a node that contains it; a storyboard cannot "
                                 "contain itself"]


def test_aliases_within_the_limit_still_work(tmp_path):
    path = write(tmp_path, "anchors.yaml", "negative_text: &neg blurry\nscenes:\n"
                                           "  - segments: [{text: a cat, negative_text: *neg}, {text: a dog}]\n")
    assert load_storyboard(path).negative_texts() == ["blurry", "blurry"]


def test_files_over_the_size_limit_are_refused_unread(tmp_path):
    path = write(tmp_path, "big.txt", "a cat\n" * (MAX_FILE_BYTES // 6 + 1))
    _, peak, problems = measure(lambda: load_storyboard(path, max_segments=None))
    assert problems == [f"{path}: over {MAX_FILE_BYTES} bytes, the size limit of a storyboard file"]
    assert peak < 2 * MAX_FILE_BYTES + 2**20


@pytest.mark.parametrize("suffix", [".json", ".txt"])
def test_the_segment_count_is_checked_before_segments_are_built(tmp_path, suffix):
    count = 100_000
    text = json.dumps([{}] * count) if suffix == ".json" else "a\n" * count  # every JSON entry lacks its text
    path = write(tmp_path, "many" + suffix, text)
    _, peak, problems = measure(lambda: load_storyboard(path))
    assert problems == [f"{path}: storyboard has {count} segments ({3 * count} s); the maximum is 21 (63 s) — "
                                "raise max_segments to allow more"]
    assert peak < 40 * 2**20  # the parsed JSON, not 100,000 segments and problems


def test_messages_quote_huge_values_shortened_without_building_them():
    big = ["x" * 1000] * 1000
    data = {"scenes": [{"segments": [{"text": [big] * 100}]}]}  # whole, its repr would be 100 MB
    _, peak, problems = measure(lambda: load_storyboard(data))
    (problem,) = problems
    assert problem.startswith("scenes[0].segments[0].text: expected a string, got [[") and problem.endswith("(list)")
    assert len(problem) < 120 and peak < 2**20


# the text encoder's token budget


def test_over_budget_texts_are_truncated_with_a_warning_naming_the_dropped_words():
    tokenizer, _ = tiny_text_encoder()
    storyboard = load_storyboard(EXAMPLES.parent / "tests" / "data" / "long_texts_legacy.json")
    with pytest.warns(UserWarning) as record:
        storyboard.check_token_budget(tokenizer, 8, strict=False)
    messages = [str(w.message) for w in record]
    assert len(messages) == 4  # three texts and one negative text
    assert messages[0].endswith("long_texts_legacy.json: [0]: text has 61 tokens, over the text encoder's budget of "
                                "8; truncated, dropping 'vertical stripes, lit from the left, the stripes slowly "
                                "fading into a paler gray…'")
    kept = tokenizer(storyboard.texts[0], truncation=True, max_length=8)["input_ids"]  # as encode_text truncates
    assert tokenizer.decode(kept, skip_special_tokens=True) == "scene : a gray backdrop with"
    assert ": [2]: negative_text has 25 tokens, over the text encoder's budget of 8; truncated" in messages[3]
    with pytest.raises(StoryboardError) as info:
        storyboard.check_token_budget(tokenizer, 8)
    assert len(info.value.problems) == 4 and info.value.problems[0].endswith("(shorten it)")
